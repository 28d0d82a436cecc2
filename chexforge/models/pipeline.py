"""The guided diffusion pipeline: transformer (+ control branch), text encoder, VAE, schedules.

A pipeline lives in a local folder in the `save_pretrained` layout:

    model_index.json          what is where ("_class_name": "ChexforgePipeline")
    transformer/              diffusers PixArtTransformer2DModel (config.json + safetensors)
    controlnet/               the control branch (config.json + model.safetensors), if any
    text_encoder/             open_clip tower or T5 encoder (+ tokenizer), chexforge_text.json
    vae/                      diffusers AutoencoderKL
    scheduler/                the training noise schedule (scheduler_config.json)
    null_embedding.safetensors  the learned unconditional caption (tokens × dim)
    chexforge.json            conditioning settings (demographic prefix, guidance defaults)

Nothing is fetched from a hub: every component loads from the folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # chexforge never reaches a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel  # noqa: E402

from .. import __version__  # noqa: E402
from ..errors import UserError  # noqa: E402
from . import schedulers  # noqa: E402
from . import vae as vae_ops
from .folder import CLASS_NAME, read_folder_json, read_model_index  # noqa: E402
from .text import TextEncoder, load_text_encoder  # noqa: E402
from .transformer import ControlBranch, GuidedTransformer  # noqa: E402
from .weights import load_state_dict, save_state_dict  # noqa: E402


@dataclass
class Conditioning:
    """How a job becomes text: ChexGen puts demographics in front of the report."""

    prefix: str = "chexgen"  # chexgen: "sex:Male, age:71, race:Black. <report>"; none: the prompt alone
    guidance_text: float = 4.0
    guidance_control: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)
    sampler: str = "dpm++"  # the sampler used when none is asked for (import-chexgen: "chexgen")


def demographic_prefix(job: dict[str, Any], style: str) -> str:
    """The one prompt prefix of training captions and sampling prompts alike. A missing value
    (None, NaN as pandas reads an empty manifest cell, or an empty string) is left out, so a
    caption built from a manifest equals the prompt the sampler builds for the same job."""
    if style == "none":
        return ""
    parts = []
    if job.get("sex") in ("F", "M"):
        parts.append(f"sex:{'Female' if job['sex'] == 'F' else 'Male'}")
    if _given(job.get("age")):
        parts.append(f"age:{int(job['age'])}")
    if _given(job.get("race")):
        parts.append(f"race:{job['race']}")
    return (", ".join(parts) + ". ") if parts else ""


def _given(v: Any) -> bool:
    if v is None or (isinstance(v, float) and v != v):  # NaN is not a value
        return False
    return bool(str(v).strip()) and str(v).strip().lower() not in ("nan", "none", "<na>")


class ChexforgePipeline:
    def __init__(self, transformer: GuidedTransformer, vae: AutoencoderKL, text_encoder: TextEncoder,
                 null_embedding: torch.Tensor, train_scheduler: DDPMScheduler, conditioning: Conditioning | None = None):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.null_embedding = null_embedding  # (L, D) in the text encoder's space
        self.train_scheduler = train_scheduler
        self.conditioning = conditioning or Conditioning()
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    # ---- construction, saving, loading ---------------------------------------------------------

    @classmethod
    def build(cls, transformer: GuidedTransformer, vae: AutoencoderKL, text_encoder: TextEncoder,
              conditioning: Conditioning | None = None, seed: int = 0) -> ChexforgePipeline:
        if transformer.config.caption_channels != text_encoder.dim:
            raise ValueError(f"transformer takes {transformer.config.caption_channels}-d captions, the text encoder gives {text_encoder.dim}")
        g = torch.Generator().manual_seed(seed)
        null = torch.randn(text_encoder.max_length, text_encoder.dim, generator=g) / text_encoder.dim**0.5
        return cls(transformer, vae, text_encoder, null, schedulers.train_scheduler(transformer.config.learn_sigma), conditioning)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.transformer.base.save_pretrained(folder / "transformer", safe_serialization=True)
        if self.transformer.control is not None:
            (folder / "controlnet").mkdir(exist_ok=True)
            save_state_dict(self.transformer.control.state_dict(), folder / "controlnet" / "model.safetensors")
            (folder / "controlnet" / "config.json").write_text(json.dumps({"blocks": len(self.transformer.control)}))
        self.text_encoder.save(folder / "text_encoder")
        self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        self.train_scheduler.save_pretrained(folder / "scheduler")
        save_state_dict({"null_embedding": self.null_embedding}, folder / "null_embedding.safetensors")
        c = self.conditioning
        (folder / "chexforge.json").write_text(json.dumps(
            {"prefix": c.prefix, "guidance_text": c.guidance_text, "guidance_control": c.guidance_control,
             "sampler": c.sampler, "extra": c.extra, "chexforge_version": __version__}, indent=1))
        index = {"_class_name": CLASS_NAME, "_chexforge_version": __version__,
                 "transformer": ["diffusers", "PixArtTransformer2DModel"],
                 "controlnet": ["chexforge", "ControlBranch"] if self.transformer.control is not None else [None, None],
                 "text_encoder": ["chexforge", type(self.text_encoder).__name__],
                 "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"]}
        (folder / "model_index.json").write_text(json.dumps(index, indent=1))

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> ChexforgePipeline:
        folder = Path(folder)
        index = read_model_index(folder)
        if index.get("_class_name") != CLASS_NAME:
            raise UserError(f"model_index.json names {index.get('_class_name')!r}, not a chexforge pipeline "
                            "(diffusers pipelines run through the text-only path)", folder)
        try:
            base = PixArtTransformer2DModel.from_pretrained(folder / "transformer", local_files_only=True, low_cpu_mem_usage=False)
            vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True, low_cpu_mem_usage=False)
            train = DDPMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"a pipeline component is missing or unreadable ({e})", folder) from None
        control = None
        if (folder / "controlnet" / "config.json").is_file():
            blocks = read_folder_json(folder / "controlnet", "config.json").get("blocks")
            control = ControlBranch(base, blocks)
            _load_strict(control, load_state_dict(folder / "controlnet" / "model.safetensors"), folder / "controlnet")
        text = load_text_encoder(folder / "text_encoder")
        null = load_state_dict(folder / "null_embedding.safetensors")["null_embedding"]
        meta = read_folder_json(folder, "chexforge.json", default={})
        cond = Conditioning(prefix=meta.get("prefix", "chexgen"), guidance_text=meta.get("guidance_text", 4.0),
                            guidance_control=meta.get("guidance_control", 1.0), extra=meta.get("extra", {}),
                            sampler=meta.get("sampler", "dpm++"))
        pipe = cls(GuidedTransformer(base, control), vae, text, null, train, cond)
        return pipe.to(device)

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> ChexforgePipeline:
        self.device = torch.device(device)
        self.dtype = dtype
        for module in (self.transformer, self.vae, self.text_encoder):
            module.to(self.device).eval()
        self.null_embedding = self.null_embedding.to(self.device)
        return self

    def parameters_hash(self) -> str:
        """A content hash of every weight (for the manifest's model identity)."""
        import hashlib

        h = hashlib.sha256()
        for module in (self.transformer, self.vae, self.text_encoder):
            for name, t in sorted(module.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(self.null_embedding.detach().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # ---- conditioning ---------------------------------------------------------------------------

    def prompts_for(self, jobs: Sequence[dict[str, Any]]) -> list[str]:
        return [demographic_prefix(j, self.conditioning.prefix) + str(j.get("prompt") or "") for j in jobs]

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        emb, keep = self.text_encoder.encode(prompts)
        return emb.float(), keep.float()

    def null_text(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.null_embedding.float()[None].expand(n, -1, -1)
        return emb, torch.ones(emb.shape[:2], device=emb.device)

    # ---- sampling -------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, prompts: list[str], generators: list[torch.Generator], size: int,
               control: torch.Tensor | None = None, steps: int | None = None, sampler: str | None = None,
               guidance_text: float | None = None, guidance_control: float | None = None,
               control_strength: float = 1.0, vae_slice: int = 4, autocast: bool = False,
               init: torch.Tensor | None = None, init_strength: float = 1.0) -> np.ndarray:
        """Images (B, size, size) float32 in [0, 1].

        `init` (B, 3, size, size) in [-1, 1] with `init_strength` < 1: partial denoising from those
        images, as diffusers' img2img does (`_init_latents`); without it, sampling from noise.

        One `torch.Generator` per prompt: a job's noise, hence its pixels, does not depend on the
        other jobs in the batch. Classifier-free guidance runs as one batched forward: (text,
        control) and (null text, control) rows, plus (null text, no control) rows when the control
        guidance scale is not 1: eps = e_nn + s_c (e_nc - e_nn) + s_t (e_tc - e_nc).

        `sampler`: None takes the model's (`conditioning.sampler`). "chexgen" reproduces ChexGen's
        tools/sample.py and tools/sample_control.py exactly (docs/diffusion.md): the null caption
        gets the prompt's attention mask, only latent channels 0-2 are guided (the rest, channel 3
        and the variance, are the conditional row's), a control model is not guided at all, and
        its control latents are a draw from the VAE posterior, not the mean.
        """
        n = len(prompts)
        sampler = sampler or self.conditioning.sampler
        faithful = sampler == "chexgen"
        # ChexGen's control sampler calls the model on (text, control) and (null, control) rows and
        # returns both outputs unguided, keeping the first: plain conditional sampling.
        unguided = faithful and self.transformer.control is not None
        if unguided and any(s is not None and s != 1.0 for s in (guidance_text, guidance_control)):
            raise UserError("sampler chexgen applies no guidance to a control model (as ChexGen's "
                            "tools/sample_control.py); leave guidance_text/guidance_control unset or use dpm++/ddpm")
        s_t = self.conditioning.guidance_text if guidance_text is None else guidance_text
        s_c = self.conditioning.guidance_control if guidance_control is None else guidance_control
        steps = steps or schedulers.DEFAULT_STEPS[sampler]
        sched = schedulers.sampler(sampler, self.train_scheduler.config)
        sched.set_timesteps(steps, device=self.device)
        latent = size // 8
        c_in = self.transformer.config.in_channels
        x = torch.stack([torch.randn(c_in, latent, latent, generator=g) for g in generators]).to(self.device)
        x = x * sched.init_noise_sigma
        timesteps = sched.timesteps
        if init is not None and init_strength < 1.0:
            x, timesteps = self._init_latents(sched, init, x, init_strength)

        text, text_keep = self.encode_text(prompts)
        null, null_keep = self.null_text(n)
        text, null = _pad_to(text, null.shape[1]), _pad_to(null, text.shape[1])
        text_keep, null_keep = _pad_to(text_keep, null_keep.shape[1]), _pad_to(null_keep, text_keep.shape[1])
        if faithful:  # ChexGen passes the prompts' mask for the whole batch: null row i sees prompt i's length
            null_keep = text_keep
        has_control = control is not None and self.transformer.control is not None
        three = has_control and s_c != 1.0 and not unguided
        rows = 1 if unguided else 3 if three else 2
        emb = torch.cat([text, null, null][:rows])
        keep = torch.cat([text_keep, null_keep, null_keep][:rows])
        cond_latents, strength = None, 1.0
        if has_control:
            # chexgen: ChexGen encodes the control image with latent_dist.sample(); here each job's
            # own generator makes that draw (after its initial noise), so it stays batch-independent.
            z = vae_ops.encode(self.vae, control.to(self.device), sample=faithful, generator=list(generators) if faithful else None)
            cond_latents = torch.cat([z] * rows)
            on = torch.full((n,), float(control_strength), device=self.device)
            strength = torch.cat([on, on, torch.zeros_like(on)][:rows])

        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if autocast else _null_ctx()
        for t in timesteps:
            model_in = sched.scale_model_input(torch.cat([x] * rows), t)
            timestep = t.expand(model_in.shape[0]).to(self.device)
            with ctx:
                out = self.transformer(model_in, timestep, emb, keep, cond_latents, strength).float()
            eps, rest = out[:, :c_in], out[:, c_in:]
            parts = eps.chunk(rows)
            if rows == 1:
                guided = parts[0]
            elif three:
                e_tc, e_nc, e_nn = parts
                guided = e_nn + s_c * (e_nc - e_nn) + s_t * (e_tc - e_nc)
            else:
                e_tc, e_nc = parts
                guided = e_nc + s_t * (e_tc - e_nc)
            if faithful:  # DiT's forward_with_cfg guides channels 0-2; channel 3 keeps the conditional
                guided = torch.cat([guided[:, :3], parts[0][:, 3:]], 1)
            keep_var = rest.shape[1] and schedulers.uses_variance(sched)  # the variance is not guided
            model_out = torch.cat([guided, rest.chunk(rows)[0]], 1) if keep_var else guided
            x = sched.step(model_out, t, x, generator=list(generators), return_dict=False)[0]
        return vae_ops.decode(self.vae, x, vae_slice).cpu().numpy().astype(np.float32)

    def _init_latents(self, sched, init: torch.Tensor, noise: torch.Tensor, strength: float):
        """Start the chain part-way (img2img): the last `round(steps * strength)` of the sampler's
        steps run, from the VAE latents of `init` noised to the first of them with the job's own
        noise draw (so the seed still decides the pixels). No step left: the latents themselves."""
        steps = len(sched.timesteps)
        start = steps - min(steps, int(round(steps * max(strength, 0.0))))
        if hasattr(sched, "set_begin_index"):  # multistep solvers index their sigmas from here
            sched.set_begin_index(start * sched.order)
        timesteps = sched.timesteps[start * sched.order:]
        x0 = vae_ops.encode(self.vae, init.to(self.device)).float()
        if len(timesteps) == 0:
            return x0, timesteps
        return sched.add_noise(x0, noise, timesteps[:1].repeat(len(x0))), timesteps


class _null_ctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pad the token axis (dim 1) with zeros up to `length` (masks pad with 0 = ignore)."""
    if t.shape[1] >= length:
        return t
    pad = torch.zeros(t.shape[0], length - t.shape[1], *t.shape[2:], dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], 1)


def _load_strict(module: torch.nn.Module, state: dict, where: Path) -> None:
    own = module.state_dict()
    for key in own:
        if key not in state:
            raise UserError(f"missing weight {key!r}", where)
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise UserError(f"{key}: shape {tuple(state[key].shape)} in the file, {tuple(own[key].shape)} expected", where)
    extra = sorted(set(state) - set(own))
    if extra:
        raise UserError(f"unexpected weight {extra[0]!r} (and {len(extra) - 1} more)", where)
    module.load_state_dict(state, strict=True)
