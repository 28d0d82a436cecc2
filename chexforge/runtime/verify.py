"""`chexforge verify OUT` as a function: every file of a dataset re-hashed against its manifest.

Lists the files the manifest names that are missing, those whose bytes changed (size or SHA-256
differ from the manifest's), the files under images/, dicom/ and masks/ that no manifest row
names (orphans), and the manifest files that do not read whole. A resumed `generate` checks
files cheaply (present, at the recorded size); this is the full check, for silent corruption.

Memory: the manifest's file columns, and 8 bytes per listed file (a hash of its path) to find
orphans; files are hashed a chunk at a time on a few threads.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .. import atomic
from ..contracts import manifest as mc
from ..errors import UserError
from ..export import manifest as mf
from ..store import Store, open_store
from .jobs import in_sorted
from .lock import holder_of

FOLDERS = ("images", "dicom", "masks")  # where every file of a job lives
COLUMNS = ["job_id", "status", "image_png", "sha256_png", "image_dicom", "sha256_dicom", "masks",
           *mc.SEG_COLUMNS, *mc.SIZE_COLUMNS]


@dataclass
class VerifyReport:
    out: str
    jobs: int  # manifest rows (the last one of each job)
    files: int  # files the manifest names, all checked
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)  # "path: what differs"
    orphans: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # "manifest file: why it does not read"
    writer: str | None = None  # a run holding the folder's lock while it was checked (its files in flight show)

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.corrupt) + len(self.orphans) + len(self.damaged)


def verify(out: str, threads: int | None = None, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every file of the dataset in `out` against its manifest (see the module doc)."""
    store = open_store(out)
    if not store.exists(mc.MANIFEST) and not mf.part_names(store):
        raise UserError("no manifest.parquet: not a chexforge output folder", out)
    holder = holder_of(store)  # a run writing here shows its files in flight as orphans: said, not refused
    damaged = [f"{rel}: {why}" for rel, why in mf.damaged(store)]
    table = mf.read_manifest(store, COLUMNS, on_damaged=lambda e: None)
    report = VerifyReport(str(out), table.num_rows, 0, damaged=damaged,
                          writer=holder.describe() if holder is not None else None)
    listed: list[int] = []
    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for batch in table.to_batches(max_chunksize=1024):
            todo = [f for row in batch.to_pylist() if row["status"] == "ok" for f in _files(row)]
            listed += [_path_key(rel) for rel, _, _ in todo]
            for (rel, _, _), problem in zip(todo, pool.map(lambda f: _check(store, *f), todo)):
                if problem == "missing":
                    report.missing.append(rel)
                elif problem is not None:
                    report.corrupt.append(f"{rel}: {problem}")
            report.files += len(todo)
            if progress:
                progress(report.files)
    known = np.sort(np.array(listed, dtype=np.uint64))
    for rels in _chunks(rel for folder in FOLDERS for rel in store.files(folder)):
        keys = np.array([_path_key(r) for r in rels], dtype=np.uint64)
        report.orphans += [r for r, hit in zip(rels, in_sorted(keys, known)) if not hit]
    return report


def _files(row: dict) -> list[tuple[str, str | None, int | None]]:
    """(path, SHA-256, size or None) of each file a manifest row names."""
    out = [(row[p], row[h], row[b]) for p, h, b in (("image_png", "sha256_png", "bytes_png"),
                                                      ("image_dicom", "sha256_dicom", "bytes_dicom"),
                                                      ("seg_dicom", "sha256_seg", "bytes_seg")) if row.get(p)]
    masks, sizes = row.get("masks") or [], row.get("bytes_masks")
    if sizes is None or len(sizes) != len(masks):
        sizes = [None] * len(masks)
    return out + [(m["path"], m["sha256"], n) for m, n in zip(masks, sizes)]


def _check(store: Store, rel: str, digest: str | None, size: int | None) -> str | None:
    """None when the file is whole; else "missing" or what differs."""
    actual_size = store.size(rel)
    if actual_size is None:
        return "missing"
    if size is not None and actual_size != size:
        return f"{actual_size} bytes, the manifest says {size}"
    local = store.local_path(rel)
    try:
        actual = atomic.sha256_file(local) if local is not None else hashlib.sha256(store.read_bytes(rel)).hexdigest()
    except FileNotFoundError:
        return "missing"
    if digest and actual != digest:
        return f"SHA-256 {actual[:12]}… is not the manifest's {digest[:12]}…"
    return None


def _path_key(rel: str) -> int:
    return int.from_bytes(hashlib.blake2b(rel.encode("utf-8"), digest_size=8).digest(), "little")


def _chunks(items: Iterator[str], size: int = 8192) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


__all__ = ["VerifyReport", "verify"]
