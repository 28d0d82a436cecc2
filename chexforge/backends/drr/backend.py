"""The DRR backend: jobs → radiographs with exact masks and boxes.

Per job: draw the exposure and habitus from the job's seed, project the anatomy labels (lungs,
heart) to get their masks and the cardiothoracic ratio, insert the requested findings into a
copy of the CT, project it, and run the detector and display chain.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from ... import __version__
from ..base import Sample
from . import imaging
from .ct import HEART, LUNG_LEFT, LUNG_RIGHT, load_phantom
from .findings import CTR_TARGET, Inserter, Insertion, PlacementError
from .geometry import Geometry, sample_geometry
from .options import DRROptions
from .project import Slabs, diffdrr_trilinear, joseph, voxel_rays

ANATOMY_CHANNELS = ("lung_left", "lung_right", "heart")
MASK_MM = 0.5  # a ray crossing a structure for at least this path length is inside its mask


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class DRRBackend:
    name = "drr"

    def __init__(self, options: DRROptions, size: int = 256, **_: Any):
        self.options = options
        self.device = pick_device(options.device)
        self.level = 1 if size <= 384 else 0
        self.phantom = load_phantom(options.ct, level=self.level)
        self.inserter = Inserter(self.phantom)
        ph = self.phantom
        self.mu = Slabs.from_xyz(ph.mu, axis=1)  # PA/AP beams run along y
        labels = ph.labels.numpy()
        channels = [np.isin(labels, ph.ids(names)).astype(np.float32) for names in (LUNG_LEFT, LUNG_RIGHT, HEART)]
        self.anatomy = Slabs.from_xyz(torch.from_numpy(np.stack(channels)), axis=1)
        self.mu.data = self.mu.data.to(self.device)
        self.anatomy.data = self.anatomy.data.to(self.device)
        self.vox_from_patient = torch.from_numpy(np.linalg.inv(ph.affine))

    def identity(self) -> dict[str, Any]:
        o = self.options
        return {
            "backend": "drr",
            "backend_version": __version__,
            "model": f"ct:{self.phantom.name}",
            "model_hash": self.phantom.digest,
            "sampler": {"projector": o.projector, "dose": o.dose, "scatter": o.scatter, "blur_mm": o.blur_mm,
                        "processing": o.processing, "variation": o.variation, "level": self.level},
        }

    def generate(self, jobs: list[dict[str, Any]]) -> list[Sample]:
        out = []
        for job in jobs:
            try:
                out.append(self.render(job))
            except PlacementError as e:
                out.append(Sample(job["job_id"], np.zeros((0, 0), np.float32), error=str(e)))
        return out

    # ---- one job ---------------------------------------------------------------------------

    def render(self, job: dict[str, Any], noise_seed: int | None = None) -> Sample:
        """One radiograph. `noise_seed` (default: the job's seed) draws another quantum-noise
        realisation of the very same exposure, e.g. to measure noise."""
        t0 = time.perf_counter()
        rng = np.random.default_rng(int(job["seed"]))
        size = int(job["size"])
        geom = sample_geometry(job["view"], size, job, self.phantom, rng, self.options.variation)
        src, tgt, lengths, vox_from_world = self._rays(geom)

        paths = (self._project(self.anatomy, src, tgt, lengths).view(3, size, size) > MASK_MM).cpu().numpy()
        anatomy = [torch.from_numpy(ndi.binary_fill_holes(p)).to(self.device) for p in paths]
        masks = {"lung_left": anatomy[0], "lung_right": anatomy[1], "heart": anatomy[2]}
        insertions = self._findings(job, rng, masks)
        volume = self.mu
        if insertions:
            volume = self.mu.clone()
            for ins in insertions:
                ins.apply(volume.xyz())
        integral = self._project(volume, src, tgt, lengths)[0].view(size, size)

        lesion_masks: dict[str, torch.Tensor] = {}
        boxes: list[dict] = []
        meta: dict[str, Any] = {"geometry": geom.as_meta(), "findings": []}
        for ins in insertions:
            m = self._insertion_mask(ins, src, tgt, lengths, size)
            if ins.finding == "Cardiomegaly":
                masks["heart"] = masks["heart"] | m
            name = ins.finding
            lesion_masks[name] = lesion_masks[name] | m if name in lesion_masks else m
            box = _box(m.cpu().numpy())
            if box is not None:
                boxes.append({"label": name, **box})
            meta["findings"].append({"finding": name, "side": ins.side, **ins.meta})
        meta["ctr"] = round(cardiothoracic_ratio(masks), 3)

        gen = torch.Generator().manual_seed(int(job["seed"] if noise_seed is None else noise_seed) & 0x7FFF_FFFF_FFFF_FFFF)
        log_signal = imaging.expose(integral, geom.pixel_mm, self.options.dose, self.options.scatter,
                                    self.options.blur_mm, gen)
        body = integral > 0.5
        image = imaging.display(log_signal, body, geom.pixel_mm, self.options.processing)

        wanted = list(job.get("anatomy") or [])
        all_masks = {**masks, "lungs": masks["lung_left"] | masks["lung_right"]}
        out_masks = {k: all_masks[k].cpu().numpy() for k in wanted if k in all_masks}
        out_masks.update({k: v.cpu().numpy() for k, v in lesion_masks.items()})
        meta["seconds"] = round(time.perf_counter() - t0, 4)
        return Sample(job["job_id"], image.float().cpu().numpy(), out_masks, boxes, meta)

    def _rays(self, geom: Geometry):
        patient_from_world = torch.from_numpy(np.linalg.inv(geom.patient_matrix()))
        vox_from_world = self.vox_from_patient @ patient_from_world
        src, tgt = geom.rays(self.device)
        src_v, tgt_v, lengths = voxel_rays(vox_from_world.to(self.device), src, tgt)
        return src_v, tgt_v, lengths, vox_from_world

    def _project(self, slabs: Slabs, src_v, tgt_v, lengths) -> torch.Tensor:
        if self.options.projector == "diffdrr":
            return torch.cat([diffdrr_trilinear(slabs.xyz(c), src_v, tgt_v, lengths) for c in range(slabs.data.shape[1])])
        return joseph(slabs, src_v, tgt_v, lengths)

    def _insertion_mask(self, ins: Insertion, src_v, tgt_v, lengths, size: int) -> torch.Tensor:
        """Project the finding's occupancy alone (in its own small box) → its exact mask."""
        offset = torch.tensor(ins.origin, dtype=src_v.dtype, device=src_v.device)
        occ = (ins.occupancy >= 0.5).float().to(self.device)
        slabs = Slabs.from_xyz(occ, axis=1)
        path = joseph(slabs, src_v - offset, tgt_v - offset, lengths)[0]
        mask = ndi.binary_fill_holes((path.view(size, size) > MASK_MM).cpu().numpy())
        return torch.from_numpy(mask).to(self.device)

    # ---- findings --------------------------------------------------------------------------

    def _findings(self, job: dict[str, Any], rng: np.random.Generator, masks: dict[str, torch.Tensor]) -> list[Insertion]:
        """Insertions in a fixed order (heart, fluid, then lesions placed clear of both)."""
        out: list[Insertion] = []
        if job.get("Cardiomegaly"):
            lo, hi = CTR_TARGET[job.get("Cardiomegaly.severity") or "moderate"]
            target = float(rng.uniform(lo, hi))
            now = cardiothoracic_ratio(masks)
            ins = self.inserter.enlarged_heart(max(1.0, target / max(now, 1e-3)))
            ins.meta["ctr_target"] = round(target, 3)
            out.append(ins)
        if job.get("Effusion"):
            lat = job.get("Effusion.laterality") or ("left" if rng.random() < 0.5 else "right")
            for side in (("left", "right") if lat == "bilateral" else (lat,)):
                out.append(self.inserter.effusion(side, job.get("Effusion.severity"), rng))
        occupied = None
        for finding in ("Mass", "Nodule"):
            if job.get(finding):
                if occupied is None:
                    occupied = np.zeros(self.phantom.shape, dtype=bool)
                    for ins in out:
                        occupied[ins.box] |= ins.occupancy.numpy() >= 0.5
                side = job.get(f"{finding}.laterality") or ("left" if rng.random() < 0.5 else "right")
                ins = self.inserter.lesion(finding, side, job.get(f"{finding}.severity"), rng, occupied)
                occupied[ins.box] |= ins.occupancy.numpy() >= 0.5
                out.append(ins)
        return out


def cardiothoracic_ratio(masks: dict[str, torch.Tensor]) -> float:
    """Widest horizontal extent of the heart over the widest extent of the two lungs (rows)."""
    heart = masks["heart"].cpu().numpy()
    lungs = (masks["lung_left"] | masks["lung_right"]).cpu().numpy()
    return _row_span(heart) / max(_row_span(lungs), 1)


def _row_span(mask: np.ndarray) -> int:
    rows = np.nonzero(mask.any(1))[0]
    if len(rows) == 0:
        return 0
    cols = np.arange(mask.shape[1])
    sub = mask[rows]
    first = np.where(sub, cols, mask.shape[1]).min(1)
    last = np.where(sub, cols, -1).max(1)
    return int((last - first + 1).max())


def _box(mask: np.ndarray) -> dict | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    return {"x0": float(xs.min() / w), "y0": float(ys.min() / h), "x1": float((xs.max() + 1) / w),
            "y1": float((ys.max() + 1) / h)}
