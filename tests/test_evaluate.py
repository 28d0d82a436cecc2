"""chexforge eval: known answers for each metric on tiny images and the random extractor."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from chexforge.cli import main
from chexforge.evaluate import adherence, diversity, features, fidelity, memorization
from chexforge.evaluate.images import load_set
from chexforge.export.manifest import rows_to_table


def _smooth(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A random smooth 'radiograph': a few Gaussian blobs, values in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size))
    for _ in range(4):
        cx, cy, s, a = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3), rng.uniform(-1, 1)
        img += a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    img += 0.05 * rng.standard_normal((size, size))
    return ((img - img.min()) / (np.ptp(img) + 1e-9)).astype(np.float32)


def _write_out(folder, images, prompts, findings):
    """A minimal chexforge output folder: 16-bit PNGs and a manifest."""
    rows = []
    for i, (img, prompt, f) in enumerate(zip(images, prompts, findings)):
        rel = f"images/c/{i:03d}.png"
        (folder / "images/c").mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 65535).astype(np.uint16)).save(folder / rel)
        rows.append({"job_id": f"j{i:03d}", "cohort": "c", "index": i, "seed": 1000 + i, "prompt": prompt,
                     "status": "ok", "image_png": rel, "Effusion": f, "No Finding": 1 - f})
    import pyarrow.parquet as pq

    pq.write_table(rows_to_table(rows), folder / "manifest.parquet")
    return folder


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


# ---- fidelity ------------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero(rng):
    a = rng.standard_normal((200, 8))
    assert fidelity.fid(a, a) == pytest.approx(0.0, abs=1e-6)
    reported, computed = fidelity.frechet(a, a)
    assert computed >= -fidelity.ROUND_OFF * 16 and reported == max(computed, 0.0)


def test_a_negative_fid_is_reported_as_zero_within_round_off_and_is_an_error_beyond(rng, monkeypatch):
    """The computed value is a difference of large terms: -1e-12 for a set against itself is
    round-off (reported 0, the computed value kept beside it); -0.5 is a broken computation."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    a = rng.standard_normal((50, 4))  # terms of size about 2 × 4 (two traces of a unit covariance)
    monkeypatch.setattr(FrechetInceptionDistance, "compute", lambda self: torch.tensor(-1e-12, dtype=torch.float64))
    assert fidelity.frechet(a, a) == (0.0, -1e-12)
    assert fidelity.fid_entry(a, a) == {"fid": 0.0, "fid_computed": -1e-12}
    monkeypatch.setattr(FrechetInceptionDistance, "compute", lambda self: torch.tensor(-0.5, dtype=torch.float64))
    with pytest.raises(ArithmeticError, match=r"FID computed as -0.5, below zero by more than round-off"):
        fidelity.fid(a, a)
    monkeypatch.setattr(FrechetInceptionDistance, "compute", lambda self: torch.tensor(2.5, dtype=torch.float64))
    assert fidelity.fid_entry(a, a) == {"fid": 2.5}


def test_fid_matches_the_analytic_frechet_distance(rng):
    # N(0, I) vs N(mu, s²I) in d dims: ||mu||² + d (1 - s)²
    d, mu, s = 4, np.array([1.0, -2.0, 0.5, 0.0]), 2.0
    a = rng.standard_normal((200_000, d))
    b = mu + s * rng.standard_normal((200_000, d))
    expected = float(mu @ mu + d * (1 - s) ** 2)  # 5.25 + 4 = 9.25
    assert fidelity.fid(a, b) == pytest.approx(expected, rel=0.02)
    assert fidelity.fid(a, a + mu) == pytest.approx(float(mu @ mu), rel=0.01)


def test_kid_of_identical_sets_is_near_zero_and_grows_with_a_shift(rng):
    a = rng.standard_normal((300, 16))
    same, std = fidelity.kid(a, a, subsets=5, subset_size=300)  # the whole set: only the unbiased
    far, _ = fidelity.kid(a, a + 1.0, subsets=5, subset_size=300)  # estimator's diagonal term is left
    assert std == pytest.approx(0.0, abs=1e-9)
    assert abs(same) < 0.01 * far


def test_prdc_of_identical_sets_and_of_disjoint_sets(rng):
    a = rng.standard_normal((100, 6))
    m = fidelity.prdc(a, a, k=5)
    assert m["precision"] == m["recall"] == m["coverage"] == 1.0
    far = fidelity.prdc(a, a + 100.0, k=5)
    assert far["precision"] == far["recall"] == far["coverage"] == far["density"] == 0.0


def test_prdc_precision_falls_when_half_the_fakes_are_off_manifold(rng):
    real = rng.standard_normal((400, 2))
    fake = np.concatenate([rng.standard_normal((200, 2)), rng.standard_normal((200, 2)) + 50])
    m = fidelity.prdc(real, fake, k=5)
    assert 0.4 < m["precision"] < 0.6
    assert m["coverage"] > 0.8


# ---- diversity -----------------------------------------------------------------------------------


def test_ms_ssim_of_identical_images_is_one_and_of_different_ones_less(rng):
    a, b = _smooth(rng, 64), _smooth(rng, 64)
    v = diversity.ms_ssim_pairs(np.stack([a, a, b]), [(0, 1), (0, 2)])
    assert v[0] == pytest.approx(1.0, abs=1e-5)
    assert v[1] < 0.9


def test_diversity_pairs_only_within_a_prompt_and_across_seeds():
    pairs = diversity.group_pairs(["p", "p", "q", "p", "q"], [1, 2, 3, 1, 4])
    assert sorted(pairs) == [(0, 1), (1, 3), (2, 4)]  # (0, 3) share a seed
    out = diversity.diversity(np.zeros((2, 32, 32), np.float32), ["p", "q"], [1, 2], "prompt")
    assert out["available"] is False and "shared" in out["why"]


# ---- memorization --------------------------------------------------------------------------------


def test_a_planted_duplicate_is_flagged_and_a_distinct_image_is_not(rng):
    ref = np.stack([_smooth(rng) for _ in range(12)])
    distinct = _smooth(np.random.default_rng(99))
    gen = np.stack([ref[5], distinct])
    ex = features.random_extractor()
    m = memorization.screen(ex(ref), ex(gen), ["dup", "new"], [f"r{i}" for i in range(12)], threshold=0.95)
    assert m["flagged"] == 1
    assert m["pairs"][0] == {"generated": "dup", "reference": "r5", "cosine": pytest.approx(1.0)}
    assert m["cosine"][1] < 0.95


# ---- adherence and extractors --------------------------------------------------------------------


def test_missing_xrv_model_is_unavailable_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "nowhere"))  # an empty torchxrayvision cache
    import pandas as pd

    out = adherence.findings_adherence(np.zeros((2, 32, 32), np.float32), pd.DataFrame({"Effusion": [0, 1]}))
    assert out["available"] is False
    assert out["why"].startswith("the xrv-densenet weights are not on this machine (")
    assert "never downloads" in out["why"] and str(tmp_path / "nowhere") in out["why"]


def test_auroc_known_answers():
    labels = np.array([0, 0, 1, 1])
    assert adherence.auroc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert adherence.auroc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert adherence.auroc(np.array([0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    assert adherence.auroc(np.array([0.1, 0.2]), np.array([1, 1])) is None


def test_random_extractor_is_deterministic_and_labelled(rng):
    imgs = np.stack([_smooth(rng) for _ in range(3)])
    a, b = features.get_extractor("random"), features.get_extractor("random")
    assert np.array_equal(a(imgs), b(imgs))
    assert a.perceptual is False and "not a perceptual" in a.note


# ---- loading and the command line ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("ev")
    gen_imgs = [_smooth(rng) for _ in range(8)]
    ref_imgs = [_smooth(rng) for _ in range(8)]
    gen = _write_out(root / "gen", gen_imgs, ["a", "a", "a", "a", "b", "b", "b", "b"], [0, 0, 1, 1, 0, 0, 1, 1])
    ref = root / "ref"
    ref.mkdir()
    for i, img in enumerate(ref_imgs):
        Image.fromarray((img * 255).astype(np.uint8)).save(ref / f"r{i}.png")
    return gen, ref, gen_imgs


def test_load_set_reads_16_bit_pngs_and_labels(tiny_out):
    gen, _, gen_imgs = tiny_out
    s = load_set(gen, 48)
    assert len(s) == 8 and s.kind == "manifest"
    assert np.abs(s.images[0] - gen_imgs[0]).max() < 1e-4
    assert s.labels["Effusion"].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


def test_cli_writes_metrics_json(tiny_out, tmp_path):
    """Every number the CLI writes is the library function's on the same images and features."""
    gen, ref, _ = tiny_out
    rc = main(["eval", str(gen), "--reference", str(ref), "--features", "random", "--size", "64",
               "--out", str(tmp_path / "rep"), "--min-per-finding", "4"])
    assert rc == 0
    m = json.loads((tmp_path / "rep/metrics.json").read_text())
    g, r = load_set(gen, 64), load_set(ref, 64)
    ex = features.get_extractor("random")
    fg, fr = ex(g.images), ex(r.images)
    kid_mean, kid_std = fidelity.kid(fr, fg)
    assert m["features"] == {"name": "random", "perceptual": False, "note": ex.note, "dim": fg.shape[1]}
    f = m["fidelity"]
    assert f["available"] and f["fid"] == fidelity.fid(fr, fg) > 1e-3
    assert (f["kid_mean"], f["kid_std"]) == (kid_mean, kid_std)
    assert {k: f[k] for k in ("precision", "recall", "density", "coverage", "k")} == fidelity.prdc(fr, fg, 5)
    assert f["per_finding_fid"]["available"] is False
    assert f["per_finding_fid"]["why"] == "the reference set has no finding labels (a plain folder of images)"
    assert "label CSV" in f["per_finding_fid"]["needs"]
    assert m["diversity"] == diversity.diversity(g.images, g.prompts, g.seeds, "prompt") and m["diversity"]["pairs"] == 12
    screened = memorization.screen(fr, fg, g.ids, r.ids, 0.95)
    assert m["memorization"]["flagged"] == screened["flagged"] and m["memorization"]["pairs"] == screened["pairs"]
    assert (tmp_path / "rep/nearest_pairs.png").is_file()
    assert m["adherence"]["sex"]["available"] is False and "--sex-model" in m["adherence"]["sex"]["why"]


def test_default_features_without_weights_say_why_not(tiny_out, tmp_path, monkeypatch):
    gen, _, _ = tiny_out
    monkeypatch.setenv("HOME", str(tmp_path / "nowhere"))  # an empty torchxrayvision cache
    assert main(["eval", str(gen), "--reference", str(gen), "--size", "48", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("fidelity", "memorization"):
        assert m[key]["available"] is False and "feature extractor" in m[key]["why"]
    assert m["features"]["name"] is None
    g = load_set(gen, 48)  # diversity needs no extractor: 6 same-prompt pairs in each of the 2 prompts
    assert m["diversity"] == diversity.diversity(g.images, g.prompts, g.seeds, "prompt") and m["diversity"]["pairs"] == 12


def test_cli_against_itself_flags_every_image(tiny_out, tmp_path):
    gen, _, _ = tiny_out
    assert main(["eval", str(gen), "--reference", str(gen), "--size", "48", "--out", str(tmp_path),
                 "--min-per-finding", "4", "--features", "random"]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["fidelity"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert m["memorization"]["flagged"] == 8
    assert m["fidelity"]["per_finding_fid"]["Effusion"]["fid"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("args, says", [
    (["eval", "/no/such/folder"], "no such file or folder"),
    (["eval", "{gen}", "--features", "bogus"], "unknown extractor 'bogus'"),
    (["eval", "{gen}", "--features", "raddino"], "needs the local model folder"),
])
def test_bad_input_exits_2_with_one_line(tiny_out, capsys, args, says):
    gen, _, _ = tiny_out
    assert main([a.format(gen=gen) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1


def test_a_label_csv_with_an_image_root_is_a_reference(tiny_out, tmp_path):
    from chexforge.labels.readers import CHEXPERT_COLUMNS

    _, ref, _ = tiny_out
    rows = []
    for i in range(8):
        row = {"Path": f"r{i}.png", "Sex": "Female", "Age": 50, "Frontal/Lateral": "Frontal", "AP/PA": "PA"}
        row.update({c: 0.0 for c in CHEXPERT_COLUMNS})
        row["Pleural Effusion"] = float(i % 2)
        rows.append(row)
    rows.append({**rows[0], "Path": "missing.png"})
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    s = load_set(tmp_path / "train.csv", 32, image_root=ref)
    assert len(s) == 8 and s.kind == "csv" and "1 of 9" in s.notes[0]
    assert s.labels["Effusion"].tolist() == [0, 1, 0, 1, 0, 1, 0, 1]


def test_xrv_weights_on_disk_are_loaded_without_download(tmp_path, monkeypatch):
    """A state dict in torchxrayvision's cache folder makes the extractor and finding adherence
    available, through QC's one loader; a pickled model is refused with a fix. The classifier is
    set so that, by torchxrayvision's label order, "Effusion" scores bright images above dark
    ones and "Atelectasis" the reverse, and every other label is constant: AUROC exactly 1, 0 and
    (constant scores, all tied) 0.5."""
    import pandas as pd
    import torch
    import torch.nn.functional as F

    from chexforge.contracts.model_files import (
        XRV_LABELS,
        XRV_MODELS,
        XRV_STATE_DICTS,
        xrv_cache_dir,
    )
    from chexforge.errors import UserError
    from chexforge.qc.models import xrv_densenet_architecture

    monkeypatch.setenv("HOME", str(tmp_path))
    xrv_cache_dir().mkdir(parents=True)
    torch.manual_seed(0)
    net = xrv_densenet_architecture().eval()
    bright, dark = np.full((32, 32), 0.9, np.float32), np.full((32, 32), 0.1, np.float32)
    with torch.no_grad():
        fb, fd = features.xrv_features(net, torch.from_numpy(np.stack([bright, dark]))[:, None]).double()
        w = 8 * (fb - fd) / (fb - fd).square().sum()  # logits +4 (bright) and -4 (dark)
        b = -(w * (fb + fd) / 2).sum()
        net.classifier.weight.zero_()
        net.classifier.bias.zero_()
        effusion, atelectasis = XRV_LABELS.index("Effusion"), XRV_LABELS.index("Atelectasis")
        net.classifier.weight[effusion], net.classifier.bias[effusion] = w.float(), b.float()
        net.classifier.weight[atelectasis], net.classifier.bias[atelectasis] = -w.float(), -b.float()
    torch.save(net.state_dict(), xrv_cache_dir() / XRV_STATE_DICTS["xrv-densenet"])
    imgs = np.random.default_rng(3).random((4, 32, 32), dtype=np.float32)
    ex = features.get_extractor("xrv-densenet")
    assert features.xrv_weights() == xrv_cache_dir() / XRV_STATE_DICTS["xrv-densenet"]
    x = F.interpolate(torch.from_numpy(imgs)[:, None], (224, 224), mode="bilinear", align_corners=False) * 2048 - 1024
    with torch.no_grad():
        expect = F.adaptive_avg_pool2d(F.relu(net.features(x)), 1).flatten(1)
    got = ex(imgs)
    assert got.shape == (4, 1024) and np.allclose(got, expect.numpy(), rtol=0, atol=1e-5)
    shown = np.stack([bright, dark, bright, dark])
    labels = pd.DataFrame({"Effusion": [1, 0, 1, 0], "Atelectasis": [1, 0, 1, 0], "Edema": [0, 1, 1, 0], "Mass": [1, 1, 1, 1]})
    out = adherence.findings_adherence(shown, labels)
    assert out["available"] is True and out["model"] == "torchxrayvision densenet121-res224-all"
    per = out["per_finding"]
    assert per["Effusion"] == {"auroc": 1.0, "positives": 2} and per["Atelectasis"] == {"auroc": 0.0, "positives": 2}
    assert per["Edema"] == {"auroc": 0.5, "positives": 2}  # a label the classifier ignores: all tied
    assert per["Mass"]["auroc"] is None and out["mean_auroc"] == 0.5
    (xrv_cache_dir() / XRV_STATE_DICTS["xrv-densenet"]).unlink()
    torch.save(net, xrv_cache_dir() / XRV_MODELS["xrv-densenet"])
    with pytest.raises(UserError, match=r"a pickled model \(torchvision.models.densenet.DenseNet\), not a state dict"):
        features.get_extractor("xrv-densenet")


# ---- no reference, no weights: what eval measures from the dataset itself -------------------------

SIM_RECIPE = """
name: eval-sim
seed: 5
backend: simulated
output: {size: 64, formats: [png], masks: true}
cohorts:
  - name: nodules
    count: 4
    view: PA
    findings:
      Nodule: {p: 1.0, laterality: [left, right], severity: {small: 1, large: 1}}
      Support Devices: 0.5
    masks: [lungs, heart]
  - name: effusion
    count: 3
    study: {views: [PA, LL]}
    findings:
      Effusion: {p: 1.0, laterality: {left: 1, right: 1, bilateral: 1}}
"""


@pytest.fixture(scope="module")
def sim_out(tmp_path_factory):
    """10 images of the simulated backend at 64 px: 4 PA nodules, 3 PA + lateral effusion studies."""
    from .conftest import write

    tmp = tmp_path_factory.mktemp("sim")
    assert main(["generate", str(write(tmp, SIM_RECIPE)), "--out", str(tmp / "out"), "--no-progress"]) == 0
    return tmp / "out"


def test_eval_without_reference_or_weights_measures_the_dataset(sim_out, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from chexforge.contracts.model_files import XRV_MODELS

    monkeypatch.setenv("HOME", str(tmp_path / "nowhere"))  # an empty torchxrayvision cache
    assert main(["eval", str(sim_out), "--size", "64", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    df = pq.read_table(sim_out / "manifest.parquet").to_pandas()
    ok = df[df.status == "ok"]
    # the existing keys are all still there
    assert {"chexforge", "generated", "reference", "features", "fidelity", "memorization", "diversity",
            "adherence", "seconds"} <= set(m)
    # pixel diversity within each cohort: the library's numbers on the same images
    g = load_set(sim_out, 64)
    assert m["pixel_diversity"] == json.loads(json.dumps(diversity.per_cohort(g.images, g.cohorts, g.seeds)))
    per = m["pixel_diversity"]["per_cohort"]
    for cohort, rows in ok.groupby("cohort"):  # every pair of the cohort made from different seeds
        seeds = rows.seed.tolist()
        assert per[cohort]["pairs"] == sum(a != b for i, a in enumerate(seeds) for b in seeds[i + 1:])
    assert per["nodules"]["pairs"] == 6
    assert 0 < m["pixel_diversity"]["ms_ssim_mean"] < 1 and -1 <= m["pixel_diversity"]["pixel_corr_mean"] <= 1
    ds = m["dataset"]
    s = ds["summary"]
    assert (s["images"], s["failed"], s["patients"], s["studies"], s["cohorts"]) == (10, 0, 7, 7, 2)
    # composition against the recipe: 4 + 3×2 images asked for and made, all PA / LL as asked
    comp = ds["composition"]
    assert (comp["requested_images"], comp["realised_images"]) == (10, 10)
    view = {r["category"]: (r["requested"], r["realised"]) for r in comp["overall"]["view"]}
    assert view == {"PA": (0.7, 0.7), "LL": (0.3, 0.3)}
    # laterality: the simulated backend draws on the requested side; frontal masks show it, lateral films cannot
    lat = ds["laterality"]["per_finding"]
    for finding in ("Nodule", "Effusion"):
        sel = ok[ok[finding] == 1]
        frontal = sel[sel.view == "PA"]
        want = frontal[f"{finding}.laterality"].value_counts().to_dict()
        got = {k: v for k, v in lat[finding]["realised"].items() if k != "undetermined"}
        assert got == want and lat[finding]["realised"].get("undetermined", 0) == int((sel.view == "LL").sum())
        assert lat[finding]["agreement"] == 1.0 and lat[finding]["read_from"]["mask"] == len(frontal)
    # co-occurrence, box and mask counts are the manifest's
    co = ds["cooccurrence"]["matrix"]
    assert co["Nodule"]["Support Devices"] == int(((ok.Nodule == 1) & (ok["Support Devices"] == 1)).sum())
    assert co["Effusion"]["Effusion"] == 6 and co["Effusion"]["Nodule"] == 0
    n_boxes = sum(b["label"] == "Effusion" for bs in ok.realised_boxes for b in bs)
    assert ds["boxes"]["per_label"]["Effusion"]["area"]["n"] == n_boxes
    lungs = sum(any(x["name"] == "lungs" for x in ms) for ms in ok.masks)
    assert ds["masks"]["per_structure"]["lungs"]["n"] == lungs == 10  # the backend draws lungs where none are named
    assert 0 < ds["masks"]["per_structure"]["lungs"]["median"] < 1 and ds["masks"]["per_structure"]["heart"]["n"] == 4
    sev = ds["severity"]["per_finding"]["Nodule"]
    assert sum(g["images"] for g in sev["per_grade"].values()) == 4
    t = ds["timing"]
    assert t["images_per_second_generate"] == pytest.approx(10 / float(df.seconds_generate.sum()))
    # what could not run says why and names the full weights file, or the reference
    missing = {e["metric"]: e for e in m["missing"]}
    assert XRV_MODELS["xrv-densenet"] in missing["fidelity"]["needs"] and "--reference" in missing["fidelity"]["needs"]
    assert XRV_MODELS["xrv-densenet"] in missing["adherence.findings"]["needs"]
    assert "--sex-model" in missing["adherence.sex"]["needs"]
    assert "pixel_diversity" not in missing and "dataset.laterality" not in missing


def test_eval_table_shows_full_file_names_and_no_none_title(sim_out, tmp_path, monkeypatch):
    from rich.console import Console

    from chexforge.contracts.model_files import XRV_MODELS
    from chexforge.evaluate.run import EvalOptions, evaluate
    from chexforge.evaluate.summary import summary_table

    monkeypatch.setenv("HOME", str(tmp_path / "nowhere"))
    m = evaluate(sim_out, tmp_path, EvalOptions(size=64))
    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(summary_table(m))
    text = console.export_text()
    assert "None features" not in text and "no feature extractor" in text
    assert "…" not in text  # folded onto lines, never cut short
    assert XRV_MODELS["xrv-densenet"] in "".join(ln.strip("│ ") for ln in text.splitlines())


def test_eval_against_a_folder_of_pngs(sim_out, tiny_out, tmp_path, monkeypatch):
    """A plain folder of PNGs is a reference: without weights the feature metrics name the
    extractor they need; with the random extractor they are computed."""
    _, ref, _ = tiny_out
    monkeypatch.setenv("HOME", str(tmp_path / "nowhere"))
    assert main(["eval", str(sim_out), "--reference", str(ref), "--size", "64", "--out", str(tmp_path / "a")]) == 0
    m = json.loads((tmp_path / "a/metrics.json").read_text())
    assert m["reference"]["kind"] == "folder" and m["reference"]["images"] == 8
    assert m["fidelity"]["available"] is False and "--reference" not in m["fidelity"]["needs"]
    assert "feature extractor" in m["fidelity"]["needs"]
    assert main(["eval", str(sim_out), "--reference", str(ref), "--size", "64", "--features", "random",
                 "--out", str(tmp_path / "b")]) == 0
    m = json.loads((tmp_path / "b/metrics.json").read_text())
    assert m["fidelity"]["available"] and m["fidelity"]["fid"] > 0 and m["memorization"]["of"] == 10


def test_a_missing_reference_is_one_line_naming_it(sim_out, tmp_path, capsys):
    missing = tmp_path / "real"
    assert main(["eval", str(sim_out), "--reference", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    assert "a folder of images" in err and "label CSV" in err and "Traceback" not in err
