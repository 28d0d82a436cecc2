"""Lung parenchyma: airspace opacities (consolidation, pneumonia, lung opacity), atelectasis, edema.

All are built inside the side's lung crop from the labelmap's lobes, in the lung that is still
aerated (a pneumothorax's air rim excluded).

- Airspace opacity: alveolar air replaced by fluid/cells (~30 HU). Each focus grows from a
  seed voxel: a voxel is filled when its (anisotropic) distance to the seed plus a smooth random
  field is below the quantile that fills the requested fraction of the lobe. Consolidation is
  one dense lobar focus cut sharply at the fissures; pneumonia several patchier foci; lung
  opacity one ill-defined, less dense blob that ignores fissures. Air bronchograms: a branching
  tree of air tubes from the lobe's hilar end toward the focus stays air inside the opacity.
- Atelectasis: lobar collapse = the lobe scaled toward its hilar/mediastinal anchor (upper lobes
  superomedially, lower lobes posteromedially to the base, the middle lobe toward the right
  heart border); the same tissue in a smaller volume, nearly airless. Small = plate-like bands.
- Edema: perihilar haze fading with distance from the hilum and sparing the periphery ("bat
  wing"), plus Kerley B lines: thin horizontal septal plates reaching in from the lateral
  pleura at the bases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .findings import (
    Inserter,
    Insertion,
    PlacementError,
    Region,
        hu_to_mu,
    sample,
    smoothstep,
    tube,
)

CONSOLIDATION_HU = 30.0
EDEMA_HU = 15.0


@dataclass(frozen=True)
class Airspace:
    foci: dict  # severity → (min, max) number of foci
    extent: dict  # severity → fraction of the lobe (of the lung for non-lobar) per focus
    density: tuple[float, float]  # occupancy inside the focus (1 = airless)
    patchy: float  # weight of the random field against the distance from the seed
    edge_mm: float  # width of the border
    texture: float  # fine-scale density variation inside
    lobar: bool  # cut at the fissures
    bronchi: int  # generations of the air-bronchogram tree (0: none)


AIRSPACE = {
    "Consolidation": Airspace({"small": (1, 1), "moderate": (1, 1), "large": (1, 1)},
                              {"small": (0.25, 0.4), "moderate": (0.5, 0.7), "large": (0.85, 1.0)},
                              (0.82, 0.95), 0.15, 3.0, 0.1, True, 5),
    "Pneumonia": Airspace({"small": (1, 2), "moderate": (2, 3), "large": (3, 4)},
                          {"small": (0.06, 0.12), "moderate": (0.1, 0.18), "large": (0.16, 0.3)},
                          (0.65, 0.85), 0.5, 6.0, 0.3, True, 4),
    "Lung Opacity": Airspace({"small": (1, 1), "moderate": (1, 1), "large": (1, 1)},
                             {"small": (0.03, 0.06), "moderate": (0.07, 0.12), "large": (0.13, 0.22)},
                             (0.65, 0.9), 0.2, 10.0, 0.2, False, 0),
}
COLLAPSE = {"moderate": (0.4, 0.55), "large": (0.15, 0.3)}  # remaining fraction of the lobe's volume
LOBE_WEIGHT = {"lower": 0.45, "upper": 0.3, "middle": 0.25}  # how often each lobe collapses
EDEMA = {  # peak occupancy, reach from the hilum (mm), Kerley B lines per side
    "small": ((0.2, 0.3), (40, 55), (4, 7)),
    "moderate": ((0.45, 0.6), (50, 65), (6, 10)),
    "large": ((0.65, 0.85), (60, 80), (7, 12)),
}


def lobe_masks(ins: Inserter, side: str) -> dict[str, np.ndarray]:
    """Each lobe of the side as a mask over the side's lung crop."""
    def make():
        lung = ins.lung(side)
        labels = ins.ph.labels.numpy()[lung.box]
        return {n: labels == ins.ph.structures[n] for n in ins.lobes(side)}
    return ins.cached(("lobes", side), make)


def pick_lobe(ins: Inserter, scene, side: str, rng: np.random.Generator, weights: dict | None = None) -> str:
    """A lobe of the side, preferring lobes no earlier finding of this job has taken."""
    lobes = ins.lobes(side)
    if not lobes:
        raise PlacementError(f"the labelmap has no {side} lung lobes")
    free = [n for n in lobes if n not in scene.used_lobes] or lobes
    # By clinical frequency when given, else by volume (a bigger lobe catches more).
    w = np.array([weights[_kind(n)] if weights else lobe_masks(ins, side)[n].sum() for n in free], float)
    name = free[int(rng.choice(len(free), p=w / w.sum()))]
    scene.used_lobes.add(name)
    return name


def _kind(lobe: str) -> str:
    return next((k for k in ("upper", "middle", "lower") if k in lobe), "lower")


def _sub(mask: np.ndarray, margin: int = 2) -> tuple[slice, slice, slice]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


# ---- airspace opacities ----------------------------------------------------------------------

def airspace(ins: Inserter, scene, finding: str, side: str, severity: str | None, rng: np.random.Generator) -> Insertion:
    p = AIRSPACE[finding]
    sev = severity or "moderate"
    aer = scene.aerated(side)
    depth = scene.pleural_depth(side)
    occ = np.zeros(aer.mask.shape, np.float32)
    extent = np.zeros(aer.mask.shape, np.float32)  # the foci before their inner texture: the label
    tubes = np.zeros(aer.mask.shape, np.float32)
    lobes = []
    n_foci = int(rng.integers(p.foci[sev][0], p.foci[sev][1] + 1))
    for _ in range(n_foci):
        if p.lobar:
            lobe = pick_lobe(ins, scene, side, rng)
            allowed = lobe_masks(ins, side)[lobe] & aer.mask
            lobes.append(lobe)
        else:
            allowed = aer.mask
        if allowed.sum() < 50:
            raise PlacementError(f"no aerated lung left for {finding.lower()} on the {side}")
        fraction = float(rng.uniform(*p.extent[sev]))
        sub = _sub(allowed)
        seen = np.broadcast_to(ins.in_view(side), aer.mask.shape)[sub]
        shape, focus = _focus(ins, allowed[sub], depth[sub], seen, fraction, p, rng)
        occ[sub] = np.maximum(occ[sub], focus)
        extent[sub] = np.maximum(extent[sub], shape)
        if p.bronchi:  # segmental bronchi from the lobe's hilar end toward points of the focus
            root = _nearest(allowed, ins.hilum(side) - aer.origin) + aer.origin
            filled = np.argwhere(shape >= 0.5) + [s.start for s in sub] + np.array(aer.origin)
            segs = []
            for k in rng.integers(len(filled), size=3) if len(filled) else []:
                segs += bronchial_tree(root, filled[k].astype(float), p.bronchi, ins.spacing, rng)
            tubes = np.maximum(tubes, tube(ins.spacing, aer.origin, aer.mask.shape, segs))
    hu = CONSOLIDATION_HU + rng.normal(0, 5)
    mu = hu_to_mu(hu) * (1 - tubes)  # air bronchograms: the airways stay air inside the opacity
    label = extent >= 0.5
    meta = {"lobes": sorted(set(lobes)), "foci": n_foci,
            "volume_ml": round(float(label.sum() * np.prod(ins.spacing) / 1000))}
    # Patchy foci do not push later lesions away (a nodule may sit in a pneumonia); lobar ones do.
    return ins.finish(finding, side, aer.origin, occ, mu, meta, label=label, focal=finding == "Consolidation")


def _focus(ins: Inserter, allowed: np.ndarray, depth: np.ndarray, seen: np.ndarray, fraction: float, p: Airspace,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One focus filling `fraction` of `allowed`: (its extent, its occupancy) over the sub-box."""
    inner = np.argwhere(allowed & (depth >= 6) & seen)  # not the recesses hidden under the domes
    cand = inner if len(inner) else np.argwhere(allowed)
    seed = cand[rng.integers(len(cand))]
    x, y, z = ins.axes_mm((0, 0, 0), allowed.shape)
    c = seed * ins.spacing
    ax = rng.uniform(0.75, 1.3, 3)
    dist = np.sqrt(((x - c[0]) / ax[0]) ** 2 + ((y - c[1]) / ax[1]) ** 2 + ((z - c[2]) / ax[2]) ** 2)
    scale = float((allowed.sum() * np.prod(ins.spacing)) ** (1 / 3))  # the lobe's size, mm
    score = dist / scale + p.patchy * ins.smooth_noise(allowed.shape, 14.0, rng) * 0.25
    t = float(np.quantile(score[allowed], min(fraction, 1.0)))
    occ = smoothstep((t - score) * scale / p.edge_mm + 0.5) * allowed
    density = rng.uniform(*p.density) * np.clip(1 + p.texture * ins.smooth_noise(allowed.shape, 5.0, rng), 0.2, 1.2)
    return occ.astype(np.float32), np.minimum(occ * density, 1.0).astype(np.float32)


def _nearest(mask: np.ndarray, point: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask)
    return idx[np.argmin(((idx - point) ** 2).sum(1))].astype(np.float64)


def bronchial_tree(root: np.ndarray, target: np.ndarray, generations: int, spacing: np.ndarray,
                   rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """A random dichotomous airway tree from `root` toward `target` (voxel positions): segments
    (a, b, radius mm). Branches favour the coronal plane, where a frontal film shows them as
    lines; radius 3.5 mm at the root, x0.82 per generation (segmental to subsegmental)."""
    sp = np.asarray(spacing, float)
    r0, t0 = root * sp, target * sp
    span = max(float(np.linalg.norm(t0 - r0)), 15.0)
    d0 = (t0 - r0) / span
    out: list[tuple[np.ndarray, np.ndarray, float]] = []
    stack = [(r0, d0, max(12.0, 0.35 * span), 3.5, 0)]
    while stack:
        p, d, length, radius, g = stack.pop()
        q = p + d * length
        out.append((p / sp, q / sp, radius))
        if g + 1 >= generations:
            continue
        v = rng.normal(size=3)
        v[1] *= 0.2
        u = v - (v @ d) * d
        u /= max(np.linalg.norm(u), 1e-6)
        for sign in (1.0, -1.0):
            a = np.radians(rng.uniform(18, 38))
            nd = np.cos(a) * d + np.sin(a) * sign * u
            nd[1] *= 0.6
            nd /= np.linalg.norm(nd)
            stack.append((q, nd, length * rng.uniform(0.7, 0.9), radius * 0.82, g + 1))
    return out


# ---- atelectasis ----------------------------------------------------------------------------

def atelectasis(ins: Inserter, scene, side: str, severity: str | None, rng: np.random.Generator) -> Insertion:
    sev = severity or "moderate"
    if sev == "small":
        return _plates(ins, scene, side, rng)
    lobe = pick_lobe(ins, scene, side, rng, LOBE_WEIGHT)
    lung = ins.lung(side)
    aer = scene.aerated(side)
    mask = lobe_masks(ins, side)[lobe]
    sub = _sub(mask)
    lm = mask[sub]
    idx = np.argwhere(lm)
    lo, hi = idx.min(0).astype(float), idx.max(0).astype(float)
    mid = (lo + hi) / 2
    medial_x = lo[0] if side == "right" else hi[0]  # right lung is +x, so its medial side is low x
    lateral_x = hi[0] if side == "right" else lo[0]
    kind = _kind(lobe)
    v = float(rng.uniform(*COLLAPSE[sev]))
    # Anchor (where the collapsed lobe stays attached) and per-axis scales (product = v).
    ax = medial_x + 0.1 * (lateral_x - medial_x)
    if kind == "upper":
        anchor, s = np.array([ax, mid[1], lo[2] + 0.85 * (hi[2] - lo[2])]), np.array([v ** 0.45, v ** 0.25, v ** 0.3])
    elif kind == "middle":
        anchor, s = np.array([ax, mid[1], mid[2]]), np.array([v ** 0.3, v ** 0.3, v ** 0.4])
    else:
        anchor = np.array([ax, lo[1] + 0.25 * (hi[1] - lo[1]), lo[2] + 0.08 * (hi[2] - lo[2])])
        s = np.array([v ** 0.4, v ** 0.3, v ** 0.3])
    ii = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in lm.shape], indexing="ij"), -1)
    src = anchor + (ii - anchor) / s
    mu0 = ins.ph.mu.numpy()[lung.box][sub]
    lobe_src, mass = sample(np.stack([lm.astype(np.float32), lm * mu0]), src)
    occ = np.clip(lobe_src, 0, 1) * aer.mask[sub]
    tissue = mass / np.maximum(lobe_src, 1e-3) / np.prod(s)  # the same tissue in a smaller volume
    airless = min(0.95, (1 - v) * 1.1)
    mu = np.minimum((1 - airless) * tissue + airless * hu_to_mu(40.0), hu_to_mu(60.0))
    if occ.max() < 0.5:
        raise PlacementError(f"no aerated {lobe.replace('_', ' ')} left to collapse")
    origin = tuple(int(o + s_.start) for o, s_ in zip(lung.origin, sub))
    meta = {"lobe": lobe, "kind": "lobar collapse", "volume_fraction": round(v, 2)}
    return ins.finish("Atelectasis", side, origin, occ.astype(np.float32), mu, meta)


def _plates(ins: Inserter, scene, side: str, rng: np.random.Generator) -> Insertion:
    """Plate-like (discoid) atelectasis: 1-2 thin horizontal discs in the lower zone, reaching
    toward the pleura, which project as linear bands."""
    aer = scene.aerated(side)
    depth = scene.pleural_depth(side)
    lat, _, _ = ins.lung_frame(side)
    hz = (ins.hilum(side)[2] - aer.origin[2]) * ins.spacing[2]
    x, y, z = ins.axes_mm((0, 0, 0), aer.mask.shape)
    cand = np.argwhere(aer.mask & (depth >= 6) & (depth <= 25) & (lat > 0.35) & (z < hz - 15) & ins.in_view(side))
    if len(cand) == 0:
        raise PlacementError(f"no lower-zone lung for plate atelectasis on the {side}")
    occ = np.zeros(aer.mask.shape, np.float32)
    lobes = lobe_masks(ins, side)
    for _ in range(int(rng.integers(1, 3))):
        v = cand[rng.integers(len(cand))]
        scene.used_lobes.update(n for n, m in lobes.items() if m[tuple(v)])  # later lobar findings go elsewhere
        c = v * ins.spacing
        n = np.array([rng.normal(0, 0.12), rng.normal(0, 0.08), 1.0])
        n /= np.linalg.norm(n)
        radius, thick = rng.uniform(15, 28), rng.uniform(3, 6)
        h = (x - c[0]) * n[0] + (y - c[1]) * n[1] + (z - c[2]) * n[2]
        radial = np.sqrt(np.maximum((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 - h ** 2, 0))
        disc = smoothstep((thick / 2 - np.abs(h)) / ins.spacing[2] + 0.5) * smoothstep((radius - radial) / 5.0)
        occ = np.maximum(occ, disc * aer.mask)
    mu = hu_to_mu(35.0)
    return ins.finish("Atelectasis", side, aer.origin, occ, mu, {"kind": "plate-like"})


# ---- edema ------------------------------------------------------------------------------------

def edema(ins: Inserter, scene, side: str, severity: str | None, rng: np.random.Generator) -> Insertion:
    (p_lo, p_hi), (r_lo, r_hi), (k_lo, k_hi) = EDEMA[severity or "moderate"]
    peak, reach = float(rng.uniform(p_lo, p_hi)), float(rng.uniform(r_lo, r_hi))
    aer = scene.aerated(side)
    x, y, z = ins.axes_mm((0, 0, 0), aer.mask.shape)
    h = (ins.hilum(side) - aer.origin) * ins.spacing
    dist = np.sqrt((x - h[0]) ** 2 + (y - h[1]) ** 2 + ((z - h[2]) / 1.25) ** 2)  # a little taller than wide
    lat = ins.lung_frame(side)[0]
    # Central, sparing the outer third of the lung (measured from the mediastinum, since the
    # hilum itself lies on the lung's medial surface).
    wing = np.exp(-((dist / reach) ** 1.5)) * (1 - smoothstep((lat - 0.55) / 0.35))
    haze = peak * wing * np.clip(1 + 0.3 * ins.smooth_noise(aer.mask.shape, 10.0, rng), 0.3, 1.6)
    haze = np.where(wing > 0.03, haze, 0) * aer.mask
    n_lines = int(rng.integers(k_lo, k_hi + 1))
    lines = _kerley(ins, aer, side, n_lines, rng)
    occ = np.maximum(haze, lines).astype(np.float32)
    label = ((wing >= 0.4) & aer.mask) | (lines >= 0.3)
    meta = {"peak_occupancy": round(peak, 2), "reach_mm": round(reach), "kerley_lines": n_lines}
    return ins.finish("Edema", side, aer.origin, occ, hu_to_mu(EDEMA_HU), meta, label=label, focal=False)


def _kerley(ins: Inserter, aer: Region, side: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Kerley B lines: horizontal plates 1-2 mm thick, 8-18 mm long, perpendicular to the lateral
    pleura in the lowest 6 cm above the costophrenic angle."""
    out = np.zeros(aer.mask.shape, np.float32)
    lat, _, _ = ins.lung_frame(side)
    sp = ins.spacing
    zs = np.nonzero((aer.mask & (lat > 0.7) & ins.in_view(side)).any(axis=(0, 1)))[0]
    if len(zs) == 0:
        return out
    xs = np.arange(aer.mask.shape[0])[:, None]
    zc = np.arange(aer.mask.shape[2]) * sp[2]
    ys = np.arange(aer.mask.shape[1]) * sp[1]

    def lateral_edge(k: int) -> np.ndarray:  # lateral-most lung x per y row of slice k (-1: none)
        sl = aer.mask[:, :, k]
        edge = (xs * sl).max(0) if side == "right" else np.where(sl, xs, 10**6).min(0)
        return np.where(sl.any(0), edge, -1)

    for _ in range(n):
        zk, thick = zs.min() * sp[2] + rng.uniform(4, 60), rng.uniform(1.0, 2.0)
        width, length, dy = rng.uniform(12, 25), rng.uniform(8, 18), rng.uniform(-12, 12)
        k0 = int(np.clip(round(zk / sp[2]), 0, len(zc) - 1))
        edge = lateral_edge(k0)
        rows = np.nonzero(edge >= 0)[0]
        if len(rows) == 0:
            continue
        yk = rows[edge[rows].argmax() if side == "right" else edge[rows].argmin()] * sp[1] + dy
        # Each slice holds the part of the plate within it (area-preserving at any z spacing).
        frac = np.clip(np.minimum(zc + sp[2] / 2, zk + thick / 2) - np.maximum(zc - sp[2] / 2, zk - thick / 2), 0, None) / sp[2]
        for k in np.nonzero(frac > 0)[0]:
            edge = lateral_edge(k)
            near = (np.abs(xs - edge[None, :]) * sp[0] < length) & (np.abs(ys - yk) < width / 2)[None, :] & (edge >= 0)
            out[:, :, k] = np.maximum(out[:, :, k], frac[k] * (near & aer.mask[:, :, k]))
    return out
