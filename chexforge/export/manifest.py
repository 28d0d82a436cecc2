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
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import UserError
from ..plan.jobs import BOXES, job_schema, table_bytes, with_recipe
from ..store import Store, as_store

MANIFEST = "manifest.parquet"
PARTS = ".parts"

FILE = pa.struct([("name", pa.string()), ("path", pa.string()), ("sha256", pa.string())])
STATUS_COLUMNS = ["job_id", "status", "error", "image_png", "image_dicom", "cohort"]


def manifest_schema() -> pa.Schema:
    extra = [
        pa.field("status", pa.string()),  # ok | failed
        pa.field("error", pa.string()),
        pa.field("image_png", pa.string()),
        pa.field("sha256_png", pa.string()),
        pa.field("image_dicom", pa.string()),
        pa.field("sha256_dicom", pa.string()),
        pa.field("masks", pa.list_(FILE)),
        pa.field("realised_boxes", BOXES),
        pa.field("backend", pa.string()),
        pa.field("backend_version", pa.string()),
        pa.field("model", pa.string()),
        pa.field("model_hash", pa.string()),
        pa.field("sampler", pa.string()),  # JSON
        pa.field("meta", pa.string()),  # JSON, backend facts about this image
        pa.field("attempts", pa.int16()),
        pa.field("seconds_generate", pa.float32()),
        pa.field("seconds_export", pa.float32()),
    ]
    return pa.schema(list(job_schema()) + extra)


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
    try:
        t = pq.read_table(io.BytesIO(store.read_bytes(rel)), columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"the manifest is unreadable ({e}); it was not written by a complete chexforge run",
                        f"{store.root}/{rel}") from None
    want = columns or manifest_schema().names
    missing = [c for c in want if c not in t.column_names]
    if missing:
        raise UserError(f"not a chexforge manifest: missing {', '.join(missing[:4])}", f"{store.root}/{rel}")
    schema = manifest_schema()
    return t.select(want).cast(pa.schema([schema.field(c) for c in want]))


def sources(store: Store) -> list[str]:
    """manifest.parquet (if any) then the parts, oldest first: later rows win."""
    return ([MANIFEST] if store.exists(MANIFEST) else []) + part_names(store)


def read_manifest(store: Store, columns: list[str] | None = None) -> pa.Table:
    """manifest.parquet plus every committed part; the last row for a job id wins."""
    store = as_store(store)
    tables = [_read(store, rel, columns) for rel in sources(store)]
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


def compact_parts(store: Store, name: str, keep_last: int = 0) -> int:
    """Fold all but the newest `keep_last` parts into one (atomically, then delete them)."""
    store = as_store(store)
    parts = part_names(store)
    fold = parts[: max(0, len(parts) - keep_last)]
    if len(fold) < 2:
        return 0
    table = last_per_job(pa.concat_tables([_read(store, rel) for rel in fold]))
    store.write_bytes(f"{PARTS}/{name}.parquet", table_bytes(table))
    for rel in fold:
        store.remove(rel)
    return len(fold)


def merge_parts(store: Store, order: pa.Array | None = None, recipe_json: dict | None = None) -> pa.Table:
    """Fold the parts into manifest.parquet (atomically), then delete the parts; return it.

    `order` (the plan's job ids) sorts the manifest like the job table."""
    store = as_store(store)
    parts = part_names(store)
    table = read_manifest(store)
    if order is not None:
        ranks = pc.fill_null(pc.index_in(table.column("job_id"), value_set=order), len(order))
        table = table.take(pc.sort_indices(pa.table({"r": ranks, "id": table.column("job_id")}),
                                           sort_keys=[("r", "ascending"), ("id", "ascending")]))
    if recipe_json is not None:
        table = with_recipe(table, recipe_json)
    store.write_bytes(MANIFEST, table_bytes(table))
    store.sync()
    for rel in parts:
        store.remove(rel)
    return table


def sampler_json(identity: dict) -> str:
    return json.dumps(identity.get("sampler", {}), sort_keys=True)
