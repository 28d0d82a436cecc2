"""Diversity: MS-SSIM (Wang et al. 2003; torchmetrics) between images of the same prompt made
from different seeds. Lower is more diverse; 1 means identical.

MS-SSIM's five scales with an 11-pixel window need images over 160 px on a side, so smaller
images are upsampled (bilinear) to 176 px before comparison.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

MIN_SIDE = 176


def ms_ssim_pairs(images: np.ndarray, pairs: list[tuple[int, int]], batch: int = 32) -> np.ndarray:
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure as ms_ssim,
    )

    x = torch.as_tensor(images, dtype=torch.float32)[:, None]
    if x.shape[-1] < MIN_SIDE or x.shape[-2] < MIN_SIDE:
        x = F.interpolate(x, (MIN_SIDE, MIN_SIDE), mode="bilinear", align_corners=False)
    out = []
    for i in range(0, len(pairs), batch):
        a, b = zip(*pairs[i:i + batch])
        v = ms_ssim(x[list(a)], x[list(b)], data_range=1.0, reduction="none", normalize="relu")
        out.append(v.reshape(-1))
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def group_pairs(groups: list[str], seeds: list[int] | None, max_pairs: int = 2000) -> list[tuple[int, int]]:
    """Every pair of images sharing a group (a prompt) with different seeds, at most max_pairs
    (evenly spaced over the full list, so the cut is deterministic)."""
    by: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    pairs = [(a, b) for idx in by.values() for a, b in itertools.combinations(idx, 2)
             if seeds is None or seeds[a] != seeds[b]]
    if len(pairs) > max_pairs:
        pairs = [pairs[i] for i in np.linspace(0, len(pairs) - 1, max_pairs).round().astype(int)]
    return pairs


def diversity(images: np.ndarray, groups: list[str] | None, seeds: list[int] | None, by: str) -> dict:
    if groups is None:
        return {"available": False, "why": f"the generated set has no {by} per image (not a chexforge output folder)"}
    pairs = group_pairs(groups, seeds)
    if not pairs:
        return {"available": False, "why": f"no {by} is shared by two images with different seeds "
                f"(try --diversity-by cohort)"}
    v = ms_ssim_pairs(images, pairs)
    return {"available": True, "ms_ssim_mean": float(v.mean()), "ms_ssim_std": float(v.std()),
            "pairs": len(pairs), "groups": len({groups[a] for a, _ in pairs}), "by": by}


def pixel_correlation_pairs(images: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Pearson correlation of the two images' pixels, per pair (1 = the same picture up to
    brightness and contrast; 0 for a flat image, which has no pattern to share)."""
    x = images.reshape(len(images), -1).astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1)
    out = np.zeros(len(pairs))
    for k, (a, b) in enumerate(pairs):
        d = norm[a] * norm[b]
        out[k] = float(x[a] @ x[b] / d) if d > 0 else 0.0
    return out


def per_cohort(images: np.ndarray, cohorts: list[str] | None, seeds: list[int] | None,
               max_pairs: int = 300) -> dict:
    """Pixel-space diversity within each cohort, with no model: mean pairwise MS-SSIM and pixel
    correlation over pairs of images of one cohort made from different seeds (at most `max_pairs`
    a cohort, evenly spaced). Lower is more diverse. A cohort is one recipe entry, so its images
    share findings and demographics by design; pairs of the same seed are left out (a study's
    views can share none anyway). `overall` averages the pairs of all cohorts."""
    if cohorts is None:
        return {"available": False, "why": "the generated set has no cohort per image (not a chexforge output folder)",
                "needs": "a chexforge output folder (its manifest names each image's cohort)"}
    out: dict[str, dict] = {}
    all_ssim, all_corr = [], []
    for cohort in dict.fromkeys(cohorts):
        idx = [i for i, c in enumerate(cohorts) if c == cohort]
        local = group_pairs(["x"] * len(idx), [seeds[i] for i in idx] if seeds is not None else None, max_pairs)
        pairs = [(idx[a], idx[b]) for a, b in local]
        if not pairs:
            out[cohort] = {"available": False, "images": len(idx),
                           "why": "fewer than two images with different seeds in this cohort"}
            continue
        s, c = ms_ssim_pairs(images, pairs), pixel_correlation_pairs(images, pairs)
        all_ssim.append(s)
        all_corr.append(c)
        out[cohort] = {"available": True, "images": len(idx), "pairs": len(pairs),
                       "ms_ssim_mean": float(s.mean()), "ms_ssim_std": float(s.std()),
                       "pixel_corr_mean": float(c.mean()), "pixel_corr_std": float(c.std())}
    if not all_ssim:
        return {"available": False, "why": "no cohort has two images made from different seeds",
                "needs": "at least two images in a cohort", "per_cohort": out}
    s, c = np.concatenate(all_ssim), np.concatenate(all_corr)
    return {"available": True, "ms_ssim_mean": float(s.mean()), "pixel_corr_mean": float(c.mean()),
            "pairs": int(len(s)), "per_cohort": out}
