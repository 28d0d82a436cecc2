"""Realism of rendered normal PA radiographs: heart and lung sizes against published adult
normals, and lung-field shapes against the real lung masks that ship in torchxrayvision.

    python bench/drr_realism.py                       # 48 normals at 256 px, prints the tables
    python bench/drr_realism.py --json realism.json   # also writes every number as JSON

Renders N normal PA jobs (no findings; seeds 0..N-1; sex and age drawn from a fixed RNG, women
and men alike, 20-80 years) with the DRR backend at its default options, measures the recorded
masks (see chexforge/backends/drr/realism.py for the definitions) and compares:

1. sizes with published ranges (docs/drr.md, "Realism", gives the sources);
2. shape statistics of the lung fields (the projected lungs above the diaphragm) with the same
   statistics of the v7labs lung masks in torchxrayvision's data folder, frontal views only
   (two lung components side by side), both resampled to the same square grid.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from chexforge.backends.drr import realism  # noqa: E402
from chexforge.backends.drr.backend import DRRBackend  # noqa: E402
from chexforge.backends.drr.options import DRROptions  # noqa: E402

SIZE_ROWS = [
    ("ctr", "cardiothoracic ratio", ""),
    ("width_both_cm", "thoracic width (widest row of both lungs), detector", "cm"),
    ("height_apex_dome_right_cm", "right lung apex → dome, detector", "cm"),
    ("height_apex_dome_left_cm", "left lung apex → dome, detector", "cm"),
    ("height_apex_dome_right_cm_patient", "right lung apex → dome, patient plane", "cm"),
    ("height_apex_dome_left_cm_patient", "left lung apex → dome, patient plane", "cm"),
    ("height_right_cm_patient", "right lung height (projected mask), patient plane", "cm"),
    ("height_left_cm_patient", "left lung height (projected mask), patient plane", "cm"),
    ("height_both_cm_patient", "both lungs height (projected mask), patient plane", "cm"),
    ("width_right_cm_patient", "right lung width, patient plane", "cm"),
    ("width_left_cm_patient", "left lung width, patient plane", "cm"),
    ("width_both_cm_patient", "both lungs width, patient plane", "cm"),
    ("area_right_cm2_patient", "right lung area (projected mask), patient plane", "cm²"),
    ("area_left_cm2_patient", "left lung area (projected mask), patient plane", "cm²"),
    ("area_both_cm2_patient", "both lungs area (projected mask), patient plane", "cm²"),
    ("field_area_both_cm2_patient", "lung field area above the diaphragm, patient plane", "cm²"),
    ("area_both_fraction", "projected lungs, fraction of the image", ""),
    ("right_share_of_field_area", "right lung share of the lung-field area", ""),
    ("magnification", "magnification at the patient's mid-plane", ""),
]

SHAPE_ROWS = [
    ("field_area_fraction", "lung-field area, fraction of the image"),
    ("right_left_area_ratio", "right / left lung-field area"),
    ("width_fraction", "thoracic width (widest row of both fields) / image width"),
    ("top_y", "lung apices, fraction of the height from the top"),
    ("bottom_y", "lowest lung-field point, fraction of the height"),
    ("right_height_width", "right lung height / width"),
    ("left_height_width", "left lung height / width"),
    ("right_centroid_x", "right lung centroid x (0 = image left)"),
    ("left_centroid_x", "left lung centroid x"),
    ("right_centroid_y", "right lung centroid y (0 = top)"),
    ("left_centroid_y", "left lung centroid y"),
    ("right_solidity", "right lung solidity (area / convex hull)"),
    ("left_solidity", "left lung solidity"),
    ("right_cp_angle_deg", "right costophrenic angle (°)"),
    ("left_cp_angle_deg", "left costophrenic angle (°)"),
]


def normal_jobs(n: int, size: int) -> list[dict]:
    rng = np.random.default_rng(2024)
    return [{"job_id": f"r{i}", "cohort": "realism", "seed": i, "view": "PA", "sex": str(rng.choice(["F", "M"])),
             "age": int(rng.integers(20, 81)), "size": size, "anatomy": ["lung_left", "lung_right", "heart"]}
            for i in range(n)]


def render_stats(backend: DRRBackend, jobs: list[dict], grid: int) -> tuple[list[dict], list[dict]]:
    """Per job: size statistics, and shape statistics of its lung fields on a `grid`² grid."""
    scene = backend.scene_for(jobs[0])  # one CT, one size and view: the scene of every job
    cover = realism.cover_slabs(scene.phantom)
    sizes, shapes = [], []
    for job in jobs:
        s = backend.render(job, scene=scene)
        field = realism.field_masks(scene, s, cover, backend.options.projector, backend=backend, job=job)
        sizes.append(realism.size_stats(s.masks, field, s.meta))
        left, right = (resample(field[f"lung_{k}"], grid) for k in ("left", "right"))
        shapes.append(realism.shape_stats(left, right))
    return sizes, shapes


def resample(mask: np.ndarray, grid: int) -> np.ndarray:
    from PIL import Image

    if mask.shape == (grid, grid):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((grid, grid), Image.NEAREST)) > 127


def xrv_shapes(grid: int) -> tuple[list[dict], dict]:
    """Shape statistics of the frontal v7labs lung masks, each split into its two lungs."""
    pairs, skipped = xrv_frontal_masks(grid)
    return [realism.shape_stats(left, right, aspect) for left, right, aspect in pairs], skipped


def xrv_frontal_masks(grid: int) -> tuple[list[tuple[np.ndarray, np.ndarray, float]], dict]:
    """The frontal v7labs lung masks on a `grid`² grid as (left, right, aspect) per image: the
    patient's lungs (holes filled) and the original image's height/width; and the skip counts."""
    from PIL import Image
    from scipy import ndimage as ndi

    from chexforge.labels.readers import xrv_data_dir

    out, skipped = [], {"total": 0, "not two lungs side by side": 0}
    with zipfile.ZipFile(xrv_data_dir() / "semantic_masks_v7labs_lungs.zip") as z:
        names = sorted(n for n in z.namelist() if n.lower().endswith((".png", ".jpg", ".jpeg")))
        for name in names:
            skipped["total"] += 1
            img = Image.open(io.BytesIO(z.read(name))).convert("L")
            aspect = img.height / img.width
            m = np.asarray(img.resize((grid, grid), Image.NEAREST)) > 127
            lab, n = ndi.label(m)
            sizes = ndi.sum_labels(m, lab, np.arange(1, n + 1)) if n else np.array([])
            big = [1 + i for i in np.argsort(sizes)[::-1][:2] if sizes[i] >= 0.01 * m.size]
            pair = _frontal_pair(lab, big)
            if pair is None:
                skipped["not two lungs side by side"] += 1
                continue
            right, left = pair  # image left = patient right
            out.append((ndi.binary_fill_holes(left), ndi.binary_fill_holes(right), aspect))
    skipped["kept"] = len(out)
    return out, skipped


def _frontal_pair(lab: np.ndarray, ids: list[int]):
    """Two lung components, one in each half of the image, overlapping vertically: a frontal view."""
    if len(ids) != 2:
        return None
    a, b = (lab == i for i in ids)
    ca, cb = np.nonzero(a)[1].mean(), np.nonzero(b)[1].mean()
    if ca > cb:
        a, b, ca, cb = b, a, cb, ca
    mid = lab.shape[1] / 2
    if not (ca < mid < cb):
        return None
    ra, rb = np.nonzero(a.any(1))[0], np.nonzero(b.any(1))[0]
    overlap = min(ra.max(), rb.max()) - max(ra.min(), rb.min())
    if overlap < 0.5 * min(np.ptp(ra), np.ptp(rb)):
        return None
    if not 0.33 < a.sum() / b.sum() < 3:
        return None
    return a, b


def fmt(s: dict, digits: int = 2) -> str:
    if not s.get("n"):
        return "—"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f} ({s['p5']:.{digits}f}–{s['p95']:.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--variation", type=float, default=1.0)
    p.add_argument("--grid", type=int, default=256, help="square grid both mask sets are resampled to")
    p.add_argument("--no-xrv", action="store_true", help="skip the torchxrayvision comparison")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    print(f"machine: {machine()}")
    t0 = time.perf_counter()
    backend = DRRBackend(DRROptions(variation=a.variation))
    with torch.no_grad():
        sizes, shapes = render_stats(backend, normal_jobs(a.n, a.size), a.grid)
    print(f"rendered and measured {a.n} normal PA radiographs at {a.size}² in {time.perf_counter() - t0:.1f} s")

    result: dict = {"n": a.n, "size": a.size, "variation": a.variation, "sizes": {}, "shapes": {}}
    print("\n| statistic | rendered: mean ± SD (5–95 %) | published normal | inside |")
    print("|---|---|---|---|")
    for key, label, unit in SIZE_ROWS:
        s = realism.summarize([r[key] for r in sizes])
        pub = realism.PUBLISHED.get(key)
        entry = {"label": label, "unit": unit, **s}
        if pub is not None:
            inside = pub.low <= s["p5"] and s["p95"] <= pub.high
            entry.update(published=[pub.low, pub.high], source=pub.source, inside=inside)
            ref, ok = f"{pub.low:g}–{pub.high:g} ({pub.source})", "yes" if inside else "**no**"
        else:
            ref, ok = "not sourced", "—"
        result["sizes"][key] = entry
        print(f"| {label}{f' ({unit})' if unit else ''} | {fmt(s, 3 if not unit else 1)} | {ref} | {ok} |")

    if not a.no_xrv:
        real, counts = xrv_shapes(a.grid)
        result["xrv_masks"] = counts
        print(f"\ntorchxrayvision v7labs lung masks: {counts['kept']} frontal of {counts['total']} "
              f"({counts['not two lungs side by side']} not two lungs side by side)")
        print(f"\n| shape statistic ({a.grid}² grid) | rendered lung fields | v7labs masks (torchxrayvision) |")
        print("|---|---|---|")
        for key, label in SHAPE_ROWS:
            ours = realism.summarize([r[key] for r in shapes])
            theirs = realism.summarize([r[key] for r in real])
            result["shapes"][key] = {"label": label, "rendered": ours, "xrv": theirs}
            digits = 1 if key.endswith("deg") else 3
            print(f"| {label} | {fmt(ours, digits)} | {fmt(theirs, digits)} |")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
