"""Scale: worker processes, crash retries, Ray, shards and merge, kill -9 and Ctrl-C, status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from chexforge import atomic
from chexforge.contracts.jobs import shard_of
from chexforge.errors import UserError
from chexforge.export import manifest as mf
from chexforge.plan import plan
from chexforge.recipe import parse_recipe
from chexforge.runtime.jobs import select_shard
from chexforge.runtime.pool import parse_devices

from .conftest import write

SIM = """
name: sim
seed: 4
backend: simulated
backend_options: {{seconds_per_batch: {spb}, batch_size: 4{extra}}}
output: {{size: 64, formats: [png, dicom]}}
cohorts:
  - {{name: a, count: {n}}}
"""


def sim(tmp_path, n=20, spb=0.02, extra="", name="sim.yaml"):
    return write(tmp_path, SIM.format(n=n, spb=spb, extra=extra), name)


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "chexforge.cli", *args], capture_output=True, text=True, **kw)


def manifest(out):
    return pq.read_table(out / "manifest.parquet").to_pandas()


def hashes_ok(out, df):
    for r in df[df.status == "ok"].itertuples():
        assert atomic.sha256_file(out / r.image_png) == r.sha256_png
        assert atomic.sha256_file(out / r.image_dicom) == r.sha256_dicom


def test_parse_devices(monkeypatch):
    from chexforge.runtime import pool

    assert parse_devices("cpu") == ["inprocess"]
    assert parse_devices("cpu:3") == ["cpu"] * 3
    with pytest.raises(UserError, match="GPU numbers"):
        parse_devices("gpu0")
    monkeypatch.setattr(pool, "gpu_count", lambda: 0)
    with pytest.raises(UserError, match=r"--devices 0,1: cuda:0, cuda:1 is not on this machine \(0 GPUs here\)"):
        parse_devices("0,1")
    monkeypatch.setattr(pool, "gpu_count", lambda: 3)
    assert parse_devices("0,2") == ["cuda:0", "cuda:2"] and parse_devices("cuda:1") == ["cuda:1"]
    with pytest.raises(UserError, match="cuda:3 is not on this machine"):
        parse_devices("1,3")


def test_devices_flag_without_that_gpu_is_one_line_exit_2(tmp_path):
    from chexforge.devices import gpu_count

    if gpu_count():
        pytest.skip("this machine has a GPU 0")
    proc = cli("generate", str(sim(tmp_path)), "--out", str(tmp_path / "o"), "--no-progress", "--devices", "0")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cuda:0 is not on this machine" in proc.stderr


def test_worker_processes_match_the_in_process_run(tmp_path):
    recipe = sim(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("generate", str(recipe), "--out", str(a), "--no-progress").returncode == 0
    proc = cli("generate", str(recipe), "--out", str(b), "--no-progress", "--devices", "cpu:2")
    assert proc.returncode == 0, proc.stderr
    ma, mb = manifest(a), manifest(b)
    assert list(ma.job_id) == list(mb.job_id) and list(ma.sha256_png) == list(mb.sha256_png)
    assert list(ma.sha256_dicom) == list(mb.sha256_dicom)
    hashes_ok(b, mb)


def test_a_crashing_worker_is_replaced_and_only_its_culprit_job_fails(tmp_path):
    recipe = sim(tmp_path, extra=", crash_on: [5], fail_on: [9]")
    out = tmp_path / "out"
    proc = cli("generate", str(recipe), "--out", str(out), "--no-progress", "--devices", "cpu:2")
    assert proc.returncode == 0, proc.stderr
    df = manifest(out)
    assert len(df) == 20 and df.job_id.is_unique
    failed = df[df.status != "ok"].set_index("index")
    assert sorted(failed.index) == [5, 9]
    assert "crashed" in failed.loc[5, "error"] and failed.loc[5, "attempts"] == 2
    assert "simulated failure" in failed.loc[9, "error"]
    hashes_ok(out, df)


def test_ray_engine_matches_local_ids_and_hashes(tmp_path):
    pytest.importorskip("ray")
    recipe = sim(tmp_path, n=12)
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert cli("generate", str(recipe), "--out", str(local), "--no-progress").returncode == 0
    proc = cli("generate", str(recipe), "--out", f"file://{remote}", "--no-progress", "--engine", "ray", "--ray-actors", "2")
    assert proc.returncode == 0, proc.stderr
    a, b = manifest(local), manifest(remote)
    assert list(a.job_id) == list(b.job_id)
    assert list(a.sha256_png) == list(b.sha256_png) and list(a.sha256_dicom) == list(b.sha256_dicom)
    hashes_ok(remote, b)


def test_shards_partition_the_plan_and_merge_back(tmp_path):
    recipe = sim(tmp_path, n=30)
    jobs = plan(parse_recipe(recipe.read_text()))
    parts = [set(select_shard(jobs, (i, 3)).column("job_id").to_pylist()) for i in range(3)]
    assert set.union(*parts) == set(jobs.column("job_id").to_pylist()) and sum(map(len, parts)) == 30
    assert all(len(p) > 3 for p in parts)  # roughly balanced
    assert np.array_equal(shard_of(jobs.column("job_id"), 3), shard_of(jobs.column("job_id"), 3))
    whole = tmp_path / "whole"
    assert cli("generate", str(recipe), "--out", str(whole), "--no-progress").returncode == 0
    shards = []
    for i in range(3):
        out = tmp_path / f"shard{i}"
        assert cli("generate", str(recipe), "--out", str(out), "--shard", f"{i}/3", "--no-progress").returncode == 0
        shards.append(str(out))
    merged = tmp_path / "merged"
    proc = cli("merge", *shards, shards[0], "--out", str(merged))  # a folder twice: its duplicates are dropped
    assert proc.returncode == 0, proc.stderr
    assert "duplicates dropped" in proc.stdout
    a, b = manifest(whole).set_index("job_id"), manifest(merged).set_index("job_id")
    assert set(a.index) == set(b.index)
    assert (a.sha256_png == b.sha256_png.reindex(a.index)).all()
    hashes_ok(merged, b.reset_index())
    assert json.loads((merged / "coco.json").read_text())["images"]
    # A changed file is caught by its hash.
    victim = next((tmp_path / "shard1" / "images").rglob("*.png"))
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    bad = cli("merge", *shards, "--out", str(tmp_path / "merged2"))
    assert bad.returncode == 2 and "does not match the manifest" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("devices", ["cpu", "cpu:2"])
def test_kill_9_at_ten_random_instants_then_resume(tmp_path, devices):
    recipe = sim(tmp_path, n=60, spb=0.15)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "chexforge.cli", "generate", str(recipe), "--out", str(out), "--no-progress",
           "--devices", devices]
    rng = np.random.default_rng(1 if devices == "cpu" else 2)
    for _ in range(10):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(1.0, 4.0)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        table = mf.read_manifest(out)  # what is committed is whole at every instant
        for row in table.to_pylist():
            assert atomic.sha256_file(out / row["image_png"]) == row["sha256_png"]
    time.sleep(1.5)  # orphaned workers notice their parent is gone and stop
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    df = manifest(out)
    assert len(df) == 60 and df.job_id.is_unique and (df.status == "ok").all()
    hashes_ok(out, df)
    listed = {p for r in df.itertuples() for p in (r.image_png, r.image_dicom)}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.suffix in (".png", ".dcm") and "images" in p.parts or p.suffix == ".dcm"}
    assert on_disk <= listed | {p for p in on_disk if "masks" in p}  # no orphan file is counted
    assert not list(out.rglob(atomic.TMP_PREFIX + "*"))


def test_ctrl_c_commits_the_batch_in_flight_and_status_reports(tmp_path):
    n = 60  # 15 batches of 0.4 s
    recipe = sim(tmp_path, n=n, spb=0.4)
    out = tmp_path / "out"
    # A shell without job control starts background commands with SIGINT ignored, and an ignored
    # signal stays ignored through exec: give the run the default disposition, as a terminal would.
    proc = subprocess.Popen([sys.executable, "-m", "chexforge.cli", "generate", str(recipe), "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not mf.part_names(out) if out.exists() else True:
        time.sleep(0.1)
        assert time.time() < deadline
    running = cli("status", str(out))
    assert running.returncode == 0 and "running" in running.stdout
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in stderr
    committed = mf.read_manifest(out)
    assert 0 < committed.num_rows < n and committed.num_rows % 4 == 0  # whole batches only
    stopped = cli("status", str(out))
    assert "interrupted" in stopped.stdout and f"{committed.num_rows} of {n}" in stopped.stdout
    again = cli("generate", str(recipe), "--out", str(out), "--no-progress")
    assert again.returncode == 0 and f"({committed.num_rows} were already there)" in again.stdout
    assert len(manifest(out)) == n


def test_status_of_a_killed_run_says_stopped(tmp_path):
    recipe = sim(tmp_path, n=40, spb=0.3)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "chexforge.cli", "generate", str(recipe), "--out", str(out),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / ".run.json").exists():
        time.sleep(0.1)
        assert time.time() < deadline
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    status = cli("status", str(out))
    assert status.returncode == 0 and "stopped" in status.stdout


def test_compaction_keeps_every_row(tmp_path):
    """Long runs fold their per-batch parts together; the rows (last one per job wins) survive."""
    from chexforge.store import open_store

    store = open_store(tmp_path)
    rows = [{"job_id": f"{i:016x}", "cohort": "a", "index": i, "seed": i, "status": "ok"} for i in range(10)]
    for k in range(5):
        mf.write_part(store, rows[2 * k:2 * k + 2], f"p{k}")
    mf.write_part(store, [{**rows[0], "status": "failed", "error": "later"}], "p9")
    assert len(mf.part_names(store)) == 6
    assert mf.compact_parts(store, keep_last=1) == 5
    assert len(mf.part_names(store)) == 2
    mf.write_part(store, rows[:1], "p10")
    assert mf.compact_parts(store) == 2  # the earlier compacted part is not read again
    assert len(mf.part_names(store)) == 2
    table = mf.read_manifest(store).to_pandas().set_index("job_id")
    assert len(table) == 10 and table.loc[f"{0:016x}", "status"] == "failed"
