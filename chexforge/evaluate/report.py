"""The visual report (`chexforge report OUT`): one static HTML page with its PNGs beside it.

What it holds, top to bottom: the dataset's identity and counts; per cohort, a contact sheet with
masks and boxes drawn on (the `chexforge inspect` tiles) and a table of what each tile shows; the
requested-against-realised composition (recipe against manifest, status-ok rows) as a chart and as
a table; the failed jobs with their errors; and the evaluation metrics when a metrics.json is there.

Plain HTML with a little inline CSS: no scripts, nothing fetched from the network, alt text on
every image and every number also in text, so it reads without images. Everything is written
atomically under the report folder; the dataset's own files are only read.

Two steps: `gather` reads the folder, recipe and metrics into a `ReportData` (plain data, nothing
written), `render` turns that into the page and its PNGs; `build_report` checks the paths, runs
both and writes the result.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .. import __version__, atomic
from ..contracts import manifest as mc
from ..contracts.jobs import laterality_column, severity_column
from ..contracts.vocabulary import NO_FINDING
from ..errors import UserError
from ..export import manifest as mf
from ..export.contact_sheet import draw_sheet, row_findings
from ..plan.summary import CohortTally, Composition, ok_mask
from ..recipe.schema import Cohort, Recipe
from ..store import Store, open_store
from . import report_charts as charts

REPORT_DIR = "report"
IDENTITY = ("backend", "backend_version", "model", "model_hash", "sampler")
LINKED = (("manifest.parquet", "manifest"), ("README.md", "dataset card"), ("recipe.yaml", "recipe"),
          ("coco.json", "COCO boxes"))
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


def load_dataset(out: str | Path) -> tuple[Store, pa.Table, Recipe | None, dict]:
    """(store, manifest, parsed recipe or None, raw recipe dict); UserError for a folder that is not
    a chexforge output folder."""
    store = open_store(out)
    if not store.exists(mc.MANIFEST) and not mf.part_names(store):
        raise UserError("no manifest.parquet here: not a chexforge output folder (or nothing generated yet)", out)
    table = mf.read_manifest(store)
    recipe, raw = None, {}
    if store.exists("recipe.yaml"):
        from ..contracts.limits import load_yaml
        from ..recipe import parse_recipe

        text = store.read_bytes("recipe.yaml").decode("utf-8", "replace")
        try:
            raw = load_yaml(text, f"{store.root}/recipe.yaml") or {}  # under the limits: an output folder is input too
            recipe = parse_recipe(text, f"{store.root}/recipe.yaml")
        except (UserError, ValueError):
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


# ---- gather: the dataset, recipe and metrics as the plain data the page shows -----------------


@dataclass
class CohortPage:
    index: int
    name: str
    spec: Cohort | None  # what the recipe asks of this cohort; None when it does not name it
    tally: CohortTally  # what was realised (ok rows) and how many jobs failed
    composition: dict[str, list[tuple[str, float | None, float]]]  # charts.composition of the two
    shown: list[dict]  # the first `per_cohort` ok manifest rows, the contact sheet's tiles
    hrefs: list[str | None]  # each shown image, relative to the report folder (None: not local)


@dataclass
class ReportData:
    name: str
    description: str
    recipe: Recipe | None  # None when recipe.yaml is missing or unreadable
    store: Store  # where the tiles' pixels are read
    n_jobs: int
    cohorts: list[CohortPage]
    failures: list[dict]  # the first MAX_FAILURES failed rows: job_id, cohort, index, error
    identity: list[tuple[str, str]]
    links: list[tuple[str, str, str]]  # (href, what, file name) of the dataset's own files
    metrics_path: Path
    has_metrics: bool  # whether there is a metrics file (`metrics` may be JSON's null)
    metrics: Any  # the parsed metrics file
    pairs: bytes | None  # the nearest-pairs PNG beside the metrics, if any
    pairs_in_place: bool  # it already is the report folder's nearest_pairs.png: not copied

    @property
    def n_ok(self) -> int:
        return sum(c.tally.n for c in self.cohorts)

    @property
    def n_failed(self) -> int:
        return sum(c.tally.failed for c in self.cohorts)


def _findings_text(row: dict) -> str:
    parts = []
    for f in row_findings(row):
        extra = " ".join(str(row[k]) for k in (severity_column(f), laterality_column(f)) if row.get(k))
        parts.append(f"{f} ({extra})" if extra else f)
    return ", ".join(parts) or NO_FINDING


def _identity(rows: pa.Table) -> list[tuple[str, str]]:
    out = []
    for col in IDENTITY:
        if col in rows.column_names:
            vals = [v for v in map(str, pc.unique(pc.drop_null(rows.column(col))).to_pylist()) if v]
            if vals:
                out.append((col, ", ".join(vals[:3]) + (f" (+{len(vals) - 3} more)" if len(vals) > 3 else "")))
    return out


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def _cohorts(table: pa.Table, ok: pa.Table, recipe: Recipe | None, per_cohort: int,
             root: Path | None, dest: Path, store: Store) -> list[CohortPage]:
    """The recipe's cohorts first, in its order, then any others the manifest holds."""
    specs = {c.name: c for c in recipe.cohorts} if recipe is not None else {}
    tallies = Composition.of(table).cohorts
    pages = []
    for i, name in enumerate(list(specs) + [c for c in tallies if c not in specs]):
        tally = tallies.get(name, CohortTally())
        shown = ok.filter(pc.equal(ok.column("cohort"), name)).slice(0, per_cohort).to_pylist()
        hrefs = [_rel(Path(store.root) / r["image_png"], dest) if r.get("image_png") and root is not None else None
                 for r in shown]
        pages.append(CohortPage(i, name, specs.get(name), tally, charts.composition(specs.get(name), tally),
                                shown, hrefs))
    return pages


def gather(out: str | Path, dest: Path, per_cohort: int, metrics_path: Path) -> ReportData:
    """Read what the page shows; nothing is written."""
    root = _local_root(out)
    store, table, recipe, raw = load_dataset(out)
    mask = ok_mask(table)
    ok, failed = table.filter(mask), table.filter(pc.invert(mask))
    links = [(_rel(root / rel, dest), what, rel) for rel, what in LINKED if store.exists(rel)] if root is not None else []
    has_metrics, metrics, pairs = metrics_path.is_file(), None, None
    pairs_path = metrics_path.parent / NEAREST_PAIRS
    if has_metrics:
        metrics = load_metrics(metrics_path)
        pairs = pairs_path.read_bytes() if pairs_path.is_file() else None
    return ReportData(
        name=(recipe.name if recipe is not None else raw.get("name")) or Path(str(out)).name,
        description=(recipe.description if recipe is not None else raw.get("description")) or "",
        recipe=recipe, store=store, n_jobs=table.num_rows,
        cohorts=_cohorts(table, ok, recipe, per_cohort, root, dest, store),
        failures=failed.slice(0, MAX_FAILURES).select(["job_id", "cohort", "index", "error"]).to_pylist(),
        identity=_identity(ok if ok.num_rows else table), links=links,
        metrics_path=metrics_path, has_metrics=has_metrics, metrics=metrics, pairs=pairs,
        pairs_in_place=pairs is not None and pairs_path.resolve() == (dest / NEAREST_PAIRS).resolve(),
    )


# ---- render: plain data → the page and its images -------------------------------------------------


def _tiles(c: CohortPage, tile_px: int, store: Store) -> tuple[str, dict[str, bytes]]:
    """The contact sheet of the shown rows and the table of what each tile is."""
    if not c.shown:
        return "<p>No images to show: every job of this cohort failed, or none ran.</p>", {}
    fname = f"contact_{c.index:02d}_{c.name}.png"
    png = draw_sheet(store, c.shown, tile_px, columns=min(6, len(c.shown)))
    alt = (f"Contact sheet of cohort {c.name}: {len(c.shown)} of {c.tally.n} images with mask outlines and "
           f"boxes drawn on; each tile is described in the table that follows.")
    rows = []
    for k, (r, href) in enumerate(zip(c.shown, c.hrefs)):
        masks = [m["name"] for m in r.get("masks") or []]
        labels = sorted({b["label"] for b in r.get("realised_boxes") or []})
        link = f'<a href="{esc(href)}">{esc(r["job_id"])}</a>' if href is not None else esc(r["job_id"])
        rows.append([_num(k + 1), f"<td>{link}</td>", _td(r.get("view")), _td(r.get("sex")), _num(r.get("age")),
                     _td(_findings_text(r)), _td(", ".join(masks) or "-"), _td(", ".join(labels) or "-")])
    html_ = ("<h3>Images</h3>" + _img(fname, alt)
             + "<details><summary>What each tile shows (left to right, top to bottom)</summary>"
             + _table(["tile", "job", "view", "sex", "age", "findings", "masks", "boxes"], rows) + "</details>")
    return html_, {fname: png}


def _requested_vs_realised(c: CohortPage) -> tuple[str, dict[str, bytes]]:
    chart = f"composition_{c.index:02d}_{c.name}.png"
    png = charts.composition_chart(f"{c.name}: requested vs realised", c.composition, c.tally.n)
    parts = ["<h3>Requested against realised</h3>"]
    if c.spec is None:
        parts.append('<p class="na">The recipe does not describe this cohort (or recipe.yaml is missing or '
                     "unreadable): only what was realised is shown.</p>")
    elif c.spec.findings == "natural":
        parts.append('<p class="meta">Findings were drawn from the priors (findings: natural): no requested '
                     "prevalence to compare with.</p>")
    parts.append(_img(chart, f"Bar charts of finding prevalence, sex, age and view for cohort {c.name}: requested "
                             "(hatched) against realised (filled); the same numbers are in the table that follows.",
                      "chart"))
    rows = [[_td(charts.PANEL_TITLES[panel]), _td(cat), f'<td class="num">{_pct(want)}</td>',
             f'<td class="num">{_pct(got)}</td>', f'<td class="num">{round(got * c.tally.n)}</td>']
            for panel in charts.PANELS for cat, want, got in c.composition[panel]]
    parts.append("<details><summary>The numbers</summary>"
                 + _table(["", "category", "requested", "realised", "images"], rows) + "</details>")
    return "".join(parts), {chart: png}


def _cohort_section(c: CohortPage, tile_px: int, store: Store) -> tuple[str, dict[str, bytes]]:
    requested = f", {c.spec.images} requested" if c.spec is not None else ""  # images: a study's views each
    tiles, files = _tiles(c, tile_px, store)
    comp, chart = _requested_vs_realised(c)
    return (f'<section id="cohort-{c.index}"><h2>Cohort {esc(c.name)}</h2>'
            f'<p class="meta">{c.tally.n} images ok, {c.tally.failed} failed{requested}</p>'
            f"{tiles}{comp}</section>"), {**files, **chart}


def _failures(d: ReportData) -> str:
    if not d.n_failed:
        return "<p>None: every job produced an image.</p>"
    rows = [[_td(r["job_id"]), _td(r["cohort"]), _num(r.get("index")), f'<td class="bad">{esc(r.get("error"))}</td>']
            for r in d.failures]
    more = f"<p>… and {d.n_failed - MAX_FAILURES} more (see the manifest).</p>" if d.n_failed > MAX_FAILURES else ""
    return _table(["job", "cohort", "index", "error"], rows) + more


def _metrics(d: ReportData) -> tuple[str, dict[str, bytes]]:
    if not d.has_metrics:
        return ('<p class="meta">No metrics yet: run <code>chexforge eval</code> to write '
                f"<code>{esc(d.metrics_path)}</code>, or pass <code>--metrics FILE</code>.</p>"), {}
    out = f'<p class="meta">From <code>{esc(d.metrics_path)}</code>.</p>' + render_metrics(d.metrics)
    if d.pairs is None:
        return out, {}
    out += ("<h3>Nearest pairs</h3>" + _img(
        NEAREST_PAIRS, "Nearest pairs found by the memorization screen: each generated image beside its closest "
        "reference image; the distances are in the metrics tables above."))
    return out, {} if d.pairs_in_place else {NEAREST_PAIRS: d.pairs}


def _header(d: ReportData) -> list[str]:
    r = d.recipe
    per = [[_td(c.name), _num(c.tally.n), _num(c.tally.failed), _num(c.spec.images if c.spec is not None else None)]
           for c in d.cohorts]
    per.append(["<th scope=row>total</th>", _num(d.n_ok), _num(d.n_failed), _num(r.total if r is not None else None)])
    recipe_line = (f"recipe <code>{esc(d.name)}</code>, seed {esc(r.seed)}, backend <code>{esc(r.backend)}</code>, "
                   f"{esc(r.output.size)} px" if r is not None
                   else '<span class="na">recipe.yaml is missing or unreadable</span>')
    links = [f'<a href="{esc(href)}">{what} ({rel})</a>' for href, what, rel in d.links]
    nav = [f'<a href="#cohort-{c.index}">{esc(c.name)}</a>' for c in d.cohorts]
    nav += ['<a href="#failures">failures</a>', '<a href="#metrics">metrics</a>']
    return [
        f"<h1>{esc(d.name)}</h1>",
        f"<p>{esc(d.description)}</p>" if d.description else "",
        f'<p class="meta">Synthetic chest radiographs made by chexforge; none depicts a real patient. {recipe_line}. '
        f"Folder <code>{esc(d.store.root)}</code>.</p>",
        f'<p id="counts">Jobs: <strong id="n-jobs">{d.n_jobs}</strong>; images ok: <strong id="n-ok">{d.n_ok}</strong>; '
        f'failed: <strong id="n-failed">{d.n_failed}</strong>.</p>',
        _table(["cohort", "ok", "failed", "requested"], per, "Images per cohort"),
        _table(["", "value"], [[f"<th scope=row>{esc(k)}</th>", f"<td><code>{esc(v)}</code></td>"] for k, v in d.identity],
               "Generator identity") if d.identity else "",
        "<p>" + " · ".join(links) + "</p>" if links else "",
        "<nav>" + "".join(nav) + "</nav>",
    ]


def render(d: ReportData, tile_px: int = 192) -> tuple[str, dict[str, bytes]]:
    """(index.html text, {file name: PNG bytes} it shows)."""
    files: dict[str, bytes] = {}
    sections = []
    for c in d.cohorts:
        section, images = _cohort_section(c, tile_px, d.store)
        sections.append(section)
        files.update(images)
    metrics_html, images = _metrics(d)
    files.update(images)
    page = "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(d.name)}: chexforge report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header>", *_header(d), "</header><main>",
        *sections,
        f'<section id="failures"><h2>Failed jobs ({d.n_failed})</h2>{_failures(d)}</section>',
        f'<section id="metrics"><h2>Evaluation metrics</h2>{metrics_html}</section>',
        f'</main><footer><p class="meta">Made by chexforge {esc(__version__)} <code>chexforge report</code>.</p></footer>',
        "</body></html>",
        "",
    ])
    return page, files


# ---- build: check the paths, gather, render, write ----------------------------------------------


def _destination(out: str | Path, dest: str | Path | None) -> Path:
    """The report folder: OUT/report by default, never among the dataset's own files."""
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
    return dest


def build_report(out: str | Path, dest: str | Path | None = None, per_cohort: int = 12,
                 metrics: str | Path | None = None, tile_px: int = 192) -> Path:
    """Write the report for output folder `out` into `dest` (default OUT/report); return index.html."""
    if per_cohort < 1:
        raise UserError(f"--per-cohort must be at least 1, got {per_cohort}")
    dest = _destination(out, dest)
    metrics_path = Path(metrics) if metrics is not None else dest / METRICS
    if metrics is not None and not metrics_path.is_file():
        raise UserError("no such metrics file", metrics_path)
    page, files = render(gather(out, dest, per_cohort, metrics_path), tile_px)
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
