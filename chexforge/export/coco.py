"""COCO JSON from the manifest: every realised box with its segmentation, plus anatomy masks.

Built batch by batch from the few columns it needs, one small JSON fragment per image and
annotation, so a million-image manifest never becomes a million Python dicts at once. Each
row's mask PNGs are read while its row is written (never kept).

**Ids are stable.** An image's id is derived from its job: `(cohort position + 1) · 2^27 + index`
(the cohort's place in the recipe, the job's index in its cohort), so the same job has the same
id in a shard's coco.json, in the merged one and in a run with a cohort's count raised. Two jobs
never share it (a cohort holds at most `MAX_COHORT_IMAGES` < 2^27 images), and it stays below
2^43, so an annotation id `image id · 1024 + k` (k: the annotation's place in its image) stays
below 2^53: every id is exact in JavaScript and in float64 JSON parsers. A 53-bit hash of the job
id would be stable too, but could collide (the birthday bound: about 5 % at ten million images
and their boxes); these cannot. docs/loaders.md says more.

**Segmentation.** A box of finding F takes its pixels from F's mask (`masks/<cohort>/<job>_F.png`,
the manifest's `masks` entry named F, written by every backend as the union of F's regions):
the part of the mask inside the box, so each side of a bilateral finding (one mask, two boxes)
gets its own region. It is stored as compressed RLE (pycocotools), `area` is its pixel count.
A box without a mask (masks not written, or an empty region) keeps `area` = box area and has no
`segmentation`. Anatomy masks (lungs, lung_left, lung_right, heart) become annotations of their
own categories (ids 101+), with the mask's bounding box.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable

import numpy as np

from ..contracts.images import read_mask
from ..contracts.vocabulary import ANATOMY, FINDINGS
from ..plan.summary import record_batches
from ..recipe.schema import MAX_COHORT_IMAGES
from ..store import Store

COLUMNS = ["job_id", "cohort", "index", "status", "image_png", "image_dicom", "size", "realised_boxes", "masks"]

INDEX_BITS = 27  # a cohort's images: MAX_COHORT_IMAGES < 2^27
MAX_COHORTS = 1 << 16  # image ids < 2^(16 + 27) = 2^43
ANNOTATIONS_PER_IMAGE = 1 << 10  # annotation id = image id · 1024 + k < 2^53
ANATOMY_CATEGORY = 101  # first anatomy category id; findings keep theirs (1 + place in the vocabulary)
assert MAX_COHORT_IMAGES <= 1 << INDEX_BITS


def categories() -> list[dict]:
    found = [{"id": i + 1, "name": f.name, "supercategory": "finding"} for i, f in enumerate(FINDINGS) if f.localizable]
    return found + [{"id": ANATOMY_CATEGORY + i, "name": a, "supercategory": "anatomy"} for i, a in enumerate(ANATOMY)]


def image_id(cohort_position: int, index: int) -> int:
    """The COCO id of a cohort's `index`-th image (cohort_position: 0-based place in the recipe)."""
    if not 0 <= cohort_position < MAX_COHORTS or not 0 <= index < 1 << INDEX_BITS:
        raise ValueError(f"no COCO image id for cohort {cohort_position}, index {index}")
    return ((cohort_position + 1) << INDEX_BITS) | index


def annotation_id(image: int, k: int) -> int:
    if not 0 <= k < ANNOTATIONS_PER_IMAGE:
        raise ValueError(f"an image has at most {ANNOTATIONS_PER_IMAGE} COCO annotations")
    return image * ANNOTATIONS_PER_IMAGE + k


class ImageIds:
    """Image ids by (cohort, index). `cohorts`: the recipe's cohort names in order; a cohort it
    does not name (no recipe at hand) takes the next position in order of first appearance, which
    is stable only for that same manifest."""

    def __init__(self, cohorts: list[str] | None = None):
        self.position = {name: i for i, name in enumerate(cohorts or [])}

    def __call__(self, cohort: str, index: int) -> int:
        return image_id(self.position.setdefault(cohort, len(self.position)), int(index))


def box_pixels(box: dict, size: int) -> tuple[int, int, int, int]:
    """A normalised box → the pixel slice (x0, y0, x1, y1), ends exclusive, that it covers. Boxes
    measured from masks lie on pixel edges; the tolerance absorbs their float32 rounding."""
    def lo(v: float) -> int:
        return min(max(math.floor(v * size + 1e-3), 0), size - 1)

    def hi(v: float, start: int) -> int:
        return min(max(math.ceil(v * size - 1e-3), start + 1), size)

    x0, y0 = lo(box["x0"]), lo(box["y0"])
    return x0, y0, hi(box["x1"], x0), hi(box["y1"], y0)


def rle(mask: np.ndarray) -> dict:
    """Bool H×W → COCO compressed RLE with `counts` as text (what JSON can hold)."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(encoded["size"][0]), int(encoded["size"][1])], "counts": encoded["counts"].decode("ascii")}


def row_annotations(row: dict, image: int, cat_id: dict[str, int],
                    load_mask: Callable[[str], np.ndarray] | None) -> list[dict]:
    """One image's annotations: its boxes (with the box's region of the finding's mask), then
    its anatomy masks. `load_mask(rel path)` → bool H×W; None: no segmentation."""
    size = int(row["size"])
    paths = {m["name"]: m["path"] for m in row.get("masks") or []}
    cache: dict[str, np.ndarray | None] = {}

    def mask(name: str) -> np.ndarray | None:
        if name not in cache:
            m = load_mask(paths[name]) if load_mask is not None and name in paths else None
            cache[name] = m if m is not None and m.shape == (size, size) else None
        return cache[name]

    anns: list[dict] = []
    for box in row.get("realised_boxes") or []:
        if box["label"] not in cat_id:
            continue
        x, y = box["x0"] * size, box["y0"] * size
        w, h = (box["x1"] - box["x0"]) * size, (box["y1"] - box["y0"]) * size
        ann = {"id": annotation_id(image, len(anns)), "image_id": image, "category_id": cat_id[box["label"]],
               "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], "area": round(w * h, 2), "iscrowd": 0}
        full = mask(box["label"])
        if full is not None:
            x0, y0, x1, y1 = box_pixels(box, size)
            region = np.zeros_like(full)
            region[y0:y1, x0:x1] = full[y0:y1, x0:x1]
            if region.any():
                ann["segmentation"], ann["area"] = rle(region), int(region.sum())
        anns.append(ann)
    for name in ANATOMY:
        full = mask(name)
        if full is None or not full.any():
            continue
        ys, xs = np.flatnonzero(full.any(1)), np.flatnonzero(full.any(0))  # rows and columns: cheaper than np.nonzero
        x0, y0 = int(xs[0]), int(ys[0])
        w, h = int(xs[-1]) + 1 - x0, int(ys[-1]) + 1 - y0
        anns.append({"id": annotation_id(image, len(anns)), "image_id": image, "category_id": cat_id[name],
                     "bbox": [x0, y0, w, h], "area": int(full.sum()), "segmentation": rle(full), "iscrowd": 0})
    return anns


def write_coco_stream(out, manifest, description: str = "", store: Store | None = None,
                      cohorts: list[str] | None = None) -> None:
    """Write COCO JSON to the binary file `out`, one fragment per image and annotation: images go
    out as they come, annotations wait in a temporary file, so memory does not grow with the
    dataset. `store`: the output folder the manifest's mask paths are in (None: boxes only);
    `cohorts`: the recipe's cohort names in order (the image ids' cohort positions)."""
    import tempfile

    cat_id = {c["name"]: c["id"] for c in categories()}
    ids = ImageIds(cohorts)
    read = (lambda rel: read_mask(io.BytesIO(store.read_bytes(rel)))) if store is not None else None
    dump = json.JSONEncoder(separators=(",", ":")).encode
    head = dump({"description": description or "chexforge synthetic chest radiographs", "version": "1.0"})
    out.write(('{"info":' + head + ',"licenses":[],\n"images":[').encode())
    images = annotations = 0
    with tempfile.TemporaryFile() as spool:
        for batch in record_batches(manifest):
            for row in batch.select(COLUMNS).to_pylist():
                if row["status"] != "ok":
                    continue
                image = ids(row["cohort"], row["index"])
                size = int(row["size"])
                out.write((("\n" if images == 0 else ",\n") + dump(
                    {"id": image, "file_name": row["image_png"] or row["image_dicom"], "width": size,
                     "height": size, "job_id": row["job_id"], "cohort": row["cohort"],
                     "index": int(row["index"])})).encode())
                images += 1
                for ann in row_annotations(row, image, cat_id, read):
                    spool.write((("\n" if annotations == 0 else ",\n") + dump(ann)).encode())
                    annotations += 1
        out.write(b'],\n"annotations":[')
        spool.seek(0)
        while block := spool.read(1 << 20):
            out.write(block)
    out.write(('],\n"categories":' + dump(categories()) + "}\n").encode())


def coco_text(manifest, description: str = "", store: Store | None = None, cohorts: list[str] | None = None) -> str:
    buf = io.BytesIO()
    write_coco_stream(buf, manifest, description, store, cohorts)
    return buf.getvalue().decode()


def build_coco(manifest, description: str = "", store: Store | None = None, cohorts: list[str] | None = None) -> dict:
    return json.loads(coco_text(manifest, description, store, cohorts))


def write_coco(store: Store, manifest, description: str = "", cohorts: list[str] | None = None) -> None:
    """out/coco.json, with the masks read from `store`."""
    with store.open_write("coco.json") as f:
        write_coco_stream(f, manifest, description, store, cohorts)
