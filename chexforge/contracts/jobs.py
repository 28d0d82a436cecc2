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
from .limits import load_json
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
        # Who and which study (null only in a table planned before these columns: see PATIENT_COLUMNS).
        pa.field("patient_id", pa.string()),
        pa.field("study_id", pa.string()),
        pa.field("patient_seed", pa.int64()),
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
# Columns added after the first release. A jobs table (or manifest) written before them reads with
# them null: each of its jobs is then its own patient and study, and a backend draws the patient
# from `seed` where `patient_seed` is null.
PATIENT_COLUMNS = ("patient_id", "study_id", "patient_seed")
OPTIONAL_JOB_COLUMNS = frozenset(PATIENT_COLUMNS)


# ---- job ids: encode, decode, shard -----------------------------------------------------------

_HEX = np.array([f"{i:02x}" for i in range(256)], dtype="S2")


def encode_job_ids(values: np.ndarray, prefix: str = "") -> pa.Array:
    """uint64 → 16-character lowercase hex strings (big-endian), built straight into Arrow buffers;
    `prefix` (one ASCII letter or none) goes before each: "P" for patient ids, "S" for study ids."""
    raw = values.astype(">u8").view(np.uint8).reshape(-1, 8)
    chars = np.ascontiguousarray(_HEX[raw]).view(np.uint8).reshape(-1, 16)
    width = 16 + len(prefix)
    if prefix:
        head = np.frombuffer(prefix.encode("ascii"), dtype=np.uint8)
        chars = np.concatenate([np.broadcast_to(head, (len(values), len(head))), chars], axis=1)
    offsets = np.arange(len(values) + 1, dtype=np.int32) * width
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(chars).ravel())])


def encode_patient_ids(values: np.ndarray) -> pa.Array:
    """uint64 → "P" + 16 hex digits."""
    return encode_job_ids(values, "P")


def encode_study_ids(values: np.ndarray) -> pa.Array:
    """uint64 → "S" + 16 hex digits."""
    return encode_job_ids(values, "S")


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
    `header_only`: return just the recipe (the rows are streamed later).

    Either way every row is checked first, row group by row group (bounded memory), so a table
    edited by hand or damaged is one located line before a run writes anything: the columns and
    their types, the recipe JSON under the limits of contracts/limits.py, and each value (ids of
    16 hex digits, integer seeds, known views, sexes, ages, findings, sizes, cohorts of the recipe).
    A table planned before the patient columns (PATIENT_COLUMNS) reads with them null.
    """
    path = Path(path)
    if not path.exists():
        raise UserError("no such jobs file", path)
    if path.is_dir():
        raise UserError("expected a jobs file (Parquet), not a folder", path)
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError, ValueError, TypeError, MemoryError) as e:
        raise UserError(f"not a readable Parquet file ({_first_line(e)})", path) from None
    missing = [c for c in JOB_COLUMNS if c not in schema.names and c not in OPTIONAL_JOB_COLUMNS]
    if missing:
        raise UserError(f"not a chexforge jobs table: missing columns {', '.join(missing[:5])}", path)
    expected = job_schema()
    for name in JOB_COLUMNS:
        if name not in schema.names:
            continue  # a column the table predates (OPTIONAL_JOB_COLUMNS): read as nulls
        field, want = schema.field(name), expected.field(name)
        if not _compatible(field.type, want.type, name in NULLABLE):
            raise UserError(f"column {name!r}: expected {_kind_text(want.type)}, not {field.type}", path)
    meta = schema.metadata or {}
    if RECIPE_KEY not in meta:
        raise UserError("the jobs table carries no recipe (write it with `chexforge plan`)", path)
    recipe = load_json(meta[RECIPE_KEY], path, "the recipe in the jobs table")
    if not isinstance(recipe, dict):
        raise UserError("the recipe in the jobs table is not a JSON object", path)
    cohorts = _cohort_names(recipe)
    batches = []
    row = 0
    try:
        for batch in job_batches(parquet, 65536):
            check_job_rows(batch, path, row, cohorts)
            row += batch.num_rows
            if not header_only:
                batches.append(batch)
    except UserError:
        raise
    except (pa.ArrowException, OSError, ValueError, TypeError, MemoryError) as e:
        raise UserError(f"the jobs table is damaged near row {row + 1} ({_first_line(e)})", path) from None
    if header_only:
        return recipe
    table = pa.Table.from_batches(batches, schema=_read_schema(schema)) if batches else \
        job_schema().empty_table().cast(_read_schema(schema))
    return table, recipe


# ---- checking job tables from disk ---------------------------------------------------------------

NULLABLE = frozenset(["race", *PATIENT_COLUMNS, *(laterality_column(f) for f in LATERAL_FINDINGS),
                      *(severity_column(f) for f in SEVERITY_FINDINGS)])
LAYOUTS = ("physics", "explicit", "prior", "none")


def _first_line(e: BaseException) -> str:
    return ((str(e).splitlines() or [type(e).__name__])[0])[:160]


def _read_schema(schema: pa.Schema) -> pa.Schema:
    """The job columns as the file types them (a column it predates: the job schema's type)."""
    expected = job_schema()
    return pa.schema([schema.field(c) if c in schema.names else expected.field(c) for c in JOB_COLUMNS],
                     metadata=schema.metadata)


def job_batches(parquet: pq.ParquetFile, batch_size: int):
    """The job columns of a jobs file (or manifest), a record batch at a time; a column the file
    predates (OPTIONAL_JOB_COLUMNS) comes as nulls, so every batch has every job column."""
    schema = _read_schema(parquet.schema_arrow)
    present = [c for c in JOB_COLUMNS if c in parquet.schema_arrow.names]
    for batch in parquet.iter_batches(batch_size=batch_size, columns=present):
        if len(present) == len(JOB_COLUMNS):
            yield batch.select(list(JOB_COLUMNS))
            continue
        arrays = [batch.column(c) if c in present else pa.nulls(batch.num_rows, schema.field(c).type)
                  for c in JOB_COLUMNS]
        yield pa.RecordBatch.from_arrays(arrays, schema=schema.remove_metadata())


def _kind(t: pa.DataType):
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return ("list", _kind(t.value_type))
    if pa.types.is_struct(t):
        return ("struct", tuple((t.field(i).name, _kind(t.field(i).type)) for i in range(t.num_fields)))
    return str(t)


def _compatible(actual: pa.DataType, want: pa.DataType, nullable: bool) -> bool:
    """Whether a column of type `actual` reads as the job schema's `want` (any integer width
    for integers, string or large_string, an all-null column where nulls are allowed)."""
    a, w = _kind(actual), _kind(want)
    if a == "null":
        return nullable
    if w == "float":
        return a in ("float", "int")
    if isinstance(w, tuple) and isinstance(a, tuple) and a[0] == w[0]:
        if w[0] == "list":
            return _compatible(actual.value_type, want.value_type, False)
        names = [want.field(i).name for i in range(want.num_fields)]
        if [actual.field(i).name for i in range(actual.num_fields)] != names:
            return False
        return all(_compatible(actual.field(n).type, want.field(n).type, False) for n in names)
    return a == w


def _kind_text(t: pa.DataType) -> str:
    k = _kind(t)
    return {"int": "integers", "str": "text", "float": "numbers"}.get(k, str(t)) if isinstance(k, str) else str(t)


def _cohort_names(recipe: dict) -> set[str] | None:
    cohorts = recipe.get("cohorts")
    if not isinstance(cohorts, list):
        return None
    return {c["name"] for c in cohorts if isinstance(c, dict) and isinstance(c.get("name"), str)}


_JOB_ID = r"^[0-9a-fA-F]{16}$"
_PATIENT_ID = r"^P[0-9a-fA-F]{16}$"
_STUDY_ID = r"^S[0-9a-fA-F]{16}$"


def check_job_rows(batch: pa.RecordBatch | pa.Table, path: str | Path, offset: int = 0,
                   cohorts: set[str] | None = None) -> None:
    """Refuse the first row of `batch` whose value a backend could not take: one line naming the
    file, the row (1-based, `offset` rows before this batch) and the column."""
    from .vocabulary import ANATOMY, LATERALITIES, SEVERITIES, SEXES, VIEWS

    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])

    def fail(mask, name: str, what: str) -> None:
        mask = pc.fill_null(mask, True)
        if pc.any(mask).as_py():
            i = int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])
            value = table.column(name)[i].as_py()
            shown = repr(value) if not isinstance(value, str) else repr(value[:40] + ("..." if len(value) > 40 else ""))
            raise UserError(f"column {name!r}: expected {what}, got {shown[:80]}", f"{path}: row {offset + i + 1}")

    def col(name: str):
        return table.column(name).combine_chunks() if table.num_rows else table.column(name)

    def outside(name: str, allowed, nullable: bool = False):
        c = col(name)
        if pa.types.is_null(c.type):
            return pa.array([not nullable] * len(c))
        bad = pc.invert(pc.is_in(c, value_set=pa.array(list(allowed), c.type)))
        return pc.if_else(pc.is_null(c), not nullable, bad)

    def out_of_range(name: str, lo: int, hi: int):
        c = col(name)
        return pc.or_(pc.less(c, lo), pc.greater(c, hi))

    if not table.num_rows:
        return
    fail(pc.invert(pc.match_substring_regex(col("job_id"), _JOB_ID)), "job_id", "16 hex digits")
    fail(pc.is_null(col("cohort")) if not cohorts else outside("cohort", sorted(cohorts)), "cohort",
         "a cohort of the table's recipe" if cohorts else "a cohort name")
    fail(out_of_range("index", 0, 2**63 - 1), "index", "an integer >= 0")
    fail(out_of_range("seed", 0, 2**63 - 1), "seed", "an integer from 0 to 2**63-1")
    for name, pattern, what in (("patient_id", _PATIENT_ID, "P and 16 hex digits"),
                                ("study_id", _STUDY_ID, "S and 16 hex digits")):
        if not pa.types.is_null(col(name).type):  # an all-null column: a table planned before it
            fail(pc.fill_null(pc.invert(pc.match_substring_regex(col(name), pattern)), False), name, what + " or empty")
    if not pa.types.is_null(col("patient_seed").type):
        fail(pc.fill_null(out_of_range("patient_seed", 0, 2**63 - 1), False), "patient_seed",
             "an integer from 0 to 2**63-1 or empty")
    fail(outside("view", VIEWS), "view", f"one of {', '.join(VIEWS)}")
    fail(outside("sex", SEXES), "sex", f"one of {', '.join(SEXES)}")
    fail(out_of_range("age", 0, 120), "age", "an age from 0 to 120")
    for name in FINDING_NAMES:
        fail(outside(name, (0, 1)), name, "0 or 1")
    for name in LATERAL_FINDINGS:
        fail(outside(laterality_column(name), LATERALITIES, nullable=True), laterality_column(name),
             f"one of {', '.join(LATERALITIES)} or empty")
    for name in SEVERITY_FINDINGS:
        fail(outside(severity_column(name), SEVERITIES, nullable=True), severity_column(name),
             f"one of {', '.join(SEVERITIES)} or empty")
    fail(pc.is_null(col("prompt")), "prompt", "text")
    fail(outside("layout", LAYOUTS), "layout", f"one of {', '.join(LAYOUTS)}")
    fail(pc.is_null(col("mask_ref")), "mask_ref", "text")
    size = col("size")
    fail(pc.or_(out_of_range("size", 64, 1024), pc.not_equal(pc.bit_wise_and(size, 7), 0)), "size",
         "a multiple of 8 from 64 to 1024")
    anatomy = col("anatomy")
    fail(pc.is_null(anatomy), "anatomy", "a list of structures")
    flat = pc.list_flatten(anatomy)
    if len(flat):
        bad = pc.fill_null(pc.invert(pc.is_in(flat, value_set=pa.array(list(ANATOMY), flat.type))), True)
        fail(_any_per_row(anatomy, bad), "anatomy", f"structures among {', '.join(ANATOMY)}")
    boxes = col("boxes")
    fail(pc.is_null(boxes), "boxes", "a list of boxes")
    flat = pc.list_flatten(boxes)
    if len(flat):
        label = pc.struct_field(flat, "label")
        bad = pc.fill_null(pc.invert(pc.is_in(label, value_set=pa.array(list(FINDING_NAMES), label.type))), True)
        for k in ("x0", "y0", "x1", "y1"):
            v = pc.cast(pc.struct_field(flat, k), pa.float64())
            bad = pc.or_(bad, pc.fill_null(pc.invert(pc.and_(pc.greater_equal(v, 0.0), pc.less_equal(v, 1.0))), True))
        fail(_any_per_row(boxes, bad), "boxes", "boxes of a finding with x0, y0, x1, y1 from 0 to 1")


def _any_per_row(lists: pa.Array, bad: pa.Array) -> pa.Array:
    """Per row of a list column, whether any of its (flattened) elements is `bad`."""
    parents = pc.list_parent_indices(lists).to_numpy()
    out = np.zeros(len(lists), dtype=bool)
    out[parents[bad.to_numpy(zero_copy_only=False)]] = True
    return pa.array(out)
