"""Run a job table through a backend into an output folder; resumable and crash-safe.

The manifest is the only record of what is done (DESIGN.md): a re-run reads it, skips every
job whose files are in place, and carries on. Generation of batch i+1 overlaps the export of
batch i on a thread pool (PNG and zlib release the GIL). Ctrl-C finishes the batch in flight,
commits it and stops; a kill -9 loses at most the uncommitted batches.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import atomic
from ..backends.base import Sample
from ..backends.registry import load_backend
from ..errors import UserError
from ..export import manifest as mf
from ..export.card import write_card
from ..export.coco import write_coco
from ..export.writer import export_sample
from ..recipe.loader import recipe_to_yaml
from ..recipe.schema import Recipe

OUTPUTS = ("images", "dicom", "masks", mf.PARTS, mf.MANIFEST, "coco.json", "README.md", "recipe.yaml", "contact_sheet.png")


@dataclass
class RunOptions:
    limit: int | None = None
    overwrite: bool = False
    batch_size: int | None = None
    retry_failed: bool = False
    progress: bool = True
    export_threads: int = 2


@dataclass
class RunSummary:
    planned: int
    skipped: int
    generated: int = 0
    failed: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def prepare_output(out: Path, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in OUTPUTS:  # only what chexforge writes: never a user's other files
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    atomic.sweep_temporaries(out)


def done_ids(out: Path, jobs: pa.Table, retry_failed: bool) -> set[str]:
    """Job ids the manifest holds with all their files present; checks the plan matches."""
    table = mf.read_manifest(out)
    if table.num_rows == 0:
        return set()
    planned = set(jobs.column("job_id").to_pylist())
    ids = table.column("job_id").to_pylist()
    foreign = [i for i in ids if i not in planned]
    if foreign:
        raise UserError(f"this folder holds {len(foreign)} images of a different plan (was the recipe changed?); "
                        "use another --out, or --overwrite to replace them", out)
    done = set()
    for row in table.select(["job_id", "status", "image_png", "image_dicom"]).to_pylist():
        if row["status"] != "ok":
            if not retry_failed:
                done.add(row["job_id"])
            continue
        files = [row[k] for k in ("image_png", "image_dicom") if row[k]]
        if all(os.path.exists(out / f) for f in files):
            done.add(row["job_id"])
    return done


def run(jobs: pa.Table, recipe: Recipe, out: Path, options: RunOptions | None = None,
        on_progress: Callable[[int, int], None] | None = None) -> RunSummary:
    options = options or RunOptions()
    out = Path(out)
    try:
        prepare_output(out, options.overwrite)
        atomic.write_text(out / "recipe.yaml", recipe_to_yaml(recipe))
    except OSError as e:
        raise atomic.disk_error(e, out) from None
    done = done_ids(out, jobs, options.retry_failed)
    todo = jobs.filter(pc.invert(pc.is_in(jobs.column("job_id"), pa.array(sorted(done), pa.string())))) if done else jobs
    if options.limit is not None:
        todo = todo.slice(0, max(0, options.limit))
    summary = RunSummary(planned=jobs.num_rows, skipped=len(done))
    order = jobs.column("job_id").to_pylist()
    recipe_json = recipe.model_dump(mode="json", exclude_none=True)
    if todo.num_rows == 0:
        _finish(out, order, recipe_json, recipe)
        return summary

    backend = load_backend(recipe.backend, recipe.backend_options, size=recipe.output.size,
                           model=recipe.resolve_path(recipe.model) if recipe.model else None)
    identity = backend.identity()
    batch = options.batch_size or getattr(backend.options, "batch_size", 4)
    t_start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=options.export_threads)
    pending: list[tuple[Future, int]] = []
    run_id = f"{int(time.time() * 1000):x}-{os.getpid()}"
    progress = _Progress(todo.num_rows, summary.skipped, jobs.num_rows, options.progress)
    try:
        for start in range(0, todo.num_rows, batch):
            rows = todo.slice(start, batch).to_pylist()
            t0 = time.perf_counter()
            samples = _generate(backend, rows)
            per_image = (time.perf_counter() - t0) / len(rows)
            fut = pool.submit(_export_batch, out, rows, samples, recipe, identity, per_image, f"{run_id}-{start:09d}")
            pending.append((fut, len(rows)))
            pending = _collect(pending, summary, progress, on_progress, wait_all=False)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        try:
            _collect(pending, summary, progress, on_progress, wait_all=True)
        finally:
            pool.shutdown(wait=True)
            progress.close()
    summary.seconds = time.perf_counter() - t_start
    if not summary.interrupted:
        _finish(out, order, recipe_json, recipe)
    return summary


def _generate(backend: Any, rows: list[dict]) -> list[Sample]:
    """One batch; if the backend raises, retry job by job so one bad job fails alone."""
    try:
        return backend.generate(rows)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception:  # noqa: BLE001 - isolate the failing job below
        samples = []
        for row in rows:
            try:
                samples += backend.generate([row])
            except Exception as e:  # noqa: BLE001 - recorded in the manifest, never dropped
                samples.append(Sample(row["job_id"], np.zeros((0, 0), np.float32), error=f"{type(e).__name__}: {e}"))
        return samples


def _export_batch(out: Path, rows: list[dict], samples: list, recipe: Recipe, identity: dict,
                  per_image: float, part: str) -> tuple[int, int, list[str]]:
    fmt, masks = recipe.output.formats, recipe.output.masks
    records = [export_sample(out, row, s, fmt, masks, identity, per_image) for row, s in zip(rows, samples)]
    mf.write_part(out, records, part)
    failed = [f"{r['job_id']}: {r['error']}" for r in records if r["status"] != "ok"]
    return len(records) - len(failed), len(failed), failed


def _collect(pending, summary: RunSummary, progress, on_progress, wait_all: bool):
    keep = []
    for i, (fut, n) in enumerate(pending):
        # Keep at most one batch exporting while the next generates (bounded memory).
        if wait_all or fut.done() or i < len(pending) - 1:
            ok, failed, errors = fut.result()
            summary.generated += ok
            summary.failed += failed
            summary.errors += errors
            progress.advance(n)
            if on_progress:
                on_progress(summary.generated + summary.failed, summary.planned - summary.skipped)
        else:
            keep.append((fut, n))
    return keep


def _finish(out: Path, order: list[str], recipe_json: dict, recipe: Recipe) -> None:
    table = mf.merge_parts(out, order, recipe_json)
    if recipe.output.coco:
        write_coco(out, table, recipe.description or recipe.name)
    write_card(out, table, recipe_json)


class _Progress:
    """A rich progress bar with images/s and ETA (quiet when disabled)."""

    def __init__(self, total: int, skipped: int, planned: int, enabled: bool):
        self.bar = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), transient=False)
        self.bar.start()
        self.task = self.bar.add_task("generate", total=total, rate="")
        self.t0 = time.perf_counter()
        self.count = 0

    def advance(self, n: int) -> None:
        if self.bar is None:
            return
        self.count += n
        rate = self.count / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, advance=n, rate=f"{rate:.2f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
