"""What each generator backend can do, as plain data (DESIGN.md, "Backend protocol").

Recipe validation, the planner and balance read this table, so a recipe is checked against the
backend it names without importing torch or the backend's code. Each backend's options model
(pydantic, no torch) and its implementation are named as "module:Class" and imported only when
needed: the options when a recipe is validated, the implementation (`backends.registry.load_backend`)
when a run starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from .vocabulary import FINDING_NAMES


@dataclass(frozen=True)
class BackendInfo:
    name: str
    summary: str
    findings: tuple[str, ...]
    anatomy: tuple[str, ...]
    views: tuple[str, ...]
    layouts: tuple[str, ...]
    options_model: str  # "module:Class" of the pydantic model of backend_options (pure: no torch)
    factory: str  # "module:Class"
    needs_model: bool = False
    default_anatomy: tuple[str, ...] = ()  # masks a cohort gets when it names none
    default_layout: str = "none"  # layout source a cohort gets when it names none
    seconds_per_image: dict[str, float] = field(default_factory=dict)  # rough CPU figures at 256², for plan estimates
    mask_layouts: tuple[str, ...] | None = None  # layouts under which anatomy masks can be drawn (None: any)
    ages: tuple[int, int] = (0, 120)  # the patients' ages (years) it can make faithfully
    model_check: str | None = None  # "module:function" (pure: no torch): why a model folder cannot serve, or None

    def options_class(self) -> type[BaseModel]:
        module, cls = self.options_model.split(":")
        return getattr(importlib.import_module(module), cls)

    def options(self, raw: dict[str, Any]) -> BaseModel:
        return self.options_class()(**raw)

    def identity_options(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The options that decide a job's pixels: `raw` without those its options model marks
        `json_schema_extra={"pixels": False}` (speed and memory settings such as batch_size). Job
        ids and seeds hash these, so changing a batch size keeps every job. Where nothing is
        marked (the DRR backend), this is `raw` itself and ids are what they always were."""
        return _pixel_options(self.options_class(), raw)

    def model_problem(self, folder: Any) -> str | None:
        """What is wrong with `model:` for this backend, from the folder's files alone (None: fine)."""
        if self.model_check is None:
            return None
        module, fn = self.model_check.split(":")
        return getattr(importlib.import_module(module), fn)(folder)

    def check_options(self, raw: dict[str, Any]) -> list[tuple[tuple, str]]:
        try:
            self.options(raw)
        except ValidationError as e:
            return [(tuple(err["loc"]), err["msg"] if err["type"] != "extra_forbidden"
                     else f"unknown option; the {self.name} backend takes "
                          + ", ".join(self.options_class().model_fields)) for err in e.errors()]
        return []


# The 14 CheXpert labels and the lesion classes, each inserted in 3-D (drr/findings_place.py).
BACKENDS_DRR_FINDINGS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                         "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Effusion",
                         "Pleural Other", "Fracture", "Support Devices", "Nodule", "Mass")

BACKENDS: dict[str, BackendInfo] = {
    "drr": BackendInfo(
        name="drr",
        summary="physics-based radiographs rendered from a real chest CT (CPU or GPU)",
        findings=BACKENDS_DRR_FINDINGS,
        anatomy=("lungs", "lung_left", "lung_right", "heart"),
        views=("PA", "AP", "LL"),
        layouts=("physics",),
        options_model="chexforge.backends.drr.options:DRROptions",
        factory="chexforge.backends.drr.backend:DRRBackend",
        seconds_per_image={"cpu": 0.6},
        ages=(18, 120),  # its patients are adult chest CTs: a child's chest is not a scaled adult's
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
        options_model="chexforge.backends.diffusion.options:DiffusionOptions",
        factory="chexforge.backends.diffusion.backend:DiffusionBackend",
        needs_model=True,
        mask_layouts=("prior",),  # anatomy masks come from the prior mask library
        seconds_per_image={"cpu": 2.0},
    ),
    "hybrid": BackendInfo(
        name="hybrid",
        summary="physics-anchored diffusion: the DRR backend's virtual patient (exact masks, boxes, geometry) "
                "drawn by a diffusion model's control branch, optionally denoised from the DRR image",
        findings=BACKENDS_DRR_FINDINGS,
        anatomy=("lungs", "lung_left", "lung_right", "heart"),
        views=("PA", "AP", "LL"),
        layouts=("physics",),  # the DRR places every finding: its masks and boxes are the layout
        options_model="chexforge.backends.hybrid.options:HybridOptions",
        factory="chexforge.backends.hybrid.backend:HybridBackend",
        needs_model=True,
        model_check="chexforge.backends.hybrid.options:model_problem",  # a control branch is required
        seconds_per_image={"cpu": 2.6},  # a DRR render plus a diffusion sample
        ages=(18, 120),  # the DRR's adult chest CTs
        default_anatomy=("lungs", "heart"),
        default_layout="physics",
    ),
    "simulated": BackendInfo(
        name="simulated",
        summary="a stand-in device for pipeline benchmarks and fault tests (sleeps, returns synthetic patterns "
                "with a mask and box for every requested finding and a mask for every requested structure)",
        findings=FINDING_NAMES,
        anatomy=("lungs", "lung_left", "lung_right", "heart"),
        views=("PA", "AP", "LL"),
        layouts=("none", "physics", "explicit", "prior"),
        options_model="chexforge.backends.simulated.options:SimulatedOptions",
        factory="chexforge.backends.simulated.backend:SimulatedBackend",
        seconds_per_image={"cpu": 0.0},
        default_anatomy=("lungs",),  # a cohort naming no masks: one mask an image, as before (not an unasked Nodule)
        default_layout="none",
    ),
}


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def backend_info(name: str) -> BackendInfo:
    return BACKENDS[name]


def _pixel_options(model: type[BaseModel], raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` without the fields `model` marks `{"pixels": False}`, down into nested option models
    (the hybrid backend's `drr:` and `diffusion:` sections), so a speed setting changes no job id
    wherever it is written."""
    out = {}
    for k, v in raw.items():
        f = model.model_fields.get(k)
        if f is not None and isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("pixels") is False:
            continue
        inner = f.annotation if f is not None else None
        if isinstance(v, dict) and isinstance(inner, type) and issubclass(inner, BaseModel):
            v = _pixel_options(inner, v)
        out[k] = v
    return out
