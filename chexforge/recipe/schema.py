"""The recipe schema (pydantic v2).

A recipe is plain YAML; these models define what each key means, fill defaults and reject
anything unknown. Shorthands keep recipes short: a finding may be `true` or a probability,
a view or sex may be one value or a weighted mapping, an age may be a number, a `[lo, hi]`
range, a normal distribution or weighted bins.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ..contracts.backends import backend_info, backend_names
from ..contracts.model_files import XRV_MODELS, model_problem, seg_classes
from ..contracts.vocabulary import (
    ALIASES,
    ANATOMY,
    BY_NAME,
    FINDING_NAMES,
    LATERALITIES,
    NO_FINDING,
    SEVERITIES,
    SEXES,
    VIEWS,
)

FindingName = Literal[FINDING_NAMES]  # type: ignore[valid-type]

DEFAULT_PROMPT = "{view} chest radiograph of a {age}-year-old {sex_word}. {findings}"
PROMPT_FIELDS = ("view", "age", "sex", "sex_word", "race", "findings", "cohort")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_NAME = 100  # characters of a recipe or cohort name (a cohort's name is a folder name in the output)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def check_name(v: str, what: str) -> str:
    if not _NAME.fullmatch(v):
        raise ValueError(f"a {what} name may hold letters, digits, '_', '-' and '.', and starts with a letter or digit")
    if len(v) > MAX_NAME:
        raise ValueError(f"a {what} name may be at most {MAX_NAME} characters long, not {len(v)}")
    return v


def expand_user(p: Path | str) -> Path:
    """`~/x` → the home folder's x; `~name/x` of a user this machine does not know stays as it is."""
    try:
        return Path(p).expanduser()
    except RuntimeError:
        return Path(p)


def as_distribution(value: Any, allowed: tuple[str, ...] | None, what: str) -> dict[str, float]:
    """`"PA"`, `[PA, AP]` (equal weights) or `{"PA": 3, "AP": 1}` → normalized weights."""
    if isinstance(value, str):
        value = {value: 1.0}
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = {v: 1.0 for v in value}
    if not isinstance(value, dict) or not value:
        raise ValueError(f"expected a {what}, a list of them, or a mapping of {what} to weights")
    out: dict[str, float] = {}
    for key, weight in value.items():
        key = str(key)
        if allowed is not None and key not in allowed:
            raise ValueError(f"unknown {what} {key!r}; expected one of {', '.join(allowed)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of {key!r} must be a finite number >= 0, got {weight!r}")
        out[key] = float(weight)
    total = sum(out.values())
    if total <= 0:
        raise ValueError(f"the {what} weights sum to 0")
    if not math.isfinite(total):
        raise ValueError(f"the {what} weights are too large to add up")
    return {k: w / total for k, w in out.items()}


class Age(Strict):
    """Exactly one of: `fixed`, `range` (uniform integers), `mean`/`sd` (truncated normal), `bins`."""

    fixed: int | None = Field(None, ge=0, le=120)
    range: tuple[int, int] | None = None
    mean: float | None = Field(None, ge=0, le=120)
    sd: float | None = Field(None, gt=0, le=60)
    min: int = Field(18, ge=0, le=120)
    max: int = Field(95, ge=0, le=120)
    bins: dict[str, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, bool):
            raise ValueError("expected an age, a [lo, hi] range or a mapping")
        if isinstance(data, (int, float)):
            return {"fixed": int(data)}
        if isinstance(data, (list, tuple)):
            return {"range": data}
        return data

    @field_validator("range")
    @classmethod
    def _range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not (0 <= v[0] <= v[1] <= 120):
            raise ValueError(f"expected 0 <= lo <= hi <= 120, got {list(v)}")
        return v

    @field_validator("bins")
    @classmethod
    def _bins(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        for key in v:
            lo, hi = parse_age_bin(key)
            if not (0 <= lo <= hi <= 120):
                raise ValueError(f"age bin {key!r} is outside 0-120")
        return as_distribution(v, None, "age bin")

    @model_validator(mode="after")
    def _one_form(self) -> Age:
        forms = [f for f in ("fixed", "range", "mean", "bins") if getattr(self, f) is not None]
        if len(forms) != 1:
            raise ValueError(
                "give the age as exactly one of: a number, a [lo, hi] range, "
                "{mean, sd} or {bins}" + (f" (got {', '.join(forms)})" if forms else "")
            )
        if self.mean is not None and self.sd is None:
            raise ValueError("an age with a mean needs an sd")
        if self.min > self.max:
            raise ValueError(f"age min {self.min} is above max {self.max}")
        return self


    def bounds(self) -> tuple[int, int]:
        """The youngest and the oldest age this spec can draw."""
        if self.fixed is not None:
            return self.fixed, self.fixed
        if self.range is not None:
            return self.range
        if self.bins is not None:
            edges = [parse_age_bin(k) for k in self.bins]
            return min(lo for lo, _ in edges), max(hi for _, hi in edges)
        return self.min, self.max


def parse_age_bin(key: str) -> tuple[int, int]:
    """`"40-64"` → (40, 64); `"80+"` → (80, 100)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)|\+)\s*", str(key))
    if not m:
        raise ValueError(f"age bin {key!r} must look like '40-64' or '80+'")
    lo = int(m.group(1))
    return lo, int(m.group(2)) if m.group(2) else 100


class Demographics(Strict):
    sex: dict[str, float] = Field(default_factory=lambda: {"F": 0.5, "M": 0.5})
    age: Age = Field(default_factory=lambda: Age(mean=60, sd=16, min=18, max=95))
    race: dict[str, float] | None = None

    @field_validator("sex", mode="before")
    @classmethod
    def _sex(cls, v: Any) -> dict[str, float]:
        return as_distribution(v, SEXES, "sex")

    @field_validator("race", mode="before")
    @classmethod
    def _race(cls, v: Any) -> dict[str, float] | None:
        return None if v is None else as_distribution(v, None, "race")


class FindingSpec(Strict):
    p: float = Field(1.0, ge=0.0, le=1.0)
    laterality: dict[str, float] | None = None
    severity: dict[str, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, bool):
            return {"p": 1.0 if data else 0.0}
        if isinstance(data, (int, float)):
            return {"p": data}
        return data

    @field_validator("laterality", mode="before")
    @classmethod
    def _lat(cls, v: Any) -> dict[str, float] | None:
        return None if v is None else as_distribution(v, LATERALITIES, "laterality")

    @field_validator("severity", mode="before")
    @classmethod
    def _sev(cls, v: Any) -> dict[str, float] | None:
        return None if v is None else as_distribution(v, SEVERITIES, "severity")


class ExplicitBox(Strict):
    label: str
    box: tuple[float, float, float, float]

    @field_validator("box")
    @classmethod
    def _box(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = v
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError("expected a box x0, y0, x1, y1 with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, "
                             f"got {', '.join(f'{c:g}' for c in v)}")
        return v


class Layout(Strict):
    """Where a job's masks and boxes come from (DESIGN.md, "Layouts")."""

    # physics (DRR places findings), explicit (given boxes/masks), prior (sampled from real
    # geometry), none (text only). Unset: the backend's default (DRR physics, diffusion none).
    source: Literal["physics", "explicit", "prior", "none"] | None = None
    boxes: list[ExplicitBox] | None = None  # explicit: the same boxes for every job
    boxes_csv: Path | None = None  # explicit: image_id,label,x0,y0,x1,y1 rows, grouped by image_id
    masks_dir: Path | None = None  # explicit: a folder of mask PNGs, one layout each
    order: Literal["cycle", "sample"] = "cycle"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"source": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _explicit(self) -> Layout:
        given = [n for n in ("boxes", "boxes_csv", "masks_dir") if getattr(self, n) is not None]
        if self.source is None and given:  # boxes or masks given: explicit is what was meant
            self.source = "explicit"
        if self.source == "explicit" and not given:
            raise ValueError("an explicit layout needs boxes, boxes_csv or masks_dir")
        if self.source != "explicit" and given:
            raise ValueError(f"{', '.join(given)} only apply to source: explicit")
        return self


QC_CHECKS = ("finding_visible", "mask_area", "not_blank", "classifier", "sex", "mask_dice")
QC_MODEL_CHECKS = ("classifier", "sex", "mask_dice")
QC_DEFAULT_MIN = {"finding_visible": 0.02, "mask_area": 0.001, "not_blank": 0.05, "classifier": 0.5, "sex": 0.5,
                  "mask_dice": 0.5}


class QCRule(Strict):
    """One quality check (chexforge/qc/rules.py): an image passes when the check's value >= min."""

    check: Literal[QC_CHECKS]  # type: ignore[valid-type]
    min: float | None = Field(None, ge=0.0, le=1.0)
    model: str | None = None  # classifier, sex: `xrv-densenet` or a local TorchScript file; mask_dice: a local one

    @model_validator(mode="after")
    def _fill(self) -> QCRule:
        if self.min is None:
            self.min = QC_DEFAULT_MIN[self.check]
        if self.check in QC_MODEL_CHECKS and not self.model:
            kind = "a local TorchScript file" if self.check == "mask_dice" else "xrv-densenet or a local TorchScript file"
            raise ValueError(f"the {self.check} check needs `model:` ({kind})")
        if self.check not in QC_MODEL_CHECKS and self.model is not None:
            raise ValueError(f"the {self.check} check takes no model")
        return self


class QC(Strict):
    """Reject and regenerate images that fail the rules, up to max_attempts generations a job."""

    max_attempts: int = Field(3, ge=1, le=100)
    rules: list[QCRule] = Field(default_factory=list)


MAX_STUDY_VIEWS = 4
MAX_COHORT_IMAGES = 100_000_000  # images (jobs) of one cohort, a study cohort's views included


class Study(Strict):
    """Several images of one patient: one image per view, in this order, each with the same
    demographics and findings (docs/recipes.md, "Studies")."""

    views: list[str] = Field(min_length=1, max_length=MAX_STUDY_VIEWS)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"views": data} if isinstance(data, (list, str)) else data

    @field_validator("views", mode="before")
    @classmethod
    def _views(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            return v  # pydantic says what was expected
        if not 1 <= len(v) <= MAX_STUDY_VIEWS:
            raise ValueError(f"a study has 1 to {MAX_STUDY_VIEWS} views, not {len(v)}")
        for view in v:
            if view not in VIEWS:
                raise ValueError(f"unknown view {view!r}; expected one of {', '.join(VIEWS)}")
        twice = [view for view in dict.fromkeys(v) if v.count(view) > 1]
        if twice:
            raise ValueError(f"a study takes each view once; {', '.join(twice)} "
                             f"{'is' if len(twice) == 1 else 'are'} given twice")
        return v


class Cohort(Strict):
    name: str
    count: int = Field(ge=0, le=MAX_COHORT_IMAGES)  # images; with `study`, studies (patients)
    # The views' mix. Unset: PA, except in a study cohort, whose views are study.views (the two are
    # exclusive: semantic_problems).
    view: dict[str, float] | None = None
    study: Study | None = None
    demographics: Demographics = Field(default_factory=Demographics)
    # A mapping of findings, or "natural": drawn jointly from real co-occurrence given the
    # job's sex, age and view (the priors), restricted to what the backend renders.
    findings: dict[FindingName, FindingSpec] | Literal["natural"] = Field(default_factory=dict)
    masks: list[str] | None = None  # anatomy masks; None = the backend's default (DRR: lungs, heart)
    layout: Layout = Field(default_factory=Layout)
    prompt: str = DEFAULT_PROMPT
    qc: QC | None = None  # overrides the recipe's qc for this cohort

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "cohort")

    @field_validator("view", mode="before")
    @classmethod
    def _view(cls, v: Any) -> dict[str, float] | None:
        return None if v is None else as_distribution(v, VIEWS, "view")

    @model_validator(mode="after")
    def _default_view(self) -> Cohort:
        if self.view is None and self.study is None:
            if "view" in self.model_fields_set:  # `view: null` written out
                raise ValueError("view: expected a view, a list of them, or a mapping of view to weights")
            self.view = {"PA": 1.0}
        return self

    @property
    def views_per_study(self) -> int:
        """Images per patient: the study's views, or 1."""
        return len(self.study.views) if self.study is not None else 1

    @property
    def images(self) -> int:
        """The images (jobs) the cohort asks for: count × views for a study cohort."""
        return self.count * self.views_per_study

    @property
    def view_mix(self) -> dict[str, float]:
        """The fraction of the cohort's images in each view."""
        if self.study is not None:
            return {v: 1.0 / len(self.study.views) for v in self.study.views}
        return dict(self.view or {})

    @field_validator("findings", mode="before")
    @classmethod
    def _aliases(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {ALIASES.get(str(k), k): spec for k, spec in v.items()}
        if isinstance(v, str) and v != "natural":
            raise ValueError(f"expected a mapping of findings or 'natural', got {v!r}")
        return v

    @property
    def finding_specs(self) -> dict[str, FindingSpec]:
        """The explicit finding specs ({} for `findings: natural`)."""
        return self.findings if isinstance(self.findings, dict) else {}

    @field_validator("masks")
    @classmethod
    def _masks(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        for m in v:
            if m not in ANATOMY:
                raise ValueError(f"unknown anatomy mask {m!r}; expected one of {', '.join(ANATOMY)}")
        return list(dict.fromkeys(v))

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        for field in re.findall(r"\{([^{}]*)\}", v):
            if field not in PROMPT_FIELDS:
                raise ValueError(f"unknown prompt field {{{field}}}; expected one of " + ", ".join(f"{{{f}}}" for f in PROMPT_FIELDS))
        return v


class Output(Strict):
    size: int = Field(256, ge=64, le=1024)
    formats: list[Literal["png", "dicom"]] = Field(default_factory=lambda: ["png", "dicom"])
    masks: bool = True
    coco: bool = True

    @field_validator("size")
    @classmethod
    def _size(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"expected a multiple of 8, got {v}")
        return v

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one image format: png, dicom")
        return list(dict.fromkeys(v))


class Recipe(Strict):
    name: str
    description: str = ""
    seed: int = Field(0, ge=0, le=2**63 - 1)
    backend: str = "drr"
    model: Path | None = None  # a local model folder (diffusion); resolved against the recipe's folder
    backend_options: dict[str, Any] = Field(default_factory=dict)
    output: Output = Field(default_factory=Output)
    cohorts: list[Cohort] = Field(min_length=1)
    qc: QC | None = None  # quality rules for every cohort (a cohort's own qc replaces it)
    _base_dir: Path | None = PrivateAttr(None)  # folder of the recipe file: relative paths start here

    def resolve_path(self, p: Path | str) -> Path:
        p = expand_user(p)
        return p if p.is_absolute() or self._base_dir is None else self._base_dir / p

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "recipe")

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in backend_names():
            raise ValueError(f"unknown backend {v!r}; expected one of {', '.join(backend_names())}")
        return v

    @property
    def total(self) -> int:
        """The images (jobs) of the recipe: a study cohort gives count × its views."""
        return sum(c.images for c in self.cohorts)


# ---- checks that need more than one field: each returns (location, message) pairs -------------


def layout_source(recipe: Recipe, cohort: Cohort) -> str:
    """The cohort's layout source, or the backend's default when the recipe leaves it out."""
    return cohort.layout.source or backend_info(recipe.backend).default_layout


def semantic_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Cross-field checks, each with the location (a pydantic-style loc) it is about."""
    problems: list[tuple[tuple, str]] = []
    info = backend_info(recipe.backend)
    if info.needs_model and recipe.model is None:
        problems.append((("backend",), f"the {recipe.backend} backend needs `model: PATH` (a local model folder)"))
    if recipe.model is not None and recipe._base_dir is not None:  # a folder that is there, but cannot serve
        folder = recipe.resolve_path(recipe.model)
        problem = info.model_problem(folder) if folder.is_dir() else None
        if problem:
            problems.append((("model",), problem))
    option_problems = info.check_options(recipe.backend_options)
    for key, message in option_problems:
        problems.append((("backend_options", *key), message))
    if not option_problems:  # files the options name (a CT library): a file-level look, no torch
        options = info.options(recipe.backend_options)
        file_problems = getattr(options, "file_problems", None)
        for key, message in file_problems() if callable(file_problems) else ():
            problems.append((("backend_options", *key), message))
    seen: set[str] = set()
    for i, cohort in enumerate(recipe.cohorts):
        if cohort.name in seen:
            problems.append((("cohorts", i, "name"), f"cohort name {cohort.name!r} is used twice"))
        seen.add(cohort.name)
        source = layout_source(recipe, cohort)
        if source not in info.layouts:
            problems.append((("cohorts", i, "layout"),
                             f"the {recipe.backend} backend takes layouts {', '.join(info.layouts)}, not {source!r}"))
        for m in cohort.masks or ():
            if m not in info.anatomy:
                problems.append((("cohorts", i, "masks"), f"the {recipe.backend} backend cannot draw the {m!r} mask"))
            elif info.mask_layouts is not None and source not in info.mask_layouts:
                problems.append((("cohorts", i, "masks"), f"the {recipe.backend} backend draws anatomy masks only with "
                                 f"layout: {' or '.join(info.mask_layouts)}"))
        lo, hi = cohort.demographics.age.bounds()
        if lo < info.ages[0] or hi > info.ages[1]:
            problems.append((("cohorts", i, "demographics", "age"),
                             f"the {recipe.backend} backend makes patients aged {info.ages[0]}-{info.ages[1]} "
                             f"years; this cohort's ages reach {lo if lo < info.ages[0] else hi}"))
        if cohort.study is not None and cohort.view is not None:
            problems.append((("cohorts", i, "study", "[key]"),
                             "give either view or study, not both: a study's images have the views of study.views"))
        if cohort.images > MAX_COHORT_IMAGES:
            problems.append((("cohorts", i, "count"), f"{cohort.count} studies of {cohort.views_per_study} views are "
                             f"{cohort.images} images; a cohort makes at most {MAX_COHORT_IMAGES}"))
        if cohort.study is not None:
            for j, view in enumerate(cohort.study.views):
                if view not in info.views:
                    problems.append((("cohorts", i, "study", "views", j),
                                     f"the {recipe.backend} backend renders views {', '.join(info.views)}, not {view!r}"))
        for view in cohort.view or ():
            if view not in info.views:
                problems.append((("cohorts", i, "view"),
                                 f"the {recipe.backend} backend renders views {', '.join(info.views)}, not {view!r}"))
        problems += _finding_problems(cohort, i, info.findings, recipe.backend)
    problems += _qc_problems(recipe)
    return problems


def _qc_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Located problems of the recipe's QC models (for recipe validation). A relative path is
    checked once the recipe's folder is known (when the runtime loads the models)."""
    out: list[tuple[tuple, str]] = []
    places = [(("qc",), recipe.qc)] + [(("cohorts", i, "qc"), c.qc) for i, c in enumerate(recipe.cohorts)]
    for loc, qc in places:
        for j, rule in enumerate(qc.rules if qc is not None else []):
            if rule.model is None:
                continue
            relative = rule.model not in XRV_MODELS and not expand_user(rule.model).is_absolute()
            if relative and recipe._base_dir is None:
                continue
            problem = model_problem(rule.model, rule.check, lambda s: Path(recipe.resolve_path(s)))
            if problem:
                out.append(((*loc, "rules", j, "model"), problem))
            elif rule.check == "mask_dice":
                problem = _seg_class_problem(recipe, loc, Path(recipe.resolve_path(rule.model)))
                if problem:
                    out.append(((*loc, "rules", j, "model"), problem))
    return out


def maskable(recipe: Recipe, cohort: Cohort) -> set[str]:
    """The mask names a cohort's images can have: its anatomy masks and the findings it requests."""
    info = backend_info(recipe.backend)
    anatomy = cohort.masks if cohort.masks is not None else info.default_anatomy
    if cohort.findings == "natural":
        findings = set(info.findings)
    else:
        findings = {n for n, spec in cohort.finding_specs.items() if spec.p > 0}
    return (set(anatomy) | findings) - {NO_FINDING}


def _seg_class_problem(recipe: Recipe, loc: tuple, path: Path) -> str | None:
    """A mask_dice model whose classes name no mask a cohort the rule applies to can have: it
    would measure nothing and reject every image. None when its classes cannot be read here."""
    classes = seg_classes(path)
    if not classes:
        return None
    cohorts = [c for i, c in enumerate(recipe.cohorts)
               if loc == ("cohorts", i, "qc") or (loc == ("qc",) and c.qc is None)]
    for c in cohorts:
        have = maskable(recipe, c)
        if not have & set(classes):
            return (f"the segmentation model's classes ({', '.join(classes)}) share no name with the masks of cohort "
                    f"{c.name!r} ({', '.join(sorted(have))}): mask_dice would reject every image")
    return None


def _finding_problems(cohort: Cohort, i: int, supported: tuple[str, ...], backend: str) -> list[tuple[tuple, str]]:
    out: list[tuple[tuple, str]] = []
    if cohort.findings == "natural":
        return out
    for name, spec in cohort.finding_specs.items():
        loc = ("cohorts", i, "findings", name)
        finding = BY_NAME[name]
        if spec.p > 0 and name not in supported:
            out.append((loc + ("[key]",), f"the {backend} backend cannot render {name!r} yet; it renders {', '.join(supported)}"))
        if spec.laterality is not None:
            bad = [k for k in spec.laterality if k not in finding.laterality]
            if bad:
                allowed = ", ".join(finding.laterality) or "none"
                out.append((loc + ("laterality",), f"{name} takes laterality {allowed}, not {', '.join(bad)}"))
        if spec.severity is not None and not finding.severity:
            out.append((loc + ("severity",), f"{name} takes no severity"))
    nf = cohort.finding_specs.get(NO_FINDING)
    if nf is not None and nf.p > 0:
        others = [n for n, s in cohort.finding_specs.items() if n != NO_FINDING and s.p > 0]
        if others:
            out.append((("cohorts", i, "findings", NO_FINDING, "[key]"),
                        f"'No Finding' contradicts {', '.join(others)} in the same cohort; "
                        "leave it out: it is set on every job that has no other finding"))
    return out
