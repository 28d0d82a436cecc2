"""Recipe → job table. Pure, seeded and vectorised: no global RNG, no per-row Python.

Every draw for job i of a cohort comes from a counter-based generator keyed by what decides
the job's pixels (recipe seed, backend and options, image size, the cohort's spec but not its
count) and by i. So the same recipe gives the same table byte for byte, and raising a count
keeps the existing jobs. In a study cohort (`study: {views: [...]}`) what `count` counts is a
study: the patient and findings are drawn once per study index and repeated to each view's job
(plan_cohort).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import atomic
from ..contracts.backends import backend_info
from ..contracts.jobs import (
    decode_job_ids,
    encode_job_ids,
    encode_patient_ids,
    encode_study_ids,
    job_schema,
    laterality_column,
    severity_column,
    with_recipe,
)
from ..contracts.vocabulary import FINDING_NAMES, LATERAL_FINDINGS, SEVERITY_FINDINGS
from ..recipe.loader import load_recipe, recipe_dict, stable_hash
from ..recipe.schema import Cohort, Recipe, layout_source
from . import layout, prompts, rng, sampling, subsample
from .summary import cohort_summary, estimate_seconds


def cohort_key(recipe: Recipe, cohort: Cohort) -> int:
    spec = cohort.model_dump(mode="json", exclude={"count", "qc"}, exclude_none=True)  # QC does not change what a job asks for
    material = {
        "seed": recipe.seed,
        "backend": recipe.backend,
        "options": backend_info(recipe.backend).identity_options(recipe.backend_options),  # not batch sizes
        "size": recipe.output.size,
        "cohort": spec,
    }
    return rng.key_of(stable_hash(material))


CHUNK = 16384
ROW_GROUP = 65536  # rows per Parquet row group of jobs.parquet (contracts.jobs.table_bytes writes the same)


def plan(recipe: Recipe) -> pa.Table:
    """All jobs of a recipe, cohort by cohort, index ascending."""
    schema = job_schema()
    tables = list(iter_plan(recipe, chunk=None))
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    raw = np.concatenate([rng.bits(cohort_key(recipe, c), np.arange(c.images, dtype=np.uint64), "id")
                          for c in recipe.cohorts])
    raw.sort()
    _check_unique(raw)
    return with_recipe(table, recipe_dict(recipe))


def _check_unique(sorted_ids: np.ndarray) -> None:
    if len(sorted_ids) > 1 and not np.all(sorted_ids[1:] != sorted_ids[:-1]):  # 64-bit ids: practically impossible, but never silent
        raise RuntimeError("job id collision; change the recipe seed")


@dataclass
class PlanReport:
    """What `chexforge plan` (and `generate --dry-run`) shows of a job stream."""

    jobs: int
    cohorts: list[dict]  # per cohort, as plan.summary.cohort_summary gives it
    seconds: float | None  # rough wall time on one CPU (None: the backend gives no estimate)
    first: list[dict] = field(default_factory=list)  # the first jobs asked for: job_id, cohort, seed, prompt
    path: str | None = None  # the jobs.parquet written, if any
    backend: str = ""


def summarise(chunks: Iterable[pa.Table], backend: str, show: int = 0,
              sink: Callable[[pa.Table], None] | None = None) -> PlanReport:
    """One pass over a job stream: the per-cohort composition (the streaming tally behind
    `cohort_summary`), the job count, the time estimate and the first `show` jobs; `sink` sees
    every chunk on the way. Memory is bounded by a chunk, whatever the number of jobs."""
    report = PlanReport(0, [], 0.0, backend=backend)

    def tables():
        for t in chunks:
            if sink is not None:
                sink(t)
            report.jobs += t.num_rows
            secs = estimate_seconds(t, backend) if t.num_rows else 0.0
            report.seconds = None if secs is None or report.seconds is None else report.seconds + secs
            if len(report.first) < show:
                head = t.slice(0, show - len(report.first)).select(["job_id", "cohort", "seed", "prompt"])
                report.first += head.to_pylist()
            yield t

    report.cohorts = cohort_summary(tables())  # Composition.of: a stream of tables, tallied one at a time
    if report.jobs == 0:
        report.seconds = None
    return report


def plan_report(recipe: Recipe | str | Path, out: str | Path | None = None, show: int = 0,
                chunk: int = CHUNK, sample: int | None = None) -> PlanReport:
    """`chexforge plan`: the plan of a recipe summarised and, with `out`, written to jobs.parquet,
    streamed chunk by chunk through `iter_plan`. The file is byte for byte what
    `write_jobs(plan(recipe), out)` writes; memory holds a chunk, a row group and the job ids
    (8 bytes a job, to prove them unique). With `sample`, only the stratified sample of that many
    jobs (plan/subsample.py; one more pass over the plan to find it)."""
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    chosen = None if sample is None else subsample.sample_of(iter_plan(r, chunk), sample, r.seed)

    def stream():
        return iter_plan(r, chunk) if chosen is None else subsample.only(iter_plan(r, chunk), chosen)

    if out is None:
        return summarise(stream(), r.backend, show)
    path = os.fspath(out)
    ids = np.empty(r.total if chosen is None else len(chosen), dtype=np.uint64)
    schema = job_schema().with_metadata(with_recipe(job_schema().empty_table(), recipe_dict(r)).schema.metadata)
    try:
        with atomic.atomic_open(path) as f:
            writer = pq.ParquetWriter(f, schema, compression="zstd")
            group = _RowGroups(writer, schema)
            filled = 0

            def sink(t: pa.Table) -> None:
                nonlocal filled
                ids[filled:filled + t.num_rows] = decode_job_ids(t.column("job_id"))
                filled += t.num_rows
                group.add(t)

            report = summarise(stream(), r.backend, show, sink)
            group.close()
            writer.close()
            ids.sort()
            _check_unique(ids)
    except OSError as e:
        raise atomic.disk_error(e, path, resume=False) from None
    report.path = path
    return report


class _RowGroups:
    """Write tables as Parquet row groups of exactly ROW_GROUP rows (the last one shorter), as
    pq.write_table(whole, row_group_size=ROW_GROUP) does, whatever size the tables come in."""

    def __init__(self, writer: pq.ParquetWriter, schema: pa.Schema):
        self.writer, self.schema = writer, schema
        self.pending: list[pa.Table] = []
        self.rows = 0
        self.written = 0

    def add(self, t: pa.Table) -> None:
        if t.num_rows:
            self.pending.append(t.replace_schema_metadata(self.schema.metadata))
            self.rows += t.num_rows
        while self.rows >= ROW_GROUP:
            self._write(ROW_GROUP)

    def close(self) -> None:
        if self.rows or not self.written:  # an empty plan: one empty table, as write_table writes it
            self._write(self.rows)

    def _write(self, n: int) -> None:
        # The Parquet writer's page and dictionary decisions follow the Arrow chunks it is given, and
        # the whole plan has one chunk per cohort: so the pieces of a cohort are joined into one.
        runs: list[list[pa.Table]] = []
        for t in self.pending:
            if runs and runs[-1][0].column("cohort")[0] == t.column("cohort")[0]:
                runs[-1].append(t)
            else:
                runs.append([t])
        pieces = [pa.concat_tables(run).combine_chunks() for run in runs]
        table = pa.concat_tables(pieces) if pieces else self.schema.empty_table()
        self.writer.write_table(table.slice(0, n), row_group_size=ROW_GROUP)
        rest = table.slice(n)
        self.pending = [rest] if rest.num_rows else []
        self.rows -= n
        self.written += 1


def iter_plan(recipe: Recipe, chunk: int | None = CHUNK):
    """The same jobs as `plan`, as tables of at most `chunk` rows (memory bounded by the chunk);
    a study cohort is cut between studies, never inside one."""
    for cohort in recipe.cohorts:
        per = cohort.views_per_study
        step = max(chunk // per, 1) if chunk else max(cohort.count, 1)
        for start in range(0, cohort.count, step):
            yield plan_cohort(recipe, cohort, start, min(cohort.count, start + step))


def plan_cohort(recipe: Recipe, cohort: Cohort, start: int = 0, stop: int | None = None) -> pa.Table:
    """The jobs of a cohort's items `start`..`stop`, where an item is what `count` counts: a job,
    or in a study cohort a study (one patient), which gives one job per view of study.views, in
    that order. Every draw depends only on the item's index: the patient (sex, age, race), the
    findings with their laterality and severity, the layout and the patient columns are drawn
    once per item and repeated to each of its images; job_id and seed per image, from its index
    in the cohort (study × views + the view's position)."""
    stop = cohort.count if stop is None else stop
    per = cohort.views_per_study
    m = stop - start  # items (patients)
    n = m * per  # images (jobs)
    key = cohort_key(recipe, cohort)
    item = np.arange(start, stop, dtype=np.uint64)
    index = np.arange(start * per, stop * per, dtype=np.uint64)
    demo = cohort.demographics
    u = rng.Streams(key, m, sampling.stream_names(cohort), start)

    if cohort.study is not None:  # the study's views in order, the same for every study
        views = list(cohort.study.views)
        view = pa.DictionaryArray.from_arrays(pa.array(np.tile(np.arange(per, dtype=np.int32), m)),
                                              pa.array(views, pa.string())).cast(pa.string())
        first_view = pa.repeat(pa.scalar(views[0]), m)  # natural findings are drawn for the study's first view
    else:
        view = first_view = sampling.categorical(cohort.view or {"PA": 1.0}, u("view"))
    drawn: dict[str, pa.Array] = {  # one value per item
        "patient_id": encode_patient_ids(rng.bits(key, item, "patient")),
        "study_id": encode_study_ids(rng.bits(key, item, "study")),
        "patient_seed": pa.array((rng.bits(key, item, "patient_seed") >> np.uint64(1)).astype(np.int64)),
        "sex": sampling.categorical(demo.sex, u("sex")),
        "age": pa.array(sampling.ages(demo.age, u("age"), u("age2"))),
        "race": (sampling.categorical(demo.race, u("race"))
                 if demo.race else pa.nulls(m, pa.string())),
    }
    demo_arrays = (drawn["sex"].to_numpy(zero_copy_only=False), drawn["age"].to_numpy(zero_copy_only=False),
                   first_view.to_numpy(zero_copy_only=False))
    finding_cols = sampling.findings(cohort, u, m, demo_arrays, backend_info(recipe.backend).findings)
    for name in FINDING_NAMES:
        drawn[name] = pa.array(finding_cols[name])
    for name in LATERAL_FINDINGS:
        drawn[laterality_column(name)] = finding_cols[laterality_column(name)]
    for name in SEVERITY_FINDINGS:
        drawn[severity_column(name)] = finding_cols[severity_column(name)]
    boxes, refs = layout.choose(recipe, cohort, key, item, drawn)
    drawn = _mark_layout_findings(drawn, boxes)
    drawn["boxes"], drawn["mask_ref"] = boxes, refs
    if per > 1:  # each item's values on each of its images
        of_item = pa.array(np.repeat(np.arange(m, dtype=np.int64), per))
        drawn = {name: column.take(of_item) for name, column in drawn.items()}

    cols: dict[str, pa.Array] = {
        "job_id": encode_job_ids(rng.bits(key, index, "id")),
        "cohort": pa.repeat(pa.scalar(cohort.name), n),
        "index": pa.array(index.astype(np.int64)),
        "seed": pa.array((rng.bits(key, index, "seed") >> np.uint64(1)).astype(np.int64)),
        "view": view,
        **drawn,
    }
    fields = {
        "view": cols["view"], "age": cols["age"], "sex": cols["sex"], "race": cols["race"],
        "sex_word": prompts.sex_words(cols["sex"], cols["age"]),
        "findings": prompts.findings_text(cols, n), "cohort": cols["cohort"],
    }
    cols["prompt"] = prompts.render(cohort.prompt, fields, n)
    cols["layout"] = pa.repeat(pa.scalar(layout_source(recipe, cohort)), n)
    anatomy = cohort.masks if cohort.masks is not None else list(backend_info(recipe.backend).default_anatomy)
    cols["anatomy"] = _repeat_list(anatomy, n)
    cols["size"] = pa.repeat(pa.scalar(recipe.output.size, pa.int16()), n)
    schema = job_schema()
    return pa.table([pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array)
                     else cols[f.name].cast(f.type) for f in schema], schema=schema)


def _mark_layout_findings(cols: dict[str, pa.Array], boxes: pa.Array) -> dict[str, pa.Array]:
    """A box labelled with a finding sets that finding on its job (and clears No Finding)."""
    flat = boxes.flatten()
    if len(flat) == 0:
        return cols
    parent = pc.list_parent_indices(boxes).to_numpy()
    labels = flat.field("label").to_numpy(zero_copy_only=False)
    n = len(boxes)
    for name in set(labels) & set(FINDING_NAMES):
        hit = np.zeros(n, dtype=bool)
        hit[parent[labels == name]] = True
        cols[name] = pa.array(np.maximum(cols[name].to_numpy(zero_copy_only=False), hit.astype(np.int8)))
    any_box = np.zeros(n, dtype=bool)
    any_box[parent] = True
    nf = cols["No Finding"].to_numpy(zero_copy_only=False)
    cols["No Finding"] = pa.array(np.where(any_box, 0, nf).astype(np.int8))
    return cols


def _repeat_list(values: list[str], n: int) -> pa.Array:
    """The same list of strings on every row (pa.repeat of a list scalar is slow at 10^6 rows)."""
    k = len(values)
    codes = pa.array(np.tile(np.arange(k, dtype=np.int32), n))
    flat = pa.DictionaryArray.from_arrays(codes, pa.array(values, pa.string())).cast(pa.string())
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * k), flat)
