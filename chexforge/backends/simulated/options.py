"""Options of the simulated backend. Pure pydantic: no torch here."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SimulatedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds_per_batch: float = Field(0.0, ge=0, le=60, description="device time per batch (a sleep: the GIL is free)")
    seconds_per_image: float = Field(0.0, ge=0, le=60, description="device time per image in the batch")
    batch_size: int = Field(8, ge=1, le=1024)
    crash_on: list[int] = Field(default_factory=list, description="job indices whose batch kills the worker process (fault tests)")
    fail_on: list[int] = Field(default_factory=list, description="job indices that raise an error (fault tests)")
    blank_fraction: float = Field(0.0, ge=0, le=1, description="share of seeds that give a flat (blank) image, chosen "
                                  "by the seed alone (QC tests)")
    device: str = Field("cpu", description="accepted for symmetry with real backends; nothing runs on it")
