"""The output folder is a Hugging Face dataset (export/hf.py, export/card.py): the real `datasets`
library loads it from any directory as one typed, labelled row per ok image, with its masks and
boxes, and the card's own snippet runs. No network: everything is local and offline."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets/huggingface_hub read them
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from chexforge.contracts.vocabulary import ANATOMY, FINDING_NAMES, FINDINGS  # noqa: E402
from chexforge.export import hf  # noqa: E402
from chexforge.export.card import PATH  # noqa: E402

from .conftest import write  # noqa: E402

RECIPE = """
name: hf-check
description: Two cohorts, findings with masks and boxes, one failed job in each.
seed: 5
backend: simulated
backend_options: {{batch_size: 4, fail_on: [2]}}
output: {{size: 64, formats: [png], masks: true}}
cohorts:
  - name: lesions
    count: {a}
    view: {{PA: 0.5, LL: 0.5}}
    demographics: {{sex: F, age: {{range: [30, 49]}}}}
    findings:
      Nodule: 0.6
      Support Devices: 1.0
    masks: [lungs, heart]
  - name: effusion
    count: {b}
    view: AP
    demographics: {{sex: M, age: 70}}
    findings:
      Effusion: {{p: 1.0, laterality: [left, right, bilateral]}}
"""


def make(tmp: Path, out: Path, a: int = 5, b: int = 4, limit: int | None = None) -> Path:
    from chexforge.plan import plan
    from chexforge.recipe import load_recipe
    from chexforge.runtime import RunOptions, run

    r = load_recipe(write(tmp, RECIPE.format(a=a, b=b)))
    run(plan(r), r, out, RunOptions(progress=False, limit=limit))
    return out


@pytest.fixture(scope="module")
def hub_offline(tmp_path_factory):
    """datasets' cache in a temporary folder and both libraries offline, for this module only
    (monkeypatched: another test module may have imported them with other settings)."""
    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("hf-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        mp.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        datasets.disable_progress_bars()
        yield cache


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, hub_offline) -> Path:
    tmp = tmp_path_factory.mktemp("hf")
    return make(tmp, tmp / "out")


@contextlib.contextmanager
def warnings_logged():
    """Warnings `datasets` and huggingface_hub log (their loggers do not all reach the root
    logger pytest's caplog listens on), as messages."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("datasets", "huggingface_hub")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield seen
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def load(path: str | Path, cwd: Path):
    """load_dataset(path) run from `cwd`, with the warnings logged meanwhile."""
    here = Path.cwd()
    os.chdir(cwd)
    try:
        with warnings_logged() as seen:
            ds = datasets.load_dataset(str(path), split="train")
    finally:
        os.chdir(here)
    return ds, seen


def ok_rows(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    return {r["job_id"]: r for r in rows if r["status"] == "ok"}


def expected_features(cohorts: list[str]):
    """The features the card declares, built with the real library (not the YAML by hand)."""
    d = datasets
    localizable = [f.name for f in FINDINGS if f.localizable]
    return d.Features({
        "image": d.Image(),
        "job_id": d.Value("string"),
        "cohort": d.ClassLabel(names=cohorts),
        "patient_id": d.Value("string"),
        "study_id": d.Value("string"),
        "view": d.ClassLabel(names=["PA", "AP", "LL"]),
        "sex": d.ClassLabel(names=["F", "M"]),
        "age": d.Value("int16"),
        "race": d.Value("string"),
        "findings": d.List(d.ClassLabel(names=list(FINDING_NAMES))),
        "masks": d.List(d.Image()),
        "mask_labels": d.List(d.ClassLabel(names=[*ANATOMY, *localizable])),
        "objects": {"bbox": d.List(d.List(d.Value("float32"), length=4)),
                    "category": d.List(d.ClassLabel(names=localizable))},
        "prompt": d.Value("string"),
        "seed": d.Value("int64"),
    })


def check_rows(ds, out: Path) -> None:
    """Every row is an ok job's image with the manifest's labels, masks and boxes."""
    want = ok_rows(out)
    assert len(ds) == len(want) and sorted(ds["job_id"]) == sorted(want)
    f = ds.features
    for row in ds:
        m = want[row["job_id"]]
        assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(out / m["image_png"])))
        assert f["cohort"].int2str(row["cohort"]) == m["cohort"]
        assert f["sex"].int2str(row["sex"]) == m["sex"] and f["view"].int2str(row["view"]) == m["view"]
        assert row["age"] == m["age"] and row["seed"] == m["seed"] and row["prompt"] == m["prompt"]
        assert (row["patient_id"], row["study_id"]) == (m["patient_id"], m["study_id"])
        assert [f["findings"].feature.int2str(i) for i in row["findings"]] == [n for n in FINDING_NAMES if m[n]]
        assert [f["mask_labels"].feature.int2str(i) for i in row["mask_labels"]] == [k["name"] for k in m["masks"]]
        assert len(row["masks"]) == len(m["masks"]) > 0
        for got, k in zip(row["masks"], m["masks"]):
            assert np.array_equal(np.asarray(got), np.asarray(Image.open(out / k["path"])))
        size = m["size"]
        boxes = [[b["x0"] * size, b["y0"] * size, (b["x1"] - b["x0"]) * size, (b["y1"] - b["y0"]) * size]
                 for b in m["realised_boxes"]]
        assert len(boxes) > 0
        np.testing.assert_allclose(row["objects"]["bbox"], boxes, rtol=1e-6)
        cat = f["objects"]["category"].feature
        assert [cat.int2str(c) for c in row["objects"]["category"]] == [b["label"] for b in m["realised_boxes"]]


def test_the_dataset_has_what_the_test_needs(dataset):
    rows = pq.read_table(dataset / "manifest.parquet").to_pylist()
    assert {r["cohort"] for r in rows} == {"lesions", "effusion"}
    assert sum(r["status"] != "ok" for r in rows) == 2  # fail_on: [2], in each cohort
    assert (dataset / "masks").is_dir() and (dataset / hf.METADATA).is_file()


def test_load_dataset_from_another_directory(dataset, tmp_path):
    ds, seen = load(dataset.resolve(), tmp_path)
    assert not [w for w in seen if "metadata block" in w], seen
    assert ds.features == expected_features(["lesions", "effusion"])
    check_rows(ds, dataset)


def test_load_dataset_by_a_relative_path_from_a_parent(dataset):
    # From two folders up, "<parent>/out": resolved against the cwd, and the rows' files against
    # the folder (the metadata's paths are relative to it).
    ds, _ = load(Path(dataset.parent.name) / dataset.name, dataset.parent.parent)
    assert len(ds) == len(ok_rows(dataset)) and ds.features["findings"].feature.names == list(FINDING_NAMES)


def test_the_warning_capture_sees_a_card_without_metadata():
    # The check above would pass blindly if the warning went elsewhere: it does not.
    from huggingface_hub import DatasetCard

    with warnings_logged() as seen:
        DatasetCard("# no YAML here\n")
    assert any("metadata block was not found" in w for w in seen)


def test_the_card_parses_and_declares_the_dataset(dataset):
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(dataset / "README.md")
    data = card.data
    assert data.license == "other" and data.license_name and data.license_link == "README.md"
    assert set(data.task_categories) == {"image-classification", "object-detection", "image-segmentation"}
    assert {"synthetic", "medical", "chest-x-ray"} <= set(data.tags)
    (config,) = data.configs
    assert config["data_files"] == [{"split": "train", "path": ["metadata.parquet", "images/**/*.png"]}]
    want = expected_features(["lesions", "effusion"])
    assert datasets.Features._from_yaml_list(data.dataset_info["features"]) == want
    assert datasets.Features._from_yaml_list(config["features"]) == want
    assert "## Licence" in card.text and "| lesions | 4 |" in card.text  # 5 jobs, index 2 failed


def _snippet(text: str, after: str) -> str:
    block = re.search(re.escape(after) + r".*?```python\n(.*?)```", text, re.S)
    assert block, f"no python block after {after!r}"
    return block.group(1)


def test_the_card_snippets_run_from_another_directory(dataset, tmp_path):
    text = (dataset / "README.md").read_text()
    for after in ("With Hugging Face `datasets`", "With pandas"):
        code = _snippet(text, after)
        assert PATH in code
        here, printed = Path.cwd(), io.StringIO()
        os.chdir(tmp_path)
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(code.replace(PATH, str(dataset.resolve())), "README.md", "exec"), {})
        finally:
            os.chdir(here)
        assert printed.getvalue().strip(), after


def test_a_resumed_folder_loads_its_new_rows(tmp_path, hub_offline):
    # A first run stops after 3 jobs; the resume rewrites metadata and card, and load_dataset
    # (same cache) reads the new rows, not a stale cache of the first.
    out = tmp_path / "out"
    make(tmp_path, out, a=3, b=2, limit=3)
    first, _ = load(out, tmp_path)
    assert len(first) == len(ok_rows(out)) < 4
    make(tmp_path, out, a=3, b=2)
    again, _ = load(out, tmp_path)
    assert len(again) == len(ok_rows(out)) == 4  # 5 jobs, index 2 of the first cohort fails
    check_rows(again, out)


def test_a_merged_folder_loads(dataset, tmp_path):
    from chexforge.runtime.merge import merge

    merged = tmp_path / "merged"
    merge([str(dataset)], str(merged))
    ds, _ = load(merged, tmp_path)
    check_rows(ds, merged)


def _manifest_batches(out: Path, rows: int = 1):
    yield from pq.ParquetFile(out / "manifest.parquet").iter_batches(batch_size=rows)


def test_metadata_is_streamed_and_replaced_only_when_whole(dataset, tmp_path):
    from chexforge.store import open_store

    store = open_store(tmp_path)
    # One manifest row a batch: the same file as from the whole table.
    hf.write_metadata(store, _manifest_batches(dataset))
    streamed = pq.read_table(tmp_path / hf.METADATA)
    assert streamed.equals(pq.read_table(dataset / hf.METADATA))
    assert streamed.num_rows == len(ok_rows(dataset))

    def broken():
        batches = _manifest_batches(dataset)
        yield next(batches)
        raise RuntimeError("the manifest ends here")

    before = (tmp_path / hf.METADATA).read_bytes()
    with pytest.raises(RuntimeError, match="ends here"):
        hf.write_metadata(store, broken())
    assert (tmp_path / hf.METADATA).read_bytes() == before  # the old file, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [hf.METADATA]  # no temporary left


def test_no_png_means_no_metadata_and_the_manifest_as_data(tmp_path):
    from chexforge.export.card import build_card
    from chexforge.export.manifest import manifest_schema
    from chexforge.store import open_store

    row = {f.name: None for f in manifest_schema()}
    row.update(job_id="a" * 16, cohort="c", status="ok", image_dicom="dicom/c/a.dcm", size=64)
    table = pa.Table.from_pylist([row], schema=manifest_schema())
    store = open_store(tmp_path)
    (tmp_path / hf.METADATA).write_bytes(b"stale")
    summary = hf.write_metadata(store, table)
    assert summary.rows == 0 and not (tmp_path / hf.METADATA).exists()
    from huggingface_hub import DatasetCard

    card = DatasetCard(build_card(table, {"name": "d", "output": {"formats": ["dicom"]}}, summary))
    assert card.data.configs[0]["data_files"] == [{"split": "train", "path": ["manifest.parquet"]}]
    assert "dataset_info" not in card.data.to_dict()
