"""What each backend can do, as plain data, so a recipe is checked without loading torch.

The recipe loader asks this table whether a backend renders the findings, views, masks and
layouts a recipe names, and validates the backend's options against its pydantic model.
`load_backend` imports the heavy implementation only when a run really starts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from ..recipe.vocabulary import FINDING_NAMES


@dataclass(frozen=True)
class BackendInfo:
    name: str
    summary: str
    findings: tuple[str, ...]
    anatomy: tuple[str, ...]
    views: tuple[str, ...]
    layouts: tuple[str, ...]
    options_model: Callable[[], type[BaseModel]]
    factory: str  # "module:Class"
    needs_model: bool = False
    default_anatomy: tuple[str, ...] = ()  # masks a cohort gets when it names none
    default_layout: str = "none"  # layout source a cohort gets when it names none
    seconds_per_image: dict[str, float] = field(default_factory=dict)  # rough CPU figures at 256², for plan estimates

    def options(self, raw: dict[str, Any]) -> BaseModel:
        return self.options_model()(**raw)

    def check_options(self, raw: dict[str, Any]) -> list[tuple[tuple, str]]:
        try:
            self.options(raw)
        except ValidationError as e:
            return [(tuple(err["loc"]), err["msg"] if err["type"] != "extra_forbidden"
                     else f"unknown option; the {self.name} backend takes "
                          + ", ".join(self.options_model().model_fields)) for err in e.errors()]
        return []


def _drr_options() -> type[BaseModel]:
    from .drr.options import DRROptions

    return DRROptions


def _simulated_options() -> type[BaseModel]:
    from .simulated.options import SimulatedOptions

    return SimulatedOptions


def _diffusion_options() -> type[BaseModel]:
    from .diffusion.options import DiffusionOptions

    return DiffusionOptions


BACKENDS: dict[str, BackendInfo] = {
    "drr": BackendInfo(
        name="drr",
        summary="physics-based radiographs rendered from a real chest CT (CPU or GPU)",
        # The 14 CheXpert labels and the lesion classes, each inserted in 3-D (drr/findings_place.py).
        findings=("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                  "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Effusion",
                  "Pleural Other", "Fracture", "Support Devices", "Nodule", "Mass"),
        anatomy=("lungs", "lung_left", "lung_right", "heart"),
        views=("PA", "AP", "LL"),
        layouts=("physics",),
        options_model=_drr_options,
        factory="chexforge.backends.drr.backend:DRRBackend",
        seconds_per_image={"cpu": 0.6},
        default_anatomy=("lungs", "heart"),
        default_layout="physics",
    ),
    "diffusion": BackendInfo(
        name="diffusion",
        summary="text-, mask- and box-guided latent diffusion transformer (ChexGen-style), or any "
                "diffusers text-to-image pipeline, from a local model folder",
        findings=FINDING_NAMES,
        anatomy=("lungs",),  # from the prior mask library (layout: prior)
        views=("PA", "AP", "LL"),
        layouts=("none", "explicit", "prior"),
        options_model=_diffusion_options,
        factory="chexforge.backends.diffusion.backend:DiffusionBackend",
        needs_model=True,
        seconds_per_image={"cpu": 2.0},
    ),
    "simulated": BackendInfo(
        name="simulated",
        summary="a stand-in device for pipeline benchmarks and fault tests (sleeps, returns synthetic patterns)",
        findings=FINDING_NAMES,
        anatomy=("lungs", "lung_left", "lung_right", "heart"),
        views=("PA", "AP", "LL"),
        layouts=("none", "physics", "explicit", "prior"),
        options_model=_simulated_options,
        factory="chexforge.backends.simulated.backend:SimulatedBackend",
        seconds_per_image={"cpu": 0.0},
        default_layout="none",
    ),
}


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def backend_info(name: str) -> BackendInfo:
    return BACKENDS[name]


def load_backend(name: str, options: dict[str, Any], **kwargs: Any):
    """Build the backend object (this imports torch and loads the model)."""
    info = backend_info(name)
    module, cls = info.factory.split(":")
    return getattr(importlib.import_module(module), cls)(info.options(options), **kwargs)
