"""A chexforge output folder as a plain PyTorch dataset.

Each item is a dict of tensors:

    image       1×H×W float32 in [0, 1] (the 16-bit PNG / 65535)
    labels      F float32, 1/0 per finding of `findings` (NaN where a manifest cell is null)
    masks       S×H×W float32 0/1, one channel per structure of `structures`
    has_mask    S bool: whether the image has that structure's mask (an all-zero channel with
                has_mask False means "not drawn", with True "drawn and empty")
    boxes       N×4 float32, pixels [x0, y0, x1, y1] (torchvision's order; x: column)
    box_labels  N int64, index into `findings`
    job_id      the manifest's job id

`findings` defaults to the whole label vocabulary ("No Finding" included) and `structures` to
every mask name the dataset has (findings in the vocabulary's order, then anatomy), so no class
list is written by hand. Use `collate` as the DataLoader's collate_fn: it stacks the fixed-size
fields and keeps boxes as lists (their count varies per image).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from ..contracts.vocabulary import ANATOMY, FINDING_NAMES
from . import rows


class ChexforgeDataset(Dataset):
    """out_dir: a chexforge output folder (local or fsspec URL). findings, structures: the label
    and mask channels (defaults above). masks=False skips reading mask files. views: keep these
    views (None: all). transform: a callable on the item dict, returning it."""

    def __init__(self, out_dir, findings: list[str] | None = None, structures: list[str] | None = None,
                 masks: bool = True, views: list[str] | None = None,
                 transform: Callable[[dict], dict] | None = None):
        self.store, df = rows.ok_rows(out_dir)
        if views is not None:
            df = df[df["view"].isin(list(views))].reset_index(drop=True)
        self.rows = df
        self.findings = list(FINDING_NAMES if findings is None else findings)
        self.labels = rows.label_matrix(df, self.findings)
        self.structures = list(structures) if structures is not None else present_structures(df)
        self.masks, self.transform = masks, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows.iloc[i]
        pixels = rows.image(self.store, row["image_png"])
        h, w = pixels.shape
        found = rows.masks(self.store, row) if self.masks else {}
        stack = np.zeros((len(self.structures), h, w), np.float32)
        for c, name in enumerate(self.structures):
            if name in found:
                stack[c] = found[name]
        boxes = [b for b in (row["realised_boxes"] if row["realised_boxes"] is not None else [])
                 if b["label"] in self.findings]
        size = int(row["size"])
        item = {
            "image": torch.from_numpy(pixels[None].copy()),
            "labels": torch.from_numpy(self.labels[i].copy()),
            "masks": torch.from_numpy(stack),
            "has_mask": torch.tensor([name in found for name in self.structures], dtype=torch.bool),
            "boxes": torch.tensor([[b["x0"] * size, b["y0"] * size, b["x1"] * size, b["y1"] * size] for b in boxes],
                                  dtype=torch.float32).reshape(-1, 4),
            "box_labels": torch.tensor([self.findings.index(b["label"]) for b in boxes], dtype=torch.int64),
            "job_id": row["job_id"],
        }
        return self.transform(item) if self.transform is not None else item


def present_structures(df) -> list[str]:
    """Every mask name in the rows: findings in the vocabulary's order, anatomy in its order, then
    any other name (a diffusion layout's own mask folders) sorted."""
    names = {m["name"] for entries in df["masks"] if entries is not None for m in entries}
    order = [n for n in (*FINDING_NAMES, *ANATOMY) if n in names]
    return order + sorted(names - set(order))


def collate(batch: list[dict]) -> dict:
    """Stack image, labels, masks, has_mask; boxes, box_labels and job_id stay lists."""
    out = {k: torch.stack([b[k] for b in batch]) for k in ("image", "labels", "masks", "has_mask")}
    out.update({k: [b[k] for b in batch] for k in ("boxes", "box_labels", "job_id")})
    return out
