"""The terminal summary of `chexforge eval`: one rich table from metrics.json."""

from __future__ import annotations

from rich.table import Table


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def summary_table(m: dict) -> Table:
    feats = m["features"]
    caption = None if feats["perceptual"] or feats["name"] is None else "random features: compares sets, not a perceptual metric"
    t = Table("metric", "value", title=f"eval {m['generated']['source']} ({feats['name']} features)", caption=caption)
    fid = m["fidelity"]
    if fid.get("available"):
        for k in ("fid", "kid_mean", "precision", "recall", "density", "coverage"):
            t.add_row(k, _fmt(fid[k]))
    else:
        t.add_row("fidelity", f"unavailable: {fid['why']}")
    div = m["diversity"]
    t.add_row("MS-SSIM (same " + div.get("by", "prompt") + ")",
              f"{div['ms_ssim_mean']:.4g} over {div['pairs']} pairs" if div.get("available") else f"unavailable: {div['why']}")
    mem = m["memorization"]
    t.add_row("memorized", f"{mem['flagged']}/{mem['of']} at cos ≥ {mem['threshold']} (max {mem['max_cosine']:.3f})"
              if mem.get("available") else f"unavailable: {mem['why']}")
    adh = m["adherence"]["findings"]
    t.add_row("finding AUROC", _fmt(adh["mean_auroc"]) if adh.get("available") else f"unavailable: {adh['why']}")
    a = m["adherence"]
    rows = [("sex accuracy / AUROC", "sex", lambda e: f"{_fmt(e['accuracy'])} / {_fmt(e['auroc'])} ({e['images']} images)"),
            ("age MAE / Pearson r", "age", lambda e: f"{_fmt(e['mae'])} y / {_fmt(e['pearson_r'])} ({e['images']} images)"),
            ("mask Dice (mean per class)", "segmentation",
             lambda e: _fmt(e["mean_dice"]) + " (" + ", ".join(f"{k} {_fmt(v['dice'])}" for k, v in e["per_class"].items()) + ")"),
            ("box hit rate", "boxes", lambda e: f"{_fmt(e['hit_rate'])} of {e['boxes']} at IoU ≥ {e['iou']}")]
    for label, key, show in rows:
        e = a.get(key)
        if e is not None:
            t.add_row(label, show(e) if e.get("available") else f"unavailable: {e['why']}")
    return t
