"""DRR realism and image-chain physics: rendered normals against published adult PA normals,
and the polychromatic chain against the physics it claims (tables, beam hardening, noise, MTF)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from chexforge.backends.drr import imaging, realism
from chexforge.backends.drr.ct import BONE_GAIN, MU_WATER

from .conftest import job

SEEDS = range(8)


@pytest.fixture(scope="module")
def normals(drr128):
    """Size statistics of 8 rendered normal PA radiographs (women and men, 25-75 years)."""
    scene = drr128.scene_for(job())  # one CT, one size: every job below renders on this scene
    cover = realism.cover_slabs(scene.phantom)
    out = []
    for seed in SEEDS:
        j = job(seed=seed, sex="F" if seed % 2 else "M", age=25 + 7 * seed)
        s = drr128.render(j, scene=scene)
        field = realism.field_masks(scene, s, cover, drr128.options.projector, backend=drr128, job=j)
        out.append(realism.size_stats(s.masks, field, s.meta))
    return out


def _inside(normals, key):
    """The published range holds the middle ~90 % of normal adults: every virtual patient is a
    different person, so most (not all) of 8 fall inside, and their mean well inside."""
    pub = realism.PUBLISHED[key]
    values = np.array([r[key] for r in normals])
    assert np.isfinite(values).all()
    inside = (pub.low <= values) & (values <= pub.high)
    assert inside.sum() >= 6, (key, values.round(3), (pub.low, pub.high))
    assert pub.low < values.mean() < pub.high
    return values


def test_cardiothoracic_ratio_of_normals_is_normal(normals):
    ctr = _inside(normals, "ctr")
    assert 0.42 <= ctr.mean() <= 0.48  # published means of normal adults: 0.43-0.47


def test_thoracic_width_of_normals_is_adult(normals):
    _inside(normals, "width_both_cm")


def test_left_lung_height_apex_to_dome_is_adult(normals):
    _inside(normals, "height_apex_dome_left_cm")


def test_right_lung_height_apex_to_dome_is_adult(normals):
    _inside(normals, "height_apex_dome_right_cm")


def test_lungs_are_measured_in_the_patient_plane(normals):
    r = normals[0]
    assert 1.04 < r["magnification"] < 1.15  # PA at 180 cm
    assert r["height_both_cm_patient"] * r["magnification"] > r["height_apex_dome_right_cm"]


# ---- image chain ------------------------------------------------------------------------------


def test_tables_agree_with_the_phantom_and_nist():
    # Water at 60 keV from the NIST table is the phantom's single-energy water.
    assert imaging.mass_attenuation("water", 60.0) / 10 == pytest.approx(MU_WATER, rel=0.005)
    # Cortical bone reads ~1600 HU at a CT's effective energy.
    assert 1450 < imaging.bone_hu() < 1750


@pytest.mark.parametrize("hu", [-1000.0, -80.0, 40.0, 150.0, 400.0, 1000.0])
def test_two_material_split_reproduces_each_voxel(hu):
    mu = MU_WATER * (1 + hu / 1000) if hu <= 150 else MU_WATER * (1.15 + BONE_GAIN * (hu - 150) / 1000)
    mu_t = torch.tensor([mu], dtype=torch.float32)
    rho_b = imaging.bone_density(mu_t)
    tw, tb = imaging.material_paths(mu_t * 10, rho_b * 10)  # a 10 mm path through the voxel
    if hu <= 150:
        assert float(rho_b) == 0 and float(tw) == pytest.approx(1 + hu / 1000, abs=1e-4)
    else:
        f = (hu - 150) / (imaging.bone_hu() - 150)
        assert float(tb) == pytest.approx(imaging.BONE_DENSITY * f, rel=1e-4)
        assert float(tw) == pytest.approx(1.15 * (1 - f), abs=1e-4)


def test_beam_hardens_through_water_and_bone_contrast_falls_with_kvp():
    b = imaging.beam(120)

    def attenuation(beam, tw, tb=0.0):
        ln = beam.lookup(torch.tensor([[tw]]), torch.tensor([[tb]]))[0, 0, 0]
        return float(beam.log_signal[0, 0, 0] - ln)

    mu_thin = attenuation(b, 1.0)
    mu_thick = (attenuation(b, 30.0) - attenuation(b, 29.0))
    assert mu_thick < 0.93 * mu_thin  # harder beam behind 30 cm of water
    assert 0.17 < mu_thick < mu_thin < 0.25  # cm²/g, between water's mu at 100 and 50 keV
    bone = {kvp: attenuation(imaging.beam(kvp), 15.0, 1.0) - attenuation(imaging.beam(kvp), 15.0) for kvp in (70, 120)}
    assert bone[120] < 0.85 * bone[70]  # high-kV chest technique: ribs less conspicuous


def test_lookup_matches_the_spectral_sum():
    b = imaging.beam(120)
    e, flu = imaging.spectrum(120)
    keep = flu > 0
    e, q = e[keep], flu[keep] / flu[keep].sum()
    absorbed = q * imaging.csi_absorption(e)
    rng = np.random.default_rng(0)
    tw, tb = rng.uniform(0, 50, 200), rng.uniform(0, 10, 200)
    att = np.exp(-(np.outer(tw, imaging.mass_attenuation("water", e)) + np.outer(tb, imaging.mass_attenuation("bone", e))))
    exact = np.log(att @ (absorbed * e))
    lut = b.lookup(torch.tensor(tw, dtype=torch.float32)[None], torch.tensor(tb, dtype=torch.float32)[None])[0, 0]
    assert np.abs(lut.numpy() - exact).max() < 2e-3


def test_quantum_noise_follows_the_dose():
    shape = (96, 96)
    integral = torch.full(shape, 2.0)  # ~10 cm of water, no bone
    bone = torch.zeros(shape)

    def noise(dose):
        g = torch.Generator().manual_seed(3)
        return float(imaging.expose_poly(integral, bone, 1.0, dose, 0.0, 0.0, g).std())

    ratio = noise(1.0) / noise(4.0)
    assert 1.8 < ratio < 2.2  # sigma ~ 1/sqrt(dose)
    # ... and its size is the Poisson prediction for that many detected quanta (Swank-like energy weighting).
    b = imaging.beam(120)
    tw, tb = imaging.material_paths(integral[:1, :1], bone[:1, :1])
    ln = b.lookup(tw, tb)
    n0 = imaging.detector_kerma_ugy(1.0) * b.fluence_per_ugy * imaging.GRID_PRIMARY
    predicted = math.sqrt(float(torch.exp(ln[1] - 2 * ln[0])) / n0)
    assert noise(1.0) == pytest.approx(predicted, rel=0.15)


def test_mtf_filters_a_sine_by_its_value():
    pixel_mm, f = 0.2, 1.0  # 1 cycle/mm
    x = torch.arange(128, dtype=torch.float64) * pixel_mm
    img = (1 + 0.5 * torch.cos(2 * math.pi * f * x))[None].repeat(128, 1)
    out = imaging.apply_mtf(img, pixel_mm, 0.12)
    sl = slice(39, 89)  # ten whole periods, away from the borders
    amp = float(2 * ((out[64, sl] - 1) * torch.cos(2 * math.pi * f * x[sl])).mean())
    assert amp / 0.5 == pytest.approx(float(imaging.mtf(torch.tensor(f), 0.12)), rel=0.03)
    assert 0.55 < float(imaging.mtf(torch.tensor(1.0), 0.12)) < 0.8  # CsI panel at 1 lp/mm


def test_right_lung_share_statistic_known_answer():
    """`right_share_of_field_area` is the right lung field's pixels over both fields' (the
    patient's right: `lung_right`), measured on the field masks, not the whole projected lungs."""
    left, right = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    right[1:7, 1:6], left[1:5, 6:9] = True, True  # 30 and 12 pixels
    whole = {"lung_left": left | np.eye(10, dtype=bool), "lung_right": right}  # the whole lungs differ from the fields
    meta = {"ctr": 0.45, "geometry": {"pixel_mm": 1.0, "magnification": 1.1}}
    stats = realism.size_stats(whole, {"lung_left": left, "lung_right": right}, meta)
    assert stats["right_share_of_field_area"] == 30 / 42
    assert stats["field_area_both_cm2_patient"] == pytest.approx(42 / 1.1**2 / 100)
    empty = np.zeros((10, 10), bool)
    assert realism.size_stats(whole, {"lung_left": empty, "lung_right": empty}, meta)["right_share_of_field_area"] == 0.0


def test_the_right_lung_is_the_larger(normals):
    """On every normal the patient's right lung projects larger than the left (53.3 ± 1.3 %,
    range 50.5-56.3 %, of the lung volume on upright CT, Yamada et al. 2020)."""
    share = np.array([r["area_right_fraction"] / (r["area_right_fraction"] + r["area_left_fraction"]) for r in normals])
    assert ((0.505 < share) & (share < 0.60)).all(), share.round(3)


@pytest.mark.xfail(strict=True, reason="DRR realism, open: the right lung field (above the projected liver dome) "
                                       "is 40-48 % of the fields on virtual patients (midline shadow left out) against 50-58 % published")
def test_right_lung_share_of_the_field_area_is_published(normals):
    _inside(normals, "right_share_of_field_area")
