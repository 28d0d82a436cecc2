"""PACS-grade DICOM (issue 14): DX tags a viewer and a reader rely on, the masks as DICOM SEG
(highdicom), the SEG in the manifest (verify, resume, old manifests), and `chexforge push` to a
real pynetdicom storage SCP started here."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading

import highdicom as hd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest

from chexforge.contracts import manifest as mc
from chexforge.contracts.images import read_gray, read_mask
from chexforge.errors import UserError
from chexforge.export import manifest as mf
from chexforge.export.push import push
from chexforge.export.seg import seg_bytes
from chexforge.runtime.verify import verify
from chexforge.store import open_store

from .conftest import ROOT, job, write
from .test_export import dciodvfy

DX_CLASS, SEG_CLASS = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.66.4"

RECIPE = """
name: pacs
seed: 14
backend: simulated
output: {size: 64, formats: [png, dicom], masks: true}
cohorts:
  - name: sided
    count: 2
    findings: {Effusion: {p: 1.0, laterality: [left, right]}, Nodule: 1.0}
    masks: [lungs, lung_left, heart]
  - name: pairs
    count: 1
    study: {views: [PA, LL]}
    masks: [lungs]
"""


def _run(recipe_path, out):
    from chexforge.plan import plan
    from chexforge.recipe import load_recipe
    from chexforge.runtime import RunOptions, run

    r = load_recipe(recipe_path)
    run(plan(r), r, out, RunOptions(progress=False))
    return pq.read_table(out / mc.MANIFEST).to_pylist()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A few simulated images at 64 px with masks, DX and SEG files (made once for the module)."""
    tmp = tmp_path_factory.mktemp("pacs")
    recipe = write(tmp, RECIPE)
    out = tmp / "out"
    rows = _run(recipe, out)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    return recipe, out, rows


@pytest.fixture(scope="module")
def drr_study(drr64, tmp_path_factory):
    """One DRR patient imaged PA, AP and LL at 64 px, exported as a run would (the writer)."""
    from chexforge.export.writer import export_sample

    store = open_store(tmp_path_factory.mktemp("drr"))
    ids = {"patient_id": "P" + "a" * 16, "study_id": "S" + "b" * 16, "patient_seed": 5}
    out = {}
    jobs = [job(job_id=f"{i:016x}", view=v, size=64, **ids) for i, v in enumerate(("PA", "AP", "LL"), start=1)]
    for n, (j, sample) in enumerate(zip(jobs, drr64.generate(jobs)), start=1):
        row = export_sample(store, j, sample, ["png", "dicom"], True, drr64.identity(), 0.0, series=n)
        out[j["view"]] = (row, sample, store.local_path(""))
    return out


def _dcm(out, rel) -> pydicom.Dataset:
    return pydicom.dcmread(out / rel)


def _errors(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("Error")]


# ---- DX -----------------------------------------------------------------------------------------


def test_dx_and_seg_pass_dciodvfy(dataset, drr_study):
    _, out, rows = dataset
    row = rows[0]
    report = dciodvfy(out / row["image_dicom"])
    assert "DXImageForPresentation" in report and not _errors(report), report
    report = dciodvfy(out / row["seg_dicom"])
    assert "Segmentation" in report and not _errors(report), report
    row, _, root = drr_study["LL"]  # with the geometry's tags: PixelSpacing, distances, KVP
    for rel in (row["image_dicom"], row["seg_dicom"]):
        report = dciodvfy(root / rel)
        assert not _errors(report), report


def test_dx_says_synthetic_and_windows_its_own_range(dataset):
    _, out, rows = dataset
    for row in rows:
        ds = _dcm(out, row["image_dicom"])
        assert ds.SyntheticData == "YES" and ds.PatientIdentityRemoved == "YES"
        method = ds.DeidentificationMethod
        assert len(method) <= 64 and method.endswith("patient") and "synthetic" in method.lower()
        px = ds.pixel_array
        lo, hi = int(px.min()), int(px.max())
        c, w = float(ds.WindowCenter), float(ds.WindowWidth)
        # The window lies inside the pixels' range (not the 12-bit range) and spans most of it.
        assert lo <= c - 0.5 - (w - 1) / 2 and c - 0.5 + (w - 1) / 2 <= hi, (c, w, lo, hi)
        assert w >= 0.5 * (hi - lo), (c, w, lo, hi)
        assert row["cohort"] in ds.StudyDescription and row["cohort"] in ds.SeriesDescription
        assert ds.SeriesDescription.startswith(row["view"])


def test_orientation_follows_the_rendered_anatomy(drr_study):
    """PatientOrientation is checked against where the DRR puts the anatomy, not against a table:
    frontal views show the patient's left lung on the image's right (L\\F, AP included), the
    lateral shows the heart (anterior) left of the lungs' middle (P\\F)."""
    for view in ("PA", "AP"):
        row, sample, root = drr_study[view]
        assert list(_dcm(root, row["image_dicom"]).PatientOrientation) == ["L", "F"]
        assert np.nonzero(sample.masks["lung_left"])[1].mean() > 32
    row, sample, root = drr_study["LL"]
    assert list(_dcm(root, row["image_dicom"]).PatientOrientation) == ["P", "F"]
    assert np.nonzero(sample.masks["heart"])[1].mean() < np.nonzero(sample.masks["lungs"])[1].mean() - 2


def test_distances_magnification_and_patient_plane_spacing(drr_study):
    for row, sample, root in drr_study.values():
        ds, p = _dcm(root, row["image_dicom"]), sample.projection
        sid, sod = float(ds.DistanceSourceToDetector), float(ds.DistanceSourceToPatient)
        mag = float(ds.EstimatedRadiographicMagnificationFactor)
        assert sid == pytest.approx(p.source_to_detector_mm, rel=1e-5) and sod == pytest.approx(p.source_to_patient_mm, rel=1e-5)
        assert mag == pytest.approx(sid / sod, rel=1e-4) and mag > 1
        assert float(ds.KVP) == pytest.approx(p.kvp)
        imager, at_patient = (float(v) for v in ds.ImagerPixelSpacing), [float(v) for v in ds.PixelSpacing]
        assert at_patient == pytest.approx([p.pixel_spacing_mm / mag] * 2, rel=1e-3)
        assert ds.PixelSpacingCalibrationType == "GEOMETRY" and next(imager) > at_patient[0]
    assert float(_dcm(drr_study["AP"][2], drr_study["AP"][0]["image_dicom"]).EstimatedRadiographicMagnificationFactor) > \
        float(_dcm(drr_study["PA"][2], drr_study["PA"][0]["image_dicom"]).EstimatedRadiographicMagnificationFactor)


# ---- SEG ----------------------------------------------------------------------------------------


def test_seg_reads_back_as_the_masks_and_references_its_image(dataset, drr_study):
    _, out, rows = dataset
    cases = [(out, r) for r in rows] + [(root, row) for row, _, root in drr_study.values()]
    for root, row in cases:
        dx, seg = _dcm(root, row["image_dicom"]), hd.seg.segread(root / row["seg_dicom"])
        assert seg.SegmentationType == "BINARY" and seg.SyntheticData == "YES"
        assert (seg.PatientID, seg.StudyInstanceUID) == (dx.PatientID, dx.StudyInstanceUID)
        assert seg.SeriesInstanceUID != dx.SeriesInstanceUID
        assert (seg.StudyDate, seg.ContentDate, seg.InstanceCreationDate) == (dx.StudyDate,) * 3
        ref = seg.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == dx.SeriesInstanceUID
        assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == dx.SOPInstanceUID
        names = [m["name"] for m in row["masks"]]
        assert [s.SegmentLabel for s in seg.SegmentSequence] == names and names
        pixels = seg.get_pixels_by_source_instance([dx.SOPInstanceUID], combine_segments=False)
        assert pixels.shape == (1, dx.Rows, dx.Columns, len(names))
        for k, m in enumerate(row["masks"]):
            assert np.array_equal(pixels[0, :, :, k].astype(bool), read_mask(root / m["path"])), m["name"]


def test_segment_codes():
    image = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    from chexforge.export.dicom import dx_bytes

    j = job(job_id="0" * 16)
    masks = {n: np.eye(32, dtype=bool) for n in ("lungs", "lung_right", "heart", "Effusion", "Lung Opacity", "Support Devices")}
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(seg_bytes(dx_bytes(image, j, 0.5), masks, j)))
    codes = {s.SegmentLabel: (s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
                              s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
                              [m.CodeValue for m in s.SegmentedPropertyTypeCodeSequence[0].get(
                                  "SegmentedPropertyTypeModifierCodeSequence", [])]) for s in seg.SegmentSequence}
    assert codes == {"Effusion": ("49755003", "60046008", []), "Lung Opacity": ("49755003", "49755003", []),
                     "Support Devices": ("260787004", "49062001", []), "heart": ("91723000", "80891009", []),
                     "lung_right": ("91723000", "39607008", ["24028007"]), "lungs": ("91723000", "39607008", ["51440002"])}


def test_seg_is_the_same_bytes_from_the_same_job(dataset):
    """A SEG is a function of its job: made again from the DX file and mask PNGs on disk (later,
    so any clock reading would differ), it is the file byte for byte."""
    _, out, rows = dataset
    for row in rows:
        masks = {m["name"]: read_mask(out / m["path"]) for m in row["masks"]}
        series = 2 if row["view"] == "LL" else 1
        again = seg_bytes((out / row["image_dicom"]).read_bytes(), masks, {**row, "backend": row["backend"]}, series)
        assert again == (out / row["seg_dicom"]).read_bytes(), row["job_id"]
        assert hashlib.sha256(again).hexdigest() == row["sha256_seg"] and len(again) == row["bytes_seg"]


# ---- the manifest: verify, resume, old manifests ------------------------------------------------


def test_verify_resume_and_old_manifests_know_the_seg(dataset, tmp_path):
    recipe, src, rows = dataset
    out = tmp_path / "out"
    shutil.copytree(src, out)
    assert verify(str(out)).problems == 0
    seg = out / rows[0]["seg_dicom"]
    before = seg.read_bytes()
    seg.write_bytes(before[:-10])
    (out / "dicom" / "sided" / "stray_seg.dcm").write_bytes(before)
    report = verify(str(out))
    assert [c.split(":")[0] for c in report.corrupt] == [rows[0]["seg_dicom"]]
    assert report.orphans == ["dicom/sided/stray_seg.dcm"]
    (out / "dicom" / "sided" / "stray_seg.dcm").unlink()
    again = _run(recipe, out)  # the short SEG fails the resume's size check: its job is made again
    assert seg.read_bytes() == before
    assert {r["job_id"]: r["sha256_seg"] for r in again} == {r["job_id"]: r["sha256_seg"] for r in rows}
    # A manifest from before SEGs: the three columns read as null.
    old = pq.read_table(src / mc.MANIFEST).drop_columns(["seg_dicom", "sha256_seg", "bytes_seg"])
    pq.write_table(old, tmp_path / mc.MANIFEST)
    back = mf.read_manifest(open_store(tmp_path), mc.CHECK_COLUMNS)
    assert back.column("seg_dicom").null_count == len(rows) and back.column("bytes_seg").null_count == len(rows)
    assert pa.types.is_int64(back.schema.field("bytes_seg").type)


# ---- push ---------------------------------------------------------------------------------------


class Pacs:
    """A pynetdicom storage SCP on 127.0.0.1 (an ephemeral port) that keeps what it receives."""

    def __init__(self, status: int = 0x0000, refuse: str | None = None):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, SegmentationStorage

        self.received: list[tuple[str, str]] = []  # (SOP class, SOP instance UID)
        self.lock = threading.Lock()
        ae = AE(ae_title="TESTPACS")
        ae.require_called_aet = True  # a wrong --aet is rejected, as a real PACS does
        for sop in (DigitalXRayImageStorageForPresentation, SegmentationStorage):
            ae.add_supported_context(sop)

        def store(event):
            ds = event.dataset
            if refuse is not None and ds.SOPClassUID == refuse:
                return 0xA700  # out of resources
            with self.lock:
                self.received.append((ds.SOPClassUID, ds.SOPInstanceUID))
            return status

        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
        self.to = f"127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()


@pytest.fixture
def pacs():
    server = Pacs()
    yield server
    server.close()


def _expected(out, rows, seg=True):
    files = [f for r in rows for f in (r["image_dicom"], r["seg_dicom"] if seg else None) if f]
    return files, sorted(pydicom.dcmread(out / f, stop_before_pixels=True).SOPInstanceUID for f in files)


def test_push_sends_every_file_once_and_resumes(dataset, pacs, tmp_path):
    _, src, rows = dataset
    out = tmp_path / "out"
    shutil.copytree(src, out)
    files, uids = _expected(out, rows)
    report = push(str(out), pacs.to, "TESTPACS")
    assert (report.sent, report.already, report.failed, report.total) == (len(files), 0, [], len(files))
    assert sorted(u for _, u in pacs.received) == uids
    assert {c for c, _ in pacs.received} == {DX_CLASS, SEG_CLASS}
    state = out / report.state
    assert state.read_text().splitlines() == files and report.state.startswith(".push/TESTPACS@127.0.0.1_")
    again = push(str(out), pacs.to, "TESTPACS")  # nothing new
    assert (again.sent, again.already, again.failed) == (0, len(files), [])
    assert len(pacs.received) == len(files)
    # A kill -9 mid-write leaves a cut last line: it is not taken as confirmed, the next line starts fresh.
    state.write_text("\n".join(files[:2]) + "\n" + files[2][:7])
    resumed = push(str(out), pacs.to, "TESTPACS")
    assert (resumed.sent, resumed.already) == (len(files) - 2, 2)
    assert set(state.read_text().splitlines()) - {files[2][:7]} == set(files)
    assert len(push(str(out), pacs.to, "TESTPACS", again=True, seg=False).failed) == 0
    assert len(pacs.received) == 2 * len(files) - 2 + len(rows)


def test_push_reports_the_peers_failures_and_sends_them_next_time(dataset, tmp_path):
    _, src, rows = dataset
    out = tmp_path / "out"
    shutil.copytree(src, out)
    refusing = Pacs(refuse=SEG_CLASS)
    try:
        report = push(str(out), refusing.to, "TESTPACS")
    finally:
        refusing.close()
    assert report.sent == len(rows) and len(report.failed) == len(rows)
    assert all("status 0xA700" in f and "_seg.dcm" in f for f in report.failed)
    healthy = Pacs()
    try:
        second = push(str(out), healthy.to, "TESTPACS")  # a new destination: its own state file
        assert second.sent == 2 * len(rows)
        third = push(str(out), healthy.to, "TESTPACS")
        assert third.sent == 0
    finally:
        healthy.close()


def test_push_association_failures_are_one_line(dataset, pacs, tmp_path):
    _, out, _ = dataset
    with pytest.raises(UserError, match="rejected the association"):
        push(str(out), pacs.to, "WRONGAET")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "chexforge.cli", "push", str(out), "--to", f"127.0.0.1:{closed}",
                           "--aet", "TESTPACS"], capture_output=True, text=True, cwd=ROOT,  # the bar on: still one line
                          env={**os.environ, "COLUMNS": "3000"}, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"chexforge: error: push: cannot reach 127.0.0.1:{closed} ("), proc.stderr
    for to in ("nohost", "h:0", "h:70000"):
        with pytest.raises(UserError, match="HOST:PORT"):
            push(str(out), to, "TESTPACS")


def test_push_through_the_cli(dataset, pacs, tmp_path):
    _, src, rows = dataset
    out = tmp_path / "out"
    shutil.copytree(src, out)
    cmd = [sys.executable, "-m", "chexforge.cli", "push", str(out), "--to", pacs.to, "--aet", "TESTPACS", "--no-seg",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "3000"}, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"TESTPACS@{pacs.to}: {len(rows)} sent, 0 already there, 0 failed" in proc.stdout
    assert {c for c, _ in pacs.received} == {DX_CLASS}


def test_png_and_dx_pixels_agree(dataset):
    """The DX pixels are the PNG's image at 12 bits (the SEG's masks are checked against the PNGs,
    so all three files show one image)."""
    _, out, rows = dataset
    for row in rows:
        dx = _dcm(out, row["image_dicom"]).pixel_array / 4095.0
        assert np.abs(dx - read_gray(out / row["image_png"])).max() <= 0.5 / 4095 + 0.5 / 65535 + 1e-6  # two roundings
