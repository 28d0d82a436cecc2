"""Contact sheet of every finding the DRR backend renders: one radiograph per finding with its
mask outlined (yellow) and its box (blue), regenerating docs/images/drr_findings.png.

    .venv/bin/python bench/drr_contact_sheet.py                    # docs/images/drr_findings.png
    .venv/bin/python bench/drr_contact_sheet.py --compare out.png  # without | with, no overlays
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chexforge.backends.drr.backend import DRRBackend  # noqa: E402
from chexforge.backends.drr.findings import PlacementError  # noqa: E402
from chexforge.backends.drr.options import DRROptions  # noqa: E402
from chexforge.export.contact_sheet import _outline  # noqa: E402

# (tile title, job fields): one tile per finding, CheXpert order, then the lesion classes.
# The support devices are chosen by name (DEVICES, passed to render), not drawn.
CASES = [
    ("No Finding", {}),
    ("Enlarged Cardiomediastinum (large)", {"Enlarged Cardiomediastinum": 1, "Enlarged Cardiomediastinum.severity": "large"}),
    ("Cardiomegaly (large)", {"Cardiomegaly": 1, "Cardiomegaly.severity": "large"}),
    ("Lung Opacity (right, moderate)", {"Lung Opacity": 1, "Lung Opacity.laterality": "right", "Lung Opacity.severity": "moderate"}),
    ("Lung Lesion (left, moderate)", {"Lung Lesion": 1, "Lung Lesion.laterality": "left", "Lung Lesion.severity": "moderate"}),
    ("Edema (moderate)", {"Edema": 1, "Edema.severity": "moderate"}),
    ("Consolidation (right, large)", {"Consolidation": 1, "Consolidation.laterality": "right", "Consolidation.severity": "large"}),
    ("Pneumonia (left, moderate)", {"Pneumonia": 1, "Pneumonia.laterality": "left", "Pneumonia.severity": "moderate"}),
    ("Atelectasis (left, large)", {"Atelectasis": 1, "Atelectasis.laterality": "left", "Atelectasis.severity": "large"}),
    ("Pneumothorax (right, moderate)", {"Pneumothorax": 1, "Pneumothorax.laterality": "right", "Pneumothorax.severity": "moderate"}),
    ("Effusion (left, moderate)", {"Effusion": 1, "Effusion.laterality": "left", "Effusion.severity": "moderate"}),
    ("Pleural Other (right, large)", {"Pleural Other": 1, "Pleural Other.laterality": "right", "Pleural Other.severity": "large"}),
    ("Fracture (left)", {"Fracture": 1, "Fracture.laterality": "left"}),
    ("Support Devices (ETT, CVC, pacemaker)", {"Support Devices": 1}),
    ("Nodule (right, large)", {"Nodule": 1, "Nodule.laterality": "right", "Nodule.severity": "large"}),
    ("Mass (left, moderate)", {"Mass": 1, "Mass.laterality": "left", "Mass.severity": "moderate"}),
]


DEVICES = ("ett", "cvc", "pacemaker")


def job(seed: int, size: int, **findings) -> dict:
    return {"job_id": f"sheet-{seed}", "cohort": "sheet", "seed": seed, "view": "PA", "sex": "M", "age": 60,
            "size": size, "anatomy": [], **findings}


def tile(image: np.ndarray, masks: dict, boxes: list, title: str, overlays: bool) -> Image.Image:
    rgb = np.stack([(np.clip(image, 0, 1) * 255).astype(np.uint8)] * 3, -1)
    if overlays:
        for m in masks.values():
            rgb[_outline(m)] = (255, 210, 0)
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    size = image.shape[0]
    if overlays:
        for b in boxes:
            draw.rectangle([b["x0"] * size, b["y0"] * size, b["x1"] * size - 1, b["y1"] * size - 1], outline=(0, 160, 255))
    if title:  # no bar without a title (bench/patients_contact_sheet.py captions below instead)
        draw.rectangle([0, 0, size, 13], fill=(0, 0, 0))
        draw.text((3, 1), title, fill=(235, 235, 235), font=ImageFont.load_default())
    return im


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs/images/drr_findings.png"))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--compare", metavar="PNG", help="write 'without | with' pairs without overlays instead")
    p.add_argument("--only", help="comma-separated findings to show (title prefix)")
    a = p.parse_args()
    backend = DRRBackend(DRROptions())
    cases = [c for c in CASES if not a.only or any(c[0].startswith(o.strip()) for o in a.only.split(","))]
    tiles = []
    t0 = time.perf_counter()
    for title, fields in cases:
        try:
            s = backend.render(job(a.seed, a.size, **fields), device_kinds=DEVICES)
        except PlacementError as e:
            raise SystemExit(f"{title}: {e}") from None
        if a.compare:
            base = backend.render(job(a.seed, a.size))
            tiles.append(tile(base.image, {}, [], "without", False))
        tiles.append(tile(s.image, s.masks, s.boxes, title, not a.compare))
    print(f"{len(cases)} images in {time.perf_counter() - t0:.1f} s")
    cols = 2 * max(1, a.columns // 2) if a.compare else a.columns
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * a.size, rows * a.size), (18, 18, 18))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * a.size, (i // cols) * a.size))
    out = Path(a.compare or a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
