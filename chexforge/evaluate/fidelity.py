"""Fidelity on feature arrays: FID and KID (torchmetrics' statistics) and precision, recall,
density and coverage (Naeem et al. 2020) with k-nearest-neighbour radii.

Features come from `features.py`; the torchmetrics metrics are given a pass-through module as
their `feature` network and fed the features, so one extraction serves every metric.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
from torch import nn


class _Given(nn.Module):
    """torchmetrics' `feature` network for features already extracted: returns its input."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


ROUND_OFF = 1e-6  # relative to the size of the terms of the FID: below -ROUND_OFF × that, a negative is a bug


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017), as
    reported: see `frechet`."""
    return frechet(real, fake)[0]


def frechet(real: np.ndarray, fake: np.ndarray) -> tuple[float, float]:
    """(FID as reported, FID as computed). The distance is never negative, but the computed
    ||mu_r - mu_f||² + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^½) is a difference of large terms: a set
    against itself can come out at -1e-12. A negative within round-off of those terms
    (ROUND_OFF × their size) is reported as 0 and `chexforge eval` writes the computed value
    beside it (`fid_computed`); a larger negative is an error (a broken computation), never a
    number."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    m = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    m.update(torch.as_tensor(real, dtype=torch.float64), real=True)
    m.update(torch.as_tensor(fake, dtype=torch.float64), real=False)
    computed = float(m.compute())
    if computed >= 0:
        return computed, computed
    scale = sum(float(np.trace(np.atleast_2d(np.cov(x, rowvar=False))) + np.square(x.mean(axis=0)).sum())
                for x in (np.asarray(real, np.float64), np.asarray(fake, np.float64)))
    if computed < -ROUND_OFF * max(scale, 1e-300):
        raise ArithmeticError(f"FID computed as {computed:.6g}, below zero by more than round-off "
                              f"(terms of size {scale:.6g}): the computation is broken")
    return 0.0, computed


def fid_entry(real: np.ndarray, fake: np.ndarray) -> dict:
    """{"fid": reported} and, when round-off made it negative, {"fid_computed": computed}."""
    reported, computed = frechet(real, fake)
    return {"fid": reported} if reported == computed else {"fid": reported, "fid_computed": computed}


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel distance (Bińkowski et al. 2018): unbiased MMD² with a cubic polynomial kernel,
    mean and std over random subsets (seeded: the same inputs give the same numbers)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features": they are given, already in memory
        warnings.simplefilter("ignore", UserWarning)
        m = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=subsets, subset_size=size)
    m.update(torch.as_tensor(real, dtype=torch.float64), real=True)
    m.update(torch.as_tensor(fake, dtype=torch.float64), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std)


def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return torch.cdist(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)).numpy()


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    d = _dist(x, x)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict:
    """Precision, recall, density, coverage (Naeem et al. 2020) with k-NN balls; k is capped at
    (smallest set − 1)."""
    k = max(1, min(k, len(real) - 1, len(fake) - 1))
    r_real, r_fake = _radii(real, k), _radii(fake, k)
    d = _dist(real, fake)  # real × fake
    inside_real = d <= r_real[:, None]  # fake j inside real i's ball
    return {
        "precision": float(inside_real.any(axis=0).mean()),
        "recall": float((d <= r_fake[None, :]).any(axis=1).mean()),
        "density": float(inside_real.sum() / (k * len(fake))),
        "coverage": float((d.min(axis=1) <= r_real).mean()),
        "k": k,
    }


def per_finding_fid(real: np.ndarray, fake: np.ndarray, real_labels: pd.DataFrame | None,
                    fake_labels: pd.DataFrame | None, min_count: int) -> dict:
    """FID within each finding both sides label positive at least `min_count` times."""
    if real_labels is None or fake_labels is None:
        side = "reference" if real_labels is None else "generated"
        return {"available": False, "why": f"the {side} set has no finding labels (a plain folder of images)"}
    out = {}
    for f in [c for c in fake_labels.columns if c in real_labels.columns]:
        nr, nf = int((real_labels[f] == 1).sum()), int((fake_labels[f] == 1).sum())
        if nf == 0 and nr == 0:
            continue
        if min(nr, nf) < min_count:
            out[f] = {"available": False, "n_reference": nr, "n_generated": nf,
                      "why": f"fewer than {min_count} positive images on one side"}
        else:
            out[f] = {"available": True, "n_reference": nr, "n_generated": nf,
                      **fid_entry(real[(real_labels[f] == 1).to_numpy()], fake[(fake_labels[f] == 1).to_numpy()])}
    return out
