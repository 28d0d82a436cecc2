"""Support devices: endotracheal tube, central venous catheter, pacemaker, routed along the labelmap.

Paths are smooth curves (centripetal Catmull-Rom) through anatomical waypoints, drawn as tubes
with partial-volume edges (so a 2 mm lead in 1.4 mm voxels keeps its line integral):
- ETT: PVC tube (10.5 mm outer, 7.5 mm inner, air lumen) with a barium stripe, down the
  trachea label's centreline to a tip 3-6 cm above the carina, continuing up out of the neck.
- CVC: 7 Fr barium-loaded catheter from an internal jugular (lateral to the common carotid) or
  infraclavicular subclavian puncture (antero-inferior to the subclavian artery), through the
  brachiocephalic vein into the superior vena cava, tip from the lower SVC to the cavo-atrial
  junction.
- Pacemaker: titanium generator with an epoxy header in the infraclavicular subcutaneous fat
  (8-10 mm under the skin), a slack loop over the pocket, lead(s) via the subclavian and
  brachiocephalic veins and the SVC to the right-ventricular apex (and the right-atrial
  appendage for dual-chamber), moved with the heart when it is enlarged.
Attenuation at ~60 keV (1/mm): PVC 0.03, barium-loaded plastic 0.12-0.3, lead coils 0.35,
generator 0.1 (titanium can over battery and circuit).
Each device is drawn from the job's seed (ETT 45 %, CVC 60 %, pacemaker 35 %, at least one),
unless the caller names them: `DRRBackend.render(job, device_kinds=("ett", "cvc"))` (tests and
the contact sheet do; a job row has no such field). Mask and box: one per device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from .ct import MU_WATER
from .findings import Inserter, Insertion, PlacementError, smoothstep, tube
from .findings_fracture import midline_x

KINDS = ("ett", "cvc", "pacemaker")
CHANCE = {"ett": 0.45, "cvc": 0.6, "pacemaker": 0.35}
MU = {"pvc": 0.035, "stripe": 0.4, "catheter": 0.1, "lead": 0.22, "electrode": 0.35, "can": 0.2, "header": 0.04}


def support_devices(ins: Inserter, scene, kinds: Sequence[str] | None, rng: np.random.Generator) -> list[Insertion]:
    """The devices named in `kinds` (of KINDS), else drawn: each with its CHANCE, at least one."""
    makers = {"ett": _ett, "cvc": _cvc, "pacemaker": _pacemaker}
    if kinds:
        bad = [k for k in kinds if k not in makers]
        if bad:
            raise PlacementError(f"unknown support device {', '.join(bad)}; known: {', '.join(KINDS)}")
    else:
        kinds = [k for k in KINDS if rng.random() < CHANCE[k]] or [KINDS[int(rng.integers(len(KINDS)))]]
    return [makers[k](ins, scene, rng) for k in kinds]


# ---- geometry helpers -----------------------------------------------------------------------

def spline(points: np.ndarray, spacing: np.ndarray, step_mm: float = 2.5) -> np.ndarray:
    """Centripetal Catmull-Rom curve through voxel-space points, sampled every ~step_mm."""
    sp = np.asarray(spacing, float)
    p = np.asarray(points, float) * sp
    keep = np.r_[True, np.linalg.norm(np.diff(p, axis=0), axis=1) > 1.0]
    p = p[keep]
    if len(p) < 2:
        raise PlacementError("a device path collapsed to a point")
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = [p[1]]
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1:i + 3]
        t1 = np.linalg.norm(p1 - p0) ** 0.5 + 1e-6
        t2 = t1 + np.linalg.norm(p2 - p1) ** 0.5 + 1e-6
        t3 = t2 + np.linalg.norm(p3 - p2) ** 0.5 + 1e-6
        n = max(2, int(np.ceil(np.linalg.norm(p2 - p1) / step_mm)))
        for t in np.linspace(t1, t2, n + 1)[1:]:
            a1 = (t1 - t) / t1 * p0 + t / t1 * p1
            a2 = (t2 - t) / (t2 - t1) * p1 + (t - t1) / (t2 - t1) * p2
            a3 = (t3 - t) / (t3 - t2) * p2 + (t - t2) / (t3 - t2) * p3
            b1 = (t2 - t) / t2 * a1 + t / t2 * a2
            b2 = (t3 - t) / (t3 - t1) * a2 + (t - t1) / (t3 - t1) * a3
            out.append((t2 - t) / (t2 - t1) * b1 + (t - t1) / (t2 - t1) * b2)
    return np.array(out) / sp


def _segments(path: np.ndarray, radius: float) -> list:
    return [(a, b, radius) for a, b in zip(path[:-1], path[1:])]


def _device(ins: Inserter, name: str, parts: list[tuple[list, float, float]], meta: dict, margin_mm: float = 8.0,
            extra: list[tuple[np.ndarray, np.ndarray, float]] | None = None) -> Insertion:
    """One device from tube parts (segments, radius, mu) and solid `extra` blocks (occupancy, mu, origin)."""
    pts = np.concatenate([np.array([a for a, _, _ in segs] + [segs[-1][1]]) for segs, _, _ in parts])
    ends = [pts.min(0) - margin_mm / ins.spacing, pts.max(0) + margin_mm / ins.spacing + 1]
    for block_occ, _, block_origin in extra or []:
        ends += [np.asarray(block_origin), np.asarray(block_origin) + block_occ.shape]
    lo, hi = ins.clip_box(np.min(ends, 0), np.max(ends, 0))
    shape = tuple(b - a for a, b in zip(lo, hi))
    occ = np.zeros(shape, np.float32)
    mass = np.zeros(shape, np.float32)
    for segs, _, mu in parts:
        f = tube(ins.spacing, lo, shape, segs)
        occ = np.maximum(occ, f)
        mass = np.maximum(mass, f * mu)
    for block_occ, block_mu, block_origin in extra or []:
        sl = tuple(slice(b - a, b - a + n) for a, b, n in zip(lo, block_origin, block_occ.shape))
        occ[sl] = np.maximum(occ[sl], block_occ)
        mass[sl] = np.maximum(mass[sl], block_occ * block_mu)
    mu = mass / np.maximum(occ, 1e-6)
    return ins.finish("Support Devices", None, lo, occ, mu, {"device": name, **meta}, label=occ >= 0.25, fill=False)


def skin_y(ins: Inserter) -> np.ndarray:
    """(X, Z) index of the anterior-most body voxel along y (-1 where no body)."""
    def make():
        body = ins.ph.mu.numpy() > 0.35 * MU_WATER
        n = body.shape[1]
        return np.where(body.any(1), n - 1 - body[:, ::-1, :].argmax(1), -1)
    return ins.cached("skin_y", make)


def _ends(ins: Inserter, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(peripheral end, central end) of an oblique vessel: the extremes along its principal axis;
    peripheral = the one further from the midline and higher."""
    r = ins.region((name,))
    if r is None:
        return None
    idx = (np.argwhere(r.mask) + r.origin).astype(float)
    mm = idx * ins.spacing
    axis = np.linalg.eigh(np.cov((mm - mm.mean(0)).T))[1][:, -1]
    s = (mm - mm.mean(0)) @ axis
    a, b = idx[s <= np.quantile(s, 0.05)].mean(0), idx[s >= np.quantile(s, 0.95)].mean(0)
    mid = midline_x(ins)
    score = lambda p: abs(p[0] - mid) * ins.spacing[0] + p[2] * ins.spacing[2]  # noqa: E731
    return (a, b) if score(a) > score(b) else (b, a)


def _smooth(line: np.ndarray, n: int = 5) -> np.ndarray:
    return ndi.uniform_filter1d(line, size=min(n, len(line)), axis=0, mode="nearest")


# ---- endotracheal tube ----------------------------------------------------------------------

def _ett(ins: Inserter, scene, rng: np.random.Generator) -> Insertion:
    line = ins.centerline("trachea")
    if line is None or len(line) < 4:
        raise PlacementError("the labelmap has no trachea for an endotracheal tube")
    sp = ins.spacing
    carina = ins.carina()
    above = float(rng.uniform(30, 60))
    tip_z = carina[2] + above / sp[2]
    line = _smooth(line)
    trach = line[line[:, 2] >= tip_z]
    if len(trach) < 2:
        raise PlacementError("the trachea is too short for an endotracheal tube")
    up = trach[0] - trach[min(len(trach) - 1, int(20 / sp[2]))]
    up = up / max(np.linalg.norm(up * sp), 1e-6)
    top = ins.ph.shape[2] - 1
    steps = max(1, int((top - trach[0][2]) * sp[2] / 15))
    neck = [trach[0] + up * 15 * k + np.array([0, 2.0 * k / sp[1], 0]) for k in range(1, steps + 1)]
    path = spline(np.vstack([neck[::-1], trach, [[trach[-1][0], trach[-1][1], tip_z]]]), sp)
    path = path[path[:, 2] <= top]
    ro, ri = 5.25, 3.75
    wall = _segments(path, ro)
    lumen = _segments(path, ri)
    stripe = _segments(path + np.array([-(ro - 0.9) / sp[0], 0, 0]), 0.8)  # along the patient's-left wall
    lo, hi = ins.clip_box(path.min(0) - 8 / sp, path.max(0) + 8 / sp + 1)
    shape = tuple(b - a for a, b in zip(lo, hi))
    outer = tube(sp, lo, shape, wall)
    inner = tube(sp, lo, shape, lumen)
    line_f = tube(sp, lo, shape, stripe)
    shell = np.clip(outer - inner, 0, 1)
    occ = np.maximum(outer, line_f)
    mu = np.minimum(shell * MU["pvc"] + line_f * MU["stripe"], occ * MU["stripe"]) / np.maximum(occ, 1e-6)  # lumen: air
    meta = {"device": "endotracheal tube", "tip_above_carina_mm": round(above, 1),
            "tip_mm": ins.ph.to_mm(path[-1]).round(1).tolist()}
    return ins.finish("Support Devices", None, lo, occ.astype(np.float32), mu, meta, label=outer >= 0.5, fill=False)


# ---- central venous catheter ----------------------------------------------------------------

def _venous_route(ins: Inserter, side: str, approach: str, rng: np.random.Generator) -> list[np.ndarray] | None:
    """Waypoints (voxels) from the skin puncture to the superior vena cava's top, or None."""
    sp = ins.spacing
    ends = _ends(ins, f"brachiocephalic_vein_{side}")
    if ends is None or ins.centerline("superior_vena_cava") is None:
        return None
    peripheral, central = ends
    outward = 1.0 if side == "right" else -1.0  # the right side is +x
    if approach == "jugular":
        carotid = ins.centerline(f"common_carotid_artery_{side}")
        ij = [] if carotid is None else [p + [outward * 12 / sp[0], 3 / sp[1], 0] for p in carotid[:: max(1, int(15 / sp[2]))]
                                          if p[2] > peripheral[2] + 10 / sp[2]]
        start = (ij[0] if ij else peripheral + [outward * 8 / sp[0], 0, 40 / sp[2]]).copy()
        start[2] = ins.ph.shape[2] - 1
        return [start, *ij, peripheral, central]
    vein = subclavian_vein(ins, side)
    if vein is None:
        return None
    x = int(np.clip(vein[0] + outward * 25 / sp[0], 0, ins.ph.shape[0] - 1))
    z = int(np.clip(vein[2] - 15 / sp[2], 0, ins.ph.shape[2] - 1))
    skin = skin_y(ins)[x, z]
    if skin < 0:
        return None
    puncture = np.array([x, skin - 2.0 / sp[1], z], float)  # infraclavicular, toward the vein
    return [puncture, vein, peripheral, central]


def subclavian_vein(ins: Inserter, side: str) -> np.ndarray | None:
    """A point of the subclavian vein where it passes under the clavicle: antero-inferior to the
    subclavian artery (the labelmap has no subclavian vein), at the artery's mid-lateral course."""
    artery = ins.region((f"subclavian_artery_{side}",))
    if artery is None:
        return None
    idx = (np.argwhere(artery.mask) + artery.origin).astype(float)
    lat = np.abs(idx[:, 0] - midline_x(ins))
    p = idx[(lat >= np.quantile(lat, 0.55)) & (lat <= np.quantile(lat, 0.7))].mean(0)
    return p + [0, 10 / ins.spacing[1], -10 / ins.spacing[2]]


def _svc_to(ins: Inserter, below_mm: float) -> list[np.ndarray]:
    """SVC centreline points from its top down to `below_mm` under its lowest slice (negative: above)."""
    svc = _smooth(ins.centerline("superior_vena_cava"))
    sp = ins.spacing
    tip_z = svc[-1][2] - below_mm / sp[2]
    pts = [p for p in svc[:: max(1, int(8 / sp[2]))] if p[2] > tip_z]
    return pts + [np.array([svc[-1][0], svc[-1][1], tip_z])]


def _cvc(ins: Inserter, scene, rng: np.random.Generator) -> Insertion:
    side = "right" if rng.random() < 0.65 else "left"
    approach = "jugular" if rng.random() < 0.6 else "subclavian"
    route = None
    for s, a in ((side, approach), (side, "jugular" if approach == "subclavian" else "subclavian"),
                 ("left" if side == "right" else "right", approach)):
        route = _venous_route(ins, s, a, rng)
        if route is not None:
            side, approach = s, a
            break
    if route is None:
        raise PlacementError("the labelmap lacks the veins (brachiocephalic, superior vena cava) for a central line")
    below = float(rng.uniform(-20, 10))
    path = spline(np.array([*route, *_svc_to(ins, below)]), ins.spacing)
    meta = {"side": side, "approach": approach, "tip_mm": ins.ph.to_mm(path[-1]).round(1).tolist()}
    return _device(ins, "central venous catheter", [(_segments(path, 1.4), 1.4, MU["catheter"])], meta)


# ---- pacemaker ------------------------------------------------------------------------------

def heart_landmarks(ins: Inserter) -> dict[str, np.ndarray]:
    """Voxel positions 5+ mm inside the heart label: right atrium (its rightmost part), the
    right-ventricular apex (left-anterior-inferior extreme) and the right-atrial appendage
    (right-anterior-superior)."""
    def make():
        r = ins.region(("heart",))
        if r is None:
            return None
        depth = ndi.distance_transform_edt(r.mask, sampling=ins.spacing)
        idx = np.argwhere(depth >= 5)
        n = (idx - idx.min(0)) / np.maximum(np.ptp(idx, 0), 1)
        right = idx[n[:, 0] >= np.quantile(n[:, 0], 0.8)]
        return {"ra": right.mean(0) + r.origin,
                "rv_apex": idx[np.argmax(-n[:, 0] + 0.6 * n[:, 1] - 0.8 * n[:, 2])] + r.origin,
                "raa": right[np.argmax(1.5 * n[n[:, 0] >= np.quantile(n[:, 0], 0.8)][:, 1:] @ [0.7, 0.8])] + r.origin}
    return ins.cached("heart_landmarks", make)


def _pacemaker(ins: Inserter, scene, rng: np.random.Generator) -> Insertion:
    side = "left" if rng.random() < 0.8 else "right"
    sp = ins.spacing
    marks = heart_landmarks(ins)
    route = _venous_route(ins, side, "subclavian", rng)
    if marks is None or route is None:
        raise PlacementError(f"the labelmap lacks the veins or heart for a {side} pacemaker")
    marks = {k: scene.heart_point(v.astype(float)) for k, v in marks.items()}
    outward = 1.0 if side == "right" else -1.0
    # The pocket: infraclavicular, over the upper lateral lung zone (from the lung, since CTs often
    # cut the clavicle's lateral end off), a few cm below the apex.
    lung = ins.lung(side)
    idx = np.argwhere(lung.mask) + lung.origin
    top = idx[:, 2].max()
    upper = idx[idx[:, 2] >= top - 60 / sp[2]]
    reach = np.abs(upper[:, 0] - midline_x(ins)).max()
    cx = midline_x(ins) + outward * reach * rng.uniform(0.55, 0.75)
    cz = top - rng.uniform(20, 40) / sp[2]
    skin = skin_y(ins)[int(round(cx)), int(round(cz))]
    if skin < 0:
        raise PlacementError(f"no {side} chest wall for a pacemaker pocket")
    centre = np.array([cx, skin - 9 / sp[1], cz])
    gen_occ, gen_mu, gen_origin, header = _generator(ins, centre, rng)
    # Lead(s): a slack loop lying over the pocket, into the subclavian vein, down the SVC.
    turn = np.linspace(0.5 * np.pi, 2.6 * np.pi, 9) * -outward
    rad = rng.uniform(9, 14) * rng.uniform(0.8, 1.2, size=(len(turn), 2))
    loop = [centre + np.array([np.cos(a) * r[0] / sp[0], 5 / sp[1], np.sin(a) * r[1] / sp[2]])
            for a, r in zip(turn, rad)]
    venous = [header, *loop, subclavian_vein(ins, side), *route[2:], *_svc_to(ins, -5)]
    leads = [[*venous, marks["ra"], marks["rv_apex"]]]
    if rng.random() < 0.55:  # dual chamber: the atrial lead's J-loop up into the appendage
        leads.append([*venous, marks["ra"] - [0, 0, 12 / sp[2]], marks["raa"]])
    parts = []
    for lead in leads:
        path = spline(np.array(lead), sp)
        parts.append((_segments(path, 1.3), 1.3, MU["lead"]))
        parts.append((_segments(path[-6:], 1.6), 1.6, MU["electrode"]))  # the tip electrode
    meta = {"side": side, "leads": len(leads), "generator_mm": ins.ph.to_mm(centre).round(1).tolist()}
    return _device(ins, "pacemaker", parts, meta, extra=[(gen_occ, gen_mu, gen_origin)])


def _generator(ins: Inserter, centre: np.ndarray, rng: np.random.Generator):
    """A rounded generator can (about 50 × 45 × 7 mm) in the coronal plane, tilted up to 20°, with
    an epoxy header on top: (occupancy, mu, origin, header top voxel)."""
    sp = ins.spacing
    a, b, half_t = rng.uniform(22, 26), rng.uniform(20, 24), 3.5
    ang = np.radians(rng.uniform(-20, 20))
    reach = (max(a, b) + 3) / sp
    origin, stop = ins.clip_box(centre - reach, centre + reach + 1)
    x, y, z = ins.axes_mm(origin, stop)
    cx, cy, cz = (centre - origin) * sp
    u = (x - cx) * np.cos(ang) + (z - cz) * np.sin(ang)
    v = -(x - cx) * np.sin(ang) + (z - cz) * np.cos(ang)
    r = (np.abs(u / a) ** 2.6 + np.abs(v / b) ** 2.6) ** (1 / 2.6)  # a rounded can
    h = sp.min()
    inplane = smoothstep((1 - r) * min(a, b) / h + 0.5)
    flat = smoothstep((half_t - np.abs(y - cy)) / h + 0.5)
    occ = (inplane * flat).astype(np.float32)
    header = v > b - 11
    # Two metal set-screw blocks in the translucent epoxy header.
    pins = sum(smoothstep((4.5 - np.abs(u - du)) / h + 0.5) * smoothstep((1.8 - np.abs(v - b + 6)) / h + 0.5)
               for du in (-6.0, 6.0)) * flat
    mu = np.where(header, MU["header"], MU["can"]).astype(np.float32)
    mu = np.where(header & (pins > 0.3), MU["electrode"], mu).astype(np.float32)
    occ = np.maximum(occ, np.where(header, pins, 0)).astype(np.float32)
    top = centre + np.array([(-np.sin(ang)) * b / sp[0], 0, np.cos(ang) * b / sp[2]])
    return occ, mu, origin, top
