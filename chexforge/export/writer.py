"""Write one Sample's files and return its manifest row.

Files are written atomically (temp + rename), each hashed as it is written and its size
recorded. The row is only
committed to the manifest after every file of the job is in place, so a file counted as done
is always complete.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import numpy as np

from ..contracts.sample import Sample
from ..store import Store
from . import png
from .dicom import dx_bytes
from .seg import seg_bytes


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def paths(job: dict[str, Any]) -> dict[str, str]:
    cohort, job_id = slug(str(job["cohort"])), str(job["job_id"])
    return {"png": f"images/{cohort}/{job_id}.png", "dicom": f"dicom/{cohort}/{job_id}.dcm",
            "seg": f"dicom/{cohort}/{job_id}_seg.dcm", "masks": f"masks/{cohort}/{job_id}"}


def export_sample(store: Store, job: dict[str, Any], sample: Sample, formats: list[str], write_masks: bool,
                  identity: dict[str, Any], seconds_generate: float, attempts: int = 1, series: int = 1) -> dict[str, Any]:
    """`series`: the job's view's place in its study (1-based; 1 outside study cohorts), the DICOM
    SeriesNumber."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {**job, "backend": identity.get("backend"), "backend_version": identity.get("backend_version"),
                           "model": identity.get("model"), "model_hash": identity.get("model_hash"),
                           "sampler": json.dumps(identity.get("sampler", {}), sort_keys=True),
                           "attempts": attempts, "seconds_generate": seconds_generate}
    if sample.error is not None:
        return {**row, "status": "failed", "error": sample.error, "masks": [], "realised_boxes": [],
                "meta": json.dumps(sample.meta, sort_keys=True), "seconds_export": 0.0}
    where = paths(job)
    if "png" in formats:
        data = png.png16_bytes(sample.image)
        row["image_png"], row["bytes_png"] = where["png"], len(data)
        row["sha256_png"] = store.write_bytes(where["png"], data)
    if "dicom" in formats:
        dx = dx_bytes(sample.image, job, sample.projection, identity, series)
        row["image_dicom"], row["bytes_dicom"] = where["dicom"], len(dx)
        row["sha256_dicom"] = store.write_bytes(where["dicom"], dx)
        if write_masks and sample.masks:  # the same masks as the PNGs below, as a SEG of the DX image
            data = seg_bytes(dx, sample.masks, {**job, "backend": identity.get("backend")}, series)
            row["seg_dicom"], row["bytes_seg"] = where["seg"], len(data)
            row["sha256_seg"] = store.write_bytes(where["seg"], data)
    masks, sizes = [], []
    if write_masks:
        for name, mask in sorted(sample.masks.items()):
            rel = f"{where['masks']}_{slug(name)}.png"
            data = png.mask_bytes(np.asarray(mask))
            masks.append({"name": name, "path": rel, "sha256": store.write_bytes(rel, data)})
            sizes.append(len(data))
    row.update(status="ok", error=None, masks=masks, bytes_masks=sizes, realised_boxes=sample.boxes,
               meta=json.dumps(sample.meta, sort_keys=True, default=_jsonable),
               seconds_export=time.perf_counter() - t0)
    return row


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)
