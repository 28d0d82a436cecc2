"""A small, independent re-implementation of ChexGen's original DiT layout, for conversion tests.

Written from the architecture's published description (PixArt-α blocks with fused self-attention
qkv, cross-attention q_linear/kv_linear, a per-block shift/scale/gate table, adaLN-single
`t_block`, a T2I final layer; a PixArt-δ style ControlNet of copied blocks), with the original
parameter names. The converter must reproduce its forward exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(dim: int, grid: int, scale: float, base: int) -> np.ndarray:
    pos = np.arange(grid, dtype=np.float64) / (grid / base) / scale
    gw, gh = np.meshgrid(pos, pos)

    def one(d, p):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = np.einsum("m,d->md", p.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], axis=1)


class Attention(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(h, h)
        self.kv_linear = nn.Linear(h, 2 * h)
        self.proj = nn.Linear(h, h)

    def forward(self, x, y, mask=None):
        """`mask` (B, L), 1 = keep: as ChexGen's forward does (masked_select of the kept caption
        tokens, then xformers' block-diagonal attention), row i attends to its own kept tokens only."""
        if mask is not None:
            return torch.cat([self.forward(x[i:i + 1], y[i:i + 1, mask[i] != 0]) for i in range(len(x))])
        b, n, c = x.shape
        q = self.q_linear(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv_linear(y).reshape(b, y.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, i, hidden, o):
        super().__init__()
        self.fc1 = nn.Linear(i, hidden)
        self.fc2 = nn.Linear(hidden, o)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.attn = Attention(h, heads)
        self.cross_attn = CrossAttention(h, heads)
        self.mlp = Mlp(h, 4 * h, h)
        self.shift_scale_gate_table = nn.Parameter(torch.randn(6, h) / h**0.5)

    def forward(self, x, y, t0, mask=None):
        b, _, h = x.shape
        sm, cm, gm, sf, cf, gf = (self.shift_scale_gate_table[None] + t0.reshape(b, 6, -1)).chunk(6, dim=1)
        norm = lambda z: F.layer_norm(z, (h,), eps=1e-6)  # noqa: E731
        x = x + gm * self.attn(norm(x) * (1 + cm) + sm)
        x = x + self.cross_attn(x, y, mask)
        return x + gf * self.mlp(norm(x) * (1 + cf) + sf)


class TimestepEmbedder(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, h), nn.SiLU(), nn.Linear(h, h))

    def forward(self, t):
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class CaptionEmbedder(nn.Module):
    def __init__(self, c, h, tokens):
        super().__init__()
        self.y_proj = Mlp(c, h, h)
        self.register_buffer("y_embedding", torch.randn(tokens, c) / c**0.5)

    def forward(self, y):
        return self.y_proj(y)


class FinalLayer(nn.Module):
    def __init__(self, h, patch, out):
        super().__init__()
        self.linear = nn.Linear(h, patch * patch * out)
        self.shift_scale_table = nn.Parameter(torch.randn(2, h) / h**0.5)

    def forward(self, x, t):
        shift, scale = (self.shift_scale_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift)


class DiT(nn.Module):
    def __init__(self, latent=8, patch=2, cin=4, h=64, depth=3, heads=4, caption=32, tokens=6,
                 learn_sigma=True, pos_embed_scale=2.0):
        super().__init__()
        self.patch, self.cout = patch, cin * (2 if learn_sigma else 1)
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(cin, h, patch, stride=patch)
        grid = latent // patch
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(h, grid, pos_embed_scale, grid)).float()[None],
                                      requires_grad=False)
        self.t_embedder = TimestepEmbedder(h)
        self.y_embedder = CaptionEmbedder(caption, h, tokens)
        self.blocks = nn.ModuleList([Block(h, heads) for _ in range(depth)])
        self.final_layer = FinalLayer(h, patch, self.cout)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))

    def embed(self, x):
        return self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed

    def head(self, x, t, hw):
        x = self.final_layer(x, t)
        p, c = self.patch, self.cout
        x = x.reshape(x.shape[0], hw, hw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, hw * p, hw * p)

    def forward(self, x, t, y, mask=None):
        hw = x.shape[-1] // self.patch
        x = self.embed(x)
        t = self.t_embedder(t)
        t0 = self.t_block(t)
        y = self.y_embedder(y)
        for block in self.blocks:
            x = block(x, y, t0, mask)
        return self.head(x, t, hw)


class ControlUnit(nn.Module):
    def __init__(self, block: Block, h: int, first: bool):
        super().__init__()
        self.copied_block = block
        if first:
            self.before_proj = nn.Linear(h, h)
        self.after_proj = nn.Linear(h, h)


class ControlDiT(nn.Module):
    def __init__(self, base: DiT, n: int):
        super().__init__()
        import copy

        self.base_model = base
        h = base.pos_embed.shape[-1]
        self.controlnet = nn.ModuleList([ControlUnit(copy.deepcopy(base.blocks[i]), h, i == 0) for i in range(n)])

    def forward(self, x, t, y, c, mask=None):
        b = self.base_model
        hw = x.shape[-1] // b.patch
        x, c = b.embed(x), b.embed(c)
        t = b.t_embedder(t)
        t0 = b.t_block(t)
        y = b.y_embedder(y)
        x = b.blocks[0](x, y, t0, mask)
        for i, unit in enumerate(self.controlnet):
            c = unit.copied_block(x + unit.before_proj(c), y, t0, mask) if i == 0 else unit.copied_block(c, y, t0, mask)
            x = b.blocks[i + 1](x + unit.after_proj(c), y, t0, mask)
        for block in b.blocks[len(self.controlnet) + 1:]:
            x = block(x, y, t0, mask)
        return b.head(x, t, hw)


def randomize(module: nn.Module, seed: int = 0) -> None:
    """Non-zero weights everywhere, so a wrong mapping cannot hide behind zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("pos_embed"):
                continue
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.05))
