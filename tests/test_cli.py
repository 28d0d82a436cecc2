"""Commands no other test file reaches, each with a known answer: `audit`, `backends`,
`models init`, `plan`'s time estimate, `generate --retry-failed`, generating a balance recipe;
and the CI gate: under CI=1 a missing chromium or dciodvfy fails the tests and `.ci/run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from chexforge.contracts.backends import BACKENDS
from chexforge.qc.rules import attempt_seed

from .conftest import ROOT, required_tool, write

CHEXPERT = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
            "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
            "Fracture,Support Devices")


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "3000", **kw.pop("env", {})}  # wide enough that rich wraps no cell
    return subprocess.run([sys.executable, "-m", "chexforge.cli", *args], capture_output=True, text=True, env=env, **kw)


def run_cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """The CLI in this process (no interpreter start, no imports again): rc, stdout, stderr."""
    from chexforge.cli import main

    capsys.readouterr()
    rc = main(list(args))
    got = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, got.out, got.err)


def chexpert(path: Path, people: list[tuple[str, int, bool]]) -> Path:
    """A CheXpert-style CSV: one frontal PA image per (sex, age, effusion)."""
    rows = [CHEXPERT] + [f"p{i:04d}/study1/view1_frontal.jpg,{sex},{age},Frontal,PA,{'' if eff else '1.0'},,,,,,,,,,"
                         f"{'1.0' if eff else ''},,," for i, (sex, age, eff) in enumerate(people)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_audit_counts_groups_and_prevalence(tmp_path, capsys):
    """6 women (3 with an effusion) and 2 men (none): sizes, shares and prevalences exactly."""
    labels = chexpert(tmp_path / "train.csv", [("Female", 30, i < 3) for i in range(6)] + [("Male", 50, False)] * 2)
    proc = run_cli(capsys, "audit", str(labels), "--by", "sex", "--out", str(tmp_path / "audit"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert report["images"] == 8 and report["by"] == ["sex"] and report["findings"] == ["Effusion"]
    groups = {g["group"]["sex"]: g for g in report["groups"]}
    assert (groups["F"]["n"], groups["M"]["n"]) == (6, 2) and (groups["F"]["share"], groups["M"]["share"]) == (0.75, 0.25)
    assert groups["F"]["positives"] == {"Effusion": 3} and groups["F"]["prevalence"] == {"Effusion": 0.5}
    assert groups["M"]["prevalence"] == {"Effusion": 0.0}
    assert report["imbalance"]["size_min_over_max"] == pytest.approx(2 / 6)
    assert report["imbalance"]["Effusion"]["spread"] == 0.5
    assert (tmp_path / "audit" / "audit.png").stat().st_size > 1000
    assert "8 images" in proc.stdout and "wrote" in proc.stdout


def test_generating_a_balance_recipe_realises_its_groups(tmp_path, capsys):
    """4 women and 8 men balanced by sex: the top-up asks for 4 women, and generating it makes
    exactly 4 images, all of women: real plus synthetic is 8 and 8."""
    labels = chexpert(tmp_path / "train.csv", [("Female", 40, False)] * 4 + [("Male", 40, i % 2 == 0) for i in range(8)])
    recipe = tmp_path / "balance.yaml"
    proc = run_cli(capsys, "balance", str(labels), "--by", "sex", "--size", "64", "--out", str(recipe))
    assert proc.returncode == 0, proc.stderr
    gen = run_cli(capsys, "generate", str(recipe), "--out", str(tmp_path / "gen"), "--no-progress")
    assert gen.returncode == 0, gen.stderr
    made = pq.read_table(tmp_path / "gen" / "manifest.parquet").to_pylist()
    assert len(made) == 4 and all(r["status"] == "ok" and r["sex"] == "F" for r in made)
    audit = run_cli(capsys, "audit", str(tmp_path / "gen" / "manifest.parquet"), "--by", "sex", "--out", str(tmp_path / "a"))
    assert audit.returncode == 0, audit.stderr
    synthetic = {g["group"]["sex"]: g["n"] for g in json.loads((tmp_path / "a" / "audit.json").read_text())["groups"]}
    assert synthetic.get("F") == 4 and not synthetic.get("M")  # with the 4 + 8 real: 8 women, 8 men


def test_backends_lists_what_each_backend_claims():
    proc = cli("backends")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for b in BACKENDS.values():
        [row] = [x for x in lines if x.strip(" │|").startswith(b.name + " ")]
        for part in (b.summary, ", ".join(b.views), "{}-{}".format(*b.ages), ", ".join(b.anatomy), ", ".join(b.layouts)):
            assert part in row, (b.name, part)
    assert ", ".join(BACKENDS["drr"].findings) in proc.stdout


def test_models_init_writes_a_loadable_pipeline_with_the_hash_it_prints(tmp_path, tiny_model, capsys):
    """`models init --seed 0` writes the pipeline conftest's `tiny_model` builds through the API
    (the same seed: the same weights), and prints its hash."""
    from chexforge.models.pipeline import ChexforgePipeline

    proc = run_cli(capsys, "models", "init", "--out", str(tmp_path / "m"), "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    pipe, same = ChexforgePipeline.load(tmp_path / "m"), ChexforgePipeline.load(tiny_model)
    assert pipe.parameters_hash() == same.parameters_hash()
    a, b = pipe.transformer.state_dict(), same.transformer.state_dict()
    assert list(a) == list(b) and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert " ".join(proc.stdout.split()) == f"wrote a tiny pipeline to {tmp_path / 'm'} (weights hash {pipe.parameters_hash()})"


def test_plan_time_estimate(tmp_path, capsys):
    """The drr backend's 0.6 s per 256² CPU image, scaled by each job's pixels: 30 images at 512
    px are 0.6 × 4 × 30 = 72 s; 300 are 720 s (12 min); the simulated backend costs nothing."""
    from chexforge.plan import plan_report

    for count, seconds, shown in ((30, 72.0, "about 72 s"), (300, 720.0, "about 12 min")):
        recipe = write(tmp_path, f"name: t\nseed: 1\noutput: {{size: 512}}\ncohorts:\n  - {{name: a, count: {count}}}\n")
        assert plan_report(recipe).seconds == pytest.approx(seconds)
        proc = run_cli(capsys, "plan", str(recipe))
        assert proc.returncode == 0, proc.stderr
        assert f"{count} images; {shown} on one CPU with the drr backend" in proc.stdout
    sim = write(tmp_path, "name: s\nbackend: simulated\ncohorts:\n  - {name: a, count: 5}\n", "sim.yaml")
    assert plan_report(sim).seconds == 0.0


def test_retry_failed_through_the_cli(tmp_path, capsys):
    """QC fails the jobs whose first seed renders blank (max_attempts 1). A plain re-run redoes
    nothing; --retry-failed with more attempts redoes exactly those jobs, which now pass."""
    text = """
name: r
seed: 9
backend: simulated
backend_options: {{blank_fraction: 0.5}}
output: {{size: 64, formats: [png]}}
qc: {{max_attempts: {attempts}, rules: [{{check: not_blank, min: 0.05}}]}}
cohorts:
  - {{name: a, count: 10}}
"""
    out = tmp_path / "out"
    once = write(tmp_path, text.format(attempts=1), "once.yaml")
    first = run_cli(capsys, "generate", str(once), "--out", str(out), "--no-progress")
    assert first.returncode == 0, first.stderr
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    blank = {r["job_id"] for r in rows if np.random.default_rng((r["seed"], 0xB1A)).random() < 0.5}
    assert 0 < len(blank) < 10 and {r["job_id"] for r in rows if r["status"] == "failed"} == blank
    assert f"{len(blank)} job(s) failed" in first.stderr
    plain = run_cli(capsys, "generate", str(once), "--out", str(out), "--no-progress")
    assert plain.returncode == 0 and "0 new image(s)" in plain.stdout and "(10 were already there)" in plain.stdout
    more = write(tmp_path, text.format(attempts=8), "more.yaml")  # QC is not part of a job's identity
    retry = run_cli(capsys, "generate", str(more), "--out", str(out), "--no-progress", "--retry-failed")
    assert retry.returncode == 0, retry.stderr
    assert f"{len(blank)} new image(s)" in retry.stdout and f"({10 - len(blank)} were already there)" in retry.stdout
    after = {r["job_id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert len(after) == 10 and all(r["status"] == "ok" for r in after.values())
    for job_id in blank:  # kept: the first derived seed that is not blank
        qc = json.loads(after[job_id]["meta"])["qc"]
        seeds = [attempt_seed(after[job_id]["seed"], k) for k in range(1, qc["attempts"] + 1)]
        assert [np.random.default_rng((s, 0xB1A)).random() < 0.5 for s in seeds] == [True] * (len(seeds) - 1) + [False]


# ---- the CI gate ----------------------------------------------------------------------------------


def test_a_missing_tool_fails_under_ci_and_skips_elsewhere(tmp_path, monkeypatch):
    from .test_export import dciodvfy

    monkeypatch.setenv("PATH", str(tmp_path))  # neither chromium nor dciodvfy here
    monkeypatch.setenv("CI", "1")
    for check in (lambda: required_tool("chromium", "apt-get install chromium"), lambda: dciodvfy(tmp_path / "x.dcm")):
        with pytest.raises(pytest.fail.Exception, match="must be installed in CI"):
            check()
    monkeypatch.delenv("CI")
    for check in (lambda: required_tool("chromium", "apt-get install chromium"), lambda: dciodvfy(tmp_path / "x.dcm")):
        with pytest.raises(pytest.skip.Exception):
            check()


def test_ci_run_stops_when_a_tool_cannot_be_installed(tmp_path):
    """`.ci/run` on a machine where apt-get cannot install dciodvfy or chromium stops with a line
    naming the tool, before the tests run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "id", "cat", "env"):
        (bin_dir / tool).symlink_to(subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip())
    for name, body in (("apt-get", "exit 100"), ("sudo", 'exec "$@"'), ("make", f": > {tmp_path}/make-ran")):
        (bin_dir / name).write_text(f"#!{bin_dir / 'bash'}\n{body}\n")
        (bin_dir / name).chmod(0o755)
    proc = subprocess.run([str(bin_dir / "bash"), str(ROOT / ".ci" / "run")], capture_output=True, text=True,
                          env={"PATH": str(bin_dir), "HOME": str(tmp_path)})
    assert proc.returncode != 0 and not (tmp_path / "make-ran").exists(), proc.stdout + proc.stderr
    assert "dciodvfy" in proc.stderr and "could not be installed" in proc.stderr, proc.stderr
