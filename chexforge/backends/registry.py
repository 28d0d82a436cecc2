"""Build a generator backend by name (this imports torch and loads the model).

What each backend can do is plain data in `contracts/backends.py`; this module only turns a name
into the working object when a run starts.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..contracts.backends import backend_info


def load_backend(name: str, options: dict[str, Any], **kwargs: Any):
    """Build the backend object (this imports torch and loads the model)."""
    info = backend_info(name)
    module, cls = info.factory.split(":")
    return getattr(importlib.import_module(module), cls)(info.options(options), **kwargs)
