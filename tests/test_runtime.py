"""End to end: generate, resume, kill -9 at random instants, limits, --jobs, write errors."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from chexforge import atomic
from chexforge.errors import UserError
from chexforge.plan import plan
from chexforge.recipe import load_recipe
from chexforge.runtime import RunOptions, run

from .conftest import requested_masks_written, wait_until, write

SMALL = """
name: small
seed: 3
output: {{size: 64, formats: [png, dicom]}}
cohorts:
  - name: normal
    count: {a}
    demographics: {{sex: [F, M]}}
  - name: effusion
    count: {b}
    findings:
      Effusion: {{laterality: [left, right], severity: moderate}}
      Nodule: 0.5
"""


def small(tmp_path: Path, a: int = 3, b: int = 3) -> Path:
    return write(tmp_path, SMALL.format(a=a, b=b))


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chexforge.cli", *args], capture_output=True, text=True, **kw)


def check_output(out: Path, n: int) -> None:
    """Exactly n rows, unique ids, every file present with the recorded hash, no temp files left."""
    table = pq.read_table(out / "manifest.parquet")
    assert table.num_rows == n
    ids = table.column("job_id").to_pylist()
    assert len(set(ids)) == n
    for row in table.to_pylist():
        assert row["status"] == "ok", row["error"]
        assert atomic.sha256_file(out / row["image_png"]) == row["sha256_png"]
        assert atomic.sha256_file(out / row["image_dicom"]) == row["sha256_dicom"]
        for m in row["masks"]:
            assert atomic.sha256_file(out / m["path"]) == m["sha256"]
    assert not list(out.rglob(atomic.TMP_PREFIX + "*"))
    assert not (out / ".parts").exists() or not list((out / ".parts").iterdir())


def test_generate_writes_a_complete_dataset(tmp_path):
    out = tmp_path / "out"
    proc = cli("generate", str(small(tmp_path)), "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    check_output(out, 6)
    for name in ("coco.json", "README.md", "recipe.yaml"):
        assert (out / name).is_file()
    coco = json.loads((out / "coco.json").read_text())
    assert len(coco["images"]) == 6
    effusions = [a for a in coco["annotations"] if a["category_id"] == next(c["id"] for c in coco["categories"] if c["name"] == "Effusion")]
    assert len(effusions) == 3
    card = (out / "README.md").read_text()
    assert "load_dataset" in card and "pd.read_parquet" in card and "| effusion | 3 |" in card
    table = pq.read_table(out / "manifest.parquet")
    meta = json.loads(table.column("meta")[0].as_py())
    assert "geometry" in meta and table.column("backend")[0].as_py() == "drr"
    # Every DICOM the pipeline wrote passes the validator: the images, and their masks as SEGs.
    from .test_export import dciodvfy

    for dcm in sorted((out / "dicom").rglob("*.dcm")):
        report = dciodvfy(dcm)
        iod = "Segmentation" if dcm.stem.endswith("_seg") else "DXImageForPresentation"
        assert iod in report and not [x for x in report.splitlines() if x.startswith("Error")], report
    # The resolved recipe in out/ re-plans to the same jobs.
    again = plan(load_recipe(out / "recipe.yaml"))
    assert again.column("job_id").to_pylist() == table.column("job_id").to_pylist()


def test_rerun_resumes_and_skips(tmp_path):
    recipe = small(tmp_path)
    out = tmp_path / "out"
    r = load_recipe(recipe)
    jobs = plan(r)
    first = run(jobs, r, out, RunOptions(limit=2, progress=False))
    assert first.generated == 2
    t0 = pq.read_table(out / "manifest.parquet")
    assert t0.num_rows == 2
    second = run(jobs, r, out, RunOptions(progress=False))
    assert second.skipped == 2 and second.generated == 4
    third = run(jobs, r, out, RunOptions(progress=False))
    assert third.generated == 0 and third.skipped == 6
    check_output(out, 6)


def test_same_recipe_same_pixels(tmp_path):
    recipe = small(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert cli("generate", str(recipe), "--out", str(out), "--no-progress").returncode == 0
    ta, tb = (pq.read_table(p / "manifest.parquet") for p in (a, b))
    assert ta.column("sha256_png").to_pylist() == tb.column("sha256_png").to_pylist()
    assert ta.column("sha256_dicom").to_pylist() == tb.column("sha256_dicom").to_pylist()


def test_jobs_file_path(tmp_path):
    recipe = small(tmp_path, 2, 1)
    jobs = tmp_path / "jobs.parquet"
    assert cli("plan", str(recipe), "--out", str(jobs)).returncode == 0
    out = tmp_path / "out"
    proc = cli("generate", "--jobs", str(jobs), "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    check_output(out, 3)


def test_missing_file_is_regenerated(tmp_path):
    recipe = small(tmp_path, 2, 0)
    out = tmp_path / "out"
    assert cli("generate", str(recipe), "--out", str(out), "--no-progress").returncode == 0
    victim = next((out / "images").rglob("*.png"))
    victim.unlink()
    proc = cli("generate", str(recipe), "--out", str(out), "--no-progress")
    assert "1 new image" in proc.stdout
    check_output(out, 2)


def test_changed_recipe_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    assert cli("generate", str(small(tmp_path, 2, 0)), "--out", str(out), "--no-progress").returncode == 0
    other = write(tmp_path, SMALL.format(a=2, b=0).replace("seed: 3", "seed: 4"), "other.yaml")
    proc = cli("generate", str(other), "--out", str(out), "--no-progress")
    assert proc.returncode == 2 and "different plan" in proc.stderr and "Traceback" not in proc.stderr
    assert cli("generate", str(other), "--out", str(out), "--overwrite", "--no-progress").returncode == 0
    check_output(out, 2)


@pytest.mark.slow
def test_kill_9_at_random_instants_then_resume(tmp_path):
    """A kill -9 at any instant loses at most the batch in flight and never a committed file. Each
    run is killed a random delay after it committed its first batch, so every kill lands mid-run."""
    from chexforge.export.manifest import part_names, read_manifest

    n = 12
    recipe = small(tmp_path, 6, 6)
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    cmd = [sys.executable, "-m", "chexforge.cli", "generate", str(recipe), "--out", str(out),
           "--batch-size", "1", "--no-progress"]
    landed = []
    for _ in range(3):
        before = set(part_names(out)) if out.exists() else set()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda b=before, p=proc: set(part_names(out)) - b or p.poll() is not None, "a batch committed")
        time.sleep(float(rng.uniform(0.0, 1.0)))  # a random instant after it: mid-render, mid-export or between
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # Whatever was committed is readable and consistent right now.
        table = read_manifest(out)
        for row in table.to_pylist():
            assert atomic.sha256_file(out / row["image_png"]) == row["sha256_png"]
        landed.append(table.num_rows)
    assert any(0 < rows < n for rows in landed), landed
    final = subprocess.run(cmd, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    check_output(out, n)


def test_full_disk_gives_one_line_and_keeps_committed_work(tmp_path, monkeypatch):
    recipe = small(tmp_path, 3, 0)
    out = tmp_path / "out"
    r = load_recipe(recipe)
    jobs = plan(r)
    run(jobs, r, out, RunOptions(limit=1, progress=False))
    before = pq.read_table(out / "manifest.parquet")

    real = atomic.atomic_open
    calls = {"n": 0}

    def failing(path):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(atomic, "atomic_open", failing)
    with pytest.raises(UserError, match="the disk is full; everything committed before this is intact"):
        run(jobs, r, out, RunOptions(progress=False, batch_size=1))
    monkeypatch.setattr(atomic, "atomic_open", real)
    from chexforge.export.manifest import read_manifest

    after = read_manifest(out)
    assert set(before.column("job_id").to_pylist()) <= set(after.column("job_id").to_pylist())
    run(jobs, r, out, RunOptions(progress=False))
    check_output(out, 3)


def test_cli_flag_errors_are_one_line(tmp_path):
    proc = cli("generate", str(small(tmp_path)), "--out", str(tmp_path / "o"), "--limt", "3")
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "--limt" in lines[0], proc.stderr
    proc = cli("generate", str(small(tmp_path)), "--out", str(tmp_path / "o"), "--limit", "many")
    assert proc.returncode == 2 and len([x for x in proc.stderr.splitlines() if x.strip()]) == 1
    proc = cli("generate", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "give a recipe file or --jobs" in proc.stderr


def test_inspect_and_dry_run(tmp_path):
    recipe = small(tmp_path, 2, 2)
    out = tmp_path / "out"
    dry = cli("generate", str(recipe), "--out", str(out), "--dry-run")
    assert dry.returncode == 0 and "effusion" in dry.stdout and not out.exists()
    assert cli("generate", str(recipe), "--out", str(out), "--no-progress").returncode == 0
    proc = cli("inspect", str(out))
    assert proc.returncode == 0 and "contact sheet" in proc.stdout
    from PIL import Image

    from chexforge.export.contact_sheet import tile
    from chexforge.store import open_store

    # 4 images, one per cohort in turn, in one row of 4 tiles of 256 px with a 30 px caption
    # under each; every tile is that image with its masks and boxes drawn on.
    by = {c: [r for r in pq.read_table(out / "manifest.parquet").to_pylist() if r["cohort"] == c] for c in ("normal", "effusion")}
    order = [by["normal"][0], by["effusion"][0], by["normal"][1], by["effusion"][1]]
    with Image.open(out / "contact_sheet.png") as im:
        assert im.size == (4 * 256, 256 + 30) and im.mode == "RGB"
        sheet = np.asarray(im)
    for i, row in enumerate(order):
        assert np.array_equal(sheet[:256, i * 256:(i + 1) * 256], np.asarray(tile(open_store(out), row, 256))), i
        assert sheet[256:, i * 256:(i + 1) * 256].max() > 200  # its caption
    missing = cli("inspect", str(tmp_path))
    assert missing.returncode == 2 and "not a chexforge output folder" in missing.stderr


def _resolve_in_child(spec, results) -> None:
    results.put((str(spec.recipe.resolve_path("model-dir")), spec.recipe.model_dump(mode="json"), spec.part(7, "-a1")))


def test_run_spec_crosses_processes_with_the_recipe_folder(tmp_path):
    """Workers get the typed Recipe (pickled), and it still resolves relative paths against the
    recipe file's folder: pydantic pickles private attributes, through spawn and Ray alike."""
    import multiprocessing as mp

    from chexforge.runtime.batch import RunSpec

    spec = RunSpec(load_recipe(small(tmp_path)), str(tmp_path / "out"), "run", 1)
    here = str(spec.recipe.resolve_path("model-dir"))
    assert here == str(tmp_path.resolve() / "model-dir")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    child = ctx.Process(target=_resolve_in_child, args=(spec, results))
    child.start()
    child.join(60)
    assert results.get() == (here, spec.recipe.model_dump(mode="json"), "run-000000000007-a1")
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    again = cloudpickle.loads(cloudpickle.dumps(spec))
    assert str(again.recipe.resolve_path("model-dir")) == here and again.recipe == spec.recipe


# ---- every requested mask is written, for every backend ---------------------------------------


def test_simulated_backend_writes_every_requested_mask_and_box(tmp_path):
    from chexforge.contracts.backends import backend_info

    findings = [f for f in backend_info("simulated").findings if f != "No Finding"]
    recipe = write(tmp_path, f"""
name: masks
seed: 2
backend: simulated
output: {{size: 64, formats: [png], masks: true}}
cohorts:
  - name: every
    count: 2
    findings: {{{", ".join(f"{f}: 1.0" for f in findings)}}}
    masks: [lungs, lung_left, lung_right, heart]
  - {{name: sided, count: 3, findings: {{Effusion: {{p: 1.0, laterality: [left, right, bilateral]}}}}, masks: [heart]}}
  - {{name: default, count: 1}}
  - name: boxed
    count: 1
    findings: {{Mass: 1.0}}
    layout: {{boxes: [{{label: Mass, box: [0.1, 0.2, 0.3, 0.5]}}]}}
""")
    r = load_recipe(recipe)
    run(plan(r), r, tmp_path / "out", RunOptions(progress=False))
    rows = {r["cohort"] + str(r["index"]): r for r in requested_masks_written(tmp_path / "out", finding_masks=True)}
    assert len(rows) == 7
    assert rows["default0"]["anatomy"] == ["lungs"]  # the claimed default structure
    for row in (x for k, x in rows.items() if k.startswith("sided")):  # one blob per side, on that side
        boxes = row["realised_boxes"]
        side = row["Effusion.laterality"]
        assert len(boxes) == (2 if side == "bilateral" else 1)
        if side != "bilateral":  # the patient's right is the image's left
            assert (boxes[0]["x1"] <= 0.5) == (side == "right") and (boxes[0]["x0"] >= 0.5) == (side == "left")
    [box] = rows["boxed0"]["realised_boxes"]  # the explicit box, to the pixel (1/64)
    assert np.allclose([box[k] for k in ("x0", "y0", "x1", "y1")], [0.1, 0.2, 0.3, 0.5], rtol=0, atol=1 / 64)


@pytest.mark.slow
def test_drr_backend_writes_every_requested_mask(tmp_path):
    """One job per finding the DRR backend claims, with every anatomy mask it claims."""
    from chexforge.contracts.backends import backend_info

    info = backend_info("drr")
    cohorts = "".join(f"  - {{name: c{i}, count: 1, findings: {{{f}: 1.0}}, masks: [{', '.join(info.anatomy)}]}}\n"
                      for i, f in enumerate(x for x in info.findings if x != "No Finding"))
    recipe = write(tmp_path, f"name: drr-masks\nseed: 5\noutput: {{size: 64, formats: [png], masks: true}}\ncohorts:\n{cohorts}")
    r = load_recipe(recipe)
    run(plan(r), r, tmp_path / "out", RunOptions(progress=False))
    rows = requested_masks_written(tmp_path / "out", finding_masks=True)
    assert len(rows) == len(info.findings) - 1


# ---- folders and job tables made before the patient columns (issue 12, item 2) -------------------------

PATIENTS = ["patient_id", "study_id", "patient_seed"]
SIMULATED = """
name: old
seed: 6
backend: simulated
output: {size: 64, formats: [png, dicom]}
cohorts:
  - name: a
    count: 4
"""


def test_a_folder_made_before_the_patient_columns_resumes(tmp_path):
    """An old folder's manifest lacks patient_id/study_id/patient_seed: the run still takes it as
    the same plan (job ids did not change), skips its images and makes the rest; the old rows keep
    null ids, the new ones have them."""
    import pyarrow as pa

    r = load_recipe(write(tmp_path, SIMULATED))
    jobs = plan(r)
    out = tmp_path / "out"
    assert run(jobs, r, out, RunOptions(limit=2, progress=False)).generated == 2
    old = pq.read_table(out / "manifest.parquet")
    pq.write_table(old.drop_columns(PATIENTS).replace_schema_metadata(old.schema.metadata), out / "manifest.parquet")
    again = run(jobs, r, out, RunOptions(progress=False))
    assert (again.skipped, again.generated, again.failed) == (2, 2, 0)
    table = pq.read_table(out / "manifest.parquet")
    assert table.column("patient_id").to_pylist()[:2] == [None, None]
    assert table.column("patient_id").to_pylist()[2:] == jobs.column("patient_id").to_pylist()[2:]
    assert pa.types.is_int64(table.schema.field("patient_seed").type)
    check_output(out, 4)


def test_a_jobs_file_planned_before_the_patient_columns_runs(tmp_path):
    """`generate --jobs` of a table without the patient columns: each job is its own patient (the
    DICOM PatientID is its job id, as before), and a backend that reads patient_seed gets None."""
    import pydicom

    r = load_recipe(write(tmp_path, SIMULATED))
    jobs = plan(r)
    path = tmp_path / "jobs.parquet"
    pq.write_table(jobs.drop_columns(PATIENTS).replace_schema_metadata(jobs.schema.metadata), path)
    out = tmp_path / "out"
    proc = cli("generate", "--jobs", str(path), "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    check_output(out, 4)
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert all(row[c] is None for row in rows for c in PATIENTS)
    assert [pydicom.dcmread(out / row["image_dicom"]).PatientID for row in rows] == [row["job_id"] for row in rows]
    # The same folder then resumed from the recipe (planned with the columns) is the same plan.
    proc = cli("generate", str(tmp_path / "recipe.yaml"), "--out", str(out), "--no-progress")
    assert proc.returncode == 0 and "different plan" not in proc.stderr, proc.stderr
