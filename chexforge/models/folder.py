"""A local model folder's index (model_index.json, the diffusers save_pretrained layout).

The one reader of that file: the pipeline loader, `models info` and the diffusion backend all ask
it what a folder holds. Plain JSON, no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

CLASS_NAME = "ChexforgePipeline"


def read_model_index(folder: Path) -> dict:
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise UserError("no model_index.json: not a model folder (make one with `chexforge models init`, "
                        "import one, or give a diffusers save_pretrained folder)", folder)
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"model_index.json is not valid JSON ({e.msg} at line {e.lineno})", path) from None
    if not isinstance(index, dict):
        raise UserError("model_index.json is not a JSON object", path)
    return index


def model_kind(folder: Path) -> str:
    """'chexforge' or 'diffusers' (a text-to-image pipeline), from model_index.json."""
    return "chexforge" if read_model_index(folder).get("_class_name", "") == CLASS_NAME else "diffusers"
