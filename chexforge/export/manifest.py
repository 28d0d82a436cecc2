"""The manifest (out/manifest.parquet): what is done, where it is, and how it was made.

Every job column, plus the files written (relative to out/) with their SHA-256, the boxes and
masks actually realised, the backend identity and timings. While a run goes, every batch
commits a part file under out/.parts/ (atomically, after the batch's files are in place); long
runs compact parts as they go, and `merge_parts` folds them into manifest.parquet at the end,
again atomically. A run resumes from the union of both, so a kill at any instant loses at most
the batches in flight.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from ..contracts.jobs import decode_job_ids, table_bytes, with_recipe
from ..contracts.manifest import (
    MANIFEST,
    OPTIONAL_COLUMNS,
    PARTS,
    manifest_schema,
)
from ..errors import UserError
from ..store import Store, as_store

QUARANTINE = ".quarantine"  # damaged manifest files are moved here, never deleted


class DamagedManifest(UserError):
    """A manifest file (manifest.parquet or a part) that cannot be read: truncated, overwritten."""

    def __init__(self, store: Store, rel: str, why: str):
        self.rel = rel
        super().__init__(f"the manifest is unreadable ({why}); it was not written by a complete chexforge run",
                         f"{store.root}/{rel}")


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=manifest_schema())


def write_part(store: Store, rows: list[dict], name: str) -> str:
    store = as_store(store)
    rel = f"{PARTS}/{name}.parquet"
    store.write_bytes(rel, table_bytes(rows_to_table(rows)))
    return rel


def part_names(store: Store) -> list[str]:
    store = as_store(store)
    return store.glob(f"{PARTS}/*.parquet")


def _read(store: Store, rel: str, columns: list[str] | None = None) -> pa.Table:
    want = columns or manifest_schema().names
    try:
        data = store.read_bytes(rel)
        present = pq.read_schema(io.BytesIO(data)).names
        t = pq.read_table(io.BytesIO(data), columns=[c for c in want if c in present])
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DamagedManifest(store, rel, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    missing = [c for c in want if c not in t.column_names and c not in OPTIONAL_COLUMNS]
    if missing:
        raise UserError(f"not a chexforge manifest: missing {', '.join(missing[:4])}", f"{store.root}/{rel}")
    schema = manifest_schema()
    for c in want:  # columns newer than the file: null
        if c not in t.column_names:
            t = t.append_column(schema.field(c), pa.nulls(t.num_rows, schema.field(c).type))
    return t.select(want).cast(pa.schema([schema.field(c) for c in want]))


def damaged(store: Store) -> list[tuple[str, str]]:
    """(file, why) for every manifest file (manifest.parquet, parts) that does not read whole.
    Each is read to the end, a row group at a time, every column decoded."""
    store = as_store(store)
    bad = []
    for rel in sources(store):
        try:
            local = store.local_path(rel)
            pf = pq.ParquetFile(str(local) if local is not None else io.BytesIO(store.read_bytes(rel)))
            missing = [c for c in manifest_schema().names if c not in pf.schema_arrow.names and c not in OPTIONAL_COLUMNS]
            if missing:
                bad.append((rel, f"not a chexforge manifest: missing {', '.join(missing[:4])}"))
                continue
            for _ in pf.iter_batches(batch_size=8192):
                pass
        except (pa.ArrowException, OSError, ValueError) as e:
            bad.append((rel, str(e).splitlines()[0] if str(e) else type(e).__name__))
    return bad


def quarantine(store: Store, rel: str) -> str:
    """Move a damaged manifest file aside, under .quarantine/ (a unique name); return where."""
    import time

    store = as_store(store)
    base = rel.replace("/", "_")
    dest = f"{QUARANTINE}/{time.strftime('%Y%m%d-%H%M%S')}-{base}"
    k = 1
    while store.exists(dest):
        k += 1
        dest = f"{QUARANTINE}/{time.strftime('%Y%m%d-%H%M%S')}-{k}-{base}"
    store.move(rel, dest)
    return dest


def sources(store: Store) -> list[str]:
    """manifest.parquet (if any) then the parts, oldest first: later rows win."""
    return ([MANIFEST] if store.exists(MANIFEST) else []) + part_names(store)


def read_manifest(store: Store, columns: list[str] | None = None,
                  on_damaged: Callable[[DamagedManifest], None] | None = None) -> pa.Table:
    """manifest.parquet plus every committed part; the last row for a job id wins. A file that
    does not read raises `DamagedManifest`, or with `on_damaged` is reported there and left out."""
    store = as_store(store)
    tables = []
    for rel in sources(store):
        try:
            tables.append(_read(store, rel, columns))
        except DamagedManifest as e:
            if on_damaged is None:
                raise
            on_damaged(e)
    if not tables:
        schema = manifest_schema()
        return (schema if columns is None else pa.schema([schema.field(c) for c in columns])).empty_table()
    return last_per_job(pa.concat_tables(tables))


def last_per_job(table: pa.Table) -> pa.Table:
    ids = table.column("job_id").to_pylist()
    last = {job_id: i for i, job_id in enumerate(ids)}
    if len(last) == len(ids):
        return table
    return table.take(pa.array(sorted(last.values()), pa.int64()))


COMPACTED = "-compacted"


def compact_parts(store: Store, keep_last: int = 0) -> int:
    """Fold the per-batch parts (all but the newest `keep_last`) into one, atomically, then delete
    them. The new part is named after the first one it folds, so part order (commit order) holds;
    earlier compacted parts are left alone, so each compaction reads a bounded amount."""
    store = as_store(store)
    parts = [p for p in part_names(store) if not p.endswith(COMPACTED + ".parquet")]
    fold = parts[: max(0, len(parts) - keep_last)]
    if len(fold) < 2:
        return 0
    _stream_merge(store, fold, fold[0].removesuffix(".parquet") + COMPACTED + ".parquet", manifest_schema())
    for rel in fold:
        store.remove(rel)
    return len(fold)


def merge_parts(store: Store, recipe_json: dict | None = None) -> int:
    """Stream manifest.parquet and the parts into a new manifest.parquet (atomically), keeping
    the last row of each job, then delete the parts. Rows keep the order their batches were
    committed in (plan order for a single run). Returns the number of rows."""
    store = as_store(store)
    srcs = sources(store)
    schema = manifest_schema()
    if recipe_json is not None:
        schema = schema.with_metadata(with_recipe(schema.empty_table(), recipe_json).schema.metadata)
    rows = _stream_merge(store, srcs, MANIFEST, schema)
    store.sync()
    for rel in srcs:
        if rel != MANIFEST:
            store.remove(rel)
    return rows


def _stream_merge(store: Store, srcs: list[str], target: str, schema: pa.Schema) -> int:
    """Write the rows of `srcs` (the last one of each job id) to `target`, one source in memory
    at a time."""

    keep = _last_occurrence([decode_job_ids(_read(store, rel, ["job_id"]).column("job_id")) for rel in srcs])
    rows = 0
    plain = manifest_schema()
    with store.open_write(target) as f:
        writer = pq.ParquetWriter(f, schema, compression="zstd")
        for rel, mask in zip(srcs, keep):
            if not mask.any():
                continue
            start = 0
            for batch in _batches(store, rel, plain):
                part = pa.Table.from_batches([batch], plain)
                m = mask[start:start + batch.num_rows]
                start += batch.num_rows
                part = part if m.all() else part.filter(pa.array(m))
                writer.write_table(part.replace_schema_metadata(schema.metadata))
                rows += part.num_rows
        if rows == 0:
            writer.write_table(schema.empty_table())
        writer.close()
    return rows


def _batches(store: Store, rel: str, schema: pa.Schema, size: int = 4096):
    """A source's rows in record batches of the manifest schema (parts are written with it)."""
    local = store.local_path(rel)
    pf = pq.ParquetFile(str(local) if local is not None else io.BytesIO(store.read_bytes(rel)))
    if pf.schema_arrow.remove_metadata() != schema:
        yield from _read(store, rel).to_batches(max_chunksize=size)  # an older layout: cast once
        return
    yield from pf.iter_batches(batch_size=size)


def _last_occurrence(ids: list) -> list:
    """Per source, a mask of the rows that are the last occurrence of their job id."""
    import numpy as np

    if not ids:
        return []
    flat = np.concatenate(ids)
    if not len(flat):
        return [np.zeros(0, bool) for _ in ids]
    _, first_rev = np.unique(flat[::-1], return_index=True)  # first in reverse = last
    last = np.zeros(len(flat), dtype=bool)
    last[len(flat) - 1 - first_rev] = True
    bounds = np.cumsum([0] + [len(a) for a in ids])
    return [last[bounds[k]:bounds[k + 1]] for k in range(len(ids))]


def iter_manifest(store: Store, columns: list[str] | None = None, batch_size: int = 8192):
    """Record batches of manifest.parquet, a few thousand rows at a time."""
    store = as_store(store)
    if not store.exists(MANIFEST):
        return
    local = store.local_path(MANIFEST)
    source = str(local) if local is not None else io.BytesIO(store.read_bytes(MANIFEST))
    yield from pq.ParquetFile(source).iter_batches(batch_size=batch_size, columns=columns)
