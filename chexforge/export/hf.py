"""The output folder as a Hugging Face dataset: `datasets.load_dataset("path/to/out")` from any
directory gives one labelled row per generated image, with its masks and boxes.

How `datasets` reads a local folder (5.x, `load.py` and `packaged_modules/folder_based_builder`):
the README's YAML `configs` name the data files; the builder is picked from their most common
extension (a metadata file never decides), so PNG files among them pick `imagefolder`. An
`imagefolder` that finds a `metadata.parquet` among its data files makes one row per metadata row
(not per image file), turns `file_name` into the `image` column and `*_file_names` lists into lists
of images, each path taken relative to the metadata file's folder (never `..`, never absolute), so
the folder loads the same from any working directory. The types come from the config's `features`
(the builder keeps them; without them it would infer plain strings and ints from the file), and
`dataset_info.features` repeats them for the Hub's viewer.

So the folder gets `metadata.parquet` at its root (next to images/ and masks/), one row per ok
image with a PNG, and the card's data files are that file and `images/**/*.png` only: masks,
contact sheets and DICOM are never read as samples. The file is streamed batch by batch from the
manifest into a temporary file that replaces the old one only when complete (Store.open_write),
and rewritten with the card whenever a run, a resume or a merge writes it.

No `datasets` import here: it is an optional dependency (extra `loaders`). The features are
written in the YAML form `datasets.Features._to_yaml_list` gives (tests/test_hf_dataset.py
checks them against the real library).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..contracts.vocabulary import ANATOMY, FINDING_NAMES, FINDINGS, SEXES, VIEWS
from ..plan.summary import ok_mask, record_batches
from ..store import Store

METADATA = "metadata.parquet"
# What the dataset is: the metadata and the images it names. A glob over images/ must be there
# (it makes `datasets` choose imagefolder); rows come from the metadata alone.
DATA_FILES = [METADATA, "images/**/*.png"]
LOCALIZABLE = tuple(f.name for f in FINDINGS if f.localizable)
ROW_GROUP = 8192  # rows per Parquet row group: `datasets` reads the file a row group at a time

# Manifest columns read (optional ones may be absent in old manifests: read as null).
_COLUMNS = ["job_id", "cohort", "status", "image_png", "sha256_png", "patient_id", "study_id", "seed", "view", "sex", "age",
            "race", "prompt", "size", "masks", "realised_boxes", *FINDING_NAMES]

SCHEMA = pa.schema([
    ("file_name", pa.string()),  # → `image`
    ("job_id", pa.string()),
    ("cohort", pa.string()),
    ("patient_id", pa.string()),
    ("study_id", pa.string()),
    ("view", pa.string()),
    ("sex", pa.string()),
    ("age", pa.int16()),
    ("race", pa.string()),
    ("findings", pa.list_(pa.string())),
    ("masks_file_names", pa.list_(pa.string())),  # → `masks`, a list of images
    ("mask_labels", pa.list_(pa.string())),  # what each mask outlines, in the same order
    ("objects", pa.struct([("bbox", pa.list_(pa.list_(pa.float32(), 4))), ("category", pa.list_(pa.string()))])),
    ("prompt", pa.string()),
    ("seed", pa.int64()),
])


@dataclass
class HfSummary:
    """What the metadata holds, for the card's features: the class names seen (after the fixed
    vocabulary, so a label keeps its number across chexforge datasets) and the row count."""

    rows: int = 0
    fingerprint: str = ""  # SHA-256 over the rows and their files' SHA-256: see card_metadata
    cohorts: list[str] = field(default_factory=list)  # first-seen order
    sexes: list[str] = field(default_factory=lambda: list(SEXES))
    views: list[str] = field(default_factory=lambda: list(VIEWS))
    # Anatomy, then the findings that can be outlined, in the vocabulary's order; a label the
    # manifest has beyond these (a newer backend's) goes after them.
    mask_labels: list[str] = field(default_factory=lambda: [*ANATOMY, *LOCALIZABLE])
    box_labels: list[str] = field(default_factory=lambda: list(LOCALIZABLE))

    def see(self, names: list[str], values: Iterable) -> None:
        names.extend(dict.fromkeys(v for v in values if v is not None and v not in names))


def _column(batch: pa.RecordBatch, name: str, type_: pa.DataType) -> pa.Array:
    if name in batch.schema.names:
        return batch.column(name)
    return pa.nulls(batch.num_rows, type_)


def _rows(batch: pa.RecordBatch, summary: HfSummary, digest) -> pa.RecordBatch | None:
    """The metadata rows of one manifest batch: its ok rows that have a PNG."""
    keep = pc.and_(ok_mask(batch), pc.invert(pc.is_null(_column(batch, "image_png", pa.string()))))
    batch = batch.filter(keep)
    if not batch.num_rows:
        return None
    cols = {name: _column(batch, name, SCHEMA.field(name).type if name in SCHEMA.names else pa.string())
            for name in ("job_id", "cohort", "patient_id", "study_id", "view", "sex", "race", "prompt", "seed")}
    cols["age"] = pc.cast(_column(batch, "age", pa.int16()), pa.int16())
    # Findings: every finding column that is not 0 (the card's and inspect's rule), vocabulary order.
    flags = [(f, _column(batch, f, pa.int8()).to_pylist()) for f in FINDING_NAMES]
    findings = [[f for f, v in flags if v[i]] for i in range(batch.num_rows)]
    masks = _column(batch, "masks", pa.list_(pa.struct([("name", pa.string()), ("path", pa.string())]))).to_pylist()
    boxes = _column(batch, "realised_boxes", pa.list_(pa.struct([]))).to_pylist()
    sizes = _column(batch, "size", pa.int16()).to_pylist()
    objects = []
    for row_boxes, size in zip(boxes, sizes):
        # COCO's convention (and coco.json's numbers): [x, y, width, height] in pixels of the image.
        row_boxes, size = row_boxes or [], float(size or 0)
        objects.append({
            "bbox": [[b["x0"] * size, b["y0"] * size, (b["x1"] - b["x0"]) * size, (b["y1"] - b["y0"]) * size]
                     for b in row_boxes],
            "category": [b["label"] for b in row_boxes],
        })
    masks = [m or [] for m in masks]
    out = pa.record_batch({
        "file_name": batch.column("image_png"),
        **cols,
        "findings": pa.array(findings, pa.list_(pa.string())),
        "masks_file_names": pa.array([[m["path"] for m in row] for row in masks], pa.list_(pa.string())),
        "mask_labels": pa.array([[m["name"] for m in row] for row in masks], pa.list_(pa.string())),
        "objects": pa.array(objects, SCHEMA.field("objects").type),
    }, schema=SCHEMA)
    summary.rows += out.num_rows
    digest.update(out.serialize())
    shas = zip(_column(batch, "sha256_png", pa.string()).to_pylist(), masks)
    digest.update("\n".join(f"{png} {' '.join(m.get('sha256') or '' for m in row)}" for png, row in shas).encode())
    summary.see(summary.cohorts, pc.unique(cols["cohort"]).to_pylist())
    summary.see(summary.sexes, pc.unique(cols["sex"]).to_pylist())
    summary.see(summary.views, pc.unique(cols["view"]).to_pylist())
    summary.see(summary.mask_labels, (m["name"] for row in masks for m in row))
    summary.see(summary.box_labels, (c for o in objects for c in o["category"]))
    return out


def write_metadata(store: Store, manifest: pa.Table | Iterable[pa.RecordBatch]) -> HfSummary:
    """Write metadata.parquet from the manifest, a batch at a time (never a table of all rows),
    replacing the old file only once the new one is whole. With no row to list (no ok image with a
    PNG), any old file is removed: the card then declares no data files."""
    summary, digest = HfSummary(), hashlib.sha256()
    with store.open_write(METADATA) as f, pq.ParquetWriter(f, SCHEMA, compression="zstd") as writer:
        pending: list[pa.RecordBatch] = []
        for batch in record_batches(manifest):
            rows = _rows(batch, summary, digest)
            if rows is not None:
                pending.append(rows)
            # Gather ok rows into full row groups: a manifest batch may hold few of them.
            if sum(b.num_rows for b in pending) >= ROW_GROUP:
                writer.write_table(pa.Table.from_batches(pending), row_group_size=ROW_GROUP)
                pending = []
        if pending:
            writer.write_table(pa.Table.from_batches(pending), row_group_size=ROW_GROUP)
    if not summary.rows:
        store.remove(METADATA)
    summary.fingerprint = digest.hexdigest()
    return summary


# ---- the card's YAML: features in datasets' own YAML form -------------------------------------

def _class_label(names: list[str]) -> dict:
    return {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}}


def features(summary: HfSummary) -> list[dict]:
    """The `features` of the dataset, as `datasets.Features._to_yaml_list` writes them.

    Findings are one multi-label column (a list of class labels over the whole vocabulary, as
    multi-label sets on the Hub such as NIH ChestX-ray14 are laid out), so a label has the same
    number in every chexforge dataset; boxes follow the `objects` layout of the transformers
    object-detection guide (`bbox` as COCO [x, y, width, height] pixels, `category`)."""
    return [
        {"name": "image", "dtype": "image"},
        {"name": "job_id", "dtype": "string"},
        {"name": "cohort", "dtype": _class_label(summary.cohorts)},
        {"name": "patient_id", "dtype": "string"},
        {"name": "study_id", "dtype": "string"},
        {"name": "view", "dtype": _class_label(summary.views)},
        {"name": "sex", "dtype": _class_label(summary.sexes)},
        {"name": "age", "dtype": "int16"},
        {"name": "race", "dtype": "string"},
        {"name": "findings", "list": _class_label(list(FINDING_NAMES))},
        {"name": "masks", "list": "image"},
        {"name": "mask_labels", "list": _class_label(summary.mask_labels)},
        {"name": "objects", "struct": [
            {"name": "bbox", "list": {"list": "float32", "length": 4}},
            {"name": "category", "list": _class_label(summary.box_labels)},
        ]},
        {"name": "prompt", "dtype": "string"},
        {"name": "seed", "dtype": "int64"},
    ]


def card_metadata(summary: HfSummary) -> dict:
    """The `configs` and `dataset_info` entries of the card's YAML (empty with no rows: then
    there is nothing for `load_dataset` to read)."""
    if not summary.rows:
        return {}
    feats = features(summary)  # two copies below: a YAML dump would write one as an alias of the other
    return {
        # The config's own features are what the imagefolder builder types the rows with;
        # dataset_info repeats them for the Hub.
        # `datasets` caches a local folder under its name and a hash of the card alone (not its
        # path, not its files' times): two folders called `out` with the same features, or one
        # folder before and after a resume, would share a cache entry and load each other's rows.
        # The rows' fingerprint in the config's description makes the card, and so the cache
        # entry, differ whenever the rows or their files do.
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": list(DATA_FILES)}],
                     "description": f"{summary.rows} chexforge images; rows and files sha256 {summary.fingerprint}",
                     "features": feats}],
        # No `splits` here: datasets wants their size in bytes after its own encoding, unknown here.
        "dataset_info": {"features": features(summary)},
    }


def size_category(n: int) -> str:
    """The Hub's size_categories bucket for n rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "10M<n<100M"
