"""One job's findings, placed in a fixed order so that each respects the ones before it.

Order: pneumothorax first (it rewrites the whole lung: air rim, denser collapsed lung), then
the heart and mediastinum (they push into the lung), lobar collapse, airspace opacities and
edema (inside the lung that is still aerated), fluid at the bases, pleural thickening, focal
lesions (clear of the earlier focal findings as seen from the front, so boxes do not nest),
and last what lies on or outside the lung: rib fractures and support devices.

Later insertions overwrite earlier ones where they are solid, so each earlier label loses those
voxels (`resolve_overlaps`): a mask is always the projection of what the volume really holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ...contracts.jobs import laterality_column, severity_column
from . import devices, findings_fracture, findings_lung, findings_mediastinum, findings_pleura
from .findings import CTR_TARGET, Inserter, Insertion, PlacementError, Region

ORDER = ("Pneumothorax", "Cardiomegaly", "Enlarged Cardiomediastinum", "Atelectasis", "Consolidation",
         "Pneumonia", "Lung Opacity", "Edema", "Effusion", "Pleural Other", "Mass", "Nodule", "Lung Lesion",
         "Fracture", "Support Devices")
RENDERED = ("No Finding", *ORDER)


class JobScene:
    """What one job's findings have done so far, for the findings placed after them."""

    def __init__(self, inserter: Inserter):
        self.ins = inserter
        self.out: list[Insertion] = []
        self.rim: dict[str, np.ndarray] = {}  # side → pneumothorax rim depth (mm) over the lung crop
        self.heart: tuple[np.ndarray, np.ndarray] | None = None  # (centre, scale) of an enlarged heart
        self.used_lobes: set[str] = set()
        self._occupied: np.ndarray | None = None

    def aerated(self, side: str) -> Region:
        """The side's lung in its crop, less a pneumothorax's air rim."""
        lung = self.ins.lung(side)
        if side not in self.rim:
            return lung
        return Region(lung.origin, lung.stop, lung.mask & (self.ins.pleural_mm(side) >= self.rim[side]))

    def pleural_depth(self, side: str) -> np.ndarray:
        """Over the lung crop: distance (mm) to the pleura less a pneumothorax's rim, i.e. how deep
        a voxel lies in the aerated lung as seen from the chest wall."""
        return np.maximum(self.ins.pleural_mm(side) - self.rim.get(side, 0), 0)

    def depth(self, side: str) -> np.ndarray | None:
        """Distance (mm) to the aerated lung's surface over the whole volume (None: the lung's own)."""
        if side not in self.rim:
            return None
        lung = self.ins.lung(side)
        depth = self.ins.inside_mm(side).copy()
        depth[lung.box] = np.maximum(depth[lung.box] - self.rim[side], 0)
        return depth

    def heart_point(self, p: np.ndarray) -> np.ndarray:
        """Where a point of the CT's heart is after cardiomegaly (unchanged without it)."""
        if self.heart is None:
            return p
        c, s = self.heart
        return c + (p - c) * s

    def occupied(self) -> np.ndarray:
        """Voxels held by focal findings so far (for lesions to keep clear of)."""
        if self._occupied is None:
            self._occupied = np.zeros(self.ins.ph.shape, dtype=bool)
            for ins in self.out:
                self.mark(ins)
        return self._occupied

    def mark(self, ins: Insertion) -> None:
        if self._occupied is not None and ins.focal:
            self._occupied[ins.box] |= ins.solid().numpy() > 0

    def add(self, items: Insertion | list[Insertion]) -> None:
        for ins in items if isinstance(items, list) else [items]:
            self.out.append(ins)
            self.mark(ins)


def sides(job: dict[str, Any], finding: str, rng: np.random.Generator, both: bool = True) -> tuple[str, ...]:
    """The requested laterality; a coin toss between left and right when none is given."""
    lat = job.get(laterality_column(finding)) or ("left" if rng.random() < 0.5 else "right")
    if lat == "bilateral":
        if not both:
            raise PlacementError(f"{finding} is one-sided: laterality left or right, not bilateral")
        return ("left", "right")
    if lat not in ("left", "right"):
        raise PlacementError(f"unknown laterality {lat!r} for {finding}")
    return (lat,)


def place_findings(ins: Inserter, job: dict[str, Any], rng: np.random.Generator, ctr_now: float | None = None,
                   device_kinds: Sequence[str] | None = None) -> list[Insertion]:
    """All of a job's findings as insertions into the patient of `ins`. `ctr_now`: the
    cardiothoracic ratio of the normal projection (needed for Cardiomegaly); `device_kinds`:
    the support devices to place (default: drawn, devices.py)."""
    scene = JobScene(ins)
    for finding in ORDER:
        if not job.get(finding):
            continue
        severity = job.get(severity_column(finding))
        if finding == "Cardiomegaly":
            scene.add(_enlarged_heart(ins, scene, severity, rng, ctr_now))
        elif finding == "Effusion":
            for side in sides(job, finding, rng):
                scene.add(ins.effusion(side, severity, rng))
        elif finding in ("Mass", "Nodule", "Lung Lesion"):
            (side,) = sides(job, finding, rng, both=False)
            scene.add(ins.lesion(finding, side, severity, rng, scene.occupied(), scene.depth(side)))
        elif finding == "Pneumothorax":
            for side in sides(job, finding, rng):
                scene.add(findings_pleura.pneumothorax(ins, scene, side, severity, rng))
        elif finding == "Pleural Other":
            for side in sides(job, finding, rng):
                scene.add(findings_pleura.pleural_thickening(ins, scene, side, severity, rng))
        elif finding in ("Consolidation", "Pneumonia", "Lung Opacity"):
            for side in sides(job, finding, rng):
                scene.add(findings_lung.airspace(ins, scene, finding, side, severity, rng))
        elif finding == "Atelectasis":
            for side in sides(job, finding, rng):
                scene.add(findings_lung.atelectasis(ins, scene, side, severity, rng))
        elif finding == "Edema":
            scene.add([findings_lung.edema(ins, scene, side, severity, rng) for side in ("right", "left")])
        elif finding == "Enlarged Cardiomediastinum":
            scene.add(findings_mediastinum.widened_mediastinum(ins, scene, severity, rng))
        elif finding == "Fracture":
            for side in sides(job, finding, rng, both=False):
                scene.add(findings_fracture.rib_fracture(ins, scene, side, rng))
        elif finding == "Support Devices":
            scene.add(devices.support_devices(ins, scene, device_kinds, rng))
    resolve_overlaps(scene.out)
    return scene.out


def _enlarged_heart(ins: Inserter, scene: JobScene, severity: str | None, rng: np.random.Generator,
                    ctr_now: float | None) -> Insertion:
    """The heart scaled from the normal ratio `ctr_now` toward a target drawn for the severity;
    later findings (a pacemaker's leads) follow the enlarged heart through `scene.heart`."""
    lo, hi = CTR_TARGET[severity or "moderate"]
    target = float(rng.uniform(lo, hi))
    item = ins.enlarged_heart(max(1.0, target / max(ctr_now or 0.0, 1e-3)))
    item.meta["ctr_target"] = round(target, 3)
    scene.heart = (np.array(item.meta.pop("heart_center")), np.array(item.meta["heart_scale"]))
    return item


def resolve_overlaps(items: list[Insertion]) -> None:
    """Take out of each label the voxels that a later insertion fills (occupancy >= 0.5). A
    finding left with under a fifth of itself was covered by a later one: a conflicting request."""
    for i, a in enumerate(items):
        before = None
        for b in items[i + 1:]:
            lo = [max(p.start, q.start) for p, q in zip(a.box, b.box)]
            hi = [min(p.stop, q.stop) for p, q in zip(a.box, b.box)]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            over = b.occupancy[tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, b.origin))] >= 0.5
            if not bool(over.any()):
                continue
            label = a.solid() > 0
            before = int(label.sum()) if before is None else before
            here = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, a.origin))
            label[here] &= ~over
            a.label = label
            if a.beyond is not None:
                a.beyond = a.beyond.clone()
                a.beyond[here] &= ~over
            if int(label.sum()) < 0.2 * before:
                raise PlacementError(f"the {a.finding.lower()} would be hidden under the {b.finding.lower()}")
