"""What a chexforge output folder holds, measured from its own files: no reference set, no weights.

Everything here reads the manifest (and, for mask areas and laterality, the mask PNGs it lists)
and returns plain JSON-ready dicts. `chexforge eval` writes them into metrics.json and
`chexforge report` shows them, so both always agree on the numbers:

* `summary`: images, failed jobs, patients, studies, cohorts, views, sex, age, generator identity;
* `composition_fidelity`: per cohort and overall, the recipe's requested mix (images, finding
  prevalence, sex, age decades, view) against the realised one (status-ok rows);
* `laterality` and `severity`: per finding, what each job row asked for (its `<finding>.laterality`
  and `<finding>.severity` columns) against what the image holds: the side is read from the finding's
  mask (frontal views), else its realised boxes, else the backend's own metadata; the size from the
  mask's area, the boxes' area and any numbers the backend reports per lesion (`meta.findings`);
* `box_stats`, `mask_stats`: size distributions of realised boxes per label and mask areas per
  structure or finding, overall and per cohort;
* `cooccurrence`: how many images carry each pair of findings;
* `timing`: the manifest's seconds_generate / seconds_export per image and the throughput they imply.

Image sides: a frontal film (PA or AP) is displayed with the patient's right on the image's left,
so a finding on the image's right half is on the patient's left. The midline is the middle of the
lungs mask's horizontal extent when the image has one (patients are not always centred), else the
image centre. A lateral film (LL) shows no left or right; there only the backend's metadata can say.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from ..contracts.images import read_mask
from ..contracts.jobs import laterality_column, severity_column
from ..contracts.vocabulary import FINDING_NAMES, LATERALITIES, NO_FINDING, SEVERITIES
from ..errors import UserError
from ..plan.summary import Composition
from ..recipe.schema import Recipe

MAX_MASK_ROWS = 2000  # images whose masks are read (evenly spaced); enough for stable quantiles
FRONTAL = ("PA", "AP")
SIDE_SHARE = 0.1  # a side holds the finding when it has at least this share of its mask pixels
UNDETERMINED = "undetermined"


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    if "status" not in df:
        return df.reset_index(drop=True)
    return df[df["status"].fillna("") == "ok"].reset_index(drop=True)


def _q(values) -> dict:
    """Count and quantiles of a list of numbers (empty: just the count)."""
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if not len(v):
        return {"n": 0}
    p10, p25, med, p75, p90 = np.percentile(v, [10, 25, 50, 75, 90])
    return {"n": int(len(v)), "mean": float(v.mean()), "min": float(v.min()), "p10": float(p10), "p25": float(p25),
            "median": float(med), "p75": float(p75), "p90": float(p90), "max": float(v.max())}


def _list(v) -> list:
    """A list cell of the manifest (numpy array from pandas, list, or null) as a list."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    return list(v)


def _uniques(s: pd.Series) -> list[str]:
    return [str(x) for x in dict.fromkeys(s.dropna().astype(str)) if x]


# ---- whole-dataset summary ---------------------------------------------------------------------


def summary(df: pd.DataFrame) -> dict:
    ok = ok_rows(df)

    def distinct(col: str) -> int:
        # Before studies each job was its own patient and study (their columns read as null).
        if col not in ok:
            return int(ok["job_id"].nunique())
        return int(ok[col].fillna(ok["job_id"]).nunique())

    ages = ok["age"].dropna().astype(float) if "age" in ok else pd.Series([], dtype=float)
    out = {
        "jobs": int(len(df)), "images": int(len(ok)), "failed": int(len(df) - len(ok)),
        "patients": distinct("patient_id"), "studies": distinct("study_id"),
        "cohorts": int(df["cohort"].nunique()) if "cohort" in df else 0,
        "views": {str(k): int(v) for k, v in ok["view"].value_counts().items()} if "view" in ok else {},
        "sex": {str(k): int(v) for k, v in ok["sex"].value_counts().items()} if "sex" in ok else {},
        "age": {"median": float(ages.median()), "min": float(ages.min()), "max": float(ages.max())} if len(ages) else None,
    }
    for col in ("backend", "backend_version", "model", "model_hash"):
        if col in df:
            out[col] = _uniques(ok[col] if len(ok) else df[col])
    return out


# ---- composition against the recipe --------------------------------------------------------------


def composition_fidelity(recipe: Recipe | None, table: pa.Table) -> dict:
    """Per cohort the recipe names (and any other the manifest holds): requested against realised
    fractions per panel (finding prevalence, sex, age decade, view), the largest absolute gap of each
    panel, and requested against realised image counts. `overall` pools the cohorts, each weighted by
    the images it asks for (requested) or made (realised)."""
    from . import report_charts as charts

    if recipe is None:
        return {"available": False, "why": "the output folder has no readable recipe.yaml to compare with",
                "needs": "the recipe.yaml chexforge generate writes into the output folder"}
    specs = {c.name: c for c in recipe.cohorts}
    tallies = Composition.of(table).cohorts
    per: dict[str, dict] = {}
    pooled_want: dict[str, dict[str, float]] = {p: {} for p in charts.PANELS}
    pooled_got: dict[str, dict[str, float]] = {p: {} for p in charts.PANELS}
    natural = False
    from ..plan.summary import CohortTally

    for name in list(specs) + [c for c in tallies if c not in specs]:
        spec, tally = specs.get(name), tallies.get(name, CohortTally())
        comp = charts.composition(spec, tally)
        panels = {p: [{"category": k, "requested": w, "realised": g, "images": round(g * tally.n)} for k, w, g in rows]
                  for p, rows in comp.items()}
        gaps = {p: max((abs(r["requested"] - r["realised"]) for r in rows if r["requested"] is not None), default=None)
                for p, rows in panels.items()}
        per[name] = {"requested_images": spec.images if spec is not None else None, "realised_images": tally.n,
                     "failed": tally.failed, "max_abs_gap": gaps, "panels": panels}
        natural |= spec is not None and spec.findings == "natural"
        for p, rows in comp.items():
            for k, w, g in rows:
                if spec is not None and w is not None:
                    pooled_want[p][k] = pooled_want[p].get(k, 0.0) + w * spec.images
                pooled_got[p][k] = pooled_got[p].get(k, 0.0) + g * tally.n
    n_want = sum(s.images for s in specs.values())
    n_got = sum(t.n for t in tallies.values())
    overall = {}
    for p in charts.PANELS:
        keys = charts.ordered(p, [*pooled_want[p], *pooled_got[p]])
        skip_want = p == "findings" and natural  # a natural cohort's prevalence is not requested
        overall[p] = [{"category": k,
                       "requested": None if skip_want or not n_want else pooled_want[p].get(k, 0.0) / n_want,
                       "realised": pooled_got[p].get(k, 0.0) / n_got if n_got else 0.0,
                       "images": round(pooled_got[p].get(k, 0.0))} for k in keys]
    return {"available": True, "requested_images": n_want, "realised_images": n_got,
            "overall": overall, "per_cohort": per}


# ---- masks: areas and sides ---------------------------------------------------------------------


@dataclass
class MaskInfo:
    area: float  # fraction of the image's pixels inside
    right_share: float  # share of its pixels right of the midline (the image's right: patient's left on a frontal film)


def _pick(n: int, limit: int) -> np.ndarray:
    return np.arange(n) if n <= limit else np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def read_masks(ok: pd.DataFrame, read_bytes: Callable[[str], bytes], limit: int = MAX_MASK_ROWS
               ) -> tuple[dict[tuple[str, str], MaskInfo], int]:
    """(job_id, mask name) → MaskInfo for the masks of at most `limit` ok rows (evenly spaced), and
    how many rows were read. An unreadable mask is a UserError naming it."""
    if "masks" not in ok:
        return {}, 0
    rows = ok.iloc[_pick(len(ok), limit)]
    out: dict[tuple[str, str], MaskInfo] = {}
    read = 0
    for _, r in rows.iterrows():
        masks = {m["name"]: read_mask(io.BytesIO(read_bytes(m["path"]))) for m in _list(r["masks"]) if m.get("path")}
        if not masks:
            continue
        read += 1
        lungs = masks.get("lungs")
        w = next(iter(masks.values())).shape[1]
        mid = w / 2
        if lungs is not None and lungs.any():
            cols = np.flatnonzero(lungs.any(axis=0))
            mid = (cols[0] + cols[-1] + 1) / 2
        for name, m in masks.items():
            total = int(m.sum())
            right = int(m[:, int(round(mid)):].sum())
            out[(str(r["job_id"]), name)] = MaskInfo(total / m.size, right / total if total else float("nan"))
    return out, read


def mask_stats(ok: pd.DataFrame, masks: dict[tuple[str, str], MaskInfo], rows_read: int) -> dict:
    if not masks:
        return {"available": False, "why": "the output folder has no masks (output.masks: false, or none were realised)",
                "needs": "a recipe with output: {masks: true}"}
    cohort_of = dict(zip(ok["job_id"].astype(str), ok["cohort"].astype(str)))
    by_name: dict[str, list[float]] = {}
    by_cohort: dict[str, dict[str, list[float]]] = {}
    for (job, name), info in masks.items():
        by_name.setdefault(name, []).append(info.area)
        by_cohort.setdefault(cohort_of.get(job, "?"), {}).setdefault(name, []).append(info.area)
    return {"available": True, "unit": "fraction of the image's pixels", "images_read": rows_read,
            "of_images": int(len(ok)),
            "per_structure": {k: _q(v) for k, v in sorted(by_name.items())},
            "per_cohort": {c: {k: _q(v) for k, v in sorted(d.items())} for c, d in by_cohort.items()}}


# ---- boxes --------------------------------------------------------------------------------------


def box_stats(ok: pd.DataFrame) -> dict:
    if "realised_boxes" not in ok:
        return {"available": False, "why": "the manifest has no realised_boxes column", "needs": "a chexforge manifest"}
    area: dict[str, list[float]] = {}
    width: dict[str, list[float]] = {}
    height: dict[str, list[float]] = {}
    for boxes in ok["realised_boxes"]:
        for b in _list(boxes):
            w, h = float(b["x1"]) - float(b["x0"]), float(b["y1"]) - float(b["y0"])
            area.setdefault(b["label"], []).append(w * h)
            width.setdefault(b["label"], []).append(w)
            height.setdefault(b["label"], []).append(h)
    if not area:
        return {"available": False, "why": "no image of this dataset has a realised box",
                "needs": "findings with boxes (a localizable finding, or a layout with boxes)"}
    return {"available": True, "unit": "fraction of the image (area) or of its side (width, height)",
            "per_label": {k: {"area": _q(area[k]), "width": _q(width[k]), "height": _q(height[k])} for k in sorted(area)}}


# ---- co-occurrence ------------------------------------------------------------------------------


def cooccurrence(ok: pd.DataFrame) -> dict:
    """matrix[a][b]: images labelled with both a and b (the diagonal: images with a)."""
    present = [f for f in FINDING_NAMES if f != NO_FINDING and f in ok and (ok[f].fillna(0) != 0).any()]
    if not present:
        return {"available": True, "findings": [], "matrix": {}, "images": int(len(ok))}
    x = (ok[present].fillna(0) != 0).to_numpy().astype(np.int64)
    m = x.T @ x
    return {"available": True, "findings": present, "images": int(len(ok)),
            "matrix": {a: {b: int(m[i, j]) for j, b in enumerate(present)} for i, a in enumerate(present)}}


# ---- laterality and severity --------------------------------------------------------------------


def _meta_findings(meta) -> list[dict]:
    if not isinstance(meta, str) or not meta:
        return []
    try:
        m = json.loads(meta)
    except json.JSONDecodeError:
        return []
    f = m.get("findings") if isinstance(m, dict) else None
    return [e for e in f if isinstance(e, dict)] if isinstance(f, list) else []


def _sides(sides: set[str]) -> str | None:
    if {"left", "right"} <= sides or "bilateral" in sides:
        return "bilateral"
    return next(iter(sides)) if sides else None


def realised_side(row: dict, finding: str, masks: dict[tuple[str, str], MaskInfo]) -> tuple[str, str]:
    """(left | right | bilateral | undetermined, where it was read: mask | boxes | meta | none)."""
    frontal = row.get("view") in FRONTAL
    info = masks.get((str(row["job_id"]), finding))
    if frontal and info is not None and not math.isnan(info.right_share):
        sides = {s for s, share in (("left", info.right_share), ("right", 1 - info.right_share)) if share >= SIDE_SHARE}
        return _sides(sides) or UNDETERMINED, "mask"
    boxes = [b for b in _list(row.get("realised_boxes")) if b["label"] == finding]
    if frontal and boxes:
        return _sides({"left" if (b["x0"] + b["x1"]) / 2 >= 0.5 else "right" for b in boxes}) or UNDETERMINED, "boxes"
    sides = {str(e["side"]) for e in _meta_findings(row.get("meta")) if e.get("finding") == finding and e.get("side")}
    side = _sides(sides & set(LATERALITIES))
    return (side, "meta") if side else (UNDETERMINED, "none")


def _requested(ok: pd.DataFrame, column_of: Callable[[str], str]):
    """(finding, its attribute column, the rows that request the finding with that attribute set)
    for each finding with such rows: laterality's and severity's requested side of the table."""
    for f in FINDING_NAMES:
        col = column_of(f)
        if col in ok and f in ok:
            rows = ok[(ok[f].fillna(0) != 0) & ok[col].notna()]
            if not rows.empty:
                yield f, col, rows


def laterality(ok: pd.DataFrame, masks: dict[tuple[str, str], MaskInfo]) -> dict:
    """Per finding whose jobs carry a laterality: requested counts, realised counts, the
    requested → realised table, and agreement among the images whose side could be read."""
    out: dict[str, dict] = {}
    for f, col, rows in _requested(ok, laterality_column):
        confusion: dict[str, dict[str, int]] = {}
        sources: dict[str, int] = {}
        realised: dict[str, int] = {}
        agree = determined = 0
        for r in rows.to_dict("records"):
            side, source = realised_side(r, f, masks)
            want = str(r[col])
            confusion.setdefault(want, {}).setdefault(side, 0)
            confusion[want][side] += 1
            realised[side] = realised.get(side, 0) + 1
            sources[source] = sources.get(source, 0) + 1
            if side != UNDETERMINED:
                determined += 1
                agree += side == want
        order = {k: i for i, k in enumerate(LATERALITIES)}
        confusion = dict(sorted(confusion.items(), key=lambda kv: order.get(kv[0], len(order))))
        requested = {k: int(v) for k, v in rows[col].value_counts().items()}
        out[f] = {"images": int(len(rows)), "requested": requested, "realised": realised, "confusion": confusion,
                  "read_from": sources, "determined": determined,
                  "agreement": agree / determined if determined else None}
    return {"available": True, "per_finding": out} if out else {
        "available": False, "why": "no image requests a finding with a laterality",
        "needs": "a recipe finding with laterality: (e.g. Effusion: {p: 1, laterality: [left, right]})"}


def severity(ok: pd.DataFrame, masks: dict[tuple[str, str], MaskInfo]) -> dict:
    """Per finding whose jobs carry a severity, per requested grade: images, the finding's mask
    area and box area (medians), and the medians of every number the backend reports per lesion
    (say diameter_mm, volume_ml). `increasing`: the mask (else box) areas' medians rise with the
    grade, small < moderate < large, over the grades present; None with fewer than two grades."""
    out: dict[str, dict] = {}
    for f, col, rows in _requested(ok, severity_column):
        grades: dict[str, dict] = {}
        for grade in [g for g in SEVERITIES if (rows[col] == g).any()]:
            sub = rows[rows[col] == grade].to_dict("records")
            m_area = [masks[(str(r["job_id"]), f)].area for r in sub if (str(r["job_id"]), f) in masks]
            b_area = [sum((b["x1"] - b["x0"]) * (b["y1"] - b["y0"]) for b in _list(r.get("realised_boxes"))
                          if b["label"] == f) for r in sub if any(b["label"] == f for b in _list(r.get("realised_boxes")))]
            meta: dict[str, list[float]] = {}
            for r in sub:
                for e in _meta_findings(r.get("meta")):
                    if e.get("finding") != f:
                        continue
                    for k, v in e.items():
                        if isinstance(v, (int, float)) and not isinstance(v, bool):
                            meta.setdefault(k, []).append(float(v))
            grades[grade] = {"images": len(sub), "mask_area": _q(m_area), "box_area": _q(b_area),
                             "backend_reports": {k: _q(v) for k, v in sorted(meta.items())}}
        key = "mask_area" if all(g["mask_area"]["n"] for g in grades.values()) else "box_area"
        meds = [g[key].get("median") for g in grades.values()]
        increasing = (None if len(meds) < 2 or any(m is None for m in meds)
                      else all(a < b for a, b in zip(meds, meds[1:])))
        out[f] = {"images": int(len(rows)), "requested": {k: int(v) for k, v in rows[col].value_counts().items()},
                  "per_grade": grades, "size_from": key, "increasing": increasing}
    return {"available": True, "per_finding": out} if out else {
        "available": False, "why": "no image requests a finding with a severity",
        "needs": "a recipe finding with severity: (e.g. Nodule: {p: 1, severity: {small: 1, large: 1}})"}


# ---- timing -------------------------------------------------------------------------------------

TIMING_NOTE = ("seconds_generate is each image's share of its batch's generation time on its device, "
               "seconds_export the time to write its files; export overlaps generation on other threads and "
               "a run may use several devices, so wall-clock throughput differs (the manifest does not hold "
               "the run's wall time)")


def timing(df: pd.DataFrame) -> dict:
    if "seconds_generate" not in df:
        return {"available": False, "why": "the manifest has no seconds_generate column", "needs": "a chexforge manifest"}
    ok = ok_rows(df)
    g_all = float(df["seconds_generate"].fillna(0).sum())  # a failed job's time was spent too
    g = ok["seconds_generate"].astype(float)
    e = ok["seconds_export"].astype(float) if "seconds_export" in ok else pd.Series(np.zeros(len(ok)))
    n = len(ok)

    def rate(seconds: float) -> float | None:
        return n / seconds if seconds > 0 else None

    per_cohort = {}
    for cohort, rows in df.groupby("cohort", sort=False):
        good = ok_rows(rows)
        s = float(rows["seconds_generate"].fillna(0).sum())
        per_cohort[str(cohort)] = {"images": int(len(good)), "seconds_generate": s,
                                   "images_per_second_generate": len(good) / s if s > 0 else None}
    attempts = ok["attempts"].dropna().astype(int) if "attempts" in ok else pd.Series([], dtype=int)
    return {
        "available": True, "images": n,
        "seconds_generate_total": g_all, "seconds_export_total": float(e.sum()),
        "seconds_generate_per_image": _q(g), "seconds_export_per_image": _q(e),
        "images_per_second_generate": rate(g_all), "images_per_second_export": rate(float(e.sum())),
        "images_per_second_serial": rate(g_all + float(e.sum())),
        "attempts_mean": float(attempts.mean()) if len(attempts) else None,
        "retried_images": int((attempts > 1).sum()),
        "per_cohort": per_cohort, "note": TIMING_NOTE,
    }


# ---- all of it ----------------------------------------------------------------------------------


def dataset_metrics(table: pa.Table, recipe: Recipe | None, read_bytes: Callable[[str], bytes],
                    mask_limit: int = MAX_MASK_ROWS) -> dict:
    """Every statistic above for one manifest; `read_bytes(rel)` reads a file of the folder."""
    df = table.to_pandas()
    ok = ok_rows(df)
    try:
        masks, read = read_masks(ok, read_bytes, mask_limit)
    except (OSError, FileNotFoundError) as e:
        raise UserError(f"cannot read a mask the manifest lists ({e.__class__.__name__}: {e})") from None
    return {
        "summary": summary(df),
        "composition": composition_fidelity(recipe, table),
        "laterality": laterality(ok, masks),
        "severity": severity(ok, masks),
        "boxes": box_stats(ok),
        "masks": mask_stats(ok, masks, read),
        "cooccurrence": cooccurrence(ok),
        "timing": timing(df),
    }
