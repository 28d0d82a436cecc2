"""The jobs of a run as a stream of tables, so no stage holds a million jobs at once.

A source is a recipe (planned chunk by chunk: every draw depends only on the job's index, so the
chunks are exactly the full plan), a jobs.parquet file (read row group by row group), or a table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..contracts.jobs import JOB_COLUMNS, decode_job_ids, shard_mask
from ..recipe.schema import Recipe

CHUNK = 4096  # jobs planned at a time: bounds memory, large enough to stay vectorised


class JobSource:
    def __init__(self, chunks: Callable[[], Iterator[pa.Table]], total: int):
        self._chunks = chunks
        self.total = total

    @classmethod
    def from_table(cls, table: pa.Table) -> JobSource:
        return cls(lambda: iter(table.to_batches(max_chunksize=CHUNK)) if table.num_rows else iter(()), table.num_rows)

    @classmethod
    def from_recipe(cls, recipe: Recipe, chunk: int = CHUNK) -> JobSource:
        from ..plan.planner import iter_plan

        return cls(lambda: iter_plan(recipe, chunk), recipe.total)

    @classmethod
    def from_parquet(cls, path: str | Path) -> JobSource:
        total = pq.ParquetFile(path).metadata.num_rows
        return cls(lambda: pq.ParquetFile(path).iter_batches(batch_size=CHUNK, columns=list(JOB_COLUMNS)), total)

    def chunks(self, shard: tuple[int, int] | None = None) -> Iterator[pa.Table]:
        for chunk in self._chunks():
            table = pa.Table.from_batches([chunk]) if isinstance(chunk, pa.RecordBatch) else chunk
            if shard is not None:
                table = table.filter(pa.array(shard_mask(table.column("job_id"), *shard)))
            if table.num_rows:
                yield table

    def ids(self, shard: tuple[int, int] | None = None) -> np.ndarray:
        parts = [decode_job_ids(t.column("job_id")) for t in self.chunks(shard)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def todo_batches(source: JobSource, shard: tuple[int, int] | None, done: np.ndarray, limit: int | None,
                 size: int) -> Iterator[tuple[int, list[dict]]]:
    """(batch offset, job rows) for every job not done yet, in plan order, at most `limit`."""
    offset, left = 0, limit
    done_sorted = np.sort(done)
    for chunk in source.chunks(shard):
        if len(done_sorted):
            ids = decode_job_ids(chunk.column("job_id"))
            pos = np.searchsorted(done_sorted, ids).clip(0, len(done_sorted) - 1)
            chunk = chunk.filter(pa.array(done_sorted[pos] != ids))
        if left is not None:
            chunk = chunk.slice(0, max(0, left))
            left -= chunk.num_rows
        for start in range(0, chunk.num_rows, size):
            rows = chunk.slice(start, size).to_pylist()
            yield offset, rows
            offset += len(rows)
        if left is not None and left <= 0:
            return
