"""The audit as a picture: group sizes (real and synthetic) and prevalence heatmaps, before and after.

The before and after heatmaps share one colour scale (0 to the highest prevalence in either) and
write each cell's percentage in it: with a scale per panel the same colour meant different
prevalences left and right, and a reader could not tell a kept prevalence from a changed one.
Rows that fall in no group (under the first age bin, a variable unknown) are counted in a
footnote, as the printed table lists them.
"""

from __future__ import annotations

import io

import numpy as np

from .audit import group_label


def audit_chart(before: dict, after: dict | None = None, title: str = "") -> bytes:
    """The chart as PNG bytes."""
    import matplotlib.pyplot as plt

    fig = audit_figure(before, after, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def audit_figure(before: dict, after: dict | None = None, title: str = ""):
    """The matplotlib figure (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [group_label(g["group"]) for g in before["groups"]]
    findings = before["findings"]
    n_real = np.array([g["n"] for g in before["groups"]], dtype=float)
    panels = 3 if after else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 + (0.42 * len(findings) + 1.6) * (panels - 1),
                                                 max(4, 0.34 * len(groups) + 2.6)),
                             gridspec_kw={"width_ratios": [1.0] + [max(1.2, 0.11 * len(findings))] * (panels - 1)})
    y = np.arange(len(groups))
    ax = axes[0]
    ax.barh(y, n_real, color="#4c72b0", label="real")
    if after:
        by_label = {group_label(g["group"]): g["n"] for g in after["groups"]}
        n_after = np.array([by_label.get(lbl, 0) for lbl in groups], dtype=float)
        ax.barh(y, np.maximum(n_after - n_real, 0), left=n_real, color="#dd8452", label="synthetic (planned)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, frameon=False)
    ax.set_yticks(y, groups, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.set_title("group sizes")

    reports = [(before, "prevalence before (%)")] + ([(after, "prevalence after (%)")] if after else [])
    grids = []
    for rep, _ in reports:
        rows = {group_label(g["group"]): g["prevalence"] for g in rep["groups"]}
        grids.append(np.array([[_num(rows.get(lbl, {}).get(f)) for f in findings] for lbl in groups], dtype=float))
    finite = [g[np.isfinite(g)] for g in grids if np.isfinite(g).any()]
    vmax = max(0.05, max(float(v.max()) for v in finite)) if finite else 1.0  # one scale for every panel
    cmap = matplotlib.colormaps["viridis"]
    im = None
    for k, ((_, name), grid) in enumerate(zip(reports, grids)):
        axp = axes[1 + k]
        if not findings:  # no finding has a positive: an empty grid is no picture (and warns)
            axp.set_axis_off()
            axp.set_title(name)
            axp.text(0.5, 0.5, "no finding present", ha="center", va="center", transform=axp.transAxes)
            continue
        im = axp.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=vmax)  # NaN (no image) stays blank
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):  # dark text on the light end of viridis, white on the dark end
                axp.text(j, i, f"{100 * v:.1f}", ha="center", va="center", fontsize=6.5,
                         color="black" if v / vmax > 0.6 else "white")
        axp.set_xticks(range(len(findings)), findings, rotation=60, ha="right", fontsize=8)
        axp.set_yticks(y, [""] * len(groups))
        axp.set_title(name)
    if im is not None:
        bar = fig.colorbar(im, ax=list(axes[1:]), fraction=0.03, pad=0.02)
        bar.ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{100 * v:.0f} %"))
    left = before.get("excluded") or []
    if left:
        fig.text(0.01, -0.04, "in no group (not shown): " + "; ".join(f"{e['label']} {e['n']}" for e in left),
                 fontsize=7, color="#555555", va="bottom")
    if title:
        fig.suptitle(title)
    return fig


def _num(v) -> float:
    return np.nan if v is None else float(v)
