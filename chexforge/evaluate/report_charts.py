"""Requested-against-realised composition for the visual report: the numbers and their charts.

For each cohort, the recipe says what was asked for (finding probabilities, sex, age and view
distributions) and the manifest's tally says what came out (rows with status ok, counted by
`plan.summary.Composition`, the same counts the dataset card prints). `composition` turns both
into fractions over the same categories; `composition_chart` draws them side by side (matplotlib,
Agg backend, PNG bytes). The HTML page shows the same numbers as tables, so it reads without images.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np

from ..contracts.vocabulary import FINDING_NAMES, NO_FINDING, SEXES, VIEWS
from ..plan.summary import CohortTally
from ..recipe.schema import Age, Cohort

AGE_BINS: tuple[tuple[str, int, int], ...] = (
    ("<20", 0, 19), ("20-29", 20, 29), ("30-39", 30, 39), ("40-49", 40, 49), ("50-59", 50, 59),
    ("60-69", 60, 69), ("70-79", 70, 79), ("80-89", 80, 89), ("90+", 90, 200),
)
PANELS = ("findings", "sex", "age", "view")
PANEL_TITLES = {"findings": "finding prevalence", "sex": "sex", "age": "age (years)", "view": "view"}
ORDER = {"findings": list(FINDING_NAMES), "sex": list(SEXES), "view": list(VIEWS), "age": [b[0] for b in AGE_BINS]}


def ordered(panel: str, keys: Iterable[str]) -> list[str]:
    """The categories of a panel in vocabulary order, any unexpected ones after, sorted."""
    keys = list(dict.fromkeys(keys))
    known = [k for k in ORDER[panel] if k in keys]
    return known + sorted(k for k in keys if k not in ORDER[panel])


def age_bin(age: int) -> str | None:
    for label, lo, hi in AGE_BINS:
        if lo <= age <= hi:
            return label
    return None


def binned_ages(counts: Iterable[tuple[int, int]]) -> dict[str, int]:
    """(age, how many) pairs → how many in each of AGE_BINS (ages outside them are left out)."""
    out = dict.fromkeys((b[0] for b in AGE_BINS), 0)
    for age, k in counts:
        label = age_bin(int(age))
        if label is not None:
            out[label] += int(k)
    return out


def requested_age_pmf(spec: Age, grid: int = 4096) -> dict[str, float]:
    """The planner's own age sampler (`plan.sampling.ages`) over an even grid of uniforms: the
    distribution the recipe asks for, binned like the realised ages."""
    from ..plan.sampling import ages

    u = (np.arange(grid) + 0.5) / grid
    u2 = (u * 0.6180339887498949 * grid) % 1.0  # a second, decorrelated even grid (bins only)
    counts = binned_ages(zip(*np.unique(ages(spec, u, u2), return_counts=True)))
    return {k: v / grid for k, v in counts.items()}


def requested(cohort: Cohort) -> dict[str, dict[str, float] | None]:
    """Fractions the recipe asks for, per panel; `findings` is None for `findings: natural`."""
    out: dict[str, dict[str, float] | None] = {
        "sex": {s: float(cohort.demographics.sex.get(s, 0.0)) for s in SEXES},
        "view": {v: float(cohort.view_mix.get(v, 0.0)) for v in VIEWS},  # a study cohort: its views alike
        "age": requested_age_pmf(cohort.demographics.age),
    }
    if cohort.findings == "natural":
        out["findings"] = None
    else:
        specs = {k: float(v.p) for k, v in cohort.finding_specs.items() if k != NO_FINDING}
        # Findings are drawn independently (docs/recipes.md), so No Finding is the chance of none.
        specs[NO_FINDING] = float(np.prod([1.0 - p for p in specs.values()])) if specs else 1.0
        out["findings"] = specs
    return out


def realised(tally: CohortTally) -> dict[str, dict[str, float]]:
    """Fractions among a cohort's status-ok manifest rows (rows without an age count in the
    denominator of the age panel, in no bin)."""
    n = tally.n
    if n == 0:
        return {p: {} for p in PANELS}
    return {
        "findings": {f: k / n for f, k in tally.findings.items()},
        "sex": {k: v / n for k, v in tally.sex.items()},
        "view": {k: v / n for k, v in tally.view.items()},
        "age": {k: v / n for k, v in binned_ages(tally.ages.items()).items()},
    }


def composition(cohort: Cohort | None, tally: CohortTally) -> dict[str, list[tuple[str, float | None, float]]]:
    """Per panel, rows of (category, requested fraction or None, realised fraction), over the
    categories either side mentions, in vocabulary order."""
    want = requested(cohort) if cohort is not None else {p: None for p in PANELS}
    got = realised(tally)
    out: dict[str, list[tuple[str, float | None, float]]] = {}
    for panel in PANELS:
        w, g = want.get(panel), got.get(panel, {})
        keys = ordered(panel, [k for k in [*(w or {}), *g] if (w and w.get(k, 0) > 0) or g.get(k, 0) > 0])
        out[panel] = [(k, None if w is None else float(w.get(k, 0.0)), float(g.get(k, 0.0))) for k in keys]
    return out


def composition_chart(title: str, comp: dict[str, list[tuple[str, float | None, float]]], n_ok: int) -> bytes:
    """One PNG: four panels of requested (outlined) against realised (filled) fractions."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # a bare Figure: no pyplot state, safe off the main thread

    n_findings = max(1, len(comp["findings"]))
    fig = Figure(figsize=(13, max(3.2, 0.32 * n_findings + 1.4)), dpi=100, layout="constrained")
    axes = fig.subplots(1, 4, width_ratios=[2.2, 0.8, 2.0, 1.0])
    for ax, panel in zip(axes, PANELS):
        rows = comp[panel]
        ax.set_title(PANEL_TITLES[panel], fontsize=10)
        ax.set_xlim(0, 1) if panel == "findings" else ax.set_ylim(0, 1.05)
        if not rows:
            ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes, color="#666")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        labels = [r[0] for r in rows]
        want = [np.nan if r[1] is None else r[1] for r in rows]
        got = [r[2] for r in rows]
        pos = np.arange(len(rows))
        h = 0.38
        if panel == "findings":
            ax.barh(pos - h / 2, want, height=h, facecolor="white", edgecolor="#444", hatch="///", label="requested")
            ax.barh(pos + h / 2, got, height=h, color="#2a6fbb", label=f"realised (n={n_ok})")
            ax.set_yticks(pos, labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel("fraction of images", fontsize=8)
        else:
            ax.bar(pos - h / 2, want, width=h, facecolor="white", edgecolor="#444", hatch="///", label="requested")
            ax.bar(pos + h / 2, got, width=h, color="#2a6fbb", label=f"realised (n={n_ok})")
            ax.set_xticks(pos, labels, fontsize=8, rotation=45 if panel == "age" else 0)
        ax.tick_params(labelsize=8)
        ax.grid(axis="x" if panel == "findings" else "y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=8, loc="outside upper right", ncols=2)
    fig.suptitle(title, fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def distributions_chart(boxes: dict, masks: dict) -> bytes | None:
    """One PNG: box plots (quartile box, median line, whiskers at the 10th and 90th percentiles,
    min and max as dots) of realised box area per label and mask area per structure or finding,
    as a percentage of the image, on a log axis (a nodule and a lung differ a hundredfold).
    The statistics are dataset_stats' quantiles, the same numbers as the tables beside it. None
    when neither has any."""
    panels = [(title, {k: v[key] if key else v for k, v in stats.get(group, {}).items()})
              for title, stats, group, key in (("realised box area per label", boxes, "per_label", "area"),
                                               ("mask area per structure or finding", masks, "per_structure", None))
              if stats.get("available")]
    panels = [(t, {k: q for k, q in rows.items() if q.get("n")}) for t, rows in panels]
    panels = [(t, rows) for t, rows in panels if rows]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    tallest = max(len(rows) for _, rows in panels)
    fig = Figure(figsize=(12, max(2.2, 0.34 * tallest + 1.2)), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, rows) in zip(axes, panels):
        def pc(x: float) -> float:
            return max(100 * x, 1e-3)  # an empty mask (0 %) sits at the axis' floor, not at log(0)

        stats = [{"label": f"{k} (n={q['n']})", "med": pc(q["median"]), "q1": pc(q["p25"]), "q3": pc(q["p75"]),
                  "whislo": pc(q["p10"]), "whishi": pc(q["p90"]), "fliers": [pc(q["min"]), pc(q["max"])]}
                 for k, q in rows.items()]
        ax.bxp(stats, orientation="horizontal", showfliers=True, patch_artist=True,
               boxprops={"facecolor": "#cfe0f3", "edgecolor": "#2a6fbb"}, medianprops={"color": "#a33"})
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("% of the image (log scale)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", alpha=0.3, which="both")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
