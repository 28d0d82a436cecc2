"""DRR virtual patients: the patient model's demographics (no rendering), different people look
different and the same job renders the same pixels anywhere, a study's views show one person with
one set of findings (also end to end through the CLI and DICOM), findings land where their masks
say on several people, masks follow the deformation, and `virtual_patients: false` is the CT's own
person."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from chexforge.backends.drr.patient import Patient, draw_patient

from .conftest import ROOT, assert_finding_shows, job, write

N = 400  # draws per group


def lungs(s) -> np.ndarray:
    return s.masks["lung_left"] | s.masks["lung_right"]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def rows_of(mask: np.ndarray) -> np.ndarray:
    return np.nonzero(mask.any(1))[0]


def group(sex: str, age: float) -> list[Patient]:
    return [draw_patient(sex, age, seed) for seed in range(N)]


def mean(patients: list[Patient], field: str) -> float:
    return float(np.mean([getattr(p, field) for p in patients]))


# ---- 1. the patient model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def groups() -> dict[tuple[str, int], list[Patient]]:
    return {(sex, age): group(sex, age) for sex in "FM" for age in (30, 40, 50, 60, 80)}


def test_a_patient_is_deterministic_in_sex_age_and_seed():
    a = draw_patient("F", 55, 123)
    assert a == draw_patient("F", 55, 123)  # every field, bit for bit (another worker, shard, resume)
    assert a.as_meta() == draw_patient("F", 55.0, 123).as_meta()
    others = [draw_patient("F", 55, 124), draw_patient("M", 55, 123), draw_patient("F", 75, 123)]
    assert all(o != a for o in others)
    b = others[0]
    # Another seed is another person: not one shared shape parameter is equal.
    for field in ("stature_cm", "bmi", "thorax_width_cm", "lung_height_factor", "ctr", "breast_ml", "vessel_seed"):
        assert getattr(a, field) != getattr(b, field), field
    assert (a.sex, a.age) == ("F", 55.0) and draw_patient(None, None, 1).age == 60.0  # missing age: 60
    assert len({draw_patient("M", 60, s).vessel_seed for s in range(50)}) == 50


def test_women_have_breasts_and_men_none(groups):
    for age in (30, 60, 80):
        women, men = groups[("F", age)], groups[("M", age)]
        assert all(p.breast_ml > 0 for p in women)
        assert all(p.breast_ml == 0 and p.breast_ptosis == 0 for p in men)
        median = float(np.median([p.breast_ml for p in women]))
        assert 300 < median < 800, median  # log-normal, median ~450 ml at BMI 28, growing with BMI
    # Ptosis grows with age.
    assert mean(groups[("F", 80)], "breast_ptosis") > mean(groups[("F", 30)], "breast_ptosis") + 0.2


def test_thoracic_width_by_sex_matches_the_published_difference(groups):
    """Men 29.7, women 27.1 cm on a PA film (magnified 1.08): at the patient 27.5 and 25.1 cm,
    2.6 / 1.08 = 2.4 cm apart."""
    for age in (30, 60):
        men, women = mean(groups[("M", age)], "thorax_width_cm"), mean(groups[("F", age)], "thorax_width_cm")
        assert men == pytest.approx(29.7 / 1.08, abs=0.6)
        assert women == pytest.approx(27.1 / 1.08, abs=0.6)
        assert 2.6 / 1.08 - 0.5 < men - women < 2.6 / 1.08 + 0.5, (men, women)


def test_bone_density_falls_with_age_faster_in_women(groups):
    young = {s: mean(groups[(s, 30)], "bone_density") for s in "FM"}
    old = {s: mean(groups[(s, 80)], "bone_density") for s in "FM"}
    assert young["F"] == pytest.approx(1.0, abs=0.03) and young["M"] == pytest.approx(1.0, abs=0.03)
    loss = {s: young[s] - old[s] for s in "FM"}
    assert loss["M"] > 0.1 and loss["F"] > loss["M"] + 0.02, loss  # ~0.24 in women, ~0.19 in men
    for s in "FM":  # monotone over the decades
        assert mean(groups[(s, 50)], "bone_density") > mean(groups[(s, 60)], "bone_density") > old[s]


def test_calcification_rises_with_age(groups):
    for s in "FM":
        cart = [mean(groups[(s, a)], "cartilage_calcification") for a in (30, 40, 60, 80)]
        assert cart == sorted(cart) and cart[0] < 0.15 and cart[-1] > 0.6, cart
        aortic = [mean(groups[(s, a)], "aortic_calcification") for a in (30, 40, 60, 80)]
        share = [np.mean([p.aortic_calcification > 0 for p in groups[(s, a)]]) for a in (30, 60, 80)]
        assert aortic[0] == aortic[1] == 0  # none before 45
        assert aortic[2] > 0 and aortic[3] > 2 * aortic[2], aortic  # steeply after 50
        assert share[0] == 0 < share[1] < share[2], share


def test_right_dome_is_higher_on_average(groups):
    steps = np.array([p.dome_step_mm for k in (("M", 60), ("F", 60)) for p in groups[k]])
    assert steps.mean() == pytest.approx(15, abs=1.5)  # about half an interspace
    assert 5 < steps.std() < 12  # ± 8-10 mm
    assert (steps > 0).mean() > 0.85  # the right dome above the left in most people


def test_ctr_is_aimed_higher_in_women_and_rises_with_age(groups):
    for age in (30, 60, 80):
        diff = mean(groups[("F", age)], "ctr") - mean(groups[("M", age)], "ctr")
        assert 0.008 < diff < 0.03, (age, diff)  # 0.465-0.47 against 0.45
    for s in "FM":
        ctr = [mean(groups[(s, a)], "ctr") for a in (30, 40, 60, 80)]
        assert ctr[0] == pytest.approx(ctr[1], abs=0.003)  # flat up to 40
        assert 0.025 < ctr[3] - ctr[1] < 0.06, ctr  # +0.01 a decade after 40


# ---- 2. different people; the same job the same pixels anywhere ----------------------------------------

def test_patient_seeds_are_different_people(drr64):
    for sex in "FM":
        a, b = (drr64.render(job(seed=3, size=64, sex=sex, age=55, patient_seed=ps)) for ps in (1, 3))
        assert a.meta["patient"]["seed"] == 1 and b.meta["patient"]["seed"] == 3
        assert a.meta["patient"] != b.meta["patient"]
        corr = float(np.corrcoef(a.image.ravel(), b.image.ravel())[0, 1])
        assert corr < 0.995, corr
        assert iou(lungs(a), lungs(b)) < 0.97
        # The threshold means something: another noise draw of one person is far above it.
        again = drr64.render(job(seed=3, size=64, sex=sex, age=55, patient_seed=1), noise_seed=99)
        assert float(np.corrcoef(a.image.ravel(), again.image.ravel())[0, 1]) > 0.9999


def test_the_seed_is_the_patient_when_there_is_no_patient_seed(drr64):
    a = drr64.render(job(seed=8, size=64))
    b = drr64.render(job(seed=8, size=64, patient_seed=8))
    c = drr64.render(job(seed=8, size=64, patient_seed=float("nan")))  # a null read from parquet
    assert a.meta["patient"]["seed"] == 8 and a.meta["patient"] == draw_patient("M", 60, 8).as_meta() | {"seed": 8}
    assert np.array_equal(a.image, b.image) and np.array_equal(a.image, c.image)


def test_the_same_job_renders_the_same_pixels_anywhere(drr64):
    from chexforge.backends.drr.backend import DRRBackend

    j = job(seed=5, size=64, sex="F", age=70, patient_seed=42, anatomy=["lungs", "lung_left", "lung_right", "heart"])
    first = drr64.render(j)
    drr64.render(job(seed=5, size=64, sex="M", age=30, patient_seed=43))  # another person in between
    second = drr64.render(j)
    fresh = DRRBackend(drr64.options.model_copy()).render(j)  # another worker, shard or resume
    for other in (second, fresh):
        assert np.array_equal(first.image, other.image)
        assert first.masks.keys() == other.masks.keys()
        assert all(np.array_equal(first.masks[k], other.masks[k]) for k in first.masks)
        assert first.meta["patient"] == other.meta["patient"] and first.meta["geometry"] == other.meta["geometry"]
    assert first.meta["patient"]["sex"] == "F" and first.meta["patient"]["breast_ml"] > 0


# ---- 3. studies -----------------------------------------------------------------------------------

STUDY = dict(patient_seed=500, sex="F", age=70, size=64)


def test_the_views_of_a_study_show_one_patient_with_the_same_findings(drr64):
    findings = {"Effusion": 1, "Effusion.laterality": "left", "Effusion.severity": "large",
                "Nodule": 1, "Nodule.laterality": "right"}
    pa = drr64.render(job(seed=11, view="PA", **STUDY, **findings))
    ll = drr64.render(job(seed=12, view="LL", **STUDY, **findings))
    assert pa.meta["patient"] == ll.meta["patient"] and pa.meta["patient"]["seed"] == 500
    assert [f["finding"] for f in pa.meta["findings"]] == ["Effusion", "Nodule"]
    assert pa.meta["findings"] == ll.meta["findings"]  # the same insertions in 3-D
    assert pa.meta["geometry"] != ll.meta["geometry"]  # each view its own exposure
    # Another exposure of the same study's PA: the same findings; another study: other findings.
    pa2 = drr64.render(job(seed=13, view="PA", **STUDY, **findings))
    assert pa2.meta["findings"] == pa.meta["findings"] and pa2.meta["geometry"] != pa.meta["geometry"]
    other = drr64.render(job(seed=11, view="PA", **{**STUDY, "patient_seed": 501}, **findings))
    assert other.meta["findings"] != pa.meta["findings"]
    # Both views show the findings, the effusion on the patient's left: image right on the PA.
    assert pa.masks["Effusion"].any() and ll.masks["Effusion"].any() and ll.masks["Nodule"].any()
    assert np.argwhere(pa.masks["Effusion"])[:, 1].mean() > 32 > np.argwhere(pa.masks["Nodule"])[:, 1].mean()


def test_a_study_with_cardiomegaly_has_one_heart_in_every_view(drr64):
    findings = {"Cardiomegaly": 1, "Nodule": 1, "Nodule.laterality": "left"}
    views = [drr64.render(job(seed=seed, view=view, **{**STUDY, "sex": "M", "age": 60}, **findings))
             for seed, view in ((100, "LL"), (20, "PA"), (23, "PA"))]
    assert all(v.meta["patient"] == views[0].meta["patient"] for v in views)
    assert all(v.meta["findings"] == views[0].meta["findings"] for v in views), [v.meta["findings"] for v in views]


STUDY_RECIPE = """
name: vp-study
seed: 5
backend: drr
output: {size: 64, formats: [png, dicom]}
cohorts:
  - name: pairs
    count: 2
    study: {views: [PA, LL]}
    demographics: {sex: [F, M], age: [40, 80]}
    findings: {Effusion: {p: 1.0, laterality: [left]}}
"""


def test_a_study_recipe_end_to_end_through_the_cli(tmp_path):
    import pydicom

    from .test_export import dciodvfy

    recipe = write(tmp_path, STUDY_RECIPE)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "chexforge.cli", "generate", str(recipe), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "3000"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    studies: dict[str, list[dict]] = {}
    for r in rows:
        studies.setdefault(r["patient_id"], []).append(r)
    assert len(studies) == 2
    patients = []
    for pid, (pa, ll) in studies.items():
        assert (pa["view"], ll["view"]) == ("PA", "LL")
        assert pa["study_id"] == ll["study_id"] and pa["patient_seed"] == ll["patient_seed"]
        assert (pa["sex"], pa["age"], pa["Effusion"]) == (ll["sex"], ll["age"], ll["Effusion"]) and pa["Effusion"] == 1
        assert pa["seed"] != ll["seed"]
        ma, mb = json.loads(pa["meta"]), json.loads(ll["meta"])
        assert ma["patient"] == mb["patient"] and ma["patient"]["seed"] == pa["patient_seed"]
        assert (ma["patient"]["sex"], ma["patient"]["age"]) == (pa["sex"], pa["age"])
        assert ma["findings"] == mb["findings"] and ma["findings"][0]["side"] == "left"
        assert ma["geometry"]["view"] == "PA" and mb["geometry"]["view"] == "LL"
        patients.append(ma["patient"])
        a, b = (pydicom.dcmread(out / r["image_dicom"]) for r in (pa, ll))
        assert a.PatientID == b.PatientID == pid
        assert a.StudyInstanceUID == b.StudyInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
        assert (a.ViewPosition, b.ViewPosition) == ("PA", "LL")
        for r in (pa, ll):
            text = dciodvfy(out / r["image_dicom"])
            assert "DXImageForPresentation" in text
            assert not [line for line in text.splitlines() if line.startswith("Error")], text
    assert patients[0] != patients[1] and patients[0]["seed"] != patients[1]["seed"]
    first, second = (pydicom.dcmread(out / s[0]["image_dicom"]) for s in studies.values())
    assert first.StudyInstanceUID != second.StudyInstanceUID


# ---- 4. findings on several people ----------------------------------------------------------------

PEOPLE = [("F", 35, 101), ("M", 72, 202), ("F", 81, 303)]
# (finding, attributes, device kinds, expected sign inside the mask, expected image side)
CASES = [
    ("Effusion", {"Effusion.laterality": "left", "Effusion.severity": "large"}, None, +1, "left"),
    ("Nodule", {"Nodule.laterality": "right"}, None, +1, "right"),
    ("Pneumothorax", {"Pneumothorax.laterality": "left", "Pneumothorax.severity": "moderate"}, None, -1, "left"),
    ("Cardiomegaly", {"Cardiomegaly.severity": "large"}, None, +1, "heart"),
    ("Support Devices", {}, ("ett",), +1, "middle"),
]


@pytest.fixture(scope="module")
def normals(drr128):
    """Per person: the normal film and a second noise draw of it."""
    cache = {}

    def get(sex, age, ps):
        if ps not in cache:
            j = job(seed=21, patient_seed=ps, sex=sex, age=age)
            cache[ps] = drr128.render(j), drr128.render(j, noise_seed=1021)
        return cache[ps]
    return get


@pytest.mark.parametrize("sex,age,ps", PEOPLE, ids=[f"{s}{a}-p{p}" for s, a, p in PEOPLE])
@pytest.mark.parametrize("name,attrs,kinds,sign,where", CASES, ids=[c[0] for c in CASES])
def test_findings_show_where_their_masks_say_on_several_people(drr128, normals, sex, age, ps, name, attrs, kinds, sign, where):
    normal, other_noise = normals(sex, age, ps)
    ill = drr128.render(job(seed=21, patient_seed=ps, sex=sex, age=age, **{name: 1}, **attrs), device_kinds=kinds)
    assert ill.meta["patient"] == normal.meta["patient"] and ill.meta["patient"]["sex"] == sex
    mask = assert_finding_shows(normal, other_noise, ill, name, sign, sigmas=5.0)
    ys, xs = np.nonzero(mask)
    w = mask.shape[1]
    # Laterality in image coordinates: the patient's left is on the image's right (PA).
    cols = xs / w
    if where == "left":
        assert cols.mean() > 0.5 and cols.min() > 0.4, (cols.mean(), cols.min())
        assert (mask & normal.masks["lung_left"]).sum() > 0.5 * mask.sum()
    elif where == "right":
        assert cols.mean() < 0.5 and cols.max() < 0.6, (cols.mean(), cols.max())
        assert (mask & normal.masks["lung_right"]).sum() > 0.9 * mask.sum()
    elif where == "middle":
        assert abs(cols.mean() - 0.5) < 0.1, cols.mean()
    elif where == "heart":  # the enlarged heart: over the normal one, reaching further to the patient's left
        assert 0.5 < cols.mean() < 0.6 and (mask & normal.masks["heart"]).sum() >= 0.95 * normal.masks["heart"].sum()
        target = next(f for f in ill.meta["findings"] if f["finding"] == "Cardiomegaly")["ctr_target"]
        # The enlarged heart is the patient's (one heart for every view of a study), aimed on its
        # canonical PA film: this exposure's pose moves the measured ratio a little.
        assert ill.meta["ctr"] > normal.meta["ctr"] + 0.03 and abs(ill.meta["ctr"] - target) < 0.07, \
            (normal.meta["ctr"], ill.meta["ctr"], target)


# ---- 5. masks follow the deformation --------------------------------------------------------------

def _right_dome_row(image: np.ndarray, lung: np.ndarray) -> int:
    """Where the image turns from dark lung to the bright diaphragm, down the middle third of the
    right lung's columns: the first row below mid-lung brighter than halfway between the lung's
    and the abdomen's brightness."""
    cols, rows = np.nonzero(lung.any(0))[0], rows_of(lung)
    w = cols.max() - cols.min()
    profile = image[:, cols.min() + w // 3: cols.max() - w // 3 + 1].mean(1)
    mid = (rows.min() + rows.max()) // 2
    dark = float(np.median(profile[rows.min() + (rows.max() - rows.min()) // 4: mid]))
    half = (dark + float(profile[mid:].max())) / 2
    return int(mid + np.argmax(profile[mid:] > half))


def _as(drr, monkeypatch, patient: Patient, **kw):
    """Render job(**kw) on `patient` instead of the one its seeds draw."""
    monkeypatch.setattr(drr, "patient_for", lambda j: patient)
    s = drr.render(job(**kw))
    monkeypatch.undo()
    assert s.meta["patient"] == {"seed": s.meta["patient"]["seed"], **patient.as_meta()}
    return s


@pytest.mark.parametrize("sex,age,ps,seed", [("M", 60, 7, 5), ("F", 70, 11, 6)])
def test_lung_height_moves_masks_and_image_together(drr128, monkeypatch, sex, age, ps, seed):
    """Lungs 0.86 and 1.08 times the CT's height: the domes (and everything below them) move
    down by 0.22 × the CT's right apex-to-dome distance, in the masks and in the image alike."""
    from chexforge.backends.drr import deform

    base = draw_patient(sex, age, ps)
    renders = []
    for f in (0.86, 1.08):
        # The film is framed on the patient's lungs (a taller chest, a lower aim): pinned here, so
        # both are the same exposure and only the lungs differ.
        monkeypatch.setattr(deform, "dome_drop", lambda p, lm: 0.0)
        renders.append(_as(drr128, monkeypatch, dataclasses.replace(base, lung_height_factor=f), seed=seed, sex=sex, age=age))
    short, tall = renders
    assert short.meta["geometry"] == tall.meta["geometry"]  # the same exposure: only the lungs differ
    scene = drr128.scene_for(job(seed=seed))
    lm = scene.inserter.cached("landmarks", lambda: deform.landmarks(scene.phantom))
    g = tall.meta["geometry"]
    px_per_mm = g["scale"][2] * g["inspiration"] * g["magnification"] / g["pixel_mm"]
    expected = 0.22 * (lm.apex["right"] - lm.dome["right"]) * px_per_mm  # ~13-14 px at 128
    assert expected > 8
    mask_drop = {}
    for side in ("left", "right"):
        a, b = rows_of(short.masks[f"lung_{side}"]), rows_of(tall.masks[f"lung_{side}"])
        assert abs(int(a.min()) - int(b.min())) <= 1  # the apices stay
        if b.max() < tall.image.shape[0] - 1:  # (a lung cut off at the film's edge says nothing of its height)
            mask_drop[side] = int(b.max() - a.max())
    assert mask_drop and all(d == pytest.approx(expected, rel=0.3) for d in mask_drop.values()), (mask_drop, expected)
    moved = _right_dome_row(tall.image, tall.masks["lung_right"]) - _right_dome_row(short.image, short.masks["lung_right"])
    assert moved == pytest.approx(expected, rel=0.25), (moved, expected)  # the image's dome moved as the masks did
    assert all(abs(d - moved) <= 0.3 * expected for d in mask_drop.values()), (mask_drop, moved)


def test_dome_step_lowers_the_left_lung_against_the_right(drr128, monkeypatch):
    base = draw_patient("M", 60, 7)
    flat, stepped = (_as(drr128, monkeypatch, dataclasses.replace(base, dome_step_mm=step), seed=5) for step in (-5.0, 35.0))
    g = flat.meta["geometry"]
    px_per_mm = g["scale"][2] * g["inspiration"] * g["magnification"] / g["pixel_mm"]
    drop = {side: int(rows_of(stepped.masks[f"lung_{side}"]).max() - rows_of(flat.masks[f"lung_{side}"]).max())
            for side in ("left", "right")}
    assert drop["right"] <= 3  # the right dome stays where the lung height puts it
    assert drop["left"] - drop["right"] == pytest.approx(40 * px_per_mm, rel=0.35), drop


@pytest.mark.parametrize("sex,age,ps,seed", [("M", 60, 7, 5), ("F", 70, 11, 6), ("M", 40, 12, 8)])
def test_the_heart_mask_follows_the_drawn_ctr(drr128, monkeypatch, sex, age, ps, seed):
    """Hearts aimed at a cardiothoracic ratio of 0.40 and 0.50 on one person and exposure: the
    measured ratio and the heart's mask grow with the aim; the lungs' masks barely change."""
    base = draw_patient(sex, age, ps)
    small, big = (_as(drr128, monkeypatch, dataclasses.replace(base, ctr=c), seed=seed, sex=sex, age=age)
                  for c in (0.40, 0.50))
    assert 0.05 < big.meta["ctr"] - small.meta["ctr"] < 0.13, (small.meta["ctr"], big.meta["ctr"])
    assert big.masks["heart"].sum() > 1.15 * small.masks["heart"].sum()
    assert (small.masks["heart"] & big.masks["heart"]).sum() > 0.95 * small.masks["heart"].sum()  # about its centre
    assert abs(int(lungs(big).sum()) - int(lungs(small).sum())) < 0.03 * lungs(small).sum()


@pytest.mark.parametrize("sex,age,ps", PEOPLE, ids=[f"{s}{a}-p{p}" for s, a, p in PEOPLE])
def test_a_virtual_patients_lung_masks_are_dark_lung(drr128, sex, age, ps):
    """Over the upper lungs (apex to mid-height, above the heart), the masks hold the dark lung:
    darker than the mediastinum between them and than the chest wall outside them."""
    s = drr128.render(job(seed=31, patient_seed=ps, sex=sex, age=age))
    img, right, left = s.image, s.masks["lung_right"], s.masks["lung_left"]
    both = right | left
    r_rows, l_rows = rows_of(right), rows_of(left)
    top = max(r_rows.min(), l_rows.min()) + 4
    bottom = min(rows_of(s.masks["heart"]).min(), (top + min(r_rows.max(), l_rows.max())) // 2)
    assert bottom - top > 15
    lung, medi, wall = [], [], []
    for r in range(top, bottom):
        rc, lc = np.nonzero(right[r])[0], np.nonzero(left[r])[0]
        lung.append(img[r, both[r]])
        medi.append(img[r, rc.max() + 2: lc.min() - 1])  # image left = patient right
        wall.append(np.r_[img[r, max(rc.min() - 6, 0): rc.min() - 1], img[r, lc.max() + 2: lc.max() + 7]])
    lung_m, medi_m, wall_m = (float(np.mean(np.concatenate(x))) for x in (lung, medi, wall))
    assert lung_m < medi_m - 0.1 and lung_m < wall_m - 0.05, (lung_m, medi_m, wall_m)


# ---- 6. virtual patients off --------------------------------------------------------------------

def test_without_virtual_patients_every_job_is_the_cts_own_person():
    from chexforge.backends.drr.backend import DRRBackend
    from chexforge.backends.drr.options import DRROptions

    drr = DRRBackend(DRROptions(virtual_patients=False))
    assert drr.identity()["sampler"]["virtual_patients"] is False
    a, b = (drr.render(job(seed=4, size=64, sex="F", age=75, patient_seed=ps)) for ps in (1, 2))
    assert "patient" not in a.meta and "patient" not in b.meta
    assert np.array_equal(a.image, b.image)
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert drr.patient_for(job(patient_seed=1)) is None and drr.body_for(job(), drr.scene_for(job(size=64))) is None
