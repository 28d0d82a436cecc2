"""`chexforge eval`: load the sets, extract features once, compute every metric, write
report/metrics.json and report/nearest_pairs.png. A metric that cannot be computed says
{"available": false, "why": ..., "needs": ...}; none is ever estimated or made up.

Without a reference and without weights it still measures what needs neither: the dataset's
composition against its recipe, laterality and severity as requested against realised, box and
mask sizes, finding co-occurrence, timing (dataset_stats.py) and pixel-space diversity per cohort
(diversity.per_cohort). `missing` lists every metric that could not run, why, and what it needs.
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
    if opt.reference is not None and not Path(opt.reference).exists():
        # Checked first, before any model or image is read: the most common mistake (README's real/).
        raise UserError(f"--reference: no such file or folder; {REFERENCE_IS}", opt.reference)
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
                     "dim": int(f_gen.shape[1])} if extractor else {"name": None, "perceptual": False, "note": no_features()},
        "image_size": opt.size,
    }
    if ref is None or extractor is None:
        why = "; ".join(w for w in ("no --reference given" if ref is None else "",
                                    "no perceptual feature extractor on disk" if extractor is None else "") if w)
        needs = " and ".join(n for n in (REFERENCE_NEEDS if ref is None else "",
                                         features_needs() if extractor is None else "") if n)
        report["fidelity"] = {"available": False, "why": why, "needs": needs}
        report["memorization"] = {"available": False, "why": why, "needs": needs}
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
    report["pixel_diversity"] = diversity.per_cohort(gen.images, gen.cohorts, gen.seeds)
    report["adherence"] = {"findings": adherence.findings_adherence(gen.images, gen.labels),
                           **adherence.model_adherence(gen, models, opt.iou)}
    report["dataset"] = _dataset(gen.source) if gen.kind == "manifest" else {
        "available": False, "why": "a plain folder of images has no manifest or recipe to measure",
        "needs": "a chexforge output folder (manifest.parquet, recipe.yaml, masks)"}
    _add_needs(report, opt.diversity_by)
    report["missing"] = missing(report)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    atomic.write_text(out / "metrics.json", json.dumps(report, indent=1))
    return report


REFERENCE_IS = ("a reference is real images to compare with: a folder of images (PNG/JPEG/TIFF, searched "
                "recursively), another chexforge output folder, or a label CSV (CheXpert, MIMIC-CXR, NIH, PadChest) "
                "with --image-root where its image paths start; see docs/evaluate.md")
REFERENCE_NEEDS = ("a reference (--reference: a folder of real images, another chexforge output folder, or a label "
                   "CSV such as CheXpert-v1.0-small/valid.csv with --image-root at the folder its paths start from)")


def features_needs() -> str:
    """What `--features auto` needs, with the full file name and folder (never cut short)."""
    from ..contracts.model_files import XRV_MODELS, XRV_STATE_DICTS, xrv_cache_dir

    return (f"a feature extractor: torchxrayvision's DenseNet-121 weights file {XRV_MODELS['xrv-densenet']} in "
            f"{xrv_cache_dir()} (chexforge loads its state dict {XRV_STATE_DICTS['xrv-densenet']}, converted once "
            "as docs/evaluate.md shows), or --features raddino=DIR | inception | PATH "
            "(--features random for a smoke run that is not perceptual)")


def no_features() -> str:
    return "no perceptual feature extractor on disk: " + features_needs()



MODEL_NEEDS = {
    "sex": "--sex-model PATH: a local TorchScript sex classifier, (N,1,S,S) in [0,1] → (N,2) logits (female, male)",
    "age": "--age-model PATH: a local TorchScript age regressor, (N,1,S,S) in [0,1] → (N,) years",
    "segmentation": "--seg-model PATH: a local TorchScript segmenter with a `classes` attribute, → (N,C,h,w) logits",
    "boxes": "--det-model PATH: a local TorchScript detector with a `classes` attribute, → (N,K,5) boxes",
}


def _add_needs(report: dict, by: str) -> None:
    """Give every unavailable entry that lacks one a `needs`: what would make it available."""
    from ..contracts.model_files import XRV_MODELS, XRV_STATE_DICTS, xrv_cache_dir

    adh = report["adherence"]
    if not adh["findings"].get("available", True) and "needs" not in adh["findings"]:
        adh["findings"]["needs"] = (
            f"torchxrayvision's DenseNet-121 weights: the file {XRV_MODELS['xrv-densenet']} in {xrv_cache_dir()} "
            f"(chexforge loads its state dict {XRV_STATE_DICTS['xrv-densenet']}, converted once as "
            "docs/evaluate.md shows) and a chexforge output folder (requested findings)")
    for key, needs in MODEL_NEEDS.items():
        e = adh.get(key)
        if isinstance(e, dict) and e.get("available") is False:
            e.setdefault("needs", needs)
    div = report["diversity"]
    if div.get("available") is False:
        div.setdefault("needs", f"images that share a {by} and differ in seed "
                                "(pixel_diversity gives MS-SSIM per cohort without that)")
    fid = report["fidelity"]
    pff = fid.get("per_finding_fid") if fid.get("available") else None
    if isinstance(pff, dict) and pff.get("available") is False:
        pff.setdefault("needs", "finding labels on both sides: a chexforge output folder or a label CSV as --reference")


def missing(report: dict) -> list[dict]:
    """Every metric (to two levels deep: `fidelity`, `adherence.sex`, `dataset.masks`, ...) that
    could not be computed, why, and what it needs; per-finding and per-cohort entries are left to
    their parents' tables."""
    out = []

    def walk(value, path: str, depth: int) -> None:
        if not isinstance(value, dict) or depth > 2:
            return
        if value.get("available") is False:
            out.append({"metric": path, "why": value.get("why") or "no reason given", "needs": value.get("needs")})
            return
        for k, v in value.items():
            walk(v, f"{path}.{k}" if path else k, depth + 1)

    for key in ("fidelity", "memorization", "diversity", "pixel_diversity", "adherence", "dataset"):
        walk(report.get(key), key, 1)
    return out


def _dataset(source: str) -> dict:
    """dataset_stats over the generated folder's manifest and recipe (the same numbers the report shows)."""
    from .dataset_stats import dataset_metrics
    from .report import load_dataset

    store, table, recipe, _ = load_dataset(source)
    return {"available": True, **dataset_metrics(table, recipe, store.read_bytes)}


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
