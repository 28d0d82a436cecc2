"""The manifest row (out/manifest.parquet, DESIGN.md "Manifest"): every job column, plus what
was written (paths relative to out/, SHA-256 of each file), the boxes and masks actually realised,
the backend identity, attempts and timings, and each file's size in bytes (a resumed run checks
files by existence and size; `chexforge verify` by SHA-256). Reading and writing it is
export/manifest.py's work.
"""

from __future__ import annotations

import pyarrow as pa

from .jobs import BOXES, OPTIONAL_JOB_COLUMNS, job_schema

MANIFEST = "manifest.parquet"
PARTS = ".parts"

FILE = pa.struct([("name", pa.string()), ("path", pa.string()), ("sha256", pa.string())])
STATUS_COLUMNS = ["job_id", "status", "error", "image_png", "image_dicom", "cohort"]
# Columns added after the first release: a manifest written before them reads with them null.
SIZE_COLUMNS = ["bytes_png", "bytes_dicom", "bytes_masks", "bytes_seg"]
# The masks as one DICOM SEG per image (path, SHA-256; its size is in SIZE_COLUMNS): null where no
# SEG was written (no dicom format, no masks) and in manifests written before SEGs existed.
SEG_COLUMNS = ["seg_dicom", "sha256_seg"]
# The job's patient columns (patient_id, study_id, patient_seed) likewise: images made before them
# keep null ids.
OPTIONAL_COLUMNS = frozenset(SIZE_COLUMNS) | frozenset(SEG_COLUMNS) | OPTIONAL_JOB_COLUMNS
# What a resumed run reads to decide which jobs are done (files present at their recorded size).
CHECK_COLUMNS = [*STATUS_COLUMNS, "masks", "seg_dicom", *SIZE_COLUMNS]


def manifest_schema() -> pa.Schema:
    extra = [
        pa.field("status", pa.string()),  # ok | failed
        pa.field("error", pa.string()),
        pa.field("image_png", pa.string()),
        pa.field("sha256_png", pa.string()),
        pa.field("image_dicom", pa.string()),
        pa.field("sha256_dicom", pa.string()),
        pa.field("masks", pa.list_(FILE)),
        pa.field("realised_boxes", BOXES),
        pa.field("backend", pa.string()),
        pa.field("backend_version", pa.string()),
        pa.field("model", pa.string()),
        pa.field("model_hash", pa.string()),
        pa.field("sampler", pa.string()),  # JSON
        pa.field("meta", pa.string()),  # JSON, backend facts about this image
        pa.field("attempts", pa.int16()),
        pa.field("seconds_generate", pa.float32()),
        pa.field("seconds_export", pa.float32()),
        pa.field("bytes_png", pa.int64()),  # file sizes: null in manifests written before they were recorded
        pa.field("bytes_dicom", pa.int64()),
        pa.field("bytes_masks", pa.list_(pa.int64())),  # one per entry of `masks`, same order
        pa.field("seg_dicom", pa.string()),  # the masks as a DICOM SEG of image_dicom (null: none written)
        pa.field("sha256_seg", pa.string()),
        pa.field("bytes_seg", pa.int64()),
    ]
    return pa.schema(list(job_schema()) + extra)
