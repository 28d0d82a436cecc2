"""Exporters: DICOM that dciodvfy accepts, 16-bit PNG, masks, COCO."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from chexforge.contracts.images import read_gray, read_mask
from chexforge.export.coco import build_coco
from chexforge.export.dicom import dx_bytes
from chexforge.export.png import mask_bytes, png16_bytes

JOB = {"job_id": "0123456789abcdef", "cohort": "demo", "sex": "F", "age": 67, "view": "PA", "race": "Black",
       "prompt": "PA chest radiograph of a 67-year-old woman. Moderate left pleural effusion."}


# SyntheticData (0008,001C) joined the standard after the dicom3tools snapshot Debian ships
# (2022-06), whose dictionary calls it an unknown standard tag; that line, and only it, is not an
# error of ours.
UNKNOWN_TO_DCIODVFY = "(0x0008,0x001c)"


def dciodvfy(path) -> str:
    """dciodvfy's report on a file, without its lines about SyntheticData (see above)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (Debian dicom3tools) must be installed in CI; .ci/run installs it")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True)
    return "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if UNKNOWN_TO_DCIODVFY not in line)


@pytest.mark.parametrize("view", ["PA", "AP", "LL"])
def test_dicom_passes_dciodvfy(tmp_path, view):
    image = np.random.default_rng(0).random((96, 96), dtype=np.float32)
    path = tmp_path / "x.dcm"
    path.write_bytes(dx_bytes(image, {**JOB, "view": view}, 1.4, {"backend": "drr", "model": "ct:bundled"}))
    report = dciodvfy(path)
    assert "DXImageForPresentation" in report
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report


def test_dicom_content(tmp_path):
    image = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(dx_bytes(image, JOB, 1.4)))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.PatientIdentityRemoved == "YES" and "synthetic" in ds.DeidentificationMethod.lower()
    assert ds.PatientSex == "F" and ds.PatientAge == "067Y" and ds.ViewPosition == "PA"
    assert ds.ViewCodeSequence[0].CodeValue == "399066004"
    px = ds.pixel_array
    assert px.dtype == np.uint16 and px.max() == 4095 and px.min() == 0
    assert list(ds.ImagerPixelSpacing) == [1.4, 1.4]


def test_dicom_is_deterministic():
    image = np.random.default_rng(1).random((32, 32), dtype=np.float32)
    assert dx_bytes(image, JOB, 1.0) == dx_bytes(image, JOB, 1.0)
    other = dx_bytes(image, {**JOB, "job_id": "fedcba9876543210"}, 1.0)
    a = pydicom.dcmread(pydicom.filebase.DicomBytesIO(dx_bytes(image, JOB, 1.0)))
    b = pydicom.dcmread(pydicom.filebase.DicomBytesIO(other))
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.StudyInstanceUID != b.StudyInstanceUID


def test_png16_round_trip(tmp_path):
    image = np.random.default_rng(2).random((50, 70), dtype=np.float32)
    path = tmp_path / "x.png"
    path.write_bytes(png16_bytes(image))
    back = read_gray(path)
    assert back.shape == (50, 70)
    assert np.abs(back - image).max() <= 0.5 / 65535 + 1e-7


def test_mask_png_round_trip(tmp_path):
    mask = np.zeros((40, 40), bool)
    mask[5:20, 10:30] = True
    path = tmp_path / "m.png"
    path.write_bytes(mask_bytes(mask))
    assert np.array_equal(read_mask(path), mask)


def test_coco_boxes_in_pixels():
    import pyarrow as pa

    from chexforge.export.manifest import manifest_schema

    row = {f.name: None for f in manifest_schema()}
    row.update(job_id="a", cohort="c", index=0, status="ok", image_png="images/c/a.png", size=200,
               realised_boxes=[{"label": "Nodule", "x0": 0.1, "y0": 0.2, "x1": 0.3, "y1": 0.5}])
    coco = build_coco(pa.Table.from_pylist([row], schema=manifest_schema()))
    (ann,) = coco["annotations"]
    assert ann["bbox"] == [20.0, 40.0, 40.0, 60.0] and ann["area"] == 2400.0
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert names[ann["category_id"]] == "Nodule"
    assert coco["images"][0]["file_name"] == "images/c/a.png"


# ---- studies: the images of one patient's study in DICOM --------------------------------------------

STUDY_RECIPE = """
name: studies
seed: 9
backend: simulated
output: {size: 64, formats: [png, dicom]}
cohorts:
  - name: pairs
    count: 2
    study: {views: [PA, LL]}
    findings: {Effusion: {p: 1.0, laterality: [left, right]}}
  - name: single
    count: 2
"""


def test_the_dicom_files_of_a_study_share_patient_and_study(tmp_path):
    import pyarrow.parquet as pq

    from chexforge.plan import plan
    from chexforge.recipe import load_recipe
    from chexforge.runtime import RunOptions, run

    from .conftest import write

    r = load_recipe(write(tmp_path, STUDY_RECIPE))
    jobs = plan(r)
    run(jobs, r, tmp_path / "out", RunOptions(progress=False))
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert [m["status"] for m in manifest] == ["ok"] * 6
    assert [(m["patient_id"], m["study_id"]) for m in manifest] == \
        list(zip(jobs.column("patient_id").to_pylist(), jobs.column("study_id").to_pylist()))
    files = {m["job_id"]: pydicom.dcmread(tmp_path / "out" / m["image_dicom"]) for m in manifest}
    pairs = [m for m in manifest if m["cohort"] == "pairs"]
    for pa_row, ll_row in (pairs[0:2], pairs[2:4]):
        assert (pa_row["view"], ll_row["view"]) == ("PA", "LL") and pa_row["study_id"] == ll_row["study_id"]
        a, b = files[pa_row["job_id"]], files[ll_row["job_id"]]
        assert a.PatientID == b.PatientID == pa_row["patient_id"]
        assert a.StudyInstanceUID == b.StudyInstanceUID
        assert a.StudyID == b.StudyID and a.AccessionNumber == b.AccessionNumber
        assert a.StudyDate == b.StudyDate and a.StudyTime == b.StudyTime and a.StudyDescription == "pairs"
        assert a.SeriesInstanceUID != b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID
        assert (a.SeriesNumber, b.SeriesNumber) == (1, 2)
        assert (a.SeriesDescription, b.SeriesDescription) == ("PA pairs", "LL pairs")
        assert (a.ViewPosition, b.ViewPosition) == ("PA", "LL")
        assert a.PatientSex == b.PatientSex and a.PatientAge == b.PatientAge
    first, second = (files[m["job_id"]] for m in pairs[0:4:2])
    assert first.PatientID != second.PatientID and first.StudyInstanceUID != second.StudyInstanceUID
    singles = [files[m["job_id"]] for m in manifest if m["cohort"] == "single"]
    assert singles[0].PatientID != singles[1].PatientID and singles[0].StudyInstanceUID != singles[1].StudyInstanceUID
    assert singles[0].SeriesNumber == 1
    from chexforge.labels.readers import read_labels

    labels = read_labels(tmp_path / "out" / "manifest.parquet")  # audit/balance read patients as patients
    assert len(labels) == 6 and labels["patient"].nunique() == 4
    for m in manifest:
        report = dciodvfy(tmp_path / "out" / m["image_dicom"])
        assert "DXImageForPresentation" in report
        assert not [line for line in report.splitlines() if line.startswith("Error")], report


def test_a_job_without_patient_columns_is_its_own_patient_and_study():
    """A job of a table planned before patient_id/study_id (nulls): named by its job id, as before."""
    image = np.random.default_rng(3).random((32, 32), dtype=np.float32)
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(
        dx_bytes(image, {**JOB, "patient_id": None, "study_id": None, "patient_seed": None}, 1.0)))
    assert ds.PatientID == JOB["job_id"] and ds.StudyID == JOB["job_id"] and ds.SeriesNumber == 1
    assert len(ds.StudyDate) == 8 and ds.StudyDate[:2] == "20"
    with_ids = pydicom.dcmread(pydicom.filebase.DicomBytesIO(
        dx_bytes(image, {**JOB, "patient_id": "P" + "1" * 16, "study_id": "S" + "2" * 16}, 1.0, series=3)))
    assert with_ids.PatientID == "P" + "1" * 16 and with_ids.StudyID == "2" * 16 and with_ids.SeriesNumber == 3
    assert with_ids.StudyInstanceUID != ds.StudyInstanceUID
