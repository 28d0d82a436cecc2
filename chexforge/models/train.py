"""Training a chexforge pipeline: cached latents, AdamW, EMA, caption dropout, resumable.

The run folder holds:

    cache/      VAE latents of every image and of its control image, and text embeddings
                (computed once; the VAE and text encoder are frozen)
    checkpoints/step-NNNNNNN/   model, EMA, optimizer, RNG state (safetensors + JSON), written
                to a temporary folder and renamed, so a kill never leaves a half checkpoint
    model/      the pipeline with the EMA weights, ready for `backend: diffusion`

Loss: mean squared error on the predicted noise, plus the variational bound term for the
variance when the transformer learns it (Improved DDPM's hybrid loss, as PixArt trains).
10 % of captions are replaced by the learned null caption (classifier-free guidance), and 10 %
of control images by the empty one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..contracts.images import read_gray
from ..contracts.limits import load_json
from ..devices import torch_device
from ..errors import UserError
from . import control_image
from . import vae as vae_ops
from .data import Example, read_examples
from .folder import read_folder_json
from .pipeline import ChexforgePipeline
from .weights import load_state_dict, save_state_dict


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema: float = 0.9999
    ema_warmup: bool = True  # decay min(ema, (1+step)/(10+step)): a short run exports trained weights
    caption_dropout: float = 0.1
    control_dropout: float = 0.1
    save_every: int = 500
    keep: int = 2
    seed: int = 0
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    freeze_base: bool = False  # train the control branch only (ControlNet-style)
    vae_steps: int = 0  # first fit the VAE to the images (for models without a pretrained VAE)
    device: str = "auto"


# ---- the cache --------------------------------------------------------------------------------


def build_cache(pipe: ChexforgePipeline, examples: list[Example], folder: Path, size: int,
                progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """Encode every image, control image and caption once (the cache key is the example list)."""
    key = _cache_key(examples, size, pipe)
    path = folder / f"cache-{key}.safetensors"
    if path.exists():
        return load_state_dict(path)
    lat, ctl, txt, keep = [], [], [], []
    chunk = 8
    has_control = pipe.transformer.control is not None
    for i in range(0, len(examples), chunk):
        part = examples[i:i + chunk]
        images = torch.from_numpy(np.stack([read_gray(e.image, size) for e in part])).to(pipe.device)
        lat.append(vae_ops.encode(pipe.vae, vae_ops.to_rgb(images)).cpu())
        if has_control:
            drawn = [control_image.draw(size, e.boxes, {k: read_gray(v, size) > 0.5 for k, v in e.masks.items()}) for e in part]
            ctl.append(vae_ops.encode(pipe.vae, control_image.to_tensor(drawn).to(pipe.device)).cpu())
        emb, k = pipe.encode_text(pipe.prompts_for([{**e.job, "prompt": e.prompt} for e in part]))
        txt.append(emb.half().cpu())
        keep.append(k.cpu())
        if progress:
            progress(min(i + chunk, len(examples)), len(examples))
    cache = {"latents": torch.cat(lat), "text": torch.cat(txt), "keep": torch.cat(keep)}
    if has_control:
        cache["control"] = torch.cat(ctl)
        empty = control_image.to_tensor([control_image.draw(size)]).to(pipe.device)
        cache["empty_control"] = vae_ops.encode(pipe.vae, empty).cpu()
    save_state_dict(cache, path)
    return load_state_dict(path)  # the fresh and the resumed run train on the very same tensors


def _cache_key(examples: list[Example], size: int, pipe: ChexforgePipeline) -> str:
    import hashlib

    h = hashlib.sha256(f"{size}|{pipe.conditioning.prefix}|{pipe.text_encoder.kind}".encode())
    # The latents are stored scaled: a VAE with another scaling factor (a refit, or one loaded
    # from elsewhere) must not be served these latents, even with equal weights.
    h.update(f"|scale={vae_ops.scale_of(pipe.vae)!r}".encode())
    for _, t in sorted(pipe.vae.state_dict().items()):  # latents belong to one VAE
        h.update(t.detach().cpu().contiguous().numpy().tobytes()[:4096])
    for e in examples:
        st = e.image.stat() if e.image.exists() else None
        h.update(f"{e.image}|{st.st_size if st else -1}|{e.prompt}|{json.dumps(e.boxes, sort_keys=True)}|{sorted(map(str, e.masks.values()))}".encode())
    return h.hexdigest()[:12]


# ---- checkpoints ------------------------------------------------------------------------------


def latest_checkpoint(run: Path) -> Path | None:
    ckpts = sorted((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []
    ckpts = [c for c in ckpts if (c / "state.json").is_file()]
    return ckpts[-1] if ckpts else None


def _trainable(pipe: ChexforgePipeline, cfg: TrainConfig) -> dict[str, torch.nn.Parameter]:
    params = {}
    for name, p in pipe.transformer.named_parameters():
        if cfg.freeze_base and name.startswith("base."):
            p.requires_grad_(False)
            continue
        params[f"transformer.{name}"] = p
    params["null_embedding"] = pipe.null_embedding
    return params


def save_checkpoint(run: Path, step: int, params: dict, ema: dict, opt: torch.optim.Optimizer, rng: np.random.Generator,
                    noise_rng: torch.Generator, cfg: TrainConfig, losses: list[float]) -> Path:
    final = run / "checkpoints" / f"step-{step:07d}"
    tmp = run / "checkpoints" / f".tmp-step-{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_state_dict({k: p.detach() for k, p in params.items()}, tmp / "model.safetensors")
    save_state_dict(ema, tmp / "ema.safetensors")
    torch.save(_optimizer_tensors(opt), tmp / "optimizer.pt")
    state = {"step": step, "config": asdict(cfg), "numpy_rng": rng.bit_generator.state,
             "noise_rng": noise_rng.get_state().tolist(), "losses": losses[-1000:]}
    (tmp / "state.json").write_text(json.dumps(state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted((run / "checkpoints").glob("step-*"))[:-cfg.keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict:
    """The optimizer state as plain tensors and numbers (loadable with weights_only=True)."""
    sd = opt.state_dict()
    return {"state": {int(k): {n: (v if torch.is_tensor(v) else torch.tensor(v)) for n, v in s.items()}
                      for k, s in sd["state"].items()},
            "param_groups": json.dumps(sd["param_groups"])}


def _load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    raw = torch.load(path, map_location="cpu", weights_only=True)
    opt.load_state_dict({"state": raw["state"], "param_groups": load_json(raw["param_groups"], path, "the optimizer state")})


# ---- the loop ---------------------------------------------------------------------------------


def train(pipe: ChexforgePipeline, data: str | Path, run: str | Path, cfg: TrainConfig, image_root: str | Path | None = None,
          on_step: Callable[[int, float], None] | None = None, on_cache: Callable[[int, int], None] | None = None) -> list[float]:
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    device = torch_device(cfg.device)
    pipe.to(device)
    size = pipe.transformer.config.sample_size * 8
    examples = read_examples(data, image_root)
    if cfg.vae_steps:
        fit_vae(pipe, examples, run / "vae", size, cfg, on_cache)
    cache = {k: v.to(device) for k, v in build_cache(pipe, examples, run / "cache", size, on_cache).items()}
    n = cache["latents"].shape[0]

    pipe.null_embedding = torch.nn.Parameter(pipe.null_embedding.detach().clone().float())
    pipe.transformer.train()
    if cfg.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    params = _trainable(pipe, cfg)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = {k: p.detach().clone() for k, p in params.items()}
    rng = np.random.default_rng(cfg.seed)  # batches, timesteps, dropout
    noise_rng = torch.Generator().manual_seed(cfg.seed)  # diffusion noise (own generator: resumable)
    step, losses = 0, []

    ckpt = latest_checkpoint(run)
    if ckpt is not None:
        state = read_folder_json(ckpt, "state.json")
        weights = load_state_dict(ckpt / "model.safetensors")
        with torch.no_grad():
            for k, p in params.items():
                if k not in weights or weights[k].shape != p.shape:
                    raise UserError(f"the checkpoint does not fit this model ({k})", ckpt)
                p.copy_(weights[k].to(p))
        ema = {k: v.to(device) for k, v in load_state_dict(ckpt / "ema.safetensors").items()}
        _load_optimizer(opt, ckpt / "optimizer.pt")
        rng.bit_generator.state = state["numpy_rng"]
        noise_rng.set_state(torch.tensor(state["noise_rng"], dtype=torch.uint8))
        step, losses = state["step"], state["losses"]

    sched = pipe.train_scheduler
    ac = sched.alphas_cumprod.to(device)
    learn_sigma = pipe.transformer.config.learn_sigma
    c_in = pipe.transformer.config.in_channels
    autocast = device.type == "cuda"
    while step < cfg.steps:
        idx = torch.from_numpy(rng.integers(0, n, size=min(cfg.batch_size, n))).to(device)
        x0 = cache["latents"][idx].float()
        text, keep = cache["text"][idx].float(), cache["keep"][idx].float()
        drop = torch.from_numpy(rng.random(len(idx)) < cfg.caption_dropout).to(device)
        null, null_keep = pipe.null_embedding[None].expand(len(idx), -1, -1), torch.ones_like(keep)
        text = torch.where(drop[:, None, None], null.to(text.dtype), text)
        keep = torch.where(drop[:, None], null_keep, keep)
        control = None
        if "control" in cache:
            control = cache["control"][idx].float()
            cdrop = torch.from_numpy(rng.random(len(idx)) < cfg.control_dropout).to(device)
            control = torch.where(cdrop[:, None, None, None], cache["empty_control"].float().expand_as(control), control)
        t = torch.from_numpy(rng.integers(0, sched.config.num_train_timesteps, size=len(idx))).to(device)
        noise = torch.randn(x0.shape, generator=noise_rng).to(device)
        xt = sched.add_noise(x0, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = pipe.transformer(xt, t, text, keep, control).float()
        loss = torch.nn.functional.mse_loss(out[:, :c_in], noise)
        if learn_sigma:
            loss = loss + vlb_loss(out[:, c_in:], out[:, :c_in].detach(), x0, xt, t, sched.betas.to(device), ac)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        opt.step()
        decay = ema_decay(cfg, step)
        with torch.no_grad():
            for k, p in params.items():
                ema[k].lerp_(p.detach(), 1 - decay)
        step += 1
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step, losses[-1])
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(run, step, params, ema, opt, rng, noise_rng, cfg, losses)
    export_ema(pipe, params, ema, run / "model")
    return losses


def ema_decay(cfg: TrainConfig, step: int) -> float:
    """The EMA decay of update `step` (0-based). With the warm-up (as in common diffusion training
    code), early updates average over the steps so far rather than over 1/(1-ema) steps: with a
    constant 0.9999, 500 steps leave 95 % of the initial (random) weights in the EMA."""
    return min(cfg.ema, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema


@dataclass
class EmaStatus:
    steps: int
    initial_weight: float  # share of the initial weights still in the EMA
    horizon: float  # 1/(1-decay) of the last update: the steps it averages over
    lagging: bool

    def describe(self) -> str:
        return (f"EMA weights (last decay {1 - 1 / self.horizon:.4g}, averaging about the last {self.horizon:,.0f} "
                f"steps; {100 * self.initial_weight:.3g} % initial weights)")


def ema_status(cfg: TrainConfig, steps: int) -> EmaStatus:
    """How far the exported EMA weights are from the trained ones after `steps` updates. They lag
    when they average over more steps than ran, or keep over 1 % of the initial weights."""
    log_w, decay = 0.0, 0.0
    for s in range(steps):
        decay = ema_decay(cfg, s)
        log_w += math.log(decay) if decay > 0 else -math.inf
    horizon = 1 / (1 - decay) if decay < 1 else math.inf
    w = math.exp(log_w) if steps else 1.0
    return EmaStatus(steps, w, horizon, horizon > steps or w > 0.01)


def fit_vae(pipe: ChexforgePipeline, examples: list[Example], folder: Path, size: int, cfg: TrainConfig,
            progress: Callable[[int, int], None] | None = None) -> None:
    """Fit the autoencoder to the training images (reconstruction + a light KL term), once per run.

    For models made with `chexforge models init` (random VAE); models with a pretrained VAE
    (Stable Diffusion's, as ChexGen uses) skip this. The fitted VAE is kept in the run folder,
    so a resumed run reuses it rather than fitting again.
    """
    from diffusers import AutoencoderKL

    if (folder / "config.json").is_file():  # fitted (and scaled) earlier in this run
        pipe.vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False).to(pipe.device).eval()
        return
    images = torch.from_numpy(np.stack([read_gray(e.image, size) for e in examples]))
    vae = pipe.vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.vae_steps):
        idx = torch.randint(0, len(images), (min(cfg.batch_size, len(images)),), generator=g)
        x = vae_ops.to_rgb(images[idx]).to(pipe.device)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(g if pipe.device.type == "cpu" else None)).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            progress(step + 1, cfg.vae_steps)
    vae.eval()
    # Stable Diffusion's 0.18215 is 1/std of *its* VAE's latents; a VAE fitted here has latents of
    # another spread (about 0.93 for the tiny VAE on DRR images, giving cached latents of std 0.17,
    # a near-silent signal against unit noise). Set the factor as SD did: 1/std of the latents of
    # the training set (posterior means, as the cache encodes them), so the diffusion model sees
    # unit-variance latents. It is saved in the VAE's config.json and so travels with the model.
    vae.register_to_config(scaling_factor=latent_scale(vae, images, pipe.device))
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


@torch.no_grad()
def latent_scale(vae, images: torch.Tensor, device: torch.device) -> float:
    """1/std of the unscaled posterior-mean latents of `images` (N, H, W) in [0, 1]."""
    z = torch.cat([vae.encode(vae_ops.to_rgb(images[i:i + 16]).to(device)).latent_dist.mean.float().cpu()
                   for i in range(0, len(images), 16)])
    return float(1.0 / z.std().clamp_min(1e-6))


def export_ema(pipe: ChexforgePipeline, params: dict, ema: dict, folder: Path) -> None:
    """Write the pipeline with the EMA weights (atomically: temp folder, then rename)."""
    backup = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(ema[k])
    pipe.transformer.eval()
    null = pipe.null_embedding
    pipe.null_embedding = null.detach().clone()
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    pipe.null_embedding = null
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(backup[k])


def vlb_loss(v: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
             betas: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """Improved-DDPM variational bound for the learned variance (mean from the detached noise)."""
    ac_prev = torch.cat([torch.ones(1, device=ac.device), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_log = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    coef0 = betas * ac_prev.sqrt() / (1 - ac)
    coef1 = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)
    shape = (-1, 1, 1, 1)
    g = lambda a: a[t].view(shape)  # noqa: E731
    true_mean = g(coef0) * x0 + g(coef1) * xt
    frac = (v + 1) / 2
    model_log = frac * g(torch.log(betas)) + (1 - frac) * g(post_log)
    x0_pred = (xt - g((1 - ac).sqrt()) * eps) / g(ac.sqrt())
    model_mean = g(coef0) * x0_pred + g(coef1) * xt
    true_log = g(post_log)
    kl = 0.5 * (-1.0 + model_log - true_log + torch.exp(true_log - model_log)
                + (true_mean - model_mean) ** 2 * torch.exp(-model_log))
    return kl.mean() / math.log(2.0)
