"""Enlarged cardiomediastinum: a widened superior mediastinum.

The mediastinum is what lies between the two lungs. Widening it (vascular unfolding, nodes,
fat, haematoma) pushes each lung's medial border outward: lung voxels within `W × profile(z)`
of the lung's medial edge, in the same (y, z) row, become soft tissue. The profile peaks at the
aortic arch (the top of the aorta label; mid-way between the heart and the apex without one)
and fades toward the heart and the thoracic inlet; the posterior rows (paravertebral) are left
alone, and the right side (SVC) widens a little less than the left (aorta) on average.
Severity = W, the widening per side. Mask: the superior mediastinum between the new lung
borders, over the height where the profile is at least 0.3.
"""

from __future__ import annotations

import numpy as np

from .findings import Inserter, Insertion, PlacementError, hu_to_mu, smoothstep

WIDENING_MM = {"small": (7, 12), "moderate": (12, 20), "large": (20, 32)}


def medial_mm(ins: Inserter, side: str) -> np.ndarray:
    """Over the lung crop: distance (mm) along x from the lung's medial edge in the same (y, z)
    row (inf in rows without lung)."""
    def make():
        lung = ins.lung(side)
        m = lung.mask
        n = m.shape[0]
        first = np.where(m.any(0), m.argmax(0), n)  # lowest x of lung per row
        last = np.where(m.any(0), n - 1 - m[::-1].argmax(0), -1)
        x = np.arange(n, dtype=np.float32)[:, None, None]
        d = (x - first[None]) if side == "right" else (last[None] - x)  # the right lung is +x
        return np.where(m.any(0)[None], d * ins.spacing[0], np.inf).astype(np.float32)
    return ins.cached(("medial", side), make)


def widened_mediastinum(ins: Inserter, scene, severity: str | None, rng: np.random.Generator) -> Insertion:
    heart = ins.region(("heart",))
    if heart is None:
        raise PlacementError("the labelmap has no heart to stand the mediastinum on")
    width = float(rng.uniform(*WIDENING_MM[severity or "moderate"]))
    asym = {"right": float(rng.uniform(0.6, 1.0)), "left": float(rng.uniform(0.8, 1.2))}
    dz = ins.spacing[2]
    z_heart = heart.stop[2] - 1 - 2  # the top of the heart (the region has a 2-voxel margin)
    z_apex = max(ins.lung(s).stop[2] - 3 for s in ("left", "right"))
    aorta = ins.region(("aorta",))
    z_peak = aorta.stop[2] - 3 - 10 / dz if aorta is not None else z_heart + 0.45 * (z_apex - z_heart)
    z_peak = float(np.clip(z_peak, z_heart + 10 / dz, z_apex - 15 / dz))

    def profile(z: np.ndarray) -> np.ndarray:
        up = smoothstep((z - (z_heart - 15 / dz)) / max(z_peak - z_heart + 15 / dz, 1))
        down = smoothstep(((z_apex - 15 / dz) - z) / max(z_apex - 15 / dz - z_peak, 1))
        return np.minimum(up, down)

    left, right = ins.lung("left"), ins.lung("right")
    lo = np.minimum(left.origin, right.origin)
    hi = np.maximum(left.stop, right.stop)
    occ = np.zeros(tuple(hi - lo), np.float32)
    for side, lung in (("left", left), ("right", right)):
        aer = scene.aerated(side)
        z = np.arange(lung.origin[2], lung.stop[2], dtype=np.float32)[None, None, :]
        _, yf, _ = ins.lung_frame(side)
        w = width * asym[side] * profile(z) * smoothstep((yf - 0.2) / 0.2)
        o = smoothstep((w - medial_mm(ins, side)) / ins.spacing[0] + 0.5) * aer.mask * (w > 0.5)
        sl = tuple(slice(a - b, c - b) for a, b, c in zip(lung.origin, lo, lung.stop))
        occ[sl] = np.maximum(occ[sl], o)
    # The label: between the (new) lung borders, row by row, over the widened height.
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    air_l = ins.ph.lungs["left"][box] & (occ < 0.5)
    air_r = ins.ph.lungs["right"][box] & (occ < 0.5)
    n = occ.shape[0]
    x = np.arange(n)[:, None, None]
    left_edge = np.where(air_l.any(0), n - 1 - air_l[::-1].argmax(0), -1)[None]  # left lung is -x
    right_edge = np.where(air_r.any(0), air_r.argmax(0), -1)[None]
    between = (x > left_edge) & (x < right_edge) & (left_edge >= 0) & (right_edge >= 0)
    z = np.arange(lo[2], hi[2], dtype=np.float32)[None, None, :]
    label = (between & (profile(z) >= 0.3)) | (occ >= 0.5)
    if occ.max() < 0.5:
        raise PlacementError("no lung along the superior mediastinum to displace")
    meta = {"widening_mm": round(width, 1), "right_left": [round(width * asym["right"], 1), round(width * asym["left"], 1)]}
    return ins.finish("Enlarged Cardiomediastinum", None, tuple(int(v) for v in lo), occ, hu_to_mu(35.0), meta, label=label,
                      focal=False)
