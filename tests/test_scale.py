"""Scale: worker processes, crash retries, Ray, shards and merge, kill -9 and Ctrl-C, status."""

from __future__ import annotations

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
from chexforge.contracts import manifest as mc
from chexforge.contracts.jobs import shard_of
from chexforge.errors import UserError
from chexforge.export import manifest as mf
from chexforge.plan import plan
from chexforge.recipe import parse_recipe
from chexforge.runtime.jobs import select_shard
from chexforge.runtime.pool import parse_devices

from .conftest import PATIENCE, children, cmdline, exited, wait_until, write

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


def committed_parts(out) -> set[str]:
    return set(mf.part_names(out)) if (out / mc.PARTS).is_dir() else set()


@pytest.mark.slow
@pytest.mark.parametrize("devices, kills", [("cpu", 4), ("cpu:2", 2)])  # a cpu:2 run takes ~15 s to its first batch here
def test_kill_9_at_random_instants_then_resume(tmp_path, devices, kills):
    """Each run is killed a random delay after it committed its first batch, so every kill lands
    mid-run (at least one with 0 < rows < n is asserted); orphaned workers are waited for until
    they have exited. What is committed is whole at every instant, and a resume completes it."""
    n = 60
    recipe = sim(tmp_path, n=n, spb=0.15)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "chexforge.cli", "generate", str(recipe), "--out", str(out), "--no-progress",
           "--devices", devices]
    rng = np.random.default_rng(1 if devices == "cpu" else 2)
    landed = []  # committed rows after each kill that hit a running process
    for _ in range(kills):
        before = committed_parts(out)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda b=before, p=proc: committed_parts(out) - b or p.poll() is not None, "a batch committed")
        time.sleep(float(rng.uniform(0.0, 0.6)))  # a random instant after it, up to a few batches
        workers = children(proc.pid)
        if proc.poll() is not None:
            break  # finished before the kill: nothing left to interrupt
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_until(lambda w=workers: exited(w), "the orphaned workers to exit")  # they stop on their own
        table = mf.read_manifest(out)  # what is committed is whole at every instant
        for row in table.to_pylist():
            assert atomic.sha256_file(out / row["image_png"]) == row["sha256_png"]
        landed.append(table.num_rows)
    assert any(0 < rows < n for rows in landed), landed
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    df = manifest(out)
    assert len(df) == n and df.job_id.is_unique and (df.status == "ok").all()
    hashes_ok(out, df)
    listed = {p for r in df.itertuples() for p in (r.image_png, r.image_dicom, r.seg_dicom)}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.suffix in (".png", ".dcm") and "images" in p.parts or p.suffix == ".dcm"}
    assert on_disk <= listed | {p for p in on_disk if "masks" in p}  # no orphan file is counted
    assert not list(out.rglob(atomic.TMP_PREFIX + "*"))


# ---- Ctrl-C: a run holds its own SIGINT handler from before its first batch to its committed end ----


def start(recipe, out, *flags, group=False):
    # A shell without job control starts background commands with SIGINT ignored, and an ignored
    # signal stays ignored through exec: give the run the default disposition, as a terminal would.
    return subprocess.Popen([sys.executable, "-m", "chexforge.cli", "generate", str(recipe), "--out", str(out),
                             "--no-progress", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=group, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def resume_completes(recipe, out, n, committed):
    """The run resumes from what the interrupted one committed (in one batch: one sleep)."""
    again = cli("generate", str(recipe), "--out", str(out), "--no-progress", "--batch-size", str(n))
    assert again.returncode == 0, again.stderr
    assert f"{n - committed} new image(s)" in again.stdout and (not committed or f"({committed} were already there)" in again.stdout)
    df = manifest(out)
    assert len(df) == n and (df.status == "ok").all()
    hashes_ok(out, df)


def test_ctrl_c_commits_the_batch_in_flight_and_status_reports(tmp_path):
    from chexforge.runtime.status import run_status

    n = 40  # 10 batches of 4 at 2 s a batch: ~20 s, so a Ctrl-C after the first batch lands mid-run
    out, recipe = tmp_path / "out", sim(tmp_path, n=n, spb=2.0)
    proc = start(recipe, out)
    wait_until(lambda: committed_parts(out) or proc.poll() is not None, "the first batch committed")
    assert proc.poll() is None, proc.communicate()[1]
    assert run_status(str(out)).state == "running"  # in this process: no run time spent starting a CLI
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    committed = mf.read_manifest(out)
    assert 0 < committed.num_rows < n and committed.num_rows % 4 == 0  # whole batches only
    stopped = cli("status", str(out))
    assert "interrupted" in stopped.stdout and f"{committed.num_rows} of {n}" in stopped.stdout
    resume_completes(recipe, out, n, committed.num_rows)


def starting_workers(pid) -> int:
    """How many worker processes of `pid` are in their start-up with Python's own SIGINT handler
    installed (/proc's SigCgt) and not yet ignoring SIGINT (worker.main does that first)."""
    def masks(child):
        try:
            lines = Path(f"/proc/{child}/status").read_text().splitlines()
        except OSError:
            return {}
        return {k: int(v, 16) for k, _, v in (x.partition(":\t") for x in lines) if k in ("SigCgt", "SigIgn")}

    sigint = 1 << (signal.SIGINT - 1)
    return sum(1 for c in children(pid) if "spawn_main" in cmdline(c)
               and masks(c).get("SigCgt", 0) & sigint and not masks(c).get("SigIgn", 0) & sigint)


def test_ctrl_c_to_the_process_group_while_workers_start(tmp_path):
    """A terminal sends Ctrl-C to every process of the job. Workers start with SIGINT blocked and
    then ignore it, so one pressed while they import and unpickle neither kills them nor prints
    their traceback; the parent stops the run, and each worker exits once it is told to."""
    from chexforge.runtime.status import run_status

    n = 16
    out, recipe = tmp_path / "out", sim(tmp_path, n=n, spb=0.2)
    proc = start(recipe, out, "--devices", "cpu:2", group=True)
    wait_until(lambda: starting_workers(proc.pid) == 2 or proc.poll() is not None, "two workers in their start-up")
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)  # the parent, the workers in their start-up (importing), everyone
    _, stderr = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 130 and "interrupted" in stderr, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert run_status(str(out)).state == "interrupted"
    committed = mf.read_manifest(out).num_rows
    assert committed < n and committed % 4 == 0
    resume_completes(recipe, out, n, committed)


def _interrupt(where, count=1):
    """A stand-in for `where` that presses Ctrl-C (SIGINT to this process) `count` times, then runs it."""
    def pressed(*args, **kw):
        for _ in range(count):
            signal.raise_signal(signal.SIGINT)
        return where(*args, **kw)
    return pressed


def test_ctrl_c_in_each_phase_of_a_run_in_process(tmp_path, monkeypatch, request):
    """Deterministic: SIGINT raised at a chosen point of an in-process run. While it prepares: it
    stops before its first batch. While a batch is made: that batch is finished and committed, no
    other is started. After its last batch: its end is committed and it is not interrupted. And the
    handler is Python's own again once the run is over."""
    from chexforge.backends.simulated.backend import SimulatedBackend
    from chexforge.runtime import RunOptions, run
    from chexforge.runtime import runner as R

    r = parse_recipe(sim(tmp_path, n=12).read_text())
    jobs = plan(r)
    # Python's own handler, as under a terminal: pytest started in the background of a shell
    # without job control (a detached `make test`) inherits SIGINT ignored, and then a run rightly
    # leaves it ignored and the presses below would reach nobody.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, inherited))
    before = signal.getsignal(signal.SIGINT)

    with monkeypatch.context() as m:  # while preparing (reading what the folder holds)
        m.setattr(R, "done_ids", _interrupt(R.done_ids))
        s = run(jobs, r, tmp_path / "prep", RunOptions(progress=False))
    assert s.interrupted and s.generated == 0 and mf.read_manifest(tmp_path / "prep").num_rows == 0

    real = SimulatedBackend.generate
    calls = []

    def second_batch_presses(self, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return real(self, rows)

    with monkeypatch.context() as m:  # while the second batch is made
        m.setattr(SimulatedBackend, "generate", second_batch_presses)
        s = run(jobs, r, tmp_path / "mid", RunOptions(progress=False))
    assert s.interrupted and calls == [4, 4] and s.generated == 8  # the batch in hand is committed, no third
    assert mf.read_manifest(tmp_path / "mid").num_rows == 8

    with monkeypatch.context() as m:  # after the last batch, while the manifest is merged
        m.setattr(R.mf, "merge_parts", _interrupt(R.mf.merge_parts))
        s = run(jobs, r, tmp_path / "end", RunOptions(progress=False))
    assert not s.interrupted and s.generated == 12 and len(manifest(tmp_path / "end")) == 12
    assert json.loads((tmp_path / "end" / ".run.json").read_text())["state"] == "finished"

    with monkeypatch.context() as m:  # a second Ctrl-C stops at once: the batch being made is dropped
        m.setattr(SimulatedBackend, "generate", _interrupt(real, count=2))
        s = run(jobs, r, tmp_path / "twice", RunOptions(progress=False))
    assert s.interrupted and s.generated == 0 and mf.read_manifest(tmp_path / "twice").num_rows == 0
    assert signal.getsignal(signal.SIGINT) is before


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
