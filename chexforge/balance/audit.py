"""Bias audit: group sizes and finding prevalence per group, and how unequal they are.

Groups are the levels of each demographic variable (sex, age bin, race, view) and the
intersection of the variables chosen with `by`. For each group: its size, its share, its size
against the largest group (`size_ratio`), and each finding's positives and prevalence. For each
finding: the spread of its prevalence across the intersection groups (max - min, and min / max).
"""

from __future__ import annotations

import pandas as pd

from ..contracts.vocabulary import FINDING_NAMES, NO_FINDING
from ..labels.groups import (
    DEFAULT_AGE_BINS,
    VARIABLES,
    age_labels,
    check_by,
    with_groups,
)


def group_table(df: pd.DataFrame, by: list[str], findings: list[str]) -> pd.DataFrame:
    """One row per group of `by` (every combination of the levels seen, empty ones included):
    n, share, size_ratio, positives and prevalence per finding."""
    known = df.dropna(subset=by)
    if known.empty:
        return pd.DataFrame(columns=[*by, "n"])
    levels = [sorted(known[v].astype(str).unique()) for v in by]
    index = pd.MultiIndex.from_product(levels, names=by)
    keyed = known.assign(**{v: known[v].astype(str) for v in by})
    g = keyed.groupby(by, sort=True, observed=True)
    table = g.size().rename("n").reindex(index, fill_value=0).reset_index()
    for f in findings:
        table[f"pos:{f}"] = g[f].sum(min_count=0).reindex(index, fill_value=0).to_numpy()
        table[f"prev:{f}"] = g[f].mean().reindex(index).to_numpy()
    table["share"] = table["n"] / table["n"].sum()
    table["size_ratio"] = table["n"] / table["n"].max()
    return table


def audit(df: pd.DataFrame, by: list[str], findings: list[str] | None = None,
          age_bins: tuple[int, ...] = DEFAULT_AGE_BINS) -> dict:
    """The audit as plain data (JSON-ready)."""
    by = check_by(list(by))
    findings = findings or [f for f in FINDING_NAMES if f != NO_FINDING and df[f].fillna(0).sum() > 0]
    grouped = with_groups(df, age_bins)
    inter = group_table(grouped, by, findings)
    report = {
        "images": int(len(df)),
        "by": by,
        "age_bins": age_labels(age_bins),
        "excluded_unknown_group": int(len(grouped) - len(grouped.dropna(subset=by))),
        "excluded": excluded(grouped, by, findings, age_bins),
        "findings": findings,
        "groups": _rows(inter, by, findings),
        "marginals": {v: _rows(group_table(grouped, [v], findings), [v], findings)
                      for v in VARIABLES if grouped[v].notna().any()},
        "imbalance": {},
    }
    if len(inter):
        report["imbalance"]["size_min_over_max"] = float(inter["n"].min() / inter["n"].max())
        for f in findings:
            prev = inter[f"prev:{f}"].astype(float).dropna()
            report["imbalance"][f] = {"prevalence_min": float(prev.min()), "prevalence_max": float(prev.max()),
                                      "spread": float(prev.max() - prev.min()),
                                      "min_over_max": float(prev.min() / prev.max()) if prev.max() > 0 else None,
                                      "positives_min": int(inter[f"pos:{f}"].min()), "positives_max": int(inter[f"pos:{f}"].max())}
    return report


def excluded(grouped: pd.DataFrame, by: list[str], findings: list[str], age_bins: tuple[int, ...] = DEFAULT_AGE_BINS) -> list[dict]:
    """The rows that fall in no group of `by`, counted by why: younger than the first age bin,
    or a grouping variable unknown. A row missing two things is counted once, under both named
    ("under 18, sex unknown"), so the counts add up to `excluded_unknown_group`. Each entry also
    gives the finding positives and prevalence of those rows, so a table can show them beside
    the groups instead of dropping them silently."""
    reasons = pd.Series("", index=grouped.index, dtype=object)
    for v in by:
        if v == "age":
            young = grouped["age"].isna() & grouped["age_years"].notna() & (grouped["age_years"] < age_bins[0])
            why = pd.Series(None, index=grouped.index, dtype=object)
            why[young] = f"under {age_bins[0]}"
            why[grouped["age"].isna() & grouped["age_years"].isna()] = "age unknown"
        else:
            why = pd.Series(None, index=grouped.index, dtype=object)
            why[grouped[v].isna()] = f"{v} unknown"
        hit = why.notna()
        reasons[hit] = reasons[hit].str.cat(why[hit], sep=", ").str.lstrip(", ")
    out = []
    for label, rows in grouped[reasons != ""].groupby(reasons[reasons != ""], sort=True):
        out.append({"label": str(label), "n": int(len(rows)), "explanation": _why(str(label), age_bins),
                    "positives": {f: int(rows[f].fillna(0).sum()) for f in findings},
                    "prevalence": {f: (None if rows[f].notna().sum() == 0 else float(rows[f].mean())) for f in findings}})
    return sorted(out, key=lambda e: -e["n"])


def _why(label: str, age_bins: tuple[int, ...]) -> str:
    if label.startswith(f"under {age_bins[0]}"):
        lower = "0," + ",".join(str(e) for e in age_bins) if age_bins[0] > 0 else ""
        return (f"younger than the first age bin ({age_labels(age_bins)[0]})"
                + (f"; --age-bins {lower} makes them a group" if lower else ""))
    return "not recorded in the label file"


def _rows(table: pd.DataFrame, by: list[str], findings: list[str]) -> list[dict]:
    rows = []
    for r in table.to_dict("records"):
        rows.append({"group": {v: str(r[v]) for v in by}, "n": int(r["n"]), "share": float(r["share"]),
                     "size_ratio": float(r["size_ratio"]),
                     "positives": {f: int(r[f"pos:{f}"]) for f in findings},
                     "prevalence": {f: (None if pd.isna(r[f"prev:{f}"]) else float(r[f"prev:{f}"])) for f in findings}})
    return rows


def group_label(group: dict) -> str:
    return " · ".join(group.values())
