"""The visual report (`chexforge report OUT`): one static HTML page with its PNGs beside it.

What it holds, top to bottom: the dataset's identity and counts; per cohort, a contact sheet with
masks and boxes drawn on (the `chexforge inspect` tiles) and a table of what each tile shows; the
requested-against-realised composition (recipe against manifest, status-ok rows) as a chart and as
a table; the failed jobs with their errors; and the evaluation metrics when a metrics.json is there.

Plain HTML with a little inline CSS: no scripts, nothing fetched from the network, alt text on
every image and every number also in text, so it reads without images. Everything is written
atomically under the report folder; the dataset's own files are only read.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from .. import __version__, atomic
from ..contracts.jobs import laterality_column, severity_column
from ..contracts.vocabulary import FINDING_NAMES, NO_FINDING
from ..errors import UserError
from ..export import manifest as mf
from ..store import Store, open_store
from . import report_charts as charts

REPORT_DIR = "report"
METRICS = "metrics.json"
NEAREST_PAIRS = "nearest_pairs.png"
MAX_FAILURES = 200
DATASET_DIRS = ("images", "masks", "dicom", ".parts")

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1280px;
 padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;border:1px solid #ccc;background:#111}
img.chart{background:#fff}
.meta{color:#555}.na{color:#8a4b00}.bad{color:#a00}
details{margin:.4em 0}code{background:#f4f4f4;padding:0 .25em}
nav a{margin-right:1em}
"""


# ---- reading the dataset ------------------------------------------------------------------------


def _local_root(out: str | Path) -> Path | None:
    text = str(out)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return None if "://" in text else Path(text)


def load_dataset(out: str | Path) -> tuple[Store, pa.Table, Any, dict]:
    """(store, manifest, parsed recipe or None, raw recipe dict); UserError for a folder that is not
    a chexforge output folder."""
    store = open_store(out)
    if not store.exists(mf.MANIFEST) and not mf.part_names(store):
        raise UserError("no manifest.parquet here: not a chexforge output folder (or nothing generated yet)", out)
    table = mf.read_manifest(store)
    recipe, raw = None, {}
    if store.exists("recipe.yaml"):
        import yaml

        from ..recipe import parse_recipe

        text = store.read_bytes("recipe.yaml").decode("utf-8", "replace")
        try:
            raw = yaml.safe_load(text) or {}
            recipe = parse_recipe(text, f"{store.root}/recipe.yaml")
        except (UserError, yaml.YAMLError, ValueError):
            recipe = None  # the report still shows what was realised; the page says why
    return store, table, recipe, raw if isinstance(raw, dict) else {}


# ---- small HTML helpers ---------------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"  # as the JSON says
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return esc(value)
        return f"{value:.4g}"
    return esc(value)


def _num(value: Any) -> str:
    return f'<td class="num">{_fmt(value)}</td>'


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _table(header: list[str], rows: list[list[str]], caption: str | None = None) -> str:
    """`rows` hold ready-made cells (`<td>…</td>`)."""
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    head = "".join(f"<th scope=col>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(value: Any) -> str:
    return f"<td>{esc(value)}</td>"


def _img(src: str, alt: str, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<img src="{esc(src)}" alt="{esc(alt)}"{c} loading="lazy">'


# ---- metrics (whatever `chexforge eval` wrote) ----------------------------------------------------


def _unavailable(v: Any) -> bool:
    return isinstance(v, dict) and v.get("available") is False


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _cell(v: Any) -> str:
    """A metric value's cell: numbers right-aligned, null as '-', booleans as JSON writes them."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return _num(v)
    return f"<td>{_fmt(v)}</td>"


def render_metrics(value: Any, depth: int = 0) -> str:
    """Nested dicts become headed sections and tables; `{"available": false, "why": ...}` becomes
    a "not available: why" line; lists of records become tables. Nothing about the keys is assumed."""
    if _unavailable(value):
        return f'<p class="na">not available: {esc(value.get("why") or value.get("reason") or "no reason given")}</p>'
    if _scalar(value):
        return f"<p>{_fmt(value)}</p>"
    if isinstance(value, list):
        if all(_scalar(v) for v in value):
            return f"<p>{', '.join(_fmt(v) for v in value) or '(empty)'}</p>"
        if all(isinstance(v, dict) and all(_scalar(x) for x in v.values()) for v in value):
            cols = list(dict.fromkeys(k for v in value for k in v))
            return _table(cols, [[_cell(v.get(c)) for c in cols] for v in value])
        return "".join(render_metrics(v, depth + 1) for v in value)
    assert isinstance(value, dict)
    scalars = {k: v for k, v in value.items() if _scalar(v)}
    nested = {k: v for k, v in value.items() if not _scalar(v)}
    parts = []
    if scalars:
        parts.append(_table(["metric", "value"], [[f"<th scope=row>{esc(k)}</th>", _cell(v)] for k, v in scalars.items()]))
    # A dict of flat dicts (say per cohort) reads best as one table, rows = keys.
    flat = {k: v for k, v in nested.items() if isinstance(v, dict) and not _unavailable(v) and v
            and all(_scalar(x) for x in v.values())}
    if len(flat) >= 2:
        cols = list(dict.fromkeys(c for v in flat.values() for c in v))
        parts.append(_table(["", *cols], [[f"<th scope=row>{esc(k)}</th>", *[_cell(v.get(c)) for c in cols]]
                                          for k, v in flat.items()]))
    else:
        flat = {}
    tag = f"h{min(6, depth + 3)}"
    for k, v in nested.items():
        if k in flat:
            continue
        parts.append(f"<section><{tag}>{esc(k)}</{tag}>{render_metrics(v, depth + 1)}</section>")
    return "".join(parts) or "<p>(empty)</p>"


def load_metrics(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the metrics file ({e.__class__.__name__}: {e})", path) from None
    except json.JSONDecodeError as e:
        raise UserError(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}", path) from None


# ---- the page -----------------------------------------------------------------------------------


def _findings_text(row: dict) -> str:
    parts = []
    for f in FINDING_NAMES:
        if f == NO_FINDING or not row.get(f):
            continue
        extra = " ".join(str(row[k]) for k in (severity_column(f), laterality_column(f)) if row.get(k))
        parts.append(f"{f} ({extra})" if extra else f)
    return ", ".join(parts) or NO_FINDING


def _identity(ok: pd.DataFrame) -> list[tuple[str, str]]:
    out = []
    for col in ("backend", "backend_version", "model", "model_hash", "sampler"):
        if col in ok.columns:
            vals = [v for v in ok[col].dropna().astype(str).unique() if v]
            if vals:
                out.append((col, ", ".join(vals[:3]) + (f" (+{len(vals) - 3} more)" if len(vals) > 3 else "")))
    return out


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def build_report(out: str | Path, dest: str | Path | None = None, per_cohort: int = 12,
                 metrics: str | Path | None = None, tile_px: int = 192) -> Path:
    """Write the report for output folder `out` into `dest` (default OUT/report); return index.html."""
    from ..export.contact_sheet import contact_sheet

    if per_cohort < 1:
        raise UserError(f"--per-cohort must be at least 1, got {per_cohort}")
    root = _local_root(out)
    if dest is None:
        if root is None:
            raise UserError("a remote output folder needs --out: where to write the report locally", out)
        dest = root / REPORT_DIR
    dest = Path(dest)
    if root is not None:
        r, d = root.resolve(), dest.resolve()
        if d == r or any(d == r / sub or r / sub in d.parents for sub in DATASET_DIRS):
            raise UserError("the report goes in its own folder, not among the dataset's files (try OUT/report)", dest)
    metrics_path = Path(metrics) if metrics is not None else dest / METRICS
    if metrics is not None and not metrics_path.is_file():
        raise UserError("no such metrics file", metrics_path)

    store, table, recipe, raw = load_dataset(out)
    df = table.to_pandas()
    ok_mask = df["status"] == "ok"
    ok, failed = df[ok_mask], df[~ok_mask]
    cohorts_in_recipe = {c.name: c for c in recipe.cohorts} if recipe is not None else {}
    cohort_names = list(cohorts_in_recipe) + [c for c in dict.fromkeys(df["cohort"]) if c not in cohorts_in_recipe]
    name = (recipe.name if recipe is not None else raw.get("name")) or Path(str(out)).name

    files: dict[str, bytes] = {}
    sections: list[str] = []
    nav: list[str] = []
    for i, cohort in enumerate(cohort_names):
        sub_ok = ok[ok["cohort"] == cohort]
        sub_failed = failed[failed["cohort"] == cohort]
        anchor = f"cohort-{i}"
        nav.append(f'<a href="#{anchor}">{esc(cohort)}</a>')
        parts = [f'<section id="{anchor}"><h2>Cohort {esc(cohort)}</h2>',
                 f'<p class="meta">{len(sub_ok)} images ok, {len(sub_failed)} failed'
                 + (f", {cohorts_in_recipe[cohort].count} requested" if cohort in cohorts_in_recipe else "")
                 + "</p>"]
        # contact sheet: the first `per_cohort` ok images, with the table of what each tile is
        shown = sub_ok.head(per_cohort)
        if len(shown):
            picked = table.take(pa.array(shown.index.to_numpy(), pa.int64()))
            png = contact_sheet(store, picked, n=len(shown), tile_px=tile_px, columns=min(6, len(shown)))
            fname = f"contact_{i:02d}_{cohort}.png"
            files[fname] = png
            alt = (f"Contact sheet of cohort {cohort}: {len(shown)} of {len(sub_ok)} images with mask outlines and "
                   f"boxes drawn on; each tile is described in the table that follows.")
            parts.append("<h3>Images</h3>" + _img(fname, alt))
            rows = []
            for k, r in enumerate(shown.to_dict("records")):
                boxes = r.get("realised_boxes")
                boxes = list(boxes) if boxes is not None else []
                masks = r.get("masks")
                masks = [m["name"] for m in masks] if masks is not None else []
                img = Path(store.root) / r["image_png"] if r.get("image_png") and root is not None else None
                link = (f'<a href="{esc(_rel(img, dest))}">{esc(r["job_id"])}</a>' if img is not None else esc(r["job_id"]))
                rows.append([_num(k + 1), f"<td>{link}</td>", _td(r.get("view")), _td(r.get("sex")), _num(r.get("age")),
                             _td(_findings_text(r)), _td(", ".join(masks) or "-"),
                             _td(", ".join(sorted({b["label"] for b in boxes})) or "-")])
            parts.append("<details><summary>What each tile shows (left to right, top to bottom)</summary>"
                         + _table(["tile", "job", "view", "sex", "age", "findings", "masks", "boxes"], rows) + "</details>")
        else:
            parts.append("<p>No images to show: every job of this cohort failed, or none ran.</p>")
        # composition: requested (recipe) against realised (manifest)
        spec = cohorts_in_recipe.get(cohort)
        comp = charts.composition(spec, sub_ok)
        chart = f"composition_{i:02d}_{cohort}.png"
        files[chart] = charts.composition_chart(f"{cohort}: requested vs realised", comp, len(sub_ok))
        parts.append("<h3>Requested against realised</h3>")
        if spec is None:
            parts.append('<p class="na">The recipe does not describe this cohort (or recipe.yaml is missing or '
                         "unreadable): only what was realised is shown.</p>")
        elif spec.findings == "natural":
            parts.append('<p class="meta">Findings were drawn from the priors (findings: natural): no requested '
                         "prevalence to compare with.</p>")
        parts.append(_img(chart, f"Bar charts of finding prevalence, sex, age and view for cohort {cohort}: requested "
                                 "(hatched) against realised (filled); the same numbers are in the table that follows.",
                          "chart"))
        crow = []
        for panel in charts.PANELS:
            for cat, want, got in comp[panel]:
                crow.append([_td(charts.PANEL_TITLES[panel]), _td(cat), f'<td class="num">{_pct(want)}</td>',
                             f'<td class="num">{_pct(got)}</td>',
                             f'<td class="num">{round(got * len(sub_ok))}</td>'])
        parts.append("<details><summary>The numbers</summary>"
                     + _table(["", "category", "requested", "realised", "images"], crow) + "</details>")
        parts.append("</section>")
        sections.append("".join(parts))

    # failures
    fail_html = "<p>None: every job produced an image.</p>"
    if len(failed):
        rows = [[_td(r["job_id"]), _td(r["cohort"]), _num(r.get("index")), f'<td class="bad">{esc(r.get("error"))}</td>']
                for r in failed.head(MAX_FAILURES).to_dict("records")]
        more = f"<p>… and {len(failed) - MAX_FAILURES} more (see the manifest).</p>" if len(failed) > MAX_FAILURES else ""
        fail_html = _table(["job", "cohort", "index", "error"], rows) + more

    # metrics
    metrics_html = ('<p class="meta">No metrics yet: run <code>chexforge eval</code> to write '
                    f"<code>{esc(metrics_path)}</code>, or pass <code>--metrics FILE</code>.</p>")
    if metrics_path.is_file():
        data = load_metrics(metrics_path)
        metrics_html = f'<p class="meta">From <code>{esc(metrics_path)}</code>.</p>' + render_metrics(data)
        pairs = metrics_path.parent / NEAREST_PAIRS
        if pairs.is_file():
            if pairs.resolve() != (dest / NEAREST_PAIRS).resolve():
                files[NEAREST_PAIRS] = pairs.read_bytes()
            metrics_html += ("<h3>Nearest pairs</h3>" + _img(
                NEAREST_PAIRS, "Nearest pairs found by the memorization screen: each generated image beside its closest "
                "reference image; the distances are in the metrics tables above."))
    nav += ['<a href="#failures">failures</a>', '<a href="#metrics">metrics</a>']

    # header
    per = [[_td(c), _num(int((ok["cohort"] == c).sum())), _num(int((failed["cohort"] == c).sum())),
            _num(cohorts_in_recipe[c].count if c in cohorts_in_recipe else None)] for c in cohort_names]
    per.append(["<th scope=row>total</th>", _num(len(ok)), _num(len(failed)),
                _num(recipe.total if recipe is not None else None)])
    links = []
    if root is not None:
        for rel, what in (("manifest.parquet", "manifest"), ("README.md", "dataset card"), ("recipe.yaml", "recipe"),
                          ("coco.json", "COCO boxes")):
            if store.exists(rel):
                links.append(f'<a href="{esc(_rel(root / rel, dest))}">{what} ({rel})</a>')
    ident = _identity(ok if len(ok) else df)
    description = (recipe.description if recipe is not None else raw.get("description")) or ""
    recipe_line = (f"recipe <code>{esc(name)}</code>, seed {esc(recipe.seed)}, backend <code>{esc(recipe.backend)}</code>, "
                   f"{esc(recipe.output.size)} px" if recipe is not None
                   else '<span class="na">recipe.yaml is missing or unreadable</span>')
    head = [
        f"<h1>{esc(name)}</h1>",
        f"<p>{esc(description)}</p>" if description else "",
        f'<p class="meta">Synthetic chest radiographs made by chexforge; none depicts a real patient. {recipe_line}. '
        f"Folder <code>{esc(store.root)}</code>.</p>",
        f'<p id="counts">Jobs: <strong id="n-jobs">{len(df)}</strong>; images ok: <strong id="n-ok">{len(ok)}</strong>; '
        f'failed: <strong id="n-failed">{len(failed)}</strong>.</p>',
        _table(["cohort", "ok", "failed", "requested"], per, "Images per cohort"),
        _table(["", "value"], [[f"<th scope=row>{esc(k)}</th>", f"<td><code>{esc(v)}</code></td>"] for k, v in ident],
               "Generator identity") if ident else "",
        "<p>" + " · ".join(links) + "</p>" if links else "",
        "<nav>" + "".join(nav) + "</nav>",
    ]
    page = "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(name)}: chexforge report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header>", *head, "</header><main>",
        *sections,
        f'<section id="failures"><h2>Failed jobs ({len(failed)})</h2>{fail_html}</section>',
        f'<section id="metrics"><h2>Evaluation metrics</h2>{metrics_html}</section>',
        f'</main><footer><p class="meta">Made by chexforge {esc(__version__)} <code>chexforge report</code>.</p></footer>',
        "</body></html>",
        "",
    ])
    dest.mkdir(parents=True, exist_ok=True)
    mode = _public_mode()
    for fname, data in [*files.items(), ("index.html", page.encode("utf-8"))]:
        # index.html last: a half-written report never has a page pointing at nothing
        atomic.write_bytes(dest / fname, data)
        os.chmod(dest / fname, mode)
    return dest / "index.html"


def _public_mode() -> int:
    """The mode a plain `open()` would give (0644 under the usual umask), not the temporary file's
    0600: a report is for reading, by a static web server too."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
