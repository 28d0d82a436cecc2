"""The image autoencoder: diffusers' AutoencoderKL in the Stable Diffusion layout.

4 latent channels, 8× down, latents scaled by 0.18215. Radiographs are grayscale: they are
repeated to three channels on the way in and averaged on the way out, so SD-family VAEs
(including the one ChexGen uses) work unchanged.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

SD_SCALE = 0.18215

VAE_PRESETS = {
    "tiny": {"block_out_channels": (16, 16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8},
    # The Stable Diffusion v1 autoencoder shape (weights come from a local folder).
    "sd": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},
}


def build_vae(preset: str = "tiny", sample_size: int = 512) -> AutoencoderKL:
    p = VAE_PRESETS[preset]
    n = len(p["block_out_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=sample_size,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=p["block_out_channels"], layers_per_block=p["layers_per_block"],
        norm_num_groups=p["norm_num_groups"], scaling_factor=SD_SCALE,
    )


def scale_of(vae: AutoencoderKL) -> float:
    return float(getattr(vae.config, "scaling_factor", SD_SCALE) or SD_SCALE)


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) in [0, 1] → (B, 3, H, W) in [-1, 1]."""
    if images.ndim == 3:
        images = images[:, None]
    return images.expand(-1, 3, -1, -1) * 2 - 1


@torch.no_grad()
def encode(vae: AutoencoderKL, rgb: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → scaled latents (B, 4, H/8, W/8); the posterior mean unless `sample`."""
    dist = vae.encode(rgb.to(vae.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return z * scale_of(vae)


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor, slice_size: int = 4) -> torch.Tensor:
    """Scaled latents → (B, H, W) grayscale in [0, 1], decoded `slice_size` at a time to bound memory."""
    out = []
    for chunk in latents.split(max(1, slice_size)):
        rgb = vae.decode(chunk.to(vae.dtype) / scale_of(vae)).sample
        out.append(((rgb.float().mean(1) + 1) / 2).clamp(0, 1))
    return torch.cat(out)
