"""`chexforge inspect` as a function: counts per cohort and label, and a contact sheet PNG."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc

from .. import atomic
from ..contracts.manifest import MANIFEST
from ..errors import UserError
from ..export import manifest as mf
from ..export.contact_sheet import contact_sheet
from ..plan.summary import label_counts
from ..store import open_store


@dataclass
class Inspection:
    out: str
    ok: int  # images made
    failed: int  # jobs recorded as failed
    findings: list[str]  # the labels present, "No Finding" last
    cohorts: list[dict] = field(default_factory=list)  # {cohort, images, counts: {finding: n}}
    sheet: str | None = None  # where the contact sheet was written (None: no image yet)


def inspect_dataset(out: str, sheet: Path | None = None, n: int = 24, overlays: bool = True) -> Inspection:
    """Count what `out` holds and write its contact sheet (default OUT/contact_sheet.png)."""
    store = open_store(out)
    if not store.exists(MANIFEST) and not mf.part_names(store):
        raise UserError("no manifest.parquet here: not a chexforge output folder (or nothing generated yet)", out)
    table = mf.read_manifest(store)
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    counts = label_counts(ok)
    findings = sorted({f for c in counts.values() for f in c}, key=lambda f: (f == "No Finding", f))
    sizes = {s["cohort"]: s["job_id_count"] for s in ok.group_by("cohort").aggregate([("job_id", "count")]).to_pylist()}
    result = Inspection(str(out), ok.num_rows, table.num_rows - ok.num_rows, findings,
                        [{"cohort": c, "images": sizes.get(c, 0), "counts": v} for c, v in counts.items()])
    if ok.num_rows:
        png = contact_sheet(store, table, n=n, overlays=overlays)
        if sheet is not None:
            atomic.write_bytes(sheet, png)
        else:
            store.write_bytes("contact_sheet.png", png)
        result.sheet = str(sheet or f"{store.root}/contact_sheet.png")
    return result
