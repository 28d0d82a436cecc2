"""DRR findings beyond nodule/mass/effusion/cardiomegaly: each shows where its mask says, on
the requested side, on the right anatomy; impossible requests fail loudly; all deterministic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from chexforge.backends.drr.findings import Inserter, PlacementError
from chexforge.backends.drr.findings_place import RENDERED, JobScene
from chexforge.backends.drr.project import Slabs, joseph
from chexforge.backends.drr.realism import geometry_from_meta

from .conftest import assert_finding_shows, job

SEED = 21
CHEXPERT = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Effusion", "Pleural Other", "Fracture",
            "Support Devices")


def render(backend, device_kinds=None, **kw):
    """The job made of `kw`; `device_kinds` names its support devices (else they are drawn)."""
    return backend.render(job(**kw), device_kinds=device_kinds)


def phantom(backend):
    return backend.scene_for(job()).phantom


@pytest.fixture(scope="module")
def base(drr128):
    """The normal film and a second noise draw of it, for every comparison at SEED."""
    return render(drr128, seed=SEED), drr128.render(job(seed=SEED), noise_seed=SEED + 1000)


# Every finding on three virtual patients: the job's own (SEED), a woman and an old man.
PERSONS = [{}, {"patient_seed": 404, "sex": "F", "age": 45}, {"patient_seed": 505, "sex": "M", "age": 77}]


@pytest.fixture(scope="module", params=PERSONS, ids=["seed-patient", "F45", "M77"])
def person(request, drr128):
    """A patient, its normal film and a second noise draw of it."""
    kw = request.param
    return kw, render(drr128, seed=SEED, **kw), drr128.render(job(seed=SEED, **kw), noise_seed=SEED + 1000)


# (finding, attributes, expected sign of the change inside the mask, expected image side)
CASES = [
    ("Enlarged Cardiomediastinum", {"Enlarged Cardiomediastinum.severity": "large"}, +1, "middle"),
    ("Lung Opacity", {"Lung Opacity.laterality": "right", "Lung Opacity.severity": "moderate"}, +1, "right"),
    ("Lung Lesion", {"Lung Lesion.laterality": "left"}, +1, "left"),
    ("Edema", {"Edema.severity": "large"}, +1, "both"),
    ("Consolidation", {"Consolidation.laterality": "left", "Consolidation.severity": "large"}, +1, "left"),
    ("Pneumonia", {"Pneumonia.laterality": "right"}, +1, "right"),
    ("Atelectasis", {"Atelectasis.laterality": "left", "Atelectasis.severity": "large"}, +1, "left"),
    ("Atelectasis", {"Atelectasis.laterality": "right", "Atelectasis.severity": "small"}, +1, "right"),
    ("Pneumothorax", {"Pneumothorax.laterality": "left", "Pneumothorax.severity": "moderate"}, -1, "left"),
    ("Pneumothorax", {"Pneumothorax.laterality": "bilateral", "Pneumothorax.severity": "large"}, -1, "both"),
    ("Pleural Other", {"Pleural Other.laterality": "right", "Pleural Other.severity": "moderate"}, +1, "right"),
    ("Fracture", {"Fracture.laterality": "right"}, 0, "right"),
    ("Fracture", {"Fracture.laterality": "left"}, 0, "left"),
    ("Support Devices", {"device_kinds": ("ett",)}, +1, "middle"),
    ("Support Devices", {"device_kinds": ("cvc", "pacemaker")}, +1, None),
]


@pytest.mark.parametrize("name,attrs,sign,where", CASES,
                         ids=[f"{c[0]}-{'-'.join(v if isinstance(v, str) else '+'.join(v) for v in c[1].values())}"
                              for c in CASES])
def test_finding_changes_the_image_where_its_mask_says(drr128, person, name, attrs, sign, where):
    kw, normal, other_noise = person
    ill = render(drr128, seed=SEED, **kw, **{name: 1}, **attrs)
    mask = assert_finding_shows(normal, other_noise, ill, name, sign)
    w = mask.shape[1]
    boxes = [b for b in ill.boxes if b["label"] == name]
    # Laterality in image coordinates: the patient's left is on the image's right (PA).
    cols = np.argwhere(mask)[:, 1] / w
    if where == "left":
        assert cols.mean() > 0.5 and cols.min() > 0.4
    elif where == "right":
        assert cols.mean() < 0.5 and cols.max() < 0.6
    elif where == "middle":
        assert abs(cols.mean() - 0.5) < 0.1
    elif where == "both":
        assert cols.min() < 0.35 and cols.max() > 0.65 and len(boxes) == 2


def test_every_chexpert_label_is_registered_and_planned():
    from chexforge.contracts.backends import backend_info
    from chexforge.plan import plan
    from chexforge.recipe import parse_recipe

    drr = backend_info("drr").findings
    assert set(CHEXPERT) <= set(drr) and set(drr) == set(RENDERED)
    findings = {n: {"p": 1.0} for n in CHEXPERT if n not in ("No Finding", "Support Devices")}
    findings["Pneumothorax"]["laterality"] = {"left": 1}
    findings["Fracture"]["laterality"] = {"right": 1}
    findings["Edema"]["severity"] = {"large": 1}
    import json

    rec = parse_recipe(json.dumps({"name": "all", "backend": "drr",
                                   "cohorts": [{"name": "a", "count": 6, "findings": findings}]}))  # JSON is YAML
    df = plan(rec).to_pandas()
    assert (df[list(findings)] == 1).all().all()
    assert set(df["Pneumothorax.laterality"]) == {"left"} and set(df["Fracture.laterality"]) == {"right"}
    assert set(df["Edema.severity"]) == {"large"} and df["Consolidation.severity"].notna().all()
    assert df["Pleural Other.laterality"].isin(["left", "right", "bilateral"]).all()


def test_pneumothorax_rim_is_air_and_the_lung_collapsed(drr128, base):
    normal, _ = base
    ph = phantom(drr128)
    ins = Inserter(ph)
    scene = JobScene(ins)
    from chexforge.backends.drr import findings_pleura

    ptx = findings_pleura.pneumothorax(ins, scene, "right", "large", np.random.default_rng(0))
    rim, kept = ptx.label.numpy(), ptx.beyond.numpy()
    mu0 = ph.mu.numpy()[ptx.box]
    assert rim.sum() > 1000 and np.all(ptx.mu.numpy()[rim] == 0)  # pure air: no lung markings
    assert ptx.mu.numpy()[kept].mean() > 1.3 * mu0[kept].mean()  # the collapsed lung is denser
    s = render(drr128, seed=SEED, Pneumothorax=1, **{"Pneumothorax.laterality": "right", "Pneumothorax.severity": "large"})
    m = s.masks["Pneumothorax"]
    assert (s.image - normal.image)[m].mean() < -0.02  # darker than the same region without it
    assert (m & normal.masks["lung_right"]).sum() >= 0.95 * m.sum()  # within the lung's outline
    # Later findings on that side stay out of the rim.
    s = render(drr128, seed=SEED, Pneumothorax=1, Nodule=1,
               **{"Pneumothorax.laterality": "right", "Pneumothorax.severity": "large", "Nodule.laterality": "right"})
    assert (s.masks["Nodule"] & s.masks["Pneumothorax"]).sum() < 0.2 * s.masks["Nodule"].sum()


def test_fracture_is_on_a_rib_of_the_requested_side(drr128):
    from chexforge.backends.drr import findings_fracture

    ph = phantom(drr128)
    ins = Inserter(ph)
    for seed in range(4):
        f = findings_fracture.rib_fracture(ins, JobScene(ins), "left", np.random.default_rng(seed))
        rib = ph.labels.numpy()[f.box] == ph.structures[f.meta["rib"]]
        label = f.label.numpy()
        assert f.meta["rib"].startswith("rib_left_")
        assert (label & ndi.binary_dilation(rib, iterations=2)).sum() >= 0.6 * label.sum()
        assert f.meta["site_mm"][0] < 0  # the patient's left is -x (RAS)
        assert np.abs(f.mu.numpy() - ph.mu.numpy()[f.box])[f.occupancy.numpy() > 0.5].max() > 0.005


def test_support_devices_follow_the_anatomy(drr128):
    scene = drr128.scene_for(job())
    ph = scene.phantom
    s = render(drr128, seed=SEED, device_kinds=("ett", "cvc", "pacemaker"), **{"Support Devices": 1})
    ett, cvc, pacer = s.meta["findings"]
    assert [f["device"] for f in (ett, cvc, pacer)] == ["endotracheal tube", "central venous catheter", "pacemaker"]
    assert 30 <= ett["tip_above_carina_mm"] <= 60
    to_vox = lambda mm: tuple(np.round((np.array(mm) - ph.affine[:3, 3]) / ph.spacing).astype(int))  # noqa: E731
    assert ph.labels.numpy()[to_vox(ett["tip_mm"])] == ph.structures["trachea"]
    svc = ph.region(("superior_vena_cava",))
    lowest = np.argwhere(svc)[:, 2].min() * ph.spacing[2] + ph.affine[2, 3]
    assert abs(cvc["tip_mm"][2] - lowest) < 25  # lower SVC to the cavo-atrial junction
    # The ETT's mask lies over the trachea's projection (same rays as the render).
    s = render(drr128, seed=SEED, device_kinds=("ett",), **{"Support Devices": 1})
    rays = drr128.rays_for(job(seed=SEED), scene, geometry_from_meta(s.meta))  # through the same patient
    trachea = torch.from_numpy(ph.region(("trachea",)).astype(np.float32))
    over = joseph(Slabs.from_xyz(trachea, axis=1), *rays)[0].view(128, 128).numpy() > 0.5
    m = s.masks["Support Devices"].copy()
    m[: np.nonzero(over.any(1))[0].min()] = False  # below the top of the trachea label
    assert m.sum() > 20 and (m & ndi.binary_dilation(over)).sum() >= 0.9 * m.sum()


def test_masks_sit_on_the_anatomy(drr128, base):
    normal, _ = base
    lungs = normal.masks["lung_left"] | normal.masks["lung_right"]
    for name, attrs in [("Consolidation", {"Consolidation.laterality": "right"}), ("Edema", {}),
                        ("Atelectasis", {"Atelectasis.laterality": "left", "Atelectasis.severity": "moderate"})]:
        m = render(drr128, seed=SEED, **{name: 1}, **attrs).masks[name]
        assert (m & lungs).sum() >= 0.97 * m.sum(), name
    m = render(drr128, seed=SEED, **{"Enlarged Cardiomediastinum": 1}).masks["Enlarged Cardiomediastinum"]
    heart_top = np.nonzero(normal.masks["heart"].any(1))[0].min()
    rows = np.nonzero(m.any(1))[0]
    assert rows.mean() < heart_top + 5  # the superior mediastinum, above the heart


def test_impossible_requests_are_recorded_errors(drr128):
    scene = drr128.scene_for(job(seed=SEED))
    no_left_ribs = {k: v for k, v in scene.phantom.structures.items() if not k.startswith("rib_left_")}
    # The same patient with its left ribs unlabelled, handed to render as the job's scene.
    stripped = dataclasses.replace(scene, inserter=Inserter(dataclasses.replace(scene.phantom, structures=no_left_ribs)),
                                   frontal_ctr={})
    for fields, how, words in [({"Fracture": 1, "Fracture.laterality": "left"}, {"scene": stripped}, "no left ribs"),
                               ({"Fracture": 1, "Fracture.laterality": "bilateral"}, {}, "one-sided"),
                               ({"Support Devices": 1}, {"device_kinds": ("ecmo",)}, "unknown support device")]:
        with pytest.raises(PlacementError, match=words):
            drr128.render(job(seed=SEED, **fields), **how)
    # generate() turns a placement error into the job's recorded failure.
    s = drr128.generate([job(seed=SEED, Fracture=1, **{"Fracture.laterality": "bilateral"})])[0]
    assert s.error is not None and "one-sided" in s.error, s.error
    assert s.image.size == 0 and not s.masks and not s.boxes
    s = drr128.render(job(seed=SEED, Fracture=1, **{"Fracture.laterality": "right"}), scene=stripped)
    assert s.masks["Fracture"].any()


def test_same_seed_same_findings(drr128):
    fields = {"Pneumonia": 1, "Pneumonia.laterality": "bilateral", "Support Devices": 1, "Fracture": 1,
              "Edema": 1, "Pleural Other": 1}
    a = render(drr128, seed=40, **fields)
    b = render(drr128, seed=40, **fields)
    c = render(drr128, seed=41, **fields)
    assert np.array_equal(a.image, b.image) and a.boxes == b.boxes
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert not np.array_equal(a.masks["Pneumonia"], c.masks["Pneumonia"])
