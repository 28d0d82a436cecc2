"""The audit as a terminal table (what `chexforge audit` and `chexforge balance` print).

Every row read is accounted for: the groups, then one row per reason a row is in no group
(younger than the first age bin, a grouping variable unknown), and the caption says which view
filter was applied, so the counts of `audit` (all views by default) and `balance` (frontal views
by default) of the same file can be reconciled from the two tables alone.
"""

from __future__ import annotations

from rich.table import Table

from .audit import group_label

MAX_FINDINGS = 5  # columns of prevalence (the most frequent findings); the JSON has them all


def audit_table(report: dict, after: dict | None = None, title: str = "audit", prefer: tuple[str, ...] = (),
                room: int = 200) -> tuple[Table, list[str]]:
    """The table and the lines to print under it. `room`: the console's width, which decides how
    many finding columns fit; `prefer`: findings shown first (those the backend renders)."""
    overall = {f: sum(g["positives"][f] for g in report["groups"]) for f in report["findings"]}
    fit = max(1, (room - 44 - (30 if report.get("excluded") else 0)) // 16)
    findings = sorted(overall, key=lambda f: (f not in prefer, -overall[f]))[:min(MAX_FINDINGS, fit)]
    left_out = (after or {}).get("left_out", {})
    notes_column = bool(report.get("excluded") or left_out)
    heads = ["group", "images", "vs largest", *[f"{f} %" for f in findings]] + (["note"] if notes_column else [])
    t = Table(*heads, title=title, caption=_caption(report.get("source"), report["images"]))
    after_rows = {group_label(g["group"]): g for g in (after or {}).get("groups", [])}

    for g in report["groups"]:
        key = group_label(g["group"])
        n, ratio = str(g["n"]), f"{g['size_ratio']:.2f}"
        prev = [_pct(g["prevalence"][f]) for f in findings]
        if after and key in after_rows:
            a = after_rows[key]
            n += f"→{a['n']}"
            ratio += f"→{a['size_ratio']:.2f}"
            prev = [p + "→" + _pct(a["prevalence"][f]) for p, f in zip(prev, findings)]
        t.add_row(key.replace(" · ", "·"), n, ratio, *prev, *([left_out.get(key, "")] if notes_column else []))
    for e in report.get("excluded", []):
        note = f"in no group: {e['explanation']}"
        if after is not None:
            note += "; " + left_out.get(e["label"], "not in the top-up")
        n = str(e["n"]) + (f"→{e['n']}" if after is not None else "")  # synthetic images always fall in a group
        t.add_row(f"{e['label']} (excluded)", n, "-", *[_pct(e["prevalence"].get(f)) for f in findings], note,
                  style="dim")
    lines = []
    imb = report.get("imbalance", {})
    if imb:
        line = f"smallest group / largest: {imb['size_min_over_max']:.2f}"
        if after and after.get("imbalance"):
            line += f" → {after['imbalance']['size_min_over_max']:.2f}"
        lines.append(line)
    return t, lines


def _caption(source: dict | None, images: int) -> str | None:
    if not source:
        return None
    if source.get("filter"):
        return f"{source['filter']}: {source['kept']} of {source['rows']} rows"
    views = ", ".join(f"{k} {v}" for k, v in source.get("views", {}).items())
    frontal = sum(v for k, v in source.get("views", {}).items() if k in ("PA", "AP"))
    return (f"all views: {images} rows ({views}); `chexforge balance` keeps frontal views only "
            f"(PA, AP: {frontal} rows) unless --all-views")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"
