"""The audit as a picture: group sizes (real and synthetic) and prevalence heatmaps, before and after."""

from __future__ import annotations

import io

import numpy as np

from .audit import group_label


def audit_chart(before: dict, after: dict | None = None, title: str = "") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [group_label(g["group"]) for g in before["groups"]]
    findings = before["findings"]
    n_real = np.array([g["n"] for g in before["groups"]], dtype=float)
    panels = 3 if after else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 + 4.2 * panels, max(4, 0.32 * len(groups) + 2)),
                             gridspec_kw={"width_ratios": [1.1] + [1.4] * (panels - 1)})
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
    for k, (rep, name) in enumerate([(before, "prevalence before")] + ([(after, "prevalence after")] if after else [])):
        rows = {group_label(g["group"]): g["prevalence"] for g in rep["groups"]}
        grid = np.array([[rows.get(lbl, {}).get(f, np.nan) for f in findings] for lbl in groups], dtype=float)  # None: no image
        axp = axes[1 + k]
        im = axp.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.05, np.nanmax(grid) if grid.size else 1))
        axp.set_xticks(range(len(findings)), findings, rotation=60, ha="right", fontsize=8)
        axp.set_yticks(y, groups if k == 0 and not after else [""] * len(groups), fontsize=8)
        axp.set_title(name)
        fig.colorbar(im, ax=axp, fraction=0.04)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
