"""`chexforge eval`: load the sets, extract features once, compute every metric, write
report/metrics.json and report/nearest_pairs.png. A metric that cannot be computed says
{"available": false, "why": ...}; none is ever estimated or made up.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__, atomic
from ..errors import UserError


@dataclass
class EvalOptions:
    reference: str | None = None
    image_root: str | None = None
    features: str = "auto"
    size: int = 224
    max_images: int | None = None
    min_per_finding: int = 10
    k: int = 5
    memorization_threshold: float = 0.95
    diversity_by: str = "prompt"
    sex_model: str | None = None
    age_model: str | None = None
    seg_model: str | None = None
    det_model: str | None = None
    iou: float = 0.3


def evaluate(generated: str | Path, out: str | Path, opt: EvalOptions) -> dict:
    from . import adherence, diversity, fidelity, memorization
    from .features import get_extractor
    from .images import load_set

    if opt.diversity_by not in ("prompt", "cohort"):
        raise UserError(f"--diversity-by takes prompt or cohort, not {opt.diversity_by!r}")
    if not 0 < opt.memorization_threshold <= 1:
        raise UserError(f"--memorization-threshold must be in (0, 1], not {opt.memorization_threshold}")
    if not 0 < opt.iou <= 1:
        raise UserError(f"--iou must be in (0, 1], not {opt.iou}")
    t0 = time.perf_counter()
    models = adherence.load_models(opt.sex_model, opt.age_model, opt.seg_model, opt.det_model)
    extractor = auto_extractor() if opt.features == "auto" else get_extractor(opt.features)
    gen = load_set(generated, opt.size, limit=opt.max_images)
    ref = load_set(opt.reference, opt.size, opt.image_root, opt.max_images) if opt.reference else None
    f_gen = extractor(gen.images) if extractor else None
    f_ref = extractor(ref.images) if extractor and ref is not None else None
    out = Path(out)

    report: dict = {
        "chexforge": __version__,
        "generated": {"source": gen.source, "kind": gen.kind, "images": len(gen)},
        "reference": {"source": ref.source, "kind": ref.kind, "images": len(ref), "notes": ref.notes} if ref else None,
        "features": {"name": extractor.name, "perceptual": extractor.perceptual, "note": extractor.note,
                     "dim": int(f_gen.shape[1])} if extractor else {"name": None, "perceptual": False, "note": NO_FEATURES},
        "image_size": opt.size,
    }
    if ref is None or extractor is None:
        why = "no --reference given" if ref is None else NO_FEATURES
        report["fidelity"] = {"available": False, "why": why}
        report["memorization"] = {"available": False, "why": why}
    elif len(ref) < 2 or len(gen) < 2:
        report["fidelity"] = {"available": False, "why": "FID, KID and k-NN radii need at least 2 images a side"}
        report["memorization"] = _memorization(memorization, gen, ref, f_gen, f_ref, opt, out)
    else:
        kid_mean, kid_std = fidelity.kid(f_ref, f_gen)
        report["fidelity"] = {
            "available": True, **fidelity.fid_entry(f_ref, f_gen), "kid_mean": kid_mean, "kid_std": kid_std,
            **fidelity.prdc(f_ref, f_gen, opt.k),
            "per_finding_fid": fidelity.per_finding_fid(f_ref, f_gen, ref.labels, gen.labels, opt.min_per_finding),
            "min_per_finding": opt.min_per_finding,
        }
        report["memorization"] = _memorization(memorization, gen, ref, f_gen, f_ref, opt, out)
    groups = gen.prompts if opt.diversity_by == "prompt" else gen.cohorts
    report["diversity"] = diversity.diversity(gen.images, groups, gen.seeds, opt.diversity_by)
    report["adherence"] = {"findings": adherence.findings_adherence(gen.images, gen.labels),
                           **adherence.model_adherence(gen, models, opt.iou)}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    atomic.write_text(out / "metrics.json", json.dumps(report, indent=1))
    return report


NO_FEATURES = ("no perceptual feature extractor on disk: put torchxrayvision's DenseNet weights in "
               "~/.torchxrayvision/models_data, or pass --features raddino=DIR | inception | PATH "
               "(--features random for a smoke run that is not perceptual)")


def auto_extractor():
    """`--features auto`: torchxrayvision's DenseNet when its weights are on disk, else none (the
    feature metrics then say why, rather than a number from features that mean nothing)."""
    from .features import get_extractor, xrv_weights

    return get_extractor("xrv-densenet") if xrv_weights() is not None else None


def _memorization(memorization, gen, ref, f_gen, f_ref, opt: EvalOptions, out: Path) -> dict:
    m = memorization.screen(f_ref, f_gen, gen.ids, ref.ids, opt.memorization_threshold)
    png = memorization.pairs_figure(gen.images, ref.images, m["nearest"], m["cosine"], opt.memorization_threshold)
    atomic.write_bytes(out / "nearest_pairs.png", png)
    m["figure"] = "nearest_pairs.png"
    del m["nearest"], m["cosine"]
    return m
