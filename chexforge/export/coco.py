"""COCO detection JSON from the manifest's realised boxes (pixel [x, y, width, height]).

Built batch by batch from the few columns it needs, one small JSON fragment per image and box,
so a million-image manifest never becomes a million Python dicts at once.
"""

from __future__ import annotations

import json

import pyarrow as pa

from ..contracts.vocabulary import FINDINGS
from ..store import Store

COLUMNS = ["job_id", "cohort", "status", "image_png", "image_dicom", "size", "realised_boxes"]


def categories() -> list[dict]:
    return [{"id": i + 1, "name": f.name, "supercategory": "finding"} for i, f in enumerate(FINDINGS) if f.localizable]


def _batches(manifest):
    if isinstance(manifest, pa.Table):
        return manifest.select(COLUMNS).to_batches(max_chunksize=8192)
    return manifest


def write_coco_stream(out, manifest, description: str = "") -> None:
    """Write COCO JSON to the binary file `out`, one fragment per image and box: images go out as
    they come, boxes wait in a temporary file, so memory does not grow with the dataset."""
    import tempfile

    cat_id = {c["name"]: c["id"] for c in categories()}
    dump = json.JSONEncoder(separators=(",", ":")).encode
    head = dump({"description": description or "chexforge synthetic chest radiographs", "version": "1.0"})
    out.write(('{"info":' + head + ',"licenses":[],\n"images":[').encode())
    image_id = ann_id = 0
    with tempfile.TemporaryFile() as boxes:
        for batch in _batches(manifest):
            for row in batch.select(COLUMNS).to_pylist():
                if row["status"] != "ok":
                    continue
                image_id += 1
                size = int(row["size"])
                out.write((("\n" if image_id == 1 else ",\n") + dump(
                    {"id": image_id, "file_name": row["image_png"] or row["image_dicom"], "width": size,
                     "height": size, "job_id": row["job_id"], "cohort": row["cohort"]})).encode())
                for box in row["realised_boxes"] or []:
                    if box["label"] not in cat_id:
                        continue
                    x, y = box["x0"] * size, box["y0"] * size
                    w, h = (box["x1"] - box["x0"]) * size, (box["y1"] - box["y0"]) * size
                    ann_id += 1
                    boxes.write((("\n" if ann_id == 1 else ",\n") + dump(
                        {"id": ann_id, "image_id": image_id, "category_id": cat_id[box["label"]],
                         "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                         "area": round(w * h, 2), "iscrowd": 0})).encode())
        out.write(b'],\n"annotations":[')
        boxes.seek(0)
        while block := boxes.read(1 << 20):
            out.write(block)
    out.write(('],\n"categories":' + dump(categories()) + "}\n").encode())


def coco_text(manifest, description: str = "") -> str:
    import io

    buf = io.BytesIO()
    write_coco_stream(buf, manifest, description)
    return buf.getvalue().decode()


def build_coco(manifest, description: str = "") -> dict:
    return json.loads(coco_text(manifest, description))


def write_coco(store: Store, manifest, description: str = "") -> None:
    with store.open_write("coco.json") as f:
        write_coco_stream(f, manifest, description)
