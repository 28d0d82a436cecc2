"""Loading a generated dataset for training: a torchxrayvision-style dataset (`SyntheticCXRDataset`,
mixes with real xrv datasets through `relabel_dataset` and `MergeDataset`) and a plain PyTorch
dataset (`ChexforgeDataset`: image, multi-hot labels over every finding, masks, boxes).

Both read an output folder (manifest.parquet and the files it names); neither imports
torchxrayvision. docs/loaders.md describes them, with coco.json and datalist.json.
"""

from .loader import ChexforgeDataset, collate
from .xrv import SyntheticCXRDataset

__all__ = ["ChexforgeDataset", "SyntheticCXRDataset", "collate"]
