"""CT libraries: many patients for the DRR backend, so anatomy varies from image to image.

A library (`backend_options: {ct_library: FOLDER}`) is a folder of subject folders, each a CT
folder that `ct.load_phantom` reads: `ct.nii.gz` with `segmentations/<structure>.nii.gz` (the
layout of the public TotalSegmentator data set and of the tool's output) or with
`labels.nii.gz` + `structures.csv`. Structure names are TotalSegmentator's.

Each job draws its patient from its own seed, so a job renders the same patient whatever the
batch, worker or shard. A subject is usable when both lungs and the heart are labelled and the
lungs lie wholly inside the scan (the public data set also holds abdominal, pelvic and head
scans and chests cut off at the apex); unusable subjects are skipped in the same seeded order,
the verdicts cached beside the prepared volumes, and the count of skipped subjects reported.
Prepared phantoms are kept in a small in-memory LRU (`ct_cache` of them).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ...errors import UserError
from .ct import HEART, LUNG_LEFT, LUNG_RIGHT, cache_dir, label_in
from .options import library_subjects, nifti_problem, subject_problem

EDGE_MM = 5.0  # lungs closer than this to the first or last slice count as cut off


def subjects(folder: str | Path) -> list[Path]:
    """Subject folders of a library, in name order."""
    root, found = library_subjects(folder)
    if isinstance(found, str):
        raise UserError(found, root)
    return found


def check_subject(folder: Path) -> str | None:
    """Why a subject cannot be a chest phantom, or None when it can: its files are whole (the CT
    inflated to its last byte, see options.nifti_problem) and its lungs and heart labelled
    inside the scan. Reads only the CT's stream and the lung and heart labels; a damaged file is
    a reason, never an exception."""
    problem = subject_problem(folder) or nifti_problem(folder / "ct.nii.gz", deep=True)
    if problem:
        return problem
    try:
        return _anatomy_problem(folder)
    except UserError as e:
        return e.message
    except Exception as e:  # noqa: BLE001 - nibabel and numpy raise many types for damaged files
        return f"unreadable NIfTI ({type(e).__name__})"


def _anatomy_problem(folder: Path) -> str | None:
    import nibabel as nib

    seg = folder / "segmentations"
    if seg.is_dir():
        def region(names):
            paths = [seg / f"{n}.nii.gz" for n in names if (seg / f"{n}.nii.gz").is_file()]
            if not paths:
                return None, None
            imgs = [nib.as_closest_canonical(nib.load(str(p))) for p in paths]
            return np.any([np.asarray(i.dataobj) > 0 for i in imgs], axis=0), imgs[0].header.get_zooms()
    else:
        from .ct import _structures

        ids_of = _structures(folder / "structures.csv")
        img = nib.as_closest_canonical(nib.load(str(folder / "labels.nii.gz")))
        labels = np.asarray(img.dataobj)

        def region(wanted):
            ids = [ids_of[n] for n in wanted if n in ids_of]
            return (label_in(labels, ids), img.header.get_zooms()) if ids else (None, None)
    for what, names in (("left lung", LUNG_LEFT), ("right lung", LUNG_RIGHT), ("heart", HEART)):
        mask, zooms = region(names)
        if mask is None or not mask.any():
            return f"no {what} labelled"
        if what.endswith("lung"):
            z = np.nonzero(mask.any(axis=(0, 1)))[0]
            margin = EDGE_MM / float(zooms[2])
            if z.min() < margin or z.max() > mask.shape[2] - 1 - margin:
                return f"the {what} is cut off by the scan"
    return None


class Library:
    """Seeded choice of a usable subject per job, with cached verdicts."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        self.subjects = subjects(self.folder)
        listing = "|".join(f"{p.name}:{(p / 'ct.nii.gz').stat().st_mtime_ns}" for p in self.subjects)
        self.digest = hashlib.blake2b(f"{self.folder.resolve()}|{listing}".encode(), digest_size=8).hexdigest()
        self._verdict_file = cache_dir() / "ct" / f"library-{self.digest}.json"
        # The manifest's model_hash: subject names and file sizes, the same wherever the library is
        # copied (the cache key above may use paths and times; reading every CT's bytes would not scale).
        sizes = "|".join(f"{p.name}:{(p / 'ct.nii.gz').stat().st_size}" for p in self.subjects)
        self.identity = hashlib.blake2b(sizes.encode(), digest_size=8).hexdigest()
        self.verdicts: dict[str, str | None] = self._load_verdicts()

    def _load_verdicts(self) -> dict[str, str | None]:
        try:
            return json.loads(self._verdict_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save_verdicts(self) -> None:
        from ...atomic import write_text

        try:
            write_text(self._verdict_file, json.dumps(self.verdicts, indent=0, sort_keys=True))
        except Exception:  # noqa: BLE001 - a cache we cannot write only costs time
            pass

    def usable(self, subject: Path) -> bool:
        if subject.name not in self.verdicts:
            self.verdicts[subject.name] = check_subject(subject)
            self._save_verdicts()
        return self.verdicts[subject.name] is None

    def pick(self, seed: int) -> Path:
        """The job's patient: the first usable subject in an order drawn from the job's seed."""
        order = np.random.default_rng([int(seed) & 0xFFFF_FFFF_FFFF_FFFF, 0xC7]).permutation(len(self.subjects))
        for i in order:
            if self.usable(self.subjects[i]):
                return self.subjects[i]
        reasons = "; ".join(f"{k}: {v}" for k, v in sorted(self.verdicts.items())[:3])
        raise UserError(f"no usable chest CT among {len(self.subjects)} subjects ({reasons})", self.folder)

    def name_of(self, source: str) -> str:
        return Path(source).name

    @property
    def skipped(self) -> dict[str, str]:
        return {k: v for k, v in self.verdicts.items() if v is not None}


class LRU(OrderedDict):
    """The most recently used prepared phantoms (each is tens to hundreds of MB)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or_make(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value
