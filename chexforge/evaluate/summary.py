"""The terminal summary of `chexforge eval`: one rich table from metrics.json.

Reasons and model file names are long; the value column folds them onto several lines rather
than cutting them short, so a file name the user must put somewhere is always shown in full.
"""

from __future__ import annotations

from rich.table import Table


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _title(m: dict) -> str:
    name = m["features"]["name"]
    return f"eval {m['generated']['source']} ({f'{name} features' if name else 'no feature extractor'})"


def _unavailable(e: dict) -> str:
    """What is needed, when the entry says (in full: it may be a file name to fetch), else why not."""
    return f"unavailable; needs {e['needs']}" if e.get("needs") else f"unavailable: {e.get('why', 'no reason given')}"


def summary_table(m: dict) -> Table:
    feats = m["features"]
    caption = None if feats["perceptual"] or feats["name"] is None else "random features: compares sets, not a perceptual metric"
    t = Table("metric", "value", title=_title(m), caption=caption)
    t.columns[1].overflow = "fold"  # wrap long file names instead of an ellipsis
    t.columns[0].no_wrap = True
    ds = m.get("dataset") or {}
    if ds.get("available"):
        s = ds["summary"]
        t.add_row("dataset", f"{s['images']} images ({s['failed']} failed) of {s['patients']} patients, "
                  f"{s['studies']} studies, {s['cohorts']} cohorts; backend {', '.join(s.get('backend', [])) or '-'}")
        comp = ds["composition"]
        if comp.get("available"):
            gaps = {p: max((c["max_abs_gap"][p] or 0) for c in comp["per_cohort"].values()) for p in ("findings", "sex", "age", "view")}
            t.add_row("composition vs recipe", f"{comp['realised_images']}/{comp['requested_images']} images; largest gap per "
                      "cohort: " + ", ".join(f"{p} {_pct(v)}" for p, v in gaps.items()))
        lat = ds["laterality"]
        if lat.get("available"):
            t.add_row("laterality realised = requested", ", ".join(
                f"{f} {_pct(e['agreement'])} of {e['determined']}" for f, e in lat["per_finding"].items()))
        sev = ds["severity"]
        if sev.get("available"):
            t.add_row("size grows with severity", ", ".join(
                f"{f} {'-' if e['increasing'] is None else ('yes' if e['increasing'] else 'no')}" for f, e in sev["per_finding"].items()))
        masks = ds["masks"]
        if masks.get("available"):
            t.add_row("mask area (median)", ", ".join(f"{k} {100 * v['median']:.2g}%" for k, v in masks["per_structure"].items()))
        tim = ds["timing"]
        if tim.get("available") and tim["images_per_second_generate"]:
            t.add_row("throughput", f"{tim['images_per_second_generate']:.3g} images/s generating, "
                      f"{_fmt(tim['seconds_generate_per_image'].get('median'))} s/image (median)")
    elif ds:
        t.add_row("dataset", _unavailable(ds))
    pdiv = m.get("pixel_diversity") or {}
    if pdiv.get("available"):
        t.add_row("MS-SSIM / pixel r (same cohort)", f"{pdiv['ms_ssim_mean']:.4g} / {pdiv['pixel_corr_mean']:.4g} over {pdiv['pairs']} pairs")
    fid = m["fidelity"]
    if fid.get("available"):
        for k in ("fid", "kid_mean", "precision", "recall", "density", "coverage"):
            t.add_row(k, _fmt(fid[k]))
    else:
        t.add_row("fidelity", _unavailable(fid))
    div = m["diversity"]
    t.add_row("MS-SSIM (same " + div.get("by", "prompt") + ")",
              f"{div['ms_ssim_mean']:.4g} over {div['pairs']} pairs" if div.get("available") else _unavailable(div))
    mem = m["memorization"]
    same = not mem.get("available") and (mem.get("why"), mem.get("needs")) == (fid.get("why"), fid.get("needs"))
    t.add_row("memorized", f"{mem['flagged']}/{mem['of']} at cos ≥ {mem['threshold']} (max {mem['max_cosine']:.3f})"
              if mem.get("available") else "unavailable, as fidelity" if same else _unavailable(mem))
    adh = m["adherence"]["findings"]
    t.add_row("finding AUROC", _fmt(adh["mean_auroc"]) if adh.get("available") else _unavailable(adh))
    a = m["adherence"]
    rows = [("sex accuracy / AUROC", "sex", lambda e: f"{_fmt(e['accuracy'])} / {_fmt(e['auroc'])} ({e['images']} images)"),
            ("age MAE / Pearson r", "age", lambda e: f"{_fmt(e['mae'])} y / {_fmt(e['pearson_r'])} ({e['images']} images)"),
            ("mask Dice (mean per class)", "segmentation",
             lambda e: _fmt(e["mean_dice"]) + " (" + ", ".join(f"{k} {_fmt(v['dice'])}" for k, v in e["per_class"].items()) + ")"),
            ("box hit rate", "boxes", lambda e: f"{_fmt(e['hit_rate'])} of {e['boxes']} at IoU ≥ {e['iou']}")]
    for label, key, show in rows:
        e = a.get(key)
        if e is not None:
            t.add_row(label, show(e) if e.get("available") else _unavailable(e))
    return t
