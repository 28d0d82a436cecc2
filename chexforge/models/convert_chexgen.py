"""Convert ChexGen's released checkpoints into a chexforge pipeline folder.

ChexGen (arXiv 2509.03903) releases `torch.save` dicts with `state_dict` and `state_dict_ema`
for a PixArt-α style DiT (DiT-XL/2: depth 28, hidden 1152, 16 heads, patch 2; 512² images are
64×64 latents with positional-embedding scale 2) conditioned on T5-XXL captions (120 × 4096),
and a control variant whose keys prefix the base with `base_model.` and add a ControlNet of
13 copied blocks. The conversion is strict: every key is used, every shape checked, and the
first mismatch is named. Checkpoints load with `torch.load(weights_only=True)`.

Key map (ChexGen → diffusers PixArtTransformer2DModel / chexforge):

    x_embedder.proj.*                  → pos_embed.proj.*
    pos_embed                          → checked against the sin-cos table diffusers computes
    t_embedder.mlp.{0,2}.*             → adaln_single.emb.timestep_embedder.linear_{1,2}.*
    t_block.1.*                        → adaln_single.linear.*
    y_embedder.y_proj.fc{1,2}.*        → caption_projection.linear_{1,2}.*
    y_embedder.y_embedding             → the pipeline's null (unconditional) caption
    blocks.N.attn.qkv.*                → transformer_blocks.N.attn1.to_{q,k,v}.* (split in 3)
    blocks.N.attn.proj.*               → transformer_blocks.N.attn1.to_out.0.*
    blocks.N.cross_attn.q_linear.*     → transformer_blocks.N.attn2.to_q.*
    blocks.N.cross_attn.kv_linear.*    → transformer_blocks.N.attn2.to_{k,v}.* (split in 2)
    blocks.N.cross_attn.proj.*         → transformer_blocks.N.attn2.to_out.0.*
    blocks.N.mlp.fc{1,2}.*             → transformer_blocks.N.ff.net.{0.proj,2}.*
    blocks.N.shift_scale_gate_table    → transformer_blocks.N.scale_shift_table
    final_layer.linear.*               → proj_out.*
    final_layer.shift_scale_table      → scale_shift_table
    controlnet.N.copied_block.<block>  → control.blocks.N.<block, mapped as above>
    controlnet.0.before_proj.*         → control.before_proj.*
    controlnet.N.after_proj.*          → control.after_proj.N.*

(`scale_shift_table`, PixArt's own spelling of the two tables, is accepted too.)

Half-precision files (every tensor fp16 or bf16, as ChexGen itself loads them) convert to float32
weights; `pos_embed`, stored in that precision, is compared with the sin-cos table rounded to it.
Every failure is a `UserError`: one line naming the checkpoint and what was expected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .transformer import GuidedTransformer, TransformerConfig
from .weights import load_state_dict


@dataclass
class Converted:
    transformer: GuidedTransformer
    null_embedding: torch.Tensor  # (tokens, caption_channels)
    config: TransformerConfig
    source_keys: int
    used_ema: bool


def read_checkpoint(path: str | Path, ema: bool = True) -> tuple[dict[str, torch.Tensor], bool]:
    obj = load_state_dict(path)
    want = "state_dict_ema" if ema else "state_dict"
    if want in obj and isinstance(obj[want], dict):
        sd = obj[want]
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        if ema:
            raise UserError("the checkpoint has no state_dict_ema; convert the raw weights with --no-ema", path)
        sd = obj["state_dict"]
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, ema = obj, False  # a bare state dict
    else:
        raise UserError(f"expected a dict with state_dict / state_dict_ema, found keys {sorted(map(str, obj))[:5]}", path)
    bad = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UserError(f"{bad!r} is a {type(sd[bad]).__name__}, not a tensor: not a ChexGen state dict", path)
    return {str(k).removeprefix("module."): v for k, v in sd.items()}, ema


def infer_config(sd: dict[str, torch.Tensor], heads: int, where: str) -> TransformerConfig:
    need = ["x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.y_proj.fc1.weight", "pos_embed"]
    for k in need:
        if k not in sd:
            raise UserError(f"missing key {k!r}: not a ChexGen/PixArt DiT checkpoint", where)
    w = sd["x_embedder.proj.weight"]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise UserError(f"x_embedder.proj.weight: shape {tuple(w.shape)}, expected (hidden, channels, patch, patch)", where)
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth < 1:
        raise UserError("no blocks.N.* keys: not a ChexGen/PixArt DiT checkpoint", where)
    out_ch = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    if heads < 1 or hidden % heads:
        raise UserError(f"hidden size {hidden} is not divisible by {heads} heads (pass --heads)", where)
    pos = sd["pos_embed"]
    grid = int(round(pos.shape[-2] ** 0.5)) if pos.ndim >= 2 else 0
    if pos.ndim not in (2, 3) or grid * grid != pos.shape[-2] or pos.shape[-1] != hidden:
        raise UserError(f"pos_embed: shape {tuple(pos.shape)}, expected (1, tokens, {hidden}) on a square grid", where)
    control = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"controlnet\.(\d+)\.", k))), default=-1)
    if control >= depth:
        # The copies feed base blocks 1..N (block 0 runs before them), so N < depth.
        raise UserError(f"{control} control blocks (controlnet.0-{control - 1}) for {depth} base blocks: a ChexGen "
                        f"ControlNet copies at most {depth - 1} (depth - 1) blocks", where)
    return TransformerConfig(sample_size=grid * patch, patch_size=patch, in_channels=in_ch,
                             learn_sigma=out_ch == 2 * in_ch, hidden=hidden, depth=depth, heads=heads,
                             caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1],
                             control_blocks=max(control, 0))


def _block_map(src: str, dst: str) -> list[tuple[str, str, int | None, int | None]]:
    """(source key, target key, split index, parts) for one transformer block."""
    rows = []
    for p in ("weight", "bias"):
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            rows.append((f"{src}.attn.qkv.{p}", f"{dst}.attn1.{name}.{p}", i, 3))
        rows.append((f"{src}.attn.proj.{p}", f"{dst}.attn1.to_out.0.{p}", None, None))
        rows.append((f"{src}.cross_attn.q_linear.{p}", f"{dst}.attn2.to_q.{p}", None, None))
        for i, name in enumerate(("to_k", "to_v")):
            rows.append((f"{src}.cross_attn.kv_linear.{p}", f"{dst}.attn2.{name}.{p}", i, 2))
        rows.append((f"{src}.cross_attn.proj.{p}", f"{dst}.attn2.to_out.0.{p}", None, None))
        rows.append((f"{src}.mlp.fc1.{p}", f"{dst}.ff.net.0.proj.{p}", None, None))
        rows.append((f"{src}.mlp.fc2.{p}", f"{dst}.ff.net.2.{p}", None, None))
    rows.append((f"{src}.shift_scale_gate_table", f"{dst}.scale_shift_table", None, None))
    return rows


def key_map(cfg: TransformerConfig) -> list[tuple[str, str, int | None, int | None]]:
    rows: list[tuple[str, str, int | None, int | None]] = []
    for p in ("weight", "bias"):
        rows += [(f"x_embedder.proj.{p}", f"base.pos_embed.proj.{p}", None, None),
                 (f"t_embedder.mlp.0.{p}", f"base.adaln_single.emb.timestep_embedder.linear_1.{p}", None, None),
                 (f"t_embedder.mlp.2.{p}", f"base.adaln_single.emb.timestep_embedder.linear_2.{p}", None, None),
                 (f"t_block.1.{p}", f"base.adaln_single.linear.{p}", None, None),
                 (f"y_embedder.y_proj.fc1.{p}", f"base.caption_projection.linear_1.{p}", None, None),
                 (f"y_embedder.y_proj.fc2.{p}", f"base.caption_projection.linear_2.{p}", None, None),
                 (f"final_layer.linear.{p}", f"base.proj_out.{p}", None, None)]
    rows.append(("final_layer.shift_scale_table", "base.scale_shift_table", None, None))
    for n in range(cfg.depth):
        rows += _block_map(f"blocks.{n}", f"base.transformer_blocks.{n}")
    for n in range(cfg.control_blocks):
        rows += _block_map(f"controlnet.{n}.copied_block", f"control.blocks.{n}")
        for p in ("weight", "bias"):
            rows.append((f"controlnet.{n}.after_proj.{p}", f"control.after_proj.{n}.{p}", None, None))
    if cfg.control_blocks:
        for p in ("weight", "bias"):
            rows.append((f"controlnet.0.before_proj.{p}", f"control.before_proj.{p}", None, None))
    return rows


_ALIASES = {"shift_scale_gate_table": "scale_shift_table", "shift_scale_table": "scale_shift_table"}


def convert_state_dict(sd: dict[str, torch.Tensor], heads: int = 16, pos_embed_scale: float | None = None,
                       where: str = "checkpoint") -> tuple[GuidedTransformer, torch.Tensor, TransformerConfig]:
    try:
        return _convert(sd, heads, pos_embed_scale, where)
    except (ValueError, RuntimeError, IndexError, KeyError, TypeError, AttributeError) as e:
        # What the checks above do not foresee (a layout that breaks diffusers or torch on the way)
        # is still bad input, not a bug of the caller: one line naming the file.
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"cannot convert this checkpoint ({type(e).__name__}: {first})", where) from None


def _convert(sd: dict[str, torch.Tensor], heads: int, pos_embed_scale: float | None,
             where: str) -> tuple[GuidedTransformer, torch.Tensor, TransformerConfig]:
    # Control checkpoints keep the base under base_model.
    if any(k.startswith("base_model.") for k in sd):
        sd = {k.removeprefix("base_model."): v for k, v in sd.items()}
    cfg = infer_config(sd, heads, where)
    cfg.interpolation_scale = _pos_embed_scale(sd["pos_embed"], cfg, pos_embed_scale, where)
    model = GuidedTransformer.from_config(cfg)
    target = model.state_dict()
    unused = set(sd) - {"pos_embed", "y_embedder.y_embedding"}
    filled: dict[str, torch.Tensor] = {}
    for src, dst, part, parts in key_map(cfg):
        key = src if src in sd else _alias(src, sd)
        if key is None:
            raise UserError(f"missing key {src!r} (expected for depth {cfg.depth}, hidden {cfg.hidden}"
                            + (f", {cfg.control_blocks} control blocks" if cfg.control_blocks else "") + ")", where)
        value = sd[key]
        if part is not None:
            if value.shape[0] % parts:
                raise UserError(f"{key}: first dimension {value.shape[0]} does not split in {parts}", where)
            value = value.chunk(parts, dim=0)[part]
        if dst not in target:
            raise UserError(f"internal key map names {dst!r}, which the model does not have", where)
        if tuple(value.shape) != tuple(target[dst].shape):
            raise UserError(f"{key}: shape {tuple(value.shape)} in the checkpoint, {tuple(target[dst].shape)} expected "
                            f"for {dst} (hidden {cfg.hidden}, heads {cfg.heads}, patch {cfg.patch_size})", where)
        filled[dst] = value.to(target[dst].dtype)
        unused.discard(key)
    if unused:
        first = sorted(unused)[0]
        raise UserError(f"unused key {first!r} ({len(unused)} in all): the checkpoint does not fit this layout", where)
    missing = sorted(set(target) - set(filled))
    if missing:
        raise UserError(f"no checkpoint key fills {missing[0]!r} ({len(missing)} in all)", where)
    model.load_state_dict(filled, strict=True)
    if "y_embedder.y_embedding" not in sd:
        raise UserError("missing key 'y_embedder.y_embedding' (the learned null caption)", where)
    null = sd["y_embedder.y_embedding"].float()
    if null.ndim != 2 or null.shape[1] != cfg.caption_channels:
        raise UserError(f"y_embedder.y_embedding: {tuple(null.shape)}, expected (tokens, {cfg.caption_channels})", where)
    return model, null, cfg


def _alias(src: str, sd: dict) -> str | None:
    for old, new in _ALIASES.items():
        if src.endswith(old) and src[: -len(old)] + new in sd:
            return src[: -len(old)] + new
    return None


def _pos_embed_scale(table: torch.Tensor, cfg: TransformerConfig, given: float | None, where: str) -> float:
    """The interpolation scale whose sin-cos table equals the checkpoint's `pos_embed`.

    Compared in float32. A float32 table must match to 1e-4; a half-precision one (fp16, bf16) is
    compared with the reference rounded to its dtype, to one unit in the last place at 1.0 (the
    table's values lie in [-1, 1], so that is one or two rounding steps: 9.8e-4 for fp16, 7.8e-3
    for bf16; the candidate scales' tables differ by O(1), so this still tells them apart)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    grid = cfg.sample_size // cfg.patch_size
    ckpt = table.reshape(-1, cfg.hidden).float().numpy()
    half = table.dtype in (torch.float16, torch.bfloat16)
    atol = torch.finfo(table.dtype).eps if half else 1e-4
    candidates = [given] if given is not None else [1.0, 2.0, 0.5, 4.0, grid / 32, grid / 64]
    for scale in candidates:
        ref = get_2d_sincos_pos_embed(cfg.hidden, grid, base_size=grid, interpolation_scale=scale, output_type="pt")
        ref = ref.to(table.dtype).float() if half else ref.float()
        if np.allclose(ref.numpy(), ckpt, atol=atol):
            return float(scale)
    if given is not None:
        raise UserError(f"pos_embed does not match a sin-cos table with scale {given} (try another --pos-embed-scale)", where)
    raise UserError("pos_embed matches no sin-cos table with scale 0.5, 1, 2 or 4; pass --pos-embed-scale", where)


def import_chexgen(ckpt: str | Path, out: str | Path, t5: str | Path, vae: str | Path, ema: bool = True,
                   heads: int = 16, pos_embed_scale: float | None = None) -> Converted:
    """Convert and write a complete pipeline folder (T5 encoder and VAE from local folders)."""
    from diffusers import AutoencoderKL

    from .pipeline import ChexforgePipeline, Conditioning
    from .schedulers import train_scheduler
    from .text import T5Text

    sd, used_ema = read_checkpoint(ckpt, ema)
    model, null, cfg = convert_state_dict(sd, heads, pos_embed_scale, str(ckpt))
    text = T5Text(t5, max_length=null.shape[0])
    if text.dim != cfg.caption_channels:
        raise UserError(f"the T5 encoder gives {text.dim}-d tokens; the checkpoint expects {cfg.caption_channels}", t5)
    vae_path = Path(vae)
    try:
        autoencoder = AutoencoderKL.from_pretrained(vae_path, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the VAE as a diffusers AutoencoderKL folder ({e})", vae_path) from None
    pipe = ChexforgePipeline(model, autoencoder, text, null, train_scheduler(cfg.learn_sigma),
                             # ChexGen's own sampler by default, so an imported model reproduces its
                             # images; `sampler: dpm++` is the fast alternative (docs/diffusion.md).
                             Conditioning(prefix="chexgen", guidance_text=4.0, sampler="chexgen",
                                          extra={"source": "chexgen", "ema": used_ema}))
    pipe.save(out)
    return Converted(model, null, cfg, len(sd), used_ema)
