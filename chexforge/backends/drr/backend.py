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
from .body import Body, make_body
from .ct import source_digest
from .findings import Insertion, PlacementError, rays_hitting
from .findings_place import place_findings
from .geometry import Geometry, canonical_geometry, sample_geometry
from .library import LRU, Library
from .options import DRROptions
from .patient import Patient, draw_patient
from .project import MASK_MM, Rays, Slabs, project
from .realism import row_span
from .scene import ANATOMY, Scene, Scenes


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
        self.scenes = Scenes(options.ct_cache, options.polychromatic, self.device, vessels=options.virtual_patients)
        self.bodies = LRU(4)  # (patient, CT, level, axis) → Body (a copy of the attenuation each): a study shares its patient

    def patient_for(self, job: dict[str, Any]) -> Patient | None:
        """The job's virtual patient, drawn from its `patient_seed` (shared by a study's views;
        the job's own seed where there is none), its sex and age; None with virtual_patients off."""
        if not self.options.virtual_patients:
            return None
        return draw_patient(job.get("sex"), job.get("age"), patient_seed(job))

    def body_for(self, job: dict[str, Any], scene: Scene) -> Body | None:
        """The job's patient laid out on its scene (deformation, tissue, size), cached."""
        patient = self.patient_for(job)
        if patient is None:
            return None
        key = (patient, scene.source, scene.level, scene.axis)
        return self.bodies.get_or_make(key, lambda: make_body(patient, scene, self.options.vessels))

    def scene_for(self, job: dict[str, Any]) -> Scene:
        """The job's CT (drawn from its patient_seed when there is a library: a study is one CT) at the detail level of
        its size, laid out for its view."""
        source = str(self.library.pick(patient_seed(job))) if self.library else self.options.ct  # a study: one CT
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
                        "processing": o.processing, "variation": o.variation,
                        "virtual_patients": o.virtual_patients, "vessels": o.vessels},
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
        body = self.body_for(job, scene)
        rng = np.random.default_rng(int(job["seed"]))  # this exposure: positioning, breath, noise
        size = int(job["size"])
        geom = sample_geometry(job["view"], size, job, scene.phantom, rng, self.options.variation,
                               body=body.framing if body else None)
        rays = scene.rays(geom, body.warp if body else None)
        tissue = body.tissue if body is not None else scene.tissue
        # The anatomy channels only make masks (path > MASK_MM): every second plane is plenty.
        projected = self._project([tissue, Slabs(scene.anatomy.data, scene.axis, tissue.span, step=2)], rays)
        bone = projected[1] if self.options.polychromatic else None
        masks = self._anatomy_masks(projected[-len(ANATOMY):].view(-1, size, size))
        # The patient's findings are the study's: every view of it shows the same ones.
        find_rng = np.random.default_rng([patient_seed(job), 7])
        insertions = self._findings(scene, job, find_rng, masks, device_kinds, body)
        integral = projected[0] + self._findings_delta(tissue, insertions, rays, body)
        if body is not None and bone is not None:  # bone mineral density: the bone path scales, and mu with it
            integral, bone = integral + (body.patient.bone_density - 1) * imaging.BONE_K * bone, body.patient.bone_density * bone
        integral = integral.view(size, size)
        lesions, boxes, facts = self._finding_masks(scene, insertions, rays, size, masks, body)
        meta: dict[str, Any] = {"geometry": geom.as_meta(), "findings": facts, "ct": self._ct_name(scene.source),
                                "level": scene.level,
                                "ctr": round(cardiothoracic_ratio(masks), 3) if scene.axis == 1 else None}  # frontal only
        if body is not None:
            meta["patient"] = {"seed": patient_seed(job), **body.patient.as_meta()}
        image = self._expose(integral, None if bone is None else bone.view(size, size), geom,
                             int(job["seed"] if noise_seed is None else noise_seed))
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

    def _findings_delta(self, tissue: Slabs, insertions: list[Insertion], rays: Rays, body: Body | None) -> torch.Tensor | float:
        """What the findings change in the line integrals: the insertions written into a copy of
        the smallest box holding them all, minus the box as it was, projected on its own (the
        scene's volume is shared by every job and never written)."""
        if not insertions:
            return 0.0
        origin = tuple(int(v) for v in np.min([ins.origin for ins in insertions], axis=0))
        hi = np.max([np.add(ins.origin, ins.occupancy.shape) for ins in insertions], axis=0)
        box = tuple(slice(a, int(b)) for a, b in zip(origin, hi))
        before = tissue.xyz(0)[box]
        after = before.clone()
        for ins in insertions:
            ins.apply(after, offset=origin)
        return _project_box((after - before)[None], origin, rays, tissue.axis, body.reach if body else 0.0,
                            self.options.projector)[0]

    def rays_for(self, job: dict[str, Any], scene: Scene, geom: Geometry) -> Rays:
        """The rays of `geom` through the job's patient on `scene` (its deformation included),
        e.g. to project other structures exactly as the job's image was (realism.field_masks)."""
        body = self.body_for(job, scene)
        return scene.rays(geom, body.warp if body else None)

    def _anatomy_masks(self, projected: torch.Tensor) -> dict[str, torch.Tensor]:
        """Lungs and heart from the projected anatomy channels: every pixel whose ray crosses
        the structure, holes filled."""
        paths = (projected[:len(ANATOMY)] > MASK_MM).cpu().numpy()
        return {name: torch.from_numpy(ndi.binary_fill_holes(p)).to(self.device) for name, p in zip(ANATOMY, paths)}

    def _expose(self, integral: torch.Tensor, bone: torch.Tensor | None, geom: Geometry, noise_seed: int) -> torch.Tensor:
        """The detector (quantum noise drawn from `noise_seed`) and the display chain. `bone`: the
        bone basis path (the polychromatic chain's second material)."""
        gen = torch.Generator().manual_seed(noise_seed & 0x7FFF_FFFF_FFFF_FFFF)
        o = self.options
        if o.polychromatic:
            log_signal = imaging.expose_poly(integral, bone, geom.pixel_mm, o.dose, o.scatter, o.blur_mm, gen, o.spectrum_kvp)
        else:
            log_signal = imaging.expose(integral, geom.pixel_mm, o.dose, o.scatter, o.blur_mm, gen)
        return imaging.display(log_signal, integral > 0.5, geom.pixel_mm, o.processing)

    # ---- findings --------------------------------------------------------------------------

    def _findings(self, scene: Scene, job: dict[str, Any], rng: np.random.Generator, masks: dict[str, torch.Tensor],
                  device_kinds: Sequence[str] | None, body: Body | None) -> list[Insertion]:
        """The job's findings as 3-D insertions (findings_place.py: order, room, overlaps)."""
        ctr = None
        if job.get("Cardiomegaly"):
            # The heart is the patient's, the same in every view of a study: its enlargement aims
            # at the ratio measured on the patient's canonical PA film, not on this exposure.
            ctr = self._frontal_ctr(scene, job, body)
        return place_findings(scene.inserter, job, rng, ctr, device_kinds)

    def _frontal_ctr(self, scene: Scene, job: dict[str, Any], body: Body | None) -> float:
        """The patient's cardiothoracic ratio on a canonical PA film of the job's size, kept with
        the patient's PA body (or the CT's PA scene without virtual patients), so it lives as long
        as the patient is cached and never depends on which job measured it first."""
        size = int(job["size"])
        pa = self.scenes.get(scene.source, size, "PA")
        pa_body = self.body_for(job, pa)
        cache = pa_body.frontal_ctr if pa_body else pa.frontal_ctr
        if size not in cache:
            geom = canonical_geometry("PA", size, pa.phantom, body=pa_body.framing if pa_body else None)
            rays = pa.rays(geom, pa_body.warp if pa_body else None)
            projected = self._project(pa.anatomy, rays).view(-1, size, size)
            cache[size] = cardiothoracic_ratio(self._anatomy_masks(projected))
        return cache[size]

    def _finding_masks(self, scene: Scene, insertions: list[Insertion], rays: Rays, size: int,
                       masks: dict[str, torch.Tensor], body: Body | None) -> tuple[dict[str, torch.Tensor], list[dict], list[dict]]:
        """Per finding its exact mask (the union of its insertions'), its boxes, and each
        insertion's facts for meta. An enlarged heart's mask also joins the heart's, on which the
        cardiothoracic ratio is then measured."""
        lesions: dict[str, torch.Tensor] = {}
        boxes: list[dict] = []
        facts: list[dict] = []
        for ins in insertions:
            m = _insertion_mask(ins, rays, size, scene.axis, body.reach if body else 0.0)
            if ins.finding == "Cardiomegaly":
                masks["heart"] = masks["heart"] | m
            name = ins.finding
            lesions[name] = lesions[name] | m if name in lesions else m
            box = _box(m.cpu().numpy())
            if box is not None:
                boxes.append({"label": name, **box})
            facts.append({"finding": name, "side": ins.side, **ins.meta})
        return lesions, boxes, facts


def patient_seed(job: dict[str, Any]) -> int:
    """The seed of the job's patient: its study's `patient_seed`, else its own seed."""
    value = job.get("patient_seed")
    if value is None or (isinstance(value, float) and np.isnan(value)):
        value = job["seed"]
    return int(value)


def _project_box(volume: torch.Tensor, origin: tuple[int, int, int], rays: Rays, axis: int, reach: float,
                 projector: str = "joseph") -> torch.Tensor:
    """Line integrals (C, N) of a small (C, bx, by, bz) volume whose voxel 0 is the full volume's
    `origin`, through the patient's deformation, projected only for the rays that can cross its
    box (`reach`: how far the deformation may move it, voxels); 0 for the other rays."""
    offset = torch.tensor(origin, dtype=rays.src_v.dtype, device=rays.src_v.device)
    volume = volume.to(rays.src_v.device)
    hit = rays_hitting(rays.src_v - offset, rays.tgt_v - offset, volume.shape[1:], margin=reach)
    path = torch.zeros(volume.shape[0], rays.tgt_v.shape[0], device=rays.tgt_v.device)
    path[:, hit] = project(Slabs.from_xyz(volume, axis=axis), rays.src_v - offset, rays.tgt_v[hit] - offset,
                           rays.lengths[hit], rays.warp, projector, origin)
    return path


def _insertion_mask(ins: Insertion, rays: Rays, size: int, axis: int, reach: float = 0.0) -> torch.Tensor:
    """Project the finding's label alone (in its own small box) → its exact mask; rays that
    also cross its `beyond` volume (a pneumothorax's collapsed lung) are left out."""
    path = _project_box(ins.mask_volume(), ins.origin, rays, axis, reach)
    path = path.view(-1, size, size) > MASK_MM
    mask = (path[0] & ~path[1] if len(path) > 1 else path[0]).cpu().numpy()
    return torch.from_numpy(ndi.binary_fill_holes(mask) if ins.fill else mask).to(rays.tgt_v.device)


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
