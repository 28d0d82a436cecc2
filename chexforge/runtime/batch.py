"""One worker's engine: a loaded backend, an export thread pool and the output store.

The same object runs in the main process (one CPU device), in a worker process per device, and
inside a Ray actor; each is handed a `RunSpec` (the typed recipe, the output and the run id)
and builds its `BatchRunner` from it. `submit` generates a batch now and exports it on the
thread pool, so the device moves on to the next batch while PNG/DICOM encoding and writing
happen (zlib and file I/O release the GIL). A batch's manifest part is committed after all
its files are in place.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backends.registry import load_backend
from ..contracts.sample import Sample
from ..export import manifest as mf
from ..export.writer import export_sample
from ..qc import QCRunner, attempt_seed
from ..recipe.schema import Recipe
from ..store import open_store


@dataclass
class BatchResult:
    batch_id: int
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    seconds_device: float = 0.0
    seconds_export: float = 0.0
    job_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RunSpec:
    """What every engine hands each worker process or Ray actor: pickled whole. The Recipe is the
    typed object and pickles with the folder its relative paths start from (pydantic keeps
    private attributes through pickle and Ray's serializer, tested), so a worker resolves the
    recipe's files exactly as the main process does."""

    recipe: Recipe
    store_root: str
    run_id: str
    export_threads: int = 2

    def runner(self, device: str | None = None) -> BatchRunner:
        return BatchRunner(self.recipe, self.store_root, device, self.export_threads)

    def part(self, batch_id: int, tag: str = "") -> str:
        """The manifest part a batch commits: the run id and the batch's offset, then `tag`."""
        return f"{self.run_id}-{batch_id:012d}{tag}"


class BatchRunner:
    def __init__(self, recipe: Recipe, store_root: str, device: str | None = None, export_threads: int = 2):
        self.recipe = recipe
        self.store = open_store(store_root)
        options = dict(recipe.backend_options)
        if device is not None:
            options["device"] = device
        self.backend = load_backend(recipe.backend, options, model=recipe.resolve_path(recipe.model) if recipe.model else None)
        self.identity = self.backend.identity()
        # cohort → view → its place in the cohort's studies (1-based): the DICOM SeriesNumber
        self.series = {c.name: {v: k + 1 for k, v in enumerate(c.study.views)} for c in recipe.cohorts if c.study}
        self.qc = QCRunner(recipe, device or options.get("device"))
        self.pool = ThreadPoolExecutor(max_workers=max(1, export_threads))

    def generate(self, rows: list[dict[str, Any]]) -> tuple[list[Sample], float]:
        """One batch, with the recipe's QC rules applied (rejected jobs regenerated)."""
        t0 = time.perf_counter()
        samples = self._generate(rows)
        if self.qc:
            samples = self._quality(rows, samples)
        return samples, time.perf_counter() - t0

    def _quality(self, rows: list[dict[str, Any]], samples: list[Sample]) -> list[Sample]:
        """Check each image against its cohort's QC rules; regenerate the rejected jobs together, with
        the next derived seed, up to max_attempts generations. A job still rejected then is a
        failed Sample naming the rule and value. Every rejection goes to meta["qc"]."""
        final = list(samples)
        checked = [i for i, row in enumerate(rows) if str(row["cohort"]) in self.qc.by_cohort]
        tries = {i: 1 for i in checked}
        history: dict[int, list[dict]] = {i: [] for i in checked}
        todo = checked
        while todo:
            again = []
            for i in todo:
                s, row = final[i], rows[i]
                if s.error is not None:
                    continue  # the backend could not make it: recorded as that failure
                failure = self.qc.first_failure(row, s.image, s.masks)
                if failure is None:
                    continue
                rule, value, threshold = failure
                seed = attempt_seed(int(row["seed"]), tries[i])
                history[i].append({"attempt": tries[i], "seed": seed, "rule": rule, "value": value, "threshold": threshold})
                limit = self.qc.max_attempts(row)
                if tries[i] >= limit:
                    verdict = f"= {value:g} is below min" if value is not None else "measured nothing (min"
                    final[i] = Sample(s.job_id, np.zeros((0, 0), np.float32), meta=dict(s.meta),
                                      error=f"qc: {rule} {verdict} {threshold:g}{')' if value is None else ''} "
                                            f"on all {limit} attempt{'s' if limit > 1 else ''} (last seed {seed})")
                    continue
                tries[i] += 1
                again.append(i)
            if again:
                retry = [{**rows[i], "seed": attempt_seed(int(rows[i]["seed"]), tries[i])} for i in again]
                for i, s in zip(again, self._generate(retry)):
                    final[i] = s
            todo = again
        for i in checked:
            final[i].meta = {**final[i].meta, "qc": {"attempts": tries[i], "seed": attempt_seed(int(rows[i]["seed"]), tries[i]),
                                                     "rejections": history[i]}}
        return final

    def _generate(self, rows: list[dict[str, Any]]) -> list[Sample]:
        """One backend call; if the backend raises, retry job by job so one bad job fails alone."""
        try:
            samples = self.backend.generate(rows)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception:  # noqa: BLE001 - isolate the failing job below
            samples = []
            for row in rows:
                try:
                    samples += self.backend.generate([row])
                except Exception as e:  # noqa: BLE001 - recorded in the manifest, never dropped
                    samples.append(Sample(row["job_id"], np.zeros((0, 0), np.float32), error=f"{type(e).__name__}: {e}"))
        return samples

    def export(self, batch_id: int, rows: list[dict], samples: list[Sample], seconds: float, attempt: int,
               part: str) -> BatchResult:
        t0 = time.perf_counter()
        fmt, masks = self.recipe.output.formats, self.recipe.output.masks
        per_image = seconds / max(1, len(rows))
        # attempts: generations of the job, counting worker-crash retries and QC regenerations
        records = [export_sample(self.store, row, s, fmt, masks, self.identity, per_image,
                                 attempt - 1 + int((s.meta.get("qc") or {}).get("attempts", 1)),
                                 self.series.get(str(row["cohort"]), {}).get(str(row.get("view")), 1))
                   for row, s in zip(rows, samples)]
        mf.write_part(self.store, records, part)
        failed = [f"{r['job_id']}: {r['error']}" for r in records if r["status"] != "ok"]
        return BatchResult(batch_id, len(records) - len(failed), len(failed), failed, seconds,
                           time.perf_counter() - t0, [r["job_id"] for r in records])

    def submit(self, batch_id: int, rows: list[dict], attempt: int, part: str) -> Future:
        samples, seconds = self.generate(rows)
        return self.pool.submit(self.export, batch_id, rows, samples, seconds, attempt, part)

    def run(self, batch_id: int, rows: list[dict], attempt: int, part: str) -> BatchResult:
        return self.submit(batch_id, rows, attempt, part).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def failed_rows(rows: list[dict], error: str, attempts: int) -> list[dict]:
    """Manifest rows for jobs that could not be made at all (a worker kept crashing on them)."""
    return [{**row, "status": "failed", "error": error, "masks": [], "realised_boxes": [], "attempts": attempts}
            for row in rows]
