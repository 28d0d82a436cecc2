"""Mask libraries read from the installed torchxrayvision package (never copied into chexforge).

- `siim`: the SIIM-ACR pneumothorax masks (run-length encoded, 1024², column-major), with the
  side each lies on read from the encoding without decoding it;
- `lungs`: the lung masks of the v7labs COVID set (PNG/JPEG files in a zip).

A reference is `prior:siim#<ImageId>` or `prior:lungs#<file>`; `load` decodes one at any size.
"""

from __future__ import annotations

import io
import zipfile
from functools import lru_cache

import numpy as np
import pandas as pd

from ..errors import UserError
from ..labels.readers import xrv_data_dir

SIIM_SIDE = 1024


def available() -> bool:
    try:
        return (xrv_data_dir() / "siim-pneumothorax-train-rle.csv.gz").is_file()
    except UserError:
        return False


@lru_cache(maxsize=1)
def siim() -> pd.DataFrame:
    """Positive SIIM masks: ImageId, runs (absolute starts and lengths), side."""
    df = pd.read_csv(xrv_data_dir() / "siim-pneumothorax-train-rle.csv.gz", skipinitialspace=True)
    df.columns = [c.strip() for c in df.columns]
    df = df[df["EncodedPixels"].astype(str).str.strip() != "-1"]
    rows = []
    for image_id, group in df.groupby("ImageId", sort=True):
        starts, lengths = [], []
        for rle in group["EncodedPixels"]:
            a = np.asarray(str(rle).split(), dtype=np.int64)
            s = np.cumsum(a[0::2] + np.concatenate([[0], a[1::2][:-1]]))  # relative → absolute starts
            starts.append(s)
            lengths.append(a[1::2])
        s, length = np.concatenate(starts), np.concatenate(lengths)
        x = s // SIIM_SIDE  # column-major: the column is the start's quotient
        cx = float(np.average(x, weights=length)) / SIIM_SIDE
        rows.append({"ImageId": image_id, "starts": s, "lengths": length, "side": "left" if cx > 0.5 else "right"})
    return pd.DataFrame(rows)


@lru_cache(maxsize=1)
def lung_files() -> list[str]:
    with zipfile.ZipFile(xrv_data_dir() / "semantic_masks_v7labs_lungs.zip") as z:
        return sorted(n for n in z.namelist() if n.lower().endswith((".png", ".jpg", ".jpeg")))


def refs(library: str, side: str | None = None) -> list[str]:
    if library == "siim":
        t = siim()
        if side in ("left", "right"):
            t = t[t["side"] == side]
        return [f"prior:siim#{i}" for i in t["ImageId"]]
    if library == "lungs":
        return [f"prior:lungs#{n}" for n in lung_files()]
    raise ValueError(library)


def load(ref: str, size: int) -> np.ndarray:
    """Decode a library mask to a bool (size, size) array."""
    from PIL import Image

    kind, _, key = ref.removeprefix("prior:").partition("#")
    if kind == "siim":
        t = siim()
        row = t[t["ImageId"] == key]
        if row.empty:
            raise UserError(f"no SIIM mask {key!r} in the installed torchxrayvision")
        flat = np.zeros(SIIM_SIDE * SIIM_SIDE, dtype=np.uint8)
        for s, n in zip(row.iloc[0]["starts"], row.iloc[0]["lengths"]):
            flat[s:s + n] = 255
        img = Image.fromarray(flat.reshape(SIIM_SIDE, SIIM_SIDE).T)
    elif kind == "lungs":
        with zipfile.ZipFile(xrv_data_dir() / "semantic_masks_v7labs_lungs.zip") as z:
            img = Image.open(io.BytesIO(z.read(key))).convert("L")
    else:
        raise UserError(f"unknown prior mask reference {ref!r}")
    return np.asarray(img.resize((size, size), Image.NEAREST)) > 127
