"""DICOM Segmentation (SEG, PS3.3 A.51) of one image's masks, with highdicom.

One SEG per DX image, one BINARY segment per mask the job wrote (anatomy: lungs, lung_left,
lung_right, heart; and each finding's mask), in the order of the mask names, so segment k is the
k-th mask PNG of the manifest row. It references its DX image (Referenced Series Sequence and
each frame's Source Image Sequence), shares its patient and study, and sits in a series of its own
per view (SeriesNumber 100 + the image's).

Deterministic like the DX file: UIDs hash the job id (SOP instance) and the study id (series),
content and series date/time are the image's, and the two values highdicom draws at construction
(InstanceCreationDate/Time from the clock, the DimensionOrganizationUID at random) are replaced
after it, so a re-run writes the same bytes.

Codes: SNOMED CT. Anatomy is category "Anatomical Structure" (91723000) with type Lung (39607008,
laterality in SegmentedPropertyTypeModifierCodeSequence: left, right, or right and left) or Heart
(80891009); findings are "Morphologically Altered Structure" (49755003) with the finding's own
concept where one exists, else that concept again (the label names the finding); support devices
are "Physical object" (260787004), type Device.
"""

from __future__ import annotations

import io
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from .. import __version__
from .dicom import DEIDENTIFICATION, descriptions, job_uid, series_uid, taken_at

SCT = "SCT"
ANATOMY = Code("91723000", SCT, "Anatomical Structure")
ALTERED = Code("49755003", SCT, "Morphologically Altered Structure")
OBJECT = Code("260787004", SCT, "Physical object")
LUNG, HEART = Code("39607008", SCT, "Lung"), Code("80891009", SCT, "Heart")
LEFT, RIGHT, BOTH = Code("7771000", SCT, "Left"), Code("24028007", SCT, "Right"), Code("51440002", SCT, "Right and left")
# (category, type, laterality modifier) of each anatomy mask name.
STRUCTURES = {"lungs": (ANATOMY, LUNG, BOTH), "lung_left": (ANATOMY, LUNG, LEFT),
              "lung_right": (ANATOMY, LUNG, RIGHT), "heart": (ANATOMY, HEART, None)}
# The findings' own SNOMED CT concepts. Those DICOM's dictionary (PS3.16) lists are taken from it
# (Nodule, Mass, Lesion, Pleural effusion, Pneumothorax, Pulmonary edema, Cardiomegaly); the
# others are the clinical-finding concepts for the CheXpert label. Lung Opacity, Enlarged
# Cardiomediastinum and Pleural Other have no one concept: they keep the generic type.
FINDING_TYPES = {
    "Nodule": Code("27925004", SCT, "Nodule"),
    "Mass": Code("4147007", SCT, "Mass"),
    "Lung Lesion": Code("52988006", SCT, "Lesion"),
    "Effusion": Code("60046008", SCT, "Pleural effusion"),
    "Pneumothorax": Code("36118008", SCT, "Pneumothorax"),
    "Edema": Code("19242006", SCT, "Pulmonary edema"),
    "Cardiomegaly": Code("287272002", SCT, "Cardiomegaly"),
    "Consolidation": Code("95436008", SCT, "Lung consolidation"),
    "Pneumonia": Code("233604007", SCT, "Pneumonia"),
    "Atelectasis": Code("46621007", SCT, "Atelectasis"),
    "Fracture": Code("33737001", SCT, "Fracture of rib"),
}
DEVICE = Code("49062001", SCT, "Device")
# Algorithm family (CID 7162, extensible): none of its codes says "the generator drew the image
# from this mask", which is what every chexforge mask is (exact by construction, neither a
# segmentation of the pixels nor a model's guess), so a local code says it.
FAMILY = Code("GENERATOR", "99CHEXFORGE", "Label drawn by the image's generator")


def segment_code(name: str) -> tuple[Code, Code, Code | None]:
    """(category, type, type modifier) of a mask name."""
    if name in STRUCTURES:
        return STRUCTURES[name]
    if name == "Support Devices":
        return OBJECT, DEVICE, None
    return ALTERED, FINDING_TYPES.get(name, ALTERED), None


def seg_bytes(dx: bytes, masks: dict[str, np.ndarray], job: dict[str, Any], series: int = 1) -> bytes:
    """The SEG of the DX file `dx` (its bytes, as written) holding `masks` (name → bool H×W, the
    image's size), one segment each, in sorted name order."""
    # A projection image's PixelSpacing would become a Pixel Measures item without SliceThickness
    # (a radiograph has none), which highdicom 0.28 writes but its own reader (segread) refuses;
    # the SEG is read against its DX image, whose spacing stays authoritative, so the SEG has none.
    source = pydicom.dcmread(io.BytesIO(dx))
    for keyword in ("PixelSpacing", "PixelSpacingCalibrationType", "PixelSpacingCalibrationDescription"):
        if keyword in source:
            delattr(source, keyword)
    names = sorted(masks)
    if not names:
        raise ValueError("a SEG needs at least one mask")
    stack = np.stack([np.asarray(masks[n], dtype=bool) for n in names], axis=-1)[None]  # (1, H, W, segments)
    algorithm = hd.AlgorithmIdentificationSequence(name=f"chexforge {job.get('backend') or 'generator'}"[:64],
                                                   version=__version__, family=FAMILY)
    segments = []
    for number, name in enumerate(names, start=1):
        category, kind, modifier = segment_code(name)
        item = hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=job_uid(job, f"segment:{name}"), tracking_id=name[:64])
        if modifier is not None:
            item.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(modifier.value, modifier.scheme_designator, modifier.meaning)]
        segments.append(item)
    when = taken_at(job, series)
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=stack, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=series_uid(job, f"seg-series:{job.get('view') or 'PA'}"),
        series_number=100 + max(series, 1), sop_instance_uid=job_uid(job, "seg"), instance_number=1,
        manufacturer="chexforge", manufacturer_model_name="chexforge masks", software_versions=__version__,
        device_serial_number="0", transfer_syntax_uid=ExplicitVRLittleEndian,
        content_description="Masks of the synthetic image"[:64], content_label="MASKS",
        content_creator_name="chexforge^", omit_empty_frames=False,
        series_description=f"Masks, {descriptions(job)[1]}"[:64],
        content_date=when.date(), content_time=when.time(), series_date=when.date(), series_time=when.time())
    # What highdicom leaves to the clock and to chance, fixed (see the module doc).
    seg.InstanceCreationDate, seg.InstanceCreationTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    for item in seg.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")
    organization = job_uid(job, "seg-dimensions")
    for item in seg.DimensionOrganizationSequence:
        item.DimensionOrganizationUID = organization
    for item in seg.DimensionIndexSequence:
        item.DimensionOrganizationUID = organization
    # General Image: a SEG without a frame of reference says how its rows and columns lie, as
    # its image does.
    seg.PatientOrientation = source.PatientOrientation
    scheme = Dataset()  # the local coding scheme of FAMILY, declared as SOP Common asks
    scheme.CodingSchemeDesignator = FAMILY.scheme_designator
    scheme.CodingSchemeName = "chexforge local codes"
    scheme.CodingSchemeResponsibleOrganization = "chexforge"
    seg.CodingSchemeIdentificationSequence = [scheme]
    seg.SyntheticData = "YES"
    seg.PatientIdentityRemoved = "YES"
    seg.DeidentificationMethod = DEIDENTIFICATION
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
