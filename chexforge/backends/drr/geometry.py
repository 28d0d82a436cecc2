"""Acquisition geometry: where the source, detector and patient are for one radiograph.

World frame = the phantom's patient frame (RAS, mm, origin at the CT centre) before the
patient is moved. A PA exposure puts the source behind the patient (-y) and the detector in
front (+y); AP is the reverse, with a shorter source distance and the patient further from the
detector (portable bedside films), hence more magnification. Either way the image is shown as
radiographs are read: the patient's left on the viewer's right, head up.

Patient variation is an affine map applied to the patient (so rays are mapped back by its
inverse): anisotropic body scaling, inspiration depth (cranio-caudal stretch about the lung
apices, moving the diaphragm), rotation and translation. Path lengths are measured in the
world frame, so a larger patient really attenuates more.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .ct import Phantom

# Typical set-ups: source-to-image distance, distance from the patient's mid-plane to the detector.
# Beams run along y (frontal views) or x (lateral); the detector lies on the `toward_detector`
# side of that axis. LL (left lateral): the patient's left side against the detector (-x), the
# standard lateral, which keeps the heart close to the detector and sharp.
VIEWS = {
    "PA": {"sid": 1800.0, "sid_sd": 40.0, "odd": 140.0, "odd_sd": 15.0, "beam_axis": 1, "toward_detector": +1.0},
    "AP": {"sid": 1000.0, "sid_sd": 60.0, "odd": 190.0, "odd_sd": 25.0, "beam_axis": 1, "toward_detector": -1.0},
    "LL": {"sid": 1800.0, "sid_sd": 40.0, "odd": 190.0, "odd_sd": 20.0, "beam_axis": 0, "toward_detector": -1.0},
}
FIELD_MM = 330.0  # field of view at the patient's mid-plane
LUNGS_IN_FIELD_MM = 280.0  # the tallest lungs (apex to the deepest recess) a 330 mm field frames with a margin


@dataclass
class Geometry:
    view: str
    size: int
    sid: float  # source-to-image distance, mm
    odd: float  # isocentre-to-detector distance, mm
    field_mm: float  # field of view at the isocentre
    aim: tuple[float, float]  # (horizontal, z) the central ray passes through, patient mm; horizontal
    # is x for frontal views, y for the lateral
    angles_deg: tuple[float, float, float]  # patient rotation about x (tilt), y (roll), z (rotation)
    shift_mm: tuple[float, float, float]
    scale: tuple[float, float, float]  # body scaling (x, y, z)
    inspiration: float  # cranio-caudal stretch of the chest about the apices
    apex_z: float

    @property
    def magnification(self) -> float:
        return self.sid / (self.sid - self.odd)

    @property
    def pixel_mm(self) -> float:
        """Detector pixel pitch (mm)."""
        return self.field_mm * self.magnification / self.size

    def as_meta(self) -> dict:
        d = asdict(self)
        d["magnification"] = self.magnification
        d["pixel_mm"] = self.pixel_mm
        return d

    def patient_matrix(self) -> np.ndarray:
        """4×4 map from the patient's (phantom) frame to the world frame."""
        insp = np.eye(4)
        insp[2, 2] = self.inspiration
        insp[2, 3] = self.apex_z * (1 - self.inspiration)
        scale = np.diag([*self.scale, 1.0])
        rot = np.eye(4)
        rot[:3, :3] = _rotation(np.radians(self.angles_deg))
        move = np.eye(4)
        move[:3, 3] = self.shift_mm
        return move @ rot @ scale @ insp

    def rays(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Source (3,) and detector pixel centres (size*size, 3), world mm, row-major from top-left."""
        toward = VIEWS[self.view]["toward_detector"]
        sod = self.sid - self.odd
        h0, z0 = self.aim
        n = self.size
        pitch = self.pixel_mm
        c = (torch.arange(n, dtype=torch.float64, device=device) - (n - 1) / 2) * pitch
        rows, cols = torch.meshgrid(c, c, indexing="ij")
        depth = torch.full_like(rows, toward * self.odd)
        # Rows run toward the feet (-z). Frontal: columns run toward the patient's left (-x), so
        # the left is on the viewer's right. Lateral: toward the back (-y), so the patient faces
        # the viewer's left, as laterals are hung.
        if VIEWS[self.view]["beam_axis"] == 1:
            tgt = torch.stack([h0 - cols, depth, z0 - rows], dim=-1)
            src = torch.tensor([h0, -toward * sod, z0], dtype=torch.float64, device=device)
        else:
            tgt = torch.stack([depth, h0 - cols, z0 - rows], dim=-1)
            src = torch.tensor([-toward * sod, h0, z0], dtype=torch.float64, device=device)
        return src, tgt.reshape(-1, 3)


def _rotation(a: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(a)
    sx, sy, sz = np.sin(a)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Framing:
    """What the exposure needs to know of a virtual patient: its size relative to the CT
    (deform.body_scale) and where its lungs' lowest and highest points are (CT mm, z)."""

    scale: tuple[float, float, float]
    lung_z: tuple[float, float]


def sample_geometry(view: str, size: int, job: dict, phantom: Phantom, rng: np.random.Generator,
                    variation: float = 1.0, body: Framing | None = None) -> Geometry:
    """Draw a plausible exposure for one job. `body`: the virtual patient's size and lungs;
    without one, the CT's person scaled by a habitus drawn here."""
    v = VIEWS[view]
    h = 0 if v["beam_axis"] == 1 else 1  # the patient axis along the image's rows
    lo, hi = phantom.lung_extent_mm
    female = job.get("sex") == "F"
    age = float(job.get("age") or 60)

    def jitter(sd: float) -> float:
        return float(rng.normal(0.0, sd * variation))

    if body is None:
        habitus = 0.96 if female else 1.0  # smaller average chest
        scale = (habitus * (1 + jitter(0.04)), habitus * (1 + jitter(0.05)), habitus * (1 + jitter(0.03)))
        # Portable AP films are often shallower breaths; older patients a little shallower too.
        insp_mean = (0.95 if view == "AP" else 1.0) - max(0.0, age - 60) * 0.0008
        inspiration = float(np.clip(insp_mean + jitter(0.03), 0.85, 1.1))
    else:  # the patient's own lungs and size; this exposure's breath hold varies a little
        scale = tuple(float(s) for s in body.scale)
        lo, hi = lo.copy(), hi.copy()
        lo[2], hi[2] = body.lung_z
        inspiration = float(np.clip((0.95 if view == "AP" else 1.0) + jitter(0.02), 0.88, 1.06))
    return Geometry(
        view=view,
        size=size,
        sid=v["sid"] + jitter(v["sid_sd"]),
        odd=max(60.0, v["odd"] + jitter(v["odd_sd"])),
        # A larger patient gets a larger field (collimated to the chest), so the lungs fit.
        # (and tall lungs a taller one: the costophrenic recesses stay on the film).
        field_mm=FIELD_MM * max(1.0, scale[h], float(hi[2] - lo[2]) * scale[2] / LUNGS_IN_FIELD_MM) * (1 + jitter(0.02)),
        aim=(float((lo[h] + hi[h]) / 2 * scale[h]), float(((lo[2] + hi[2]) / 2 + 10.0) * scale[2])),
        angles_deg=(jitter(2.5), jitter(1.5), jitter(3.0)),
        shift_mm=(jitter(6.0), jitter(4.0), jitter(8.0)),
        scale=scale,
        inspiration=inspiration,
        apex_z=float(hi[2]),
    )


def canonical_geometry(view: str, size: int, phantom: Phantom, body: Framing | None = None) -> Geometry:
    """The unjittered set-up (used by benchmarks and tests)."""
    return sample_geometry(view, size, {"sex": "M", "age": 60}, phantom, np.random.default_rng(0), variation=0.0, body=body)
