"""Demographic groups of a tidy label table: age bins and the grouping variables.

Shared by the bias audit and balance (balance/), the priors (priors/build.py) and evaluation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import UserError

VARIABLES = ("sex", "age", "race", "view")
DEFAULT_AGE_BINS = (18, 40, 60, 80)  # adults; younger patients fall outside the groups (reported)


def age_labels(edges: tuple[int, ...]) -> list[str]:
    out = []
    for lo, hi in zip(edges, edges[1:]):
        out.append(f"{lo}-{hi - 1}")
    out.append(f"{edges[-1]}+")
    return out


def parse_age_bins(text: str | None) -> tuple[int, ...]:
    if not text:
        return DEFAULT_AGE_BINS
    try:
        edges = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--age-bins takes increasing whole years like 0,18,40,60,80; got {text!r}") from None
    if list(edges) != sorted(set(edges)) or edges[0] < 0:
        raise UserError(f"--age-bins must increase from 0 or more; got {text!r}")
    return edges


def with_groups(df: pd.DataFrame, age_bins: tuple[int, ...] = DEFAULT_AGE_BINS) -> pd.DataFrame:
    """Add the grouping columns: `age` becomes its bin label (the years stay in `age_years`)."""
    out = df.copy()
    out["age_years"] = df["age"]
    labels = age_labels(age_bins)
    idx = np.searchsorted(np.array(age_bins), df["age"].to_numpy(dtype=float), side="right") - 1
    out["age"] = pd.Series(np.where((idx >= 0) & df["age"].notna().to_numpy(), np.array(labels, dtype=object)[idx.clip(0)], None),
                           index=df.index, dtype=object)
    return out


def check_by(by: list[str]) -> list[str]:
    bad = [v for v in by if v not in VARIABLES]
    if bad or not by:
        raise UserError(f"--by takes a comma list of {', '.join(VARIABLES)}; got {','.join(by) or 'nothing'}")
    return by
