"""The ok rows of an output folder's manifest as a DataFrame, and reading their files."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from ..contracts import manifest as mc
from ..contracts.images import read_gray, read_mask
from ..errors import UserError
from ..export import manifest as mf
from ..store import Store, open_store


def ok_rows(out) -> tuple[Store, pd.DataFrame]:
    """(the folder's store, its ok manifest rows in manifest order, index 0..N-1). Only folders
    whose images include PNGs: the loaders read the 16-bit PNG."""
    store = open_store(out)
    if not store.exists(mc.MANIFEST) and not mf.part_names(store):
        raise UserError("no manifest.parquet: not a chexforge output folder", str(out))
    table = mf.read_manifest(store)
    table = table.filter(pc.equal(table.column("status"), "ok"))
    if table.num_rows and pc.any(pc.is_null(table.column("image_png"))).as_py():
        raise UserError("the loaders read PNG images and this output has rows without one; generate with "
                        "output.formats including png", str(out))
    return store, table.to_pandas().reset_index(drop=True)


def label_matrix(df: pd.DataFrame, names: list[str]) -> np.ndarray:
    """N×len(names) float32: the job's 0/1 per finding, NaN where the column is null or absent."""
    out = np.full((len(df), len(names)), np.nan, dtype=np.float32)
    for j, name in enumerate(names):
        if name in df.columns:
            out[:, j] = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=np.float32, na_value=np.nan)
    return out


def image(store: Store, rel: str) -> np.ndarray:
    """H×W float32 in [0, 1] (the 16-bit PNG over 65535)."""
    return read_gray(io.BytesIO(store.read_bytes(rel)))


def masks(store: Store, row) -> dict[str, np.ndarray]:
    """The row's masks by structure name, bool H×W."""
    entries = row["masks"] if row["masks"] is not None else []
    return {m["name"]: read_mask(io.BytesIO(store.read_bytes(m["path"]))) for m in entries}
