"""out/datalist.json: the dataset as a MONAI (Medical Segmentation Decathlon style) datalist.

    from monai.data import load_decathlon_datalist
    items = load_decathlon_datalist("out/datalist.json", data_list_key="training", base_dir="out")

One item per ok image, paths relative to the output folder:

- `image`: the 16-bit PNG (the DICOM file where no PNG was written);
- `label`: multi-hot 0/1 over `findings` (a list stored in the file: the label vocabulary in
  its order, "No Finding" included);
- `mask_<name>`: one mask PNG per structure the image has (finding or anatomy; `structures`
  maps each key to its name). Images differ in which masks they have: load with
  `LoadImaged(keys=..., allow_missing_keys=True)` or keep the items that have the key you train on;
- `box` (pixels, `[x0, y0, x1, y1]`, ends exclusive) and `box_label` (index into `findings`)
  for detection;
- `spacing`: mm per pixel at the patient (as the DICOM PixelSpacing), where the backend knows its
  geometry; `job_id` and `view` to join with manifest.parquet.

**Box axis order.** MONAI's PNG reader (PILReader, `reverse_indexing=True`) returns a W×H array:
its first spatial axis is the image's x (column), its second y (row). MONAI's box mode `xyxy`
names the first spatial axis x, so `[x0, y0, x1, y1]` in image columns/rows is exactly MONAI's
order: after `LoadImaged`, `image[..., x0:x1, y0:y1]` is the box's region.
(A NumPy/PIL reading of the same PNG is H×W, `pixels[y0:y1, x0:x1]`.)

Written as a stream, one item a line, like coco.json.
"""

from __future__ import annotations

import json

from ..contracts.vocabulary import FINDING_NAMES
from ..plan.summary import record_batches
from ..store import Store
from .writer import slug

COLUMNS = ["job_id", "status", "view", "image_png", "image_dicom", "size", "realised_boxes", "masks", "meta",
           *FINDING_NAMES]
DATALIST = "datalist.json"
BOX_AXES = ("MONAI xyxy in pixels, ends exclusive: [x0, y0, x1, y1] where x is the first spatial axis of the "
            "image as LoadImage(d) returns a PNG (PILReader reverses NumPy's row/column order), i.e. the image "
            "column; image[..., x0:x1, y0:y1] after LoadImaged is the box")


def mask_key(name: str) -> str:
    """The item key of a structure's mask: `mask_` + the name as its file is named (spaces → `_`)."""
    return "mask_" + slug(name)


def spacing_mm(meta: str | None) -> float | None:
    """Pixel spacing at the patient (mm), where the backend recorded its projection geometry.

    The manifest has no spacing column; the DRR backend's per-image `meta.geometry` holds the
    detector pitch and the magnification at the isocentre, the same two numbers its `Projection`
    gives the DICOM writer (PixelSpacing = pitch / magnification). Other backends know no
    geometry and get none."""
    try:
        geometry = json.loads(meta or "{}").get("geometry") or {}
        pitch, magnification = float(geometry["pixel_mm"]), float(geometry.get("magnification") or 1.0)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return round(pitch / magnification, 5) if pitch > 0 and magnification > 0 else None


def item(row: dict) -> dict:
    size = int(row["size"])
    out: dict = {"image": row["image_png"] or row["image_dicom"],
                 "label": [int(row.get(f) or 0) for f in FINDING_NAMES]}  # the planner writes 0/1 for every finding
    for m in row.get("masks") or []:
        out[mask_key(m["name"])] = m["path"]
    boxes = [b for b in row.get("realised_boxes") or [] if b["label"] in FINDING_NAMES]
    out["box"] = [[round(b["x0"] * size, 2), round(b["y0"] * size, 2), round(b["x1"] * size, 2),
                   round(b["y1"] * size, 2)] for b in boxes]
    out["box_label"] = [FINDING_NAMES.index(b["label"]) for b in boxes]
    spacing = spacing_mm(row.get("meta"))
    if spacing is not None:
        out["spacing"] = [spacing, spacing]
    out["job_id"], out["view"] = row["job_id"], row.get("view")
    return out


def write_datalist_stream(out, manifest, name: str = "", description: str = "") -> None:
    """Write the datalist JSON to the binary file `out`, an item at a time."""
    dump = json.JSONEncoder(separators=(",", ":")).encode
    head = {"name": name or "chexforge", "description": description or "chexforge synthetic chest radiographs",
            "tensorImageSize": "2D", "modality": {"0": "X-ray"}, "findings": list(FINDING_NAMES),
            "box_mode": "xyxy", "box_axes": BOX_AXES}
    out.write((dump(head)[:-1] + ',\n"training":[').encode())
    n, structures = 0, {}
    for batch in record_batches(manifest):
        for row in batch.select(COLUMNS).to_pylist():
            if row["status"] != "ok":
                continue
            for m in row.get("masks") or []:
                structures[mask_key(m["name"])] = m["name"]  # a handful of names, not a per-row table
            out.write((("\n" if n == 0 else ",\n") + dump(item(row))).encode())
            n += 1
    out.write(('],\n"numTraining":' + str(n) + ',"structures":' + dump(dict(sorted(structures.items())))
               + "}\n").encode())


def write_datalist(store: Store, manifest, name: str = "", description: str = "") -> None:
    with store.open_write(DATALIST) as f:
        write_datalist_stream(f, manifest, name, description)
