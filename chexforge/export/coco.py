"""COCO detection JSON from the manifest's realised boxes (pixel [x, y, width, height])."""

from __future__ import annotations

import json

import pyarrow as pa

from ..recipe.vocabulary import FINDINGS
from ..store import Store


def build_coco(manifest: pa.Table, description: str = "") -> dict:
    categories = [{"id": i + 1, "name": f.name, "supercategory": "finding"} for i, f in enumerate(FINDINGS) if f.localizable]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    cols = ["job_id", "cohort", "status", "image_png", "image_dicom", "size", "realised_boxes"]
    for row in manifest.select(cols).to_pylist():
        if row["status"] != "ok":
            continue
        image_id = len(images) + 1
        size = int(row["size"])
        images.append({"id": image_id, "file_name": row["image_png"] or row["image_dicom"], "width": size,
                       "height": size, "job_id": row["job_id"], "cohort": row["cohort"]})
        for box in row["realised_boxes"] or []:
            if box["label"] not in cat_id:
                continue
            x, y = box["x0"] * size, box["y0"] * size
            w, h = (box["x1"] - box["x0"]) * size, (box["y1"] - box["y0"]) * size
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[box["label"]],
                                "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                                "area": round(w * h, 2), "iscrowd": 0})
    return {"info": {"description": description or "chexforge synthetic chest radiographs", "version": "1.0"},
            "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def write_coco(store: Store, manifest: pa.Table, description: str = "") -> None:
    store.write_text("coco.json", json.dumps(build_coco(manifest, description), indent=1))
