"""The dataset card (out/README.md): what is in the folder, how it was made, how to load it.

The card is a Hugging Face dataset card: YAML metadata (licence, tasks, tags, and the `configs`
and `features` export/hf.py derives, which make `datasets.load_dataset(OUT)` read the folder as
one labelled row per image) above the human text written here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from .. import __version__
from ..contracts.manifest import MANIFEST
from ..contracts.vocabulary import FINDING_NAMES
from ..plan.summary import Composition, ok_mask, record_batches
from ..store import Store
from . import hf

MAX_FAILED = 20  # failed jobs listed by name; the manifest has them all
IDENTITY = ("backend", "model", "model_hash", "sampler")


def _read(manifest: pa.Table | Iterable[pa.RecordBatch]) -> tuple[Composition, list[tuple[str, str]], dict]:
    """One pass over the manifest, batch by batch (no table of all rows is ever held): the
    composition, the first failed jobs with their errors, and the generator of the first ok image."""
    comp, failed, identity = Composition(), [], {}
    for batch in record_batches(manifest):
        comp.add(batch)
        ok = ok_mask(batch)
        if len(failed) < MAX_FAILED:
            bad = batch.filter(pc.invert(ok)).slice(0, MAX_FAILED - len(failed))
            failed += zip(bad.column("job_id").to_pylist(), bad.column("error").to_pylist())
        if not identity:
            first = batch.filter(ok).slice(0, 1).select(list(IDENTITY)).to_pylist()
            identity = {k: str(v) for k, v in first[0].items()} if first else {}
    return comp, failed, identity


def _age_text(ages: tuple[int, int, int] | None) -> str:
    return "-" if ages is None else "{} ({}-{})".format(*ages)


# The folder's path in the card's snippets; a reader puts theirs (tests/test_hf_dataset.py runs the
# snippet with it replaced).
PATH = "path/to/this/folder"
TASKS = ["image-classification", "object-detection", "image-segmentation"]
TAGS = ["synthetic", "medical", "chest-x-ray", "chexforge"]
# Why the licence is `other`: chexforge's own code is Apache-2.0, but what a generated image may be
# used for follows from what made it (a diffusion checkpoint's weights and the data it was trained
# on, a CT volume), which chexforge cannot know. The card says so and names the generator.
LICENSE = {"license": "other", "license_name": "synthetic-chexforge", "license_link": "README.md"}


def card_data(recipe: dict, summary: hf.HfSummary | None, n_images: int) -> dict:
    """The card's YAML metadata (a plain dict, as huggingface_hub's DatasetCardData takes it)."""
    meta = {
        "pretty_name": recipe.get("name", "chexforge dataset"),
        **LICENSE,
        "task_categories": list(TASKS),
        "task_ids": ["multi-label-image-classification", "semantic-segmentation"],
        "tags": list(TAGS),
        "annotations_creators": ["machine-generated"],
        "size_categories": [hf.size_category(n_images)],
    }
    if summary is not None and summary.rows:
        meta.update(hf.card_metadata(summary))
    else:
        # No image as PNG (DICOM only, or nothing generated): `load_dataset` reads the manifest's
        # table (labels and paths, no pixels) rather than guessing samples among the mask PNGs.
        meta["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": [MANIFEST]}]}]
    return meta


def _loading(summary: hf.HfSummary | None) -> list[str]:
    lines = ["## Loading", ""]
    if summary is not None and summary.rows:
        lines += [
            "With Hugging Face `datasets` (from any directory; the folder's path, relative or absolute):",
            "",
            "```python",
            "from datasets import load_dataset",
            f'ds = load_dataset("{PATH}", split="train")',
            'names = ds.features["findings"].feature.names',
            "row = ds[0]  # image and masks decode to PIL images",
            'print(row["image"].size, [names[i] for i in row["findings"]], row["objects"]["bbox"], len(row["masks"]))',
            "```",
            "",
            f"One row per image (the {summary.rows} ok images with a PNG), typed: `image`, `cohort`, `view` and "
            "`sex` as class labels, `age`, `findings` (multi-label: class ids over the whole finding "
            "vocabulary), `masks` (a list of images) with `mask_labels` (what each outlines), `objects` "
            "(`bbox` as [x, y, width, height] in pixels, `category`), `prompt`, `seed`, patient and study ids. "
            f"The rows are `{hf.METADATA}`; the card's `configs` name it and `images/` only, so masks "
            "and other PNGs are never read as samples.",
            "",
        ]
    else:
        lines += [
            "There is no PNG image here, so `datasets.load_dataset` reads the manifest's table "
            "(labels and file paths, no pixels); add `png` to `output.formats` for an image dataset.",
            "",
        ]
    lines += [
        "With pandas (every job, failed ones included, all columns):",
        "",
        "```python",
        "import pandas as pd",
        f'df = pd.read_parquet("{PATH}/manifest.parquet")',
        'df = df[df.status == "ok"]',
        'print(df[["job_id", "cohort", "sex", "age", "view", "prompt", "image_png"]].head())',
        "```",
        "",
        "File paths in both are relative to this folder.",
        "",
    ]
    return lines


def build_card(manifest, recipe: dict, summary: hf.HfSummary | None = None) -> str:
    """`manifest`: a table or record batches of it (the card reads only the columns it needs);
    `summary`: what hf.write_metadata wrote (None: no metadata file, the manifest is the data)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    comp, failed, ident = _read(manifest)
    cohorts = dict(comp.counted())
    n_ok = sum(t.n for t in cohorts.values())
    n_failed = sum(t.failed for t in comp.cohorts.values())
    present = [f for f in FINDING_NAMES if any(t.findings[f] for t in cohorts.values())]
    lines = [
        f"# {recipe.get('name', 'chexforge dataset')}",
        "",
        "**Synthetic chest radiographs.** Every image was generated by chexforge; none depicts a real "
        "patient. Labels, masks and boxes are the generator's own ground truth.",
        "",
        f"{recipe.get('description', '')}".strip(),
        "",
        "## Contents",
        "",
        f"- {n_ok} images ({n_failed} jobs failed and are listed in the manifest with their error)",
        f"- backend: `{ident.get('backend', '-')}`, model `{ident.get('model', '-')}` (hash `{ident.get('model_hash', '-')}`)",
        f"- sampler settings: `{ident.get('sampler', '-')}`",
        f"- recipe seed: {recipe.get('seed')}; each job's own seed is in the `seed` column",
        f"- image size: {recipe.get('output', {}).get('size')} px; formats: {', '.join(recipe.get('output', {}).get('formats', []))}",
        f"- made with chexforge {__version__}",
        "",
        "### Images per cohort and label",
        "",
        "| cohort | images | " + " | ".join(present) + " |",
        "|---|---|" + "---|" * len(present),
    ]
    for cohort, t in cohorts.items():
        lines.append(f"| {cohort} | {t.n} | " + " | ".join(str(t.findings[f]) for f in present) + " |")
    lines += ["", "### Demographics", "", "| cohort | female | male | age (median, range) | views |", "|---|---|---|---|---|"]
    for cohort, t in cohorts.items():
        views = ", ".join(f"{k} {v}" for k, v in t.views_by_count())
        lines.append(f"| {cohort} | {t.sex.get('F', 0)} | {t.sex.get('M', 0)} | {_age_text(t.age_median_range())} | {views} |")
    lines += [
        "",
        "## Layout",
        "",
        "- `images/<cohort>/<job_id>.png`: 16-bit grayscale PNG, MONOCHROME2 (bright = dense)",
        "- `dicom/<cohort>/<job_id>.dcm`: DICOM DX For Presentation, marked DERIVED\\SECONDARY and synthetic "
        "(SyntheticData YES); `dicom/<cohort>/<job_id>_seg.dcm`: its masks as a DICOM SEG",
        "- `masks/<cohort>/<job_id>_<structure>.png`: 8-bit masks (255 inside)",
        f"- `{hf.METADATA}`: one row per ok image, the rows `datasets.load_dataset` reads (paths relative to this folder)",
        "- `coco.json`: boxes and masks (RLE) in COCO format, image ids stable across shards and merge; "
        "`datalist.json`: the MONAI datalist (image, multi-hot label, masks, boxes)",
        "- `manifest.parquet`: one row per job, every label and file with its SHA-256; `recipe.yaml`: the resolved recipe",
        "",
        *_loading(summary),
        "## Licence",
        "",
        "The card's licence is `other`: chexforge's code is Apache-2.0, but the terms of a generated "
        "image follow from what generated it (the weights of a diffusion model and the data they "
        f"were trained on, or a CT volume; here backend `{ident.get('backend', '-')}`, model "
        f"`{ident.get('model', '-')}`), which chexforge cannot know. Whoever publishes this folder "
        "sets `license` in the YAML above to those terms (e.g. `cc-by-4.0` where they allow it).",
        "",
    ]
    if failed:
        lines += ["## Failed jobs", "", "| job_id | error |", "|---|---|"]
        lines += [f"| {job} | {error} |" for job, error in failed]
        lines.append("")
    lines += ["## Recipe", "", "```json", json.dumps(recipe, indent=1), "```", ""]
    data = DatasetCardData(**card_data(recipe, summary, n_ok))
    return str(DatasetCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines)))


def write_card(store: Store, manifest, recipe: dict, summary: hf.HfSummary | None = None) -> None:
    store.write_text("README.md", build_card(manifest, recipe, summary))
