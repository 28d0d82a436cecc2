"""Training: the loss falls on DRR images, a resumed run equals an uninterrupted one, kill -9 resumes,
and a diffusion recipe writes a complete dataset through the exporters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from chexforge.models.pipeline import ChexforgePipeline
from chexforge.models.train import TrainConfig, latest_checkpoint, train

from .conftest import write
from .test_runtime import check_output

DRR64 = """
name: drr64
seed: 1
output: {size: 64, formats: [png], masks: true, coco: false}
cohorts:
  - {name: normal, count: 8}
  - name: effusion
    count: 8
    findings: {Effusion: {laterality: [left, right], severity: large}}
  - name: mass
    count: 8
    findings: {Mass: {severity: large}}
"""


@pytest.fixture(scope="module")
def drr_images(tmp_path_factory):
    """24 DRR radiographs at 64 px with boxes and masks: the CPU training set."""
    root = tmp_path_factory.mktemp("drr64")
    recipe = write(root, DRR64)
    proc = subprocess.run([sys.executable, "-m", "chexforge.cli", "generate", str(recipe), "--out", str(root / "out"),
                           "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return root / "out" / "manifest.parquet"


def test_loss_falls_on_drr_images(tiny_model, drr_images, tmp_path):
    pipe = ChexforgePipeline.load(tiny_model)
    cfg = TrainConfig(steps=200, batch_size=16, lr=1e-3, ema=0.99, save_every=100)
    losses = train(pipe, drr_images, tmp_path / "run", cfg)
    assert len(losses) == 200
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.5 * first, (first, last)
    trained = ChexforgePipeline.load(tmp_path / "run" / "model")  # the EMA export is a working pipeline
    assert trained.parameters_hash() != pipe.parameters_hash()
    assert (tmp_path / "run" / "checkpoints" / "step-0000200" / "state.json").is_file()


def test_resumed_training_equals_an_uninterrupted_run(tiny_model, drr_images, tmp_path):
    cfg = TrainConfig(steps=30, batch_size=8, lr=5e-4, ema=0.9, save_every=15)
    straight = train(ChexforgePipeline.load(tiny_model), drr_images, tmp_path / "a", cfg)
    first = train(ChexforgePipeline.load(tiny_model), drr_images, tmp_path / "b", TrainConfig(**{**cfg.__dict__, "steps": 15}))
    resumed = train(ChexforgePipeline.load(tiny_model), drr_images, tmp_path / "b", cfg)
    assert len(first) == 15 and resumed[:15] == first
    assert resumed == straight
    a = ChexforgePipeline.load(tmp_path / "a" / "model").parameters_hash()
    b = ChexforgePipeline.load(tmp_path / "b" / "model").parameters_hash()
    assert a == b


@pytest.mark.slow
def test_train_resumes_after_kill_9(tiny_model, drr_images, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "chexforge.cli", "train", "--model", str(tiny_model), "--data", str(drr_images),
           "--run", str(run), "--steps", "400", "--batch-size", "8", "--save-every", "20", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while latest_checkpoint(run) is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest_checkpoint(run)
    assert killed_at is not None and not (run / "model").exists()
    step = json.loads((killed_at / "state.json").read_text())["step"]
    assert 0 < step < 400
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from step-" in done.stdout
    assert json.loads((latest_checkpoint(run) / "state.json").read_text())["step"] == 400
    ChexforgePipeline.load(run / "model")


def test_diffusion_recipe_writes_a_complete_dataset(tiny_model, tmp_path):
    masks = tmp_path / "layouts" / "Nodule"
    masks.mkdir(parents=True)
    for i, (cx, cy) in enumerate([(20, 22), (44, 30)]):
        m = np.zeros((64, 64), np.uint8)
        yy, xx = np.mgrid[0:64, 0:64]
        m[(xx - cx) ** 2 + (yy - cy) ** 2 < 36] = 255
        Image.fromarray(m).save(masks / f"n{i}.png")
    recipe = write(tmp_path, f"""
name: diff
seed: 2
backend: diffusion
model: {tiny_model}
backend_options: {{steps: 4, batch_size: 3, guidance_text: 3.0}}
output: {{size: 64, formats: [png, dicom]}}
cohorts:
  - name: boxes
    count: 4
    demographics: {{sex: [F, M], age: [40, 80], race: [Asian, Black, White]}}
    findings: {{Effusion: 0.5, Pneumonia: 0.5}}
    layout: {{source: explicit, boxes: [{{label: Mass, box: [0.55, 0.25, 0.85, 0.55]}}]}}
  - name: masks
    count: 3
    view: AP
    layout: {{source: explicit, masks_dir: layouts, order: cycle}}
""")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "chexforge.cli", "generate", str(recipe), "--out", str(out), "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    check_output(out, 7)
    table = pq.read_table(out / "manifest.parquet").to_pandas()
    assert (table.backend == "diffusion").all()
    boxes = table[table.cohort == "boxes"]
    assert all(len(b) == 1 and b[0]["label"] == "Mass" for b in boxes.realised_boxes)
    assert (boxes.Mass == 1).all()
    meta = json.loads(boxes.meta.iloc[0])
    assert meta["prompt_used"].startswith("sex:") and "race:" in meta["prompt_used"]
    with_masks = table[table.cohort == "masks"]
    assert all(any(m["name"] == "Nodule" for m in ms) for ms in with_masks.masks)
    assert (with_masks.Nodule == 1).all()
    coco = json.loads((out / "coco.json").read_text())
    assert len(coco["images"]) == 7 and len(coco["annotations"]) == 7
    from .test_export import dciodvfy

    for dcm in (out / "dicom").rglob("*.dcm"):
        assert not [x for x in dciodvfy(dcm).splitlines() if x.startswith("Error")]


def test_diffusion_recipe_needs_its_model(tmp_path):
    recipe = write(tmp_path, """
name: nomodel
backend: diffusion
cohorts: [{name: a, count: 1, layout: {source: explicit, boxes: [{label: Nodule, box: [0.1, 0.1, 0.2, 0.2]}]}}]
""")
    proc = subprocess.run([sys.executable, "-m", "chexforge.cli", "validate", str(recipe)], capture_output=True, text=True)
    assert proc.returncode == 2 and "needs `model: PATH`" in proc.stderr
    recipe2 = write(tmp_path, "name: m\nbackend: diffusion\nmodel: ./nowhere\ncohorts: [{name: a, count: 1}]\n", "r2.yaml")
    proc = subprocess.run([sys.executable, "-m", "chexforge.cli", "validate", str(recipe2)], capture_output=True, text=True)
    assert proc.returncode == 2 and "r2.yaml:3:8: expected a local model folder" in proc.stderr


def test_gradient_checkpointing_trains_the_same(tiny_model, drr_images, tmp_path):
    cfg = TrainConfig(steps=3, batch_size=4, save_every=3)
    plain = train(ChexforgePipeline.load(tiny_model), drr_images, tmp_path / "a", cfg)
    checkpointed = train(ChexforgePipeline.load(tiny_model), drr_images, tmp_path / "b",
                         TrainConfig(**{**cfg.__dict__, "gradient_checkpointing": True}))
    np.testing.assert_allclose(plain, checkpointed, rtol=1e-5)
