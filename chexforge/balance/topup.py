"""The top-up: how many synthetic images each group (× finding) needs, and the recipe that makes them.

Targets:
- `parity`: every group as large as the largest (with `per_finding`: as many positives of each
  finding as the group with the most).
- `reference`: the groups in the proportions of a reference (a CSV of shares, or another label
  file whose own group mix is the target), at the smallest total that needs no group to shrink.

A budget caps the total. Below the need it is spent by water-filling: the groups furthest
below their target (relative to it) are raised first, to a common level; the last few images go
one each, in a fixed order, so a budgeted plan is within one image of level. `min_per_cell`
raises every group (× finding) to at least that many.

The recipe has one cohort per group (× finding) with the group's demographics fixed and the
exact count; the rest of each cohort's demographics and its findings follow the real data
(restricted to what the chosen backend renders; the report lists what it cannot). Findings
follow the group's own real prevalence (`prevalence="group"`, the default), so topping a group up
leaves its prevalence where it was; `prevalence="pooled"` gives every cohort the prevalence of all
groups together, which moves each group toward the pooled mix (useful only to make the groups'
prevalences alike, knowing that it changes what each group looks like).
"""

from __future__ import annotations

import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..contracts.backends import backend_info
from ..contracts.vocabulary import FINDING_NAMES, NO_FINDING
from ..errors import UserError
from ..labels.groups import DEFAULT_AGE_BINS, age_labels, check_by, with_groups
from ..recipe.loader import parse_recipe, yaml_writer
from ..recipe.schema import MAX_NAME
from .audit import group_table


@dataclass
class BalanceSpec:
    by: list[str]
    target: str = "parity"  # parity | reference
    reference: pd.DataFrame | None = None  # by columns + share
    per_finding: bool = False
    findings: list[str] | None = None
    min_per_cell: int = 0
    budget: int | None = None
    backend: str = "drr"
    model: Path | None = None
    size: int = 256
    seed: int = 0
    age_bins: tuple[int, ...] = DEFAULT_AGE_BINS
    name: str = "balance"
    prevalence: str = "group"  # group: each cohort carries its group's own prevalence; pooled: the overall one
    notes: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)  # group label ("F · 0-17") → why it gets no top-up


def fill(counts: np.ndarray, targets: np.ndarray, budget: int | None, weights: np.ndarray | None = None) -> np.ndarray:
    """Integer additions that raise `counts` toward `targets`, at most `budget` in all.

    Under a budget, cells rise to a common level of count/weight (the lowest first), capped at
    their targets; the remainder goes one each to the cells at that level, in order.
    """
    counts = np.asarray(counts, dtype=np.int64)
    targets = np.maximum(np.asarray(targets, dtype=np.int64), counts)
    need = targets - counts
    if budget is None or need.sum() <= budget:
        return need
    w = np.ones(len(counts)) if weights is None else np.asarray(weights, dtype=float)

    def used(level: float) -> np.ndarray:
        return np.clip(np.floor(np.minimum(level * w, targets)) - counts, 0, None).astype(np.int64)

    lo, hi = 0.0, float((targets / w).max())
    for _ in range(100):  # bisection on the water level
        mid = (lo + hi) / 2
        if used(mid).sum() <= budget:
            lo = mid
        else:
            hi = mid
    adds = used(lo)
    left = budget - int(adds.sum())
    order = np.lexsort((np.arange(len(counts)), (counts + adds) / w))  # lowest relative level first, then index
    for i in order:
        if left <= 0:
            break
        if counts[i] + adds[i] < targets[i]:
            adds[i] += 1
            left -= 1
    return adds


def allocate(df: pd.DataFrame, spec: BalanceSpec) -> pd.DataFrame:
    """Rows: the group's values (and `finding`), `real` (images or positives), `target`, `add`."""
    by = check_by(list(spec.by))
    grouped = with_groups(df, spec.age_bins)
    findings = spec.findings or [f for f in FINDING_NAMES if f != NO_FINDING and df[f].fillna(0).sum() > 0]
    table = group_table(grouped, by, findings)
    if table.empty:
        raise UserError(f"no image has all of {', '.join(by)} known: nothing to balance")
    shares = _shares(table, by, spec) if spec.target == "reference" else None
    if not spec.per_finding:
        real = table["n"].to_numpy()
        targets = _targets(real, shares)
        adds = fill(real, np.maximum(targets, spec.min_per_cell), spec.budget, shares)
        return table[by].assign(finding=None, real=real, target=np.maximum(targets, spec.min_per_cell), add=adds)
    blocks = []
    needs = {}
    for f in findings:
        pos = table[f"pos:{f}"].to_numpy().astype(np.int64)
        needs[f] = (pos, np.maximum(_targets(pos, shares), spec.min_per_cell))
    total_need = sum(int((t - p).clip(0).sum()) for p, t in needs.values())
    for f, (pos, targets) in needs.items():
        budget = None
        if spec.budget is not None and total_need > spec.budget:  # split the budget by need
            budget = int(spec.budget * (targets - pos).clip(0).sum() / max(total_need, 1))
        blocks.append(table[by].assign(finding=f, real=pos, target=targets, add=fill(pos, targets, budget, shares)))
    return pd.concat(blocks, ignore_index=True)


def _targets(real: np.ndarray, shares: np.ndarray | None) -> np.ndarray:
    if shares is None:
        return np.full(len(real), real.max())
    total = (real / np.maximum(shares, 1e-12)).max()
    return np.ceil(shares * total - 1e-9).astype(np.int64)


def _shares(table: pd.DataFrame, by: list[str], spec: BalanceSpec) -> np.ndarray:
    if spec.reference is None:
        raise UserError("--target reference needs --reference FILE (a CSV of shares, or a label file)")
    ref = spec.reference.copy()
    for v in by:
        if v not in ref:
            raise UserError(f"the reference has no {v!r} column (it must give the --by variables)")
        ref[v] = ref[v].astype(str)
    merged = table[by].astype(str).merge(ref[[*by, "share"]], on=by, how="left")
    if merged["share"].isna().any():
        missing = merged[merged["share"].isna()].iloc[0]
        raise UserError(f"the reference gives no share for group {' · '.join(missing[v] for v in by)}")
    shares = merged["share"].to_numpy(dtype=float)
    return shares / shares.sum()


def reference_shares(df: pd.DataFrame, by: list[str], age_bins=DEFAULT_AGE_BINS) -> pd.DataFrame:
    """A label table's own group mix, as a reference."""
    t = group_table(with_groups(df, age_bins), by, [])
    return t[by].assign(share=t["share"])


# ---- the recipe ---------------------------------------------------------------------------------


def topup_recipe(df: pd.DataFrame, alloc: pd.DataFrame, spec: BalanceSpec, source: str) -> tuple[str, dict]:
    """The recipe (YAML text, checked by the recipe loader) and plain data about it."""
    info = backend_info(spec.backend)
    real = with_groups(df, spec.age_bins)
    findings_all = [f for f in FINDING_NAMES if f != NO_FINDING and df[f].fillna(0).sum() > 0]
    renderable = [f for f in findings_all if f in info.findings]
    skipped = [f for f in findings_all if f not in info.findings]
    if spec.per_finding:
        dropped = alloc[~alloc["finding"].isin(info.findings) & (alloc["add"] > 0)]
        if len(dropped):
            spec.notes.append(f"the {spec.backend} backend cannot render {', '.join(sorted(set(dropped['finding'])))}: "
                              "those cells are left out of the recipe")
        alloc = alloc[alloc["finding"].isin(info.findings)]
    elif skipped:
        whose = "each group's own" if spec.prevalence == "group" else "the pooled (all groups')"
        spec.notes.append(f"synthetic images carry {whose} real prevalence of {', '.join(renderable) or 'no finding'}; "
                          f"the {spec.backend} backend cannot render {', '.join(skipped)}")
    cohorts, too_young, names = [], {}, set()
    for row in alloc[alloc["add"] > 0].to_dict("records"):
        group = {v: str(row[v]) for v in spec.by}
        name = _unique(_slug("_".join([*group.values()] + ([row["finding"]] if row["finding"] else []))), names)
        members = real
        for v, value in group.items():
            members = members[members[v].astype(str) == value]
        demographics = _demographics(group, real, info.ages)
        if demographics is None:  # the whole age group is outside what the backend makes
            too_young[group["age"]] = too_young.get(group["age"], 0) + int(row["add"])
            spec.left_out[" · ".join(group.values())] = (f"not in the top-up: the {spec.backend} backend makes ages "
                                                         f"{info.ages[0]}-{info.ages[1]}")
            continue
        cohort: dict = {"name": name, "count": int(row["add"]), "view": _views(group, real, members, info.views),
                        "demographics": demographics}
        if row["finding"]:
            cohort["findings"] = {row["finding"]: 1.0}
        elif renderable:
            # Each group's own prevalence by default: topping a group up at the pooled prevalence
            # moves the group's prevalence toward the pooled one (PadChest men 80+, Lung Opacity:
            # 27.7 % -> 18.9 % at parity), which is a change of the group, not a balance of it.
            # A group with no real image has no prevalence of its own: it gets the pooled one.
            source_rows = members if spec.prevalence == "group" and len(members) else real
            if spec.prevalence == "group" and not len(members):
                spec.notes.append(f"group {' · '.join(group.values())} has no real image: its top-up carries the "
                                  "pooled prevalence")
            prev = {f: round(float(np.nan_to_num(source_rows[f].mean())), 4) for f in renderable}  # NaN: uncertain left out
            cohort["findings"] = {f: p for f, p in prev.items() if p > 0}
        cohorts.append(cohort)
    if too_young:
        spec.notes.append(f"the {spec.backend} backend makes patients aged {info.ages[0]}-{info.ages[1]}: "
                          + ", ".join(f"{n} images for ages {g}" for g, n in too_young.items()) + " are left out")
        alloc = alloc[~alloc["age"].astype(str).isin(list(too_young))] if "age" in alloc else alloc
    if not cohorts:
        spec.notes.append("the data already meets the target: nothing to add")
    recipe = {"name": spec.name[:MAX_NAME].rstrip("-_.") or "balance", "description": f"Top-up for {source}: balanced by {', '.join(spec.by)} "
              f"({spec.target}{', per finding' if spec.per_finding else ''})", "seed": spec.seed,
              "backend": spec.backend}
    if spec.model is not None:
        recipe["model"] = str(spec.model)
    recipe["output"] = {"size": spec.size, "formats": ["png", "dicom"]}
    recipe["cohorts"] = cohorts
    header = (f"# Written by `chexforge balance` from {_comment_safe(source)}.\n"
              f"# {len(df)} real images; {int(alloc['add'].sum())} synthetic images in {len(cohorts)} cohorts "
              f"bring the groups ({', '.join(spec.by)}) to {spec.target}"
              f"{' per finding' if spec.per_finding else ''}{f' within a budget of {spec.budget}' if spec.budget else ''}.\n")
    # The recipe writer (block style, ASCII, keys never wrapped), not ruamel's flow style: it
    # wrapped a flow mapping's key across lines ("Pleural\n Other:"), a recipe that did not load.
    buf = io.StringIO()
    yaml = yaml_writer()
    yaml.width = sys.maxsize
    yaml.representer.add_representer(
        _FlowList, lambda r, data: r.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))
    yaml.dump(_short_lists_flow(recipe), buf)
    text = header + buf.getvalue()
    if cohorts:
        parse_recipe(text, source="balance recipe")  # it must load as any recipe does
    return text, recipe


class _FlowList(list):
    """A list written on one line: `[18, 39]`, `[png, dicom]`."""


_PLAIN_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def _short_lists_flow(value):
    """Lists of numbers or plain words as `_FlowList` (nothing in them to quote or wrap)."""
    if isinstance(value, dict):
        return {k: _short_lists_flow(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_short_lists_flow(v) for v in value]
        simple = all((isinstance(v, (int, float)) and not isinstance(v, bool)) or
                     (isinstance(v, str) and _PLAIN_WORD.fullmatch(v)) for v in items)
        return _FlowList(items) if items and simple else items
    return value


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")
    return (s or "group")[:MAX_NAME - 8].rstrip("-_.")


def _unique(name: str, taken: set[str]) -> str:
    """`name`, or `name-2`, `name-3`, ... when groups slug to the same cohort name."""
    out, k = name, 2
    while out in taken:
        out, k = f"{name}-{k}", k + 1
    taken.add(out)
    return out


def _comment_safe(text: str) -> str:
    """Text for a YAML comment: no character that YAML reads as a line break (or cannot read)."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ufeff]", "?", text)


def _bin_range(label: str) -> list[int]:
    lo, _, hi = label.partition("-")
    if label.endswith("+"):
        return [int(label[:-1]), max(int(label[:-1]), 95)]
    return [int(lo), int(hi)]


def _demographics(group: dict, real: pd.DataFrame, ages: tuple[int, int]) -> dict | None:
    """The cohort's demographics, its ages kept inside what the backend makes (`ages`); None when
    the group's age bin lies wholly outside."""
    d: dict = {}
    if "sex" in group:
        d["sex"] = group["sex"]
    elif _dist(real["sex"]):  # else no sex is known: the recipe's default
        d["sex"] = _dist(real["sex"])
    if "age" in group:
        lo, hi = _bin_range(group["age"])
        if hi < ages[0] or lo > ages[1]:
            return None
        d["age"] = {"range": [max(lo, ages[0]), min(hi, ages[1])]}
    else:
        years = real["age_years"].dropna()
        if len(years):  # else no age is known: the recipe's default ages
            lo, hi = int(max(ages[0], years.min())), int(min(ages[1], years.max()))
            sd = float(years.std()) if len(years) > 1 else 0.0
            d["age"] = {"mean": round(float(years.mean()), 1), "sd": round(max(sd, 1.0), 1), "min": lo, "max": max(lo, hi)}
    if "race" in group:
        d["race"] = group["race"]
    elif real["race"].notna().any():
        d["race"] = _dist(real["race"])
    return d


def _views(group: dict, real: pd.DataFrame, members: pd.DataFrame, allowed: tuple[str, ...]) -> dict | str:
    if "view" in group:
        if group["view"] not in allowed:
            raise UserError(f"the backend renders views {', '.join(allowed)}, not {group['view']!r}; balance by other variables")
        return group["view"]
    views = members["view"] if members["view"].isin(allowed).any() else real["view"]
    dist = _dist(views[views.isin(allowed)])
    return dist or {allowed[0]: 1.0}


def _dist(series: pd.Series) -> dict:
    counts = series.dropna().astype(str).value_counts()
    total = counts.sum()
    return {str(k): round(float(v / total), 4) for k, v in counts.items() if v > 0} if total else {}


def jobs_to_tidy(table) -> pd.DataFrame:
    """Planned synthetic jobs in the tidy label layout (for the after-audit)."""
    jobs = table.to_pandas()
    out = pd.DataFrame({"image": jobs["job_id"], "patient": jobs["job_id"], "sex": jobs["sex"],
                        "age": jobs["age"].astype(float), "race": jobs["race"], "view": jobs["view"]})
    for f in FINDING_NAMES:
        out[f] = jobs[f].astype(float)
    return out


def read_reference(path: str | Path, by: list[str], age_bins=DEFAULT_AGE_BINS, fmt: str | None = None) -> pd.DataFrame:
    """A CSV with the --by columns and `share`, or a label file whose group mix is the target."""
    from ..labels.readers import read_labels, resolve

    p = resolve(path)
    if p.suffix.lower() == ".csv":
        head = pd.read_csv(p, nrows=1)
        if "share" in head.columns:
            ref = pd.read_csv(p)
            shares = pd.to_numeric(ref["share"], errors="coerce")
            if shares.isna().any() or (shares < 0).any():
                i = int(np.flatnonzero((shares.isna() | (shares < 0)).to_numpy())[0])
                raise UserError("column 'share': expected a number >= 0", f"{p}:{i + 2}")
            return ref.assign(share=shares)
    return reference_shares(read_labels(p, fmt), by, age_bins)


def allocation_summary(alloc: pd.DataFrame, by: list[str]) -> list[dict]:
    return [{"group": {v: str(r[v]) for v in by}, "finding": r["finding"], "real": int(r["real"]),
             "target": int(r["target"]), "add": int(r["add"])} for r in alloc.to_dict("records")]


def total(alloc: pd.DataFrame) -> int:
    return int(alloc["add"].sum())


__all__ = ["BalanceSpec", "allocate", "fill", "topup_recipe", "jobs_to_tidy", "read_reference",
           "reference_shares", "allocation_summary", "total", "age_labels"]
