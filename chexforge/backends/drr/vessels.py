"""Per-patient pulmonary vessel trees: each virtual patient gets his own lung markings.

Projecting one CT would give every film the same lung markings. So (a) `parenchyma` removes the CT's
own intrapulmonary vessels once, when the CT is prepared (on HU), and (b) per virtual patient
`trees` grows an artery and a vein in each lung and `rasterize` turns them into blood occupancy
(fraction of each voxel) that the projector adds to the lung: mu*(1-occ) + mu_blood*occ.
Called per lung, `parenchyma` gives that lung's `volume_ml` for `trees`.

Removal: a lung voxel is dense when more than 3 noise sigmas above the local aerated parenchyma
(median of ~8 mm cells smoothed over 10 mm: vessels hardly move a median), and so are its
neighbours more than 1 sigma above (the partial-volume rim). That takes vessels and the walls of
intrapulmonary bronchi (a film shows those only end-on at the hilum); airway lumens, darker than
parenchyma, stay, and so does the mask's outer voxel layer (partial volume with chest wall,
mediastinum, diaphragm). Dense voxels get the local mean of the vessel-free parenchyma, smooth
over ~1 cm, so the dependent (posterior) lung stays denser. Returned with it: the blood removed,
sum((hu - fill) / (blood - fill)) x voxel volume, for the trees to put back (the lungs keep their
mass). The bundled CT: ~58 ml per lung, 20 % of lung voxels changed.

Growth: the volume-filling branching of airway and pulmonary vessel models [1, 2]. Points are
drawn in the lung; a branch heads from its parent's end toward the centroid of the points it
supplies and stops 40 % of the way there [1]; its points are split by a plane containing the
branch, normal to their principal axis turned by a random angle (per-patient variation), at a
random quantile: the minor daughter gets 20-50 % of the flow (asymmetric bifurcations). A branch
with <= 2 points is terminal. All clusters of a generation are processed at once: a lung's
trees take ~25 ms of CPU, their rasterizing ~15 ms.
- Calibre: flow ~ points supplied, r^3 ~ flow (Murray's law [3]): r_parent^3 = sum r_child^3 at
  every bifurcation, radii fall monotonically, scaled to the blood given; in vivo pulmonary
  arteries: Murray exponent 2.92 +- 1.07 [4]; casts: 15 orders of arteries and of veins [7].
  On the bundled CT roots come out at 4-5.5 mm radius (lobar), leaves at 0.4-0.7 mm.
- Angles: at most 8 deg beyond Murray's minimum-work angle for the daughter's flow [5] (37 deg
  each at an equal split, less for a major daughter) and never over 60 deg [1]: 35 +- 15 deg,
  against 28 +- 15 deg measured in vivo [4].
- Arteries start at the hilum, veins 25 mm below and 10 mm behind it, toward the left atrium.
  The arteries get 36 % of the blood: pulmonary arteries hold ~150 ml, veins ~270 ml [6].
- Periphery: points are sparser within 15 mm of the pleura (30 % at it), so only few, thin
  branches reach the outer lung, where markings fade on a film: on the bundled CT that shell is
  68 % of the lung and holds ~40 % of the vessel volume, 26 % away from the hila (the CT's
  own vessels: ~57 %).
- Branches stop before leaving the mask; one blocked early (a bronchus, the hilum's folds) takes
  the detour that gets furthest toward its aim, as vessels wind around the airways.
Rasterizing: vessels wider than a voxel are capsules, antialiased over the voxel's extent along
the wall's normal in mm (anisotropic spacing) and merged by maximum (joints do not double);
thinner ones are points every <= 0.75 voxel splatted trilinearly with their volume pi r^2 l.
Where daughters overlap their parents the partly filled voxels are scaled up a few % so the
occupancy holds exactly the trees' blood.

[1] Tawhai, Pullan, Hunter 2000, Ann Biomed Eng 28:793 (volume-filling tree, branch angle limit)
[2] Burrowes, Hunter, Tawhai 2005, J Appl Physiol 99:731 (the same for pulmonary arteries, veins)
[3] Murray 1926, PNAS 12:207;  [5] Murray 1926, J Gen Physiol 9:835 (minimum-work angles)
[4] Dong et al. 2020, Am J Physiol Heart Circ Physiol 319:H432 (in vivo CT, preacinar arteries)
[6] "Functional organization of the pulmonary circulation", physiology textbook chapter (as at
    www.78stepshealth.us); [7] Huang et al. 1996, J Appl Physiol 81:2123 (casts, 15 orders each)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

BLOOD_HU = 40.0  # blood as ct._prepare writes it (contrast removed)
CELL_MM, SMOOTH_MM = 8.0, 10.0  # parenchyma statistics per cell, smoothed over this
POINTS = 1200  # attraction points per tree: ~1500 segments, root/leaf radius ~11
LENGTH_FRACTION = 0.4  # of the way to the points' centroid [1]
MAX_ANGLE, ANGLE_SLACK = np.radians(60.0), np.radians(8.0)  # [1]; beyond Murray's angle [5]
PLANE_JITTER = np.radians(40.0)  # random turn of the splitting plane about the branch
MINOR_SHARE = 0.2  # the minor daughter's share of the points is drawn from [0.2, 0.5]
LEAF_POINTS, LEAF_MAX_MM, MIN_STEP_MM = 2, 10.0, 0.5
PERIPHERY_MM, PERIPHERY_MIN = 15.0, 0.3  # point density ramps from 0.3 at the pleura to 1 at 15 mm
ARTERY_SHARE = 150.0 / (150.0 + 270.0)  # arterial share of the pulmonary blood [6]
VEIN_OFFSET_MM = np.array([0.0, -10.0, -25.0])  # vein root from the hilum (RAS: posterior, caudal)
ROOT_DEPTH_MM = 5.0  # roots move this far into the lung, clear of the hilum's folds


@dataclass
class Tree:
    """Segments of a vascular tree, in voxel coordinates of the crop it was grown in."""

    start: np.ndarray  # (n, 3) float
    end: np.ndarray  # (n, 3)
    radius_mm: np.ndarray  # (n,)
    generation: np.ndarray  # (n,) int, 0 at the root
    parent: np.ndarray  # (n,) int, index of the parent segment, -1 at the root
    spacing: tuple[float, float, float]  # mm per voxel of the crop

    @property
    def length_mm(self) -> np.ndarray:
        return _norm((self.end - self.start) * np.asarray(self.spacing))

    @property
    def volume_ml(self) -> float:
        return float(np.sum(np.pi * self.radius_mm**2 * self.length_mm) / 1000)


def parenchyma(hu: np.ndarray, lung: np.ndarray, spacing) -> tuple[np.ndarray, float]:
    """Lungs (`lung`: bool, both or one) without the CT's vessels and bronchial walls: the new hu
    (a float32 copy) and the blood volume removed, in ml. See the module docstring."""
    sp = np.asarray(spacing, dtype=np.float64)
    out = np.array(hu, dtype=np.float32, copy=True)
    if not lung.any():
        return out, 0.0
    box = tuple(slice(i.min(), i.max() + 1) for i in (np.flatnonzero(lung.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1))))
    h, m = out[box], np.ascontiguousarray(lung[box], dtype=bool)  # h is a view into `out`
    inner = ndi.binary_erosion(m)  # the lung less its surface layer
    dense = np.zeros_like(m)
    for _ in range(2):  # the second pass measures the parenchyma without the first pass's vessels
        r = h - _field(h, m & ~dense, sp, np.nanmedian)
        sigma = max(1.4826 * np.median(-r[m & (r < 0)]), 5.0)  # noise from the lower half: vessels only add
        dense = ndi.binary_dilation(inner & (r > 3 * sigma), np.ones((3, 3, 3), bool)) & inner & (r > sigma)
    fill = _field(h, m & ~dense, sp, np.nanmean)
    take = dense & (h > fill)
    blood = float(np.sum((h[take] - fill[take]) / (BLOOD_HU - fill[take]))) * np.prod(sp) / 1000
    h[take] = fill[take]
    return out, blood


def _field(h: np.ndarray, w: np.ndarray, sp: np.ndarray, stat) -> np.ndarray:
    """A smooth field of `stat` over the voxels `w`: per ~8 mm cell of a grid thinned to ~1.4 mm
    voxels (enough for a statistic), a Gaussian average of the cells weighted by their voxel
    counts, then linear interpolation back to every voxel, axis after axis."""
    sub = np.maximum(1, np.round(1.4 / sp).astype(int))
    f = np.maximum(1, np.round(CELL_MM / (sp * sub)).astype(int))
    thin = tuple(slice(None, None, k) for k in sub)
    a = np.where(w[thin], h[thin], np.nan).astype(np.float32)
    a = np.pad(a, [(0, (-s) % k) for s, k in zip(a.shape, f)], constant_values=np.nan)
    c = [s // k for s, k in zip(a.shape, f)]
    cells = a.reshape(c[0], f[0], c[1], f[1], c[2], f[2]).transpose(0, 2, 4, 1, 3, 5).reshape(*c, -1)
    n = np.sum(~np.isnan(cells), axis=-1).astype(np.float32)
    v = np.zeros(n.shape, np.float32)
    v[n > 0] = stat(cells[n > 0], axis=-1)
    sig = SMOOTH_MM / (sp * sub * f)
    v = ndi.gaussian_filter(v * n, sig, mode="constant") / np.maximum(ndi.gaussian_filter(n, sig, mode="constant"), 1e-6)
    for ax in range(3):
        pos = np.clip((np.arange(h.shape[ax]) / sub[ax] - (f[ax] - 1) / 2) / f[ax], 0, v.shape[ax] - 1)
        i0 = np.minimum(pos.astype(int), max(v.shape[ax] - 2, 0))
        t = (pos - i0).astype(np.float32).reshape([-1 if a == ax else 1 for a in range(3)])
        v = np.take(v, i0, axis=ax) * (1 - t) + np.take(v, np.minimum(i0 + 1, v.shape[ax] - 1), axis=ax) * t
    return v


def trees(lung: np.ndarray, hilum: np.ndarray, spacing, rng: np.random.Generator, volume_ml: float) -> list[Tree]:
    """[artery, vein] of one lung, sharing `volume_ml` as the blood does; grown together in one
    pass (faster than two `grow` calls)."""
    return _grow(lung, hilum, spacing, rng, [volume_ml * ARTERY_SHARE, volume_ml * (1 - ARTERY_SHARE)], ["artery", "vein"])


def grow(lung: np.ndarray, root: np.ndarray, spacing, rng: np.random.Generator, volume_ml: float, *,
         kind: str = "artery") -> Tree:
    """A tree filling `lung` (bool crop of ONE lung) from `root` (voxel coords in the crop, the
    hilum), scaled so its blood volume is `volume_ml`; kind="vein" starts it below and behind the
    hilum. A root the mask gives no way into the lung yields an empty tree."""
    return _grow(lung, root, spacing, rng, [volume_ml], [kind])[0]


def _grow(lung, hilum, spacing, rng, volumes, kinds) -> list[Tree]:
    if not set(kinds) <= {"artery", "vein"}:
        raise ValueError(f"kind must be 'artery' or 'vein', not {kinds}")
    sp, lung = np.asarray(spacing, dtype=np.float64), np.ascontiguousarray(lung, dtype=bool)
    if not lung.any():
        raise ValueError("empty lung mask")
    # Depth below the pleura on a coarse grid (~8 mm cells sampled at their centres): cheap.
    f = np.maximum(1, np.round(8.0 / sp).astype(int))
    coarse = lung[tuple(slice(k // 2, None, k) for k in f)]
    depth = (ndi.distance_transform_cdt(coarse, "chessboard") - 0.5) * np.mean(sp * f)
    deep = depth >= ROOT_DEPTH_MM
    centres = (np.argwhere(deep) * f + f // 2 if deep.any() else np.argwhere(lung)) * sp
    roots = [np.asarray(hilum) * sp + (VEIN_OFFSET_MM if k == "vein" else 0) for k in kinds]
    roots = np.array([centres[np.argmin(np.sum((centres - r) ** 2, axis=1))] for r in roots])
    # Attraction points: uniform in the crop, kept in the lung with their depth's density.
    pts = []
    for _ in kinds:
        m = int(3 * POINTS / max(coarse.mean(), 0.02))
        p = rng.random((m, 3)) * lung.shape
        v = p.astype(np.int64)
        dens = np.clip(depth.ravel()[np.ravel_multi_index(tuple(np.minimum(v // f, np.array(coarse.shape) - 1).T), coarse.shape)]
                       / PERIPHERY_MM, PERIPHERY_MIN, 1)
        pts.append(p[lung.ravel()[np.ravel_multi_index(tuple(v.T), lung.shape)] & (rng.random(m) < dens)][:POINTS] * sp)
    owner = np.concatenate([np.full(len(p), i) for i, p in enumerate(pts)])
    s, e, n, gen, parent, tree = _partition(np.concatenate(pts), owner, roots, lung, sp, rng)
    out = []
    for i, volume_ml in enumerate(volumes):
        sel = np.flatnonzero(tree == i)
        index = np.full(len(s) + 1, -1)  # old segment index -> this tree's (-1 stays -1)
        index[sel] = np.arange(len(sel))
        # Murray: r^3 proportional to the flow, i.e. to the points supplied; scaled to the volume.
        scale = np.sqrt(volume_ml * 1000 / max(np.sum(np.pi * n[sel] ** (2 / 3) * _norm(e[sel] - s[sel])), 1e-9))
        out.append(Tree(s[sel] / sp, e[sel] / sp, scale * n[sel] ** (1 / 3), gen[sel], index[parent[sel]],
                        tuple(float(x) for x in sp)))
    return out


def _partition(pts, owner, roots, lung, sp, rng: np.random.Generator):
    """Volume-filling branching, one tree per root (point i feeds tree owner[i]), all clusters of
    a generation at once. Returns segment starts, ends (mm), flow (points), generation, parent
    and tree."""
    lab, S = owner.astype(np.int64), roots.astype(np.float64)  # cluster of each live point; branch starts
    U, A = np.zeros_like(S), np.full(len(S), np.pi)  # parent direction, largest turn from it
    par, T, gen, segs, total = np.full(len(S), -1), np.arange(len(S)), 0, [], 0
    while len(S):
        k = len(S)
        cnt = np.bincount(lab, minlength=k)
        C = np.stack([np.bincount(lab, pts[:, i], minlength=k) for i in range(3)], 1) / np.maximum(cnt, 1)[:, None]
        leaf, v = cnt <= LEAF_POINTS, C - S
        frac = np.where(leaf, np.minimum(1.0, LEAF_MAX_MM / np.maximum(_norm(v), 1e-9)), LENGTH_FRACTION)
        E = _route(S, _limit_angle(S, S + frac[:, None] * v, U, A), lung, sp)
        moved = (_norm(E - S) >= MIN_STEP_MM) & (cnt > 0)  # a branch the lung stops at once ends, with its points
        ids = total + np.cumsum(moved) - 1
        segs.append((S[moved], E[moved], cnt[moved], np.full(moved.sum(), gen), par[moved], T[moved]))
        total += moved.sum()
        # The splitting plane contains the branch; its normal is the points' principal axis
        # (power iteration on their covariance) turned by a random angle about the branch.
        d, q = _unit(E - S), pts - C[lab]
        cov = np.empty((k, 3, 3))
        for i, j in ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)):
            cov[:, i, j] = cov[:, j, i] = np.bincount(lab, q[:, i] * q[:, j], minlength=k)
        axis = cov[np.arange(k), :, np.argmax(np.diagonal(cov, axis1=1, axis2=2), axis=1)]
        for _ in range(4):
            axis = _unit(np.einsum("kij,kj->ki", cov, axis))
        a = _unit(axis - np.sum(axis * d, 1, keepdims=True) * d)
        psi = rng.normal(0, PLANE_JITTER, k)[:, None]
        a = a * np.cos(psi) + np.cross(d, a) * np.sin(psi)
        # Split at a random quantile along the normal: n1 points go to side 0.
        n1 = np.clip(np.rint(rng.uniform(MINOR_SHARE, 1 - MINOR_SHARE, k) * cnt), 1, cnt - 1)
        order = np.lexsort((np.sum(q * a[lab], axis=1), lab))
        rank = np.empty(len(lab), np.int64)
        rank[order] = np.arange(len(lab)) - (np.cumsum(cnt) - cnt)[lab[order]]
        split = ~leaf & moved
        # Murray's minimum-work angle of each daughter [5] with r ~ flow^(1/3), plus some slack.
        nd = np.stack([n1, cnt - n1], 1)[split].ravel()
        no, n0 = nd.reshape(-1, 2)[:, ::-1].ravel(), np.repeat(cnt[split], 2).astype(np.float64)
        cos = (n0 ** (4 / 3) + nd ** (4 / 3) - no ** (4 / 3)) / (2 * n0 ** (2 / 3) * nd ** (2 / 3))
        A = np.minimum(np.arccos(np.clip(cos, -1, 1)) + ANGLE_SLACK, MAX_ANGLE)
        keep = split[lab]
        lab = 2 * (np.cumsum(split) - 1)[lab[keep]] + (rank >= n1[lab])[keep]
        pts = pts[keep]
        S, U, par, T = (np.repeat(x[split], 2, 0) for x in (E, d, ids, T))
        gen += 1
    s, e, n, g, p, t = (np.concatenate(x) for x in zip(*segs))
    # A branch's flow = the points of the leaves below it (stopped branches took theirs away),
    # summed from the deepest generation up: Murray's sum then holds exactly.
    n = n.astype(np.float64)
    for level in range(g.max(initial=0), 0, -1):
        child = np.flatnonzero(g == level)
        n[np.unique(p[child])] = 0
        np.add.at(n, p[child], n[child])
    return s, e, n, g, p, t


def _norm(v):
    return np.sqrt(np.einsum("ij,ij->i", v, v))


def _unit(v):
    n = _norm(v)[:, None]
    return np.where(n > 1e-9, v / np.maximum(n, 1e-9), np.array([1.0, 0, 0]))  # zero: any direction


def _limit_angle(S, E, U, A):
    """Turn each branch S->E toward its parent direction U until within angle A (same length)."""
    v = E - S
    length = _norm(v)[:, None]
    limit = A[:, None]
    bad = (np.abs(U).sum(1, keepdims=True) > 0) & (np.sum(v * U, 1, keepdims=True) < np.cos(limit) * length)
    w = _unit(v - np.sum(v * U, 1, keepdims=True) * U)
    return np.where(bad, S + length * (np.cos(limit) * U + np.sin(limit) * w), E)


def _reach(S, E, lung, sp, steps: int = 12) -> np.ndarray:
    """How far (fraction) along each branch S->E (mm) it stays inside the lung mask, sampled."""
    t = np.arange(1, steps + 1) / steps
    p = np.rint((S[:, None] + t[None, :, None] * (E - S)[:, None]) / sp).astype(np.int64)  # (k, steps, 3)
    inside = np.all((p >= 0) & (p < lung.shape), axis=2)
    p = np.clip(p, 0, np.array(lung.shape) - 1)
    ok = inside & lung.ravel()[(p[..., 0] * lung.shape[1] + p[..., 1]) * lung.shape[2] + p[..., 2]]
    first_bad = np.where(ok.all(1), steps, np.argmin(ok, axis=1))
    return np.where(first_bad == 0, 0.0, t[np.maximum(first_bad - 1, 0)])


# Detours of a blocked branch: the 26 directions to a voxel's neighbours.
_DIRS = np.array([d for d in np.ndindex(3, 3, 3) if d != (1, 1, 1)], dtype=np.float64) - 1
_DIRS /= _norm(_DIRS)[:, None]


def _route(S, E, lung, sp) -> np.ndarray:
    """Each branch shortened to before it leaves the lung; one blocked before half its length
    instead takes the detour that gets furthest toward its aim (reach x cos(turn))."""
    reach = _reach(S, E, lung, sp)
    blocked = np.flatnonzero(reach < 0.5)
    if len(blocked):
        s, v = S[blocked], E[blocked] - S[blocked]
        ends = s[:, None] + _norm(v)[:, None, None] * _DIRS  # (k, 26, 3)
        far = _reach(np.repeat(s, len(_DIRS), 0), ends.reshape(-1, 3), lung, sp).reshape(len(s), -1)
        gain = far * np.einsum("kj,dj->kd", _unit(v), _DIRS)  # reach x cos(turn); einsum: no BLAS rounding
        best, i = np.argmax(gain, axis=1), np.arange(len(s))
        better = gain[i, best] > reach[blocked]
        E = E.copy()
        E[blocked[better]] = (s + far[i, best][:, None] * (ends[i, best] - s))[better]
        reach[blocked[better]] = 1.0
    return S + reach[:, None] * (E - S)


def rasterize(trees: list[Tree], shape: tuple[int, int, int], spacing) -> np.ndarray:
    """float32 occupancy (fraction of each voxel filled by vessel, clipped to [0, 1]) on the crop grid."""
    sp = np.asarray(spacing, dtype=np.float64)
    s, e = (np.concatenate([getattr(t, f) for t in trees] + [np.zeros((0, 3))]) for f in ("start", "end"))
    r = np.concatenate([t.radius_mm for t in trees] + [np.zeros(0)])
    thick = r > sp.min()
    occ = _splat(s[~thick], e[~thick], r[~thick], shape, sp)
    if thick.any():
        lin, o = _capsules(s[thick], e[thick], r[thick], shape, sp)
        order = np.argsort(lin, kind="stable")
        lin, o = lin[order], o[order]
        first = np.flatnonzero(np.r_[True, lin[1:] != lin[:-1]])
        occ[lin[first]] += np.maximum.reduceat(o, first)  # capsules merge by maximum: joints do not double
    # Daughters start inside their parents, so the union holds ~5 % less than sum(pi r^2 l):
    # scale the partly filled voxels until the trees' blood (the lungs' mass) is back.
    nz = np.flatnonzero(occ > 0)
    v, target = np.minimum(occ[nz], 1), sum(t.volume_ml for t in trees) * 1000 / np.prod(sp)
    for _ in range(3):
        part = v < 1
        v[part] *= max(1 + (target - v.sum()) / max(v[part].sum(), 1e-9), 0)
        np.clip(v, 0, 1, out=v)
    out = np.zeros(int(np.prod(shape)), np.float32)
    out[nz] = v
    return out.reshape(shape)


def _capsules(s, e, r, shape, sp):
    """Flat voxel indices and occupancies of capsules (voxel coords s->e, radius r mm) over their
    bounding boxes: distance to the axis below r, antialiased over the voxel's extent along the
    wall's normal (mm: anisotropic voxels). Flat float32 arrays, one per axis: fast."""
    rv = r[:, None] / sp + 1
    lo = np.maximum(np.floor(np.minimum(s, e) - rv), 0).astype(np.int64)
    ext = np.maximum(np.minimum(np.ceil(np.maximum(s, e) + rv), np.array(shape) - 1).astype(np.int64) - lo + 1, 0)
    count = np.prod(ext, axis=1)
    seg = np.repeat(np.arange(len(s)), count)
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    idx = [k // (ext[seg, 1] * ext[seg, 2]), (k // ext[seg, 2]) % ext[seg, 1], k % ext[seg, 2]]
    ab = (e - s) * sp
    inv = (1 / np.maximum(np.sum(ab * ab, axis=1), 1e-12)).astype(np.float32)[seg]
    f32 = sp.astype(np.float32)
    p = [((lo[:, i] - s[:, i]) * sp[i]).astype(np.float32)[seg] + idx[i].astype(np.float32) * f32[i] for i in range(3)]
    ab = [ab[:, i].astype(np.float32)[seg] for i in range(3)]
    t = np.clip((p[0] * ab[0] + p[1] * ab[1] + p[2] * ab[2]) * inv, 0, 1)
    off = [np.abs(p[i] - t * ab[i]) for i in range(3)]  # mm from the nearest point of the axis
    dist = np.sqrt(off[0] ** 2 + off[1] ** 2 + off[2] ** 2)
    width = np.where(dist > 1e-6, (off[0] * f32[0] + off[1] * f32[1] + off[2] * f32[2]) / np.maximum(dist, 1e-6), f32.min())
    # A linear ramp of width w centred at r' adds pi w^2/12 to the cross-section: r'^2 = r^2 - w^2/12.
    r2 = r.astype(np.float32)[seg] ** 2
    occ = np.clip((np.sqrt(np.maximum(r2 - width**2 / 12, r2 / 4)) - dist) / width + 0.5, 0, 1)
    hit = np.flatnonzero(occ > 0)
    seg, idx = seg[hit], [i[hit] for i in idx]
    return ((lo[seg, 0] + idx[0]) * shape[1] + lo[seg, 1] + idx[1]) * shape[2] + lo[seg, 2] + idx[2], occ[hit]


def _splat(s, e, r, shape, sp) -> np.ndarray:
    """Thin segments as points every <= 0.75 voxel, each carrying its share of pi r^2 l, spread
    trilinearly (weights sum to 1: volume is conserved). Flat float64."""
    steps = np.maximum(1, np.ceil(np.abs(e - s).max(1, initial=0) / 0.75)).astype(np.int64)
    seg = np.repeat(np.arange(len(s)), steps)
    t = ((np.arange(steps.sum()) - np.repeat(np.cumsum(steps) - steps, steps) + 0.5) / steps[seg]).astype(np.float32)
    vol = (np.pi * r**2 * _norm((e - s) * sp) / steps / np.prod(sp)).astype(np.float32)[seg]
    base, w = [], []
    for i in range(3):
        x = s[:, i].astype(np.float32)[seg] + t * (e[:, i] - s[:, i]).astype(np.float32)[seg]
        base.append(np.clip(np.floor(x).astype(np.int64), 0, shape[i] - 2))
        frac = np.clip(x - base[-1], 0, 1)
        w.append((1 - frac, frac))
    lin0 = (base[0] * shape[1] + base[1]) * shape[2] + base[2]
    lin = [lin0 + (cx * shape[1] + cy) * shape[2] + cz for cx, cy, cz in np.ndindex(2, 2, 2)]
    wt = [w[0][cx] * w[1][cy] * w[2][cz] * vol for cx, cy, cz in np.ndindex(2, 2, 2)]
    return np.bincount(np.concatenate(lin), np.concatenate(wt), minlength=int(np.prod(shape))).astype(np.float64)  # int64 when empty
