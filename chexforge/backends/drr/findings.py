"""Findings inserted into the CT in 3-D, before projection.

Each finding becomes an `Insertion`: a box of voxels, an occupancy in [0, 1] and the
attenuation of the material put there. Writing it into a job's copy of the volume replaces
what was there (lung by fluid or tissue); projecting the occupancy alone gives the finding's
exact mask on the detector.

- Nodule / Mass: a lobulated soft-tissue ellipsoid placed inside the requested lung, far
  enough from the pleura to fit. Nodule diameters 6-30 mm, masses 30-75 mm (the 3 cm cut-off
  of the Fleischner glossary).
- Effusion: fluid filling the lowest part of the requested hemithorax (upright patient), its
  surface rising toward the lateral chest wall, which projects as the meniscus at the
  costophrenic angle. Severity sets the fluid height.
- Cardiomegaly: the heart scaled about its centroid, widest transversely, until the
  cardiothoracic ratio measured on the projected masks reaches the target for the severity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from .ct import MU_WATER, Phantom

SOFT_TISSUE_HU = 35.0
FLUID_HU = 12.0

NODULE_MM = {"small": (6, 12), "moderate": (12, 20), "large": (20, 30)}
MASS_MM = {"small": (30, 40), "moderate": (40, 55), "large": (55, 75)}
EFFUSION_MM = {"small": (25, 40), "moderate": (55, 85), "large": (105, 150)}
CTR_TARGET = {"small": (0.53, 0.57), "moderate": (0.57, 0.62), "large": (0.62, 0.68)}


class PlacementError(Exception):
    """A finding that cannot be placed for this job (recorded as the job's error)."""


@dataclass
class Insertion:
    finding: str
    side: str | None
    origin: tuple[int, int, int]  # voxel index of the box corner (x, y, z)
    occupancy: torch.Tensor  # (bx, by, bz) in [0, 1]
    mu: torch.Tensor  # (bx, by, bz) attenuation of the inserted material, 1/mm
    meta: dict = field(default_factory=dict)

    @property
    def box(self) -> tuple[slice, slice, slice]:
        return tuple(slice(o, o + s) for o, s in zip(self.origin, self.occupancy.shape))  # type: ignore[return-value]

    def apply(self, volume_xyz: torch.Tensor) -> None:
        """Write into a (X, Y, Z) view of a job's own volume copy."""
        region = volume_xyz[self.box]
        occ = self.occupancy.to(region)
        region.copy_(region * (1 - occ) + self.mu.to(region) * occ)


class Inserter:
    """Per-phantom precomputation (distance maps) shared by all jobs."""

    def __init__(self, phantom: Phantom):
        self.ph = phantom
        self.spacing = np.array(phantom.spacing)
        self._inside: dict[str, np.ndarray] = {}

    def inside_mm(self, side: str) -> np.ndarray:
        """Distance (mm) from each voxel of a lung to the lung's surface."""
        if side not in self._inside:
            self._inside[side] = ndi.distance_transform_edt(self.ph.lungs[side], sampling=self.spacing).astype(np.float32)
        return self._inside[side]

    # ---- nodules and masses ----------------------------------------------------------------

    def lesion(self, finding: str, side: str, severity: str | None, rng: np.random.Generator,
               occupied: np.ndarray | None = None) -> Insertion:
        """A nodule or mass in the `side` lung, clear of voxels already `occupied` by other findings."""
        lo, hi = (MASS_MM if finding == "Mass" else NODULE_MM)[severity or "moderate"]
        diameter = float(rng.uniform(lo, hi))
        radius = diameter / 2
        depth = self.inside_mm(side)
        need = min(radius * 0.8, 0.9 * float(depth.max()))
        room = depth >= need
        if occupied is not None:
            # Stay a radius clear of earlier findings *as seen from the front* (x-z), so boxes on a
            # frontal radiograph do not nest inside each other.
            shadow = occupied.any(axis=1)
            shadow = ndi.binary_dilation(shadow, iterations=int(np.ceil(radius / self.spacing.min())) + 1)
            room &= ~shadow[:, None, :]
        candidates = np.argwhere(room)
        if len(candidates) == 0:
            raise PlacementError(f"no room for a {diameter:.0f} mm {finding.lower()} in the {side} lung")
        center = candidates[rng.integers(len(candidates))].astype(np.float64)

        half = np.ceil((radius * 1.35 + 2 * self.spacing.max()) / self.spacing).astype(int)
        origin, stop = self._clip_box(center - half, center + half + 1)
        grid = self._mm_grid(origin, stop) - self.ph.to_mm(center)
        axes = 1 + rng.uniform(-0.15, 0.15, size=3)
        r = np.linalg.norm(grid / axes, axis=-1)
        unit = grid / np.maximum(np.linalg.norm(grid, axis=-1, keepdims=True), 1e-6)
        lobes = 0.12 if finding == "Mass" else 0.06
        bumps = np.zeros(r.shape)
        for _ in range(6):  # lobulated outline: smooth random bumps on the sphere
            v = rng.normal(size=3)
            v /= np.linalg.norm(v)
            bumps += rng.uniform(0.3, 1.0) * np.cos(rng.uniform(2, 5) * unit @ v + rng.uniform(0, 2 * np.pi))
        outline = radius * (1 + lobes * bumps / 3)
        occ = _smoothstep((outline - r) / self.spacing.min() + 0.5)
        lung = ndi.binary_dilation(self.ph.lungs[side], iterations=1)[_box(origin, stop)]
        occ *= lung
        if occ.sum() == 0:
            raise PlacementError(f"the {finding.lower()} fell outside the {side} lung")
        hu = SOFT_TISSUE_HU + rng.normal(0, 8) + ndi.gaussian_filter(rng.normal(0, 25, occ.shape), 1.0)
        mu = MU_WATER * (1 + hu / 1000)
        return Insertion(finding, side, origin, _t(occ), _t(mu),
                         {"diameter_mm": round(diameter, 1), "center_mm": self.ph.to_mm(center).round(1).tolist()})

    # ---- pleural effusion ----------------------------------------------------------------

    def effusion(self, side: str, severity: str | None, rng: np.random.Generator) -> Insertion:
        lo, hi = EFFUSION_MM[severity or "moderate"]
        height = float(rng.uniform(lo, hi))
        lung = self.ph.lungs[side]
        idx = np.argwhere(lung)
        origin, stop = self._clip_box(idx.min(0), idx.max(0) + 1)
        sub = lung[_box(origin, stop)]
        mm = self._mm_grid(origin, stop)
        x, z = mm[..., 0], mm[..., 2]
        z_base = float(z[sub].min())
        xs = x[sub]
        # Lateral fraction: 0 at the mediastinal edge, 1 at the chest wall (right lung is +x).
        frac = (x - xs.min()) / np.ptp(xs) if side == "right" else (xs.max() - x) / np.ptp(xs)
        # The meniscus: fluid climbs the lateral chest wall, and its upper layer thins out
        # over `fade` mm, so the upper border is hazy rather than a sharp level.
        surface = z_base + height * (0.55 + 0.9 * np.clip(frac, 0, 1) ** 2)
        fade = 6.0 + 0.15 * height
        occ = np.clip((surface - z) / fade, 0, 1) ** 0.7 * sub
        if occ.max() < 0.5:
            raise PlacementError(f"no {side} lung base to fill")
        fluid = occ >= 0.5
        occ = ndi.gaussian_filter(occ.astype(np.float32), 0.5)
        mu = np.full(occ.shape, MU_WATER * (1 + FLUID_HU / 1000), dtype=np.float32)
        volume_ml = float(fluid.sum() * np.prod(self.spacing) / 1000)
        return Insertion("Effusion", side, origin, _t(occ), _t(mu),
                         {"height_mm": round(height, 1), "volume_ml": round(volume_ml)})

    # ---- cardiomegaly ----------------------------------------------------------------------

    def enlarged_heart(self, scale_x: float) -> Insertion:
        """The heart scaled about its centroid: `scale_x` transversely, less in depth and height."""
        heart = self.ph.heart
        scale = np.array([scale_x, 1 + 0.5 * (scale_x - 1), 1 + 0.6 * (scale_x - 1)])
        idx = np.argwhere(heart)
        center = idx.mean(0)
        origin, stop = self._clip_box(center + (idx.min(0) - center) * scale - 2, center + (idx.max(0) - center) * scale + 3)
        # Where each voxel of the enlarged heart came from, sampled in a crop around the heart.
        c0, c1 = self._clip_box(idx.min(0) - 2, idx.max(0) + 3)
        crop = _box(c0, c1)
        source = np.stack([heart[crop].astype(np.float32), self.ph.mu.numpy()[crop]])  # (2, cx, cy, cz)
        ii = np.stack(np.meshgrid(*[np.arange(o, s) for o, s in zip(origin, stop)], indexing="ij"), -1)
        src = center + (ii - center) / scale - np.array(c0)
        grid = 2 * src / np.maximum(np.array(source.shape[1:]) - 1, 1) - 1  # align_corners=True
        # grid_sample's 5-D input is (N, C, D, H, W) with the grid's last dim ordered (W, H, D).
        sampled = F.grid_sample(torch.from_numpy(source).permute(0, 3, 2, 1)[None],
                                torch.from_numpy(grid).float()[None], mode="bilinear", align_corners=True)[0].numpy()
        occ = np.clip(sampled[0], 0, 1) * ~ndi.binary_dilation(self.ph.bone[_box(origin, stop)], iterations=1)
        tissue = np.where(sampled[0] > 1e-3, sampled[1] / np.maximum(sampled[0], 1e-3), 0)
        mu = np.clip(tissue, MU_WATER * 0.98, MU_WATER * 1.08)  # heart muscle and blood, no bone
        return Insertion("Cardiomegaly", None, origin, _t(occ), _t(mu), {"heart_scale": np.round(scale, 3).tolist()})

    # ---- helpers ----------------------------------------------------------------------------

    def _clip_box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        shape = np.array(self.ph.shape)
        lo = np.clip(np.floor(lo).astype(int), 0, shape - 1)
        hi = np.clip(np.ceil(hi).astype(int), lo + 1, shape)
        return tuple(int(v) for v in lo), tuple(int(v) for v in hi)  # type: ignore[return-value]

    def _mm_grid(self, origin, stop) -> np.ndarray:
        """(bx, by, bz, 3) patient-mm coordinates of each voxel of a box."""
        axes = [np.arange(o, s) * sp + t for o, s, sp, t in zip(origin, stop, self.spacing, self.ph.affine[:3, 3])]
        return np.stack(np.meshgrid(*axes, indexing="ij"), -1)


def _box(origin, stop) -> tuple[slice, slice, slice]:
    return tuple(slice(o, s) for o, s in zip(origin, stop))  # type: ignore[return-value]


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
