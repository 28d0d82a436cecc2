"""The DRR backend: jobs → radiographs with exact masks and boxes.

Per job: take the job's scene (its patient at the detail level of its size, scene.py), draw the
exposure and habitus from the job's seed, project the anatomy labels (lungs, heart) to get their
masks and the cardiothoracic ratio, insert the requested findings into a copy of the CT, project
it, and run the detector and display chain. The scene is passed to every step; the backend holds
only run-wide settings and the scene cache, so `identity()` is the same for every job and what
varies per job (CT, detail level) is in the Sample's meta.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from ... import __version__
from ...contracts.sample import Projection, Sample
from ...devices import torch_device
from . import imaging
from .ct import source_digest
from .findings import Insertion, PlacementError, rays_hitting
from .findings_place import place_findings
from .geometry import Geometry, canonical_geometry, sample_geometry
from .library import Library
from .options import DRROptions
from .project import MASK_MM, Slabs, joseph, project
from .realism import row_span
from .scene import ANATOMY, Scene, Scenes

Rays = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # Scene.rays: sources, targets, lengths


class DRRBackend:
    name = "drr"

    def __init__(self, options: DRROptions, **_: Any):
        # Extra arguments (the runtime's `size`) are ignored: each job states its own size.
        self.options = options
        self.device = torch_device(options.device)
        self.library = Library(options.ct_library) if options.ct_library else None
        if self.library:
            self.library.pick(0)  # a library without a usable chest: one error now, not one per job
        # What identifies the CT(s) of the whole run; a job's detail level is in its meta.
        self.model_hash = self.library.identity if self.library else source_digest(options.ct)
        self.scenes = Scenes(options.ct_cache, options.polychromatic, self.device)

    def scene_for(self, job: dict[str, Any]) -> Scene:
        """The job's patient (drawn from its seed when there is a library) at the detail level of
        its size, laid out for its view."""
        source = str(self.library.pick(int(job["seed"]))) if self.library else self.options.ct
        return self.scenes.get(source, int(job["size"]), job["view"])

    def identity(self) -> dict[str, Any]:
        o = self.options
        return {
            "backend": "drr",
            "backend_version": __version__,
            "model": f"ct-library:{self.library.folder.name}" if self.library else f"ct:{o.ct}",
            "model_hash": self.model_hash,
            "sampler": {"projector": o.projector, "dose": o.dose, "scatter": o.scatter, "blur_mm": o.blur_mm,
                        "polychromatic": o.polychromatic, "spectrum_kvp": o.spectrum_kvp,
                        "processing": o.processing, "variation": o.variation},
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

    def render(self, job: dict[str, Any], noise_seed: int | None = None, *, scene: Scene | None = None,
               device_kinds: Sequence[str] | None = None) -> Sample:
        """One radiograph; raises PlacementError when a finding cannot be placed.

        `noise_seed` (default: the job's seed) draws another quantum-noise realisation of the very
        same exposure, e.g. to measure noise. `scene` (default: `scene_for(job)`) renders the job
        on another prepared patient. `device_kinds` (e.g. ("ett", "cvc")) names the support
        devices instead of drawing them (tests and the contact sheet choose them this way).
        """
        t0 = time.perf_counter()
        scene = self.scene_for(job) if scene is None else scene
        rng = np.random.default_rng(int(job["seed"]))
        size = int(job["size"])
        geom = sample_geometry(job["view"], size, job, scene.phantom, rng, self.options.variation)
        rays = scene.rays(geom)
        projected = self._project(scene.anatomy, rays).view(-1, size, size)
        masks = self._anatomy_masks(projected)
        insertions = self._findings(scene, job, rng, masks, device_kinds)
        integral = self._project(_with_findings(scene.mu, insertions), rays)[0].view(size, size)
        lesions, boxes, facts = self._finding_masks(scene, insertions, rays, size, masks)
        meta: dict[str, Any] = {"geometry": geom.as_meta(), "findings": facts, "ct": self._ct_name(scene.source),
                                "level": scene.level,
                                "ctr": round(cardiothoracic_ratio(masks), 3) if scene.axis == 1 else None}  # frontal only
        image = self._expose(integral, projected, geom, int(job["seed"] if noise_seed is None else noise_seed))
        meta["seconds"] = round(time.perf_counter() - t0, 4)
        o = self.options
        projection = Projection(geom.pixel_mm, geom.sid, geom.sid - geom.odd, geom.magnification,
                                float(o.spectrum_kvp) if o.polychromatic else None)
        return Sample(job["job_id"], image.float().cpu().numpy(), _wanted_masks(job, masks, lesions), boxes, meta,
                      projection=projection)

    def _ct_name(self, source: str) -> str:
        return self.library.name_of(source) if self.library else source

    def _project(self, slabs: Slabs, rays: Rays) -> torch.Tensor:
        return project(slabs, *rays, projector=self.options.projector)

    def _anatomy_masks(self, projected: torch.Tensor) -> dict[str, torch.Tensor]:
        """Lungs and heart from the projected anatomy channels: every pixel whose ray crosses
        the structure, holes filled."""
        paths = (projected[:len(ANATOMY)] > MASK_MM).cpu().numpy()
        return {name: torch.from_numpy(ndi.binary_fill_holes(p)).to(self.device) for name, p in zip(ANATOMY, paths)}

    def _expose(self, integral: torch.Tensor, projected: torch.Tensor, geom: Geometry, noise_seed: int) -> torch.Tensor:
        """The detector (quantum noise drawn from `noise_seed`) and the display chain."""
        gen = torch.Generator().manual_seed(noise_seed & 0x7FFF_FFFF_FFFF_FFFF)
        o = self.options
        if o.polychromatic:
            bone = projected[len(ANATOMY)]  # the channel after the anatomy: bone basis density (scene.py)
            log_signal = imaging.expose_poly(integral, bone, geom.pixel_mm, o.dose, o.scatter, o.blur_mm, gen, o.spectrum_kvp)
        else:
            log_signal = imaging.expose(integral, geom.pixel_mm, o.dose, o.scatter, o.blur_mm, gen)
        return imaging.display(log_signal, integral > 0.5, geom.pixel_mm, o.processing)

    # ---- findings --------------------------------------------------------------------------

    def _findings(self, scene: Scene, job: dict[str, Any], rng: np.random.Generator, masks: dict[str, torch.Tensor],
                  device_kinds: Sequence[str] | None) -> list[Insertion]:
        """The job's findings as 3-D insertions (findings_place.py: order, room, overlaps)."""
        ctr = None
        if job.get("Cardiomegaly"):  # a ratio of frontal widths: laterals use the patient's frontal one
            ctr = cardiothoracic_ratio(masks) if scene.axis == 1 else self._frontal_ctr(scene, int(job["size"]))
        return place_findings(scene.inserter, job, rng, ctr, device_kinds)

    def _frontal_ctr(self, scene: Scene, size: int) -> float:
        """The scene's patient's cardiothoracic ratio on a canonical PA film of `size` pixels."""
        if size not in scene.frontal_ctr:
            pa = self.scenes.get(scene.source, size, "PA")
            geom = canonical_geometry("PA", size, pa.phantom)
            projected = self._project(pa.anatomy, pa.rays(geom)).view(-1, size, size)
            scene.frontal_ctr[size] = cardiothoracic_ratio(self._anatomy_masks(projected))
        return scene.frontal_ctr[size]

    def _finding_masks(self, scene: Scene, insertions: list[Insertion], rays: Rays, size: int,
                       masks: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[dict], list[dict]]:
        """Per finding its exact mask (the union of its insertions'), its boxes, and each
        insertion's facts for meta. An enlarged heart's mask also joins the heart's, on which the
        cardiothoracic ratio is then measured."""
        lesions: dict[str, torch.Tensor] = {}
        boxes: list[dict] = []
        facts: list[dict] = []
        for ins in insertions:
            m = _insertion_mask(ins, rays, size, scene.axis)
            if ins.finding == "Cardiomegaly":
                masks["heart"] = masks["heart"] | m
            name = ins.finding
            lesions[name] = lesions[name] | m if name in lesions else m
            box = _box(m.cpu().numpy())
            if box is not None:
                boxes.append({"label": name, **box})
            facts.append({"finding": name, "side": ins.side, **ins.meta})
        return lesions, boxes, facts


def _with_findings(mu: Slabs, insertions: list[Insertion]) -> Slabs:
    """The attenuation volume with the job's findings written in: a copy, so the scene stays
    the normal patient for the next job."""
    if not insertions:
        return mu
    volume = mu.clone()
    for ins in insertions:
        ins.apply(volume.xyz())
    return volume


def _insertion_mask(ins: Insertion, rays: Rays, size: int, axis: int) -> torch.Tensor:
    """Project the finding's label alone (in its own small box) → its exact mask; rays that
    also cross its `beyond` volume (a pneumothorax's collapsed lung) are left out."""
    src_v, tgt_v, lengths = rays
    offset = torch.tensor(ins.origin, dtype=src_v.dtype, device=src_v.device)
    volume = ins.mask_volume().to(src_v.device)
    slabs = Slabs.from_xyz(volume, axis=axis)
    hit = rays_hitting(src_v - offset, tgt_v - offset, volume.shape[1:])  # only rays that cross its box
    path = torch.zeros(volume.shape[0], tgt_v.shape[0], device=tgt_v.device)
    path[:, hit] = joseph(slabs, src_v - offset, tgt_v[hit] - offset, lengths[hit])
    path = path.view(-1, size, size) > MASK_MM
    mask = (path[0] & ~path[1] if len(path) > 1 else path[0]).cpu().numpy()
    return torch.from_numpy(ndi.binary_fill_holes(mask) if ins.fill else mask).to(src_v.device)


def _wanted_masks(job: dict[str, Any], masks: dict[str, torch.Tensor], lesions: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The anatomy masks the job asked for (`anatomy`), and every finding's."""
    anatomy = {**masks, "lungs": masks["lung_left"] | masks["lung_right"]}
    out = {k: anatomy[k].cpu().numpy() for k in job.get("anatomy") or [] if k in anatomy}
    out.update({k: v.cpu().numpy() for k, v in lesions.items()})
    return out


def cardiothoracic_ratio(masks: dict[str, torch.Tensor]) -> float:
    """Widest horizontal extent of the heart over the widest extent of the two lungs (rows)."""
    heart = masks["heart"].cpu().numpy()
    lungs = (masks["lung_left"] | masks["lung_right"]).cpu().numpy()
    return row_span(heart) / max(row_span(lungs), 1)


def _box(mask: np.ndarray) -> dict | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    return {"x0": float(xs.min() / w), "y0": float(ys.min() / h), "x1": float((xs.max() + 1) / w),
            "y1": float((ys.max() + 1) / h)}
