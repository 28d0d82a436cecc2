"""Which torch device to run on: the one place that turns 'auto', 'cpu', 'cuda:1' into a device.

torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

from typing import Any

from .errors import UserError


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torch_device(name: str | None = "auto") -> Any:
    """'auto' (or None): the first GPU when there is one, else the CPU; otherwise the named device.
    A GPU this machine does not have is a one-line error, not a CUDA traceback."""
    import torch

    name = (name or "auto").strip()
    if name == "auto":
        return torch.device("cuda" if gpu_count() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= gpu_count():
        n = gpu_count()
        raise UserError(f"device {name!r} is not on this machine ({n} GPU{'s' if n != 1 else ''} here)")
    return device
