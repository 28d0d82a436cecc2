"""The latent diffusion transformer and its control branch.

The base network is diffusers' `PixArtTransformer2DModel` (PixArt-α blocks: self-attention,
cross-attention to text tokens, adaLN-single timestep modulation; optionally learned variance
with 4 in and 8 out channels). `ControlBranch` is a ControlNet for transformers in the manner of
PixArt-δ and ChexGen: trainable copies of the first N base blocks; the control image, encoded by
the same VAE and patch embedding as the image, enters the first copy through a zero-initialised
projection (`before_proj`); each copy's output leaves through a zero-initialised projection
(`after_proj`) and is added to the input of the next base block. At initialisation the branch
therefore changes nothing.

`GuidedTransformer` runs the base blocks itself (so the control outputs can be added between
them) and otherwise follows the diffusers forward step for step; with no control input it is
numerically the diffusers model (tested).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers import PixArtTransformer2DModel
from torch import nn


@dataclass
class TransformerConfig:
    """The handful of numbers that define a PixArt-style DiT."""

    sample_size: int = 64  # latent side (image side / 8)
    patch_size: int = 2
    in_channels: int = 4
    learn_sigma: bool = True  # 8 output channels: noise and variance
    hidden: int = 1152
    depth: int = 28
    heads: int = 16
    caption_channels: int = 4096
    interpolation_scale: float = 2.0  # ChexGen's pos_embed_scale
    control_blocks: int = 0  # 0 = no control branch

    def to_diffusers(self) -> dict:
        return {
            "num_attention_heads": self.heads,
            "attention_head_dim": self.hidden // self.heads,
            "in_channels": self.in_channels,
            "out_channels": self.in_channels * (2 if self.learn_sigma else 1),
            "num_layers": self.depth,
            "cross_attention_dim": self.hidden,
            "sample_size": self.sample_size,
            "patch_size": self.patch_size,
            "caption_channels": self.caption_channels,
            "interpolation_scale": self.interpolation_scale,
            "use_additional_conditions": False,
            "norm_type": "ada_norm_single",
            "attention_bias": True,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 1000,
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
        }


PRESETS: dict[str, TransformerConfig] = {
    # ChexGen / PixArt-α DiT-XL/2 at 512²: 64×64 latents, T5-XXL captions (120 × 4096).
    "chexgen-xl": TransformerConfig(),
    "chexgen-xl-control": TransformerConfig(control_blocks=13),
    # Small enough to train on a CPU in minutes (tests, smoke runs): 64 px images → 8×8 latents.
    "tiny": TransformerConfig(sample_size=8, hidden=64, depth=4, heads=4, caption_channels=64,
                              interpolation_scale=1.0, learn_sigma=False, control_blocks=2),
    # A laptop-GPU-sized model for 256 px: 32×32 latents.
    "small": TransformerConfig(sample_size=32, hidden=384, depth=12, heads=6, caption_channels=512,
                               interpolation_scale=1.0, learn_sigma=False, control_blocks=4),
}


class ControlBranch(nn.Module):
    """Copies of the first `n` base blocks with zero-initialised input and output projections."""

    def __init__(self, base: PixArtTransformer2DModel, n: int):
        super().__init__()
        if not 0 < n < len(base.transformer_blocks):
            raise ValueError(f"control blocks must be in 1..{len(base.transformer_blocks) - 1}, got {n}")
        dim = base.inner_dim
        self.blocks = nn.ModuleList([copy.deepcopy(base.transformer_blocks[i]) for i in range(n)])
        self.before_proj = nn.Linear(dim, dim)
        self.after_proj = nn.ModuleList([nn.Linear(dim, dim) for _ in range(n)])
        for lin in [self.before_proj, *self.after_proj]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def __len__(self) -> int:
        return len(self.blocks)


class GuidedTransformer(nn.Module):
    """Base DiT plus optional control branch; forward(latents, t, text, control) → model output."""

    def __init__(self, base: PixArtTransformer2DModel, control: ControlBranch | None = None):
        super().__init__()
        self.base = base
        self.control = control

    @classmethod
    def from_config(cls, cfg: TransformerConfig) -> GuidedTransformer:
        base = PixArtTransformer2DModel(**cfg.to_diffusers())
        return cls(base, ControlBranch(base, cfg.control_blocks) if cfg.control_blocks else None)

    @property
    def config(self) -> TransformerConfig:
        c = self.base.config
        return TransformerConfig(
            sample_size=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels,
            learn_sigma=c.out_channels == 2 * c.in_channels, hidden=self.base.inner_dim, depth=c.num_layers,
            heads=c.num_attention_heads, caption_channels=c.caption_channels,
            interpolation_scale=float(c.interpolation_scale or 1.0),
            control_blocks=len(self.control) if self.control is not None else 0)

    def enable_gradient_checkpointing(self) -> None:
        self.base.enable_gradient_checkpointing()
        self._checkpoint = True

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None = None, control: torch.Tensor | None = None,
                control_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """`latents` (B, C, h, w); `text` (B, L, caption_channels); `text_mask` (B, L) 1 = keep;
        `control` (B, C, h, w) the control image's latents, or None. `control_scale` may be a
        (B,) tensor (0 switches control off for those rows, as classifier-free guidance needs)."""
        m = self.base
        p = m.config.patch_size
        b = latents.shape[0]
        height, width = latents.shape[-2] // p, latents.shape[-1] // p
        bias = None
        if text_mask is not None:  # keep-mask → additive bias, as diffusers does
            bias = ((1 - text_mask.to(latents.dtype)) * -10000.0).unsqueeze(1)

        x = m.pos_embed(latents)
        t, embedded_t = m.adaln_single(timestep, None, batch_size=b, hidden_dtype=x.dtype)
        y = m.caption_projection(text).view(b, -1, x.shape[-1])

        def run(block, h):
            if torch.is_grad_enabled() and getattr(self, "_checkpoint", False):
                return torch.utils.checkpoint.checkpoint(
                    block, h, None, y, bias, t, None, None, use_reentrant=False)
            return block(h, attention_mask=None, encoder_hidden_states=y, encoder_attention_mask=bias,
                         timestep=t, cross_attention_kwargs=None, class_labels=None)

        blocks = m.transformer_blocks
        if control is None or self.control is None:
            for block in blocks:
                x = run(block, x)
        else:
            scale = torch.as_tensor(control_scale, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
            c = m.pos_embed(control)  # same patch embedding (and positions) as the image
            x = run(blocks[0], x)
            for i, copy_block in enumerate(self.control.blocks):
                c = run(copy_block, x + self.control.before_proj(c)) if i == 0 else run(copy_block, c)
                x = run(blocks[i + 1], x + scale * self.control.after_proj[i](c))
            for block in blocks[len(self.control) + 1:]:
                x = run(block, x)

        shift, scale_out = (m.scale_shift_table[None] + embedded_t[:, None].to(m.scale_shift_table.device)).chunk(2, dim=1)
        x = m.norm_out(x) * (1 + scale_out) + shift
        x = m.proj_out(x)
        x = x.reshape(-1, height, width, p, p, m.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(-1, m.out_channels, height * p, width * p)
