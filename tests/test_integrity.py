"""Data integrity (issue 13): one writer per output folder, normal file modes, streaming plans,
`chexforge verify`, damaged files and manifest parts repaired by a re-run, refused merges that
leave nothing behind, and `status` before the first batch."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from chexforge.export import manifest as mf
from chexforge.runtime import RunOptions, generate
from chexforge.store import open_store

from .conftest import write

SIM = """
name: sim
seed: {seed}
backend: simulated
backend_options: {{seconds_per_batch: {spb}, batch_size: 4}}
output: {{size: 64, formats: [png, dicom], masks: true}}
cohorts:
  - {{name: a, count: {n}}}
"""


def sim(tmp_path: Path, n: int = 6, spb: float = 0.0, seed: int = 4, name: str = "sim.yaml") -> Path:
    return write(tmp_path, SIM.format(n=n, spb=spb, seed=seed), name)


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chexforge.cli", *args], capture_output=True, text=True, **kw)


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    """Poll until `condition()` holds (never a fixed sleep for a state)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def make(out: Path, recipe: Path, **kw) -> None:
    generate(out, recipe=recipe, options=RunOptions(progress=False, **kw))


def rows(out: Path) -> int:
    return pq.read_metadata(out / "manifest.parquet").num_rows


# ---- 1. one writer per folder -----------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holder_and_one_valid_dataset_remains(tmp_path):
    recipe = sim(tmp_path, n=400, spb=0.5)  # 100 batches of 0.5 s: far longer than the checks below
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "chexforge.cli", "generate", str(recipe), "--out", str(out),
                              "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: mf.part_names(open_store(out)) if out.exists() else False, "the first run's first batch")
        second = cli("generate", str(recipe), "--out", str(out), "--no-progress")
        line = one_line(second)
        assert second.returncode == 2 and "another run is writing here" in line, line
        assert f"pid {first.pid}" in line and socket.gethostname() in line and "started 2" in line
        assert "chexforge generate" in line and str(recipe) in line
        other = cli("generate", str(sim(tmp_path, n=4, seed=9, name="other.yaml")), "--out", str(out), "--overwrite")
        assert other.returncode == 2 and f"pid {first.pid}" in one_line(other)
        merge = cli("merge", str(out), "--out", str(out))
        assert merge.returncode == 2 and f"pid {first.pid}" in one_line(merge)
        assert first.poll() is None  # still the only writer
    finally:
        first.kill()
        first.wait()
    # kill -9 left the lock file: its process is gone, so the next run takes it over and finishes
    assert (out / ".chexforge.lock").exists()
    done = cli("generate", str(recipe), "--out", str(out), "--no-progress", "--batch-size", "200")
    assert done.returncode == 0, done.stderr
    assert rows(out) == 400 and not (out / ".chexforge.lock").exists()
    assert cli("verify", str(out)).returncode == 0


def test_a_lock_of_another_host_is_named_and_broken_only_on_request(tmp_path):
    from chexforge.runtime.lock import LOCK_FILE, Holder

    recipe = sim(tmp_path, n=2)
    out = tmp_path / "out"
    out.mkdir()
    ghost = Holder("node-17.cluster", 4242, time.time() - 3600, "chexforge generate r.yaml --out x")
    (out / LOCK_FILE).write_bytes(ghost.to_bytes())
    proc = cli("generate", str(recipe), "--out", str(out), "--no-progress")
    line = one_line(proc)
    assert proc.returncode == 2 and "node-17.cluster" in line and "pid 4242" in line and "--break-lock" in line
    assert not (out / "recipe.yaml").exists()  # refused before writing anything
    proc = cli("generate", str(recipe), "--out", str(out), "--no-progress", "--break-lock")
    assert proc.returncode == 0, proc.stderr
    assert rows(out) == 2


def test_a_lock_left_by_a_dead_process_of_this_host_is_taken_over(tmp_path):
    from chexforge.runtime.lock import LOCK_FILE, Holder, OutputLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = open_store(tmp_path)
    (tmp_path / LOCK_FILE).write_bytes(Holder(socket.gethostname(), dead.pid, time.time(), "chexforge generate").to_bytes())
    with OutputLock(store) as lock:
        assert lock.took_over is not None and lock.took_over.pid == dead.pid
        with pytest.raises(Exception, match="another run is writing here"):  # and it is exclusive
            OutputLock(store).acquire()
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_on_an_object_store(tmp_path):
    from chexforge.errors import UserError
    from chexforge.runtime.lock import OutputLock

    store = open_store(f"memory://{tmp_path.name}/out")
    with OutputLock(store):
        with pytest.raises(UserError, match="another run is writing here"):
            OutputLock(store).acquire()
    with OutputLock(store):  # released: free again
        pass


# ---- 2. file modes ----------------------------------------------------------------------------


def chexpert_csv(path: Path, n: int = 60) -> Path:
    head = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
            "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
            "Fracture,Support Devices")
    body = [f"CheXpert-v1.0-small/train/patient{i:05d}/study1/view1_frontal.jpg,{'Female' if i % 3 else 'Male'},"
            f"{20 + i % 60},Frontal,PA,,,{'1.0' if i % 7 == 0 else ''},,,,,,,,{'1.0' if i % 4 == 0 else ''},,,"
            for i in range(n)]
    path.write_text("\n".join([head, *body]) + "\n")
    return path


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_every_output_file_gets_the_mode_of_a_plain_write(tmp_path, umask):
    """Images, DICOM, masks, manifest, card, COCO, recipe.yaml, contact sheet, jobs.parquet, a
    merged dataset, balance's recipe and audits: 0o666 less the umask, as open() gives."""
    from chexforge.balance import balance_labels
    from chexforge.cli import main
    from chexforge.evaluate.inspect import inspect_dataset
    from chexforge.runtime.merge import merge

    labels = chexpert_csv(tmp_path / "train.csv")
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    old = os.umask(umask)
    try:
        recipe = sim(tmp_path, n=3)
        out = tmp_path / "out"
        make(out, recipe)
        inspect_dataset(str(out), n=3)
        (tmp_path / "plan").mkdir()
        assert main(["plan", str(recipe), "--out", str(tmp_path / "plan" / "jobs.parquet")]) == 0
        merge([str(out)], str(tmp_path / "merged"))
        balance_labels(str(labels), tmp_path / "balance" / "balance.yaml", by="sex")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    files = {p for p in tmp_path.rglob("*") if p.is_file()} - before - {recipe}
    names = {p.name for p in files}
    assert {"manifest.parquet", "coco.json", "README.md", "recipe.yaml", "contact_sheet.png", "jobs.parquet",
            "balance.yaml", "audit_after.json", "audit.png"} <= names
    assert {p.suffix for p in files} >= {".png", ".dcm"} and any("masks" in p.parts for p in files)
    wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != want}
    assert not wrong, f"expected {oct(want)}: {wrong}"


# ---- 4. plan and dry run stream ---------------------------------------------------------------

BIG = """
name: big
seed: 1
backend: simulated
output: {{size: 64}}
cohorts:
  - name: a
    count: {a}
    findings: {{Effusion: 0.3, Nodule: {{p: 0.2, severity: [small, large]}}}}
  - {{name: b, count: 5}}
  - name: c
    count: {c}
    demographics: {{sex: [F, M]}}
"""


def test_the_plan_written_chunk_by_chunk_is_the_whole_plan_byte_for_byte(tmp_path):
    """Row groups of 65,536 rows span chunk and cohort boundaries; the streamed file is what
    write_jobs(plan(recipe)) writes, and the summary is the whole table's."""
    from chexforge.contracts.jobs import table_bytes
    from chexforge.plan import plan, plan_report
    from chexforge.plan.summary import cohort_summary
    from chexforge.recipe import parse_recipe

    r = parse_recipe(BIG.format(a=70_000, c=23_000))
    whole = plan(r)
    report = plan_report(r, tmp_path / "jobs.parquet", show=3, chunk=5000)
    assert (tmp_path / "jobs.parquet").read_bytes() == table_bytes(whole)
    assert report.jobs == whole.num_rows == 93_005
    assert report.cohorts == cohort_summary(whole)
    assert report.first == whole.slice(0, 3).select(["job_id", "cohort", "seed", "prompt"]).to_pylist()


def _peak_mib(*args: str) -> float:
    """Peak resident memory (VmHWM) of a fresh `chexforge ARGS` process, in MiB."""
    code = ("import sys\nfrom chexforge.cli import main\nrc = main(sys.argv[1:])\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "print('HWM', hwm)\nsys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.rsplit("HWM", 1)[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_plan_and_dry_run_memory_does_not_grow_with_the_job_count(tmp_path):
    """Whole tables grew ~1.2 GB per million jobs (~150 MB more for 130,000 more jobs); streamed,
    the difference is the job ids plan keeps to prove them unique (8 bytes a job) and noise. Both
    plans fill a whole Parquet row group (65,536 jobs), the largest buffer of a streamed plan."""
    small = write(tmp_path, BIG.format(a=70_000, c=1_000), "small.yaml")
    big = write(tmp_path, BIG.format(a=200_000, c=1_000), "big.yaml")
    for args in (["plan", "--out", str(tmp_path / "jobs.parquet")], ["generate", "--dry-run", "--out", str(tmp_path / "x")]):
        grow = _peak_mib(args[0], str(big), *args[1:]) - _peak_mib(args[0], str(small), *args[1:])
        assert grow < 50, f"{args[0]}: {grow:.0f} MiB more for 130,000 more jobs"
    assert not (tmp_path / "x").exists()  # a dry run writes nothing


# ---- 5. silent corruption ---------------------------------------------------------------------


def test_verify_lists_corrupt_missing_and_orphan_files(tmp_path):
    out = tmp_path / "out"
    make(out, sim(tmp_path, n=4))
    clean = cli("verify", str(out))
    table = pq.read_table(out / "manifest.parquet").to_pylist()
    files = sum(2 + len(row["masks"]) + bool(row["seg_dicom"]) for row in table)  # PNG, DX, masks, SEG
    assert clean.returncode == 0 and f"all {files} files of 4 jobs match" in clean.stdout, clean.stdout + clean.stderr
    flipped, gone = out / table[0]["image_png"], out / table[1]["image_dicom"]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size: only a hash sees it
    flipped.write_bytes(bytes(data))
    gone.unlink()
    (out / "masks" / "a" / "stray.png").write_bytes(b"not ours")
    proc = cli("verify", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(x.startswith("corrupt " + table[0]["image_png"]) and "SHA-256" in x for x in lines), proc.stdout
    assert f"missing {table[1]['image_dicom']}" in lines
    assert any(x.startswith("orphan  masks/a/stray.png") for x in lines)
    assert "1 missing, 1 corrupt, 1 orphan" in proc.stdout


def test_a_rerun_remakes_truncated_and_missing_files(tmp_path):
    recipe = sim(tmp_path, n=4)
    out = tmp_path / "out"
    make(out, recipe)
    table = pq.read_table(out / "manifest.parquet").to_pylist()
    truncated = out / table[0]["image_dicom"]
    truncated.write_bytes(truncated.read_bytes()[:100])
    (out / table[2]["masks"][0]["path"]).unlink()
    proc = cli("generate", str(recipe), "--out", str(out), "--no-progress")
    assert proc.returncode == 0 and "2 new image(s)" in proc.stdout, proc.stdout + proc.stderr
    assert cli("verify", str(out)).returncode == 0


def test_a_damaged_manifest_part_is_quarantined_and_its_jobs_redone(tmp_path):
    recipe = sim(tmp_path, n=8)
    out = tmp_path / "out"
    make(out, recipe, limit=4)  # manifest.parquet: 4 jobs
    full = (out / "manifest.parquet").read_bytes()
    (out / ".parts").mkdir(exist_ok=True)
    (out / ".parts" / "0-000000000004.parquet").write_bytes(full[: len(full) // 2])  # torn by a disk fault
    status = cli("status", str(out))
    assert status.returncode == 0 and "damaged" in status.stderr, status.stderr
    proc = cli("generate", str(recipe), "--out", str(out), "--no-progress", "--retry-failed")
    assert proc.returncode == 0, proc.stderr
    assert "0-000000000004.parquet was damaged" in proc.stderr and ".quarantine/" in proc.stderr
    assert rows(out) == 8 and list((out / ".quarantine").iterdir())
    assert cli("verify", str(out)).returncode == 0


def test_a_truncated_manifest_is_quarantined_and_the_folder_remade(tmp_path):
    recipe = sim(tmp_path, n=4)
    out = tmp_path / "out"
    make(out, recipe)
    data = (out / "manifest.parquet").read_bytes()
    (out / "manifest.parquet").write_bytes(data[: len(data) - 40])
    assert cli("verify", str(out)).returncode == 1
    summary = generate(out, recipe=recipe, options=RunOptions(progress=False))
    assert summary.generated == 4 and any("manifest.parquet was damaged" in w for w in summary.warnings)
    assert cli("verify", str(out)).returncode == 0


def test_a_manifest_without_file_sizes_still_resumes(tmp_path):
    """Manifests written before sizes were recorded: files are checked by existence."""
    recipe = sim(tmp_path, n=4)
    out = tmp_path / "out"
    make(out, recipe, limit=2)
    table = pq.read_table(out / "manifest.parquet")
    pq.write_table(table.drop(["bytes_png", "bytes_dicom", "bytes_masks"]), out / "manifest.parquet")
    summary = generate(out, recipe=recipe, options=RunOptions(progress=False))
    assert summary.skipped == 2 and summary.generated == 2
    assert cli("verify", str(out)).returncode == 0


# ---- 9. merge, --out, status ------------------------------------------------------------------


def test_a_refused_merge_leaves_nothing_in_its_out(tmp_path):
    recipe = sim(tmp_path, n=8)
    a, b = tmp_path / "a", tmp_path / "b"
    make(a, recipe, shard=(0, 2))
    make(b, recipe, shard=(1, 2))
    victim = out_file = b / pq.read_table(b / "manifest.parquet").column("image_png")[-1].as_py()
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF
    out_file.write_bytes(bytes(data))
    merged = tmp_path / "merged"
    proc = cli("merge", str(a), str(b), "--out", str(merged))
    assert proc.returncode == 2 and "does not match the manifest" in one_line(proc)
    assert not merged.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    proc = cli("merge", str(a), str(b), "--out", str(existing))
    assert proc.returncode == 2
    assert [p.name for p in existing.rglob("*")] == ["notes.txt"]


def test_out_naming_a_file_is_one_clear_line(tmp_path):
    recipe = sim(tmp_path, n=2)
    make(tmp_path / "a", recipe)
    target = tmp_path / "results.txt"
    target.write_text("a file")
    for args in (["generate", str(recipe), "--out", str(target)], ["merge", str(tmp_path / "a"), "--out", str(target)],
                 ["generate", str(recipe), "--out", str(target / "sub")]):
        proc = cli(*args)
        line = one_line(proc)
        assert proc.returncode == 2 and "not a folder" in line and "re-run to resume" not in line, line
    assert target.read_text() == "a file"


def test_status_of_a_run_still_preparing_names_it(tmp_path):
    """The run holds the folder's lock and is planning: no heartbeat, no manifest yet."""
    from chexforge.runtime.lock import OutputLock

    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(open_store(out), command="chexforge generate r.yaml --out out"):
        proc = cli("status", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "starting" in proc.stdout and f"pid {os.getpid()}" in proc.stdout and "chexforge generate r.yaml" in proc.stdout


def test_status_before_the_first_batch_says_starting(tmp_path):
    from chexforge.runtime.progress import Tracker

    out = tmp_path / "out"
    out.mkdir()
    store = open_store(out)
    # the heartbeat is written (by this process, alive), no batch is done
    tracker = Tracker(store, planned=8, skipped=0, todo=8, devices=["inprocess"], engine="local", show=False)
    proc = cli("status", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "starting" in proc.stdout and "0.00 images/s" not in proc.stdout, proc.stdout
    # a batch is committed (the heartbeat may lag behind it): running
    mf.write_part(store, [{"job_id": f"{i:016x}", "cohort": "a", "index": i, "seed": i, "status": "ok"}
                          for i in range(4)], "run-000000000000")
    proc = cli("status", str(out))
    assert "running" in proc.stdout and "starting" not in proc.stdout and "4 of 8" in proc.stdout, proc.stdout
    tracker.close("interrupted")
