"""Rib fracture: a break through one rib of the labelmap, acute or healing.

The rib is drawn from `rib_<side>_<n>` (middle ribs more often: 4-9 carry most fractures). The
site is one of its voxels on the posterior arc (posterior half, 35-92 % of its reach from
the midline; posterior ribs show best on a frontal film) that projects over aerated lung (not over the heart or below a dome), where the rib
runs across the beam (|tangent_y| < 0.6 from a local principal-component fit): a gap whose
plane faces the detector would be invisible on a frontal film.
- Acute (65 %): voxels of the (one-voxel dilated) rib within g/2 (g = 4-6 mm) of the plane
  through the site normal to the rib become soft tissue; with probability 0.75 the fragment
  beyond is displaced 4-7 mm across the rib in the image plane (a step-off), the shift fading
  over 25 mm. 70 % carry an extrapleural haematoma, a blood lens (4-9 mm thick, 24-44 mm
  across) bulging from the chest wall into the lung at the site.
- Healing (35 %): a fusiform callus cuff of new bone (~800 HU, 3.5-6 mm thick, 16-24 mm long).
Mask and box: the fracture site, the rib (and callus) within 6 mm of the break.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .ct import BONE_GAIN, MU_WATER
from .findings import Inserter, Insertion, PlacementError, hu_to_mu, sample, smoothstep

BONE_MU = MU_WATER * (1.15 + BONE_GAIN * (800 - 150) / 1000)  # new bone, ~800 HU in ct.py's bone model
RIB_WEIGHT = {1: 0.3, 2: 0.6, 3: 1.0, 4: 1.4, 5: 1.6, 6: 1.6, 7: 1.5, 8: 1.3, 9: 1.0, 10: 0.6, 11: 0.3, 12: 0.2}
SITE_MM = 6.0


def midline_x(ins: Inserter) -> float:
    """x (voxels) of the body's midline: the vertebrae, else the trachea, else between the lungs."""
    def make():
        for names in (tuple(n for n in ins.ph.structures if n.startswith("vertebrae_T")), ("trachea",)):
            r = ins.region(names) if names else None
            if r is not None:
                return float(np.argwhere(r.mask)[:, 0].mean() + r.origin[0])
        return float((ins.lung("left").stop[0] + ins.lung("right").origin[0]) / 2)
    return ins.cached("midline", make)


def rib_fracture(ins: Inserter, scene, side: str, rng: np.random.Generator) -> Insertion:
    ribs = [n for n in RIB_WEIGHT if ins.has(f"rib_{side}_{n}")]
    if not ribs:
        raise PlacementError(f"the labelmap has no {side} ribs to fracture")
    w = np.array([RIB_WEIGHT[n] for n in ribs])
    for n in rng.choice(ribs, size=len(ribs), replace=False, p=w / w.sum()):
        site = _site(ins, f"rib_{side}_{n}", side, rng)
        if site is not None:
            return _break(ins, f"rib_{side}_{n}", side, *site, rng)
    raise PlacementError(f"no {side} rib crosses the lung field where a fracture would show")


def _site(ins: Inserter, name: str, side: str, rng: np.random.Generator):
    """(site voxel, unit tangent in mm space) on the rib, or None: on the posterolateral or
    anterolateral arc, over aerated lung seen from the front (not over the heart or a dome)."""
    r = ins.region((name,))
    idx = np.argwhere(r.mask) + r.origin
    sp = ins.spacing
    lateral = np.abs(idx[:, 0] - midline_x(ins)) * sp[0]
    lung = ins.lung(side)
    rel = idx - lung.origin
    inside = np.all((rel >= 0) & (rel < lung.mask.shape), axis=1)
    view = ins.in_view(side)[:, 0, :]
    seen = np.zeros(len(idx), bool)
    seen[inside] = view[rel[inside, 0], rel[inside, 2]]
    heart = ins.region(("heart",))
    if heart is not None:  # not behind the cardiac shadow either
        hr = idx - heart.origin
        within = np.all((hr >= 0) & (hr < heart.mask.shape), axis=1)
        shadow = ins.cached("heart_shadow", lambda: heart.mask.any(axis=1))
        seen[within] &= ~shadow[hr[within, 0], hr[within, 2]]
    back = idx[:, 1] < np.median(idx[:, 1])  # posterior half: posterior ribs show best on a frontal film
    cand = idx[seen & back & (lateral > 0.35 * lateral.max()) & (lateral < 0.92 * lateral.max())]
    for k in rng.permutation(len(cand))[:40]:
        c = cand[k]
        near = idx[np.linalg.norm((idx - c) * sp, axis=1) < 12] * sp
        if len(near) < 10:
            continue
        t = np.linalg.eigh(np.cov((near - near.mean(0)).T))[1][:, -1]
        if abs(t[1]) < 0.6:
            return c.astype(np.float64), t
    return None


def _break(ins: Inserter, name: str, side: str, c: np.ndarray, t: np.ndarray, rng: np.random.Generator) -> Insertion:
    sp = ins.spacing
    origin, stop = ins.clip_box(c - 34 / sp, c + 34 / sp + 1)
    box = tuple(slice(a, b) for a, b in zip(origin, stop))
    rib = ndi.binary_dilation(ins.ph.labels.numpy()[box] == ins.ph.structures[name], iterations=1)
    mu0 = ins.ph.mu.numpy()[box]
    rel = ins.offsets_mm(origin, stop, c)
    s = rel[0] * t[0] + rel[1] * t[1] + rel[2] * t[2]  # mm along the rib from the site
    s, dist = np.broadcast_arrays(s, np.sqrt(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2))
    meta = {"rib": name, "site_mm": ins.ph.to_mm(c).round(1).tolist()}
    if rng.random() < 0.35:
        occ, mu, label = _callus(ins, rib, mu0, s, rng, meta)
    else:
        occ, mu, label = _acute(ins, rib, mu0, s, dist, t, rng, meta)
        _haematoma(ins, side, origin, c, occ, mu, rng, meta)
    return ins.finish("Fracture", side, origin, occ, mu, meta, label=label)


def _acute(ins: Inserter, rib, mu0, s, dist, t, rng, meta):
    """A gap through the rib, the fragment beyond it (s > 0) often stepped off across the rib."""
    sp = ins.spacing
    gap = float(rng.uniform(4.0, 6.0))
    shift = float(rng.uniform(4.0, 7.0)) if rng.random() < 0.75 else 0.0
    across = np.cross(t, [0.0, 1.0, 0.0])  # perpendicular to the rib, in the image plane
    across /= max(np.linalg.norm(across), 1e-6)
    delta = across * shift * rng.choice([-1.0, 1.0])  # mm
    # Each voxel of the fragment takes what lay `delta` behind it, the shift fading over 25 mm.
    fade = np.clip(1 - (s - gap / 2) / 25, 0, 1) * (s > 0)
    ii = np.stack(np.meshgrid(*[np.arange(k, dtype=np.float64) for k in rib.shape], indexing="ij"), -1)
    moved, bone = sample(np.stack([rib.astype(np.float32), rib * mu0]), ii - fade[..., None] * (delta / sp))
    bone = bone / np.maximum(moved, 1e-3)
    cut = smoothstep((gap / 2 - np.abs(s)) / sp.min() + 0.5)
    kept = moved * (1 - cut)
    fill = np.where(rib, hu_to_mu(40.0), mu0)  # where bone left: haematoma in the rib's bed
    mu = kept * bone + (1 - kept) * fill
    occ = ((rib | (moved > 0.02)) & ((cut > 0) | (fade > 0)) & (dist < 40)).astype(np.float32)
    label = (rib | (moved > 0.5)) & (np.abs(s) < SITE_MM) & (dist < 15)
    meta.update({"kind": "acute", "gap_mm": round(gap, 1), "displacement_mm": round(shift, 1)})
    return occ, mu.astype(np.float32), label


def _callus(ins: Inserter, rib, mu0, s, rng, meta):
    """A healing fracture: a fusiform cuff of new bone around the rib at the site."""
    half, cuff = float(rng.uniform(8, 12)), float(rng.uniform(3.5, 6.0))
    outside = ndi.distance_transform_edt(~rib, sampling=ins.spacing)
    reach = cuff * np.clip(1 - (s / half) ** 2, 0, 1)  # thickest at the site
    occ = (smoothstep((reach - outside) / ins.spacing.min() + 0.5) * (outside > 0)).astype(np.float32)
    mu = np.full(occ.shape, BONE_MU, np.float32)
    label = (rib | (occ >= 0.5)) & (np.abs(s) < max(SITE_MM, half))
    meta.update({"kind": "healing (callus)", "callus_mm": round(cuff, 1), "length_mm": round(2 * half)})
    return occ, mu, label


def _haematoma(ins: Inserter, side: str, origin, c, occ, mu, rng, meta) -> None:
    """Often with an acute fracture: an extrapleural haematoma, a lens of blood bulging from the
    chest wall into the lung at the site (visible in the lung field when the rib break is not)."""
    if rng.random() >= 0.7:
        return
    lung = ins.lung(side)
    lo = [max(a, b) for a, b in zip(origin, lung.origin)]
    hi = [min(a + n, b) for a, n, b in zip(origin, occ.shape, lung.stop)]
    if any(h <= low for low, h in zip(lo, hi)):
        return
    thick, half = float(rng.uniform(4, 9)), float(rng.uniform(12, 22))
    here = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))
    there = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, lung.origin))
    rel = ins.offsets_mm(lo, hi, c)
    r = np.sqrt(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2)
    depth = ins.pleural_mm(side)[there]
    lens = smoothstep((thick * np.clip(1 - (r / half) ** 2, 0, 1) - depth) / ins.spacing.min() + 0.5) * lung.mask[there]
    blood = hu_to_mu(45.0)
    mu[here] = np.where(lens > occ[here], blood, mu[here])
    occ[here] = np.maximum(occ[here], lens)
    meta["haematoma_mm"] = round(thick, 1)
