"""A local model folder's index (model_index.json, the diffusers save_pretrained layout).

The one reader of that file: the pipeline loader, `models info` and the diffusion backend all ask
it what a folder holds. Plain JSON, no torch.
"""

from __future__ import annotations

from pathlib import Path

from ..contracts.limits import read_json
from ..errors import UserError

CLASS_NAME = "ChexforgePipeline"


def read_model_index(folder: Path) -> dict:
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise UserError("no model_index.json: not a model folder (make one with `chexforge models init`, "
                        "import one, or give a diffusers save_pretrained folder)", folder)
    return read_folder_json(folder, "model_index.json")


def read_folder_json(folder: Path, name: str, default: dict | None = None) -> dict:
    """A JSON object file of a model folder (model_index.json, chexforge.json, a component's
    config.json, checkpoint metadata), read under contracts/limits.py's size, nesting and count
    limits: a damaged or hostile file is one line naming it. `default`: returned when the file
    is absent (else that is an error too)."""
    path = Path(folder) / name
    if default is not None and not path.is_file():
        return default
    value = read_json(path, name)
    if not isinstance(value, dict):
        raise UserError(f"{name} is not a JSON object", path)
    return value


def model_kind(folder: Path) -> str:
    """'chexforge' or 'diffusers' (a text-to-image pipeline), from model_index.json."""
    return "chexforge" if read_model_index(folder).get("_class_name", "") == CLASS_NAME else "diffusers"
