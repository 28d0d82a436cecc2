"""Findings inserted into the CT in 3-D, before projection: the shared machinery.

Each finding becomes one or more `Insertion`s: a box of voxels, an occupancy in [0, 1] and the
attenuation of the material put there. Writing it into a job's copy of the volume replaces
what was there (lung by fluid, tissue, air or metal); projecting its label alone gives the
finding's exact mask on the detector. Everything is placed from the CT's labelmap
(TotalSegmentator names), never from coordinates of one CT, and a finding that cannot be placed
raises `PlacementError`, which fails that job with the reason.

This module: `Insertion`, the per-phantom `Inserter` (anatomy caches shared by all jobs) and the
first findings: nodules, masses and lung lesions, pleural effusion, cardiomegaly.
- Nodule / Mass / Lung Lesion: a lobulated soft-tissue ellipsoid placed inside the requested
  lung, far enough from the pleura to fit. Nodule diameters 6-30 mm, masses 30-75 mm (the 3 cm
  cut-off of the Fleischner glossary); a lung lesion spans both.
- Effusion: fluid filling the lowest part of the requested hemithorax (upright patient), its
  surface rising toward the lateral chest wall, which projects as the meniscus at the
  costophrenic angle. Severity sets the fluid height.
- Cardiomegaly: the heart scaled about its centroid, widest transversely, until the
  cardiothoracic ratio measured on the projected masks reaches the target for the severity.
The other findings live in findings_lung.py, findings_pleura.py, findings_mediastinum.py,
findings_fracture.py and devices.py; findings_place.py puts one job's findings together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from .ct import LUNG_LEFT, LUNG_RIGHT, MU_WATER, Phantom, label_in

SOFT_TISSUE_HU = 35.0
FLUID_HU = 12.0

NODULE_MM = {"small": (6, 12), "moderate": (12, 20), "large": (20, 30)}
MASS_MM = {"small": (30, 40), "moderate": (40, 55), "large": (55, 75)}
LESION_MM = {"small": (8, 20), "moderate": (20, 40), "large": (40, 65)}
EFFUSION_MM = {"small": (25, 40), "moderate": (55, 85), "large": (105, 150)}
CTR_TARGET = {"small": (0.53, 0.57), "moderate": (0.57, 0.62), "large": (0.62, 0.68)}
LOBES = {"left": LUNG_LEFT, "right": LUNG_RIGHT}


def hu_to_mu(hu: float | np.ndarray) -> float | np.ndarray:
    return MU_WATER * (1 + np.asarray(hu) / 1000)


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
    # What the mask is the projection of (default: occupancy >= 0.5). A pneumothorax replaces the
    # whole lung (air rim + denser collapsed lung) but its mask is the air rim only.
    label: torch.Tensor | None = None
    # Rays that also cross this are left out of the mask: the pneumothorax mask is where the rim
    # lies *beyond* the collapsed lung, not the rim seen through the lung in front of it.
    beyond: torch.Tensor | None = None
    fill: bool = True  # fill holes in the projected mask (not for devices: a lead's loop is no device)
    focal: bool = True  # later lesions keep clear of it as seen from the front (diffuse findings: no)

    @property
    def box(self) -> tuple[slice, slice, slice]:
        return tuple(slice(o, o + s) for o, s in zip(self.origin, self.occupancy.shape))  # type: ignore[return-value]

    def apply(self, volume_xyz: torch.Tensor, offset: tuple[int, int, int] = (0, 0, 0)) -> None:
        """Write into a (X, Y, Z) view of a job's own volume copy whose voxel 0 is the full
        volume's `offset`."""
        region = volume_xyz[tuple(slice(s.start - o, s.stop - o) for s, o in zip(self.box, offset))]
        occ = self.occupancy.to(region)
        region.copy_(region * (1 - occ) + self.mu.to(region) * occ)

    def solid(self) -> torch.Tensor:
        """The label as a float volume in {0, 1}."""
        return (self.occupancy >= 0.5).float() if self.label is None else (self.label > 0).float()

    def mask_volume(self) -> torch.Tensor:
        """(C, bx, by, bz): the label, then (if set) the volume that removes pixels from the mask."""
        channels = [self.solid()] + ([] if self.beyond is None else [(self.beyond > 0).float()])
        return torch.stack(channels)


@dataclass(frozen=True)
class Region:
    """A structure's voxels inside its own bounding box (plus a margin)."""

    origin: tuple[int, int, int]
    stop: tuple[int, int, int]
    mask: np.ndarray  # bool (bx, by, bz)

    @property
    def box(self) -> tuple[slice, slice, slice]:
        return _box(self.origin, self.stop)


class Inserter:
    """Per-phantom precomputation (distance maps, structure crops, landmarks) shared by all jobs."""

    def __init__(self, phantom: Phantom):
        self.ph = phantom
        self.spacing = np.array(phantom.spacing)
        self._inside: dict[str, np.ndarray] = {}
        self._cache: dict = {}

    def cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def inside_mm(self, side: str) -> np.ndarray:
        """Distance (mm) from each voxel of a lung to the lung's surface."""
        if side not in self._inside:
            self._inside[side] = ndi.distance_transform_edt(self.ph.lungs[side], sampling=self.spacing).astype(np.float32)
        return self._inside[side]

    def has(self, name: str) -> bool:
        return self.region((name,)) is not None

    def region(self, names: tuple[str, ...], margin: int = 2) -> Region | None:
        """The union of the named structures, cropped; None when the labelmap has none of them."""
        def make():
            ids = self.ph.ids(names)
            if not ids:
                return None
            labels = self.ph.labels.numpy()
            idx = np.argwhere(label_in(labels, ids))
            if len(idx) == 0:
                return None
            origin, stop = self.clip_box(idx.min(0) - margin, idx.max(0) + 1 + margin)
            return Region(origin, stop, label_in(labels[_box(origin, stop)], ids))
        return self.cached(("region", names, margin), make)

    def lung(self, side: str) -> Region:
        r = self.region(LOBES[side])
        if r is None:
            raise PlacementError(f"the labelmap has no {side} lung")
        return r

    def lobes(self, side: str) -> list[str]:
        """The side's lobe names present in the labelmap (TotalSegmentator naming)."""
        return [n for n in LOBES[side] if self.has(n)]

    def hilum(self, side: str) -> np.ndarray:
        """Voxel position of the hilum: the lung's medial surface at the level just below the
        carina (mid-lung height when there is no trachea label), at the lung's mid depth."""
        def make():
            lung = self.lung(side)
            idx = np.argwhere(lung.mask) + lung.origin
            carina = self.carina()
            z = int(round(carina[2] - 10 / self.spacing[2])) if carina is not None else int(np.median(idx[:, 2]))
            z = int(np.clip(z, idx[:, 2].min(), idx[:, 2].max()))
            level = idx[np.abs(idx[:, 2] - z) <= max(1, round(5 / self.spacing[2]))]
            toward_mid = -1 if side == "right" else 1  # right lung is +x: its medial edge is its lowest x
            medial = level[np.argsort(toward_mid * -level[:, 0])[: max(1, len(level) // 10)]]
            return np.array([medial[:, 0].mean(), level[:, 1].mean(), z], dtype=np.float64)
        return self.cached(("hilum", side), make)

    def carina(self) -> np.ndarray | None:
        """Voxel position of the carina: the centre of the lowest slice of the trachea label."""
        def make():
            r = self.region(("trachea",))
            if r is None:
                return None
            idx = np.argwhere(r.mask) + r.origin
            low = idx[idx[:, 2] == idx[:, 2].min()]
            return low.mean(0)
        return self.cached("carina", make)

    def centerline(self, name: str) -> np.ndarray | None:
        """(n, 3) voxel centres per axial slice of a roughly vertical structure, top to bottom."""
        def make():
            r = self.region((name,))
            if r is None:
                return None
            idx = np.argwhere(r.mask) + r.origin
            zs = np.unique(idx[:, 2])[::-1]
            return np.array([idx[idx[:, 2] == z].mean(0) for z in zs])
        return self.cached(("centerline", name), make)

    def lung_frame(self, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Over the lung crop, broadcastable: lateral fraction along x (0 at the lung's medial
        extreme, 1 at the chest wall), depth fraction along y (0 back, 1 front) and height
        fraction along z (0 base, 1 apex)."""
        def make():
            lung = self.lung(side)
            idx = np.argwhere(lung.mask)
            lo, hi = idx.min(0), idx.max(0)
            f = [(np.arange(n, dtype=np.float32) - a) / max(b - a, 1) for n, a, b in zip(lung.mask.shape, lo, hi)]
            lat = f[0] if side == "right" else 1 - f[0]  # the right lung is +x: lateral is +x
            return lat[:, None, None], f[1][None, :, None], f[2][None, None, :]
        return self.cached(("frame", side), make)

    def pleural_mm(self, side: str) -> np.ndarray:
        """Over the lung crop: distance (mm) to the pleura, i.e. to the surface of the lung closed
        over its vessel channels and holes (the labelmap's lobes leave hilar vessels out, whose
        walls are no pleura)."""
        def make():
            lung = self.lung(side)
            closed = ndi.binary_closing(np.pad(lung.mask, 4), iterations=4)[4:-4, 4:-4, 4:-4]
            closed = ndi.binary_fill_holes(closed)
            return ndi.distance_transform_edt(closed, sampling=self.spacing).astype(np.float32) * lung.mask
        return self.cached(("pleural", side), make)

    def in_view(self, side: str) -> np.ndarray:
        """(bx, 1, bz) over the lung crop: lung seen from the front at this (x, z) is at least 40 %
        as thick as the thickest in its column, i.e. above the diaphragm's dome on a frontal
        film, not in the deep recesses that project over the liver or spleen."""
        def make():
            t = self.lung(side).mask.sum(axis=1, keepdims=True).astype(np.float32)
            return t >= 0.4 * np.maximum(t.max(axis=2, keepdims=True), 1)
        return self.cached(("in_view", side), make)

    # ---- nodules, masses, lung lesions --------------------------------------------------------

    def lesion(self, finding: str, side: str, severity: str | None, rng: np.random.Generator,
               occupied: np.ndarray | None = None, depth: np.ndarray | None = None) -> Insertion:
        """A nodule, mass or lung lesion in the `side` lung, clear of voxels already `occupied` by
        other findings. `depth`: distance to the aerated lung's surface (default: the lung's)."""
        sizes = {"Mass": MASS_MM, "Lung Lesion": LESION_MM}.get(finding, NODULE_MM)
        lo, hi = sizes[severity or "moderate"]
        diameter = float(rng.uniform(lo, hi))
        radius = diameter / 2
        depth = self.inside_mm(side) if depth is None else depth
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
        origin, stop = self.clip_box(center - half, center + half + 1)
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
        occ = smoothstep((outline - r) / self.spacing.min() + 0.5)
        lung = self.cached(("lung_dilated", side), lambda: ndi.binary_dilation(self.ph.lungs[side], iterations=1))
        occ *= lung[_box(origin, stop)]
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
        origin, stop = self.clip_box(idx.min(0), idx.max(0) + 1)
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
        if not heart.any():
            raise PlacementError("the labelmap has no heart")
        scale = np.array([scale_x, 1 + 0.5 * (scale_x - 1), 1 + 0.6 * (scale_x - 1)])
        idx = np.argwhere(heart)
        center = idx.mean(0)
        origin, stop = self.clip_box(center + (idx.min(0) - center) * scale - 2, center + (idx.max(0) - center) * scale + 3)
        # Where each voxel of the enlarged heart came from, sampled in a crop around the heart.
        c0, c1 = self.clip_box(idx.min(0) - 2, idx.max(0) + 3)
        crop = _box(c0, c1)
        source = np.stack([heart[crop].astype(np.float32), self.ph.mu.numpy()[crop]])  # (2, cx, cy, cz)
        ii = np.stack(np.meshgrid(*[np.arange(o, s) for o, s in zip(origin, stop)], indexing="ij"), -1)
        src = center + (ii - center) / scale - np.array(c0)
        sampled = sample(source, src)
        occ = np.clip(sampled[0], 0, 1) * ~ndi.binary_dilation(self.ph.bone[_box(origin, stop)], iterations=1)
        tissue = np.where(sampled[0] > 1e-3, sampled[1] / np.maximum(sampled[0], 1e-3), 0)
        mu = np.clip(tissue, MU_WATER * 0.98, MU_WATER * 1.08)  # heart muscle and blood, no bone
        return Insertion("Cardiomegaly", None, origin, _t(occ), _t(mu),
                         {"heart_scale": np.round(scale, 3).tolist(), "heart_center": np.round(center, 2).tolist()})

    # ---- helpers ----------------------------------------------------------------------------

    def clip_box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        shape = np.array(self.ph.shape)
        lo = np.clip(np.floor(lo).astype(int), 0, shape - 1)
        hi = np.clip(np.ceil(hi).astype(int), lo + 1, shape)
        return tuple(int(v) for v in lo), tuple(int(v) for v in hi)  # type: ignore[return-value]

    def _mm_grid(self, origin, stop) -> np.ndarray:
        """(bx, by, bz, 3) patient-mm coordinates of each voxel of a box."""
        axes = [np.arange(o, s) * sp + t for o, s, sp, t in zip(origin, stop, self.spacing, self.ph.affine[:3, 3])]
        return np.stack(np.meshgrid(*axes, indexing="ij"), -1)

    def offsets_mm(self, origin, stop, point: np.ndarray) -> list[np.ndarray]:
        """Broadcastable per-axis offsets (mm) of a box's voxels from the voxel position `point`."""
        return [a + (o - p) * sp for a, o, p, sp in zip(self.axes_mm(origin, stop), origin, point, self.spacing)]

    def axes_mm(self, origin, stop) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (bx,1,1), (1,by,1), (1,1,bz) voxel-centre offsets in mm from the box origin."""
        n = [s - o for o, s in zip(origin, stop)]
        x, y, z = (np.arange(k, dtype=np.float32) * sp for k, sp in zip(n, self.spacing))
        return x[:, None, None], y[None, :, None], z[None, None, :]

    def smooth_noise(self, shape: tuple[int, ...], cell_mm: float, rng: np.random.Generator) -> np.ndarray:
        """A unit-variance random field varying over about `cell_mm`: coarse Gaussian noise,
        trilinearly upsampled (far cheaper than filtering a full-resolution field)."""
        coarse = [max(2, int(np.ceil(n * sp / cell_mm)) + 1) for n, sp in zip(shape, self.spacing)]
        g = torch.from_numpy(rng.normal(size=coarse).astype(np.float32))[None, None]
        up = F.interpolate(g, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].numpy()
        return (up - up.mean()) / max(float(up.std()), 1e-6)

    def finish(self, finding: str, side: str | None, origin, occ: np.ndarray, mu: np.ndarray | float,
               meta: dict, label: np.ndarray | None = None, beyond: np.ndarray | None = None,
               **flags) -> Insertion:
        """An Insertion trimmed to the extent of what it changes (smaller boxes project faster)."""
        mu = np.broadcast_to(np.asarray(mu, dtype=np.float32), occ.shape)
        keep = occ > 1e-3
        if label is not None:
            keep = keep | (label > 0)
        if not keep.any():
            raise PlacementError(f"the {finding.lower()} found no room" + (f" on the {side}" if side else ""))
        idx = np.argwhere(keep)
        lo, hi = idx.min(0), idx.max(0) + 1
        sl = _box(lo, hi)
        start = tuple(int(o + a) for o, a in zip(origin, lo))
        return Insertion(finding, side, start, _t(occ[sl]), _t(mu[sl]), meta,
                         None if label is None else torch.from_numpy(np.ascontiguousarray(label[sl] > 0)),
                         None if beyond is None else torch.from_numpy(np.ascontiguousarray(beyond[sl] > 0)), **flags)


def tube(spacing, origin, shape, segments, soft_mm: float = 0.4) -> np.ndarray:
    """Occupancy in [0, 1] of tubes (segments (a, b, radius mm)), averaged over sub-voxel samples
    (~0.8 mm apart) so a tube thinner than a voxel keeps its cross-section wherever it runs:
    without this, a 2 mm lead crossing 2.5 mm slices projects as a string of beads. Where tubes
    overlap, the fuller one counts."""
    sp = np.asarray(spacing, dtype=np.float64)
    n = np.maximum(1, np.ceil(sp / 0.8)).astype(int)
    offsets = np.stack(np.meshgrid(*[((np.arange(k) + 0.5) / k - 0.5) * h for k, h in zip(n, sp)], indexing="ij"), -1)
    offsets = offsets.reshape(-1, 3)  # (K, 3) mm, sub-sample positions inside a voxel
    out = np.zeros(shape, np.float32)
    origin = np.asarray(origin)
    for a, b, radius in segments:
        reach = (radius + soft_mm + sp) / sp
        lo = np.maximum(np.floor(np.minimum(a, b) - reach).astype(int) - origin, 0)
        hi = np.minimum(np.ceil(np.maximum(a, b) + reach).astype(int) + 1 - origin, shape)
        if np.any(hi <= lo):
            continue
        pa, ab = np.asarray(a) * sp, (np.asarray(b) - np.asarray(a)) * sp
        px, py, pz = ((np.arange(lo[i], hi[i]) + origin[i]) * sp[i] - pa[i] for i in range(3))
        px = px[:, None, None, None] + offsets[:, 0]
        py = py[None, :, None, None] + offsets[:, 1]
        pz = pz[None, None, :, None] + offsets[:, 2]
        t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / max(float(ab @ ab), 1e-9), 0, 1)
        d = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
        occ = smoothstep((radius - d) / soft_mm + 0.5).mean(-1)
        sub = _box(lo, hi)
        out[sub] = np.maximum(out[sub], occ)
    return out


def rays_hitting(src_v: torch.Tensor, tgt_v: torch.Tensor, shape, margin: float = 0.0) -> torch.Tensor:
    """(N,) bool: which rays from `src_v` to `tgt_v` (voxel space) pass through the box
    [0, shape - 1] (plus the one-voxel reach of interpolation, plus `margin` voxels: how far a
    patient's deformation may move the box) — a slab test, so a small finding's mask projects
    only the few rays that can see it."""
    lo = torch.full((3,), -1.0 - margin, dtype=tgt_v.dtype, device=tgt_v.device)
    hi = torch.tensor(shape, dtype=tgt_v.dtype, device=tgt_v.device) + margin
    d = tgt_v - src_v
    d = torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t1, t2 = (lo - src_v) / d, (hi - src_v) / d
    t_in = torch.minimum(t1, t2).amax(1).clamp_min(0)
    t_out = torch.maximum(t1, t2).amin(1).clamp_max(1)
    return t_out >= t_in


def sample(source: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Trilinear samples of a (C, X, Y, Z) array at voxel positions `where` (..., 3); 0 outside."""
    shape = np.array(source.shape[1:])
    grid = 2 * where / np.maximum(shape - 1, 1) - 1  # align_corners=True
    # grid_sample's 5-D input is (N, C, D, H, W) with the grid's last dim ordered (W, H, D).
    out = F.grid_sample(torch.from_numpy(np.ascontiguousarray(source, dtype=np.float32)).permute(0, 3, 2, 1)[None],
                        torch.from_numpy(grid).float()[None], mode="bilinear", align_corners=True)
    return out[0].numpy()


def _box(origin, stop) -> tuple[slice, slice, slice]:
    return tuple(slice(int(o), int(s)) for o, s in zip(origin, stop))  # type: ignore[return-value]


def smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)



def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
