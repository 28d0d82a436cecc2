"""`sampler: chexgen` against an independent implementation of ChexGen's published sampling code.

The reference below is written from ChexGen's sampling scripts and the DiT/IDDPM diffusion code
they call (tools/sample.py, tools/sample_control.py, radiffuser/models/dit.py `forward_with_cfg`,
radiffuser/diffusion: `create_diffusion`, `space_timesteps`, `SpacedDiffusion`,
`GaussianDiffusion.p_mean_variance` / `p_sample`), in their own terms: float64 numpy tables,
a 2n-row batch whose second half the model ignores, guidance on channels 0-2, the null caption
under the prompts' mask, the control model's output unguided. Its network is
tests/chexgen_reference.py's DiT in ChexGen's own layout (masked cross-attention as ChexGen does
it); chexforge samples with the conversion of the same weights.

What is not compared is where the normal variates come from: ChexGen draws them from the global
torch generator, chexforge from one generator per job. Both sides here draw the same variates in
the same order (initial noise, then the control posterior sample, then one draw per step).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import chexforge.models.pipeline as pipeline_module
from chexforge.errors import UserError
from chexforge.models import control_image, schedulers
from chexforge.models.convert_chexgen import convert_state_dict
from chexforge.models.pipeline import ChexforgePipeline, Conditioning
from chexforge.models.text import TextEncoder
from chexforge.models.vae import build_vae

from . import chexgen_reference as ref

TOKENS, CAPTION, LATENT = 12, 32, 16  # 16×16 latents: 128-px images
PROMPTS = ["sex:Female, age:67. Moderate left pleural effusion.", "Lung nodule."]


class FakeT5(TextEncoder):
    """Stands in for T5 (the encoder is not what is compared): fixed random token embeddings and
    a prompt-dependent number of kept tokens (3 and 7 of 12 here), as T5's padded mask is."""

    kind, dim, max_length = "fake", CAPTION, TOKENS

    def encode(self, prompts):
        emb = torch.stack([torch.randn(TOKENS, CAPTION, generator=torch.Generator().manual_seed(len(p))) for p in prompts])
        keep = torch.zeros(len(prompts), TOKENS)
        for i, p in enumerate(prompts):
            keep[i, : min(TOKENS, 2 + len(p.split()) // 2)] = 1
        return emb, keep


def build(control: bool, learn_sigma: bool = True):
    """A tiny random ChexGen-layout model and the chexforge pipeline converted from it."""
    torch.manual_seed(0)
    base = ref.DiT(latent=LATENT, caption=CAPTION, tokens=TOKENS, learn_sigma=learn_sigma, pos_embed_scale=1.0)
    ref.randomize(base, 0)
    original = ref.ControlDiT(base, 2) if control else base
    if control:
        ref.randomize(original, 1)
    tame(base)
    transformer, null, cfg = convert_state_dict({k: v.clone() for k, v in original.state_dict().items()}, heads=4)
    torch.manual_seed(1)
    pipe = ChexforgePipeline(transformer, build_vae("tiny", LATENT * 8), FakeT5(), null,
                             schedulers.train_scheduler(cfg.learn_sigma), Conditioning(sampler="chexgen"))
    return pipe.to("cpu"), original.eval()


@torch.no_grad()
def tame(dit: ref.DiT) -> None:
    """Scale the random weights down (never to zero, so a mapping error still shows): the
    timestep path, the blocks and the output tables of a randomized DiT otherwise give noise
    predictions of |eps| ~ 50, far from a trained model's O(1)."""
    for module in (*dit.blocks, dit.t_embedder, dit.t_block):
        for param in module.parameters():
            param.mul_(0.3)
    dit.final_layer.shift_scale_table.mul_(0.1)
    dit.final_layer.linear.weight.mul_(0.5)


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def control_images(n):
    box = {"label": "Nodule", "x0": 0.1, "y0": 0.2, "x1": 0.5, "y1": 0.6}
    return control_image.to_tensor([control_image.draw(LATENT * 8, [box])] * n)


# ---- the reference: ChexGen's sampling code, re-implemented --------------------------------------


class ChexGenDiffusion:
    """create_diffusion(str(steps)) of ChexGen: linear betas over 1000 steps, epsilon prediction,
    LEARNED_RANGE variance (FIXED_LARGE for a model without learned variance), respaced."""

    def __init__(self, steps: int, learn_sigma: bool):
        full = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
        # space_timesteps(1000, str(steps)): one section, float stride accumulated, Python round
        frac_stride = 1 if steps <= 1 else (1000 - 1) / (steps - 1)
        cur, use = 0.0, set()
        for _ in range(steps):
            use.add(round(cur))
            cur += frac_stride
        # SpacedDiffusion: new betas from the kept cumulative alphas, model called at timestep_map
        last, betas, self.timestep_map = 1.0, [], []
        for i, a in enumerate(np.cumprod(1.0 - full)):
            if i in use:
                betas.append(1 - a / last)
                last = a
                self.timestep_map.append(i)
        b = np.array(betas)
        self.num_timesteps = len(b)
        alphas = 1.0 - b
        acp = np.cumprod(alphas)
        acp_prev = np.append(1.0, acp[:-1])
        self.betas = b
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1)
        self.posterior_variance = b * (1.0 - acp_prev) / (1.0 - acp)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:])) \
            if len(self.posterior_variance) > 1 else np.array([])
        self.posterior_mean_coef1 = b * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)
        self.learn_sigma = learn_sigma

    @staticmethod
    def _extract(arr, t, shape):
        out = torch.from_numpy(arr)[t].float()
        return out.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)

    def p_mean_variance(self, model, x, t, model_kwargs):
        c = x.shape[1]
        out = model(x, torch.tensor(self.timestep_map)[t], **model_kwargs)  # _WrappedModel
        if self.learn_sigma:
            eps, var_values = torch.split(out, c, dim=1)
            min_log = self._extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = self._extract(np.log(self.betas), t, x.shape)
            frac = (var_values + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            eps = out
            log_var = self._extract(np.log(np.append(self.posterior_variance[1], self.betas[1:])), t, x.shape)
        x0 = self._extract(self.sqrt_recip_alphas_cumprod, t, x.shape) * x - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x.shape) * eps
        mean = self._extract(self.posterior_mean_coef1, t, x.shape) * x0 + self._extract(self.posterior_mean_coef2, t, x.shape) * x
        return mean, log_var, out

    def p_sample(self, model, x, t, noise, model_kwargs):
        mean, log_var, out = self.p_mean_variance(model, x, t, model_kwargs)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return mean + nonzero * torch.exp(0.5 * log_var) * noise, out


def forward_with_cfg(model, x, timestep, y, cfg_scale, mask):
    """dit.py: the first half of x twice, the batch's prompt mask for every row, channels 0-2 guided."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    out = model(combined, timestep, y, mask=mask.repeat(len(y) // len(mask), 1))
    eps, rest = out[:, :3], out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def control_forward_with_cfg(model, x, timestep, y, cfg_scale, c, mask):
    """dit_control.py: the same doubled batch, returned unguided (cfg_scale is not used)."""
    half = x[: len(x) // 2]
    return model(torch.cat([half, half], dim=0), timestep, y, c, mask=mask.repeat(len(y) // len(mask), 1))


@torch.no_grad()
def chexgen_sample(original, pipe, prompts, generators, steps, cfg_scale=4.0, control=None, learn_sigma=True):
    """tools/sample.py (or sample_control.py with `control`) for one batch; returns the sampled
    latents of the first half and, per step, (model output of the kept rows, x after the step)."""
    n = len(prompts)
    diffusion = ChexGenDiffusion(steps, learn_sigma)
    caption_embs, emb_masks = pipe.text_encoder.encode(prompts)  # the T5 stage (not compared)
    base = original.base_model if control is not None else original
    null_y = base.y_embedder.y_embedding[None].repeat(n, 1, 1)
    z = torch.stack([torch.randn(4, LATENT, LATENT, generator=g) for g in generators])
    kwargs = {"y": torch.cat([caption_embs, null_y]), "cfg_scale": cfg_scale, "mask": emb_masks}
    model = lambda x, t, **kw: forward_with_cfg(original, x, t, **kw)  # noqa: E731
    if control is not None:
        cond = pipe.vae.encode(control).latent_dist.sample(generators) * 0.18215
        kwargs["c"] = torch.cat([cond, cond])
        model = lambda x, t, **kw: control_forward_with_cfg(original, x, t, **kw)  # noqa: E731
    x = z.repeat(2, 1, 1, 1)
    trace = []
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((2 * n,), i, dtype=torch.long)
        noise = torch.zeros_like(x)
        if i != 0:  # the kept rows' draws (the second half is never used: forward_with_cfg drops it)
            noise[:n] = torch.stack([torch.randn(4, LATENT, LATENT, generator=g) for g in generators])
        x, out = diffusion.p_sample(model, x, t, noise, kwargs)
        trace.append((out[:n], x[:n].clone()))
    return x[:n], trace


# ---- chexforge, recorded step by step ------------------------------------------------------------


@torch.no_grad()
def chexforge_sample(pipe, monkeypatch, **kwargs):
    """pipe.sample's final latents (the VAE decode is bypassed) and, per step, what went into the
    scheduler step and what came out."""
    trace = []
    real = schedulers.sampler

    def recording(name, config):
        sched = real(name, config)
        step = sched.step

        def recorded(model_output, t, x, **kw):
            out = step(model_output, t, x, **kw)
            trace.append((model_output.clone(), out[0].clone()))
            return out

        sched.step = recorded
        return sched

    monkeypatch.setattr(schedulers, "sampler", recording)
    monkeypatch.setattr(pipeline_module.vae_ops, "decode", lambda vae, latents, slice_size=4: latents)
    final = pipe.sample(**kwargs)
    return torch.as_tensor(final), trace


def close(got, expected):
    """Equal to 1e-5 of the tensor's scale. A random network's noise prediction is unrelated to
    x, so ancestral sampling amplifies x several-fold per step (|x| ~ 500 after 8 steps at CFG 4,
    where a trained model keeps it O(1)); float32 rounding of two equal computations in a
    different order (the two networks agree to ~1e-6) then grows with it, and an absolute 1e-5
    would measure rounding, not the sampler. Any quirk left out differs by > 1e-2 of the scale."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize("learn_sigma", [True, False], ids=["learned-variance", "fixed-large"])
def test_chexgen_sampler_reproduces_chexgen_text_guided(monkeypatch, learn_sigma):
    pipe, original = build(control=False, learn_sigma=learn_sigma)
    steps = 8
    expected, ref_trace = chexgen_sample(original, pipe, PROMPTS, gens(3, 4), steps, cfg_scale=4.0, learn_sigma=learn_sigma)
    got, trace = chexforge_sample(pipe, monkeypatch, prompts=PROMPTS, generators=gens(3, 4), size=LATENT * 8, steps=steps,
                                  sampler="chexgen", guidance_text=4.0)
    assert len(trace) == len(ref_trace) == steps
    # One step: the guided model output (3-channel guidance, masked null caption, the conditional
    # variance) and the state it leads to.
    close(trace[0][0], ref_trace[0][0])
    close(trace[0][1], ref_trace[0][1])
    # The whole chain.
    assert expected.abs().max() > 0.1 and torch.isfinite(expected).all()
    close(got, expected)
    # The model's own default (Conditioning.sampler) is this preset too.
    again, _ = chexforge_sample(pipe, monkeypatch, prompts=PROMPTS, generators=gens(3, 4), size=LATENT * 8, steps=steps)
    assert torch.equal(again, got)


def test_the_quirks_are_live_in_this_test(monkeypatch):
    """chexforge's full guidance differs from ChexGen's here in both places the test relies on:
    channel 3 (guided vs conditional) and channels 0-2 (null caption unmasked vs masked), so a
    sampler that ignored either quirk would fail the comparison above."""
    pipe, original = build(control=False)
    _, ref_trace = chexgen_sample(original, pipe, PROMPTS, gens(3, 4), 8)
    _, fast = chexforge_sample(pipe, monkeypatch, prompts=PROMPTS, generators=gens(3, 4), size=LATENT * 8, steps=8,
                               sampler="ddpm", guidance_text=4.0)
    chexgen_eps, full_eps = ref_trace[0][0], fast[0][0]  # the first step is at t = 999 for both
    assert (chexgen_eps[:, 3] - full_eps[:, 3]).abs().max() > 1e-2
    assert (chexgen_eps[:, :3] - full_eps[:, :3]).abs().max() > 1e-2
    close(chexgen_eps[:, 4:], full_eps[:, 4:])  # the variance is the conditional row's in both


def test_chexgen_sampler_reproduces_chexgen_control_unguided(monkeypatch):
    pipe, original = build(control=True)
    ctrl = control_images(2)
    steps = 6
    expected, ref_trace = chexgen_sample(original, pipe, PROMPTS, gens(7, 8), steps, control=ctrl)
    got, trace = chexforge_sample(pipe, monkeypatch, prompts=PROMPTS, generators=gens(7, 8), size=LATENT * 8, steps=steps,
                                  control=ctrl, sampler="chexgen")
    close(trace[0][0], ref_trace[0][0])
    close(trace[0][1], ref_trace[0][1])
    close(got, expected)
    # The control branch is live: without the control image the result differs.
    plain, _ = chexgen_sample(original.base_model, pipe, PROMPTS, gens(7, 8), steps, cfg_scale=1.0)
    assert (plain - expected).abs().max() > 1e-2
    # Guidance asked of ChexGen's control sampler is refused rather than silently dropped.
    with pytest.raises(UserError, match="no guidance to a control model"):
        pipe.sample(PROMPTS, gens(7, 8), LATENT * 8, control=ctrl, steps=2, sampler="chexgen", guidance_text=4.0)


def test_respacing_is_iddpms():
    """The visited steps: IDDPM's accumulated stride (100 steps: 0, 10, 20, ..., 989, 999)."""
    for count in (1, 2, 5, 8, 10, 50, 100, 250, 1000):
        assert schedulers.space_timesteps(1000, count) == ChexGenDiffusion(count, True).timestep_map
    hundred = schedulers.space_timesteps(1000, 100)
    assert len(hundred) == 100 and hundred[:3] == [0, 10, 20] and hundred[-1] == 999
    sched = schedulers.sampler("chexgen", schedulers.train_scheduler(True).config)
    sched.set_timesteps(100)
    assert sched.timesteps.tolist() == hundred[::-1] and schedulers.uses_variance(sched)
