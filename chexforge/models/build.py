"""Make a fresh (randomly initialised) pipeline from presets, and describe a model folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .folder import CLASS_NAME, read_model_index
from .pipeline import ChexforgePipeline, Conditioning
from .text import TEXT_PRESETS, OpenClipText
from .transformer import PRESETS, GuidedTransformer
from .vae import build_vae


def init_pipeline(preset: str = "tiny", text: str = "tiny", text_weights: str | Path | None = None,
                  vae: str = "tiny", control_blocks: int | None = None, seed: int = 0) -> ChexforgePipeline:
    """A trainable pipeline: the transformer from `preset`, an open_clip text tower (a preset,
    an open_clip config name, optionally with local weights), and a VAE (a preset, or a local
    diffusers AutoencoderKL folder, e.g. Stable Diffusion's)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    torch.manual_seed(seed)
    encoder = OpenClipText.from_open_clip(text, text_weights)
    cfg = dataclasses.replace(PRESETS[preset], caption_channels=encoder.dim)
    if control_blocks is not None:
        cfg.control_blocks = control_blocks
    transformer = GuidedTransformer.from_config(cfg)
    size = cfg.sample_size * 8
    if Path(vae).is_dir():
        from diffusers import AutoencoderKL

        autoencoder = AutoencoderKL.from_pretrained(vae, local_files_only=True, low_cpu_mem_usage=False)
    elif vae in ("tiny", "sd"):
        autoencoder = build_vae(vae, size)
    else:
        raise UserError(f"--vae takes 'tiny', 'sd' or a local AutoencoderKL folder, not {vae!r}")
    return ChexforgePipeline.build(transformer, autoencoder, encoder, Conditioning(), seed)


def describe(folder: Path) -> dict[str, Any]:
    """What a model folder is and which guidance it supports (for `chexforge models info`)."""
    index = read_model_index(folder)
    if index.get("_class_name") != CLASS_NAME:
        comps = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
        return {"folder": str(folder), "kind": f"diffusers pipeline ({index.get('_class_name')})",
                "guidance": "text only (runs as a text-only diffusion backend)",
                "components": {k: ".".join(map(str, v)) for k, v in comps.items()}}
    pipe = ChexforgePipeline.load(folder)
    cfg = pipe.transformer.config

    def count(m: torch.nn.Module) -> str:
        return f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f} M"

    comps = {"transformer": f"PixArt DiT, depth {cfg.depth}, hidden {cfg.hidden}, {cfg.heads} heads, patch {cfg.patch_size} ({count(pipe.transformer.base)})",
             "text_encoder": f"{pipe.text_encoder.kind}, {pipe.text_encoder.max_length} tokens × {pipe.text_encoder.dim} ({count(pipe.text_encoder)})",
             "vae": f"AutoencoderKL, 4 latent channels, scale {pipe.vae.config.scaling_factor} ({count(pipe.vae)})"}
    if pipe.transformer.control is not None:
        comps["controlnet"] = f"{len(pipe.transformer.control)} copied blocks ({count(pipe.transformer.control)})"
    return {"folder": str(folder), "kind": "chexforge pipeline" + (" (imported from ChexGen)" if pipe.conditioning.extra.get("source") == "chexgen" else ""),
            "guidance": "text + masks + boxes (control branch)" if pipe.transformer.control is not None else "text only",
            "resolution": f"{cfg.sample_size * 8}² ({cfg.sample_size}² latents)",
            "learned variance": "yes (8 output channels)" if cfg.learn_sigma else "no",
            "demographic prefix": pipe.conditioning.prefix,
            "default guidance": f"text {pipe.conditioning.guidance_text}, control {pipe.conditioning.guidance_control}",
            "components": comps, "weights hash": pipe.parameters_hash()}


__all__ = ["init_pipeline", "describe", "TEXT_PRESETS"]
