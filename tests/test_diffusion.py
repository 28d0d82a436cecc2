"""Diffusion backend: model, conditioning, sampling, saving, ChexGen conversion, diffusers pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chexforge.errors import UserError
from chexforge.models import control_image
from chexforge.models.convert_chexgen import convert_state_dict, read_checkpoint
from chexforge.models.pipeline import ChexforgePipeline, demographic_prefix
from chexforge.models.transformer import PRESETS, GuidedTransformer

from . import chexgen_reference as ref
from .conftest import make_tiny_t5


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


PROMPTS = ["sex:Female, age:67. PA chest radiograph. Moderate left pleural effusion.", "AP chest radiograph.", "Lung nodule."]


def boxes_control(n: int, size: int = 64) -> torch.Tensor:
    box = {"label": "Nodule", "x0": 0.1, "y0": 0.2, "x1": 0.3, "y1": 0.4}
    return control_image.to_tensor([control_image.draw(size, [box])] * n)


def test_guided_transformer_is_the_diffusers_model_without_control():
    torch.manual_seed(0)
    m = GuidedTransformer.from_config(PRESETS["tiny"]).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.randn(3, 9, 64)
    keep = torch.ones(3, 9)
    keep[0, 6:] = 0
    with torch.no_grad():
        ours = m(x, t, y, keep)
        theirs = m.base(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=keep, return_dict=False)[0]
    assert torch.equal(ours, theirs)


def test_control_branch_at_init_changes_nothing():
    torch.manual_seed(1)
    m = GuidedTransformer.from_config(PRESETS["tiny"]).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 64)
    with torch.no_grad():
        plain = m(x, t, y)
        guided = m(x, t, y, control=torch.randn(2, 4, 8, 8))
        torch.nn.init.normal_(m.control.after_proj[0].weight, std=0.1)
        changed = m(x, t, y, control=torch.randn(2, 4, 8, 8))
    assert torch.equal(plain, guided)
    assert not torch.allclose(plain, changed)


def test_save_load_round_trip_is_bit_exact(tiny_model, tmp_path):
    a = ChexforgePipeline.load(tiny_model)
    a.save(tmp_path / "again")
    b = ChexforgePipeline.load(tmp_path / "again")
    for (ka, va), (kb, vb) in zip(a.transformer.state_dict().items(), b.transformer.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert a.parameters_hash() == b.parameters_hash()
    ctrl = boxes_control(3)
    assert np.array_equal(a.sample(PROMPTS, gens(1, 2, 3), 64, ctrl, steps=4),
                          b.sample(PROMPTS, gens(1, 2, 3), 64, ctrl, steps=4))


@pytest.mark.parametrize("sampler", ["dpm++", "ddpm"])
def test_same_seed_same_image_whatever_the_batch(tiny_model, sampler):
    pipe = ChexforgePipeline.load(tiny_model)
    ctrl = boxes_control(3)
    batch = pipe.sample(PROMPTS, gens(11, 12, 13), 64, ctrl, steps=5, sampler=sampler, guidance_control=2.0)
    alone = pipe.sample(PROMPTS[1:2], gens(12), 64, ctrl[1:2], steps=5, sampler=sampler, guidance_control=2.0)
    assert batch.shape == (3, 64, 64) and batch.dtype == np.float32
    assert 0 <= batch.min() and batch.max() <= 1
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-4)
    other = pipe.sample(PROMPTS[1:2], gens(99), 64, ctrl[1:2], steps=5, sampler=sampler, guidance_control=2.0)
    assert np.abs(other[0] - alone[0]).max() > 1e-3


def test_a_batch_of_mixed_sizes_renders_each_job_at_its_size(tiny_model):
    """One sampling call per size; results in job order, each job as it renders alone."""
    from chexforge.backends.diffusion.backend import DiffusionBackend
    from chexforge.backends.diffusion.options import DiffusionOptions

    backend = DiffusionBackend(DiffusionOptions(steps=3), model=tiny_model)
    jobs = [{"job_id": str(i), "seed": i, "size": size, "sex": "F", "age": 50, "prompt": "PA chest radiograph."}
            for i, size in enumerate([64, 32, 64, 32])]
    mixed = backend.generate(jobs)
    assert [s.job_id for s in mixed] == ["0", "1", "2", "3"]
    assert [s.image.shape for s in mixed] == [(64, 64), (32, 32), (64, 64), (32, 32)]
    np.testing.assert_allclose(backend.generate(jobs[1:2])[0].image, mixed[1].image, atol=1e-4)


def test_guidance_scales_change_the_result(tiny_model):
    pipe = ChexforgePipeline.load(tiny_model)
    with torch.no_grad():  # make the control branch do something
        for lin in pipe.transformer.control.after_proj:
            torch.nn.init.normal_(lin.weight, std=0.2)
    ctrl = boxes_control(1)
    base = pipe.sample(PROMPTS[:1], gens(5), 64, ctrl, steps=4)
    assert not np.allclose(base, pipe.sample(PROMPTS[:1], gens(5), 64, ctrl, steps=4, guidance_text=1.0))
    assert not np.allclose(base, pipe.sample(PROMPTS[:1], gens(5), 64, ctrl, steps=4, guidance_control=3.0))


def test_demographic_prefix_in_chexgen_form():
    job = {"sex": "M", "age": 71, "race": "Black", "prompt": "PA chest radiograph."}
    assert demographic_prefix(job, "chexgen") == "sex:Male, age:71, race:Black. "
    assert demographic_prefix({"sex": "F", "age": 30}, "chexgen") == "sex:Female, age:30. "
    assert demographic_prefix(job, "none") == ""


def test_control_image_draws_class_colours():
    img = control_image.draw(64, [{"label": "Nodule", "x0": 0.25, "y0": 0.25, "x1": 0.5, "y1": 0.5},
                                  {"label": "Mass", "x0": 0.6, "y0": 0.6, "x1": 0.9, "y1": 0.9}])
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[16, 16]) == control_image.COLOURS["Nodule"]  # outline in full colour
    assert tuple(img[48, 48]) == tuple(c // 2 for c in control_image.COLOURS["Mass"])  # filled at half
    assert img[2, 2].sum() == 0


# ---- ChexGen checkpoints ----------------------------------------------------------------------


def chexgen_checkpoint(path, control: bool = False, dtype: torch.dtype = torch.float32, control_blocks: int = 2):
    """A tiny checkpoint in ChexGen's released layout: module. prefixes, state_dict + state_dict_ema;
    `dtype` fp16/bf16: every tensor saved in half precision (pos_embed included)."""
    base = ref.DiT()
    ref.randomize(base, 0)
    model = ref.ControlDiT(base, control_blocks) if control else base
    if control:
        ref.randomize(model, 1)
    ema = {f"module.{k}": v.clone().to(dtype) for k, v in model.state_dict().items()}
    raw = {k: v + 0.01 if v.is_floating_point() else v for k, v in ema.items()}
    torch.save({"state_dict": raw, "state_dict_ema": ema, "step": 123}, path)
    return model


@pytest.mark.parametrize("control", [False, True], ids=["base", "control"])
def test_chexgen_conversion_reproduces_the_original_forward(tmp_path, control):
    original = chexgen_checkpoint(tmp_path / "ckpt.pth", control).eval()
    sd, used_ema = read_checkpoint(tmp_path / "ckpt.pth")
    assert used_ema
    model, null, cfg = convert_state_dict(sd, heads=4)
    assert cfg.depth == 3 and cfg.hidden == 64 and cfg.learn_sigma and cfg.interpolation_scale == 2.0
    assert cfg.control_blocks == (2 if control else 0) and null.shape == (6, 32)
    x, t, y, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 6, 32), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = original(x, t, y, c) if control else original(x, t, y)
        got = model.eval()(x, t, y, torch.ones(2, 6), c if control else None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_chexgen_conversion_is_strict(tmp_path):
    chexgen_checkpoint(tmp_path / "ckpt.pth")
    sd, _ = read_checkpoint(tmp_path / "ckpt.pth")
    bad = dict(sd)
    bad["blocks.1.mlp.fc1.weight"] = torch.zeros(10, 64)
    with pytest.raises(UserError, match=r"blocks\.1\.mlp\.fc1\.weight: shape \(10, 64\) in the checkpoint, \(256, 64\) expected"):
        convert_state_dict(bad, heads=4)
    extra = dict(sd, **{"blocks.0.attn.extra": torch.zeros(3)})
    with pytest.raises(UserError, match="unused key 'blocks.0.attn.extra'"):
        convert_state_dict(extra, heads=4)
    missing = {k: v for k, v in sd.items() if k != "t_block.1.bias"}
    with pytest.raises(UserError, match="missing key 't_block.1.bias'"):
        convert_state_dict(missing, heads=4)
    with pytest.raises(UserError, match="not divisible by 5 heads"):
        convert_state_dict(sd, heads=5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_chexgen_checkpoints_convert(tmp_path, dtype):
    """Every tensor fp16/bf16 (pos_embed too, rounded): the pos-embed scale is still found, and the
    weights are the half-precision values exactly, in float32."""
    original = chexgen_checkpoint(tmp_path / "ckpt.pth", control=True, dtype=dtype)
    sd, _ = read_checkpoint(tmp_path / "ckpt.pth")
    assert all(v.dtype == dtype for v in sd.values())
    model, null, cfg = convert_state_dict(sd, heads=4)
    assert cfg.interpolation_scale == 2.0 and cfg.control_blocks == 2
    # The same values upcast, with the exact float32 table: what the half file must convert to.
    upcast = {k: v.float() for k, v in sd.items()} | {"base_model.pos_embed": original.state_dict()["base_model.pos_embed"]}
    expected, expected_null, _ = convert_state_dict(upcast, heads=4)
    got = model.state_dict()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], v) for k, v in expected.state_dict().items())
    assert torch.equal(null, expected_null)
    # A wrong scale is still refused: the tolerance fits the dtype, not any table.
    with pytest.raises(UserError, match="does not match a sin-cos table with scale 1.0"):
        convert_state_dict(sd, heads=4, pos_embed_scale=1.0)


def _ckpt(path, sd):
    torch.save({"state_dict_ema": sd}, path)
    return path


def _base_sd():
    m = ref.DiT()
    ref.randomize(m, 0)
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("case", ["control-depth", "pos-embed", "not-a-tensor", "not-torch", "heads", "odd-shape"])
def test_converter_failures_are_one_located_line(tmp_path, capsys, case):
    """Through the CLI: exit 2 and one line naming the checkpoint and what was expected."""
    from chexforge.cli import main

    ckpt = tmp_path / "ckpt.pth"
    heads, expect = "4", None
    if case == "control-depth":  # as many copied blocks as base blocks (3): the copies feed blocks 1..N
        chexgen_checkpoint(ckpt, control=True, control_blocks=3)
        expect = "3 control blocks (controlnet.0-2) for 3 base blocks"
    elif case == "pos-embed":
        _ckpt(ckpt, _base_sd() | {"pos_embed": torch.zeros(1, 15, 64)})
        expect = "pos_embed: shape (1, 15, 64)"
    elif case == "not-a-tensor":
        _ckpt(ckpt, _base_sd() | {"blocks.0.note": "hello"})
        expect = "'blocks.0.note' is a str, not a tensor"
    elif case == "not-torch":
        ckpt.write_text("not a checkpoint")
        expect = "cannot load as a weights-only checkpoint"
    elif case == "heads":
        _ckpt(ckpt, _base_sd())
        heads, expect = "5", "hidden size 64 is not divisible by 5 heads"
    else:  # a shape no check foresees: caught on the way, still one line
        _ckpt(ckpt, _base_sd() | {"y_embedder.y_proj.fc1.weight": torch.zeros(5)})
        expect = "cannot convert this checkpoint (IndexError"
    code = main(["models", "import-chexgen", str(ckpt), "--out", str(tmp_path / "out"), "--t5", str(tmp_path / "t5"),
                 "--vae", str(tmp_path / "vae"), "--heads", heads])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"chexforge: error: {ckpt}: "), err
    assert expect in " ".join(err.split()), err


def test_checkpoints_load_weights_only(tmp_path):
    import argparse

    # Arbitrary objects need pickle code to load; weights_only refuses them.
    torch.save({"state_dict_ema": {"w": torch.zeros(1)}, "args": argparse.Namespace(a=1)}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="weights-only"):
        read_checkpoint(tmp_path / "evil.pth")


def test_import_chexgen_cli_writes_a_runnable_pipeline(tmp_path):
    from diffusers import AutoencoderKL
    from transformers import T5EncoderModel

    from chexforge.cli import main
    from chexforge.models.vae import build_vae

    original = chexgen_checkpoint(tmp_path / "ckpt.pth", control=True).eval()
    make_tiny_t5(tmp_path / "t5", d_model=32)
    build_vae("tiny", 64).save_pretrained(tmp_path / "vae")
    out = tmp_path / "converted"
    assert main(["models", "import-chexgen", str(tmp_path / "ckpt.pth"), "--out", str(out), "--t5", str(tmp_path / "t5"),
                 "--vae", str(tmp_path / "vae"), "--heads", "4"]) == 0
    pipe = ChexforgePipeline.load(out)
    assert pipe.text_encoder.kind == "t5" and pipe.null_embedding.shape == (6, 32)
    assert pipe.conditioning.sampler == "chexgen"  # ChexGen's own sampler by default (tests/test_chexgen_sampler.py)
    # The written weights are the source's: the transformer is the conversion of the EMA weights
    # (not the raw ones, 0.01 away), tensor for tensor, and runs the original's forward; the VAE
    # and the T5 encoder are the given folders' own.
    sd, _ = read_checkpoint(tmp_path / "ckpt.pth")
    expected, null, _ = convert_state_dict(sd, heads=4)
    written = pipe.transformer.state_dict()
    assert list(written) == list(expected.state_dict())
    assert all(torch.equal(written[k], v) for k, v in expected.state_dict().items())
    assert torch.equal(pipe.null_embedding, null)
    x, t, y, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 6, 32), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer.eval()(x, t, y, torch.ones(2, 6), c), original(x, t, y, c), rtol=1e-5, atol=1e-5)
    for ours, theirs in ((pipe.vae, AutoencoderKL.from_pretrained(tmp_path / "vae")),
                         (pipe.text_encoder.model, T5EncoderModel.from_pretrained(tmp_path / "t5"))):
        a, b = ours.state_dict(), theirs.state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    for sampler in ("ddpm", "dpm++", None):  # learned variance: DDPM and chexgen use it, DPM-Solver++ takes the noise alone
        images = pipe.sample(["sex:Male, age:71. PA chest radiograph."], gens(0), 64, boxes_control(1), steps=3, sampler=sampler)
        assert images.shape == (1, 64, 64) and np.isfinite(images).all()
    assert main(["models", "info", str(out)]) == 0
    # The backend samples an imported folder with ChexGen's sampler unless told otherwise, and the
    # manifest's sampler JSON says so (a control model: no guidance, as ChexGen's control sampler).
    from chexforge.backends.diffusion.backend import DiffusionBackend
    from chexforge.backends.diffusion.options import DiffusionOptions

    ident = DiffusionBackend(DiffusionOptions(), model=out).identity()["sampler"]
    assert ident["sampler"] == "chexgen" and ident["steps"] == 100 and ident["guidance_text"] is None
    assert DiffusionBackend(DiffusionOptions(sampler="dpm++"), model=out).identity()["sampler"]["guidance_text"] == 4.0
    # The wrong T5 width is refused with one line.
    make_tiny_t5(tmp_path / "t5wide", d_model=48)
    assert main(["models", "import-chexgen", str(tmp_path / "ckpt.pth"), "--out", str(tmp_path / "x"),
                 "--t5", str(tmp_path / "t5wide"), "--vae", str(tmp_path / "vae"), "--heads", "4"]) == 2


# ---- text encoders ------------------------------------------------------------------------------


def test_open_clip_text_tower_from_a_full_clip_checkpoint(tmp_path):
    from chexforge.models.text import OpenClipText
    from chexforge.models.weights import save_state_dict

    enc = OpenClipText.from_open_clip("tiny")
    full = {k: v for k, v in enc.tower.state_dict().items() if k != "attn_mask"}
    full["visual.conv1.weight"] = torch.zeros(3)  # a CLIP checkpoint carries the image tower too
    save_state_dict(full, tmp_path / "clip.safetensors")
    again = OpenClipText.from_open_clip("tiny", tmp_path / "clip.safetensors")
    a, keep = enc.encode(["PA chest radiograph.", "x"])
    b, _ = again.encode(["PA chest radiograph.", "x"])
    assert a.shape == (2, 77, 64) and torch.equal(a, b)
    assert keep[0].sum() > keep[1].sum() >= 2  # start, tokens, end; padding masked
    with pytest.raises(UserError, match="no text-tower weight"):
        save_state_dict({"visual.conv1.weight": torch.zeros(3)}, tmp_path / "vis.safetensors")
        OpenClipText.from_open_clip("tiny", tmp_path / "vis.safetensors")


# ---- diffusers pipelines (text only) -------------------------------------------------------------


def test_a_diffusers_pipeline_folder_runs_text_only(tmp_path):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    from chexforge.backends.diffusion.backend import DiffusionBackend
    from chexforge.backends.diffusion.options import DiffusionOptions
    from chexforge.models.build import describe
    from chexforge.models.text import T5Text
    from chexforge.models.vae import build_vae

    t5 = T5Text(make_tiny_t5(tmp_path / "t5"), max_length=16)
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                           num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2,
                                           caption_channels=32)
    PixArtAlphaPipeline(tokenizer=t5.tokenizer, text_encoder=t5.model, vae=build_vae("tiny", 64), transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(tmp_path / "pixart")
    info = describe(tmp_path / "pixart")
    assert "PixArtAlphaPipeline" in info["kind"] and "text only" in info["guidance"]
    backend = DiffusionBackend(DiffusionOptions(steps=3), size=64, model=tmp_path / "pixart")
    jobs = [{"job_id": "a", "seed": 1, "size": 64, "prompt": "PA chest radiograph."},
            {"job_id": "b", "seed": 2, "size": 64, "prompt": "AP chest radiograph."}]
    a, b = backend.generate(jobs)
    assert a.image.shape == (64, 64) and a.image.dtype == np.float32 and not np.array_equal(a.image, b.image)
    again = backend.generate(jobs[:1])[0]
    assert np.allclose(a.image, again.image, atol=1e-5)


def test_not_a_model_folder_is_one_line(tmp_path):
    from chexforge.backends.diffusion.backend import DiffusionBackend
    from chexforge.backends.diffusion.options import DiffusionOptions

    with pytest.raises(UserError, match="no model_index.json"):
        DiffusionBackend(DiffusionOptions(), model=tmp_path)


def test_diffusion_backend_writes_every_requested_mask(tiny_model, tmp_path):
    """The diffusion backend draws no finding masks of its own: a job gets the structures its
    layout gives (lungs from the prior mask library) and the boxes it was given; each is written."""
    from chexforge.plan import plan
    from chexforge.recipe import load_recipe
    from chexforge.runtime import RunOptions, run

    from .conftest import requested_masks_written, write

    recipe = write(tmp_path, f"""
name: diffusion-masks
seed: 1
backend: diffusion
model: {tiny_model}
backend_options: {{steps: 2}}
output: {{size: 64, formats: [png], masks: true}}
cohorts:
  - {{name: a, count: 2, findings: {{Nodule: 1.0}}, layout: prior, masks: [lungs]}}
""")
    r = load_recipe(recipe)
    run(plan(r), r, tmp_path / "out", RunOptions(progress=False))
    rows = requested_masks_written(tmp_path / "out", finding_masks=False)
    assert len(rows) == 2 and all(row["anatomy"] == ["lungs"] for row in rows)
