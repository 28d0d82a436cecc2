"""A virtual patient's shape: a smooth 3-D deformation of one CT and its labels together.

`Landmarks` measures the CT once (lungs, domes, heart, aortic arch, spine, shoulder girdle,
rib cage and skin per level). `body_scale` gives the global size of the drawn person relative to
the CT (the geometry applies it, so path lengths scale exactly). `backward_field` composes the
local changes into one backward displacement on a coarse grid (about 8 mm): the virtual patient
at p shows the CT at p + d(p). The projector applies it per ray sample (project.Warp), to the
attenuation, the anatomy channels and every finding alike, so masks stay exact.

Local changes, applied to the CT in this order (the backward map runs them in reverse):
1. diaphragm: per side, everything between apex and dome stretched cranio-caudally to the drawn
   lung height, everything below moved with the dome (right and left blended over the midline);
2. heart: scaled about its centre to the drawn cardiothoracic ratio (transversely more than
   vertically), shifted and rotated in the frontal plane, blended into the lung around it;
3. mediastinum and aorta: the upper mediastinum widened, the aortic arch moved left and up;
4. spine: a lateral (scoliotic) curve of the thorax and extra kyphosis (the upper thorax moved
   backward: seen on laterals);
5. shoulders: the girdle (clavicles, scapulae, humeri) raised or lowered, the scapulae rotated out;
6. chest wall: the soft tissue outside the rib cage thickened or thinned (body fat, muscle).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from .ct import MU_WATER, Phantom, label_in, lung_profile
from .patient import Patient
from .project import Warp

GRID_MM = 8.0
GIRDLE = ("clavicula_left", "clavicula_right", "scapula_left", "scapula_right", "humerus_left", "humerus_right")
SCAPULAE = ("scapula_left", "scapula_right")
THORACIC = tuple(f"vertebrae_T{i}" for i in range(1, 13))
REFERENCE_STATURE_CM = 175.3  # the CT's person is taken as of average adult stature


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0, 1)
    return t * t * (3 - 2 * t)


@dataclass
class Landmarks:
    """What the deformation needs to know about one prepared CT (patient mm, RAS)."""

    apex: dict[str, float]
    dome: dict[str, float]
    mid_x: float  # where right and left profiles meet (just right of the heart)
    width: float  # widest lung-to-lung extent (inner thoracic width)
    depth_ratio: float  # rib cage depth / width at its widest level
    heart_centre: np.ndarray
    heart_radii: np.ndarray  # half extents (x, y, z)
    ctr: float  # heart width / thoracic width
    heart_top: float
    arch: np.ndarray | None  # left upper edge of the aortic arch
    spine: tuple[float, float, float, float]  # x, y, z of T12 bottom, z of T1 top
    girdle: np.ndarray  # coarse-grid weights in [0, 1]
    scapulae: np.ndarray
    ribcage: np.ndarray  # per coarse z: cx, cy, ax, ay (rib cage half axes), band (mm)
    grid: tuple[np.ndarray, np.ndarray, np.ndarray]  # coarse-grid voxel indices per axis


def landmarks(ph: Phantom) -> Landmarks:
    sp = np.array(ph.spacing)
    mm = ph.to_mm
    labels = ph.labels.numpy()
    prof = {side: lung_profile(ph.lungs[side], side) for side in ("left", "right")}
    apex = {s: float(mm(np.array([0, 0, p[0]]))[2]) for s, p in prof.items()}
    dome = {s: float(mm(np.array([0, 0, p[1]]))[2]) for s, p in prof.items()}
    both = ph.lungs["left"] | ph.lungs["right"]
    width = _widest_row(both) * sp[0]
    heart = ph.heart
    if heart.any():
        hidx = np.argwhere(heart)
        lo, hi = mm(hidx.min(0)), mm(hidx.max(0))
        centre, radii = (lo + hi) / 2, np.maximum((hi - lo) / 2, 10.0)
        mid_x = float(mm(np.array([hidx[:, 0].max(), 0, 0]))[0] + 10.0)
        heart_top = float(hi[2])
    else:  # no heart label: a heart-sized region in front of the spine, below the lungs' middle
        lo, hi = ph.lung_extent_mm
        centre = np.array([(lo[0] + hi[0]) / 2 - 15, (lo[1] + hi[1]) / 2 + 20, lo[2] + 0.3 * (hi[2] - lo[2])])
        radii = np.array([0.22 * width, 50.0, 55.0])
        mid_x, heart_top = float(centre[0] + radii[0]), float(centre[2] + radii[2])
    lung_lo, lung_hi = ph.lung_extent_mm
    arch = None
    if "aorta" in ph.structures:
        aidx = np.argwhere(labels == ph.structures["aorta"])
        if len(aidx):
            amm = mm(aidx)
            top = amm[amm[:, 2] > amm[:, 2].max() - 25]
            arch = np.array([top[:, 0].min(), top[:, 1].mean(), top[:, 2].max()])
    spine_ids = ph.ids(THORACIC)
    if spine_ids:
        vidx = mm(np.argwhere(label_in(labels, spine_ids)))
        spine = (float(vidx[:, 0].mean()), float(vidx[:, 1].mean()), float(vidx[:, 2].min()), float(vidx[:, 2].max()))
    else:
        spine = ((lung_lo[0] + lung_hi[0]) / 2, float(lung_lo[1]), float(lung_lo[2]), float(lung_hi[2]))
    grid = tuple(np.linspace(0, n - 1, max(2, int(np.ceil((n - 1) * s / GRID_MM)) + 1)) for n, s in zip(ph.shape, sp))
    girdle, scap = (_coarse_weight(label_in(labels, ph.ids(names)), grid, sp) for names in (GIRDLE, SCAPULAE))
    ribcage, depth_ratio = _ribcage(ph, grid[2], width)
    # The ratio as a frontal film measures it: widest row of the heart's and the lungs' shadows.
    ctr = _widest_row(heart) * sp[0] / width if heart.any() else float(2 * radii[0] / width)
    return Landmarks(apex, dome, mid_x, width, depth_ratio, centre, radii,
                     ctr, heart_top, arch, spine, girdle, scap, ribcage, grid)


def _widest_row(mask: np.ndarray) -> float:
    """The widest extent along x (voxels) of a structure's frontal shadow, over its levels."""
    shadow = mask.any(axis=1)  # (X, Z)
    rows = np.nonzero(shadow.any(0))[0]
    x = np.arange(shadow.shape[0])[:, None]
    hi = np.where(shadow[:, rows], x, -1).max(0)
    lo = np.where(shadow[:, rows], x, shadow.shape[0]).min(0)
    return float((hi - lo + 1).max())


def _coarse_weight(mask: np.ndarray, grid, sp: np.ndarray) -> np.ndarray:
    """A structure's occupancy blurred over ~15 mm and sampled on the coarse grid, max 1."""
    if not mask.any():
        return np.zeros([len(g) for g in grid], np.float32)
    sigma = 15.0 / sp
    # On a fine CT (the full-resolution level of a 512² film, ~0.7 mm voxels) a 15 mm blur is a
    # 20-voxel kernel over the whole volume (~7 s a structure): average blocks of up to a quarter
    # sigma first, which the blur cannot tell apart. Coarser levels (sigma < 12 voxels) are blurred
    # as they are.
    f = np.maximum(1, (sigma / 6).astype(int))
    if (f > 1).any():
        pad = [(0, (-n) % k) for n, k in zip(mask.shape, f)]
        m = np.pad(mask.astype(np.float32), pad)
        shape = [n // k for n, k in zip(m.shape, f)]
        m = m.reshape(shape[0], f[0], shape[1], f[1], shape[2], f[2]).mean(axis=(1, 3, 5))
        grid = [(g - (k - 1) / 2) / k for g, k in zip(grid, f)]  # block i's centre is voxel i·k + (k-1)/2
        w = ndi.gaussian_filter(m, sigma / f)
    else:
        w = ndi.gaussian_filter(mask.astype(np.float32), sigma)
    w = ndi.map_coordinates(w, np.meshgrid(*grid, indexing="ij"), order=1)
    return (w / max(float(w.max()), 1e-6)).astype(np.float32)


def _ribcage(ph: Phantom, zs: np.ndarray, width: float) -> tuple[np.ndarray, float]:
    """Per coarse level: the rib cage's centre and half axes and the soft tissue outside it (mm),
    from the ribs' extent where there are ribs (else the body's, shrunk), and the cage's depth/width."""
    sp = np.array(ph.spacing)
    ribs = label_in(ph.labels.numpy(), [i for n, i in ph.structures.items() if n.startswith("rib_")])
    body = ph.mu.numpy() > 0.5 * MU_WATER
    lungs = ph.lungs["left"] | ph.lungs["right"]
    rows, ratio = [], []
    for z in np.rint(zs).astype(int):
        sl = slice(max(z - 1, 0), z + 2)
        b = np.argwhere(body[:, :, sl].any(2))
        r = np.argwhere(ribs[:, :, sl].any(2))
        if len(b) == 0:
            rows.append([np.nan] * 5)
            continue
        blo, bhi = b.min(0) * sp[:2], (b.max(0) + 1) * sp[:2]
        if len(r) > 20:
            lo, hi = r.min(0) * sp[:2], (r.max(0) + 1) * sp[:2]
            lu = np.argwhere(lungs[:, :, sl].any(2))
            if len(lu):  # the cage holds the lungs: never narrower than they are (+ the ribs' thickness)
                lo = np.minimum(lo, lu.min(0) * sp[:2] - 12)
                hi = np.maximum(hi, (lu.max(0) + 1) * sp[:2] + 12)
            ratio.append((hi[1] - lo[1]) / max(hi[0] - lo[0], 1))
        else:
            c, h = (blo + bhi) / 2, (bhi - blo) / 2 * 0.85
            lo, hi = c - h, c + h
        band = max(10.0, float(min(lo[0] - blo[0], bhi[0] - hi[0])))
        centre = (lo + hi) / 2 + ph.affine[:2, 3]
        rows.append([centre[0], centre[1], (hi[0] - lo[0]) / 2, (hi[1] - lo[1]) / 2, band])
    arr = np.array(rows, dtype=np.float64)
    for c in range(arr.shape[1]):  # levels without body (the padded ends): the nearest level's
        bad = np.isnan(arr[:, c])
        if bad.all():
            arr[:, c] = [0, 0, width / 2, width / 3, 15][c]
        elif bad.any():
            arr[bad, c] = np.interp(np.nonzero(bad)[0], np.nonzero(~bad)[0], arr[~bad, c])
    arr = ndi.gaussian_filter1d(ndi.median_filter(arr, size=(5, 1), mode="nearest"), 1.5, axis=0, mode="nearest")
    return arr, float(np.median(ratio)) if ratio else 0.7


def body_scale(p: Patient, lm: Landmarks) -> tuple[float, float, float]:
    """The drawn person's size relative to the CT: (width, depth, height) factors."""
    sx = 10 * p.thorax_width_cm / lm.width
    sy = sx * p.depth_ratio / lm.depth_ratio
    sz = p.stature_cm / REFERENCE_STATURE_CM
    return float(np.clip(sx, 0.7, 1.4)), float(np.clip(sy, 0.7, 1.5)), float(np.clip(sz, 0.8, 1.2))


def backward_field(p: Patient, lm: Landmarks, ph: Phantom) -> np.ndarray:
    """(3, Gx, Gy, Gz): displacement (voxels) on the coarse grid from the virtual patient to the CT."""
    sp = np.array(ph.spacing)
    gi = np.meshgrid(*lm.grid, indexing="ij")
    start = np.stack([g * s for g, s in zip(gi, sp)], -1) + ph.affine[:3, 3]  # mm
    q = start.copy()
    # The steps after the diaphragm's see the heart, its top and the arch where it moved them.
    centre = moved(lm.heart_centre, p, lm)
    top = moved(np.array([centre[0], centre[1], lm.heart_top]), p, lm)[2]
    arch = None if lm.arch is None else moved(lm.arch, p, lm)
    lm = replace(lm, heart_centre=centre, heart_top=float(top), arch=arch)
    q = _chest_wall(q, p, lm)
    q = _shoulders(q, p, lm)
    q = _spine(q, p, lm)
    q = _mediastinum(q, p, lm)
    q = _heart(q, p, lm)
    q = _diaphragm(q, p, lm)
    return np.moveaxis((q - start) / sp, -1, 0).astype(np.float32)


def warp_for_axis(field: np.ndarray, axis: int, shape: tuple[int, int, int]) -> Warp:
    """The coarse field laid out for the projector stepping along `axis` (project.Warp)."""
    a, b = [x for x in range(3) if x != axis]
    comp = torch.from_numpy(field[[b, a]])  # (2, Gx, Gy, Gz), components in the projector's (b, a) order
    comp = comp.permute(0, 1 + a, 1 + b, 1 + axis)  # (2, Ga, Gb, Gj)
    n2, ga, gb, gj = comp.shape
    planes = F.interpolate(comp.reshape(1, n2 * ga * gb, gj), size=shape[axis], mode="linear", align_corners=True)
    planes = planes.reshape(n2, ga, gb, shape[axis]).permute(3, 0, 1, 2).contiguous()
    return Warp(planes, axis, (float(shape[a] - 1), float(shape[b] - 1)))


# ---- the local changes (backward: the virtual patient's point → where it comes from) -----------

def _domes(p: Patient, lm: Landmarks) -> tuple[dict[str, float], dict[str, float]]:
    """Per side the cranio-caudal stretch between apex and dome, and the dome's new height."""
    f = {"right": p.lung_height_factor}
    new_dome = {"right": lm.apex["right"] - f["right"] * (lm.apex["right"] - lm.dome["right"])}
    new_dome["left"] = new_dome["right"] - p.dome_step_mm
    f["left"] = float(np.clip((lm.apex["left"] - new_dome["left"]) / max(lm.apex["left"] - lm.dome["left"], 1), 0.75, 1.3))
    new_dome["left"] = lm.apex["left"] - f["left"] * (lm.apex["left"] - lm.dome["left"])
    return f, new_dome


def dome_drop(p: Patient, lm: Landmarks) -> float:
    """How far (mm) the lower of the two domes moved down (negative: up): the lungs' bottom moves with it."""
    _, new_dome = _domes(p, lm)
    return max(lm.dome[s] - new_dome[s] for s in ("left", "right"))


def _side_weight(x: np.ndarray | float, lm: Landmarks) -> np.ndarray:
    return 1 / (1 + np.exp(-(np.asarray(x) - lm.mid_x) / 15.0))  # RAS: +x is the patient's right


def moved(point: np.ndarray, p: Patient, lm: Landmarks) -> np.ndarray:
    """Where the diaphragm step moves a CT point (forward), so the later steps find the heart and
    the arch where the stretched chest has put them."""
    f, nd = _domes(p, lm)
    z = {}
    for side in ("left", "right"):
        a, d = lm.apex[side], lm.dome[side]
        zc = point[2]
        z[side] = zc if zc >= a else (a - (a - zc) * f[side] if zc >= d else zc - (d - nd[side]))
    w = float(_side_weight(point[0], lm))
    return np.array([point[0], point[1], w * z["right"] + (1 - w) * z["left"]])


def _diaphragm(q: np.ndarray, p: Patient, lm: Landmarks) -> np.ndarray:
    f, new_dome = _domes(p, lm)
    z = q[..., 2]
    src = {}
    for side in ("left", "right"):
        a, d, nd = lm.apex[side], lm.dome[side], new_dome[side]
        src[side] = np.where(z >= a, z, np.where(z >= nd, a - (a - z) / f[side], z + (d - nd)))
    w = _side_weight(q[..., 0], lm)
    out = q.copy()
    out[..., 2] = w * src["right"] + (1 - w) * src["left"]
    return out


def _heart(q: np.ndarray, p: Patient, lm: Landmarks) -> np.ndarray:
    k = float(np.clip(p.ctr / lm.ctr, 0.75, 1.35))
    scale = np.array([k, k, np.sqrt(k)])
    c = lm.heart_centre
    shift = np.array([-p.heart_shift_mm, 0.0, 0.0])  # toward the patient's left (-x)
    a = np.radians(-p.heart_rotation_deg)  # lifts the apex (left, low) for a more horizontal axis
    rot_inv = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])  # R(a)^-1 in x-z
    rel = q - c - shift
    src = c + (rel @ rot_inv.T) / scale
    rho = np.linalg.norm((q - c - shift) / (lm.heart_radii * np.maximum(scale, 1)), axis=-1)
    w = 1 - _smoothstep((rho - 1.0) / 0.35)  # the lung around the heart gives way; the chest wall stays
    return q + w[..., None] * (src - q)


def _mediastinum(q: np.ndarray, p: Patient, lm: Landmarks) -> np.ndarray:
    out = q.copy()
    x0 = lm.heart_centre[0]
    dx = q[..., 0] - x0
    zw = _smoothstep((q[..., 2] - lm.heart_top + 20) / 30) * (1 - _smoothstep((q[..., 2] - lm.spine[3]) / 30))
    xw = 1 - _smoothstep((np.abs(dx) - 30) / 40)
    out[..., 0] = q[..., 0] + zw * xw * (dx / p.mediastinum_factor - dx)
    if lm.arch is not None and p.aortic_unfolding_mm > 0:
        g = np.exp(-0.5 * np.sum(((q - lm.arch) / np.array([25.0, 30.0, 25.0])) ** 2, -1))
        out[..., 0] += g * p.aortic_unfolding_mm  # content seen further left (-x) and higher
        out[..., 2] -= g * 0.5 * p.aortic_unfolding_mm
    return out


def _spine(q: np.ndarray, p: Patient, lm: Landmarks) -> np.ndarray:
    out = q.copy()
    x0, y0, z_low, z_top = lm.spine
    t = np.clip((q[..., 2] - z_low) / max(z_top - z_low, 1), 0, 1)
    bend = np.sin(np.pi * t)
    gx = np.exp(-0.5 * ((q[..., 0] - x0) / 45.0) ** 2)  # the spine and mediastinum; the ribs follow less
    out[..., 0] -= p.scoliosis_mm * bend * gx  # the curve's convexity toward the right for +mm
    extra = np.radians(p.kyphosis_deg - 35.0)
    sagitta = extra * (z_top - z_low) / 8  # circular arc: sagitta ≈ chord × angle / 8
    out[..., 1] += sagitta * bend  # the upper thorax moved backward (-y) for more kyphosis
    return out


def _cage(q: np.ndarray, lm: Landmarks):
    """Per coarse-grid point (its level's rib cage, the grid's last axis): the cage's centre
    (cx, cy), the offset (dx, dy) from it, the cage's elliptical radius rho there (1 on the cage)
    and the soft-tissue band outside it (mm)."""
    cx, cy, ax, ay, band = (lm.ribcage[:, i][None, None, :] for i in range(5))
    dx, dy = q[..., 0] - cx, q[..., 1] - cy
    return cx, cy, dx, dy, np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2), band


def _outside_cage(q: np.ndarray, lm: Landmarks) -> np.ndarray:
    """0 inside the rib cage, rising to 1 a centimetre or two outside it: the shoulder girdle
    moves over the chest, never the lungs with it."""
    return _smoothstep((_cage(q, lm)[4] - 1.0) / 0.12)


def _shoulders(q: np.ndarray, p: Patient, lm: Landmarks) -> np.ndarray:
    out = q.copy()
    outside = _outside_cage(q, lm)
    above = _smoothstep((q[..., 2] - max(lm.apex.values()) + 10) / 20)  # above the apices the girdle moves whole
    free = np.maximum(outside, above)
    out[..., 2] -= p.shoulder_raise_mm * lm.girdle * free
    side = np.sign(q[..., 0] - lm.spine[0])
    out[..., 0] -= side * p.scapula_out_mm * lm.scapulae * outside
    return out


def _chest_wall(q: np.ndarray, p: Patient, lm: Landmarks) -> np.ndarray:
    """Soft tissue outside the rib cage stretched radially (axial plane) by `t` mm; beyond the
    skin everything moves out by `t`."""
    t = p.chest_wall_mm - 12.0  # the CT's own chest wall is taken as 12 mm of it
    cx, cy, dx, dy, rho, band = _cage(q, lm)
    r = np.sqrt(dx**2 + dy**2) + 1e-6
    r_rib = r / (rho + 1e-9)
    e = r - r_rib
    t = max(t, -0.45 * float(np.min(band)))
    e_src = np.where(e <= 0, e, np.where(e < band + t, e * band / (band + t), e - t))
    f = (r_rib + e_src) / r
    out = q.copy()
    out[..., 0] = cx + dx * f
    out[..., 1] = cy + dy * f
    return out
