"""A virtual patient's tissue: what a deformation of the CT cannot make.

- breasts (women): soft tissue added in front of the chest wall, a hemi-ellipsoid per side of the
  drawn volume, lower and flatter (ptotic) with age and body fat;
- costal-cartilage calcification: calcium in the cartilages' borders (the male pattern) or their
  core (the female pattern), over a share of them that grows with age;
- aortic-knob calcification: a crescent in the upper wall of the aortic arch;
- lung vessels: the CT's own were removed when it was prepared (vessels.parenchyma); each
  patient gets new arterial and venous trees grown from the hila (vessels.grow);
- bone mineral density: applied after projection (`bone_factor` scales the bone basis path).

Each is an `Addition`: a box of the CT's voxel grid with the attenuation (and bone basis density)
to add, projected on its own with the patient's deformation and added to the image's line
integrals. The CT's volumes are never copied or changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi

from . import imaging
from .ct import MU_WATER, Phantom, attenuation
from .deform import Landmarks
from .findings import Inserter
from .patient import Patient

BREAST_HU = -60.0  # mostly fat with fibroglandular tissue
CALCIUM_HU = 450.0  # calcified cartilage and intimal calcium at CT numbers
BLOOD_HU = 40.0
PARENCHYMA_HU = -850.0  # aerated lung the vessels displace


@dataclass
class Addition:
    name: str
    origin: tuple[int, int, int]
    mu: torch.Tensor  # (bx, by, bz) attenuation added, 1/mm
    bone: torch.Tensor | None = None  # (bx, by, bz) bone basis density added, g/cm³


def tight(add: Addition) -> Addition | None:
    """The addition cropped to where it adds anything (the projector's cost is its box), or None."""
    nz = add.mu != 0 if add.bone is None else (add.mu != 0) | (add.bone != 0)
    idx = torch.nonzero(nz)
    if len(idx) == 0:
        return None
    lo, hi = idx.min(0).values.tolist(), (idx.max(0).values + 1).tolist()
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return Addition(add.name, tuple(o + a for o, a in zip(add.origin, lo)), add.mu[box].contiguous(),
                    None if add.bone is None else add.bone[box].contiguous())


def additions(p: Patient, lm: Landmarks, ph: Phantom, inserter: Inserter) -> list[Addition]:
    out: list[Addition] = []
    if p.breast_ml > 0:
        out += [b for side in ("left", "right") if (b := _breast(p, lm, ph, inserter, side)) is not None]
    rng = np.random.default_rng([p.vessel_seed, 1])
    if p.cartilage_calcification > 0.01 and inserter.has("costal_cartilages"):
        out.append(_cartilage(p, inserter, rng))
    if p.aortic_calcification > 0 and inserter.has("aorta"):
        a = _aortic_knob(p, inserter, rng)
        if a is not None:
            out.append(a)
    return out


def _front_surface(ph: Phantom) -> np.ndarray:
    """(X, Z): the most anterior body voxel (y) of each column, -1 where there is no body."""
    body = ph.mu.numpy() > 0.5 * MU_WATER
    front = body.shape[1] - 1 - np.argmax(body[:, ::-1, :], axis=1)
    return np.where(body.any(1), front, -1)


def _breast(p: Patient, lm: Landmarks, ph: Phantom, inserter: Inserter, side: str) -> Addition | None:
    """A mound on the chest surface: thickness T(x, z) over an elliptical footprint centred on the
    nipple (mid-clavicular line, 4th-5th interspace, lower with ptosis), rising steeply at the
    inframammary fold (the sharp lower border radiographs show) and tapering gently upward into
    the chest wall. A PA film sees T (and the fold); a lateral sees the mound in profile."""
    sp = np.array(ph.spacing)
    lung = ph.lungs[side]
    if not lung.any():
        return None
    xs = np.nonzero(lung.any(axis=(1, 2)))[0]
    x_mid = (lm.spine[0] - ph.affine[0, 3]) / sp[0]
    x_edge = xs.max() if side == "right" else xs.min()  # RAS: the right lung's chest wall is +x
    x_c = x_mid + 0.55 * (x_edge - x_mid)
    z_c = (lm.heart_centre[2] - ph.affine[2, 3] - 5 - 40 * p.breast_ptosis) / sp[2]
    r = (p.breast_ml * 1000 / 1.70) ** (1 / 3)  # footprint radius (mm): V = 2/3·π·r·(1.35 r)·0.6 r
    h = 0.6 * r * (1 - 0.3 * p.breast_ptosis)
    r_up = 1.7 * r
    lo = np.array([x_c - r / sp[0], 0, z_c - r / sp[2]]).astype(int) - 2
    hi = np.array([x_c + r / sp[0], ph.shape[1], z_c + r_up / sp[2]]).astype(int) + 3
    lo, hi = np.maximum(lo, 0), np.minimum(hi, ph.shape)
    if np.any(hi - lo < 2):
        return None
    y_skin = inserter.cached("front_surface", lambda: _front_surface(ph))[lo[0]:hi[0], lo[2]:hi[2]]  # (bx, bz)
    if (y_skin < 0).all():
        return None
    lo[1] = max(int(y_skin[y_skin >= 0].min()) - 1, 0)  # the mound lies in front of the surface
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    ys = np.arange(lo[1], hi[1])
    gx = (np.arange(lo[0], hi[0]) - x_c)[:, None] * sp[0]
    gz = (np.arange(lo[2], hi[2]) - z_c)[None, :] * sp[2]
    rho2 = (gx / r) ** 2 + (np.where(gz > 0, gz / r_up, gz / r)) ** 2
    inside = np.clip(1 - rho2, 0, None)
    # Above the nipple line the mound thins toward the chest wall (continuous at the line).
    taper = np.where(gz > 0, np.clip(1 - (gz / r_up) ** 2, 0, 1), 1.0)
    thick = h * np.sqrt(inside) * taper * (y_skin >= 0)
    thick = np.minimum(thick, (ph.shape[1] - 2 - y_skin) * sp[1])  # the CT's field ends in front
    above = (ys[None, :, None] - y_skin[:, None, :]) * sp[1]  # mm in front of the surface
    # Partial volume: the share of each voxel's depth [above ± half a voxel] inside [0, thickness].
    top = np.minimum(above + 0.5 * sp[1], thick[:, None, :])
    occ = np.clip((top - np.maximum(above - 0.5 * sp[1], 0)) / sp[1], 0, 1)
    add = occ * np.clip(attenuation(BREAST_HU) - ph.mu.numpy()[box], 0, None)  # only where the CT has air
    if not add.any():
        return None
    return Addition(f"breast_{side}", tuple(int(v) for v in lo), torch.from_numpy(add.astype(np.float32)))


def _smooth_noise(shape, sp, rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
    """Gaussian-smoothed unit noise on the crop, drawn on a grid of sigma/2 and upsampled
    (smoothing at full resolution costs ten times more for the same look)."""
    coarse = np.maximum(2, np.ceil(np.asarray(shape) * np.asarray(sp) / (sigma_mm / 2)).astype(int))
    n = ndi.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), 2.0, mode="wrap")
    n = torch.nn.functional.interpolate(torch.from_numpy(n)[None, None], size=tuple(int(v) for v in shape),
                                        mode="trilinear", align_corners=True)[0, 0].numpy()
    return (n - n.mean()) / max(float(n.std()), 1e-6)


def _calcium(region_mask: np.ndarray, pattern: np.ndarray, fraction: float, noise: np.ndarray,
             base_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """Calcify `fraction` of the pattern's voxels where the noise is highest: (mu, bone) to add."""
    cand = pattern & region_mask
    if not cand.any():
        return np.zeros(pattern.shape, np.float32), np.zeros(pattern.shape, np.float32)
    cut = np.quantile(noise[cand], 1 - np.clip(fraction, 0, 1))
    occ = (cand & (noise >= cut)).astype(np.float32)
    occ = np.clip(ndi.gaussian_filter(occ, 0.5), 0, 1) * region_mask  # soft edges, inside the structure
    mu = occ * (attenuation(CALCIUM_HU) - attenuation(base_hu))
    bone = imaging.bone_density(torch.from_numpy(np.full(1, attenuation(CALCIUM_HU), np.float32))).item() * occ
    return mu.astype(np.float32), bone.astype(np.float32)


def _cartilage(p: Patient, inserter: Inserter, rng: np.random.Generator) -> Addition:
    reg = inserter.region(("costal_cartilages",))
    sp = inserter.spacing

    def patterns():
        m = reg.mask
        # Distance to the cartilage's upper or lower border alone (z), and to any border (3-D).
        along_z = ndi.distance_transform_edt(m, sampling=(1e3, 1e3, sp[2]))
        full = ndi.distance_transform_edt(m, sampling=sp)
        return along_z <= max(3.0, sp[2]), full >= 2.0

    marginal, central = inserter.cached("cartilage_patterns", patterns)
    pattern = marginal if p.sex == "M" else central
    noise = _smooth_noise(reg.mask.shape, sp, rng, 6.0)
    mu, bone = _calcium(reg.mask, pattern, p.cartilage_calcification, noise, 100.0)
    return Addition("costal_cartilage_calcium", reg.origin, torch.from_numpy(mu), torch.from_numpy(bone))


def _aortic_knob(p: Patient, inserter: Inserter, rng: np.random.Generator) -> Addition | None:
    reg = inserter.region(("aorta",))
    sp = inserter.spacing

    def wall():
        m = reg.mask
        idx = np.argwhere(m)
        top = idx[:, 2].max()
        arch = np.zeros_like(m)
        arch[:, :, max(0, top - int(30 / sp[2])):] = True
        edge = m & ~ndi.binary_erosion(m, iterations=1)
        x_mid = np.median(idx[idx[:, 2] > top - int(30 / sp[2]), 0])
        left = (np.arange(m.shape[0]) <= x_mid)[:, None, None]  # RAS: the patient's left is -x
        return edge & arch & left

    crescent = inserter.cached("aortic_knob_wall", wall)
    if not crescent.any():
        return None
    noise = _smooth_noise(reg.mask.shape, sp, rng, 4.0)
    mu, bone = _calcium(reg.mask, crescent, p.aortic_calcification, noise, BLOOD_HU)
    return Addition("aortic_calcium", reg.origin, torch.from_numpy(mu), torch.from_numpy(bone))


def vessel_trees(p: Patient, ph: Phantom, inserter: Inserter) -> list[Addition]:
    """Per lung, the patient's own vascular trees (as much blood as the CT's removed vessels held)."""
    from . import vessels

    if not ph.vessel_ml:
        return []
    rng = np.random.default_rng([p.vessel_seed, 2])
    out = []
    for side in ("right", "left"):
        lung = inserter.lung(side)
        root = inserter.hilum(side) - np.array(lung.origin)
        grown = vessels.trees(lung.mask, root, ph.spacing, rng, ph.vessel_ml[side])  # an artery and a vein
        occ = vessels.rasterize(grown, lung.mask.shape, ph.spacing) * lung.mask
        mu = occ * (attenuation(BLOOD_HU) - attenuation(PARENCHYMA_HU))
        out.append(Addition(f"vessels_{side}", lung.origin, torch.from_numpy(mu.astype(np.float32))))
    return out
