"""The manifest (out/manifest.parquet): what is done, where it is, and how it was made.

Every job column, plus the files written (relative to out/) with their SHA-256, the boxes and
masks actually realised, the backend identity and timings. While a run goes it commits one
part file per batch under out/.parts/ (atomically, after the batch's files are in place);
`merge_parts` folds them into manifest.parquet, again atomically. A run resumes from the union
of both, so a kill at any instant loses at most the batch in flight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import atomic
from ..errors import UserError
from ..plan.jobs import BOXES, job_schema, table_bytes

MANIFEST = "manifest.parquet"
PARTS = ".parts"

FILE = pa.struct([("name", pa.string()), ("path", pa.string()), ("sha256", pa.string())])


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
    schema = manifest_schema()
    return pa.Table.from_pylist(rows, schema=schema)


def write_part(out: Path, rows: list[dict], name: str) -> Path:
    path = out / PARTS / f"{name}.parquet"
    atomic.write_bytes(path, table_bytes(rows_to_table(rows)))
    return path


def read_manifest(out: Path) -> pa.Table:
    """manifest.parquet plus every committed part; the last row for a job id wins."""
    out = Path(out)
    tables = []
    main = out / MANIFEST
    if main.exists():
        tables.append(_read(main))
    parts = sorted((out / PARTS).glob("*.parquet")) if (out / PARTS).is_dir() else []
    tables += [_read(p) for p in parts]
    if not tables:
        return manifest_schema().empty_table()
    table = pa.concat_tables([t.cast(manifest_schema()) for t in tables])
    return _last_per_job(table)


def _read(path: Path) -> pa.Table:
    try:
        t = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"the manifest is unreadable ({e}); it was not written by a complete chexforge run", path) from None
    missing = [f.name for f in manifest_schema() if f.name not in t.column_names]
    if missing:
        raise UserError(f"not a chexforge manifest: missing {', '.join(missing[:4])}", path)
    return t.select(manifest_schema().names)


def _last_per_job(table: pa.Table) -> pa.Table:
    ids = table.column("job_id").to_pylist()
    last = {job_id: i for i, job_id in enumerate(ids)}
    if len(last) == len(ids):
        return table
    keep = sorted(last.values())
    return table.take(pa.array(keep))


def merge_parts(out: Path, order: list[str] | None = None, recipe_json: dict | None = None) -> pa.Table:
    """Fold parts into manifest.parquet (atomically), then delete the parts."""
    out = Path(out)
    table = read_manifest(out)
    if order is not None:  # plan order, so the manifest reads like the job table
        pos = {job_id: i for i, job_id in enumerate(order)}
        ids = table.column("job_id").to_pylist()
        ranked = sorted(range(len(ids)), key=lambda i: (pos.get(ids[i], len(pos)), ids[i]))
        table = table.take(pa.array(ranked, pa.int64()))
    if recipe_json is not None:
        from ..plan.jobs import with_recipe

        table = with_recipe(table, recipe_json)
    atomic.write_bytes(out / MANIFEST, table_bytes(table))
    atomic.fsync_dir(out)
    parts = out / PARTS
    if parts.is_dir():
        for p in parts.glob("*.parquet"):
            os.unlink(p)
    return table


def sampler_json(identity: dict) -> str:
    return json.dumps(identity.get("sampler", {}), sort_keys=True)
