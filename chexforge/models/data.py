"""Training data: a chexforge manifest, or a CheXpert/MIMIC-style CSV with an image root.

Each example becomes (image path, prompt, boxes, masks). A manifest brings its own prompts,
realised boxes and finding masks. A CSV needs a path column (`Path`, `path`, `image`, `file`,
`filename`); its text is the `prompt` or `report` column if there is one, otherwise a report
sentence built from CheXpert-style label columns (1 = positive; 0, -1 and blank are not) with
`Sex`, `Age` and `AP/PA` / `Frontal/Lateral` when present. Optional `boxes` (a JSON list of
{label, x0, y0, x1, y1}, normalised) and `mask` (a PNG path; `mask_label` names its finding)
columns feed the control branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..contracts.limits import load_json
from ..contracts.vocabulary import ALIASES, FINDING_NAMES, NO_FINDING
from ..errors import UserError

PATH_COLUMNS = ("path", "Path", "image", "file", "filename", "image_path")


@dataclass
class Example:
    image: Path
    prompt: str
    job: dict = field(default_factory=dict)  # sex/age/race/view for the demographic prefix
    boxes: list[dict] = field(default_factory=list)
    masks: dict[str, Path] = field(default_factory=dict)


def read_examples(source: str | Path, image_root: str | Path | None = None) -> list[Example]:
    source = Path(source)
    if not source.is_file():
        raise UserError("no such training data file (a manifest.parquet or a CSV)", source)
    if source.suffix == ".parquet":
        return _from_manifest(source)
    if source.suffix.lower() in (".csv", ".gz"):
        return _from_csv(source, Path(image_root) if image_root else source.parent)
    raise UserError("expected a chexforge manifest (.parquet) or a label CSV (.csv)", source)


def _from_manifest(path: Path) -> list[Example]:
    root = path.parent
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable manifest ({e})", path) from None
    for col in ("image_png", "prompt", "status"):
        if col not in df:
            raise UserError(f"not a chexforge manifest: no {col!r} column", path)
    df = df[(df.status == "ok") & df.image_png.notna()]
    out = []
    for r in df.itertuples(index=False):
        masks = {m["name"]: root / m["path"] for m in (r.masks if r.masks is not None else []) if m["name"] in FINDING_NAMES}
        boxes = [dict(b) for b in (r.realised_boxes if r.realised_boxes is not None else [])]
        job = {k: _value(getattr(r, k, None)) for k in ("sex", "age", "race", "view")}
        out.append(Example(root / r.image_png, r.prompt, job, boxes, masks))
    if not out:
        raise UserError("the manifest has no finished images", path)
    return out


def _from_csv(path: Path, root: Path) -> list[Example]:
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise UserError(f"unreadable CSV ({str(e).splitlines()[0]})", path) from None
    col = next((c for c in PATH_COLUMNS if c in df), None)
    if col is None:
        raise UserError(f"no image path column; expected one of {', '.join(PATH_COLUMNS)}", f"{path}:1")
    text_col = next((c for c in ("prompt", "report", "text", "caption") if c in df), None)
    findings = {c: ALIASES.get(c, c) for c in df.columns if ALIASES.get(c, c) in FINDING_NAMES}
    out = []
    for i, row in enumerate(df.to_dict("records"), start=2):
        job = {"sex": _sex(row.get("Sex") or row.get("sex")), "age": _age(row.get("Age") or row.get("age")),
               "race": _value(row.get("race")) or _value(row.get("Race")) or None, "view": row.get("AP/PA") or row.get("view") or "PA"}
        if text_col and isinstance(row.get(text_col), str):
            prompt = row[text_col]
        else:
            positive = [findings[c] for c in findings if _positive(row.get(c)) and findings[c] != NO_FINDING]
            prompt = f"{job['view']} chest radiograph. " + (". ".join(positive) + "." if positive else "No acute cardiopulmonary abnormality.")
        boxes = []
        if isinstance(row.get("boxes"), str) and row["boxes"].strip():
            boxes = load_json(row["boxes"], f"{path}:{i}", "column boxes")
        masks = {}
        if isinstance(row.get("mask"), str) and row["mask"]:
            masks[str(row.get("mask_label") or "Lesion")] = root / row["mask"]
        out.append(Example(root / str(row[col]), prompt, job, boxes, masks))
    if not out:
        raise UserError("the CSV has no rows", path)
    return out


def _value(v):
    """A manifest cell, or None where it is missing (pandas reads an empty cell as NaN, which the
    caption would otherwise print as `race:nan`)."""
    try:
        return None if pd.isna(v) else v
    except (TypeError, ValueError):  # list-like cells are values
        return v


def _positive(v) -> bool:
    try:
        return float(v) == 1.0
    except (TypeError, ValueError):
        return False


def _sex(v) -> str | None:
    v = str(v or "").strip().lower()
    return {"female": "F", "f": "F", "male": "M", "m": "M"}.get(v)


def _age(v) -> int | None:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None
