"""The label vocabulary shared by every stage (DESIGN.md, "Label vocabulary").

Findings use the CheXpert-14 names as torchxrayvision spells them, plus localizable lesion
classes. Each finding says which attributes it may carry and how it reads in a report.
"""

from __future__ import annotations

from dataclasses import dataclass

LATERALITIES = ("left", "right", "bilateral")
SEVERITIES = ("small", "moderate", "large")
SEXES = ("F", "M")
VIEWS = ("PA", "AP", "LL")


@dataclass(frozen=True)
class Finding:
    name: str
    laterality: tuple[str, ...] = ()  # allowed lateralities; empty = no laterality
    severity: bool = False  # may carry small/moderate/large
    phrase: str = ""  # report phrase; {severity} and {laterality} are filled in when present
    localizable: bool = False  # has a box / mask of its own


_LR = ("left", "right")
_LRB = LATERALITIES

FINDINGS: tuple[Finding, ...] = (
    Finding("No Finding", phrase="No acute cardiopulmonary abnormality"),
    Finding("Enlarged Cardiomediastinum", severity=True,
            phrase="{severity} enlargement of the cardiomediastinal silhouette", localizable=True),
    Finding("Cardiomegaly", severity=True, phrase="{severity} cardiomegaly", localizable=True),
    Finding("Lung Opacity", _LRB, True, "{severity} {laterality} lung opacity", True),
    Finding("Lung Lesion", _LR, True, "{laterality} lung lesion", True),
    Finding("Edema", (), True, "{severity} pulmonary edema", True),
    Finding("Consolidation", _LRB, True, "{severity} {laterality} consolidation", True),
    Finding("Pneumonia", _LRB, True, "{laterality} pneumonia", True),
    Finding("Atelectasis", _LRB, True, "{severity} {laterality} atelectasis", True),
    Finding("Pneumothorax", _LRB, True, "{severity} {laterality} pneumothorax", True),
    Finding("Effusion", _LRB, True, "{severity} {laterality} pleural effusion", True),
    Finding("Pleural Other", _LRB, True, "{laterality} pleural thickening", True),
    Finding("Fracture", _LR, False, "{laterality} rib fracture", True),
    Finding("Support Devices", (), False, "Support devices in place", True),
    Finding("Nodule", _LR, True, "{severity} {laterality} lung nodule", True),
    Finding("Mass", _LR, True, "{severity} {laterality} lung mass", True),
)

BY_NAME: dict[str, Finding] = {f.name: f for f in FINDINGS}
FINDING_NAMES: tuple[str, ...] = tuple(f.name for f in FINDINGS)
NO_FINDING = "No Finding"

# Findings whose attributes get their own job columns (DESIGN.md: "finding attributes").
LATERAL_FINDINGS = tuple(f.name for f in FINDINGS if f.laterality)
SEVERITY_FINDINGS = tuple(f.name for f in FINDINGS if f.severity)

# Anatomy masks a cohort may ask for; backends say which they can draw.
ANATOMY = ("lungs", "lung_left", "lung_right", "heart")

# Common spellings from other label sets, so a recipe written with them still reads.
ALIASES = {
    "Pleural Effusion": "Effusion",
    "Normal": NO_FINDING,
    "No finding": NO_FINDING,
    "Lung lesion": "Lung Lesion",
}
