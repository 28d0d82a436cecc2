"""`chexforge audit` and `chexforge balance` as Python functions.

    from chexforge.balance import audit_labels, balance_labels

    result = balance_labels("xrv:chexpert", "balance.yaml", by=["sex", "age"])
    print(result.added, result.after["imbalance"])

Each reads a label file (labels/), measures it (audit.py), and for balance allocates the top-up
(topup.py), writes the recipe, plans it to measure the after-audit, and charts both. The command
line only prints what these return.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import atomic
from ..contracts.backends import backend_info
from ..contracts.vocabulary import ALIASES, FINDING_NAMES
from ..errors import UserError
from ..labels.groups import check_by, parse_age_bins
from ..labels.readers import read_labels
from ..plan import plan
from ..recipe import load_recipe
from .audit import audit
from .chart import audit_chart
from .topup import BalanceSpec, allocate, jobs_to_tidy, read_reference, topup_recipe

FRONTAL = ("PA", "AP")  # the views --frontal-only keeps (balance's default)


@dataclass(frozen=True)
class LabelSource:
    """A label file and how to read it (see `chexforge audit --help`)."""

    labels: str  # a path, or xrv:chexpert / xrv:nih / xrv:padchest
    fmt: str | None = None  # chexpert, mimic, nih, padchest, manifest; None: sniffed from the columns
    uncertain: str = "negative"  # what an uncertain (-1) label counts as
    frontal_only: bool = False  # keep PA and AP images only
    metadata: Path | None = None  # MIMIC-CXR: views
    patients: Path | None = None  # MIMIC-IV: sex, age
    admissions: Path | None = None  # MIMIC-IV: race

    def read(self) -> pd.DataFrame:
        return self.read_counted()[0]

    def read_counted(self) -> tuple[pd.DataFrame, dict]:
        """The rows, and what was read before the view filter (`rows`, `views`, `filter`, `kept`),
        so a table can say why `audit` and `balance` (frontal views only by default) count
        different images of the same file."""
        df = read_labels(self.labels, self.fmt, self.uncertain, self.metadata, self.patients, self.admissions)
        views = df["view"].fillna("unknown").astype(str).value_counts()
        info = {"rows": int(len(df)), "views": {str(k): int(v) for k, v in views.items()}, "filter": None,
                "kept": int(len(df))}
        if self.frontal_only:
            df = df[df["view"].isin(FRONTAL)].reset_index(drop=True)
            info.update(filter="frontal views only (PA, AP)", kept=int(len(df)))
        return df, info


@dataclass
class AuditResult:
    report: dict  # audit.audit's plain-data report
    images: int  # rows read
    files: list[Path] = field(default_factory=list)  # audit.json and audit.png when a folder was given


def audit_labels(source: LabelSource | str, by: list[str] | str = ("sex", "age"), age_bins: str | None = None,
                 out: Path | None = None) -> AuditResult:
    """Group sizes and finding prevalence per group; with `out`, also audit.json and audit.png there."""
    source = LabelSource(source) if isinstance(source, str) else source
    df, read = source.read_counted()
    report = audit(df, _by(by), age_bins=parse_age_bins(age_bins))
    report["source"] = read
    files = []
    if out is not None:
        out = Path(out)
        atomic.write_text(out / "audit.json", json.dumps(report, indent=1))
        atomic.write_bytes(out / "audit.png", audit_chart(report, title=str(source.labels)))
        files = [out / "audit.json", out / "audit.png"]
    return AuditResult(report, len(df), files)


@dataclass
class BalanceResult:
    recipe: Path  # the top-up recipe written
    added: int  # synthetic images it asks for
    cohorts: int  # cohorts with at least one image
    real: int  # real images read (after the view filter)
    synthetic: int  # images the recipe plans (as planned, for the after-audit)
    before: dict  # audit of the real images
    after: dict  # audit of real + planned synthetic images
    report_dir: Path  # audit_before.json, audit_after.json, audit.png
    notes: list[str] = field(default_factory=list)  # what the allocation could not do as asked
    left_out: dict[str, str] = field(default_factory=dict)  # group label → why it gets no top-up


def balance_labels(source: LabelSource | str, out: Path | str = "balance.yaml", *, by: list[str] | str = ("sex", "age"),
                   target: str = "parity", reference: Path | None = None, per_finding: bool = False,
                   findings: list[str] | str | None = None, min_per_cell: int = 0, budget: int | None = None,
                   age_bins: str | None = None, backend: str = "drr", model: Path | None = None, size: int = 256,
                   seed: int = 0, report: Path | None = None, prevalence: str = "group") -> BalanceResult:
    """Write the recipe whose synthetic images bring `source`'s groups to `target` (parity or the
    mix of `reference`), and the before/after audits and chart (default: next to the recipe).

    `prevalence`: "group" (default) gives each group's top-up that group's own real prevalence of
    each finding, so its prevalence after equals the one before within sampling error; "pooled"
    gives every top-up the prevalence of all groups together (the groups' prevalences move toward
    it)."""
    source = LabelSource(source, frontal_only=True) if isinstance(source, str) else source
    out = Path(out)
    by_vars = _by(by)
    if target not in ("parity", "reference"):
        raise UserError(f"--target takes parity or reference, not {target!r}")
    bins = parse_age_bins(age_bins)
    chosen = _findings(findings)
    if prevalence not in ("group", "pooled"):
        raise UserError(f"--prevalence takes group or pooled, not {prevalence!r}")
    df, read = source.read_counted()
    spec = BalanceSpec(by=by_vars, target=target, per_finding=per_finding, findings=chosen, min_per_cell=min_per_cell,
                       budget=budget, backend=backend, model=Path(model).resolve() if model else None, size=size,
                       seed=seed, age_bins=bins, name=_recipe_name(out), prevalence=prevalence)
    if target == "reference":
        if reference is None:
            raise UserError("--target reference needs --reference FILE")
        spec.reference = read_reference(reference, by_vars, bins)
    alloc = allocate(df, spec)
    text, recipe = topup_recipe(df, alloc, spec, str(source.labels))
    atomic.write_text(out, text)
    added = sum(c["count"] for c in recipe["cohorts"])
    before = audit(df, by_vars, chosen, bins)
    before["source"] = read
    synthetic = jobs_to_tidy(plan(load_recipe(out))) if added else df.iloc[0:0]
    after = audit(pd.concat([df, synthetic], ignore_index=True), by_vars, before["findings"], bins)
    after["source"] = read
    after["left_out"] = dict(spec.left_out)
    lowest = backend_info(backend).ages[0]
    for e in before["excluded"]:  # rows in no group get no top-up; say also when the backend could not make them
        young = e["label"].startswith(f"under {bins[0]}") and lowest >= bins[0]
        after["left_out"][e["label"]] = ("not in the top-up" + (f" (the {backend} backend makes ages {lowest} and up)"
                                                                if young else ""))
    folder = Path(report) if report is not None else out.parent / (out.stem + "_report")
    atomic.write_text(folder / "audit_before.json", json.dumps(before, indent=1))
    atomic.write_text(folder / "audit_after.json", json.dumps(after, indent=1))
    by_text = ",".join(by_vars)
    atomic.write_bytes(folder / "audit.png", audit_chart(before, after, title=f"{source.labels}: balanced by {by_text}"))
    return BalanceResult(out, added, len(recipe["cohorts"]), len(df), len(synthetic), before, after, folder, spec.notes,
                         spec.left_out)


def _by(by: list[str] | tuple[str, ...] | str) -> list[str]:
    return check_by([v.strip() for v in (by.split(",") if isinstance(by, str) else by) if v.strip()])


def _findings(findings: list[str] | str | None) -> list[str] | None:
    if not findings:
        return None
    chosen = [ALIASES.get(f.strip(), f.strip()) for f in (findings.split(",") if isinstance(findings, str) else findings)]
    bad = [f for f in chosen if f not in FINDING_NAMES]
    if bad:
        raise UserError(f"--findings: unknown finding {bad[0]!r}")
    return chosen


def _recipe_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-.") or "balance"
