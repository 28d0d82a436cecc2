"""Safe checkpoint I/O: safetensors, or torch.load(weights_only=True) for .pt/.pth/.bin.

No pickle code ever runs: a checkpoint that needs it is refused with a clear line.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .. import atomic
from ..errors import UserError


def load_state_dict(path: str | Path, map_location: str = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError("no such checkpoint file", path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=map_location)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"not a readable safetensors file ({e})", path) from None
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load as a weights-only checkpoint ({first[:200]})", path) from None
    if not isinstance(obj, dict):
        raise UserError(f"expected a dict of tensors, found {type(obj).__name__}", path)
    return obj


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file (contiguous CPU copies; shared storage made distinct)."""
    from safetensors.torch import save as save_bytes

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    atomic.write_bytes(path, save_bytes(tensors, metadata=metadata))
