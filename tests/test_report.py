"""`chexforge report`: the static HTML report of an output folder, checked as files and in Chromium."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from chexforge.errors import UserError
from chexforge.evaluate.report import build_report, render_metrics
from chexforge.evaluate.report_charts import composition, requested_age_pmf
from chexforge.plan.summary import Composition
from chexforge.recipe import parse_recipe

from .conftest import required_tool, write

RECIPE = """
name: tiny-report
description: Two cohorts for the report test.
seed: 3
backend: simulated
backend_options: {batch_size: 4, fail_on: [2]}
output: {size: 64, formats: [png], masks: true}
cohorts:
  - name: lesions
    count: 5
    view: {PA: 0.5, LL: 0.5}
    demographics: {sex: F, age: {range: [30, 49]}}
    findings:
      Nodule: 0.6
      Support Devices: 1.0
    masks: [lungs, heart]
  - name: effusion
    count: 3
    view: AP
    demographics: {sex: M, age: 70}
    findings:
      Effusion: {p: 1.0, laterality: [left, right], severity: {small: 1, large: 1}}
"""


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chexforge.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "out"
    proc = cli("generate", str(write(tmp, RECIPE)), "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return out


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict] = []
        self.links: list[str] = []
        self.scripts = 0
        self.ids: dict[str, str] = {}
        self._id: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag in ("script", "iframe", "object", "embed"):
            self.scripts += 1
        elif tag == "link":
            self.links.append(a.get("href", ""))
        self._id = a.get("id")

    def handle_data(self, data):
        if self._id:
            self.ids[self._id] = self.ids.get(self._id, "") + data

    def handle_endtag(self, tag):
        self._id = None


def parse(index: Path) -> _Page:
    page = _Page()
    page.feed(index.read_text(encoding="utf-8"))
    return page


def test_report_files_links_and_counts(dataset, tmp_path):
    snapshot = {p: p.stat().st_mtime_ns for p in dataset.rglob("*") if p.is_file()}
    proc = cli("report", str(dataset))
    assert proc.returncode == 0, proc.stderr
    index = dataset / "report" / "index.html"
    assert index.is_file()
    page = parse(index)
    # every image it shows is there, is a PNG, and says what it shows
    assert len(page.imgs) == 5  # a contact sheet and a composition chart per cohort, the size distributions
    for img in page.imgs:
        src = index.parent / img["src"]
        assert src.is_file(), img["src"]
        with Image.open(src) as im:
            assert im.format == "PNG" and im.width > 100
        assert len(img.get("alt", "")) > 30
    assert sum("composition_" in i["src"] for i in page.imgs) == 2
    # every relative link resolves (manifest, card, recipe, images); nothing is fetched from the network
    for href in page.links:
        if not href.startswith("#"):
            assert "://" not in href and (index.parent / href).exists(), href
    assert any(h.endswith("manifest.parquet") for h in page.links) and any(h.endswith("README.md") for h in page.links)
    assert page.scripts == 0
    # the counts it prints are the manifest's
    df = pq.read_table(dataset / "manifest.parquet").to_pandas()
    assert page.ids["n-jobs"] == str(len(df)) == "8"
    assert page.ids["n-ok"] == str(int((df.status == "ok").sum())) == "6"
    assert page.ids["n-failed"] == "2"  # fail_on: index 2 of each cohort
    text = index.read_text()
    assert "simulated failure" in text  # the failed job is listed with its error
    assert "No metrics yet" in text and "chexforge eval has not been run" in text  # the missing-metrics panel
    # the dataset's own files are untouched
    assert {p: p.stat().st_mtime_ns for p in snapshot} == snapshot
    assert not [p for p in dataset.rglob(".tmp-*")]
    umask = os.umask(0)
    os.umask(umask)
    assert index.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600


def test_composition_is_requested_against_realised(dataset):
    recipe = parse_recipe((dataset / "recipe.yaml").read_text())
    realised = Composition.of(pq.read_table(dataset / "manifest.parquet")).cohorts
    comp = composition(recipe.cohorts[1], realised["effusion"])
    assert ("Effusion", 1.0, 1.0) in comp["findings"]
    assert comp["sex"] == [("M", 1.0, 1.0)]
    assert comp["age"] == [("70-79", 1.0, 1.0)]
    assert comp["view"] == [("AP", 1.0, 1.0)]
    lesions = composition(recipe.cohorts[0], realised["lesions"])
    want = {k: w for k, w, _ in lesions["findings"]}
    # Support Devices at p=1 leaves no chance of No Finding: neither side has it, so no row
    assert want["Nodule"] == pytest.approx(0.6) and want["Support Devices"] == 1.0 and "No Finding" not in want
    # the requested age mix is the planner's own: [30, 49] uniform is half in each decade
    pmf = requested_age_pmf(recipe.cohorts[0].demographics.age)
    assert pmf["30-39"] == pytest.approx(0.5, abs=0.01) and pmf["40-49"] == pytest.approx(0.5, abs=0.01)


def _harness(index: Path) -> Path:
    """A copy of the page beside it with a probe that records, after load, which images decoded.
    The report itself has no script; the probe is test-only."""
    probe = ("<script>addEventListener('load',()=>{const bad=[...document.images].filter(i=>!i.complete||"
             "!i.naturalWidth).map(i=>i.getAttribute('src'));document.body.setAttribute('data-images',"
             "document.images.length);document.body.setAttribute('data-broken',bad.join('|')||'none');});</script>")
    path = index.with_name("_probe.html")
    path.write_text(index.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    return path


def test_report_renders_in_headless_chromium(dataset, tmp_path):
    required_tool("chromium", "apt-get install --no-install-recommends chromium")  # fails under CI=1, skips elsewhere
    dest = tmp_path / "rep"
    index = build_report(dataset, dest, per_cohort=4)
    shot = tmp_path / "shot.png"
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}"]
    proc = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,2000", index.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines()
              if "CONSOLE" in ln or "ERR_FILE_NOT_FOUND" in ln or "Not allowed to load" in ln or str(dest) in ln]
    assert not errors, errors
    with Image.open(shot) as im:
        assert im.size == (1200, 2000)
        px = np.asarray(im.convert("L"), dtype=np.float32)
    assert px.std() > 10  # text, tables and images, not a blank page
    assert (px < 128).mean() > 0.02  # a fair share of dark pixels: the contact sheet drew
    # every image the page references loaded and decoded in the browser
    dom = subprocess.run([*base, "--dump-dom", "--virtual-time-budget=10000", _harness(index).as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'data-images="(\d+)" data-broken="([^"]*)"', dom.stdout)
    assert m, dom.stdout[:2000]
    assert int(m.group(1)) == 5 and m.group(2) == "none"
    for section in ("summary", "laterality", "severity", "box-sizes", "mask-areas", "cooccurrence-matrix",
                    "timing-table", "missing-table"):
        assert f'id="{section}"' in dom.stdout, section  # the browser built every new section


def test_metrics_render_generically_with_reasons(dataset, tmp_path):
    metrics = {
        "fidelity": {"fid": 41.25, "kid": {"mean": 0.0123, "std": 0.002}, "extractor": "xrv-densenet121"},
        "diversity": {"ms_ssim": 0.31, "per_cohort": {"lesions": {"ms_ssim": 0.3, "n": 4}, "effusion": {"ms_ssim": 0.35, "n": 3}}},
        "memorization": {"available": False, "why": "no reference images given (--reference)"},
        "adherence": [{"finding": "Nodule", "auroc": 0.91}, {"finding": "Effusion", "auroc": 0.88}],
    }
    mdir = tmp_path / "m"
    mdir.mkdir()
    (mdir / "metrics.json").write_text(json.dumps(metrics))
    Image.new("L", (64, 32), 90).save(mdir / "nearest_pairs.png")
    dest = tmp_path / "rep"
    index = build_report(dataset, dest, metrics=mdir / "metrics.json")
    text = index.read_text()
    assert "not available: no reference images given (--reference)" in text
    for shown in ("41.25", "0.0123", "xrv-densenet121", "ms_ssim", "0.91", "Effusion", "lesions"):
        assert shown in text
    assert (dest / "nearest_pairs.png").is_file() and 'src="nearest_pairs.png"' in text
    # the default place, OUT/report/metrics.json, is picked up without --metrics
    (dest / "metrics.json").write_text(json.dumps({"qc": {"available": False, "why": "QC not run"}}))
    assert "not available: QC not run" in build_report(dataset, dest).read_text()


def test_render_metrics_escapes_and_handles_shapes():
    out = render_metrics({"a<b": {"available": False, "why": "<script>"}, "xs": [1, 2.5, None], "empty": {},
                          "ok": True})
    assert "&lt;script&gt;" in out and "<script>" not in out and "a&lt;b" in out
    assert "1, 2.5, -" in out and "(empty)" in out and "true" in out


def test_bad_input_is_one_line_and_exit_2(tmp_path, dataset):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = cli("report", str(empty))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "no manifest.parquet" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = cli("report", str(dataset), "--out", str(tmp_path / "r"), "--metrics", str(bad))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "not JSON" in proc.stderr
    with pytest.raises(UserError, match="own folder"):
        build_report(dataset, dataset / "images" / "x")
    with pytest.raises(UserError, match="no such metrics file"):
        build_report(dataset, tmp_path / "r", metrics=tmp_path / "missing.json")


def test_gather_then_render(dataset, tmp_path):
    """gather reads the folder into plain data and writes nothing; render makes the page and its
    PNGs from that data alone; the realised numbers are the manifest tally the card prints."""
    from chexforge.evaluate.report import gather, render
    from chexforge.plan.summary import label_counts

    dest = tmp_path / "rep"
    data = gather(dataset, dest, 2, dest / "metrics.json")
    assert not dest.exists()
    assert (data.n_jobs, data.n_ok, data.n_failed) == (8, 6, 2)
    assert [c.name for c in data.cohorts] == ["lesions", "effusion"]
    assert [len(c.shown) for c in data.cohorts] == [2, 2] and not data.has_metrics
    counts = label_counts(pq.read_table(dataset / "manifest.parquet"))
    for c in data.cohorts:
        realised = {cat: round(got * c.tally.n) for cat, _, got in c.composition["findings"] if got}
        assert realised == counts[c.name]
    page, files = render(data, tile_px=64)
    assert sorted(files) == ["composition_00_lesions.png", "composition_01_effusion.png",
                             "contact_00_lesions.png", "contact_01_effusion.png", "distributions.png"]
    assert 'id="n-ok">6<' in page and not dest.exists()
    assert render(data, tile_px=64) == (page, files)  # the same data, the same bytes


def test_a_requested_cohort_with_no_rows_shows_the_request_only(dataset):
    from chexforge.plan.summary import CohortTally

    recipe = parse_recipe((dataset / "recipe.yaml").read_text())
    comp = composition(recipe.cohorts[1], CohortTally())
    assert comp["sex"] == [("M", 1.0, 0.0)] and comp["view"] == [("AP", 1.0, 0.0)]


def test_dataset_sections_match_the_manifest(dataset, tmp_path):
    """The summary, co-occurrence, laterality and timing numbers on the page are the manifest's,
    counted here independently with pandas."""
    index = build_report(dataset, tmp_path / "rep", per_cohort=2)
    text = index.read_text()
    ids = parse(index).ids
    df = pq.read_table(dataset / "manifest.parquet").to_pandas()
    ok = df[df.status == "ok"]
    assert (ids["sum-images"], ids["sum-failed"], ids["sum-cohorts"]) == (str(len(ok)), str(len(df) - len(ok)), "2")
    assert ids["sum-patients"] == str(ok.patient_id.nunique()) == ids["sum-studies"]  # no study cohorts: one each
    # co-occurrence: each cell counts the ok images labelled with both findings
    cells = re.findall(r'data-a="([^"]+)" data-b="([^"]+)"[^>]*>(\d+)<', text)
    assert {(a, b) for a, b, _ in cells} >= {("Nodule", "Support Devices"), ("Effusion", "Effusion")}
    for a, b, v in cells:
        assert int(v) == int(((ok[a] == 1) & (ok[b] == 1)).sum()), (a, b)
    assert int(((ok["Nodule"] == 1) & (ok["Support Devices"] == 1)).sum()) > 0  # a pair that can be wrong
    # laterality: the simulated backend draws each blob on the requested side, which a frontal film
    # shows (read from the mask); a lateral film shows no side, so those images are undetermined
    rows = re.findall(r'<tr data-finding="([^"]+)" data-requested="([^"]+)">(.*?)</tr>', text, re.S)
    assert {f for f, _, _ in rows} == {"Effusion", "Nodule"}
    for finding, want, row in rows:
        got = {k: int(v) for k, v in re.findall(r'data-side="([^"]+)">(\d+)<', row)}
        sel = ok[(ok[finding] == 1) & (ok[f"{finding}.laterality"] == want)]
        frontal = int(sel.view.isin(["PA", "AP"]).sum())
        assert got[want] == frontal and got["undetermined"] == len(sel) - frontal, (finding, want, got)
        assert sum(got.values()) == len(sel)
    # severity: one row per requested grade present
    sev = re.search(r'<table id="severity">(.*?)</table>', text, re.S).group(1)
    grades = ok.loc[ok.Effusion == 1, "Effusion.severity"].dropna().unique()
    assert len(grades) and all(f"<td>{g}</td>" in sev for g in grades)
    # timing: images/s is ok images over the generation seconds of every job
    assert ids["rate-generate"] == f"{len(ok) / float(df.seconds_generate.fillna(0).sum()):.4g}"


def test_missing_metrics_panel_names_what_each_needs(dataset, tmp_path, monkeypatch):
    """After an eval with no reference and no weights: the headline shows the pixel diversity eval
    measured, and the panel names the reference and the full weights file for the rest."""
    from chexforge.cli import main
    from chexforge.contracts.model_files import XRV_MODELS

    monkeypatch.setenv("HOME", str(tmp_path / "nowhere"))  # an empty torchxrayvision cache
    dest = tmp_path / "rep"
    assert main(["eval", str(dataset), "--size", "64", "--out", str(dest)]) == 0
    metrics = json.loads((dest / "metrics.json").read_text())
    text = build_report(dataset, dest).read_text()
    panel = re.search(r'<table id="missing-table">(.*?)</table>', text, re.S).group(1)
    for metric in ("fidelity", "memorization", "adherence.findings", "adherence.sex"):
        assert f"<code>{metric}</code>" in panel
    assert XRV_MODELS["xrv-densenet"] in panel and "--reference" in panel and "--sex-model" in panel
    headline = re.search(r'<table id="metrics-headline">(.*?)</table>', text, re.S).group(1)
    assert f"{metrics['pixel_diversity']['ms_ssim_mean']:.4g}" in headline
