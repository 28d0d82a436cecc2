"""Train on a chexforge dataset: a PyTorch Dataset over out/manifest.parquet.

    chexforge generate recipes/mixed-multilabel.yaml --out out/mixed
    python examples/torch_dataset.py out/mixed

Each item is (image tensor 1×H×W in [0, 1], multi-hot finding vector, boxes in pixels, labels).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

FINDINGS = ["Cardiomegaly", "Effusion", "Nodule", "Mass"]


class ChexforgeDataset(Dataset):
    def __init__(self, root: str | Path, findings: list[str] = FINDINGS):
        self.root = Path(root)
        df = pd.read_parquet(self.root / "manifest.parquet")
        self.df = df[df.status == "ok"].reset_index(drop=True)
        self.findings = findings

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, i: int):
        row = self.df.iloc[i]
        pixels = np.asarray(Image.open(self.root / row.image_png), dtype=np.float32) / 65535.0
        image = torch.from_numpy(pixels)[None]
        target = torch.tensor([float(row[f]) for f in self.findings])
        size = pixels.shape[0]
        boxes = [[b["x0"] * size, b["y0"] * size, b["x1"] * size, b["y1"] * size] for b in row.realised_boxes]
        labels = [b["label"] for b in row.realised_boxes]
        return image, target, torch.tensor(boxes).reshape(-1, 4), labels


def main() -> None:
    ds = ChexforgeDataset(sys.argv[1] if len(sys.argv) > 1 else "out/quickstart")
    loader = DataLoader(ds, batch_size=8, shuffle=True, collate_fn=lambda batch: list(zip(*batch)))
    images, targets, boxes, labels = next(iter(loader))
    print(f"{len(ds)} images; first batch: {len(images)} × {tuple(images[0].shape)}")
    print("labels per image:", [t.tolist() for t in targets][:4])
    print("boxes of the first image:", boxes[0].tolist(), labels[0])


if __name__ == "__main__":
    main()
