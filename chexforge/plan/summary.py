"""Plain-data summaries of a job table (or a manifest, which holds the same columns)."""

from __future__ import annotations

import pyarrow as pa

from ..contracts.backends import backend_info
from ..contracts.vocabulary import FINDING_NAMES, NO_FINDING


def cohort_summary(table: pa.Table) -> list[dict]:
    """Per cohort: count, view/sex mix, age median and range, prevalence of each present finding."""
    df = table.to_pandas()
    rows = []
    for cohort, g in df.groupby("cohort", sort=False):
        n = len(g)
        rows.append({
            "cohort": cohort,
            "count": n,
            "views": {k: round(v / n, 3) for k, v in g["view"].value_counts().items()},
            "female": round(float((g["sex"] == "F").mean()), 3),
            "age": (int(g["age"].median()), int(g["age"].min()), int(g["age"].max())),
            "findings": {f: round(float(g[f].mean()), 3) for f in FINDING_NAMES if f != NO_FINDING and g[f].any()},
        })
    return rows


def label_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """cohort → finding → number of images with it."""
    df = table.to_pandas()
    out: dict[str, dict[str, int]] = {}
    for cohort, g in df.groupby("cohort", sort=False):
        out[cohort] = {f: int(g[f].sum()) for f in FINDING_NAMES if g[f].any()}
    return out


def estimate_seconds(table: pa.Table, backend: str, device: str = "cpu") -> float | None:
    """Rough wall time on one device, from the backend's typical seconds per 256² image."""
    per = backend_info(backend).seconds_per_image.get(device)
    if per is None or table.num_rows == 0:
        return None
    sizes = table.column("size").to_numpy().astype(float)
    return float(per * ((sizes / 256.0) ** 2).sum())
