"""Issue 15, point 6: what kept training from teaching the condition, each fixed and checked.

Captions without `race:nan`, a latent scale measured from the data (and part of the cache key),
an EMA warm-up (and a warning when the exported weights lag), job ids that ignore speed settings,
and the real step count in the manifest. Tiny models and synthetic 64-px images: seconds each.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from chexforge.models import vae as vae_ops
from chexforge.models.data import read_examples
from chexforge.models.pipeline import ChexforgePipeline, demographic_prefix
from chexforge.models.train import TrainConfig, _cache_key, ema_decay, ema_status, train
from chexforge.models.weights import load_state_dict

from .conftest import write
from .test_cli import run_cli


@pytest.fixture(scope="module")
def images_csv(tmp_path_factory):
    """16 smooth 64-px 'radiographs' (two bright fields, brighter below in half of them) and a CSV."""
    root = tmp_path_factory.mktemp("csv64")
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    rows = ["path,prompt,Sex,Age,race"]
    for i in range(16):
        lung = np.exp(-((xx - 0.3) ** 2 + (yy - 0.5) ** 2) / 0.03) + np.exp(-((xx - 0.7) ** 2 + (yy - 0.5) ** 2) / 0.03)
        img = 0.3 + 0.4 * lung + (0.3 * yy if i % 2 else 0.0) + 0.02 * i / 16
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / f"i{i}.png")
        rows.append(f"i{i}.png,PA chest radiograph. {'Effusion' if i % 2 else 'Normal'}.,{'F' if i % 2 else 'M'},{40 + i},")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


# ---- 1. captions: a missing value is left out, as the sampler leaves it out ----------------------


def test_manifest_captions_leave_missing_values_out(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    # What pandas hands back for a manifest whose race/age cells are empty: NaN, not None.
    df = pd.DataFrame({"image_png": ["a.png", "a.png"], "prompt": ["PA chest radiograph.", "PA chest radiograph."],
                       "status": ["ok", "ok"], "masks": [None, None], "realised_boxes": [None, None],
                       "sex": ["F", "M"], "age": [np.nan, 71.0], "race": [np.nan, np.nan], "view": ["PA", "PA"]})
    df.to_parquet(tmp_path / "manifest.parquet")
    ex = read_examples(tmp_path / "manifest.parquet")
    assert demographic_prefix(ex[0].job, "chexgen") == "sex:Female. "
    # The training caption is what the sampler's prompt is for the same job planned without a race.
    planned = {"sex": "M", "age": 71, "race": None, "view": "PA"}
    assert demographic_prefix(ex[1].job, "chexgen") == demographic_prefix(planned, "chexgen") == "sex:Male, age:71. "
    # The one builder itself takes NaN for missing too (a job table read by pandas has them).
    assert demographic_prefix({"sex": "F", "age": float("nan"), "race": float("nan")}, "chexgen") == "sex:Female. "


def test_csv_captions_leave_an_empty_race_out(images_csv):
    ex = read_examples(images_csv)
    assert all("nan" not in demographic_prefix(e.job, "chexgen") for e in ex)
    assert demographic_prefix(ex[1].job, "chexgen") == "sex:Female, age:41. "


# ---- 2. the latent scale of a fitted VAE comes from the data; 3. EMA warm-up --------------------


@pytest.fixture(scope="module")
def fitted_run(tiny_model, images_csv, tmp_path_factory):
    """One short run (a few VAE steps, 8 training steps, the default EMA 0.9999) for both checks."""
    run = tmp_path_factory.mktemp("fit") / "run"
    train(ChexforgePipeline.load(tiny_model), images_csv, run,
          TrainConfig(steps=8, batch_size=4, lr=2e-3, ema=0.9999, vae_steps=3, save_every=8))
    return run


def test_fitted_vae_gets_its_latent_scale_from_the_data(fitted_run, images_csv):
    scale = json.loads((fitted_run / "model" / "vae" / "config.json").read_text())["scaling_factor"]
    assert abs(scale - vae_ops.SD_SCALE) > 0.05, scale  # not SD's constant
    # 1/std of the training latents: the cached latents (what the transformer sees) have unit spread.
    cache = load_state_dict(next((fitted_run / "cache").glob("cache-*.safetensors")))
    assert 0.97 < float(cache["latents"].std()) < 1.03, float(cache["latents"].std())
    trained = ChexforgePipeline.load(fitted_run / "model")
    assert vae_ops.scale_of(trained.vae) == pytest.approx(scale)
    # The cache key changes with the scale alone (same weights): another scale's latents are not served.
    examples = read_examples(images_csv)
    key = _cache_key(examples, 64, trained)
    trained.vae.register_to_config(scaling_factor=vae_ops.SD_SCALE)
    assert _cache_key(examples, 64, trained) != key


def test_ema_warm_up_exports_trained_weights(tiny_model, fitted_run):
    assert ema_decay(TrainConfig(ema=0.9999), 0) == pytest.approx(0.1)
    assert ema_decay(TrainConfig(ema=0.9999), 10**6) == 0.9999
    assert ema_decay(TrainConfig(ema=0.9999, ema_warmup=False), 0) == 0.9999
    init = ChexforgePipeline.load(tiny_model).transformer.state_dict()
    raw = load_state_dict(fitted_run / "checkpoints" / "step-0000008" / "model.safetensors")
    exported = ChexforgePipeline.load(fitted_run / "model").transformer.state_dict()
    # How far the exported weights went from the initial towards the trained ones: about 0.001
    # with a constant 0.9999 (1 - 0.9999**8), near 1 with the warm-up.
    num = sum(float(((exported[k] - init[k]) * (raw[f"transformer.{k}"] - init[k])).sum()) for k in init)
    den = sum(float(((raw[f"transformer.{k}"] - init[k]) ** 2).sum()) for k in init)
    assert num / den > 0.6, num / den
    assert not ema_status(TrainConfig(ema=0.9999), 500).lagging
    lag = ema_status(TrainConfig(ema=0.9999, ema_warmup=False), 500)
    assert lag.lagging and lag.initial_weight == pytest.approx(0.9999**500)


def test_cli_warns_when_the_exported_ema_lags(tiny_model, images_csv, tmp_path, capsys):
    got = run_cli(capsys, "train", "--model", str(tiny_model), "--data", str(images_csv), "--run", str(tmp_path / "r"),
                  "--steps", "3", "--batch-size", "4", "--no-ema-warmup", "--no-progress")
    assert got.returncode == 0, got.stderr
    assert "warning: the exported EMA weights lag" in got.stderr and got.stderr.count("\n") == 1, got.stderr
    assert "model with EMA weights (last decay 0.9999" in got.stdout and "100 % initial weights" in got.stdout, got.stdout


# ---- 4. job ids and seeds do not depend on speed settings; 5. the steps that ran ----------------

RECIPE = """
name: speed
seed: 3
backend: diffusion
model: {model}
backend_options: {{steps: 2, {extra}}}
output: {{size: 64, formats: [png]}}
cohorts:
  - {{name: a, count: {count}, findings: {{Effusion: 0.5}}}}
"""


def _plan(tmp_path, capsys, name: str, model, extra: str, count: int = 3) -> pq.ParquetFile:
    recipe = write(tmp_path, RECIPE.format(model=model, extra=extra, count=count), f"{name}.yaml")
    got = run_cli(capsys, "plan", str(recipe), "--out", str(tmp_path / f"{name}.parquet"))
    assert got.returncode == 0, got.stderr
    return pq.read_table(tmp_path / f"{name}.parquet")


def test_job_ids_and_seeds_ignore_speed_options(tiny_model, tmp_path, capsys):
    one = _plan(tmp_path, capsys, "one", tiny_model, "batch_size: 1, vae_slice: 1")
    four = _plan(tmp_path, capsys, "four", tiny_model, "batch_size: 4, compile: false")
    assert one.column("job_id").equals(four.column("job_id")) and one.column("seed").equals(four.column("seed"))
    other = _plan(tmp_path, capsys, "ddpm", tiny_model, "batch_size: 4, sampler: ddpm")  # pixels change: new jobs
    assert not set(other.column("job_id").to_pylist()) & set(one.column("job_id").to_pylist())


def test_a_run_resumes_with_another_batch_size_and_records_its_steps(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    first = write(tmp_path, RECIPE.format(model=tiny_model, extra="batch_size: 4", count=2), "first.yaml")
    assert run_cli(capsys, "generate", str(first), "--out", str(out), "--no-progress").returncode == 0
    then = write(tmp_path, RECIPE.format(model=tiny_model, extra="batch_size: 1", count=3), "then.yaml")
    got = run_cli(capsys, "generate", str(then), "--out", str(out), "--no-progress")
    assert got.returncode == 0, got.stderr
    table = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(table) == 3 and all(r["status"] == "ok" for r in table)
    sampler = json.loads(table[0]["sampler"])
    assert sampler["steps"] == 2 and sampler["scheduler"] == "DPMSolverMultistepScheduler", sampler


def test_default_step_counts_are_recorded(tiny_model):
    from chexforge.backends.diffusion.backend import DiffusionBackend
    from chexforge.backends.diffusion.options import DiffusionOptions

    ddpm = DiffusionBackend(DiffusionOptions(sampler="ddpm"), model=tiny_model).identity()["sampler"]
    assert ddpm["steps"] == 100 and ddpm["scheduler"] == "DDPMScheduler", ddpm


def test_speed_options_nested_in_a_hybrid_recipe_change_no_job_id():
    """The hybrid backend's `diffusion:` and `drr:` sections are option models of their own: a
    speed setting written there is left out of the hashed identity like a top-level one, and a
    setting that changes pixels is kept."""
    from chexforge.contracts.backends import BACKENDS

    hybrid = BACKENDS["hybrid"]
    fast = hybrid.identity_options({"strength": 0.5, "batch_size": 2, "diffusion": {"vae_slice": 1, "steps": 10}})
    slow = hybrid.identity_options({"strength": 0.5, "batch_size": 8, "diffusion": {"vae_slice": 0, "steps": 10}})
    assert fast == slow == {"strength": 0.5, "diffusion": {"steps": 10}}
    assert hybrid.identity_options({"diffusion": {"steps": 20}}) != fast
    assert BACKENDS["drr"].identity_options({"vessels": False}) == {"vessels": False}  # nothing marked: as written
