"""The DRR backend: jobs → radiographs with exact masks and boxes.

Per job: draw the exposure and habitus from the job's seed, project the anatomy labels (lungs,
heart) to get their masks and the cardiothoracic ratio, insert the requested findings into a
copy of the CT, project it, and run the detector and display chain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from ... import __version__
from ...contracts.sample import Projection, Sample
from ...devices import torch_device
from . import imaging
from .ct import HEART, LUNG_LEFT, LUNG_RIGHT, choose_level, ct_spacing, load_phantom
from .findings import Inserter, Insertion, PlacementError, rays_hitting
from .findings_place import place_findings
from .geometry import FIELD_MM, VIEWS, Geometry, canonical_geometry, sample_geometry
from .library import LRU, Library
from .options import DRROptions
from .project import Slabs, diffdrr_trilinear, joseph, voxel_rays
from .realism import row_span

ANATOMY_CHANNELS = ("lung_left", "lung_right", "heart")
MASK_MM = 0.5  # a ray crossing a structure for at least this path length is inside its mask


@dataclass
class Scene:
    """One patient ready to render along one beam axis."""

    phantom: Any
    inserter: Inserter
    mu: Slabs
    anatomy: Slabs
    vox_from_patient: torch.Tensor
    source: str
    frontal_ctr: float | None = None


class DRRBackend:
    name = "drr"

    def __init__(self, options: DRROptions, size: int = 256, **_: Any):
        self.options = options
        self.device = torch_device(options.device)
        self.size = size
        self.library = Library(options.ct_library) if options.ct_library else None
        self._scenes = LRU(3 * options.ct_cache)  # per CT: the phantom, and a scene per beam axis
        first = self.library.pick(0) if self.library else options.ct
        self._use(self._scene(str(first), "PA"))

    def _scene(self, source: str, view: str) -> Scene:
        """The prepared phantom of `source`, stored for the view's beam axis (LRU-cached)."""
        axis = VIEWS[view]["beam_axis"]
        # One phantom and one Inserter (its anatomy caches) per CT, shared by the views' scenes.
        phantom, inserter = self._scenes.get_or_make((source, None), lambda: self._load(source))
        return self._scenes.get_or_make((source, axis), lambda: self._build(phantom, inserter, axis, source))

    def _load(self, source: str):
        level = choose_level(min(ct_spacing(source)[:2]), FIELD_MM / self.size)
        phantom = load_phantom(source, level=level)
        return phantom, Inserter(phantom)

    def _build(self, ph, inserter: Inserter, axis: int, source: str) -> Scene:
        mu = Slabs.from_xyz(ph.mu, axis=axis)
        labels = ph.labels.numpy()
        channels = [np.isin(labels, ph.ids(names)).astype(np.float32) for names in (LUNG_LEFT, LUNG_RIGHT, HEART)]
        if self.options.polychromatic:  # + the bone basis density, projected with the anatomy (imaging.py)
            channels.append(imaging.bone_density(ph.mu).numpy())
        anatomy = Slabs.from_xyz(torch.from_numpy(np.stack(channels)), axis=axis)
        mu.data = mu.data.to(self.device)
        anatomy.data = anatomy.data.to(self.device)
        return Scene(ph, inserter, mu, anatomy, torch.from_numpy(np.linalg.inv(ph.affine)), source)

    def _use(self, scene: Scene) -> None:
        # The rest of the backend reads the current patient from these attributes.
        self.scene = scene
        self.phantom, self.inserter, self.mu, self.anatomy = scene.phantom, scene.inserter, scene.mu, scene.anatomy
        self.vox_from_patient = scene.vox_from_patient
        self.level = scene.phantom.level

    def _select(self, job: dict[str, Any]) -> None:
        """Switch to the job's patient (drawn from its seed when there is a library) and view."""
        source = str(self.library.pick(int(job["seed"]))) if self.library else self.options.ct
        self._use(self._scene(source, job["view"]))

    def identity(self) -> dict[str, Any]:
        o = self.options
        return {
            "backend": "drr",
            "backend_version": __version__,
            "model": f"ct-library:{self.library.folder.name}" if self.library else f"ct:{self.phantom.name}",
            "model_hash": self.library.digest if self.library else self.phantom.digest,
            "sampler": {"projector": o.projector, "dose": o.dose, "scatter": o.scatter, "blur_mm": o.blur_mm,
                        "polychromatic": o.polychromatic, "spectrum_kvp": o.spectrum_kvp,
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
        self._select(job)
        rng = np.random.default_rng(int(job["seed"]))
        size = int(job["size"])
        geom = sample_geometry(job["view"], size, job, self.phantom, rng, self.options.variation)
        src, tgt, lengths, vox_from_world = self._rays(geom)

        projected = self._project(self.anatomy, src, tgt, lengths).view(-1, size, size)
        paths = (projected[:3] > MASK_MM).cpu().numpy()
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
        meta: dict[str, Any] = {"geometry": geom.as_meta(), "findings": [],
                                "ct": self.phantom.name if not self.library else self.library.name_of(self.scene.source)}
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
        meta["ctr"] = round(cardiothoracic_ratio(masks), 3) if self.mu.axis == 1 else None  # frontal only

        gen = torch.Generator().manual_seed(int(job["seed"] if noise_seed is None else noise_seed) & 0x7FFF_FFFF_FFFF_FFFF)
        o = self.options
        if o.polychromatic:
            log_signal = imaging.expose_poly(integral, projected[3], geom.pixel_mm, o.dose, o.scatter, o.blur_mm,
                                             gen, o.spectrum_kvp)
        else:
            log_signal = imaging.expose(integral, geom.pixel_mm, o.dose, o.scatter, o.blur_mm, gen)
        body = integral > 0.5
        image = imaging.display(log_signal, body, geom.pixel_mm, self.options.processing)

        wanted = list(job.get("anatomy") or [])
        all_masks = {**masks, "lungs": masks["lung_left"] | masks["lung_right"]}
        out_masks = {k: all_masks[k].cpu().numpy() for k in wanted if k in all_masks}
        out_masks.update({k: v.cpu().numpy() for k, v in lesion_masks.items()})
        meta["seconds"] = round(time.perf_counter() - t0, 4)
        projection = Projection(geom.pixel_mm, geom.sid, geom.sid - geom.odd, geom.magnification,
                                float(o.spectrum_kvp) if o.polychromatic else None)
        return Sample(job["job_id"], image.float().cpu().numpy(), out_masks, boxes, meta, projection=projection)

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

    def _frontal_ctr(self, size: int) -> float:
        """The current patient's cardiothoracic ratio on a canonical PA film."""
        if self.scene.frontal_ctr is None:
            pa = self._scene(self.scene.source, "PA")
            geom = canonical_geometry("PA", size, pa.phantom)
            vox_from_world = pa.vox_from_patient @ torch.from_numpy(np.linalg.inv(geom.patient_matrix()))
            src, tgt = geom.rays(self.device)
            rays = voxel_rays(vox_from_world.to(self.device), src, tgt)
            paths = (joseph(pa.anatomy, *rays).view(-1, size, size)[:3] > MASK_MM).cpu()
            self.scene.frontal_ctr = cardiothoracic_ratio({"lung_left": paths[0], "lung_right": paths[1], "heart": paths[2]})
        return self.scene.frontal_ctr

    def _insertion_mask(self, ins: Insertion, src_v, tgt_v, lengths, size: int) -> torch.Tensor:
        """Project the finding's label alone (in its own small box) → its exact mask; rays that
        also cross its `beyond` volume (a pneumothorax's collapsed lung) are left out."""
        offset = torch.tensor(ins.origin, dtype=src_v.dtype, device=src_v.device)
        volume = ins.mask_volume().to(self.device)
        slabs = Slabs.from_xyz(volume, axis=self.mu.axis)
        hit = rays_hitting(src_v - offset, tgt_v - offset, volume.shape[1:])  # only rays that cross its box
        path = torch.zeros(volume.shape[0], tgt_v.shape[0], device=tgt_v.device)
        path[:, hit] = joseph(slabs, src_v - offset, tgt_v[hit] - offset, lengths[hit])
        path = path.view(-1, size, size) > MASK_MM
        mask = (path[0] & ~path[1] if len(path) > 1 else path[0]).cpu().numpy()
        return torch.from_numpy(ndi.binary_fill_holes(mask) if ins.fill else mask).to(self.device)

    # ---- findings --------------------------------------------------------------------------

    def _findings(self, job: dict[str, Any], rng: np.random.Generator, masks: dict[str, torch.Tensor]) -> list[Insertion]:
        """The job's findings as 3-D insertions (findings_place.py: order, room, overlaps)."""
        ctr = None
        if job.get("Cardiomegaly"):  # a ratio of frontal widths: laterals use the patient's frontal one
            ctr = cardiothoracic_ratio(masks) if self.mu.axis == 1 else self._frontal_ctr(int(job["size"]))
        return place_findings(self.inserter, job, rng, ctr)


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
