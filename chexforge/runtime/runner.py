"""Run a job table into an output folder: resumable, crash-safe, sharded, local or on Ray.

The manifest is the only record of what is done (DESIGN.md): a re-run reads it, skips every
job whose files are in place (present, at the size the manifest records), and carries on; a
manifest file that no longer reads whole is moved aside to .quarantine/ with a warning and its
jobs are made again. One run writes a folder at a time (runtime/lock.py). `--shard i/n` keeps the jobs whose id hashes to
shard i, so n independent runs (a Slurm array) partition the plan; `chexforge merge` joins
their folders. The engines (runtime/pool.py, runtime/ray_engine.py) make and commit batches;
this module prepares the folder, chooses the jobs and writes the final manifest, COCO file and
dataset card.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..contracts import manifest as mc
from ..contracts.backends import backend_info
from ..contracts.jobs import decode_job_ids, read_jobs
from ..errors import UserError
from ..export import manifest as mf
from ..export.card import write_card
from ..export.coco import write_coco
from ..export.hf import write_metadata as write_hf_metadata
from ..export.monai import write_datalist
from ..plan import PlanReport, iter_plan, summarise
from ..plan.subsample import only, sample_of
from ..recipe.loader import load_recipe, recipe_dict, recipe_from_json, recipe_to_yaml
from ..recipe.schema import Recipe
from ..store import Store, open_store
from .batch import RunSpec
from .jobs import JobSource, Shard, in_sorted, todo_batches
from .lock import OutputLock
from .pool import parse_devices, run_inprocess, run_workers
from .progress import CtrlC, Tracker

OUTPUTS = ("images", "dicom", "masks", mc.PARTS, mc.MANIFEST, "coco.json", "datalist.json", "README.md", "metadata.parquet",
           "recipe.yaml", "contact_sheet.png", ".run.json", mf.QUARANTINE)


@dataclass
class RunOptions:
    limit: int | None = None  # at most this many new images this run, the first not done in plan order
    sample: int | None = None  # make only a stratified, seeded sample of this many jobs (plan/subsample.py)
    overwrite: bool = False
    batch_size: int | None = None
    retry_failed: bool = False
    progress: bool = True
    export_threads: int = 2
    devices: str = "auto"
    engine: str = "local"  # local | ray
    ray_address: str | None = None
    ray_actors: int | None = None
    gpus_per_actor: float = 0.0
    shard: Shard | None = None
    max_attempts: int = 2
    break_lock: bool = False  # take over a lock this host cannot judge (a run of another host)
    on_warning: Callable[[str], None] | None = None  # told each warning as it happens (also in RunSummary)


@dataclass
class RunSummary:
    planned: int
    skipped: int
    generated: int = 0
    failed: int = 0
    seconds: float = 0.0
    device_seconds: float = 0.0
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def parse_shard(text: str | None) -> Shard | None:
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard takes i/n with 0 <= i < n (e.g. 3/16), not {text!r}") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: expected 0 <= i < n")
    return i, n


def make_folder(store: Store) -> None:
    """Create the output folder (one line when --out names a file)."""
    if hasattr(store, "mkdir"):
        store.mkdir()


def prepare_output(store: Store, overwrite: bool, warn: Callable[[str], None] = lambda _: None) -> None:
    """With the folder's lock held: clear it for --overwrite, sweep what a killed run left, and
    move damaged manifest files aside."""
    if overwrite:
        for name in OUTPUTS:  # only what chexforge writes: never a user's other files
            store.remove_tree(name)
    store.sweep()
    for rel, why in mf.damaged(store):
        dest = mf.quarantine(store, rel)
        warn(f"{rel} was damaged ({why}); moved it to {dest}: the jobs it recorded are made again")


def done_ids(store: Store, planned: np.ndarray, retry_failed: bool) -> np.ndarray:
    """Ids (uint64) the manifest holds with all their files in place (present, and at the recorded
    size where the manifest records sizes); checks the plan matches."""
    table = mf.read_manifest(store, mc.CHECK_COLUMNS)
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.uint64)
    ids = decode_job_ids(table.column("job_id"))
    foreign = int((~in_sorted(ids, np.sort(planned))).sum())
    if foreign:
        raise UserError(f"this folder holds {foreign} images of a different plan (was the recipe or the shard "
                        "changed?); use another --out, or --overwrite to replace them", store.root)
    keep = np.zeros(len(ids), dtype=bool)
    i = 0
    for batch in table.to_batches(max_chunksize=8192):
        for row in batch.to_pylist():
            keep[i] = (all(_in_place(store, rel, size) for rel, size in _files(row)) if row["status"] == "ok"
                       else not retry_failed)
            i += 1
    return ids[keep]


def _files(row: dict) -> list[tuple[str, int | None]]:
    """(path, recorded size or None) of each file of a manifest row."""
    out = [(row[k], row[b]) for k, b in (("image_png", "bytes_png"), ("image_dicom", "bytes_dicom"),
                                         ("seg_dicom", "bytes_seg")) if row.get(k)]
    masks, sizes = row.get("masks") or [], row.get("bytes_masks")
    if sizes is None or len(sizes) != len(masks):
        sizes = [None] * len(masks)
    return out + [(m["path"], n) for m, n in zip(masks, sizes)]


def _in_place(store: Store, rel: str, size: int | None) -> bool:
    actual = store.size(rel)
    return actual is not None and (size is None or actual == size)


def batch_size_of(recipe: Recipe, override: int | None) -> int:
    return int(override or getattr(backend_info(recipe.backend).options(recipe.backend_options), "batch_size", 4))


def open_jobs(recipe: str | Path | None = None, jobs: str | Path | None = None) -> tuple[Recipe, JobSource]:
    """The recipe and the job stream of a run: a recipe file (planned chunk by chunk as the run
    goes), or a job table written by `chexforge plan` (its recipe travels inside it)."""
    if (recipe is None) == (jobs is None):
        raise UserError("give a recipe file or --jobs JOBS.parquet (one of the two)", "generate")
    if jobs is not None:
        return recipe_from_json(read_jobs(jobs, header_only=True), str(jobs)), JobSource.from_parquet(jobs)
    r = load_recipe(recipe)
    return r, JobSource.from_recipe(r)


def generate(out: str | Path, recipe: str | Path | None = None, jobs: str | Path | None = None,
             options: RunOptions | None = None) -> RunSummary:
    """`chexforge generate`: make the dataset of a recipe file (or of a job table) into `out`,
    resuming what an earlier run there left."""
    r, source = open_jobs(recipe, jobs)
    return run(source, r, out, options)


def dry_run(recipe: str | Path | None = None, jobs: str | Path | None = None, show: int = 0,
            sample: int | None = None) -> PlanReport:
    """`chexforge generate --dry-run`: what the run would make, summarised from the job stream
    chunk by chunk (memory bounded by a chunk, whatever the number of jobs); writes nothing.
    With `sample`: what `--sample` would make."""
    r, source = open_jobs(recipe, jobs)
    chunks = source.chunks() if jobs is not None else iter_plan(r)  # the planner's own, larger chunks
    if sample is not None:
        chunks = only(chunks, sample_of(source.chunks(), sample, r.seed))
    return summarise(chunks, r.backend, show)


def run(jobs: pa.Table | JobSource, recipe: Recipe, out: str | Path, options: RunOptions | None = None) -> RunSummary:
    """Make every job of `jobs` (a table, or a stream from the recipe or a jobs file) into `out`,
    holding the folder's lock (a second writer is refused with one line naming this run)."""
    options = options or RunOptions()
    if options.engine not in ("local", "ray"):
        raise UserError(f"--engine takes local or ray, not {options.engine!r}")
    source = jobs if isinstance(jobs, JobSource) else JobSource.from_table(jobs)
    store = open_store(out)
    make_folder(store)
    with OutputLock(store, break_lock=options.break_lock), CtrlC():  # Ctrl-C: progress.py
        return _run_locked(source, recipe, store, options)


def _run_locked(source: JobSource, recipe: Recipe, store: Store, options: RunOptions) -> RunSummary:
    warnings: list[str] = []

    def warn(text: str) -> None:
        warnings.append(text)
        if options.on_warning is not None:
            options.on_warning(text)

    prepare_output(store, options.overwrite, warn)
    store.write_text("recipe.yaml", recipe_to_yaml(recipe))
    planned = source.ids(options.shard)
    done = done_ids(store, planned, options.retry_failed)  # against the whole plan: a sample of it is no other plan
    if options.sample is not None:
        # The sample is drawn over the whole plan (not the shard), so `--shard i/n --sample N` runs
        # partition one sample of N; the same N gives the same jobs, so a re-run resumes it.
        chosen = sample_of(source.chunks(), options.sample, recipe.seed)
        whole = source
        source = JobSource(lambda: only(whole.chunks(), chosen), len(chosen))
        planned, done = planned[in_sorted(planned, chosen)], done[in_sorted(done, chosen)]
    todo = len(planned) - len(done)
    if options.limit is not None:
        todo = min(todo, max(0, options.limit))
    summary = RunSummary(planned=len(planned), skipped=len(done), warnings=warnings)
    recipe_json = recipe_dict(recipe)
    if todo == 0:
        _finish(store, recipe_json)
        return summary

    batches = todo_batches(source, options.shard, done, options.limit, batch_size_of(recipe, options.batch_size))
    devices = ["ray"] if options.engine == "ray" else parse_devices(options.devices)
    tracker = Tracker(store, len(planned), len(done), todo, devices, options.engine, options.progress)
    spec = RunSpec(recipe, store.root, f"{int(time.time() * 1000):x}-{os.getpid()}", options.export_threads)
    t0 = time.perf_counter()
    state = "crashed"
    try:
        if options.engine == "ray":
            from .ray_engine import run_ray

            summary.interrupted = run_ray(batches, spec, tracker, options.ray_address, options.ray_actors,
                                          options.gpus_per_actor)
        elif devices == ["inprocess"]:
            summary.interrupted = run_inprocess(batches, spec, tracker)
        else:
            summary.interrupted = run_workers(batches, spec, store, devices, tracker, options.max_attempts)
        state = "interrupted" if summary.interrupted else "finishing"
    finally:
        summary.seconds = time.perf_counter() - t0
        summary.generated, summary.failed = tracker.done, tracker.failed
        summary.errors, summary.device_seconds = tracker.errors, tracker.device_seconds
        tracker.close(state)
    if not summary.interrupted:
        _finish(store, recipe_json)
        tracker.beat("finished", force=True)
    return summary


def _finish(store: Store, recipe_json: dict) -> None:
    """Stream the parts into manifest.parquet, then the COCO file and the card from it."""
    mf.merge_parts(store, recipe_json)
    write_dataset_files(store, recipe_json)


def write_dataset_files(store: Store, recipe_json: dict, manifest: pa.Table | None = None) -> None:
    """The COCO file (unless the recipe turns it off), the MONAI datalist and the dataset card,
    from `manifest` or else streamed from the folder's manifest.parquet."""
    rows = (lambda: manifest) if manifest is not None else (lambda: mf.iter_manifest(store))
    cohorts = [c["name"] for c in recipe_json.get("cohorts") or []]  # COCO image ids: (cohort position, index)
    if recipe_json.get("output", {}).get("coco", True):
        write_coco(store, rows(), recipe_json.get("description") or recipe_json.get("name", ""), cohorts)
    write_datalist(store, rows(), recipe_json.get("name", ""), recipe_json.get("description", ""))
    # The card declares what metadata.parquet holds (the Hugging Face dataset: export/hf.py), so
    # both are written together, the metadata first.
    write_card(store, rows(), recipe_json, write_hf_metadata(store, rows()))
