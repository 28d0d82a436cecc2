"""Local model files that QC rules and `chexforge eval` can name, and a check that they exist.

Pure path logic (no torch), so recipe validation can say "the weights are not on this machine"
at the rule's line. `xrv-densenet` names torchxrayvision's DenseNet-121 "all" model, used only
when its weights file is already in torchxrayvision's cache folder: chexforge never downloads it.
Any other name is a local file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

XRV_MODELS = {  # chexforge name → the file torchxrayvision stores in its cache folder
    "xrv-densenet": "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
}
XRV_WEIGHTS = {"xrv-densenet": "densenet121-res224-all"}  # torchxrayvision's own name for it


def xrv_cache_dir() -> Path:
    return Path(os.path.expanduser(os.path.join("~", ".torchxrayvision", "models_data")))


def model_file(spec: str, base: Callable[[str], Path] | None) -> Path:
    if spec in XRV_MODELS:
        return xrv_cache_dir() / XRV_MODELS[spec]
    return base(spec) if base is not None else Path(spec).expanduser()


def model_problem(spec: str, check: str, base: Callable[[str], Path] | None = None) -> str | None:
    """Why the model of a rule cannot be used, or None. Looks at files only (no torch)."""
    if check == "sex" and spec in XRV_MODELS:
        return f"the sex check needs a local TorchScript sex classifier file, not {spec!r}"
    path = model_file(spec, base)
    if spec in XRV_MODELS and not path.is_file():
        return (f"the {spec} weights are not on this machine ({path}); chexforge never downloads them: "
                "put the file there, or give a local TorchScript file")
    if spec not in XRV_MODELS and not path.is_file():
        return f"no such model file {str(path)!r} (expected a local TorchScript file or xrv-densenet)"
    return None
