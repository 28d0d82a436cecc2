"""Contact sheet of virtual patients: normal PA radiographs of different people, women and men aged
25 to 85, each drawn from its own patient_seed, sex and age, captioned with what was drawn
(sex, age, BMI, stature); a last row shows three studies, the same person in PA and LL.
Regenerates docs/images/drr_patients.png.

    .venv/bin/python bench/patients_contact_sheet.py                 # docs/images/drr_patients.png
    .venv/bin/python bench/patients_contact_sheet.py --no-studies    # without the PA/LL row
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from drr_contact_sheet import job, tile  # noqa: E402

from chexforge.backends.drr.backend import DRRBackend  # noqa: E402
from chexforge.backends.drr.options import DRROptions  # noqa: E402

AGES = (25, 37, 49, 61, 73, 85)  # one row of women, one of men
STUDIES = (("F", 45), ("M", 30), ("M", 78))  # (sex, age): one person in PA and LL each
CAPTION = 18  # px of caption strip under each tile


def person(p: dict) -> str:
    return f"{p['sex']} {p['age']:.0f} y · BMI {p['bmi']:.0f} · {p['stature_cm']:.0f} cm"


def captioned(image, text: str, font) -> Image.Image:
    """The image as a tile (drr_contact_sheet.tile, no overlays) with `text` under it."""
    t = tile(image, {}, [], "", False)
    out = Image.new("RGB", (t.width, t.height + CAPTION), (0, 0, 0))
    out.paste(t, (0, 0))
    ImageDraw.Draw(out).text((4, t.height + 2), text, fill=(235, 235, 235), font=font)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs/images/drr_patients.png"))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=100, help="first patient_seed; every person has its own")
    p.add_argument("--no-studies", action="store_true", help="leave out the PA/LL row")
    a = p.parse_args()
    backend = DRRBackend(DRROptions())
    font = ImageFont.load_default(size=13)
    # (sex, age, patient_seed, view, exposure seed)
    people = [(sex, age, a.seed + i * len(AGES) + k, "PA", a.seed + i * len(AGES) + k)
              for i, sex in enumerate("FM") for k, age in enumerate(AGES)]
    if not a.no_studies:
        first = a.seed + 2 * len(AGES)
        for k, (sex, age) in enumerate(STUDIES):
            people += [(sex, age, first + k, view, 10 * (first + k) + j) for j, view in enumerate(("PA", "LL"))]
    tiles = []
    t0 = time.perf_counter()
    for sex, age, pseed, view, seed in people:
        s = backend.render(job(seed, a.size, sex=sex, age=age, patient_seed=pseed, view=view))
        pt = s.meta["patient"]
        text = person(pt) if view == "PA" and len(tiles) < 2 * len(AGES) else f"{view} · {sex} {age} y"
        print(f"patient_seed {pseed:4d} seed {seed:5d} {view}: {person(pt)}, breast {pt['breast_ml']:.0f} ml, "
              f"bone {pt['bone_density']:.2f}, lung height {pt['lung_height_factor']:.2f}, "
              f"aortic unfolding {pt['aortic_unfolding_mm']:.0f} mm, ctr {pt['ctr']:.2f} (measured {s.meta['ctr']})")
        tiles.append(captioned(s.image, text, font))
    print(f"{len(tiles)} images in {time.perf_counter() - t0:.1f} s")
    cols = len(AGES)
    rows = -(-len(tiles) // cols)
    w, h = tiles[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * w, (i // cols) * h))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # All grey: one channel; 86 grey levels (invisible under the quantum noise) keep it ~340 KB, not 500.
    sheet.convert("L").point(lambda v: min(255, v // 3 * 3 + 1)).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
