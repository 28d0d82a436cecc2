"""Image sets for evaluation: a chexforge output folder, a folder of images, or a label CSV.

Every set becomes an `ImageSet`: grayscale float32 images in [0, 1] resized to size×size, an id
per image, and where the source has them the finding labels (0/1 per vocabulary finding), the
prompt and the seed. Pixels come from the one reader, chexforge/contracts/images.py (bit depth
from the file's mode, colour to BT.601 luma, Pillow-bilinear resize; the aspect ratio is not kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..contracts.images import read_gray
from ..contracts.vocabulary import FINDING_NAMES
from ..errors import UserError

SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass
class ImageSet:
    source: str
    kind: str  # manifest | folder | csv
    images: np.ndarray  # N×S×S float32 in [0, 1]
    ids: list[str]
    labels: pd.DataFrame | None = None  # one 0/1 column per finding, rows aligned with images
    prompts: list[str] | None = None
    seeds: list[int] | None = None
    cohorts: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    rows: pd.DataFrame | None = None  # manifest sets: sex, age, masks, realised_boxes, aligned with images

    def __len__(self) -> int:
        return len(self.ids)


def _pick(n: int, limit: int | None) -> np.ndarray:
    """Evenly spaced indices: a deterministic subsample of at most `limit` of n."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def load_set(source: str | Path, size: int, image_root: str | Path | None = None,
             limit: int | None = None) -> ImageSet:
    path = Path(source)
    if not path.exists():
        raise UserError("no such file or folder", path)
    if path.is_dir() and ((path / "manifest.parquet").exists() or (path / ".parts").is_dir()):
        return _from_manifest(path, size, limit)
    if path.is_dir():
        return _from_folder(path, size, limit)
    if path.suffix.lower() in (".csv", ".gz"):
        return _from_csv(path, size, image_root, limit)
    raise UserError("expected a chexforge output folder, a folder of images or a label CSV", path)


def _from_manifest(path: Path, size: int, limit: int | None) -> ImageSet:
    from ..export.manifest import read_manifest
    from ..store import open_store

    df = read_manifest(open_store(str(path))).to_pandas()
    df = df[(df["status"] == "ok") & df["image_png"].notna()].reset_index(drop=True)
    if df.empty:
        raise UserError("no finished PNG images in this chexforge output folder", path)
    df = df.iloc[_pick(len(df), limit)].reset_index(drop=True)
    images = np.stack([read_gray(path / rel, size) for rel in df["image_png"]])
    findings = [f for f in FINDING_NAMES if f in df]
    labels = df[findings].fillna(0).astype(float) if findings else None
    return ImageSet(str(path), "manifest", images, df["job_id"].astype(str).tolist(), labels,
                    df["prompt"].astype(str).tolist(), [int(s) for s in df["seed"]], df["cohort"].astype(str).tolist(),
                    rows=df[[c for c in ("sex", "age", "masks", "realised_boxes") if c in df]].reset_index(drop=True))


def _from_folder(path: Path, size: int, limit: int | None) -> ImageSet:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"no images ({', '.join(SUFFIXES)}) in this folder", path)
    files = [files[i] for i in _pick(len(files), limit)]
    images = np.stack([read_gray(p, size) for p in files])
    return ImageSet(str(path), "folder", images, [str(p.relative_to(path)) for p in files])


def _from_csv(path: Path, size: int, image_root: str | Path | None, limit: int | None) -> ImageSet:
    from ..labels.readers import read_labels

    df = read_labels(path)
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise UserError("--image-root: no such folder (where the label file's image paths start)", root)
    found = resolve_images(root, df["image"].astype(str).tolist())
    exists = np.array([f is not None for f in found])
    if not exists.any():
        raise UserError(f"none of the {len(df)} images the label file names is under {root} (give --image-root: "
                        "the folder its image paths start from)", path)
    notes = [f"{int((~exists).sum())} of {len(df)} listed images are missing under {root}; skipped"] if not exists.all() else []
    files = [f for f in found if f is not None]
    df = df[exists].reset_index(drop=True)
    keep = _pick(len(df), limit)
    df = df.iloc[keep].reset_index(drop=True)
    images = np.stack([read_gray(files[i], size) for i in keep])
    labels = df[list(FINDING_NAMES)].astype(float)  # NaN (unknown) stays NaN
    return ImageSet(str(path), "csv", images, df["image"].astype(str).tolist(), labels, notes=notes)


def resolve_images(root: Path, names: list[str]) -> list[Path | None]:
    """Each listed image's file under `root`: the path as written (CheXpert's Path column, from
    the folder that holds CheXpert-v1.0-small/), else a file of that name, or of that stem with an
    image suffix, anywhere below `root`. The second lookup serves releases that list bare file names
    but store them in subfolders: NIH ChestX-ray14 (images_001/images/…png) and PadChest (0/…54/).
    The folder is walked once, only when some name is not found as written."""
    direct = [root / n for n in names]
    out: list[Path | None] = [p if p.is_file() else None for p in direct]
    if all(p is not None for p in out):
        return out
    index: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in SUFFIXES and p.is_file():
            index.setdefault(p.name, p)  # the first of any duplicate name, in sorted order
            index.setdefault(p.stem, p)
    return [p if p is not None else index.get(Path(n).name) or index.get(n) for p, n in zip(out, names)]
