"""The job table (jobs.parquet): its schema, the job-id codec and shard hash, and reading and
writing it. Every stage meets the job row here: the planner makes rows, backends read them,
the runtime batches them, exporters copy them into the manifest.

The resolved recipe travels in the Parquet schema metadata, so `chexforge generate --jobs
jobs.parquet` needs nothing else. Job ids are 16 lowercase hex digits (64 hash bits), handled
as uint64 arrays for membership tests.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import atomic
from ..errors import UserError
from .vocabulary import FINDING_NAMES, LATERAL_FINDINGS, SEVERITY_FINDINGS

BOX = pa.struct([("label", pa.string()), ("x0", pa.float32()), ("y0", pa.float32()),
                 ("x1", pa.float32()), ("y1", pa.float32())])
BOXES = pa.list_(BOX)

RECIPE_KEY = b"chexforge.recipe"
VERSION_KEY = b"chexforge.version"


def laterality_column(finding: str) -> str:
    return f"{finding}.laterality"


def severity_column(finding: str) -> str:
    return f"{finding}.severity"


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
    fields += [pa.field(laterality_column(name), pa.string()) for name in LATERAL_FINDINGS]
    fields += [pa.field(severity_column(name), pa.string()) for name in SEVERITY_FINDINGS]
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


# ---- job ids: encode, decode, shard -----------------------------------------------------------

_HEX = np.array([f"{i:02x}" for i in range(256)], dtype="S2")


def encode_job_ids(values: np.ndarray) -> pa.Array:
    """uint64 → 16-character lowercase hex strings (big-endian), built straight into Arrow buffers."""
    raw = values.astype(">u8").view(np.uint8).reshape(-1, 8)
    chars = np.ascontiguousarray(_HEX[raw]).view(np.uint8).ravel()
    offsets = np.arange(len(values) + 1, dtype=np.int32) * 16
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(chars)])


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _hex_values(values: list[str], digits: int, dtype: str) -> np.ndarray:
    """Fixed-width hex strings → integers in one decode; a malformed id is a one-line error."""
    try:
        if any(len(v) != digits for v in values):
            raise ValueError
        return np.frombuffer(bytes.fromhex("".join(values)), dtype=dtype)
    except ValueError:
        bad = next(v for v in values if len(v) != digits or not set(v) <= _HEX_DIGITS)
        raise UserError(f"job ids are 16 hex digits, not {bad[:40]!r}") from None


def decode_job_ids(job_ids: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
    """16-hex-digit job ids → uint64 (vectorised through one hex decode)."""
    values = job_ids.to_pylist() if not isinstance(job_ids, list) else job_ids
    if not values:
        return np.zeros(0, dtype=np.uint64)
    return _hex_values(values, 16, ">u8").astype(np.uint64)


def shard_of(job_ids: pa.Array | pa.ChunkedArray, n: int) -> np.ndarray:
    """Shard number of each job: its id's first 8 hex digits modulo n (ids are uniform hashes)."""
    heads = pc.utf8_slice_codeunits(job_ids, 0, 8).to_pylist()
    if not heads:
        return np.zeros(0, dtype=np.int64)
    return _hex_values(heads, 8, ">u4").astype(np.int64) % n


def shard_mask(job_ids: pa.Array | pa.ChunkedArray, i: int, n: int) -> np.ndarray:
    return shard_of(job_ids, n) == i


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
