"""Reading and sampling the priors (vectorised; the planner calls these).

- `natural_findings`: findings drawn jointly from the real co-occurrence of the stratum (sex ×
  age bin × view) each job belongs to, restricted to the findings a backend renders (the
  distribution of the others is summed out, so co-occurrence among the kept ones is exact).
- `sample_boxes`: boxes from the real box geometry of a finding (centre and size histograms),
  on the side its laterality asks for.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

DATA = Path(__file__).resolve().parent / "data"


@lru_cache(maxsize=1)
def meta() -> dict:
    return json.loads((DATA / "meta.json").read_text())


@lru_cache(maxsize=1)
def cooccurrence() -> pd.DataFrame:
    return pd.read_parquet(DATA / "cooccurrence.parquet")


@lru_cache(maxsize=1)
def box_priors() -> dict:
    return json.loads((DATA / "boxes.json").read_text())


def prior_findings() -> list[str]:
    return list(meta()["findings_bit_order"])


def stratum_keys(sex: np.ndarray, age: np.ndarray, view: np.ndarray) -> pd.DataFrame:
    """Map jobs onto the prior's strata: unknown sex → M, age below the first bin → first bin,
    lateral views → PA (the prior is built from frontal images)."""
    bins = meta()["age_bins"]
    edges = [int(b.rstrip("+").split("-")[0]) for b in bins]
    idx = np.clip(np.searchsorted(edges, age.astype(float), side="right") - 1, 0, len(bins) - 1)
    return pd.DataFrame({"sex": np.where(sex == "F", "F", "M"), "age_bin": np.array(bins, dtype=object)[idx],
                         "view": np.where(view == "AP", "AP", "PA")})


def natural_findings(sex: np.ndarray, age: np.ndarray, view: np.ndarray, u: np.ndarray,
                     keep: list[str]) -> dict[str, np.ndarray]:
    """0/1 arrays per kept finding, one draw per job from its stratum's joint distribution."""
    order = prior_findings()
    keep_bits = sum(1 << i for i, f in enumerate(order) if f in keep)
    co = cooccurrence().assign(mask=lambda d: d["mask"] & keep_bits)
    co = co.groupby(["sex", "age_bin", "view", "mask"], as_index=False)["count"].sum()
    keys = stratum_keys(sex, age, view)
    bits = np.zeros(len(u), dtype=np.int64)
    for (s, a, v), rows in keys.groupby(["sex", "age_bin", "view"]).groups.items():
        table = co[(co.sex == s) & (co.age_bin == a) & (co.view == v)]
        if table.empty:
            continue
        cdf = np.cumsum(table["count"].to_numpy(dtype=float))
        pick = np.searchsorted(cdf / cdf[-1], u[rows], side="right").clip(0, len(cdf) - 1)
        bits[rows] = table["mask"].to_numpy()[pick]
    return {f: ((bits >> i) & 1).astype(np.int8) for i, f in enumerate(order) if f in keep}


def joint_distribution(keep: list[str], sex: str, age_bin: str, view: str) -> pd.Series:
    """P(combination of kept findings | stratum) from the prior (for tests and docs)."""
    order = prior_findings()
    keep_bits = sum(1 << i for i, f in enumerate(order) if f in keep)
    co = cooccurrence()
    t = co[(co.sex == sex) & (co.age_bin == age_bin) & (co.view == view)].assign(mask=lambda d: d["mask"] & keep_bits)
    s = t.groupby("mask")["count"].sum()
    return s / s.sum()


def has_boxes(finding: str) -> bool:
    return finding in box_priors()["findings"]


def sample_boxes(finding: str, side: np.ndarray, u: np.ndarray) -> np.ndarray:
    """(n, 4) normalised x0, y0, x1, y1. `side`: 'left' (patient's left = image right), 'right',
    or None for any. `u`: (n, 4) uniforms."""
    p = box_priors()
    h = p["findings"][finding]
    centre = np.asarray(h["centre_yx"], dtype=float)
    size = np.asarray(h["size_hw_log"], dtype=float)
    cb, sb = p["centre_bins"], p["size_bins"]
    lo, hi = p["size_log_range"]
    out = np.zeros((len(side), 4))
    for which in ("left", "right", None):
        rows = np.flatnonzero(side == which) if which is not None else np.flatnonzero(pd.isna(side))
        if len(rows) == 0:
            continue
        c = centre.copy()
        if which == "left":  # patient's left is the image's right half
            c[:, : cb // 2] = 0
        elif which == "right":
            c[:, cb // 2:] = 0
        if c.sum() == 0:  # no real box on that side: mirror the other side's geometry
            c = centre[:, ::-1].copy() if which else centre
        cell = np.searchsorted(np.cumsum(c.ravel()) / c.sum(), u[rows, 0], side="right").clip(0, c.size - 1)
        cy, cx = np.divmod(cell, cb)
        scell = np.searchsorted(np.cumsum(size.ravel()) / size.sum(), u[rows, 1], side="right").clip(0, size.size - 1)
        sh, sw = np.divmod(scell, sb)
        frac = np.modf(u[rows, 2:] * 997.0)[0]  # position inside the chosen cells, from the same draws
        x = (cx + frac[:, 0]) / cb
        y = (cy + frac[:, 1]) / cb
        w = np.exp(lo + (sw + frac[:, 1]) * (hi - lo) / sb)
        hgt = np.exp(lo + (sh + frac[:, 0]) * (hi - lo) / sb)
        out[rows] = np.stack([x - w / 2, y - hgt / 2, x + w / 2, y + hgt / 2], 1)
    out = out.clip(0, 1)
    out[:, 2] = np.maximum(out[:, 2], out[:, 0] + 1e-3)
    out[:, 3] = np.maximum(out[:, 3], out[:, 1] + 1e-3)
    return out.clip(0, 1)
