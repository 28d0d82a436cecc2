"""Plain-data summaries of a job table (or a manifest, which holds the same columns).

`Composition` is the one place where a cohort's make-up is counted: images, sex and view mix,
ages, findings. It reads record batches one at a time and keeps only counts, so a manifest of
millions of rows is summarised in bounded memory. What is shown of it lives with whoever shows
it: the plan table (`cohort_summary`), `chexforge inspect` (`label_counts`), the dataset card
(export/card.py) and the report's realised side (evaluate/report_charts.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..contracts.backends import backend_info
from ..contracts.vocabulary import FINDING_NAMES, NO_FINDING

BATCH_ROWS = 8192
COLUMNS = ("cohort", "status", "sex", "age", "view", *FINDING_NAMES)


def _add_counts(into: dict, values: pd.Series) -> None:
    # value_counts(sort=False) lists values in the order they first appear; adding new keys at the
    # end keeps `into` in first-seen order over the whole stream, whatever the batch size.
    for key, n in values.value_counts(sort=False).items():
        into[key] = into.get(key, 0) + int(n)


@dataclass
class CohortTally:
    """Counts over one cohort's counted rows (status ok in a manifest; every row of a job table)."""

    n: int = 0
    failed: int = 0  # rows with a status other than ok: not in any count below
    sex: dict[str, int] = field(default_factory=dict)  # first-seen order
    view: dict[str, int] = field(default_factory=dict)  # first-seen order
    ages: dict[int, int] = field(default_factory=dict)  # age in years → rows, rows without an age left out
    findings: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINDING_NAMES, 0))  # rows with it

    def add(self, rows: pd.DataFrame) -> None:
        self.n += len(rows)
        _add_counts(self.sex, rows["sex"])
        _add_counts(self.view, rows["view"])
        _add_counts(self.ages, rows["age"].dropna().astype(int))
        present = [f for f in FINDING_NAMES if f in rows.columns]
        # "with it" is any non-zero label; a missing label is no finding
        for f, k in rows[present].fillna(0).ne(0).sum().items():
            self.findings[f] += int(k)

    def views_by_count(self) -> list[tuple[str, int]]:
        """Most common first; ties in first-seen order (sorted() is stable)."""
        return sorted(self.view.items(), key=lambda kv: -kv[1])

    def age_median_range(self) -> tuple[int, int, int] | None:
        """(median, youngest, oldest) of the rows with an age, or None when none has one. The median
        is the middle age, or the lower of the two middle ones for an even count: always an age an
        image in the cohort has, and exact from counts alone."""
        if not self.ages:
            return None
        ages = sorted(self.ages)
        cum = np.cumsum([self.ages[a] for a in ages])
        median = ages[int(np.searchsorted(cum, (cum[-1] + 1) // 2))]
        return median, ages[0], ages[-1]


@dataclass
class Composition:
    """Per cohort, in the order cohorts first appear (any status), their `CohortTally`."""

    cohorts: dict[str, CohortTally] = field(default_factory=dict)

    @classmethod
    def of(cls, data: pa.Table | pa.RecordBatch | Iterable[pa.RecordBatch]) -> Composition:
        comp = cls()
        for batch in record_batches(data):
            comp.add(batch)
        return comp

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        df = batch.select([c for c in COLUMNS if c in batch.schema.names]).to_pandas()
        counted = pd.Series(ok_mask(batch).to_numpy(zero_copy_only=False), index=df.index)
        for cohort, rows in df.groupby("cohort", sort=False):
            tally = self.cohorts.setdefault(cohort, CohortTally())
            ok = counted[rows.index]
            tally.failed += int((~ok).sum())
            tally.add(rows[ok])

    def counted(self) -> Iterator[tuple[str, CohortTally]]:
        """The cohorts with at least one counted row: those the card and tables list."""
        return ((name, t) for name, t in self.cohorts.items() if t.n)


def ok_mask(data: pa.Table | pa.RecordBatch) -> pa.Array | pa.ChunkedArray:
    """The rows that made an image: status ok (a missing status is not ok). A job table has no
    status column: its rows are what is asked for, so all of them count."""
    if "status" not in data.schema.names:
        return pa.array(np.ones(data.num_rows, dtype=bool))
    return pc.fill_null(pc.equal(data.column("status"), "ok"), False)


def record_batches(data: pa.Table | pa.RecordBatch | Iterable[pa.RecordBatch]) -> Iterable[pa.RecordBatch]:
    if isinstance(data, pa.Table):
        return data.to_batches(max_chunksize=BATCH_ROWS)
    if isinstance(data, pa.RecordBatch):
        return [data]
    return data


def cohort_summary(table: pa.Table) -> list[dict]:
    """Per cohort: count, view/sex mix, age median and range, prevalence of each present finding."""
    rows = []
    for cohort, t in Composition.of(table).counted():
        rows.append({
            "cohort": cohort,
            "count": t.n,
            "views": {k: round(v / t.n, 3) for k, v in t.views_by_count()},
            "female": round(t.sex.get("F", 0) / t.n, 3),
            "age": t.age_median_range() or ("-", "-", "-"),
            "findings": {f: round(k / t.n, 3) for f, k in t.findings.items() if f != NO_FINDING and k},
        })
    return rows


def label_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """cohort → finding → number of images with it."""
    return {cohort: {f: k for f, k in t.findings.items() if k} for cohort, t in Composition.of(table).counted()}


def estimate_seconds(table: pa.Table, backend: str, device: str = "cpu") -> float | None:
    """Rough wall time on one device, from the backend's typical seconds per 256² image."""
    per = backend_info(backend).seconds_per_image.get(device)
    if per is None or table.num_rows == 0:
        return None
    sizes = table.column("size").to_numpy().astype(float)
    return float(per * ((sizes / 256.0) ** 2).sum())
