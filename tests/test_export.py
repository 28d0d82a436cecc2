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


def dciodvfy(path) -> str:
    exe = shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (Debian dicom3tools) must be installed in CI; .ci/run installs it")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True)
    return proc.stdout + proc.stderr


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
    row.update(job_id="a", cohort="c", status="ok", image_png="images/c/a.png", size=200,
               realised_boxes=[{"label": "Nodule", "x0": 0.1, "y0": 0.2, "x1": 0.3, "y1": 0.5}])
    coco = build_coco(pa.Table.from_pylist([row], schema=manifest_schema()))
    (ann,) = coco["annotations"]
    assert ann["bbox"] == [20.0, 40.0, 40.0, 60.0] and ann["area"] == 2400.0
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert names[ann["category_id"]] == "Nodule"
    assert coco["images"][0]["file_name"] == "images/c/a.png"
