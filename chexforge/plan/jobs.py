"""The job table (jobs.parquet): its schema, and reading and writing it.

The resolved recipe travels in the Parquet schema metadata, so `chexforge generate --jobs
jobs.parquet` needs nothing else.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import atomic
from ..errors import UserError
from ..recipe.vocabulary import FINDING_NAMES, LATERAL_FINDINGS, SEVERITY_FINDINGS

BOX = pa.struct([("label", pa.string()), ("x0", pa.float32()), ("y0", pa.float32()),
                 ("x1", pa.float32()), ("y1", pa.float32())])
BOXES = pa.list_(BOX)

RECIPE_KEY = b"chexforge.recipe"
VERSION_KEY = b"chexforge.version"


def job_schema() -> pa.Schema:
    fields = [
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("cohort", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("view", pa.string()),
        pa.field("sex", pa.string()),
        pa.field("age", pa.int16()),
        pa.field("race", pa.string()),
    ]
    fields += [pa.field(name, pa.int8()) for name in FINDING_NAMES]
    fields += [pa.field(f"{name}.laterality", pa.string()) for name in LATERAL_FINDINGS]
    fields += [pa.field(f"{name}.severity", pa.string()) for name in SEVERITY_FINDINGS]
    fields += [
        pa.field("prompt", pa.string()),
        pa.field("layout", pa.string()),
        pa.field("boxes", BOXES),
        pa.field("mask_ref", pa.string()),
        pa.field("anatomy", pa.list_(pa.string())),
        pa.field("size", pa.int16()),
    ]
    return pa.schema(fields)


JOB_COLUMNS = tuple(job_schema().names)


def with_recipe(table: pa.Table, recipe_json: dict) -> pa.Table:
    from .. import __version__

    meta = {RECIPE_KEY: json.dumps(recipe_json, sort_keys=True).encode(), VERSION_KEY: __version__.encode()}
    return table.replace_schema_metadata(meta)


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=65536)  # row groups: streamable
    return buf.getvalue()


def write_jobs(table: pa.Table, path: str | Path) -> None:
    atomic.write_bytes(path, table_bytes(table))


def read_jobs(path: str | Path, header_only: bool = False):
    """Read a jobs file (or a manifest: it holds every job column); return it and its recipe.
    `header_only`: check the columns and return just the recipe (the rows are streamed later)."""
    path = Path(path)
    if not path.exists():
        raise UserError("no such jobs file", path)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"not a readable Parquet file ({e})", path) from None
    missing = [c for c in JOB_COLUMNS if c not in schema.names]
    if missing:
        raise UserError(f"not a chexforge jobs table: missing columns {', '.join(missing[:5])}", path)
    meta = schema.metadata or {}
    if RECIPE_KEY not in meta:
        raise UserError("the jobs table carries no recipe (write it with `chexforge plan`)", path)
    recipe = json.loads(meta[RECIPE_KEY])
    if header_only:
        return recipe
    return pq.read_table(path, columns=list(JOB_COLUMNS)), recipe
