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

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
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
from .dataset_stats import dataset_metrics

REPORT_DIR = "report"
IDENTITY = ("backend", "backend_version", "model", "model_hash", "sampler")
LINKED = (("manifest.parquet", "manifest"), ("README.md", "dataset card"), ("recipe.yaml", "recipe"),
          ("coco.json", "COCO boxes and masks"), ("datalist.json", "MONAI datalist"))
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
nav a{margin-right:1em;white-space:nowrap}
#missing-table{width:100%;table-layout:fixed}#missing-table th:first-child{width:16%}
#missing-table td{overflow-wrap:anywhere}
.cards{display:flex;flex-wrap:wrap;gap:.6em;margin:.6em 0}
.card{border:1px solid #ccc;border-radius:6px;padding:.4em .9em;background:#fafafa}
.big{font-size:1.6em;font-weight:600;margin-right:.2em}
table.matrix td{min-width:2.5em;text-align:center}
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


# ---- templates (Jinja2, autoescaped) -------------------------------------------------------------


def _fmt(value: Any) -> str:
    """A value as the page shows it: numbers to 4 significant digits, null as '-', booleans as
    JSON writes them. Escaping is the template engine's (autoescape)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _pct2(x: float | None) -> str:
    """A small fraction as a percentage with two significant digits (a nodule is 0.3 % of a film)."""
    return "-" if x is None else f"{100 * x:.2g}%"


def _unavailable(v: Any) -> bool:
    return isinstance(v, dict) and v.get("available") is False


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _flat_record(v: Any) -> bool:
    return isinstance(v, dict) and all(_scalar(x) for x in v.values())


def _split_object(value: dict) -> dict:
    """A JSON object's parts for the metrics tree: scalars (one metric/value table), a set of at
    least two flat objects such as one per cohort (one table, rows = keys), and the rest (headed
    sections). Nothing about the keys is assumed."""
    scalars = [(k, v) for k, v in value.items() if _scalar(v)]
    nested = [(k, v) for k, v in value.items() if not _scalar(v)]
    flat = [(k, v) for k, v in nested if _flat_record(v) and not _unavailable(v) and v]
    if len(flat) < 2:
        flat = []
    keys = {k for k, _ in flat}
    return {"scalars": scalars, "flat": flat, "flat_columns": list(dict.fromkeys(c for _, v in flat for c in v)),
            "nested": [(k, v) for k, v in nested if k not in keys]}


def _heat(v: int, top: int) -> str:
    """A cell's background: white for 0 to a mid blue for the largest count (text stays readable)."""
    t = 0.0 if not top else min(1.0, v / top)
    r, g, b = (round(255 - t * (255 - c)) for c in (120, 170, 225))
    return f"#{r:02x}{g:02x}{b:02x}"


@lru_cache(maxsize=1)
def environment():
    """The report's Jinja2 environment: templates shipped in chexforge/evaluate/templates,
    autoescape on for every template (all dataset text is escaped), undefined names an error."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("chexforge.evaluate", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(fmt=_fmt, pct=_pct, pct2=_pct2, split_object=_split_object, heat=_heat,
                       record_columns=lambda rows: list(dict.fromkeys(k for r in rows for k in r)),
                       extract_diag=lambda f, matrix: matrix[f][f])
    env.tests.update(unavailable=_unavailable, scalar=_scalar, flat_record=_flat_record)
    return env


def render_metrics(value: Any, depth: int = 0) -> str:
    """Nested dicts become headed sections and tables; `{"available": false, "why": ...}` becomes
    a "not available: why" line; lists of records become tables. Nothing about the keys is assumed."""
    macro = environment().get_template("macros.html.j2").module.tree
    return str(macro(value, depth))


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
    stats: dict  # dataset_stats.dataset_metrics of the manifest: summary, laterality, sizes, ...

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
        stats=dataset_metrics(table, recipe, store.read_bytes),
    )


# ---- render: plain data → the page and its images -------------------------------------------------


def _tiles(c: CohortPage, tile_px: int, store: Store) -> tuple[dict, dict[str, bytes]]:
    """The contact sheet of the shown rows and what each tile is, for cohort.html.j2."""
    if not c.shown:
        return {"sheet": None, "sheet_alt": "", "tiles": []}, {}
    fname = f"contact_{c.index:02d}_{c.name}.png"
    png = draw_sheet(store, c.shown, tile_px, columns=min(6, len(c.shown)))
    alt = (f"Contact sheet of cohort {c.name}: {len(c.shown)} of {c.tally.n} images with mask outlines and "
           f"boxes drawn on; each tile is described in the table that follows.")
    tiles = [{"job_id": r["job_id"], "href": href, "view": r.get("view"), "sex": r.get("sex"), "age": r.get("age"),
              "findings": _findings_text(r),
              "masks": ", ".join(m["name"] for m in r.get("masks") or []) or "-",
              "boxes": ", ".join(sorted({b["label"] for b in r.get("realised_boxes") or []})) or "-"}
             for r, href in zip(c.shown, c.hrefs)]
    return {"sheet": fname, "sheet_alt": alt, "tiles": tiles}, {fname: png}


def _cohort(c: CohortPage, tile_px: int, store: Store) -> tuple[dict, dict[str, bytes]]:
    tiles, files = _tiles(c, tile_px, store)
    chart = f"composition_{c.index:02d}_{c.name}.png"
    files[chart] = charts.composition_chart(f"{c.name}: requested vs realised", c.composition, c.tally.n)
    note = "unknown" if c.spec is None else "natural" if c.spec.findings == "natural" else ""
    rows = [{"panel": charts.PANEL_TITLES[panel], "category": cat, "requested": want, "realised": got,
             "images": round(got * c.tally.n)} for panel in charts.PANELS for cat, want, got in c.composition[panel]]
    return {"index": c.index, "name": c.name, "n": c.tally.n, "failed": c.tally.failed,
            "requested": c.spec.images if c.spec is not None else None,  # images: a study's views each
            "chart": chart, "note": note, "composition": rows, **tiles}, files


def _headline(m: Any) -> list[tuple[str, str, str]]:
    """The few numbers a reader looks for first, when metrics.json has them (any other shape: none)."""
    if not isinstance(m, dict):
        return []
    out = []

    def get(*path):
        v = m
        for k in path:
            if not isinstance(v, dict) or k not in v:
                return None
            v = v[k]
        return v

    fid = get("fidelity")
    if isinstance(fid, dict) and fid.get("available"):
        feats = get("features", "name")
        for k, what in (("fid", "Fréchet distance to the reference features (0 = same distribution)"),
                        ("kid_mean", "kernel distance to the reference (unbiased; near 0 = same)"),
                        ("precision", "share of generated images inside the reference manifold"),
                        ("recall", "share of reference images covered by the generated manifold"),
                        ("coverage", "share of reference neighbourhoods holding a generated image")):
            if isinstance(fid.get(k), (int, float)):
                out.append((k, _fmt(fid[k]), what + (f" ({feats} features)" if feats else "")))
    mem = get("memorization")
    if isinstance(mem, dict) and mem.get("available") and "flagged" in mem:
        out.append(("memorized", f"{mem['flagged']} of {mem.get('of', '?')}",
                    f"generated images whose nearest reference has cosine ≥ {mem.get('threshold')}"))
    pdiv = get("pixel_diversity")
    if isinstance(pdiv, dict) and pdiv.get("available"):
        out.append(("MS-SSIM within cohorts", _fmt(pdiv.get("ms_ssim_mean")),
                    f"mean over {pdiv.get('pairs')} pairs of one cohort, different seeds (1 = identical)"))
        out.append(("pixel correlation within cohorts", _fmt(pdiv.get("pixel_corr_mean")),
                    "mean Pearson r of the pixels of those pairs"))
    div = get("diversity")
    if isinstance(div, dict) and div.get("available") and "ms_ssim_mean" in div:
        out.append((f"MS-SSIM same {div.get('by', 'prompt')}", _fmt(div["ms_ssim_mean"]), f"over {div.get('pairs')} pairs"))
    for key, label, field, what in (("findings", "finding AUROC", "mean_auroc", "classifier score against the requested finding"),
                                     ("sex", "sex accuracy", "accuracy", "predicted against requested sex"),
                                     ("age", "age MAE (years)", "mae", "predicted against requested age"),
                                     ("segmentation", "mask Dice", "mean_dice", "predicted masks against the dataset's"),
                                     ("boxes", "box hit rate", "hit_rate", "realised boxes found by the detector")):
        e = get("adherence", key)
        if isinstance(e, dict) and e.get("available") and field in e:
            out.append((label, _fmt(e[field]), what))
    return out


def _missing(d: ReportData) -> list[dict]:
    """Each metric that is not on the page, why, and what it needs: from metrics.json's `missing`
    (chexforge eval writes it), else found in whatever metrics file was given, else the list of
    what `chexforge eval` would compute; plus the dataset statistics that could not be measured."""
    from .run import MODEL_NEEDS, REFERENCE_NEEDS, features_needs, missing

    m = d.metrics
    if not d.has_metrics:
        both = f"{REFERENCE_NEEDS} and {features_needs()}"
        out = [{"metric": "pixel_diversity", "why": "chexforge eval has not been run", "needs": "chexforge eval OUT (no reference, no weights)"},
               {"metric": "fidelity", "why": "chexforge eval has not been run", "needs": both},
               {"metric": "memorization", "why": "chexforge eval has not been run", "needs": both},
               {"metric": "adherence.findings", "why": "chexforge eval has not been run", "needs": features_needs()}]
        out += [{"metric": f"adherence.{k}", "why": "chexforge eval has not been run", "needs": v} for k, v in MODEL_NEEDS.items()]
    elif isinstance(m, dict) and isinstance(m.get("missing"), list):
        out = [e for e in m["missing"] if isinstance(e, dict) and not str(e.get("metric", "")).startswith("dataset.")]
    elif isinstance(m, dict):
        out = [e for e in missing(m) if not e["metric"].startswith("dataset.")]
    else:
        out = []
    out += [{"metric": f"dataset.{k}", "why": v.get("why"), "needs": v.get("needs")}
            for k, v in d.stats.items() if _unavailable(v)]
    return out


def render(d: ReportData, tile_px: int = 192) -> tuple[str, dict[str, bytes]]:
    """(index.html text, {file name: PNG bytes} it shows)."""
    files: dict[str, bytes] = {}
    cohorts = []
    for c in d.cohorts:
        view, images = _cohort(c, tile_px, d.store)
        cohorts.append(view)
        files.update(images)
    dist = charts.distributions_chart(d.stats["boxes"], d.stats["masks"])
    if dist is not None:
        files["distributions.png"] = dist
    if d.pairs is not None and not d.pairs_in_place:
        files[NEAREST_PAIRS] = d.pairs
    m = d.metrics
    # The dataset statistics in metrics.json are shown above from the manifest itself; the tree
    # holds everything else, as it is.
    tree = {k: v for k, v in m.items() if k not in ("dataset", "missing")} if isinstance(m, dict) else m
    pdiv = m.get("pixel_diversity") if isinstance(m, dict) else None
    page = environment().get_template("page.html.j2").render(
        d=d, css=_CSS, version=__version__, cohorts=cohorts, stats=d.stats, max_failures=MAX_FAILURES,
        distributions="distributions.png" if dist is not None else None,
        headline=_headline(m), tree=tree, missing=_missing(d),
        pixel_diversity=pdiv.get("per_cohort") if isinstance(pdiv, dict) and pdiv.get("available") else None,
        pairs=NEAREST_PAIRS if d.pairs is not None else None,
        metrics_source=(f"chexforge eval of {m['generated'].get('source')}" if isinstance(m, dict)
                        and isinstance(m.get("generated"), dict) else None),
    )
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
