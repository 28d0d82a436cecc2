"""The chexforge command line: thin commands over the packages.

Bad input (recipes, flags, label files, checkpoints) prints one line and exits with status 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape as esc  # user text (recipe keys, errors) is never console markup
from rich.table import Table

from . import __version__
from .errors import UserError

app = typer.Typer(
    name="chexforge",
    help="A factory for labelled synthetic chest X-ray datasets.\n\n"
    "Write a recipe (YAML: cohorts, findings, demographics, view, masks, boxes), then:\n\n"
    "  chexforge validate recipe.yaml      check it\n\n"
    "  chexforge plan recipe.yaml          see the jobs it expands to (a dry run)\n\n"
    "  chexforge generate recipe.yaml      make the dataset (re-run to resume)\n\n"
    "  chexforge verify out/               re-hash every file against the manifest\n\n"
    "  chexforge inspect out/              counts and a contact sheet\n\n"
    "  chexforge eval out/ --reference R   metrics against real images\n\n"
    "  chexforge report out/               a static HTML report",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _console(stderr: bool = False) -> Console:
    """A console that does not crop: on a terminal rich follows the terminal's width, but piped
    (CI logs, `| tee`) it falls back to 80 columns and cuts wide tables with "…". Piped, $COLUMNS
    decides if set (rich reads it itself), else 200 columns. runtime/progress.py does the same
    for the progress bar."""
    stream = sys.stderr if stderr else sys.stdout
    piped = not (hasattr(stream, "isatty") and stream.isatty())
    return Console(stderr=stderr, width=200 if piped and not os.environ.get("COLUMNS", "").isdigit() else None)


out_console = _console()
err = _console(stderr=True)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        out_console.print(f"chexforge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug


# ---- validate ---------------------------------------------------------------------------------


@app.command()
def validate(recipes: list[Path] = typer.Argument(..., help="Recipe files (YAML).", show_default=False)) -> None:
    """Check recipes: schema, vocabulary, and what the chosen backend can render.

    Each problem is reported as FILE:LINE:COLUMN: place: what was expected. Exit status 2 if any recipe is bad.
    """
    from .recipe import load_recipe

    bad = 0
    for path in recipes:
        try:
            r = load_recipe(path)
        except UserError as e:
            err.print(f"[red]✗[/red] {esc(e.line())}", highlight=False, soft_wrap=True)
            bad += 1
            continue
        out_console.print(f"[green]✓[/green] {path}: {r.name}, {len(r.cohorts)} cohort(s), {r.total} images, backend {r.backend}",
                          highlight=False)
    if bad:
        raise typer.Exit(2)


# ---- plan -------------------------------------------------------------------------------------


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="Recipe file (YAML).", show_default=False),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the job table here (Parquet)."),
    show: int = typer.Option(0, "--show", help="Also print the first N jobs with their prompts."),
    sample: int | None = typer.Option(None, "--sample", min=0, help="Only a stratified, seeded sample of N jobs: proportional across cohorts and, within each, across sex × findings; the same N gives the same jobs."),
) -> None:
    """Expand a recipe into its jobs (a dry run): cohorts × counts, realised mix, estimated time.

    The job table is deterministic: the same recipe gives the same file byte for byte. Run it later with `chexforge generate --jobs JOBS --out OUT`.
    """
    from .plan import plan_report

    report = plan_report(recipe, out, show, sample=sample)
    _print_plan(report)
    if out is not None:
        out_console.print(f"wrote {report.jobs} jobs to {out}")


def _fold(table: Table, whole: tuple[str, ...] = ()) -> Table:
    """Cells wrap, and a word longer than its column breaks onto the next line instead of being
    cut to "…" (a narrow $COLUMNS in a CI log must not lose a cohort's name). On a console of 120
    columns or more, the columns named in `whole` (names to grep for) stay on one line while the
    others give way; narrower, they fold too (kept whole, they left the others no room at all)."""
    for column in table.columns:
        column.overflow = "fold"
        column.no_wrap = column.header in whole and out_console.width >= 120
    return table


def _print_plan(report) -> None:
    t = _fold(Table("cohort", "images", "views", "female", "age (median, range)", "findings (prevalence)", title="plan"),
              whole=("cohort",))
    for c in report.cohorts:
        views = ", ".join(f"{k} {v:.0%}" for k, v in c["views"].items())
        findings = ", ".join(f"{k} {v:.0%}" for k, v in c["findings"].items()) or "none"
        t.add_row(c["cohort"], str(c["count"]), views, f"{c['female']:.0%}", "{} ({}-{})".format(*c["age"]), findings)
    out_console.print(t)
    if report.seconds is not None:
        out_console.print(f"{report.jobs} images; about {_duration(report.seconds)} on one CPU with the {report.backend} backend")
    if report.first:
        t = _fold(Table("job_id", "cohort", "seed", "prompt", title=f"first {len(report.first)} jobs"),
                  whole=("job_id", "cohort", "seed"))
        for row in report.first:
            t.add_row(row["job_id"], row["cohort"], str(row["seed"]), row["prompt"])
        out_console.print(t)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---- generate ---------------------------------------------------------------------------------


@app.command()
def generate(
    recipe: Path | None = typer.Argument(None, help="Recipe file (YAML); or give --jobs.", show_default=False),
    out: str = typer.Option(..., "--out", "-o", help="Output folder or fsspec URL (created; re-running resumes it)."),
    jobs: Path | None = typer.Option(None, "--jobs", help="Run a job table written by `chexforge plan` instead of a recipe."),
    limit: int | None = typer.Option(None, "--limit", min=0, help="Make at most N new images this run: the first jobs not done yet, in plan order (the first cohort first), so not a sample of the dataset; see --sample."),
    sample: int | None = typer.Option(None, "--sample", min=0, help="Make only a stratified, seeded sample of N jobs of the plan: proportional across cohorts and, within each, across sex × findings; the same N gives the same jobs, so re-running resumes it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete chexforge's earlier outputs in --out first."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Jobs per backend call (default: the backend's)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Try again the jobs the manifest records as failed."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and report, write nothing."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    devices: str = typer.Option("auto", "--devices", help="auto (every GPU, else the CPU), cpu, cpu:N (N worker processes), or GPU numbers: 0,1,3."),
    shard: str | None = typer.Option(None, "--shard", help="i/n: make only shard i of n (e.g. $SLURM_ARRAY_TASK_ID/16); join with `chexforge merge`."),
    engine: str = typer.Option("local", "--engine", help="local (this machine) or ray (Ray Data on a cluster)."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Ray cluster address (e.g. auto, ray://head:10001); default: start a local Ray."),
    ray_actors: int | None = typer.Option(None, "--ray-actors", min=1, help="Ray actors (model copies); default: one per GPU or CPU."),
    gpus_per_actor: float = typer.Option(0.0, "--gpus-per-actor", min=0, help="GPUs each Ray actor takes (0 = CPU actors)."),
    export_threads: int = typer.Option(2, "--export-threads", min=1, help="Threads encoding and writing files beside the device."),
    max_attempts: int = typer.Option(2, "--max-attempts", min=1, help="Tries per job when a worker crashes."),
    break_lock: bool = typer.Option(False, "--break-lock", help="Take over the lock of --out left by a run of another host that is gone (a run of this host is judged by itself)."),
) -> None:
    """Generate a dataset: images (PNG/DICOM), masks, COCO boxes, manifest.parquet, dataset card.

    Resumable: the manifest records what is done, so re-running the same command skips finished images; a kill at any moment loses at most the batches in flight. Multi-GPU with --devices, job arrays with --shard, clusters with --engine ray.

    Examples: [bold]chexforge generate recipes/quickstart.yaml --out out/q[/bold] · [bold]chexforge generate --jobs jobs.parquet --out out/q --limit 100[/bold] · [bold]chexforge generate r.yaml --out out/s3 --shard 3/16[/bold]
    """
    from .runtime import RunOptions
    from .runtime import generate as make_dataset
    from .runtime.runner import dry_run as plan_only
    from .runtime.runner import parse_shard

    if dry_run:
        _print_plan(plan_only(recipe, jobs, sample=sample))
        return
    options = RunOptions(limit=limit, sample=sample, overwrite=overwrite, batch_size=batch_size, retry_failed=retry_failed,
                         progress=progress, devices=devices, engine=engine, ray_address=ray_address,
                         ray_actors=ray_actors, gpus_per_actor=gpus_per_actor, shard=parse_shard(shard),
                         export_threads=export_threads, max_attempts=max_attempts, break_lock=break_lock,
                         on_warning=lambda text: err.print(f"[yellow]warning:[/yellow] {esc(text)}", highlight=False,
                                                           soft_wrap=True))
    summary = make_dataset(out, recipe, jobs, options)
    done = summary.skipped + summary.generated + summary.failed
    line = (f"{summary.generated} new image(s) in {summary.seconds:.1f} s ({summary.rate:.2f} img/s); "
            f"{done}/{summary.planned} jobs done in {out}")
    if summary.skipped:
        line += f" ({summary.skipped} were already there)"
    out_console.print(line, highlight=False, soft_wrap=True)
    if summary.failed:
        err.print(f"[yellow]{summary.failed} job(s) failed[/yellow] (recorded in the manifest), e.g. {esc(summary.errors[0])}",
                  highlight=False)
    if summary.interrupted:
        err.print("interrupted: the batches in flight were committed; run the same command again to resume")
        raise typer.Exit(130)


# ---- status and merge -------------------------------------------------------------------------


@app.command()
def status(out: str = typer.Argument(..., help="An output folder (or URL) of `chexforge generate`.", show_default=False)) -> None:
    """Progress of a running or stopped run: done, failed, rate, ETA, and the last errors."""
    import time

    from .runtime.status import run_status

    st = run_status(out)
    t = Table(show_header=False, title=str(out))
    t.add_row("state", st.state)
    if st.writer is not None:
        t.add_row("run", st.writer)
    if st.engine is not None:
        t.add_row("engine / devices", f"{st.engine} / {', '.join(st.devices)}")
    if st.started is not None:
        t.add_row("started", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.started)))
    if st.engine is not None:
        t.add_row("rate (this run)", "measuring (no batch reported yet)" if st.rate is None else f"{st.rate:.2f} images/s")
    if st.eta_seconds is not None:
        t.add_row("ETA", f"{_duration(st.eta_seconds)} ({st.left} left)")
    t.add_row("done", f"{st.ok} of {st.planned}" + (f" ({100 * st.ok / st.planned:.1f} %)" if st.planned else ""))
    t.add_row("failed", str(st.failed))
    out_console.print(t)
    for w in st.warnings:
        err.print(f"[yellow]warning:[/yellow] {esc(w)}", highlight=False, soft_wrap=True)
    for r in st.errors:
        err.print(f"failed {r['job_id']}: {esc(str(r['error']))}", highlight=False)


@app.command()
def merge(
    sources: list[str] = typer.Argument(..., help="Output folders (shards) of one plan.", show_default=False),
    out: str = typer.Option(..., "--out", "-o", help="The merged dataset folder."),
    break_lock: bool = typer.Option(False, "--break-lock", help="Take over the lock of --out left by a run of another host that is gone."),
) -> None:
    """Join shard outputs into one dataset, checking every file's SHA-256 and refusing conflicting duplicates."""
    from .runtime.merge import merge as do_merge

    info = do_merge(sources, out, break_lock=break_lock)
    out_console.print(f"merged {len(sources)} folders into {out}: {info['jobs']} jobs ({info['ok']} images, "
                      f"{info['failed']} failed), {info['files']} files verified, {info['duplicates']} duplicates dropped")


@app.command()
def verify(out: str = typer.Argument(..., help="An output folder (or URL) of `chexforge generate` or `merge`.", show_default=False)) -> None:
    """Re-hash every file against the manifest: list missing, corrupt and orphan files (exit status 1 when any).

    A re-run of `generate` makes missing and truncated files again; delete a corrupt file and re-run to make it again.
    """
    from .runtime.verify import verify as check

    report = check(out)
    if report.writer is not None:
        err.print(f"[yellow]warning:[/yellow] a run is writing here: {esc(str(report.writer))}; the files of its batches in "
                  "flight show as orphans until it commits them", highlight=False, soft_wrap=True)
    for line in report.damaged:
        out_console.print(f"damaged manifest file {line}", highlight=False, soft_wrap=True)
    for rel in report.missing:
        out_console.print(f"missing {rel}", highlight=False, soft_wrap=True)
    for line in report.corrupt:
        out_console.print(f"corrupt {line}", highlight=False, soft_wrap=True)
    for rel in report.orphans:
        out_console.print(f"orphan  {rel} (no manifest row names it)", highlight=False, soft_wrap=True)
    summary = (f"{out}: {report.files} files of {report.jobs} jobs checked; {len(report.missing)} missing, "
               f"{len(report.corrupt)} corrupt, {len(report.orphans)} orphan")
    if report.damaged:
        summary += f", {len(report.damaged)} damaged manifest file(s)"
    out_console.print(summary if report.problems else f"{out}: all {report.files} files of {report.jobs} jobs match the manifest",
                      highlight=False, soft_wrap=True)
    if report.problems:
        raise typer.Exit(1)


# ---- push -------------------------------------------------------------------------------------


@app.command()
def push(
    out: str = typer.Argument(..., help="An output folder of `chexforge generate` (with DICOM files).", show_default=False),
    to: str = typer.Option(..., "--to", help="The PACS (storage SCP) as HOST:PORT.", show_default=False),
    aet: str = typer.Option(..., "--aet", help="The PACS's AE title (the called AE).", show_default=False),
    calling_aet: str = typer.Option("CHEXFORGE", "--calling-aet", help="Our AE title, as the PACS knows it."),
    seg: bool = typer.Option(True, "--seg/--no-seg", help="Send each image's SEG (masks) too."),
    again: bool = typer.Option(False, "--again", help="Send everything again, also what the PACS already confirmed."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """C-STORE every image's DICOM (and its SEG) to a PACS; re-run to send only what it has not confirmed (exit 1 on failures)."""
    from rich import progress as rp

    from .export.push import push as send

    bar = rp.Progress(rp.TextColumn("[bold]pushing"), rp.BarColumn(), rp.MofNCompleteColumn(), rp.TimeRemainingColumn(),
                      console=err, transient=False)
    tasks: list = []

    def show(done: int, total: int) -> None:  # the bar starts with the first file, after the PACS said yes
        if not tasks:
            bar.start()
            tasks.append(bar.add_task("push", total=total))
        bar.update(tasks[0], completed=done, total=total)

    try:
        report = send(out, to, aet, calling_aet, seg=seg, again=again, progress=show if progress else None)
    finally:
        bar.stop()
    for line in report.warnings:
        out_console.print(f"stored with a warning {line}", highlight=False, soft_wrap=True)
    for line in report.failed:
        out_console.print(f"failed  {line}", highlight=False, soft_wrap=True)
    out_console.print(f"{report.destination}: {report.sent} sent, {report.already} already there, "
                      f"{len(report.failed)} failed (of {report.total} files; confirmed ones listed in "
                      f"{out}/{report.state})", highlight=False, soft_wrap=True)
    if report.failed:
        raise typer.Exit(1)


# ---- inspect ----------------------------------------------------------------------------------


@app.command()
def inspect(
    out: str = typer.Argument(..., help="An output folder (or URL) of `chexforge generate`.", show_default=False),
    sheet: Path | None = typer.Option(None, "--sheet", help="Where to write the contact sheet (default OUT/contact_sheet.png)."),
    n: int = typer.Option(24, "--n", min=1, help="Images on the contact sheet."),
    overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Draw masks and boxes on the images."),
) -> None:
    """Counts per cohort and label, and a contact sheet PNG with masks and boxes drawn on."""
    from .evaluate.inspect import inspect_dataset

    r = inspect_dataset(out, sheet, n, overlays)
    t = Table("cohort", "images", *r.findings, title=f"{out}: {r.ok} images, {r.failed} failed")
    for c in r.cohorts:
        t.add_row(c["cohort"], str(c["images"]), *[str(c["counts"].get(f, 0)) for f in r.findings])
    out_console.print(t)
    if r.sheet is not None:
        out_console.print(f"contact sheet: {r.sheet}")


# ---- report -----------------------------------------------------------------------------------


@app.command()
def report(
    out: str = typer.Argument(..., help="An output folder of `chexforge generate`.", show_default=False),
    dest: Path | None = typer.Option(None, "--out", help="Report folder (default OUT/report)."),
    per_cohort: int = typer.Option(12, "--per-cohort", min=1, help="Images on each cohort's contact sheet."),
    metrics: Path | None = typer.Option(None, "--metrics", help="A metrics.json of `chexforge eval` (default: REPORT/metrics.json if there)."),
) -> None:
    """A static HTML report: contact sheets, requested-vs-realised composition, failures, metrics."""
    from .evaluate.report import build_report

    index = build_report(out, dest, per_cohort=per_cohort, metrics=metrics)
    out_console.print(f"report: {index}")


# ---- eval -------------------------------------------------------------------------------------


@app.command("eval")
def eval_cmd(
    out: Path = typer.Argument(..., help="An output folder of `chexforge generate` (or a folder of images).", show_default=False),
    reference: str | None = typer.Option(None, "--reference", help="Real images to compare with: a folder of images (PNG/JPEG/TIFF, searched recursively), another chexforge output folder, or a label CSV of CheXpert, MIMIC-CXR, NIH or PadChest (with --image-root). Optional: without it the metrics that need it say so."),
    image_root: Path | None = typer.Option(None, "--image-root", help="Where a label CSV's image paths start (default: the CSV's folder), e.g. the folder that holds CheXpert-v1.0-small/."),
    features: str = typer.Option("auto", "--features", help="auto (xrv-densenet when its weights are on disk, else the feature metrics say why not) | xrv-densenet | raddino=DIR | inception | PATH | random (smoke runs only, not perceptual)."),
    dest: Path | None = typer.Option(None, "--out", help="Where metrics.json and nearest_pairs.png go (default OUT/report)."),
    size: int = typer.Option(224, "--size", min=32, help="Images are resized to SIZE×SIZE before feature extraction."),
    max_images: int | None = typer.Option(None, "--max-images", min=2, help="Evenly spaced subsample of each set."),
    min_per_finding: int = typer.Option(10, "--min-per-finding", min=2, help="Per-finding FID only where both sides have this many positives."),
    threshold: float = typer.Option(0.95, "--memorization-threshold", help="Flag generated images whose nearest reference has cosine ≥ this."),
    diversity_by: str = typer.Option("prompt", "--diversity-by", help="MS-SSIM among images sharing a prompt or a cohort."),
    sex_model: Path | None = typer.Option(None, "--sex-model", help="TorchScript: (N,1,S,S) in [0,1] → (N,2) logits (female, male); accuracy/AUROC vs requested sex."),
    age_model: Path | None = typer.Option(None, "--age-model", help="TorchScript: (N,1,S,S) in [0,1] → (N,) age in years; MAE and Pearson r vs requested age."),
    seg_model: Path | None = typer.Option(None, "--seg-model", help="TorchScript with `classes`: → (N,C,h,w) mask logits; Dice vs the dataset's masks."),
    det_model: Path | None = typer.Option(None, "--det-model", help="TorchScript with `classes`: → (N,K,5) (x0,y0,x1,y1,class) in [0,1]; box hit rate."),
    iou: float = typer.Option(0.3, "--iou", help="A realised box is hit by a predicted box of its label with IoU ≥ this."),
) -> None:
    """Measure a generated set; writes metrics.json (OUT/report/ by default) for `chexforge report`.

    With no reference and no weights it measures what needs neither: composition against the
    recipe (counts, sex, age, view, finding prevalence), laterality and severity requested vs
    realised, box and mask sizes, finding co-occurrence, timing, and MS-SSIM / pixel correlation
    within each cohort.

    A reference (real images) adds fidelity (FID, KID, precision/recall/density/coverage) and the
    memorization screen, given a feature extractor on disk (--features). Examples:

      chexforge eval out/q --reference ~/data/real_pngs/

      chexforge eval out/q --reference ~/data/CheXpert-v1.0-small/valid.csv --image-root ~/data

      chexforge eval out/q --reference ~/data/Data_Entry_2017_v2020.csv --image-root ~/data/nih (NIH: found in its subfolders)

      chexforge eval out/q --reference ~/data/mimic-cxr-jpg/files/p10 (MIMIC-CXR-JPG: a folder of images, no labels)

      chexforge eval out/q --reference out/other-run

    Every metric that cannot run says why and what it needs (a reference, or a model file by its
    full name and folder). Local files only: never downloads. See docs/evaluate.md."""
    from .evaluate.run import EvalOptions, evaluate
    from .evaluate.summary import summary_table

    dest = dest or out / "report"
    result = evaluate(out, dest, EvalOptions(reference, str(image_root) if image_root else None, features, size, max_images,
                                             min_per_finding, memorization_threshold=threshold, diversity_by=diversity_by,
                                             sex_model=str(sex_model) if sex_model else None,
                                             age_model=str(age_model) if age_model else None,
                                             seg_model=str(seg_model) if seg_model else None,
                                             det_model=str(det_model) if det_model else None, iou=iou))
    out_console.print(summary_table(result))
    out_console.print(f"wrote {dest / 'metrics.json'}")


# ---- models -----------------------------------------------------------------------------------

models_app = typer.Typer(help="Make, inspect and import diffusion models (local folders only).", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("init")
def models_init(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the new model to."),
    preset: str = typer.Option("tiny", "--preset", help="Transformer size: tiny (64 px, CPU), small (256 px), chexgen-xl, chexgen-xl-control."),
    text: str = typer.Option("tiny", "--text", help="open_clip text tower: a preset (tiny, small) or an open_clip config name (ViT-B-16)."),
    text_weights: Path | None = typer.Option(None, "--text-weights", help="Local open_clip checkpoint for the text tower."),
    vae: str = typer.Option("tiny", "--vae", help="tiny, sd (random SD-shaped) or a local diffusers AutoencoderKL folder."),
    control_blocks: int | None = typer.Option(None, "--control-blocks", min=0, help="Copied blocks in the control branch (0 = none)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Create a randomly initialised chexforge pipeline to train with `chexforge train`."""
    from .models.build import init_pipeline

    pipe = init_pipeline(preset, text, text_weights, vae, control_blocks, seed)
    pipe.save(out)
    out_console.print(f"wrote a {preset} pipeline to {out} (weights hash {pipe.parameters_hash()})")


@models_app.command("info")
def models_info(path: Path = typer.Argument(..., help="A model folder.", show_default=False)) -> None:
    """Say what a model folder is (chexforge pipeline or diffusers pipeline) and which guidance it supports."""
    from .models.build import describe

    info = describe(path)
    t = Table(show_header=False, title=str(path))
    for k, v in info.items():
        if k == "components":
            for name, text in v.items():
                t.add_row(f"  {name}", text)
        elif k != "folder":
            t.add_row(k, str(v))
    out_console.print(t)


@models_app.command("import-chexgen")
def models_import_chexgen(
    ckpt: Path = typer.Argument(..., help="ChexGen .pth checkpoint (state_dict / state_dict_ema).", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the pipeline to."),
    t5: Path = typer.Option(..., "--t5", help="Local T5 encoder folder (transformers layout, with its tokenizer)."),
    vae: Path = typer.Option(..., "--vae", help="Local diffusers AutoencoderKL folder (the SD VAE ChexGen uses)."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Convert the EMA weights (default) or the raw ones."),
    heads: int = typer.Option(16, "--heads", help="Attention heads (not stored in the checkpoint; DiT-XL/2 has 16)."),
    pos_embed_scale: float | None = typer.Option(None, "--pos-embed-scale", help="Positional-embedding scale (found from the checkpoint when omitted)."),
) -> None:
    """Convert a ChexGen checkpoint (base or control) into a chexforge pipeline, strictly: every key used, every shape checked."""
    from .models.convert_chexgen import import_chexgen

    done = import_chexgen(ckpt, out, t5, vae, ema, heads, pos_embed_scale)
    c = done.config
    out_console.print(f"converted {done.source_keys} keys ({'EMA' if done.used_ema else 'raw'} weights): depth {c.depth}, "
                      f"hidden {c.hidden}, {c.sample_size * 8}² images, pos-embed scale {c.interpolation_scale}, "
                      f"{c.control_blocks} control blocks → {out}; samples with ChexGen's own sampler "
                      "(sampler: chexgen) unless backend_options say sampler: dpm++ (fast)")


# ---- train ------------------------------------------------------------------------------------


@app.command()
def train(
    model: Path = typer.Option(..., "--model", help="Pipeline folder to start from (`chexforge models init` or an earlier run's model/)."),
    data: Path = typer.Option(..., "--data", help="A chexforge manifest.parquet, or a CheXpert/MIMIC-style CSV."),
    run: Path = typer.Option(..., "--run", help="Run folder: cache, checkpoints, and the trained model/. Re-running resumes."),
    image_root: Path | None = typer.Option(None, "--image-root", help="Folder the CSV's image paths are relative to."),
    steps: int = typer.Option(1000, "--steps", min=1, help="Total optimisation steps."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    lr: float = typer.Option(1e-4, "--lr", min=0),
    ema: float = typer.Option(0.9999, "--ema", min=0, max=1, help="EMA decay of the exported weights (the most it reaches with the warm-up)."),
    ema_warmup: bool = typer.Option(True, "--ema-warmup/--no-ema-warmup", help="Decay min(ema, (1+step)/(10+step)), so short runs export trained weights."),
    caption_dropout: float = typer.Option(0.1, "--caption-dropout", min=0, max=1),
    control_dropout: float = typer.Option(0.1, "--control-dropout", min=0, max=1, help="Share of images trained with the empty control image; raise it (0.5) when the captions should carry the findings without a mask (bench/diffusion_learns.py)."),
    save_every: int = typer.Option(500, "--save-every", min=1, help="Checkpoint every N steps."),
    seed: int = typer.Option(0, "--seed"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Trade compute for memory."),
    freeze_base: bool = typer.Option(False, "--freeze-base", help="Train the control branch only."),
    vae_steps: int = typer.Option(0, "--vae-steps", min=0, help="First fit the VAE to the images for N steps (models without a pretrained VAE)."),
    device: str = typer.Option("auto", "--device"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train (or fine-tune) a chexforge diffusion pipeline: cached VAE latents, AdamW, EMA, 10 % caption dropout, bf16 on GPU. Resumable: run the same command again after a stop or a kill."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from .models.pipeline import ChexforgePipeline
    from .models.train import TrainConfig, ema_status, latest_checkpoint
    from .models.train import train as run_training

    pipe = ChexforgePipeline.load(model)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, ema=ema, ema_warmup=ema_warmup, caption_dropout=caption_dropout, control_dropout=control_dropout,
                      save_every=save_every, seed=seed, gradient_checkpointing=gradient_checkpointing,
                      freeze_base=freeze_base, vae_steps=vae_steps, device=device)
    start = latest_checkpoint(run)
    if start is not None:
        out_console.print(f"resuming from {start.name}")
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[loss]}"), TimeRemainingColumn(), disable=not progress)
    with bar:
        cache_task = bar.add_task("fitting VAE / caching" if vae_steps else "caching", total=None, loss="")
        train_task = bar.add_task("training", total=steps, loss="")

        def on_cache(done: int, total: int) -> None:
            bar.update(cache_task, completed=done, total=total)

        def on_step(step: int, loss: float) -> None:
            bar.update(train_task, completed=step, loss=f"loss {loss:.4f}")

        losses = run_training(pipe, data, run, cfg, image_root, on_step, on_cache)
    if losses:
        k = max(1, min(50, len(losses) // 5))
        status = ema_status(cfg, steps)  # a run always ends at --steps (a resumed one too)
        if status.lagging:  # the loss is the raw weights'; the exported EMA ones are behind them
            err.print(f"[yellow]warning:[/yellow] the exported EMA weights lag the trained ones ({100 * status.initial_weight:.3g} % "
                      f"initial weights, averaging about {status.horizon:,.0f} steps of {steps:,}); "
                      "train longer, lower --ema or keep --ema-warmup", highlight=False, soft_wrap=True)
        out_console.print(f"loss: first {k} steps {sum(losses[:k]) / k:.4f} → last {k} steps {sum(losses[-k:]) / k:.4f}; "
                          f"model with {status.describe()} in {run / 'model'}")


# ---- audit and balance ------------------------------------------------------------------------

LABELS_HELP = "Label file: CheXpert train.csv, MIMIC-CXR *-chexpert.csv, NIH Data_Entry_2017*.csv, PadChest CSV, a chexforge manifest, or xrv:chexpert / xrv:nih / xrv:padchest (shipped with torchxrayvision)."


def _print_audit(report: dict, after: dict | None = None, title: str = "audit", prefer: tuple[str, ...] = ()) -> None:
    from .balance.table import audit_table

    table, lines = audit_table(report, after, title, prefer, out_console.width)
    out_console.print(table)
    for line in lines:
        out_console.print(line)


@app.command("audit")
def audit_cmd(
    labels: str = typer.Argument(..., help=LABELS_HELP, show_default=False),
    fmt: str | None = typer.Option(None, "--format", help="chexpert, mimic, nih, padchest or manifest (default: sniffed)."),
    by: str = typer.Option("sex,age", "--by", help="Grouping: a comma list of sex, age, race, view."),
    age_bins: str | None = typer.Option(None, "--age-bins", help="Bin edges in years, e.g. 0,18,40,60,80 (the default)."),
    uncertain: str = typer.Option("negative", "--uncertain", help="Uncertain (-1) labels count as: negative, positive, or ignore."),
    frontal_only: bool = typer.Option(False, "--frontal-only", help="Keep PA and AP images only."),
    metadata: Path | None = typer.Option(None, "--metadata", help="MIMIC-CXR metadata CSV (views, one row per image)."),
    patients: Path | None = typer.Option(None, "--patients", help="MIMIC-IV patients.csv (sex, age)."),
    admissions: Path | None = typer.Option(None, "--admissions", help="MIMIC-IV admissions.csv (race)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for audit.json and audit.png."),
) -> None:
    """Measure a real dataset's demographic imbalance: group sizes and finding prevalence per group."""
    from .balance import LabelSource, audit_labels

    source = LabelSource(labels, fmt, uncertain, frontal_only, metadata, patients, admissions)
    result = audit_labels(source, by, age_bins, out)
    _print_audit(result.report, title=f"{labels}: {result.images} images")
    if result.files:
        out_console.print(f"wrote {' and '.join(map(str, result.files))}")


@app.command("balance")
def balance_cmd(
    labels: str = typer.Argument(..., help=LABELS_HELP, show_default=False),
    fmt: str | None = typer.Option(None, "--format", help="chexpert, mimic, nih, padchest or manifest (default: sniffed)."),
    by: str = typer.Option("sex,age", "--by", help="The groups to balance: a comma list of sex, age, race, view."),
    target: str = typer.Option("parity", "--target", help="parity (every group as large as the largest) or reference."),
    reference: Path | None = typer.Option(None, "--reference", help="With --target reference: a CSV of shares (the --by columns + share) or a label file whose mix is the target."),
    per_finding: bool = typer.Option(False, "--per-finding", help="Balance each finding's positives across the groups instead of group sizes."),
    findings: str | None = typer.Option(None, "--findings", help="With --per-finding: which findings (comma list; default all present)."),
    min_per_cell: int = typer.Option(0, "--min-per-cell", min=0, help="Raise every group (× finding) to at least N."),
    budget: int | None = typer.Option(None, "--budget", min=0, help="At most N synthetic images."),
    age_bins: str | None = typer.Option(None, "--age-bins", help="Bin edges in years (default 0,18,40,60,80)."),
    uncertain: str = typer.Option("negative", "--uncertain", help="Uncertain (-1) labels count as: negative, positive, or ignore."),
    frontal_only: bool = typer.Option(True, "--frontal-only/--all-views", help="Balance frontal (PA/AP) images only (the default)."),
    prevalence: str = typer.Option("group", "--prevalence", help="Findings of each group's top-up: group (its own real prevalence, so it stays as it was) or pooled (all groups' prevalence; moves each group toward it)."),
    metadata: Path | None = typer.Option(None, "--metadata", help="MIMIC-CXR metadata CSV."),
    patients: Path | None = typer.Option(None, "--patients", help="MIMIC-IV patients.csv."),
    admissions: Path | None = typer.Option(None, "--admissions", help="MIMIC-IV admissions.csv."),
    backend: str = typer.Option("drr", "--backend", help="Backend of the written recipe: drr or diffusion."),
    model: Path | None = typer.Option(None, "--model", help="With --backend diffusion: the model folder."),
    size: int = typer.Option(256, "--size", help="Image size of the written recipe."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("balance.yaml"), "--out", "-o", help="The recipe to write."),
    report: Path | None = typer.Option(None, "--report", help="Folder for the before/after audit (JSON) and chart (PNG); default next to the recipe."),
    generate_out: str | None = typer.Option(None, "--generate", help="Also generate the recipe into this folder now."),
) -> None:
    """Audit a real dataset and write the recipe whose synthetic images bring its groups to the target.

    The audit after balancing (real + planned synthetic) is printed beside the one before, and both are charted.

    Example: [bold]chexforge balance xrv:chexpert --by sex,age --target parity --out balance.yaml[/bold]
    """
    from .balance import LabelSource, balance_labels
    from .contracts.backends import backend_info

    source = LabelSource(labels, fmt, uncertain, frontal_only, metadata, patients, admissions)
    r = balance_labels(source, out, by=by, target=target, reference=reference, per_finding=per_finding,
                       findings=findings, min_per_cell=min_per_cell, budget=budget, age_bins=age_bins,
                       backend=backend, model=model, size=size, seed=seed, report=report, prevalence=prevalence)
    _print_audit(r.before, r.after, title=f"{labels}: {r.real} real images + {r.synthetic} synthetic (before → after)",
                 prefer=backend_info(backend).findings)
    for note in r.notes:
        err.print(f"[yellow]note:[/yellow] {esc(note)}", highlight=False)
    out_console.print(f"wrote {out} ({r.added} images in {r.cohorts} cohorts) "
                      f"and {r.report_dir}/audit.png; run it with: chexforge generate {out} --out OUT")
    if generate_out is not None:
        from .plan import plan as make_plan
        from .recipe import load_recipe
        from .runtime import RunOptions, run

        recipe = load_recipe(out)
        summary = run(make_plan(recipe), recipe, str(generate_out), RunOptions())
        out_console.print(f"generated {summary.generated} images into {generate_out}")


# ---- backends ---------------------------------------------------------------------------------


@app.command()
def backends() -> None:
    """List the generator backends and what each can render.
    """
    from .contracts.backends import BACKENDS

    t = _fold(Table("backend", "what it is", "findings", "views", "ages", "masks", "layouts"))
    for b in BACKENDS.values():
        t.add_row(b.name, b.summary, ", ".join(b.findings), ", ".join(b.views), "{}-{}".format(*b.ages),
                  ", ".join(b.anatomy), ", ".join(b.layouts))
    out_console.print(t)


# ---- entry point ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _state["debug"] = "--debug" in argv
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="chexforge", standalone_mode=False)
        return int(result or 0)
    except UserError as e:
        if _state["debug"]:
            raise
        err.print(f"chexforge: error: {esc(e.line())}", highlight=False, soft_wrap=True)
        return 2
    except typer.Exit as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except typer.Abort:
        err.print("aborted")
        return 130
    except Exception as e:
        # Click's usage errors (unknown option, bad value, missing argument), however typer ships click.
        if _state["debug"] or not hasattr(e, "format_message"):
            raise
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "chexforge"
        err.print(f"{where}: error: {esc(e.format_message())} (see {where} --help)", highlight=False, soft_wrap=True)
        return int(getattr(e, "exit_code", 2) or 2)


if __name__ == "__main__":
    sys.exit(main())
