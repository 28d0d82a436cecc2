"""The jobs of a run as a stream of tables, so no stage holds a million jobs at once.

A source is a recipe (the plan stage's stream, `chexforge.plan.iter_plan`: every draw depends
only on the job's index, so the chunks are exactly the full plan), a jobs.parquet file (read row
group by row group), or a table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..contracts.jobs import decode_job_ids, job_batches, shard_mask
from ..plan import iter_plan
from ..recipe.schema import Recipe

CHUNK = 4096  # jobs planned at a time: bounds memory, large enough to stay vectorised

Shard = tuple[int, int]  # (i, n): the jobs whose id hashes to shard i of n


class JobSource:
    def __init__(self, chunks: Callable[[], Iterator[pa.Table | pa.RecordBatch]], total: int):
        self._chunks = chunks
        self.total = total

    @classmethod
    def from_table(cls, table: pa.Table) -> JobSource:
        return cls(lambda: iter(table.to_batches(max_chunksize=CHUNK)) if table.num_rows else iter(()), table.num_rows)

    @classmethod
    def from_recipe(cls, recipe: Recipe, chunk: int = CHUNK) -> JobSource:
        return cls(lambda: iter_plan(recipe, chunk), recipe.total)

    @classmethod
    def from_parquet(cls, path: str | Path) -> JobSource:
        total = pq.ParquetFile(path).metadata.num_rows
        # job_batches: a table planned before the patient columns reads with them null
        return cls(lambda: job_batches(pq.ParquetFile(path), CHUNK), total)

    def chunks(self, shard: Shard | None = None) -> Iterator[pa.Table]:
        for chunk in self._chunks():
            table = select_shard(pa.Table.from_batches([chunk]) if isinstance(chunk, pa.RecordBatch) else chunk, shard)
            if table.num_rows:
                yield table

    def ids(self, shard: Shard | None = None) -> np.ndarray:
        parts = [decode_job_ids(t.column("job_id")) for t in self.chunks(shard)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def select_shard(jobs: pa.Table, shard: Shard | None) -> pa.Table:
    """The rows of `jobs` in shard i of n (all of them without a shard)."""
    if shard is None:
        return jobs
    return jobs.filter(pa.array(shard_mask(jobs.column("job_id"), *shard)))


def in_sorted(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Which of `ids` (uint64) are in `sorted_ids` (sorted uint64), as a boolean mask."""
    if not len(sorted_ids):
        return np.zeros(len(ids), dtype=bool)
    pos = np.searchsorted(sorted_ids, ids).clip(0, len(sorted_ids) - 1)
    return sorted_ids[pos] == ids


def todo_batches(source: JobSource, shard: Shard | None, done: np.ndarray, limit: int | None,
                 size: int) -> Iterator[tuple[int, list[dict]]]:
    """(batch offset, job rows) for every job not done yet, in plan order, at most `limit`."""
    offset, left = 0, limit
    done_sorted = np.sort(done)
    for chunk in source.chunks(shard):
        if len(done_sorted):
            chunk = chunk.filter(pa.array(~in_sorted(decode_job_ids(chunk.column("job_id")), done_sorted)))
        if left is not None:
            chunk = chunk.slice(0, max(0, left))
            left -= chunk.num_rows
        for start in range(0, chunk.num_rows, size):
            rows = chunk.slice(start, size).to_pylist()
            yield offset, rows
            offset += len(rows)
        if left is not None and left <= 0:
            return
