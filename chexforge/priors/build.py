"""Rebuild the priors from the public label files that ship inside torchxrayvision.

    python -m chexforge.priors.build            # writes chexforge/priors/data/

Only derived statistics are written (never rows of the source files):
- `cooccurrence.parquet`: for each stratum (sex × age bin × frontal view) of CheXpert's frontal
  training images, how many images carry each combination of findings (a bitmask over the
  CheXpert findings; uncertain labels counted as negative). Combinations seen fewer than
  K_MIN times in a stratum are suppressed (small-cell suppression), and the share suppressed is
  recorded.
- `boxes.json`: per finding, a 16×16 histogram of box centres and a 12×12 histogram of box
  width and height (log scale), in normalised image coordinates, from the NIH ChestX-ray14
  boxes (1024² coordinates) and the RSNA Pneumonia Detection boxes (1024²).
- `meta.json`: sources, licences, counts, and the bit order of the findings.
Mask libraries (SIIM pneumothorax masks, lung masks) are not copied: they are read from the
installed torchxrayvision package when a recipe asks for them (see masks.py).
"""

from __future__ import annotations

import argparse
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from ..labels.groups import age_labels, with_groups
from ..labels.readers import CHEXPERT_COLUMNS, read_chexpert, xrv_data_dir

K_MIN = 10  # combinations seen fewer times than this in a stratum are not published
AGE_BINS = (18, 40, 60, 80)
VIEWS = ("PA", "AP")
CENTRE_BINS = 16
SIZE_BINS = 12
SIZE_RANGE = (np.log(0.01), np.log(1.0))  # box sides from 1 % to 100 % of the image
DATA = Path(__file__).resolve().parent / "data"
PRIOR_FINDINGS = [name for name in CHEXPERT_COLUMNS.values() if name != "No Finding"]
NIH_BOX_LABELS = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Effusion",
                  "Infiltrate": "Lung Opacity", "Infiltration": "Lung Opacity", "Mass": "Mass", "Nodule": "Nodule",
                  "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax"}


def cooccurrence(chexpert: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    df = with_groups(chexpert[chexpert["view"].isin(VIEWS)], AGE_BINS).dropna(subset=["sex", "age", "view"])
    bits = np.zeros(len(df), dtype=np.int64)
    for i, f in enumerate(PRIOR_FINDINGS):
        bits |= (df[f].fillna(0).to_numpy() > 0).astype(np.int64) << i
    df = df.assign(mask=bits)
    counts = df.groupby(["sex", "age", "view", "mask"]).size().rename("count").reset_index()
    kept = counts[counts["count"] >= K_MIN].rename(columns={"age": "age_bin"}).reset_index(drop=True)
    stats = {"images": int(len(df)), "combinations": int(len(counts)), "published": int(len(kept)),
             "images_in_suppressed_cells": int(counts.loc[counts["count"] < K_MIN, "count"].sum())}
    return kept, stats


def box_histograms(boxes: pd.DataFrame) -> dict:
    """boxes: label, x0, y0, x1, y1 (normalised) → per label: centre and size histograms."""
    out = {}
    for label, g in boxes.groupby("label"):
        cx, cy = ((g.x0 + g.x1) / 2).clip(0, 1 - 1e-9), ((g.y0 + g.y1) / 2).clip(0, 1 - 1e-9)
        centre, _, _ = np.histogram2d(cy, cx, bins=CENTRE_BINS, range=[[0, 1], [0, 1]])
        lw, lh = np.log((g.x1 - g.x0).clip(0.01, 1)), np.log((g.y1 - g.y0).clip(0.01, 1))
        size, _, _ = np.histogram2d(lh, lw, bins=SIZE_BINS, range=[SIZE_RANGE, SIZE_RANGE])
        out[label] = {"n": int(len(g)), "centre_yx": centre.astype(int).tolist(), "size_hw_log": size.astype(int).tolist()}
    return out


def nih_boxes(data: Path) -> pd.DataFrame:
    b = pd.read_csv(data / "BBox_List_2017.csv.gz")
    b = b.iloc[:, :6]
    b.columns = ["image", "label", "x", "y", "w", "h"]
    b["label"] = b["label"].map(NIH_BOX_LABELS)
    b = b.dropna(subset=["label"])
    return _boxes(b.label, b.x, b.y, b.w, b.h)


def rsna_boxes(data: Path) -> pd.DataFrame:
    with zipfile.ZipFile(data / "kaggle_stage_2_train_labels.csv.zip") as z:
        b = pd.read_csv(io.BytesIO(z.read("stage_2_train_labels.csv")))
    b = b[b["Target"] == 1]
    return _boxes(pd.Series("Pneumonia", index=b.index), b.x, b.y, b.width, b.height)


def _boxes(label, x, y, w, h, side: float = 1024.0) -> pd.DataFrame:
    """Pixel boxes on a `side`² image → normalised corners, clipped to the image."""
    corners = pd.DataFrame({"x0": x / side, "y0": y / side, "x1": (x + w) / side, "y1": (y + h) / side}).clip(0, 1)
    return corners.assign(label=label.to_numpy())


def build(out: Path = DATA, data: Path | None = None) -> dict:
    data = data or xrv_data_dir()
    out.mkdir(parents=True, exist_ok=True)
    chex = read_chexpert(data / "chexpert_train.csv.gz", "negative")
    co, co_stats = cooccurrence(chex)
    co.to_parquet(out / "cooccurrence.parquet", index=False, compression="zstd")
    boxes = pd.concat([nih_boxes(data), rsna_boxes(data)], ignore_index=True)
    hist = box_histograms(boxes)
    (out / "boxes.json").write_text(json.dumps({"centre_bins": CENTRE_BINS, "size_bins": SIZE_BINS,
                                                "size_log_range": list(SIZE_RANGE), "findings": hist}))
    meta = {
        "findings_bit_order": PRIOR_FINDINGS,
        "age_bins": age_labels(AGE_BINS),
        "views": list(VIEWS),
        "k_min": K_MIN,
        "cooccurrence": {**co_stats, "source": "CheXpert train.csv (frontal images), via torchxrayvision",
                         "licence": "CheXpert Dataset Research Use Agreement (Stanford AIMI); aggregate counts only"},
        "boxes": {"sources": {"NIH ChestX-ray14 BBox_List_2017": "no restrictions on use (NIH Clinical Center)",
                              "RSNA Pneumonia Detection Challenge stage 2 labels": "Kaggle competition data (boxes on NIH images)"},
                  "counts": {k: v["n"] for k, v in hist.items()}},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DATA)
    p.add_argument("--data", type=Path, default=None, help="torchxrayvision's data folder (default: the installed package's)")
    a = p.parse_args()
    meta = build(a.out, a.data)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
