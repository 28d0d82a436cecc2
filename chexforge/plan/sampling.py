"""Vectorised sampling of demographics and findings from a cohort's distributions."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
from scipy.special import ndtr, ndtri

from ..contracts.jobs import laterality_column, severity_column
from ..contracts.vocabulary import (
    BY_NAME,
    LATERAL_FINDINGS,
    NO_FINDING,
    SEVERITIES,
    SEVERITY_FINDINGS,
)
from ..contracts.vocabulary import FINDINGS as VOCAB
from ..recipe.schema import Age, Cohort, FindingSpec, parse_age_bin


def category_index(weights: dict[str, float], u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw: for each uniform in `u`, the index of the chosen category."""
    cdf = np.cumsum(np.fromiter(weights.values(), dtype=np.float64))
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(weights) - 1)


def categorical(weights: dict[str, float], u: np.ndarray, present: np.ndarray | None = None) -> pa.Array:
    """Inverse-CDF draw from `weights` → string array (null where `present` is False).

    Built as a dictionary array and decoded, so no Python string is made per row.
    """
    idx = pa.array(category_index(weights, u).astype(np.int32), mask=None if present is None else ~present)
    return pa.DictionaryArray.from_arrays(idx, pa.array(list(weights), pa.string())).cast(pa.string())


def ages(spec: Age, u: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Integer ages in years (int16)."""
    if spec.fixed is not None:
        out = np.full(u.shape, spec.fixed, dtype=np.float64)
    elif spec.range is not None:
        lo, hi = spec.range
        out = np.floor(lo + u * (hi - lo + 1))
    elif spec.mean is not None:
        # Truncated normal by inverse CDF: map u into [Phi(a), Phi(b)] then invert.
        a = ndtr((spec.min - 0.5 - spec.mean) / spec.sd)
        b = ndtr((spec.max + 0.5 - spec.mean) / spec.sd)
        out = np.rint(spec.mean + spec.sd * ndtri(a + u * (b - a)))
        out = np.clip(out, spec.min, spec.max)
    else:
        assert spec.bins is not None
        idx = category_index(spec.bins, u)
        lo, hi = np.array([parse_age_bin(k) for k in spec.bins], dtype=np.float64).T
        out = np.floor(lo[idx] + u2 * (hi[idx] - lo[idx] + 1))
    return out.astype(np.int16)


def default_laterality(name: str) -> dict[str, float]:
    allowed = BY_NAME[name].laterality
    if "bilateral" in allowed:  # one-sided findings are the commoner presentation
        return {"left": 0.4, "right": 0.4, "bilateral": 0.2}
    return {k: 1.0 / len(allowed) for k in allowed}


DEFAULT_SEVERITY = {s: 1.0 / len(SEVERITIES) for s in SEVERITIES}


def stream_names(cohort: Cohort) -> list[str]:
    """The Sobol' dimensions a cohort draws from, in a fixed order."""
    names = ["view", "sex", "race", "age", "age2"]
    if cohort.findings == "natural":
        from ..priors.tables import prior_findings

        names.append("natural")
        for name in prior_findings():
            names += [f"lat:{name}", f"sev:{name}"]
        return names
    for name, spec in cohort.finding_specs.items():
        if name != NO_FINDING and spec.p > 0:
            names += [f"finding:{name}", f"lat:{name}", f"sev:{name}"]
    return names


def findings(cohort: Cohort, u: Callable[[str], np.ndarray], n: int,
             demographics: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
             renderable: tuple[str, ...] = ()) -> dict[str, np.ndarray | pa.Array]:
    """0/1 columns for every vocabulary finding plus `<Finding>.laterality/.severity` columns.

    `findings: natural` draws the present findings jointly from the priors, given each job's
    (sex, age, view) in `demographics`, over the findings the backend can render."""
    cols: dict[str, np.ndarray | pa.Array] = {f.name: np.zeros(n, dtype=np.int8) for f in VOCAB}
    for name in LATERAL_FINDINGS:
        cols[laterality_column(name)] = pa.nulls(n, pa.string())
    for name in SEVERITY_FINDINGS:
        cols[severity_column(name)] = pa.nulls(n, pa.string())
    if cohort.findings == "natural":
        from ..priors.tables import natural_findings, prior_findings

        assert demographics is not None
        keep = [f for f in prior_findings() if f in renderable]
        drawn = natural_findings(*demographics, u("natural"), keep)
        specs = {name: FindingSpec() for name in drawn}
    else:
        drawn, specs = {}, cohort.finding_specs
    for name, spec in specs.items():
        if name == NO_FINDING or spec.p <= 0:
            continue
        present = drawn[name].astype(bool) if name in drawn else u(f"finding:{name}") < spec.p
        cols[name] = present.astype(np.int8)
        finding = BY_NAME[name]
        if finding.laterality:
            cols[laterality_column(name)] = categorical(
                spec.laterality or default_laterality(name), u(f"lat:{name}"), present)
        if finding.severity:
            cols[severity_column(name)] = categorical(
                spec.severity or DEFAULT_SEVERITY, u(f"sev:{name}"), present)
    any_finding = np.zeros(n, dtype=bool)
    for f in VOCAB:
        if f.name != NO_FINDING:
            any_finding |= cols[f.name].astype(bool)
    cols[NO_FINDING] = (~any_finding).astype(np.int8)
    return cols
