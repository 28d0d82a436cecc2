"""QC rules in recipes: rejection and regeneration with derived seeds, exhaustion, determinism,
the pixel checks, missing models and bad rules."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from chexforge import atomic
from chexforge.errors import UserError
from chexforge.plan import plan
from chexforge.qc import rules as Q
from chexforge.recipe import load_recipe, parse_recipe
from chexforge.runtime import RunOptions, run

from .conftest import job, write

SIM = """
name: qcsim
seed: 11
backend: simulated
backend_options: {{batch_size: 4, blank_fraction: {blank}}}
output: {{size: 64, formats: [png]}}
qc:
  max_attempts: {attempts}
  rules:
    - check: not_blank
      min: 0.05
    - {{check: mask_area, min: 0.001}}
cohorts:
  - name: a
    count: {n}
    findings: {{Nodule: true}}
{extra}"""


def sim(tmp_path, n=12, blank=0.4, attempts=8, extra="", name="qc.yaml"):
    return write(tmp_path, SIM.format(n=n, blank=blank, attempts=attempts, extra=extra), name)


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "chexforge.cli", *args], capture_output=True, text=True, **kw)


def rows(out):
    return pq.read_table(out / "manifest.parquet").to_pylist()


def png(out, rel):
    with Image.open(out / rel) as im:
        return np.asarray(im, dtype=np.float64) / 65535.0


def test_rejected_jobs_are_regenerated_with_derived_seeds(tmp_path):
    out = tmp_path / "out"
    r = load_recipe(sim(tmp_path))
    summary = run(plan(r), r, out, RunOptions(progress=False))
    assert summary.failed == 0 and summary.generated == 12
    retried = 0
    for row in rows(out):
        assert row["status"] == "ok", row["error"]
        qc = json.loads(row["meta"])["qc"]
        assert row["attempts"] == qc["attempts"] == len(qc["rejections"]) + 1
        # The seeds tried are the job's seed, then the derived ones, in order; the last is recorded as used.
        expected = [Q.attempt_seed(row["seed"], k) for k in range(1, qc["attempts"] + 1)]
        assert [h["seed"] for h in qc["rejections"]] == expected[:-1]
        assert qc["seed"] == expected[-1]
        for h in qc["rejections"]:
            assert h["rule"] == "not_blank" and h["value"] < h["threshold"] == 0.05
        assert np.std(png(out, row["image_png"])) >= 0.05  # the image kept passes
        retried += row["attempts"] > 1
        assert atomic.sha256_file(out / row["image_png"]) == row["sha256_png"]
    assert 0 < retried < 12  # the blank seeds really were rejected, the others kept at once
    # Without QC the same recipe keeps the blank first attempts: the rule is what rejects them.
    plain = write(tmp_path, sim(tmp_path).read_text().split("qc:")[0] + "cohorts:" + sim(tmp_path).read_text().split("cohorts:")[1],
                  "plain.yaml")
    r2 = load_recipe(plain)
    run(plan(r2), r2, tmp_path / "plain", RunOptions(progress=False))
    blank = [x for x in rows(tmp_path / "plain") if np.std(png(tmp_path / "plain", x["image_png"])) < 0.05]
    assert len(blank) == retried and all(x["attempts"] == 1 and "qc" not in json.loads(x["meta"]) for x in blank)


def test_exhausted_attempts_fail_with_the_rule_and_keep_the_row(tmp_path):
    extra = ("  - name: b\n    count: 3\n    findings: {Nodule: true}\n"
             "    qc: {max_attempts: 2, rules: [{check: not_blank, min: 0.3}]}\n")
    out = tmp_path / "out"
    r = load_recipe(sim(tmp_path, n=2, blank=0.0, extra=extra))
    summary = run(plan(r), r, out, RunOptions(progress=False))
    assert summary.failed == 3 and summary.generated == 2
    table = rows(out)
    assert len(table) == 5
    for row in table:
        if row["cohort"] == "a":
            assert row["status"] == "ok" and row["attempts"] == 1
            continue
        assert row["status"] == "failed" and row["image_png"] is None and row["attempts"] == 2
        assert row["error"].startswith("qc: not_blank = ") and "below min 0.3 on all 2 attempts" in row["error"]
        hist = json.loads(row["meta"])["qc"]["rejections"]
        assert [h["attempt"] for h in hist] == [1, 2] and all(h["value"] < 0.3 for h in hist)
        assert f"{hist[-1]['value']:g}" in row["error"]
    # A QC failure is a failure like any other: not redone on resume; --retry-failed redoes it
    # (the same seeds, so the same verdict unless the rules or max_attempts changed).
    again = run(plan(r), r, out, RunOptions(progress=False))
    assert again.skipped == 5 and again.generated == again.failed == 0 and rows(out) == table
    retry = run(plan(r), r, out, RunOptions(progress=False, retry_failed=True))
    assert retry.failed == 3 and [x["meta"] for x in rows(out)] == [x["meta"] for x in table]


def test_same_recipe_same_attempts_seeds_and_pixels_and_resume(tmp_path):
    recipe = sim(tmp_path, n=10, blank=0.6)
    r = load_recipe(recipe)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run(plan(r), r, a, RunOptions(progress=False))
    run(plan(r), r, b, RunOptions(progress=False, batch_size=3))
    run(plan(r), r, c, RunOptions(progress=False, limit=4))  # an interrupted run ...
    run(plan(r), r, c, RunOptions(progress=False))  # ... resumed
    key = ["job_id", "status", "attempts", "meta", "sha256_png"]
    ta = [{k: x[k] for k in key} for x in rows(a)]
    assert any(x["attempts"] > 1 for x in ta)
    for other in (b, c):
        assert sorted([{k: x[k] for k in key} for x in rows(other)], key=lambda x: x["job_id"]) == sorted(ta, key=lambda x: x["job_id"])


def test_attempt_seeds_are_derived_and_distinct():
    seeds = [Q.attempt_seed(123456789, k) for k in range(1, 6)]
    assert seeds[0] == 123456789 and len(set(seeds)) == 5 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [Q.attempt_seed(123456789, k) for k in range(1, 6)]
    assert Q.attempt_seed(123456790, 2) != seeds[1]


def test_finding_visible_on_drr(drr64):
    # A large nodule on a patient where it projects over aerated lung (a nodule over the heart or
    # a dome edge can even lower this contrast: the rule is a heuristic, QC's own tests pin it).
    row = job(seed=6, size=64, **{"Nodule": 1, "Nodule.laterality": "right", "Nodule.severity": "large"})
    [sample] = drr64.generate([row])
    assert sample.error is None and sample.masks["Nodule"].any()
    findings = Q.requested_findings(row)
    assert findings == ["Nodule"]
    visible = Q.finding_visible(sample.image, sample.masks, findings)
    assert visible >= 0.02
    flat = np.full_like(sample.image, float(sample.image.mean()))
    assert Q.finding_visible(flat, sample.masks, findings) < 1e-6
    # The label without the lesion in the pixels: the image of the same patient with no nodule.
    [clean] = drr64.generate([job(seed=6, size=64)])
    assert Q.finding_visible(clean.image, sample.masks, findings) < visible
    assert Q.finding_visible(sample.image, {}, findings) == 0.0  # requested, no mask: fails
    assert Q.mask_area(sample.image, sample.masks, findings) > 0.001
    assert Q.finding_visible(sample.image, sample.masks, []) is None  # nothing requested


def test_finding_visible_rule_through_the_runtime(tmp_path):
    """Known answers: a blank render (flat grey, chosen by its seed alone) shows no lesion, so it is
    rejected with value exactly 0 and the job goes on to its next derived seed; the image kept is
    the first non-blank attempt, and its lesion is visible in the written files."""
    from chexforge.contracts.images import read_mask

    recipe = sim(tmp_path, n=8, blank=0.5, attempts=6).read_text().replace(
        "    - check: not_blank\n      min: 0.05\n    - {check: mask_area, min: 0.001}",
        "    - {check: finding_visible, min: 0.02}")
    r = load_recipe(write(tmp_path, recipe, "visible.yaml"))
    out = tmp_path / "out"
    run(plan(r), r, out, RunOptions(progress=False))
    retried = 0
    for row in rows(out):
        seeds = [Q.attempt_seed(row["seed"], k) for k in range(1, 7)]
        blank = [np.random.default_rng((s, 0xB1A)).random() < 0.5 for s in seeds]
        assert False in blank  # this recipe's seeds: every job has a non-blank attempt among 6
        kept = blank.index(False) + 1
        qc = json.loads(row["meta"])["qc"]
        assert row["status"] == "ok" and qc["attempts"] == row["attempts"] == kept and qc["seed"] == seeds[kept - 1]
        assert [(h["rule"], h["value"], h["seed"]) for h in qc["rejections"]] == [("finding_visible", 0.0, x) for x in seeds[:kept - 1]]
        mask = read_mask(out / next(m["path"] for m in row["masks"] if m["name"] == "Nodule"))
        assert Q.finding_visible(png(out, row["image_png"]), {"Nodule": mask}, ["Nodule"]) >= 0.02
        retried += kept > 1
    assert retried > 0


CLASSIFIER = """
name: c
backend: simulated
output: {size: 64}
qc:
  rules:
    - check: classifier
      model: MODEL
cohorts:
  - {name: a, count: 1}
"""


def test_classifier_without_local_weights_is_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # an empty torchxrayvision cache
    for model, expect in (("xrv-densenet", "weights are not on this machine"),
                          (str(tmp_path / "none.pt"), "no such model file")):
        recipe = write(tmp_path, CLASSIFIER.replace("MODEL", model))
        for cmd in (["validate", str(recipe)], ["generate", str(recipe), "--out", str(tmp_path / "o"), "--no-progress"]):
            proc = cli(*cmd, env={**__import__("os").environ, "HOME": str(tmp_path / "home")})
            lines = [x for x in proc.stderr.splitlines() if x.strip()]
            assert proc.returncode == 2, proc.stderr
            assert len(lines) == 1 and expect in lines[0] and "recipe.yaml:7:" in lines[0], proc.stderr
            assert "Traceback" not in proc.stderr
        assert not (tmp_path / "o" / "manifest.parquet").exists()
    # A relative path starts at the recipe's folder, and is checked at validate all the same.
    recipe = write(tmp_path, CLASSIFIER.replace("MODEL", "rel/none.pt"))
    with pytest.raises(UserError, match=r"recipe.yaml:7:14: qc.rules\[0\].model: no such model file '.*/rel/none.pt'"):
        load_recipe(recipe)


class Fixed:
    """Builds TorchScript models that return fixed probabilities for every image."""

    @staticmethod
    def save(torch, path, probs, pathologies=None):
        class Const(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("p", torch.tensor([probs], dtype=torch.float32))
                if pathologies is not None:
                    self.pathologies = list(pathologies)

            def forward(self, x):
                return self.p.expand(x.shape[0], -1)

        torch.jit.script(Const()).save(str(path))
        return path


def _meta_qc(row):
    return json.loads(row["meta"])["qc"]


def test_sex_rule_known_answers(tmp_path):
    """P(male) fixed at 0.8, and (P(F), P(M)) fixed at (0.3, 0.7): a man scores P(M), a woman
    1 - P(M); a flipped sign would pass the women and reject the men."""
    torch = pytest.importorskip("torch")
    one = Fixed.save(torch, tmp_path / "one.pt", [0.8])
    two = Fixed.save(torch, tmp_path / "two.pt", [0.3, 0.7])
    for model, p_male in ((one, 0.8), (two, 0.7)):
        recipe = write(tmp_path, f"""
name: s
seed: 2
backend: simulated
output: {{size: 64, formats: [png]}}
qc:
  max_attempts: 2
  rules: [{{check: sex, model: {model}, min: 0.6}}]
cohorts:
  - {{name: m, count: 2, demographics: {{sex: M}}}}
  - {{name: f, count: 2, demographics: {{sex: F}}}}
""")
        r = load_recipe(recipe)
        out = tmp_path / f"out-{model.stem}"
        run(plan(r), r, out, RunOptions(progress=False))
        got = rows(out)
        assert len(got) == 4
        for row in got:
            qc = _meta_qc(row)
            if row["sex"] == "M":
                assert row["status"] == "ok" and qc["attempts"] == 1 and qc["rejections"] == []
            else:
                assert row["status"] == "failed" and [h["value"] for h in qc["rejections"]] == [round(1 - p_male, 6)] * 2
                assert row["error"].startswith(f"qc: sex = {round(1 - p_male, 6):g} is below min 0.6 on all 2 attempts")


CLASSIFY = """
name: k
seed: 3
backend: simulated
output: {{size: 64, formats: [png]}}
qc:
  max_attempts: 2
  rules: [{{check: classifier, model: {model}, min: 0.9}}]
cohorts:
  - {{name: nodule, count: 2, findings: {{Nodule: true}}}}
  - {{name: clear, count: 2}}
"""


def test_classifier_rule_known_answers(tmp_path):
    """A model that says P(Nodule) = 0 rejects every nodule job (value exactly 0) and keeps every
    job without one (1 - 0 = 1); the implied "Lung Opacity" is not held against a nodule."""
    torch = pytest.importorskip("torch")
    model = Fixed.save(torch, tmp_path / "zero.pt", [0.0, 0.95], ["Nodule", "Lung Opacity"])
    r = load_recipe(write(tmp_path, CLASSIFY.format(model=model)))
    run(plan(r), r, tmp_path / "out", RunOptions(progress=False))
    got = rows(tmp_path / "out")
    assert sorted(x["cohort"] for x in got) == ["clear", "clear", "nodule", "nodule"]
    for row in got:
        values = [h["value"] for h in _meta_qc(row)["rejections"]]
        assert row["status"] == "failed"
        if row["cohort"] == "nodule":  # min(P(Nodule)) = 0; the implied opacity is left out
            assert values == [0.0, 0.0] and row["error"].startswith("qc: classifier = 0 is below min 0.9 on all 2 attempts")
        else:  # min(1 - 0, 1 - 0.95): the opacity a clear image must not show is held against it
            assert values == [pytest.approx(0.05, abs=1e-6)] * 2
    model = Fixed.save(torch, tmp_path / "one.pt", [1.0, 0.0], ["Nodule", "Lung Opacity"])
    r = load_recipe(write(tmp_path, CLASSIFY.format(model=model)))
    run(plan(r), r, tmp_path / "out1", RunOptions(progress=False))
    for row in rows(tmp_path / "out1"):
        assert (row["status"] == "ok") == (row["cohort"] == "nodule"), row
        if row["cohort"] == "clear":
            assert [h["value"] for h in _meta_qc(row)["rejections"]] == [0.0, 0.0]


def test_a_classifier_without_finding_labels_is_an_error_not_a_pass(tmp_path):
    """No `pathologies`, or none that is a chexforge finding: one line naming the rule and the file,
    exit 2, before any image is made."""
    torch = pytest.importorskip("torch")
    bare = Fixed.save(torch, tmp_path / "bare.pt", [0.0])
    proc = cli("generate", str(write(tmp_path, CLASSIFY.format(model=bare))), "--out", str(tmp_path / "o"), "--no-progress")
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"chexforge: error: {bare}: cohort 'nodule': qc classifier: the model names no chexforge finding")
    assert not (tmp_path / "o" / "manifest.parquet").exists() and not list((tmp_path / "o").rglob("*.png"))
    foreign = Fixed.save(torch, tmp_path / "pets.pt", [0.0, 0.0], ["cat", "dog"])
    r = load_recipe(write(tmp_path, CLASSIFY.format(model=foreign)))
    with pytest.raises(UserError, match=r"qc classifier: the model names no chexforge finding \(its `pathologies` attribute: \['cat', 'dog'\]\)"):
        run(plan(r), r, tmp_path / "o2", RunOptions(progress=False))
    assert not list((tmp_path / "o2").rglob("*.png"))
    # Labels that do not match the outputs: an error, never one label read as another.
    short = Fixed.save(torch, tmp_path / "short.pt", [0.0, 0.0], ["Nodule"])
    r = load_recipe(write(tmp_path, CLASSIFY.format(model=short)))
    with pytest.raises(UserError, match="returns 2 values per image but its `pathologies` attribute names 1 labels"):
        run(plan(r), r, tmp_path / "o3", RunOptions(progress=False))


def test_a_model_check_that_measures_nothing_fails():
    """A model whose only label a requested finding implies gives no value: rejected (value None);
    a pixel check of a job with no requested finding has nothing to measure and passes."""

    class Opacity:
        labels, findings = ["Lung Opacity"], ["Lung Opacity"]

        def __call__(self, images):
            return np.zeros((len(images), 1))

    runner = Q.QCRunner.__new__(Q.QCRunner)
    runner.by_cohort = {"a": (3, [Q.Rule("mask_area", 0.001), Q.Rule("classifier", 0.5, Opacity())])}
    image = np.zeros((8, 8))
    assert runner.first_failure({"cohort": "a", "Nodule": 1}, image, {"Nodule": np.ones((8, 8), bool)}) == ("classifier", None, 0.5)
    assert runner.first_failure({"cohort": "a"}, image, {}) is None  # 1 - P(opacity) = 1; mask_area: nothing asked


# ---- the model loaders (chexforge/qc/models.py): torchxrayvision's DenseNet and TorchScript ------

FAKE_XRV = """
import torch
from torchvision.models.densenet import DenseNet as _DenseNet


class DenseNet(_DenseNet):  # stands in for torchxrayvision's class: the same parameter names
    def __init__(self):
        super().__init__(32, (6, 12, 24, 16), 64, num_classes=18)
        self.features.conv0 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
"""


def _xrv_home(tmp_path, monkeypatch):
    from chexforge.contracts.model_files import xrv_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cache = xrv_cache_dir()
    cache.mkdir(parents=True)
    return cache


def test_op_norm_known_answers():
    from chexforge.contracts.model_files import XRV_OP_THRESHS
    from chexforge.qc.models import op_norm

    t = np.array(XRV_OP_THRESHS)
    assert np.allclose(op_norm(t[None]), 0.5, rtol=0, atol=1e-12)  # each operating point → 0.5
    assert np.array_equal(op_norm(np.zeros((1, 18))), np.zeros((1, 18)))
    assert np.array_equal(op_norm(np.ones((1, 18))), np.ones((1, 18)))
    got = op_norm(np.array([[0.05, 0.55, 0.3]]), (0.1, 0.1, float("nan")))
    assert np.allclose(got, [[0.25, 1 - 0.45 / 1.8, 0.5]], rtol=0, atol=1e-12)


def test_released_pickled_densenet_is_refused_with_a_conversion_that_works(tmp_path, monkeypatch):
    """torchxrayvision's released file is a pickled whole model: refused (never unpickled) with
    one line whose command, run where that class imports, writes the state dict chexforge reads."""
    import os
    import re

    torch = pytest.importorskip("torch")
    from chexforge.contracts.model_files import XRV_MODELS, XRV_STATE_DICTS, model_problem
    from chexforge.qc.models import load_xrv_densenet

    cache = _xrv_home(tmp_path, monkeypatch)
    fake = tmp_path / "fake"
    (fake / "torchxrayvision").mkdir(parents=True)
    (fake / "torchxrayvision" / "__init__.py").write_text("from . import models\n")
    (fake / "torchxrayvision" / "models.py").write_text(FAKE_XRV)
    env = {**os.environ, "PYTHONPATH": str(fake)}
    released = cache / XRV_MODELS["xrv-densenet"]
    make = ("import torch, torchxrayvision as xrv; torch.manual_seed(0); m = xrv.models.DenseNet().eval(); "
            f"torch.save(m, {str(released)!r}); x = torch.rand(2, 1, 224, 224, generator=torch.Generator().manual_seed(1)) "
            f"* 2048 - 1024; torch.save({{'x': x, 'y': m(x).detach()}}, {str(tmp_path / 'expect.pt')!r})")
    subprocess.run([sys.executable, "-c", make], env=env, check=True)
    assert model_problem("xrv-densenet", "classifier") is None  # the file is there; loading says what is wrong
    with pytest.raises(UserError) as e:
        load_xrv_densenet()
    line = e.value.line()
    assert line.startswith(f"{released}: a pickled model (torchxrayvision.models.DenseNet), not a state dict") and "\n" not in line
    assert "weights_only=True" in line and "pip install torchxrayvision" in line
    command = re.search(r'python -c "(.*)"$', line).group(1)
    before = released.read_bytes()
    subprocess.run([sys.executable, "-c", command], env=env, check=True)
    assert released.read_bytes() == before and (cache / XRV_STATE_DICTS["xrv-densenet"]).is_file()  # xrv's file kept
    expect = torch.load(tmp_path / "expect.pt", weights_only=True)
    net = load_xrv_densenet()
    with torch.no_grad():
        assert torch.allclose(net(expect["x"]), expect["y"], rtol=0, atol=1e-5)


def test_xrv_densenet_matches_torchxrayvision_source():
    """The torchvision build has torchxrayvision's parameter names and arithmetic, and the labels and
    operating points in contracts are its model_urls["all"] (its source, with the image-file
    modules it imports for datasets stubbed: chexforge installs it --no-deps)."""
    import importlib.util

    if importlib.util.find_spec("torchxrayvision") is None:
        pytest.skip("torchxrayvision is not installed")
    code = """
import importlib.abc, importlib.machinery, os, sys
from unittest import mock
class Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('imageio', 'skimage'):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        m = mock.MagicMock(); m.__path__ = []; m.__spec__ = spec; return m
    def exec_module(self, m): pass
sys.meta_path.append(Stub())
import numpy as np, torch, torchxrayvision as xrv
from chexforge.contracts import model_files as M
from chexforge.qc.models import op_norm, xrv_densenet_architecture
urls = xrv.models.model_urls['all']
assert tuple(urls['labels']) == M.XRV_LABELS and tuple(urls['op_threshs']) == M.XRV_OP_THRESHS
assert os.path.basename(urls['weights_url']) == M.XRV_MODELS['xrv-densenet']
assert urls['input_resolution'] == M.XRV_INPUT_SIZE
theirs, ours = xrv.models.DenseNet(num_classes=18, in_channels=1).eval(), xrv_densenet_architecture().eval()
a, b = theirs.state_dict(), ours.state_dict()
assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
ours.load_state_dict(a, strict=True)
theirs.op_threshs = torch.tensor(urls['op_threshs'])
x = torch.rand(2, 1, 224, 224, generator=torch.Generator().manual_seed(0)) * 2048 - 1024
with torch.no_grad():
    assert torch.allclose(theirs.features2(x), torch.relu(ours.features(x)).mean((2, 3)), rtol=0, atol=1e-5)
    p = op_norm(torch.sigmoid(ours(x)).double().numpy())
    assert np.allclose(theirs(x).numpy(), p, rtol=0, atol=1e-6)
print('same')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "same", proc.stderr[-2000:]


XRV_STUB = """
import importlib.abc, importlib.machinery, sys
from unittest import mock
class Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):  # the image-file modules xrv's datasets import
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('imageio', 'skimage'):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        m = mock.MagicMock(); m.__path__ = []; m.__spec__ = spec; return m
    def exec_module(self, m): pass
sys.meta_path.append(Stub())
"""


def test_xrv_state_dict_in_torchxrayvision_layout_and_label_order(tmp_path, monkeypatch):
    """A state dict saved from torchxrayvision's own DenseNet class, as its loader leaves it (the
    operating points as a buffer), loads through QC's one loader without importing torchxrayvision;
    its outputs equal torchxrayvision's forward, and the labels are read in its order: a network
    that says "Nodule" (by torchxrayvision's label list) and nothing else keeps the nodule job and
    rejects the clear one."""
    import importlib.util

    if importlib.util.find_spec("torchxrayvision") is None:
        pytest.skip("torchxrayvision is not installed")
    torch = pytest.importorskip("torch")
    from chexforge.contracts.model_files import XRV_MODELS, XRV_OP_THRESHS, model_file
    from chexforge.qc.models import Classifier, op_norm

    cache = _xrv_home(tmp_path, monkeypatch)
    # Another test of the session may have imported torchxrayvision (tests/test_loaders.py mixes
    # datasets with it): take it out of sys.modules for this test (monkeypatch puts it back), so
    # the last line still shows that QC never imports it.
    for name in [m for m in sys.modules if m == "torchxrayvision" or m.startswith("torchxrayvision.")]:
        monkeypatch.delitem(sys.modules, name)
    weights, expect = cache / XRV_MODELS["xrv-densenet"], tmp_path / "expect.pt"
    make = XRV_STUB + f"""
import torch, torchxrayvision as xrv
urls = xrv.models.model_urls['all']
torch.manual_seed(0)
m = xrv.models.DenseNet(num_classes=18, in_channels=1).eval()
m.op_threshs = torch.tensor(urls['op_threshs'])  # as xrv's loader sets them: a buffer in the state dict
with torch.no_grad():
    m.classifier.weight.zero_()
    m.classifier.bias.fill_(-12.0)
    m.classifier.bias[urls['labels'].index('Nodule')] = 12.0
torch.save(m.state_dict(), {str(weights)!r})  # the released file converted in place
x = torch.rand(2, 1, 224, 224, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    torch.save({{'x': x, 'y': m(x * 2048 - 1024), 'labels': list(urls['labels']), 'keys': list(m.state_dict())}}, {str(expect)!r})
"""
    proc = subprocess.run([sys.executable, "-c", make], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = torch.load(expect, weights_only=True)
    assert "op_threshs" in theirs["keys"] and "features.denseblock4.denselayer16.conv2.weight" in theirs["keys"]
    clf = Classifier("xrv-densenet", model_file("xrv-densenet", None), "cpu")
    assert clf.labels == theirs["labels"]
    got = clf(list(theirs["x"][:, 0].numpy()))
    assert np.allclose(got, theirs["y"].double().numpy(), rtol=0, atol=1e-6)
    nodule = theirs["labels"].index("Nodule")
    assert got[:, nodule].min() > 0.99 and np.delete(got, nodule, axis=1).max() < 0.01
    recipe = write(tmp_path, """
name: x
seed: 1
backend: simulated
output: {size: 64, formats: [png]}
qc:
  max_attempts: 1
  rules: [{check: classifier, model: xrv-densenet, min: 0.9}]
cohorts:
  - {name: nodule, count: 1, findings: {Nodule: true}}
  - {name: clear, count: 1}
""")
    r = load_recipe(recipe)
    run(plan(r), r, tmp_path / "out", RunOptions(progress=False))
    got = {row["cohort"]: row for row in rows(tmp_path / "out")}
    assert got["nodule"]["status"] == "ok", got["nodule"]["error"]
    # The clear image: 1 - P(Nodule), P(Nodule) = op_norm(sigmoid(12)) at Nodule's operating point.
    p = op_norm(np.array([[1 / (1 + np.exp(-12.0))]]), (XRV_OP_THRESHS[nodule],))
    value = json.loads(got["clear"]["meta"])["qc"]["rejections"][0]["value"]
    assert got["clear"]["status"] == "failed" and value == pytest.approx(1 - float(p[0, 0]), abs=2e-6)
    assert "torchxrayvision" not in sys.modules


def test_a_bad_torchscript_file_is_the_same_line_for_qc_and_eval(tmp_path):
    from chexforge.evaluate import adherence, features

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    recipe = write(tmp_path, CLASSIFIER.replace("MODEL", str(junk)))
    r = load_recipe(recipe)
    lines = []
    for load in (lambda: run(plan(r), r, tmp_path / "o", RunOptions(progress=False)),
                 lambda: adherence.ScriptModel(junk, "--sex-model"),
                 lambda: features.get_extractor(str(junk))):
        with pytest.raises(UserError) as e:
            load()
        lines.append(e.value.line())
    for line, what in zip(lines, ("qc model", "--sex-model", "--features")):
        assert line.startswith(f"{junk}: {what}: not a loadable TorchScript file (") and "\n" not in line, line


@pytest.mark.parametrize("rule, expect", [
    ("{check: sharpness, min: 0.1}", "recipe.yaml:5:15: qc.rules[0].check: expected 'finding_visible', 'mask_area'"),
    ("{check: not_blank, min: -0.1}", "recipe.yaml:5:31: qc.rules[0].min: expected greater than or equal to 0"),
    ("{check: mask_area, min: 2}", "qc.rules[0].min: expected less than or equal to 1"),
    ("{check: classifier}", "qc.rules[0]: the classifier check needs `model:`"),
    ("{check: not_blank, model: x.pt}", "qc.rules[0]: the not_blank check takes no model"),
    ("{check: not_blank, mn: 0.1}", "unknown key 'mn'; did you mean 'min'?"),
])
def test_bad_qc_is_a_located_line(tmp_path, rule, expect):
    recipe = write(tmp_path, f"name: x\nbackend: simulated\nqc:\n  rules:\n    - {rule}\ncohorts:\n  - {{name: a, count: 1}}\n")
    with pytest.raises(UserError) as e:
        load_recipe(recipe)
    assert expect in e.value.line() and "\n" not in e.value.line(), e.value.line()
    proc = cli("validate", str(recipe))
    assert proc.returncode == 2 and expect in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cohort_qc_errors_and_max_attempts(tmp_path):
    recipe = write(tmp_path, "name: x\nbackend: simulated\ncohorts:\n  - name: a\n    count: 1\n"
                             "    qc: {max_attempts: 0}\n")
    with pytest.raises(UserError, match=r"recipe.yaml:6:\d+: cohorts\[0\].qc.max_attempts: expected greater than or equal to 1"):
        load_recipe(recipe)
    ok = parse_recipe("name: x\nbackend: simulated\ncohorts: [{name: a, count: 1}]\nqc: {rules: [{check: not_blank}]}\n")
    assert ok.qc.max_attempts == 3 and ok.qc.rules[0].min == 0.05


# ---- mask_dice: a segmentation model against the backend's masks ---------------------------------

DICE = """
name: dice
seed: 5
backend: simulated
output: {{size: 64, formats: [png]}}
qc:
  max_attempts: 2
  rules: [{{check: mask_dice, model: {model}, min: 0.75}}]
cohorts:
  - {{name: a, count: 4, masks: [lungs, heart], findings: {{Nodule: true}}}}
"""


def seg_model(torch, path, classes, where=True, size=128):
    """A TorchScript segmenter in `chexforge eval --seg-model`'s convention: logits (N, C, size,
    size), +4 inside the simulated backend's lungs and heart at their unjittered place (they move by
    at most 3% of the image a seed), -4 elsewhere; `where=False` predicts nothing."""
    from chexforge.backends.simulated.backend import _ellipse

    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    shapes = {"lungs": _ellipse(xx, yy, (0.12, 0.15, 0.45, 0.85)) | _ellipse(xx, yy, (0.55, 0.15, 0.88, 0.85)),
              "heart": _ellipse(xx, yy, (0.38, 0.50, 0.72, 0.82))}
    logits = np.stack([np.where(shapes.get(c, np.zeros_like(xx, bool)) & where, 4.0, -4.0) for c in classes or ["?"]])

    class Seg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("y", torch.tensor(logits[None], dtype=torch.float32))
            if classes:
                self.classes = list(classes)
            self.input_size = 64

        def forward(self, x):
            return self.y.expand(x.shape[0], -1, -1, -1)

    torch.jit.script(Seg()).save(str(path))
    return path


def test_mask_dice_passes_a_right_segmenter_and_rejects_an_empty_one(tmp_path):
    torch = pytest.importorskip("torch")
    right = seg_model(torch, tmp_path / "right.pt", ["lungs", "heart", "Pneumothorax"])
    none = seg_model(torch, tmp_path / "none.pt", ["lungs", "heart"], where=False)
    for model, ok in ((right, True), (none, False)):
        r = load_recipe(write(tmp_path, DICE.format(model=model)))
        out = tmp_path / model.stem
        run(plan(r), r, out, RunOptions(progress=False))
        got = rows(out)
        assert len(got) == 4
        for row in got:
            qc = _meta_qc(row)
            if ok:
                assert row["status"] == "ok" and qc["rejections"] == [], qc
            else:
                assert row["status"] == "failed" and [(h["rule"], h["value"]) for h in qc["rejections"]] == [("mask_dice", 0.0)] * 2
                assert row["error"].startswith("qc: mask_dice = 0 is below min 0.75")
    # The value: the smallest Dice over the classes both have (the simulated jitter keeps it above 0.8).
    image = np.zeros((64, 64), np.float32)
    seg = Q.ScriptModel(right, "qc", True)
    yy, xx = (np.mgrid[0:64, 0:64] + 0.5) / 64
    from chexforge.backends.simulated.backend import _anatomy

    masks = {k: v for k, v in _anatomy(np.random.default_rng(0), xx, yy).items() if k in ("lungs", "heart")}
    assert 0.8 < Q.mask_dice(seg, image, masks) < 1.0
    assert Q.mask_dice(seg, image, {"lungs": masks["lungs"]}) > Q.mask_dice(seg, image, masks) - 1e-9
    assert Q.mask_dice(seg, image, {"Nodule": masks["lungs"]}) is None  # no common class: measured nothing


def test_mask_dice_model_problems_are_one_line_at_validate(tmp_path):
    torch = pytest.importorskip("torch")
    bare = seg_model(torch, tmp_path / "bare.pt", [])
    foreign = seg_model(torch, tmp_path / "pets.pt", ["cat", "dog"])
    for model, expect in ((bare, "the model needs a `classes` attribute"),
                          (foreign, "the segmentation model's classes (cat, dog) share no name with the masks of "
                                    "cohort 'a' (Nodule, heart, lungs)")):
        proc = cli("validate", str(write(tmp_path, DICE.format(model=model))))
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and expect in lines[0], proc.stderr
        assert "qc.rules[0].model" in lines[0] and "Traceback" not in proc.stderr
    with pytest.raises(UserError, match="the mask_dice check needs a local TorchScript segmentation model file"):
        parse_recipe(DICE.format(model="xrv-densenet"))
