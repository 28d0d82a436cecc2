"""QC rules: checks on one generated Sample and its job row, and the retry policy around them.

A recipe's `qc:` (or a cohort's own, which replaces it) lists rules; an image passes a rule when
the rule's value is at least its `min`. The runtime (runtime/batch.py) regenerates a rejected job
with the next derived seed (`attempt_seed`) up to `max_attempts` generations and records every
rejection. Checks:

- `not_blank`: the image's standard deviation.
- `mask_area`: the smallest image fraction covered by the mask of a requested finding
  (0 when a requested finding has no mask).
- `finding_visible`: the smallest |mean inside − mean of a ring around it| over the masks of the
  requested findings (0 when a requested finding has no mask): a lesion that is drawn in the
  labels but not in the pixels fails.
- `classifier`: a chest X-ray classifier's probability of each requested finding and of the
  absence of each unrequested one it knows (the smallest of these). `model: xrv-densenet` is the
  torchxrayvision DenseNet-121 "all" model, used only when its weights are already in
  ~/.torchxrayvision/models_data; `model: PATH` is a TorchScript file (see docs/recipes.md) whose
  `pathologies` attribute names its outputs.
- `sex`: a TorchScript sex classifier's probability of the job's sex.
- `mask_dice`: the smallest Dice, over the classes a TorchScript segmentation model names (its
  `classes` attribute, `chexforge eval --seg-model`'s convention: qc/models.py) that the image
  has a mask for, of the model's mask (logit > 0, i.e. sigmoid > 0.5, resized to the mask's size)
  against the backend's mask: does the image show the anatomy and findings where the labels say
  (the hybrid backend's diffusion pixels against its DRR masks).

The pixel checks are numpy; torch is imported only to run a model. A model problem is never a
pass: a missing model, or a classifier whose labels name no chexforge finding, is an error when
the run starts; a model check that measures nothing for an image (no label it knows applies, or a
NaN) rejects the image. Only a pixel check of a job that requested no finding has nothing to
measure and passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..contracts.model_files import model_file, model_problem
from ..contracts.vocabulary import FINDING_NAMES, NO_FINDING
from ..errors import UserError
from ..plan import rng
from .models import Classifier, ScriptModel, dice

# A classifier that sees a requested finding may rightly also see the broader labels it implies.
IMPLIES = {
    "Nodule": {"Lung Lesion", "Lung Opacity"}, "Mass": {"Lung Lesion", "Lung Opacity"},
    "Lung Lesion": {"Lung Opacity"}, "Consolidation": {"Lung Opacity", "Pneumonia"},
    "Pneumonia": {"Lung Opacity", "Consolidation"}, "Atelectasis": {"Lung Opacity"},
    "Edema": {"Lung Opacity"}, "Cardiomegaly": {"Enlarged Cardiomediastinum"},
}


def attempt_seed(seed: int, attempt: int) -> int:
    """The seed of a job's `attempt`-th generation (1-based): the job's own seed first, then
    counter-based draws from it (splitmix64 over (job seed, attempt)), never global state."""
    if attempt <= 1:
        return int(seed)
    drawn = rng.bits(rng.key_of("qc", int(seed)), np.array([attempt], dtype=np.uint64), "qc-seed")
    return int(drawn[0] >> np.uint64(1))  # non-negative int64, like planned seeds


def requested_findings(row: dict[str, Any]) -> list[str]:
    return [n for n in FINDING_NAMES if n != NO_FINDING and int(row.get(n) or 0) == 1]


# ---- pixel checks (pure numpy) ----------------------------------------------------------------


def not_blank(image: np.ndarray, **_: Any) -> float:
    return float(np.std(image)) if image.size else 0.0


def mask_area(image: np.ndarray, masks: dict[str, np.ndarray], findings: list[str], **_: Any) -> float | None:
    if not findings:
        return None  # nothing requested: nothing to measure
    return min(float(np.asarray(masks[f], bool).mean()) if f in masks else 0.0 for f in findings)


def _ring(mask: np.ndarray, width: int) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.binary_dilation(mask, iterations=width) & ~mask


def finding_visible(image: np.ndarray, masks: dict[str, np.ndarray], findings: list[str], **_: Any) -> float | None:
    if not findings:
        return None
    width = max(2, round(0.04 * max(image.shape)))
    values = []
    for f in findings:
        mask = np.asarray(masks.get(f, np.zeros(image.shape, bool)), bool)
        ring = _ring(mask, width) if mask.any() else mask
        if not mask.any() or not ring.any():
            values.append(0.0)
            continue
        values.append(abs(float(image[mask].mean()) - float(image[ring].mean())))
    return min(values)


# ---- model checks -----------------------------------------------------------------------------


@dataclass
class Rule:
    check: str
    threshold: float
    model: Classifier | ScriptModel | None = None


class QCRunner:
    """The QC rules of each cohort of a recipe, with their models loaded once."""

    def __init__(self, recipe: Any, device: str | None = None):
        device = device if device and device.startswith("cuda") else "cpu"
        loaded: dict[tuple[str, bool], Classifier | ScriptModel] = {}
        self.by_cohort: dict[str, tuple[int, list[Rule]]] = {}
        for cohort in recipe.cohorts:
            qc = cohort.qc if cohort.qc is not None else recipe.qc
            if qc is None or not qc.rules:
                continue
            rules = []
            for r in qc.rules:
                model = None
                if r.model is not None:
                    seg = r.check == "mask_dice"
                    if (r.model, seg) not in loaded:
                        problem = model_problem(r.model, r.check, lambda s: Path(recipe.resolve_path(s)))
                        if problem:
                            raise UserError(f"cohort {cohort.name!r}: qc {r.check}: {problem}")
                        path = model_file(r.model, lambda s: Path(recipe.resolve_path(s)))
                        loaded[(r.model, seg)] = (ScriptModel(path, f"cohort {cohort.name!r}: qc mask_dice", True, device)
                                                  if seg else Classifier(r.model, path, device))
                    model = loaded[(r.model, seg)]
                    if r.check == "classifier" and not model.findings:
                        raise UserError(f"cohort {cohort.name!r}: qc classifier: the model names no chexforge finding "
                                        f"(its `pathologies` attribute: {model.labels or 'none'}); a classifier whose "
                                        "outputs cannot be read would pass every image", model.path)
                rules.append(Rule(r.check, float(r.min), model))
            self.by_cohort[cohort.name] = (qc.max_attempts, rules)

    def __bool__(self) -> bool:
        return bool(self.by_cohort)

    def max_attempts(self, row: dict[str, Any]) -> int:
        return self.by_cohort.get(str(row["cohort"]), (1, []))[0]

    def first_failure(self, row: dict[str, Any], image: np.ndarray,
                      masks: dict[str, np.ndarray]) -> tuple[str, float | None, float] | None:
        """(rule, value, threshold) of the first rule this image fails, in the recipe's order, or
        None. The value is None when a model check measured nothing (a failure, never a pass)."""
        findings = requested_findings(row)
        for rule in self.by_cohort.get(str(row["cohort"]), (1, []))[1]:
            value = self.value(rule, row, image, masks, findings)
            if value is None and rule.model is None:
                continue  # a pixel check of a job that requested no finding: nothing to measure
            if value is None or np.isnan(value):
                return rule.check, None, rule.threshold
            if not value >= rule.threshold:
                return rule.check, round(float(value), 6), rule.threshold
        return None

    def value(self, rule: Rule, row: dict[str, Any], image: np.ndarray, masks: dict[str, np.ndarray],
              findings: list[str]) -> float | None:
        if rule.check == "not_blank":
            return not_blank(image)
        if rule.check == "mask_area":
            return mask_area(image, masks, findings)
        if rule.check == "finding_visible":
            return finding_visible(image, masks, findings)
        assert rule.model is not None
        if isinstance(rule.model, ScriptModel):
            return mask_dice(rule.model, image, masks)
        probs = rule.model([image])[0]
        if rule.check == "sex":
            if len(probs) == 1:
                p_male = float(probs[0])  # P(male)
            elif len(probs) == 2:
                p_male = float(probs[1] / max(float(probs.sum()), 1e-12))  # (P(F), P(M))
            else:
                p_male = float("nan")  # not a sex classifier: fails, never passes
            return p_male if str(row.get("sex")) == "M" else 1.0 - p_male
        return classifier_value(dict(zip(rule.model.labels, probs.tolist())), findings)


def mask_dice(model: ScriptModel, image: np.ndarray, masks: dict[str, np.ndarray]) -> float | None:
    """The smallest Dice of the model's masks against the image's masks over the classes both
    have; None when they share none (the model measured nothing)."""
    import torch

    common = [c for c in model.classes if c in masks]
    if not common:
        return None
    out = model(np.asarray(image, np.float32)[None])[0]
    if out.ndim != 4 or out.shape[0] != 1 or out.shape[1] != len(model.classes):
        raise model.bad(f"expected (N, {len(model.classes)}, h, w) mask logits (one channel per class), "
                        f"got shape {tuple(out.shape)}")
    values = []
    for name in common:
        truth = np.asarray(masks[name], bool)
        k = model.classes.index(name)
        logit = out[:, k:k + 1]
        if tuple(logit.shape[-2:]) != truth.shape:
            logit = torch.nn.functional.interpolate(logit, size=truth.shape, mode="bilinear", align_corners=False)
        values.append(dice(logit[0, 0].numpy() > 0, truth))
    return min(values)


def classifier_value(probs: dict[str, float], findings: list[str]) -> float | None:
    """The smallest of P(finding) over requested findings the model knows and 1 − P(finding) over
    the unrequested ones it knows (leaving out labels a requested finding implies)."""
    wanted = set(findings)
    implied = set().union(*(IMPLIES.get(f, set()) for f in findings)) if findings else set()
    values = []
    for label, p in probs.items():
        if label not in FINDING_NAMES or label == NO_FINDING:
            continue
        if label in wanted:
            values.append(p)
        elif label not in implied:
            values.append(1.0 - p)
    return min(values) if values else None
