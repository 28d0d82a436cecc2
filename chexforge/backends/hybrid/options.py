"""Options of the hybrid backend (`backend_options:`). Pure pydantic: no torch here.

The two backends' own option models are reused as nested sections, so every DRR and diffusion
option keeps its meaning, defaults and checks: `drr: {dose: 2}`, `diffusion: {steps: 30}`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..diffusion.options import DiffusionOptions
from ..drr.options import DRROptions


class HybridOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strength: float = Field(
        0.6, ge=0, le=1, description="how far the DRR image is noised before the diffusion model denoises it: "
        "0 = the DRR image itself, 1 = pure diffusion from noise guided by the DRR's masks and boxes; "
        "in between, the DRR image is the init of partial denoising (img2img)")
    control_scale: float = Field(1.0, ge=0, le=4, description="scale of the control branch's residuals (the "
                                 "DRR masks and boxes drawn as the control image)")
    drr: DRROptions = Field(default_factory=DRROptions, description="options of the DRR backend (docs/drr.md)")
    diffusion: DiffusionOptions = Field(default_factory=DiffusionOptions,
                                        description="sampling options of the diffusion backend (docs/diffusion.md)")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N', for both stages (the runtime's "
                        "--devices sets it)")
    batch_size: int = Field(4, ge=1, le=256, description="jobs per generate call (both stages run on the batch)",
                            json_schema_extra={"pixels": False})  # speed only: left out of job ids (BackendInfo.identity_options)

    @model_validator(mode="after")
    def _one_place_each(self) -> HybridOptions:
        # Two names for one number would let a recipe say two things: these are the hybrid's own.
        for section, name in (("diffusion", "control_strength"), ("diffusion", "device"), ("drr", "device"),
                              ("diffusion", "batch_size"), ("drr", "batch_size")):
            if name in getattr(self, section).model_fields_set:
                own = "control_scale" if name == "control_strength" else name
                raise ValueError(f"set {own} at the top of backend_options, not {section}.{name}")
        return self

    def file_problems(self) -> list[tuple[tuple, str]]:
        """The DRR options' file-level problems (a CT library), located under `drr`."""
        return [(("drr", *loc), msg) for loc, msg in self.drr.file_problems()]


def model_problem(folder: Path) -> str | None:
    """Why a model folder cannot drive the hybrid backend, found from its files alone (recipe
    validation runs without torch): it must be a chexforge pipeline with a control branch, which is
    the only way the DRR's masks and boxes reach the model."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return "expected a chexforge model folder (no readable model_index.json)"
    if not isinstance(index, dict) or index.get("_class_name") != "ChexforgePipeline":
        name = index.get("_class_name") if isinstance(index, dict) else None
        return f"the hybrid backend needs a chexforge pipeline with a control branch, not {name!r}"
    if not (folder / "controlnet" / "config.json").is_file() or (index.get("controlnet") or [None])[0] is None:
        return ("this model has no control branch (controlnet/): the hybrid backend feeds the DRR's masks "
                "and boxes through it (chexforge models init --preset tiny, or a ChexGen control checkpoint)")
    return None
