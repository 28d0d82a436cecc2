"""The hybrid backend (issue 15, item 3): the DRR's virtual patient, masks and boxes; the diffusion
model's pixels through its control branch, from noise or from the DRR image (img2img)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from .conftest import write

FINDINGS = "{Effusion: 1.0}"


def recipe_text(model, backend: str = "hybrid", strength: float = 0.5) -> str:
    # The CT's own person (no virtual patient to grow per job): a third of the DRR's time at 64 px,
    # and the same for both backends, which is all this test needs of the DRR.
    head = (f"backend: hybrid\nmodel: {model}\nbackend_options: {{strength: {strength}, diffusion: {{steps: 2}}, "
            "drr: {virtual_patients: false}}\n"
            if backend == "hybrid" else "backend: drr\nbackend_options: {virtual_patients: false}\n")
    qc = "qc: {max_attempts: 1, rules: [{check: mask_area, min: 0.001}]}\n" if backend == "hybrid" else ""
    return head + qc + f"""name: hybrid-test
seed: 3
output: {{size: 64, formats: [png], masks: true}}
cohorts:
  - {{name: eff, count: 2, findings: {FINDINGS}, masks: [lungs]}}
"""


JOBS = [{"job_id": f"j{i}", "cohort": "c", "seed": 40 + i, "view": "PA", "sex": "F", "age": 55, "size": 64,
         "anatomy": ["lungs"], "Effusion": 1, "prompt": "PA chest radiograph. Large left pleural effusion."}
        for i in range(1)]


@pytest.fixture(scope="module")
def models(tiny_model, drr64, tmp_path_factory):
    """The tiny pipeline with a control branch that does something (its zero-initialised output
    projections given weights, as training would) and its latent scale set from DRR images, as a
    fitted VAE's is (a random VAE's latents are ~20x smaller than unit variance, so any noise
    would drown them); and the same folder without the branch."""
    from chexforge.models import vae as vae_ops
    from chexforge.models.pipeline import ChexforgePipeline

    root = tmp_path_factory.mktemp("hybrid-models")
    pipe = ChexforgePipeline.load(tiny_model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lin in pipe.transformer.control.after_proj:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)
        images = torch.from_numpy(np.stack([s.image for s in drr64.generate(JOBS)]))
        raw = vae_ops.encode(pipe.vae, vae_ops.to_rgb(images)) / vae_ops.scale_of(pipe.vae)
    pipe.vae.register_to_config(scaling_factor=float(1 / raw.std()))
    pipe.save(root / "control")
    # A base model is this folder as `save` writes it without a branch: no controlnet/, index entry null.
    shutil.copytree(root / "control", root / "base")
    shutil.rmtree(root / "base" / "controlnet")
    index = json.loads((root / "base" / "model_index.json").read_text())
    index["controlnet"] = [None, None]
    (root / "base" / "model_index.json").write_text(json.dumps(index))
    return root


def cli(capsys, *args: str) -> tuple[int, str]:
    from chexforge.cli import main

    capsys.readouterr()
    rc = main(list(args))
    got = capsys.readouterr()
    return rc, got.out + got.err


def rows(out) -> list[dict]:
    return sorted(pq.read_table(out / "manifest.parquet").to_pylist(), key=lambda r: r["job_id"])


def test_a_hybrid_dataset_carries_the_drrs_exact_labels(models, tmp_path, capsys):
    from chexforge.contracts.jobs import read_jobs
    from chexforge.recipe import load_recipe
    from chexforge.runtime import RunOptions, run

    recipe = write(tmp_path, recipe_text(models / "control"))
    rc, text = cli(capsys, "generate", str(recipe), "--out", str(tmp_path / "a"), "--no-progress")
    assert rc == 0, text
    hybrid = rows(tmp_path / "a")
    assert len(hybrid) == 2 and all(r["status"] == "ok" and r["backend"] == "hybrid" for r in hybrid)

    # The DRR backend alone, on the very jobs the hybrid run made (same ids, seeds, patients).
    cli(capsys, "plan", str(recipe), "--out", str(tmp_path / "jobs.parquet"))
    drr_recipe = load_recipe(write(tmp_path, recipe_text(None, "drr"), "drr.yaml"))
    run(read_jobs(tmp_path / "jobs.parquet")[0], drr_recipe, tmp_path / "d", RunOptions(progress=False))
    physics = rows(tmp_path / "d")
    assert [r["job_id"] for r in physics] == [r["job_id"] for r in hybrid]
    for h, d in zip(hybrid, physics):
        assert {m["name"] for m in h["masks"]} == {"lungs", "Effusion"}
        assert [m["path"] for m in h["masks"]] == [m["path"] for m in d["masks"]]
        for mh, md in zip(h["masks"], d["masks"]):  # the mask PNGs, byte for byte
            assert (tmp_path / "a" / mh["path"]).read_bytes() == (tmp_path / "d" / md["path"]).read_bytes()
        assert h["realised_boxes"] == d["realised_boxes"] and h["realised_boxes"]
        assert h["sha256_png"] != d["sha256_png"]  # the pixels are the model's, not the DRR's
        meta, sampler = json.loads(h["meta"]), json.loads(h["sampler"])
        drr_meta = json.loads(d["meta"])
        assert meta["findings"] == drr_meta["findings"] and meta["geometry"] == drr_meta["geometry"]
        assert meta["control"] == ["Effusion"]
        assert meta["qc"] == {"attempts": 1, "seed": h["seed"], "rejections": []}  # mask_area ran on the DRR's mask
        assert sampler["strength"] == 0.5 and sampler["diffusion"]["steps"] == 2 and "dose" in sampler["drr"]

    # Same recipe, another folder: the same pixels.
    rc, text = cli(capsys, "generate", str(recipe), "--out", str(tmp_path / "b"), "--no-progress")
    assert rc == 0, text
    assert [r["sha256_png"] for r in rows(tmp_path / "b")] == [r["sha256_png"] for r in hybrid]


def test_strength_trades_the_drr_image_for_the_models(models, drr64):
    """0: the DRR image itself. In between: the DRR image is the init, so the result follows it (as
    the VAE sees it: the tiny VAE is random, so the reference is the DRR image through it) more than
    sampling from noise does."""
    from chexforge.backends.hybrid.backend import HybridBackend
    from chexforge.backends.hybrid.options import HybridOptions
    from chexforge.models import vae as vae_ops

    jobs = JOBS
    backend = HybridBackend(HybridOptions(strength=0, diffusion={"steps": 10}), model=models / "control")
    backend.drr = drr64  # the session's prepared DRR backend (same default options): no second CT preparation
    physics = drr64.generate(jobs)
    got = {}
    for strength in (0.0, 0.1, 1.0):
        backend.options = backend.options.model_copy(update={"strength": strength})
        got[strength] = backend.generate(jobs)
    for s, p in zip(got[0.0], physics):
        np.testing.assert_array_equal(s.image, p.image)
        assert s.boxes == p.boxes and s.projection == p.projection
    with torch.no_grad():
        seen = vae_ops.decode(backend.pipe.vae, vae_ops.encode(backend.pipe.vae, vae_ops.to_rgb(
            torch.from_numpy(np.stack([p.image for p in physics]))))).numpy()

    def corr(samples):
        return min(np.corrcoef(s.image.ravel(), ref.ravel())[0, 1] for s, ref in zip(samples, seen))

    partial, pure = corr(got[0.1]), corr(got[1.0])
    assert partial > 0.4 and partial > pure + 0.3, (partial, pure)
    for a, b, p in zip(got[0.1], got[1.0], physics):  # whatever the strength, the labels are the DRR's
        assert a.masks.keys() == b.masks.keys() == p.masks.keys()
        assert all(np.array_equal(a.masks[k], p.masks[k]) and np.array_equal(b.masks[k], p.masks[k]) for k in p.masks)


def test_a_model_without_a_control_branch_is_one_line_at_validate(models, tmp_path, capsys):
    recipe = write(tmp_path, recipe_text(models / "base"))
    rc, text = cli(capsys, "validate", str(recipe))
    assert rc == 2
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "no control branch" in lines[0] and "recipe.yaml:2:" in lines[0], text
    assert "Traceback" not in text
    rc, text = cli(capsys, "validate", str(write(tmp_path, recipe_text(models / "control"), "ok.yaml")))
    assert rc == 0, text


def test_options_are_checked_where_they_are_written(tmp_path, models, capsys):
    bad = recipe_text(models / "control").replace("virtual_patients: false}", "virtual_patients: false, dose: 0}")
    rc, text = cli(capsys, "validate", str(write(tmp_path, bad)))
    assert rc == 2 and "backend_options.drr.dose" in text, text
    twice = recipe_text(models / "control").replace("steps: 2", "steps: 2, control_strength: 2")
    rc, text = cli(capsys, "validate", str(write(tmp_path, twice, "twice.yaml")))
    assert rc == 2 and "control_scale" in text, text
