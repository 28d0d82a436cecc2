"""The simulated backend: deterministic smooth images with a mask and a box, after a sleep.

It stands in for a GPU in pipeline benchmarks (wall time against pure device time) and lets
fault tests kill a worker at a chosen job. Images depend only on the job's seed.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ... import __version__
from ...contracts.sample import Sample
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
        yy, xx = np.mgrid[0:size, 0:size] / size
        a, b, c = rng.uniform(2, 6, 3)
        image = 0.5 + 0.25 * np.sin(a * xx + c) * np.cos(b * yy) + 0.02 * rng.standard_normal((size, size))
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.15)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        image[mask] += 0.2
        box = {"label": "Nodule", "x0": float(cx - r), "y0": float(cy - r), "x1": float(cx + r), "y1": float(cy + r)}
        if self.options.blank_fraction and np.random.default_rng((int(job["seed"]), 0xB1A)).random() < self.options.blank_fraction:
            image = np.full((size, size), 0.5)  # a failed render: flat grey, labels intact
        return Sample(job["job_id"], np.clip(image, 0, 1).astype(np.float32), {"Nodule": mask}, [box], {"simulated": True})
