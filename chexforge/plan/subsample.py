"""A stratified, seeded sample of a plan (`chexforge generate --sample N`, `chexforge plan --sample N`).

`--limit N` makes the first N jobs not done yet, in plan order: the first cohort's first jobs,
which is no sample of the dataset. `--sample N` instead picks N jobs that look like the whole plan:

- across cohorts, proportional to each cohort's jobs (largest remainder, so the cohort counts
  sum to N and each is within one job of N × its share);
- within a cohort, spread over its strata (sex × the combination of findings present) by
  systematic sampling over the cohort's jobs ordered by stratum, so each stratum gets its share
  of the cohort's sample rounded down or up;
- which jobs of a stratum: an order fixed by a hash of the recipe seed and the job's study (or
  job) id, so the sample depends only on the plan, the seed and N: re-running with the same N
  picks the same jobs (a run resumes into the same set), whatever the chunking or sharding;
- in a study cohort (`study: {views: [...]}`) whole studies are picked, never one view of a
  study: the cohort gets floor(its share / views) studies, so the sample can be a few jobs short
  of N there.

Pure functions over job ids and strata: `collect` reads them from a stream of job tables (the
columns the planner writes), `choose` picks the ids. The runtime and `plan_report` call them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..contracts.jobs import decode_job_ids
from ..contracts.vocabulary import FINDING_NAMES, NO_FINDING
from . import rng

_SEX = {"F": 1, "M": 2}


@dataclass
class Strata:
    """One entry per job, in plan order."""

    ids: np.ndarray  # uint64 job ids
    cohort: np.ndarray  # int32: index into `cohorts`
    cohorts: list[str]  # cohort names in plan order
    stratum: np.ndarray  # int64: sex × findings present, comparable within a cohort
    unit: np.ndarray  # uint64: the study the job belongs to (its own id outside study cohorts)


def collect(chunks: Iterable[pa.Table | pa.RecordBatch]) -> Strata:
    """The strata of every job of a stream of job tables (8 + 4 + 8 + 8 bytes a job)."""
    ids, cohort, stratum, unit = [], [], [], []
    names: dict[str, int] = {}
    for t in chunks:
        if not t.num_rows:
            continue
        job = decode_job_ids(t.column("job_id"))
        codes = pc.dictionary_encode(t.column("cohort"))
        codes = codes.combine_chunks() if isinstance(codes, pa.ChunkedArray) else codes
        local = np.array([names.setdefault(v, len(names)) for v in codes.dictionary.to_pylist()], dtype=np.int32)
        cohort.append(local[codes.indices.to_numpy(zero_copy_only=False)])
        key = np.zeros(t.num_rows, dtype=np.int64)
        for bit, f in enumerate(f for f in FINDING_NAMES if f != NO_FINDING):
            if f in t.column_names:
                key |= (np.asarray(t.column(f).to_numpy(zero_copy_only=False)).astype(np.int64) & 1) << bit
        sex = np.zeros(t.num_rows, dtype=np.int64)
        for value, code in _SEX.items():
            sex[np.asarray(pc.fill_null(pc.equal(t.column("sex"), value), False).to_numpy(zero_copy_only=False), dtype=bool)] = code
        stratum.append(key | (sex << 40))
        u = job.copy()
        if "study_id" in t.column_names:
            study = t.column("study_id")
            present = np.asarray(pc.is_valid(study).to_numpy(zero_copy_only=False), dtype=bool)
            if present.any():  # "S" + 16 hex digits
                u[present] = decode_job_ids(pc.utf8_slice_codeunits(study.filter(pa.array(present)), 1))
        ids.append(job)
        unit.append(u)
    if not ids:
        empty = np.zeros(0, dtype=np.uint64)
        return Strata(empty, np.zeros(0, dtype=np.int32), [], np.zeros(0, dtype=np.int64), empty)
    return Strata(np.concatenate(ids), np.concatenate(cohort), list(names), np.concatenate(stratum),
                  np.concatenate(unit))


def shares(sizes: np.ndarray, n: int) -> np.ndarray:
    """Largest-remainder (Hamilton) split of `n` in proportion to `sizes`: sums to min(n, total),
    each part within one of n × size / total and never above its size; ties go to the earlier part."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if n >= total:
        return sizes.copy()
    exact = sizes * (n / total) if total else np.zeros(len(sizes))
    base = np.floor(exact).astype(np.int64)
    left = n - int(base.sum())
    order = np.lexsort((np.arange(len(sizes)), -(exact - base)))  # largest remainder first, then plan order
    base[order[:left]] += 1
    return np.minimum(base, sizes)


def choose(strata: Strata, n: int, seed: int) -> np.ndarray:
    """The sorted ids (uint64) of the sampled jobs: at most `n`, all of them when n >= the plan."""
    if n <= 0 or not len(strata.ids):
        return np.zeros(0, dtype=np.uint64)
    if n >= len(strata.ids):
        return np.sort(strata.ids)
    per_cohort = shares(np.bincount(strata.cohort, minlength=len(strata.cohorts)), n)
    picked: list[np.ndarray] = []
    for c, want in enumerate(per_cohort):
        rows = np.flatnonzero(strata.cohort == c)
        if want == 0 or not len(rows):
            continue
        units, first, views = np.unique(strata.unit[rows], return_index=True, return_counts=True)
        per_unit = int(views.max())  # jobs a study has (1 outside study cohorts)
        k = int(want) // per_unit
        if k == 0:
            continue
        # Order the units by stratum, then by a seeded hash (the order inside a stratum), and take
        # every (units / k)-th from a seeded start: each stratum gets its share rounded down or up.
        key = rng.key_of("sample", seed, strata.cohorts[c])
        tie = rng.splitmix64(units ^ np.uint64(key))
        order = np.lexsort((units, tie, strata.stratum[rows][first]))
        start = float(rng.uniform(key, np.zeros(1, dtype=np.uint64), "start")[0])
        positions = np.floor((np.arange(k) + start) * (len(units) / k)).astype(np.int64)
        chosen = units[order[positions]]
        picked.append(strata.ids[rows][np.isin(strata.unit[rows], chosen)])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.uint64)


def sample_of(chunks: Iterable[pa.Table | pa.RecordBatch], n: int, seed: int) -> np.ndarray:
    """`choose(collect(chunks), n, seed)`."""
    return choose(collect(chunks), n, seed)


def only(chunks: Iterable[pa.Table], chosen: np.ndarray) -> Iterator[pa.Table]:
    """The rows of each table whose job id is in `chosen` (sorted uint64), in their order."""
    for t in chunks:
        job = decode_job_ids(t.column("job_id"))
        if not len(chosen) or not len(job):
            continue
        pos = np.searchsorted(chosen, job).clip(0, len(chosen) - 1)
        keep = chosen[pos] == job
        if keep.any():
            yield t.filter(pa.array(keep))
