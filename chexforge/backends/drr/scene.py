"""Scenes: one patient ready to render, and the cache of them.

A `Scene` is one CT (`source`) prepared at one detail level, its attenuation and anatomy volumes
laid out for one beam axis on the backend's device, with the findings' per-CT anatomy caches
(`Inserter`). Each job gets its own scene (`DRRBackend.scene_for`) and everything downstream
(projection, findings, realism statistics) takes it as an argument: no "current patient" lives
on the backend, so a job renders the same whatever was rendered before it.

The detail level follows the job's image size (`ct.choose_level`), so jobs of different sizes in
one run project the CT at different resolutions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from . import imaging
from .ct import (
    HEART,
    LUNG_LEFT,
    LUNG_RIGHT,
    Phantom,
    choose_level,
    ct_spacing,
    label_in,
    load_phantom,
)
from .findings import Inserter
from .geometry import FIELD_MM, VIEWS, Geometry
from .library import LRU
from .project import Rays, Slabs, Warp, voxel_rays

# The anatomy channels of a scene, in order: each is projected to its mask (backend.py).
ANATOMY = {"lung_left": LUNG_LEFT, "lung_right": LUNG_RIGHT, "heart": HEART}


@dataclass
class Scene:
    """One patient at one detail level, ready to render along one beam axis."""

    phantom: Phantom
    inserter: Inserter  # shared by the scenes of one CT and level: its caches are per phantom
    # Projected together in one pass (the rays' sampling positions are the costly part):
    tissue: Slabs  # attenuation (1/mm) (+ bone basis density for the polychromatic chain)
    anatomy: Slabs  # lung_left, lung_right, heart
    vox_from_patient: torch.Tensor
    source: str
    # Image size → the CT's own person's cardiothoracic ratio on a canonical PA film (without
    # virtual patients; a virtual patient's is kept on its Body).
    frontal_ctr: dict[int, float] = field(default_factory=dict)

    @property
    def axis(self) -> int:
        return self.tissue.axis

    @property
    def level(self) -> int:
        return self.phantom.level

    @property
    def device(self) -> torch.device:
        return self.tissue.data.device

    def rays(self, geom: Geometry, warp: Warp | None = None) -> Rays:
        """The geometry's rays in this scene's voxel space, through the patient's deformation."""
        vox_from_world = self.vox_from_patient @ torch.from_numpy(np.linalg.inv(geom.patient_matrix()))
        src, tgt = geom.rays(self.device)
        return voxel_rays(vox_from_world.to(self.device), src, tgt, warp)


@lru_cache(maxsize=4096)
def detail_level(source: str, size: int) -> int:
    """The CT's detail level for images of `size` pixels (its header is read once per size)."""
    return choose_level(min(ct_spacing(source)[:2]), FIELD_MM / size)


class Scenes:
    """Prepared scenes, the least recently used dropped first: per CT and level the phantom and
    its Inserter, and per beam axis the volumes laid out along it."""

    def __init__(self, ct_cache: int, polychromatic: bool, device: torch.device, vessels: bool = False):
        self._lru = LRU(3 * ct_cache)  # per CT: the phantom, a frontal and a lateral scene
        self.polychromatic = polychromatic
        self.device = device
        self.vessels = vessels  # the CT prepared without its lung vessels (each patient grows its own)

    def get(self, source: str, size: int, view: str) -> Scene:
        level = detail_level(source, size)
        axis = VIEWS[view]["beam_axis"]
        phantom, inserter = self._lru.get_or_make((source, level, None), lambda: _load(source, level, self.vessels))
        return self._lru.get_or_make((source, level, axis), lambda: self._build(phantom, inserter, axis, source))

    def _build(self, ph: Phantom, inserter: Inserter, axis: int, source: str) -> Scene:
        labels = ph.labels.numpy()
        tissue = [ph.mu] + ([imaging.bone_density(ph.mu)] if self.polychromatic else [])  # bone: imaging.py
        anatomy = [torch.from_numpy(label_in(labels, ph.ids(names)).astype(np.float32)) for names in ANATOMY.values()]
        tissue_slabs, anatomy_slabs = (Slabs.from_xyz(torch.stack(c).to(self.device), axis=axis) for c in (tissue, anatomy))
        span = tissue_slabs.with_span().span
        return Scene(ph, inserter, Slabs(tissue_slabs.data, axis, span), Slabs(anatomy_slabs.data, axis, span),
                     torch.from_numpy(np.linalg.inv(ph.affine)), source)


def _load(source: str, level: int, vessels: bool) -> tuple[Phantom, Inserter]:
    phantom = load_phantom(source, level=level, without_vessels=vessels)
    return phantom, Inserter(phantom)
