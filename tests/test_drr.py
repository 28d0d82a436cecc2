"""DRR backend: projector accuracy, determinism, laterality, masks, and findings that show."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from chexforge.backends.drr.backend import cardiothoracic_ratio
from chexforge.backends.drr.geometry import canonical_geometry
from chexforge.backends.drr.project import Slabs, diffdrr_trilinear, joseph, voxel_rays

from .conftest import job


def render(backend, size: int = 128, **kw):
    s = backend.generate([job(size=size, **kw)])[0]
    assert s.error is None, s.error
    return s


def test_joseph_matches_diffdrr_trilinear(drr64):
    """Our projector and diffdrr's renderer give the same line integrals on the same rays."""
    ph = drr64.scene_for(job(size=64)).phantom
    geom = canonical_geometry("PA", 64, ph)
    src, tgt = geom.rays()
    vox = torch.from_numpy(np.linalg.inv(ph.affine)) @ torch.from_numpy(np.linalg.inv(geom.patient_matrix()))
    src_v, tgt_v, lengths, _ = voxel_rays(vox, src, tgt)
    ours = joseph(Slabs.from_xyz(ph.mu, axis=1), src_v, tgt_v, lengths)[0]
    ref = diffdrr_trilinear(ph.mu, src_v, tgt_v, lengths, n_points=800)[0]
    rel = (ours - ref).abs().mean() / ref.abs().mean()
    assert rel < 0.01, float(rel)
    assert np.corrcoef(ours.numpy(), ref.numpy())[0, 1] > 0.999


def test_same_seed_same_pixels_other_seed_differs(drr128):
    a = render(drr128, seed=5)
    b = render(drr128, seed=5)
    c = render(drr128, seed=6)
    assert np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.float32 and a.image.min() >= 0 and a.image.max() <= 1


def test_size_and_detail_level_come_from_each_job(drr128):
    """One backend renders each job at its own size, the CT at the detail level of that size;
    identity() stays the run's and a job's pixels do not depend on the jobs rendered before."""
    identity = drr128.identity()
    small = render(drr128, size=64, seed=2)
    big = render(drr128, size=256, seed=2)
    assert small.image.shape == (64, 64) and big.image.shape == (256, 256)
    # The bundled CT is 0.7 mm in-plane: 2.8 mm voxels for 64 px, 1.4 mm for 256 px (ct.choose_level).
    assert (small.meta["level"], big.meta["level"]) == (2, 1) and small.meta["ct"] == "bundled"
    assert drr128.identity() == identity and "level" not in identity["sampler"]
    assert np.array_equal(render(drr128, size=64, seed=2).image, small.image)


@pytest.mark.parametrize("view", ["PA", "AP"])
def test_patient_left_is_on_the_image_right(drr128, view):
    s = render(drr128, view=view, seed=3)
    col = lambda m: np.argwhere(m)[:, 1].mean()  # noqa: E731
    mid = s.image.shape[1] / 2
    assert col(s.masks["lung_left"]) > mid > col(s.masks["lung_right"])
    assert col(s.masks["heart"]) > mid  # the heart lies to the patient's left


def test_anatomy_masks_sit_on_the_anatomy(drr128):
    s = render(drr128, seed=4)
    lungs, heart = s.masks["lungs"], s.masks["heart"]
    assert 0.15 < lungs.mean() < 0.65  # projected lungs: behind the heart and below the domes too
    aerated = lungs & ~heart
    # Lungs are dark on a radiograph and the cardiac shadow bright: both must hold (about 0.42 and
    # 0.87 on the bundled CT, a contrast of 0.44-0.50 over seeds and views).
    lung_grey, heart_grey = float(s.image[aerated].mean()), float(s.image[heart & ~lungs].mean())
    assert lung_grey < 0.5 and heart_grey - lung_grey > 0.3, (lung_grey, heart_grey)
    ctr = cardiothoracic_ratio({k: torch.from_numpy(v) for k, v in s.masks.items()})
    # The virtual patient's heart: the ratio it was drawn with (this exposure's pose moves it a little).
    assert 0.35 < ctr < 0.58 and abs(ctr - s.meta["patient"]["ctr"]) < 0.06, (ctr, s.meta["patient"]["ctr"])


def noise_sigma(backend, region: np.ndarray, **kw) -> float:
    """Displayed pixel noise: two quantum-noise draws of the very same exposure, differenced."""
    a = backend.render(job(**kw)).image
    b = backend.render(job(**kw), noise_seed=kw["seed"] + 1000).image
    return float((a - b)[region].std() / np.sqrt(2))


FINDINGS = [
    ("Nodule", {"Nodule": 1, "Nodule.laterality": "right", "Nodule.severity": "large"}),
    ("Mass", {"Mass": 1, "Mass.laterality": "left", "Mass.severity": "moderate"}),
    ("Effusion", {"Effusion": 1, "Effusion.laterality": "left", "Effusion.severity": "moderate"}),
    ("Effusion", {"Effusion": 1, "Effusion.laterality": "right", "Effusion.severity": "large"}),
    ("Cardiomegaly", {"Cardiomegaly": 1, "Cardiomegaly.severity": "large"}),
]


@pytest.mark.parametrize("name,attrs", FINDINGS, ids=[f"{n}-{a.get(n + '.laterality', '')}" for n, a in FINDINGS])
def test_each_finding_changes_the_image_where_its_mask_says(drr128, name, attrs):
    seed = 21
    base = render(drr128, seed=seed)
    ill = render(drr128, seed=seed, **attrs)
    mask = ill.masks[name]
    assert mask.any()
    diff = ill.image - base.image  # same seed: same pose and noise, only the finding differs
    inside = float(diff[mask].mean())
    sigma = noise_sigma(drr128, mask, seed=seed, **attrs)
    assert inside > 3 * sigma, (inside, sigma)  # denser = brighter, well above the noise
    far = ~ndi.binary_dilation(mask, iterations=12)
    assert abs(float(diff[far].mean())) < inside / 4  # the rest of the image barely moves
    # The finding's box is exactly its mask's extent.
    boxes = [b for b in ill.boxes if b["label"] == name]
    assert boxes
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    assert min(b["x0"] for b in boxes) == pytest.approx(xs.min() / w)
    assert max(b["y1"] for b in boxes) == pytest.approx((ys.max() + 1) / h)


def test_laterality_of_findings_in_image_coordinates(drr128):
    left = render(drr128, seed=8, Effusion=1, **{"Effusion.laterality": "left", "Effusion.severity": "large"})
    right = render(drr128, seed=8, Nodule=1, **{"Nodule.laterality": "right"})
    mid = left.image.shape[1] / 2
    assert np.argwhere(left.masks["Effusion"])[:, 1].mean() > mid  # patient's left: image right
    assert np.argwhere(right.masks["Nodule"])[:, 1].mean() < mid


def test_effusion_fills_the_base_with_a_meniscus(drr128):
    s = render(drr128, seed=9, Effusion=1, **{"Effusion.laterality": "right", "Effusion.severity": "moderate"})
    m = s.masks["Effusion"]
    lung = s.masks["lung_right"]
    rows = np.nonzero(lung.any(1))[0]
    top_fluid = np.nonzero(m.any(1))[0].min()
    assert top_fluid > rows.min() + (rows.max() - rows.min()) * 0.4  # lower part of the lung
    # Meniscus: the fluid reaches higher at the lateral wall (image left for the right lung) than medially.
    cols = np.nonzero(m.any(0))[0]
    lateral, medial = cols.min() + 2, cols.max() - 2
    assert np.nonzero(m[:, lateral])[0].min() < np.nonzero(m[:, medial])[0].min()


def test_cardiomegaly_reaches_its_ratio(drr128):
    normal = render(drr128, seed=12)
    big = render(drr128, seed=12, Cardiomegaly=1, **{"Cardiomegaly.severity": "moderate"})
    assert normal.meta["ctr"] < 0.5
    assert big.meta["ctr"] >= 0.55
    target = next(f for f in big.meta["findings"] if f["finding"] == "Cardiomegaly")["ctr_target"]
    assert abs(big.meta["ctr"] - target) < 0.05


def test_lesions_do_not_nest(drr128):
    s = render(drr128, seed=30, Nodule=1, Mass=1, **{"Nodule.laterality": "left", "Mass.laterality": "left"})
    assert not (s.masks["Nodule"] & s.masks["Mass"]).any()


def test_nothing_is_placed_twice_the_same_way(drr128):
    a = render(drr128, seed=31, Nodule=1, **{"Nodule.laterality": "right"})
    b = render(drr128, seed=32, Nodule=1, **{"Nodule.laterality": "right"})
    assert not np.array_equal(a.masks["Nodule"], b.masks["Nodule"])


@pytest.mark.slow
def test_renders_at_512():
    from chexforge.backends.drr.backend import DRRBackend
    from chexforge.backends.drr.options import DRROptions

    s = DRRBackend(DRROptions()).generate([job(size=512, seed=2, Nodule=1)])[0]
    assert s.image.shape == (512, 512) and s.masks["Nodule"].any() and s.meta["level"] == 0
