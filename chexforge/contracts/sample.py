"""The backend protocol (DESIGN.md, "Backend protocol").

`generate(batch of jobs) -> list[Sample]`. A job is one row of the job table as a plain dict.
A Sample holds the image as displayed (float32 in [0, 1], H×W, MONOCHROME2: bright = dense),
the masks actually realised, the boxes actually realised, backend metadata (JSON-able, recorded in
the manifest) and, where the backend knows it, the projection geometry. Backends never write files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Projection:
    """How an image was (virtually) exposed: what exporters need (DICOM spacing and distances),
    stated by the backend that knows it, so export never reads a backend's private metadata."""

    pixel_spacing_mm: float  # detector pixel pitch (DICOM ImagerPixelSpacing)
    source_to_detector_mm: float | None = None
    source_to_patient_mm: float | None = None  # to the isocentre
    magnification: float | None = None  # at the isocentre
    kvp: float | None = None


@dataclass
class Sample:
    job_id: str
    image: np.ndarray  # float32 [0, 1], (H, W)
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # name -> bool (H, W)
    boxes: list[dict] = field(default_factory=list)  # {label, x0, y0, x1, y1} normalized
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able facts about this image
    error: str | None = None  # set when this job could not be made (the runtime records it)
    projection: Projection | None = None  # None: the backend knows no geometry (e.g. diffusion)

    def __post_init__(self) -> None:
        if self.error is None:
            assert self.image.dtype == np.float32 and self.image.ndim == 2, "image must be float32 H×W"


@runtime_checkable
class Backend(Protocol):
    name: str

    def identity(self) -> dict[str, Any]:
        """Backend/model name, version and content hash, and sampler settings (for the manifest)."""

    def generate(self, jobs: list[dict[str, Any]]) -> list[Sample]:
        """Make one Sample per job, in order."""
