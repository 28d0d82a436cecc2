"""Layouts: which masks and boxes a job asks for (DESIGN.md, "Layouts").

`none` asks for none (text-only generation). `physics` leaves them to the backend (the DRR backend places lesions in 3-D and reports the
exact projection). `explicit` takes them from the recipe, a CSV of boxes or a folder of mask
PNGs, cycled or sampled over the jobs. Each job records in `mask_ref` which item it got.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..contracts.images import read_gray
from ..contracts.jobs import BOX, BOXES, laterality_column
from ..contracts.vocabulary import BY_NAME
from ..errors import UserError
from ..recipe.schema import Cohort, Recipe, layout_source
from . import rng


@dataclass
class LayoutItems:
    refs: list[str]
    boxes: list[list[dict]]


def choose(recipe: Recipe, cohort: Cohort, key: int, index: np.ndarray,
           cols: dict | None = None) -> tuple[pa.Array, pa.Array]:
    """(boxes, mask_ref) columns for a cohort's jobs (`cols`: the findings already drawn)."""
    n = len(index)
    layout = cohort.layout
    source = layout_source(recipe, cohort)
    if source in ("physics", "none"):
        empty = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], BOX))
        return empty.cast(BOXES), pa.repeat(pa.scalar(source), n)
    if source == "prior":
        return prior_layout(cohort, key, index, cols or {})
    items = explicit_items(recipe, cohort)
    if layout.order == "cycle":
        pick = (index % np.uint64(len(items.refs))).astype(np.int64)
    else:
        pick = np.floor(rng.uniform(key, index, "layout") * len(items.refs)).astype(np.int64)
    boxes = pa.array(items.boxes, BOXES).take(pa.array(pick))
    refs = pa.array(items.refs, pa.string()).take(pa.array(pick))
    return boxes, refs


def prior_layout(cohort: Cohort, key: int, index: np.ndarray, cols: dict) -> tuple[pa.Array, pa.Array]:
    """Boxes from real box geometry for each present finding (on its side; bilateral: one box a
    side), plus masks from the mask libraries: SIIM pneumothorax masks for Pneumothorax, lung
    masks when the cohort asks for `lungs`."""
    from ..priors import masks as library
    from ..priors.tables import has_boxes, sample_boxes

    n = len(index)
    parents, parts = [], []
    for name in [f for f in cols if f in BY_NAME and BY_NAME[f].localizable and has_boxes(f)]:
        present = np.asarray(cols[name], dtype=np.int8) == 1
        if not present.any():
            continue
        lat_col = cols.get(laterality_column(name))
        lat = lat_col.to_numpy(zero_copy_only=False) if lat_col is not None else np.full(n, None, dtype=object)
        rows = np.flatnonzero(present)
        sides = lat[rows].astype(object)
        both = sides == "bilateral"
        rows = np.concatenate([rows, rows[both]])  # bilateral: a second box on the other side
        sides = np.concatenate([np.where(both, "right", sides), np.full(both.sum(), "left", dtype=object)])
        second = (np.arange(len(rows)) >= present.sum()).astype(np.uint64)  # the other side's box
        counter = index[rows] * np.uint64(2) + second
        u = np.stack([rng.uniform(key, counter, f"box:{name}:{k}") for k in range(4)], 1)
        xy = sample_boxes(name, sides, u)
        parents.append(rows)
        parts.append(pa.table({"label": pa.repeat(pa.scalar(name), len(rows)), "x0": xy[:, 0].astype(np.float32),
                               "y0": xy[:, 1].astype(np.float32), "x1": xy[:, 2].astype(np.float32),
                               "y1": xy[:, 3].astype(np.float32)}))
    if parts:
        parent = np.concatenate(parents)
        order = np.argsort(parent, kind="stable")
        flat = pa.concat_tables(parts).take(pa.array(order)).combine_chunks().to_struct_array().combine_chunks()
        offsets = np.concatenate([[0], np.cumsum(np.bincount(parent, minlength=n))]).astype(np.int32)
        boxes = pa.ListArray.from_arrays(pa.array(offsets), flat.cast(BOX)).cast(BOXES)
    else:
        boxes = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], BOX)).cast(BOXES)
    refs = np.full(n, "prior", dtype=object)
    wants_lungs = "lungs" in (cohort.masks or [])
    ptx = np.asarray(cols.get("Pneumothorax", np.zeros(n)), dtype=np.int8) == 1
    if wants_lungs or ptx.any():
        if not library.available():
            raise UserError(f"cohort {cohort.name!r}: prior masks need the torchxrayvision package "
                            "(pip install --no-deps torchxrayvision)")
        if wants_lungs:
            lungs = library.refs("lungs")
            pick = np.floor(rng.uniform(key, index, "mask:lungs") * len(lungs)).astype(np.int64)
            refs = np.array([f"{a};{b}" for a, b in zip(refs, np.array(lungs, dtype=object)[pick])], dtype=object)
        if ptx.any():
            lat_col = cols.get(laterality_column("Pneumothorax"))
            lat = lat_col.to_numpy(zero_copy_only=False) if lat_col is not None else np.full(n, None, dtype=object)
            u = rng.uniform(key, index, "mask:siim")
            for side in ("left", "right", None):
                rows = np.flatnonzero(ptx & ((lat == side) if side else ~np.isin(lat, ["left", "right"])))
                if len(rows):
                    choices = np.array(library.refs("siim", side), dtype=object)
                    refs[rows] = [f"{r};{c}" for r, c in zip(refs[rows], choices[np.floor(u[rows] * len(choices)).astype(np.int64)])]
    return boxes, pa.array(refs.astype(str), pa.string())


def explicit_items(recipe: Recipe, cohort: Cohort) -> LayoutItems:
    layout = cohort.layout
    if layout.boxes is not None:
        boxes = [{"label": b.label, "x0": b.box[0], "y0": b.box[1], "x1": b.box[2], "y1": b.box[3]} for b in layout.boxes]
        return LayoutItems(["explicit:recipe"], [boxes])
    if layout.boxes_csv is not None:
        return _boxes_csv(recipe.resolve_path(layout.boxes_csv))
    assert layout.masks_dir is not None
    return _masks_dir(recipe.resolve_path(layout.masks_dir))


def _boxes_csv(path: Path) -> LayoutItems:
    """Rows `image_id,label,x0,y0,x1,y1` (normalized); rows sharing an image_id form one layout."""
    if not path.is_file():
        raise UserError("no such boxes CSV", path)
    groups: dict[str, list[dict]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = ["image_id", "label", "x0", "y0", "x1", "y1"]
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"missing columns {', '.join(missing)}; expected a header {','.join(need)}", f"{path}:1")
        for row_no, row in enumerate(reader, start=2):
            try:
                x0, y0, x1, y1 = (float(row[c]) for c in ("x0", "y0", "x1", "y1"))
            except (TypeError, ValueError):
                raise UserError("x0, y0, x1, y1 must be numbers", f"{path}:{row_no}") from None
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise UserError("expected normalized 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1", f"{path}:{row_no}")
            label = row["label"]
            if label not in BY_NAME:
                raise UserError(f"unknown label {label!r}; expected a finding name such as Nodule", f"{path}:{row_no}")
            groups.setdefault(row["image_id"], []).append({"label": label, "x0": x0, "y0": y0, "x1": x1, "y1": y1})
    if not groups:
        raise UserError("the boxes CSV has no rows", path)
    return LayoutItems([f"explicit:{path.name}#{k}" for k in groups], list(groups.values()))


def _masks_dir(root: Path) -> LayoutItems:
    """`root/<Finding>/*.png`: each PNG is one lesion layout; its box is the mask's extent."""
    if not root.is_dir():
        raise UserError("no such masks folder", root)
    refs, boxes = [], []
    for path in sorted(root.glob("*/*.png")):
        label = path.parent.name
        if label not in BY_NAME:
            raise UserError(f"folder {label!r} is not a finding name (expected e.g. {root.name}/Nodule/*.png)", path.parent)
        try:
            mask = read_gray(path) > 0  # any non-black pixel is inside: user masks may be antialiased
        except UserError as e:
            raise UserError(f"not a readable PNG ({e.message})", path) from None
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            raise UserError("the mask is empty", path)
        h, w = mask.shape
        refs.append(f"explicit:{path.resolve().as_posix()}")  # the backend reads it at generate time
        boxes.append([{"label": label, "x0": xs.min() / w, "y0": ys.min() / h, "x1": (xs.max() + 1) / w, "y1": (ys.max() + 1) / h}])
    if not refs:
        raise UserError("no <Finding>/*.png masks found", root)
    return LayoutItems(refs, boxes)
