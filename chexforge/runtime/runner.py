"""Run a job table into an output folder: resumable, crash-safe, sharded, local or on Ray.

The manifest is the only record of what is done (DESIGN.md): a re-run reads it, skips every
job whose files are in place, and carries on. `--shard i/n` keeps the jobs whose id hashes to
shard i, so n independent runs (a Slurm array) partition the plan; `chexforge merge` joins
their folders. The engines (runtime/pool.py, runtime/ray_engine.py) make and commit batches;
this module prepares the folder, chooses the jobs and writes the final manifest, COCO file and
dataset card.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UserError
from ..export import manifest as mf
from ..export.card import write_card
from ..export.coco import write_coco
from ..recipe.loader import recipe_to_yaml
from ..recipe.schema import Recipe
from ..store import Store, open_store
from .pool import parse_devices, run_inprocess, run_workers
from .progress import Tracker

OUTPUTS = ("images", "dicom", "masks", mf.PARTS, mf.MANIFEST, "coco.json", "README.md", "recipe.yaml",
           "contact_sheet.png", ".run.json")


@dataclass
class RunOptions:
    limit: int | None = None
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
    shard: tuple[int, int] | None = None
    max_attempts: int = 2


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

    @property
    def rate(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard takes i/n with 0 <= i < n (e.g. 3/16), not {text!r}") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: expected 0 <= i < n")
    return i, n


def shard_of(job_ids: pa.Array, n: int) -> np.ndarray:
    """Shard number of each job: its id's first 8 hex digits modulo n (ids are uniform hashes)."""
    heads = pc.utf8_slice_codeunits(job_ids, 0, 8).to_numpy(zero_copy_only=False)
    return np.fromiter((int(h, 16) % n for h in heads), dtype=np.int64, count=len(heads))


def select_shard(jobs: pa.Table, shard: tuple[int, int] | None) -> pa.Table:
    if shard is None:
        return jobs
    i, n = shard
    return jobs.filter(pa.array(shard_of(jobs.column("job_id"), n) == i))


def prepare_output(store: Store, overwrite: bool) -> None:
    if hasattr(store, "mkdir"):
        store.mkdir()
    if overwrite:
        for name in OUTPUTS:  # only what chexforge writes: never a user's other files
            store.remove_tree(name)
    store.sweep()


def done_ids(store: Store, jobs: pa.Table, retry_failed: bool) -> set[str]:
    """Job ids the manifest holds with all their files present; checks the plan matches."""
    table = mf.read_manifest(store, mf.STATUS_COLUMNS)
    if table.num_rows == 0:
        return set()
    planned = set(jobs.column("job_id").to_pylist())
    foreign = [i for i in table.column("job_id").to_pylist() if i not in planned]
    if foreign:
        raise UserError(f"this folder holds {len(foreign)} images of a different plan (was the recipe or the shard "
                        "changed?); use another --out, or --overwrite to replace them", store.root)
    done = set()
    local = store.local_path()
    for row in table.to_pylist():
        if row["status"] != "ok":
            if not retry_failed:
                done.add(row["job_id"])
            continue
        files = [row[k] for k in ("image_png", "image_dicom") if row[k]]
        present = all(os.path.exists(local / f) for f in files) if local else all(store.exists(f) for f in files)
        if present:
            done.add(row["job_id"])
    return done


def run(jobs: pa.Table, recipe: Recipe, out: str | Path, options: RunOptions | None = None) -> RunSummary:
    options = options or RunOptions()
    store = open_store(out)
    prepare_output(store, options.overwrite)
    store.write_text("recipe.yaml", recipe_to_yaml(recipe))
    jobs = select_shard(jobs, options.shard)
    done = done_ids(store, jobs, options.retry_failed)
    todo = jobs.filter(pc.invert(pc.is_in(jobs.column("job_id"), pa.array(sorted(done), pa.string())))) if done else jobs
    if options.limit is not None:
        todo = todo.slice(0, max(0, options.limit))
    summary = RunSummary(planned=jobs.num_rows, skipped=len(done))
    recipe_json = recipe.model_dump(mode="json", exclude_none=True)
    if todo.num_rows == 0:
        _finish(store, jobs, recipe_json, recipe)
        return summary

    devices = ["ray"] if options.engine == "ray" else parse_devices(options.devices)
    tracker = Tracker(store, jobs.num_rows, len(done), todo.num_rows, devices, options.engine, options.progress)
    run_id = f"{int(time.time() * 1000):x}-{os.getpid()}"
    t0 = time.perf_counter()
    state = "crashed"
    try:
        if options.engine == "ray":
            from .ray_engine import run_ray

            summary.interrupted = run_ray(todo, recipe, store, options.batch_size, tracker, run_id,
                                          options.export_threads, options.ray_address, options.ray_actors,
                                          options.gpus_per_actor)
        elif devices == ["inprocess"]:
            summary.interrupted = run_inprocess(todo, recipe, store, options.batch_size, tracker, run_id,
                                                options.export_threads)
        else:
            summary.interrupted = run_workers(todo, recipe, store, devices, options.batch_size, tracker, run_id,
                                              options.export_threads, options.max_attempts)
        state = "interrupted" if summary.interrupted else "finishing"
    finally:
        summary.seconds = time.perf_counter() - t0
        summary.generated, summary.failed = tracker.done, tracker.failed
        summary.errors, summary.device_seconds = tracker.errors, tracker.device_seconds
        tracker.close(state)
    if not summary.interrupted:
        _finish(store, jobs, recipe_json, recipe)
        tracker.beat("finished", force=True)
    return summary


def _finish(store: Store, jobs: pa.Table, recipe_json: dict, recipe: Recipe) -> None:
    table = mf.merge_parts(store, jobs.column("job_id").combine_chunks(), recipe_json)
    if recipe.output.coco:
        write_coco(store, table, recipe.description or recipe.name)
    write_card(store, table, recipe_json)
