"""A chexforge output folder as a torchxrayvision dataset.

`SyntheticCXRDataset` follows the protocol of `torchxrayvision.datasets.Dataset` (checked
against torchxrayvision 1.5): `.pathologies`, `.labels` (N×P float32: 1, 0, NaN unknown), `.csv`
(one row per item, aligned with `.labels`), `len()`, `string()`, and items
`{"idx", "lab", "img"}` with `img` 1×H×W float32 scaled to [-1024, 1024] as
`xrv.datasets.normalize` does. So `xrv.datasets.relabel_dataset(pathologies, ds)` aligns it with
a real dataset and `xrv.datasets.MergeDataset([real, ds])` mixes them. It does not import
torchxrayvision (chexforge runs without it); it does not subclass its `Dataset` for that reason.

Masks (`masks=True`) come under xrv's own keys, so its `apply_transforms` (the same random
transform for image and masks) covers them: `pathology_masks` {index into `.pathologies`:
1×H×W} for findings, `semantic_masks` {structure name: 1×H×W} for anatomy (lungs, heart, ...).
"""

from __future__ import annotations

import collections
import random

import numpy as np

from ..contracts.vocabulary import ANATOMY, FINDING_NAMES, NO_FINDING
from . import rows

# xrv's CheXpert class drops "No Finding" (it only zeroes the other labels); so does this one.
PATHOLOGIES = [f for f in FINDING_NAMES if f != NO_FINDING]


def apply_transforms(sample: dict, transform, seed: int | None = None) -> dict:
    """torchxrayvision's `apply_transforms`: one seed for the image and each of its masks, so a
    random augmentation moves them together."""
    if transform is None:
        return sample
    import torch

    seed = np.random.randint(2147483647) if seed is None else seed
    random.seed(seed)
    torch.random.manual_seed(seed)
    sample["img"] = transform(sample["img"])
    for key in ("pathology_masks", "semantic_masks"):
        for name in sample.get(key, {}):
            random.seed(seed)
            torch.random.manual_seed(seed)
            sample[key][name] = transform(sample[key][name])
    return sample


class SyntheticCXRDataset:
    """A generated dataset (an output folder, local or fsspec URL) for torchxrayvision.

    views: keep these views (chexforge's PA, AP, LL; None or "*": all). pathologies: the label
    columns (default: every finding of chexforge's vocabulary except "No Finding", in its order).
    unique_patients: one image per patient (the first), as xrv's real datasets do by default.
    masks: add `pathology_masks` and `semantic_masks` to each item."""

    def __init__(self, out_dir, views=None, transform=None, data_aug=None, pathologies=None,
                 masks: bool = False, unique_patients: bool = False, seed: int = 0):
        np.random.seed(seed)  # as xrv's datasets do, so runs are repeatable
        self.out_dir = str(out_dir)
        self.store, csv = rows.ok_rows(out_dir)
        self.views = ["*"] if views is None else ([views] if isinstance(views, str) else list(views))
        if "*" not in self.views:
            csv = csv[csv["view"].isin(self.views)]
        # xrv's common columns: patientid, age_years, sex_male, sex_female (and view, already there).
        csv = csv.assign(patientid=csv["patient_id"].fillna(csv["job_id"]) if "patient_id" in csv else csv["job_id"],
                         age_years=csv["age"].astype(float), sex_male=csv["sex"] == "M", sex_female=csv["sex"] == "F")
        if unique_patients:
            csv = csv.groupby("patientid", sort=False).head(1)
        self.csv = csv.reset_index(drop=True)
        self.pathologies = list(PATHOLOGIES if pathologies is None else pathologies)
        self.labels = rows.label_matrix(self.csv, self.pathologies)
        self.transform, self.data_aug, self.masks = transform, data_aug, masks

    def string(self) -> str:
        return f"{type(self).__name__} num_samples={len(self)} views={self.views} data_aug={self.data_aug}"

    def __repr__(self) -> str:
        return self.string()

    def totals(self) -> dict[str, dict[float, int]]:
        """Counts of each label value per pathology (xrv's `totals`)."""
        return {p: dict(collections.Counter(col[~np.isnan(col)].tolist()).most_common())
                for p, col in zip(self.pathologies, self.labels.T)}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> dict:
        row = self.csv.iloc[idx]
        pixels = rows.image(self.store, row["image_png"])
        sample = {"idx": idx, "lab": self.labels[idx],
                  "img": ((2.0 * pixels - 1.0) * 1024.0).astype(np.float32)[None]}  # xrv: (2·v/max − 1)·1024
        if self.masks:
            found = rows.masks(self.store, row)
            # Looked up at item time: relabel_dataset may have reordered .pathologies since __init__.
            sample["pathology_masks"] = {self.pathologies.index(n): m.astype(np.float32)[None]
                                         for n, m in found.items() if n in self.pathologies}
            sample["semantic_masks"] = {n: m.astype(np.float32)[None] for n, m in found.items() if n in ANATOMY}
        sample = apply_transforms(sample, self.transform)
        return apply_transforms(sample, self.data_aug)
