"""Adherence: does the image show what the job asked for? Only with models already on disk.

Findings: torchxrayvision's DenseNet-121 ('all') scores each generated image; AUROC per finding
of those scores against the requested 0/1 labels (Mann–Whitney). Sex/age prediction and box/mask
agreement use local TorchScript models the user passes (--sex-model, --age-model, --seg-model,
--det-model; conventions below); chexforge ships none and downloads none, so without one an entry
says {"available": false, "why": ...} naming the flag.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from ..contracts.model_files import XRV_WEIGHTS
from ..errors import UserError
from ..qc.models import DEFAULT_INPUT, ScriptModel, dice  # noqa: F401 - eval's names for them


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve via the rank-sum statistic; None when one class is absent."""
    pos, neg = labels == 1, labels == 0
    n1, n0 = int(pos.sum()), int(neg.sum())
    if n1 == 0 or n0 == 0:
        return None
    r = rankdata(scores[pos | neg])
    return float((r[pos[pos | neg]].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def findings_adherence(images: np.ndarray, labels: pd.DataFrame | None) -> dict:
    from ..qc.models import load_xrv_densenet
    from .features import xrv_features

    if labels is None:
        return {"available": False, "why": "the generated set has no requested findings (not a chexforge output folder)"}
    try:
        model = load_xrv_densenet()
    except UserError as e:
        return {"available": False, "why": e.line()}
    with torch.no_grad():
        x = torch.from_numpy(images)[:, None].float()
        scores = torch.cat([torch.sigmoid(model.classifier(xrv_features(model, x[i:i + 16])))
                            for i in range(0, len(x), 16)]).numpy()
    per = {}
    for k, name in enumerate(model.pathologies):
        vocab = name  # torchxrayvision spells findings as the vocabulary does
        if not name or vocab not in labels:
            continue
        a = auroc(scores[:, k], labels[vocab].to_numpy())
        per[vocab] = {"auroc": a, "positives": int((labels[vocab] == 1).sum())} if a is not None else \
            {"auroc": None, "why": "needs both requested-positive and requested-negative images"}
    vals = [v["auroc"] for v in per.values() if v["auroc"] is not None]
    return {"available": True, "model": f"torchxrayvision {XRV_WEIGHTS['xrv-densenet']}", "per_finding": per,
            "mean_auroc": float(np.mean(vals)) if vals else None}


# ---- user-supplied TorchScript models: conventions and loader in chexforge/qc/models.py ------------


def _missing(flag: str, what: str) -> dict:
    return {"available": False, "why": f"no {what} model given (pass {flag} PATH, a local TorchScript file); "
            "chexforge ships none and never downloads one"}


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def sex_adherence(model: ScriptModel, images: np.ndarray, sex: list | None, cohorts: list[str] | None) -> dict:
    """Accuracy and AUROC of P(female) against the requested sex (F/M), overall and per cohort."""
    if sex is None:
        return {"available": False, "why": "the generated set has no requested sex (not a chexforge output folder)"}
    y = torch.cat(model(images)) if len(images) else torch.zeros(0, 2)
    if y.ndim != 2 or y.shape[1] != 2 or y.shape[0] != len(images):
        raise model.bad(f"expected (N, 2) logits for (female, male), got shape {tuple(y.shape)}")
    p_f = torch.softmax(y, dim=1)[:, 0].numpy()
    req = np.array([1 if s == "F" else 0 if s == "M" else -1 for s in sex])
    cohorts = cohorts or ["all"] * len(req)

    def score(sel: np.ndarray) -> dict:
        sel = sel & (req >= 0)
        if not sel.any():
            return {"images": 0, "accuracy": None, "auroc": None}
        return {"images": int(sel.sum()), "accuracy": float(((p_f[sel] >= 0.5) == (req[sel] == 1)).mean()),
                "auroc": auroc(p_f[sel], req[sel])}

    return _overall_and_per_cohort(score, cohorts, model, "no generated image requested sex F or M")


def age_adherence(model: ScriptModel, images: np.ndarray, age: list | None, cohorts: list[str] | None) -> dict:
    """MAE (years) and Pearson r of the predicted age against the requested age."""
    if age is None:
        return {"available": False, "why": "the generated set has no requested age (not a chexforge output folder)"}
    y = torch.cat(model(images)) if len(images) else torch.zeros(0)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.shape[0] != len(images):
        raise model.bad(f"expected (N,) or (N, 1) ages in years, got shape {tuple(y.shape)}")
    pred = y.numpy().astype(float)
    req = np.array([np.nan if a is None or pd.isna(a) else float(a) for a in age])
    cohorts = cohorts or ["all"] * len(req)

    def score(sel: np.ndarray) -> dict:
        sel = sel & ~np.isnan(req)
        if not sel.any():
            return {"images": 0, "mae": None, "pearson_r": None}
        return {"images": int(sel.sum()), "mae": float(np.abs(pred[sel] - req[sel]).mean()),
                "pearson_r": _pearson(pred[sel], req[sel])}

    return _overall_and_per_cohort(score, cohorts, model, "no generated image has a requested age")


def _overall_and_per_cohort(score, cohorts: list[str], model: ScriptModel, why_none: str) -> dict:
    """`score(selection)` over all images and per cohort; unavailable when no image was scored."""
    per = {c: score(np.array([x == c for x in cohorts])) for c in sorted(set(cohorts))}
    overall = score(np.ones(len(cohorts), bool))
    if overall["images"] == 0:
        return {"available": False, "why": why_none}
    return {"available": True, "model": str(model.path), **overall, "per_cohort": per}


def seg_adherence(model: ScriptModel, images: np.ndarray, masks: list | None, root: str | Path) -> dict:
    """Dice of the model's masks against the dataset's own masks, for every class both have; the
    model's logits are resized to each mask's resolution and thresholded at 0."""
    from ..contracts.images import read_mask

    if masks is None:
        return {"available": False, "why": "the generated set has no masks (not a chexforge output folder)"}
    outs = torch.cat(model(images)) if len(images) else torch.zeros(0, len(model.classes), 1, 1)
    if outs.ndim != 4 or outs.shape[0] != len(images) or outs.shape[1] != len(model.classes):
        raise model.bad(f"expected (N, {len(model.classes)}, h, w) mask logits (one channel per class), "
                        f"got shape {tuple(outs.shape)}")
    root = Path(root)
    scores: dict[str, list[float]] = {}
    for i, entries in enumerate(masks):
        for m in entries if entries is not None else []:
            name = m["name"]
            if name not in model.classes:
                continue
            truth = read_mask(root / m["path"])
            logit = outs[i:i + 1, model.classes.index(name):model.classes.index(name) + 1]
            if tuple(logit.shape[-2:]) != truth.shape:
                logit = torch.nn.functional.interpolate(logit, size=truth.shape, mode="bilinear", align_corners=False)
            scores.setdefault(name, []).append(dice(logit[0, 0].numpy() > 0, truth))
    if not scores:
        have = sorted({m["name"] for e in masks if e is not None for m in e})
        return {"available": False, "why": f"no class of the model ({', '.join(model.classes)}) is among the "
                f"dataset's masks ({', '.join(have) or 'none written; set output.masks: true'})"}
    per = {k: {"dice": float(np.mean(v)), "masks": len(v)} for k, v in sorted(scores.items())}
    return {"available": True, "model": str(model.path), "per_class": per,
            "mean_dice": float(np.mean([v["dice"] for v in per.values()]))}


def iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def det_adherence(model: ScriptModel, images: np.ndarray, boxes: list | None, threshold: float = 0.3) -> dict:
    """Box hit rate: the fraction of the dataset's realised boxes matched by a predicted box of the
    same label with IoU ≥ threshold (a predicted box may match several true boxes)."""
    if boxes is None:
        return {"available": False, "why": "the generated set has no realised boxes (not a chexforge output folder)"}
    outs = model(images)
    for y in outs:
        if y.ndim != 3 or y.shape[2] != 5:
            raise model.bad(f"expected (N, K, 5) rows (x0, y0, x1, y1, class index), got shape {tuple(y.shape)}")
    rows = [r for y in outs for r in y.numpy()]
    if len(rows) != len(images):
        raise model.bad(f"returned boxes for {len(rows)} images, not {len(images)}")
    hits: dict[str, list[int]] = {}
    for pred, truth in zip(rows, boxes):
        found = [(model.classes[int(r[4])], r[:4].tolist()) for r in pred if 0 <= int(r[4]) < len(model.classes)]
        for b in truth if truth is not None else []:
            t = (b["x0"], b["y0"], b["x1"], b["y1"])
            hit = any(lab == b["label"] and iou(t, p) >= threshold for lab, p in found)
            hits.setdefault(b["label"], []).append(int(hit))
    if not hits:
        return {"available": False, "why": "the generated set has no realised boxes to match"}
    per = {k: {"hit_rate": float(np.mean(v)), "boxes": len(v)} for k, v in sorted(hits.items())}
    allhits = [h for v in hits.values() for h in v]
    return {"available": True, "model": str(model.path), "iou": threshold, "boxes": len(allhits),
            "hit_rate": float(np.mean(allhits)), "per_label": per}


def load_models(sex_model: str | None = None, age_model: str | None = None, seg_model: str | None = None,
                det_model: str | None = None) -> dict[str, ScriptModel | None]:
    """Load the given model files up front, so a bad one fails before any image is read."""
    return {"sex": ScriptModel(sex_model, "--sex-model") if sex_model else None,
            "age": ScriptModel(age_model, "--age-model") if age_model else None,
            "segmentation": ScriptModel(seg_model, "--seg-model", True) if seg_model else None,
            "boxes": ScriptModel(det_model, "--det-model", True) if det_model else None}


def model_adherence(gen, models: dict[str, ScriptModel | None], iou_threshold: float = 0.3) -> dict:
    """The sex, age, segmentation and detection entries of `adherence` for an ImageSet."""
    rows = gen.rows

    def col(c: str) -> list | None:
        return rows[c].tolist() if rows is not None and c in rows else None

    m = models
    return {
        "sex": sex_adherence(m["sex"], gen.images, col("sex"), gen.cohorts) if m.get("sex")
        else _missing("--sex-model", "sex classifier"),
        "age": age_adherence(m["age"], gen.images, col("age"), gen.cohorts) if m.get("age")
        else _missing("--age-model", "age regressor"),
        "segmentation": seg_adherence(m["segmentation"], gen.images, col("masks"), gen.source)
        if m.get("segmentation") else _missing("--seg-model", "segmentation"),
        "boxes": det_adherence(m["boxes"], gen.images, col("realised_boxes"), iou_threshold) if m.get("boxes")
        else _missing("--det-model", "detection"),
    }
