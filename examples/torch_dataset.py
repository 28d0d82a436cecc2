"""Train on a chexforge dataset with PyTorch: chexforge.data.ChexforgeDataset over an output folder.

    chexforge generate recipes/mixed-multilabel.yaml --out out/mixed
    python examples/torch_dataset.py out/mixed

Each item holds the image (1×H×W in [0, 1]), a multi-hot vector over every finding of the label
vocabulary (`ds.findings`, nothing written by hand), one mask channel per structure the dataset
has (`ds.structures`: findings and anatomy) and the boxes. A few steps of a toy model that
predicts the labels and segments the masks show the batch going through a loss.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import DataLoader

from chexforge.data import ChexforgeDataset, collate


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ds = ChexforgeDataset(argv[0] if argv else "out/quickstart")
    loader = DataLoader(ds, batch_size=8, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    batch = next(iter(loader))
    print(f"{len(ds)} images; batch image {tuple(batch['image'].shape)}, labels {tuple(batch['labels'].shape)} "
          f"over {len(ds.findings)} findings, masks {tuple(batch['masks'].shape)} over {ds.structures}")
    positives = {f: int(n) for f, n in zip(ds.findings, torch.nan_to_num(batch["labels"]).sum(0)) if n}
    print("positives in the batch:", positives)
    print("boxes of the first image:", batch["boxes"][0].tolist(), [ds.findings[i] for i in batch["box_labels"][0]])

    # A toy two-headed model: per-finding logits and per-structure mask logits.
    torch.manual_seed(0)
    f, s = len(ds.findings), len(ds.structures)
    features = torch.nn.Conv2d(1, 8, 3, padding=1)
    segment = torch.nn.Conv2d(8, s, 1)
    classify = torch.nn.Linear(8, f)
    params = [*features.parameters(), *segment.parameters(), *classify.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(3):
        h = torch.relu(features(batch["image"]))
        known = ~torch.isnan(batch["labels"])  # NaN: unknown label, left out of the loss
        cls = torch.nn.functional.binary_cross_entropy_with_logits(
            classify(h.mean((2, 3)))[known], batch["labels"][known])
        drawn = batch["has_mask"][:, :, None, None].expand_as(batch["masks"])  # only masks the image has
        seg = (torch.nn.functional.binary_cross_entropy_with_logits(segment(h)[drawn], batch["masks"][drawn])
               if drawn.any() else torch.zeros(()))
        loss = cls + seg
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 4))
    print("loss over 3 steps:", losses)
    return {"images": len(ds), "batch": batch, "losses": losses}


if __name__ == "__main__":
    main()
