"""The hybrid backend: physics-anchored diffusion (issue 15, item 3).

Per batch of jobs:
1. the DRR backend renders each job as it would alone (`DRRBackend.generate`): the virtual
   patient, its findings placed in 3-D, the image, the exact masks and boxes, the projection;
2. the diffusion backend's pipeline draws the radiograph through its control branch, conditioned
   on the job's prompt and on a control image of the DRR's finding masks and boxes (drawn as
   training draws them, `models/control_image.py`), and, when 0 < strength < 1, starting from the
   DRR image noised to the strength's timestep (img2img).
The Sample carries the DRR's masks, boxes and Projection unchanged, so the manifest's labels are
the physics' exact ones, and QC's mask rules measure the generated pixels against them.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ... import __version__
from ...contracts.sample import Sample
from ...contracts.vocabulary import FINDING_NAMES
from ...errors import UserError
from ..diffusion.backend import DiffusionBackend
from ..drr.backend import DRRBackend
from .options import HybridOptions, model_problem


class HybridBackend:
    name = "hybrid"

    def __init__(self, options: HybridOptions, *, model: str | Path | None = None, **_: Any):
        if model is None:
            raise UserError("the hybrid backend needs `model: PATH` (a chexforge model folder with a control branch)")
        problem = model_problem(Path(model))  # also checked at validate; a --jobs run comes here directly
        if problem:
            raise UserError(problem, model)
        self.options = options
        o = options
        self.drr = DRRBackend(o.drr.model_copy(update={"device": o.device}))
        self.diffusion = DiffusionBackend(
            o.diffusion.model_copy(update={"device": o.device, "control_strength": o.control_scale}), model=model)
        self.pipe = self.diffusion.pipe

    def identity(self) -> dict[str, Any]:
        d, f = self.drr.identity(), self.diffusion.identity()
        both = hashlib.sha256(f"{d['model_hash']}:{f['model_hash']}".encode()).hexdigest()[:16]
        return {"backend": "hybrid", "backend_version": __version__, "model": f["model"], "model_hash": both,
                "sampler": {"strength": self.options.strength, "control_scale": self.options.control_scale,
                            "drr": {"model": d["model"], "model_hash": d["model_hash"], **d["sampler"]},
                            "diffusion": {"model_hash": f["model_hash"], **f["sampler"]}}}

    def generate(self, jobs: list[dict[str, Any]]) -> list[Sample]:
        physics = self.drr.generate(jobs)
        done: dict[int, Sample] = {i: s for i, s in enumerate(physics) if s.error is not None}  # a finding that did not fit
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            if i not in done:
                groups.setdefault(int(job["size"]), []).append(i)
        for size, where in groups.items():
            done.update(zip(where, self._textured([jobs[i] for i in where], [physics[i] for i in where], size)))
        return [done[i] for i in range(len(jobs))]

    def _textured(self, jobs: list[dict[str, Any]], physics: list[Sample], size: int) -> list[Sample]:
        """Jobs of one size: the diffusion model's image on the DRR's labels."""
        from ...models import control_image
        from ...models import vae as vae_ops

        o, d = self.options, self.diffusion.options
        t0 = time.perf_counter()
        prompts = self.pipe.prompts_for(jobs)
        seeds = [diffusion_seed(int(j["seed"])) for j in jobs]
        if o.strength == 0:  # the physics alone: no sampling, the DRR's pixels bit for bit
            images = [s.image for s in physics]
        else:
            # Training shows the control branch finding masks and boxes (models/data.py), never
            # anatomy: the lungs and heart stay in the Sample for export but not in the control.
            control = control_image.to_tensor([
                control_image.draw(size, s.boxes, {k: v for k, v in s.masks.items() if k in FINDING_NAMES})
                for s in physics])
            init = None
            if o.strength < 1:  # grayscale [0, 1] → the VAE's RGB [-1, 1], as training encodes images
                init = vae_ops.to_rgb(torch.from_numpy(np.stack([s.image for s in physics])))
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            images = self.pipe.sample(prompts, generators, size, control=control, steps=d.steps, sampler=d.sampler,
                                      guidance_text=d.guidance_text, guidance_control=d.guidance_control,
                                      control_strength=o.control_scale, vae_slice=d.vae_slice,
                                      autocast=self.diffusion.autocast, init=init, init_strength=o.strength)
        seconds = round((time.perf_counter() - t0) / max(1, len(jobs)), 4)
        out = []
        for job, s, image, prompt, seed in zip(jobs, physics, images, prompts, seeds):
            # The DRR's facts stay at the top, where readers of meta look for them whatever the backend
            # (evaluate: `findings`; MONAI export: `geometry`); the diffusion's are beside them.
            meta = {**s.meta, "diffusion": {"prompt_used": prompt, "seed": seed, "seconds": seconds},
                    "strength": o.strength, "control_scale": o.control_scale,
                    "control": sorted({k for k in s.masks if k in FINDING_NAMES} | {b["label"] for b in s.boxes})}
            out.append(Sample(job["job_id"], np.ascontiguousarray(image, dtype=np.float32), dict(s.masks),
                              [dict(b) for b in s.boxes], meta, projection=s.projection))
        return out


def diffusion_seed(seed: int) -> int:
    """The seed of a job's diffusion noise: derived from the job's seed, not the seed itself, because
    the DRR backend already draws its quantum noise from a torch generator seeded with it; reusing
    it would make the latent noise a copy of the first pixels' detector noise."""
    return int(np.random.SeedSequence([seed & 0xFFFF_FFFF_FFFF_FFFF, 0x48594252]).generate_state(1, np.uint64)[0]
               & np.uint64(0x7FFF_FFFF_FFFF_FFFF))
