"""The simulated backend: deterministic smooth images with the masks and boxes a job asks for,
after a sleep.

It stands in for a GPU in pipeline benchmarks (wall time against pure device time) and lets
fault tests kill a worker at a chosen job. It returns what its entry in contracts/backends.py
claims: a mask for every anatomy structure the job names (`anatomy`: two lungs and a heart,
drawn as ellipses; the lungs when its cohort names none) and, for every finding the job requests, a bright blob with its mask and a
box per blob (on the requested side: the patient's right is the image's left; two blobs when
bilateral; inside the job's explicit box when it has one). Images depend only on the job's seed
and row.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ... import __version__
from ...contracts.jobs import laterality_column
from ...contracts.sample import Sample
from ...contracts.vocabulary import FINDING_NAMES, NO_FINDING
from .options import SimulatedOptions


class SimulatedBackend:
    name = "simulated"

    def __init__(self, options: SimulatedOptions, **_: Any):
        # Extra arguments (the runtime's `size`) are ignored: each job states its own size.
        self.options = options

    def identity(self) -> dict[str, Any]:
        return {"backend": "simulated", "backend_version": __version__, "model": "simulated", "model_hash": "0" * 16,
                "sampler": self.options.model_dump()}

    def generate(self, jobs: list[dict[str, Any]]) -> list[Sample]:
        o = self.options
        if any(int(j.get("index", -1)) in o.crash_on for j in jobs) and os.environ.get("CHEXFORGE_WORKER"):
            os._exit(86)  # a hard crash, as a driver fault or an out-of-memory kill would be
        time.sleep(o.seconds_per_batch + o.seconds_per_image * len(jobs))
        out = []
        for job in jobs:
            if int(job.get("index", -1)) in o.fail_on:
                raise RuntimeError(f"simulated failure on job {job['job_id']}")
            out.append(self._sample(job))
        return out

    def _sample(self, job: dict[str, Any]) -> Sample:
        size = int(job["size"])
        rng = np.random.default_rng(int(job["seed"]))
        yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
        a, b, c = rng.uniform(2, 6, 3)
        image = 0.5 + 0.25 * np.sin(a * xx + c) * np.cos(b * yy) + 0.02 * rng.standard_normal((size, size))
        structures = _anatomy(rng, xx, yy)
        masks = {name: structures[name] for name in job.get("anatomy") or [] if name in structures}
        boxes = []
        for finding in requested(job):
            mask = np.zeros((size, size), bool)
            for box in _places(rng, job, finding):
                blob = _ellipse(xx, yy, box)
                if not blob.any():  # smaller than a pixel at this size: its centre pixel
                    blob[min(int((box[1] + box[3]) / 2 * size), size - 1), min(int((box[0] + box[2]) / 2 * size), size - 1)] = True
                mask |= blob
                boxes.append({"label": finding, **_box(blob)})
            image[mask] += 0.2
            masks[finding] = mask
        if self.options.blank_fraction and np.random.default_rng((int(job["seed"]), 0xB1A)).random() < self.options.blank_fraction:
            image = np.full((size, size), 0.5)  # a failed render: flat grey, labels intact
        return Sample(job["job_id"], np.clip(image, 0, 1).astype(np.float32), masks, boxes, {"simulated": True})


def requested(job: dict[str, Any]) -> list[str]:
    """The findings a job asks for, in the vocabulary's order."""
    return [f for f in FINDING_NAMES if f != NO_FINDING and int(job.get(f) or 0) == 1]


def _anatomy(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> dict[str, np.ndarray]:
    """Two lungs and a heart as ellipses (x0, y0, x1, y1), jittered by the seed. The patient's
    right lung is on the image's left (a PA view seen from the front)."""
    dx, dy = rng.uniform(-0.03, 0.03, 2)
    right = _ellipse(xx, yy, (0.12 + dx, 0.15 + dy, 0.45 + dx, 0.85 + dy))
    left = _ellipse(xx, yy, (0.55 + dx, 0.15 + dy, 0.88 + dx, 0.85 + dy))
    heart = _ellipse(xx, yy, (0.38 + dx, 0.50 + dy, 0.72 + dx, 0.82 + dy))
    return {"lung_right": right, "lung_left": left, "lungs": right | left, "heart": heart}


def _places(rng: np.random.Generator, job: dict[str, Any], finding: str) -> list[tuple[float, float, float, float]]:
    """The boxes (x0, y0, x1, y1, normalised) a finding's blobs fill: the job's explicit boxes of
    that finding, else one per side drawn from the seed."""
    given = [(float(b["x0"]), float(b["y0"]), float(b["x1"]), float(b["y1"]))
             for b in job.get("boxes") or [] if b.get("label") == finding]
    if given:
        return given
    side = job.get(laterality_column(finding))
    sides = {"right": [(0.15, 0.45)], "left": [(0.55, 0.85)], "bilateral": [(0.15, 0.45), (0.55, 0.85)]}.get(
        str(side), [(0.2, 0.8)])
    out = []
    for lo, hi in sides:
        r = rng.uniform(0.05, 0.12)
        cx, cy = rng.uniform(lo + r, hi - r) if hi - lo > 2 * r else (lo + hi) / 2, rng.uniform(0.25 + r, 0.8 - r)
        out.append((cx - r, cy - r, cx + r, cy + r))
    return out


def _ellipse(xx: np.ndarray, yy: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = box
    rx, ry = max((x1 - x0) / 2, 1e-9), max((y1 - y0) / 2, 1e-9)
    return ((xx - (x0 + x1) / 2) / rx) ** 2 + ((yy - (y0 + y1) / 2) / ry) ** 2 < 1


def _box(mask: np.ndarray) -> dict[str, float]:
    """The normalised bounding box of a mask's pixels (as the DRR backend reports boxes)."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return {"x0": float(xs.min() / w), "y0": float(ys.min() / h), "x1": float((xs.max() + 1) / w),
            "y1": float((ys.max() + 1) / h)}
