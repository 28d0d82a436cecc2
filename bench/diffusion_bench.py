"""Diffusion sampling throughput: chexforge's defaults against ChexGen's reference settings.

Both run in the same process on the same randomly initialised pipeline:
- reference (ChexGen's sampler): fp32, one image at a time, 100 ancestral DDPM steps, CFG 4;
- chexforge defaults: a batch of images, DPM-Solver++ 20 steps, CFG as one batched forward,
  bf16 autocast on a GPU (fp32 on a CPU), optional fused QKV and torch.compile.

`--config tiny` (CPU, 64 px) is the CI-sized model. `--config xl` is the ChexGen architecture
(DiT-XL/2 at 512², 64×64 latents, 120 × 4096 caption tokens, SD-shaped VAE) with random weights;
run it on a GPU. The caption tokens come from a small stand-in encoder projected to 4096-d, so
the T5-XXL weights are not needed: text encoding is once per image and not what is measured.
FLOPs per image are counted with torch's FlopCounterMode on one denoiser call and one VAE
decode; the fraction of peak uses the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from chexforge.models import vae as vae_ops  # noqa: E402
from chexforge.models.pipeline import ChexforgePipeline, Conditioning  # noqa: E402
from chexforge.models.schedulers import train_scheduler  # noqa: E402
from chexforge.models.text import OpenClipText  # noqa: E402
from chexforge.models.transformer import PRESETS, GuidedTransformer  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


class Projected(OpenClipText):
    """A tiny open_clip tower whose tokens are projected to `dim` (stands in for T5-XXL's 4096)."""

    def __init__(self, dim: int, tokens: int):
        super().__init__({"context_length": tokens, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1})
        self.proj = torch.nn.Linear(64, dim)
        self.dim = dim

    def encode(self, prompts):
        x, keep = super().encode(prompts)
        return self.proj(x), keep


def build(config: str) -> ChexforgePipeline:
    torch.manual_seed(0)
    if config == "tiny":
        text = OpenClipText.from_open_clip("tiny")
        cfg = PRESETS["tiny"]
        vae = vae_ops.build_vae("tiny", cfg.sample_size * 8)
    else:
        cfg = PRESETS["chexgen-xl"]
        text = Projected(cfg.caption_channels, 120)
        vae = vae_ops.build_vae("sd", 512)
    transformer = GuidedTransformer.from_config(cfg)
    null = torch.randn(text.max_length, text.dim) / text.dim**0.5
    return ChexforgePipeline(transformer, vae, text, null, train_scheduler(cfg.learn_sigma), Conditioning())


def flops_per_image(pipe: ChexforgePipeline, size: int, steps: int, cfg_rows: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    lat = size // 8
    dev = pipe.device
    x = torch.randn(1, 4, lat, lat, device=dev)
    emb = torch.randn(1, pipe.text_encoder.max_length, pipe.text_encoder.dim, device=dev)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        pipe.transformer(x, torch.tensor([500], device=dev), emb)
    denoise = fc.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        pipe.vae.decode(x)
    return denoise * steps * cfg_rows + fc.get_total_flops()


def run(pipe: ChexforgePipeline, n: int, batch: int, steps: int, sampler: str, size: int, autocast: bool) -> float:
    prompts = ["sex:Female, age:67. PA chest radiograph of a 67-year-old woman. Moderate left pleural effusion."] * n
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    pipe.sample(prompts[:batch], [torch.Generator().manual_seed(0)] * batch, size, steps=2, sampler=sampler, autocast=autocast)
    sync()
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        chunk = prompts[i:i + batch]
        pipe.sample(chunk, [torch.Generator().manual_seed(i + j) for j in range(len(chunk))], size, steps=steps,
                    sampler=sampler, guidance_text=4.0, autocast=autocast)
    sync()
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["tiny", "xl"], default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="chexforge batch size (default 16 tiny, 32 xl)")
    p.add_argument("--n", type=int, default=None, help="images for chexforge (default 64 tiny, 128 xl)")
    p.add_argument("--n-reference", type=int, default=None, help="images for the reference (default 4 tiny, 4 xl)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (GPU)")
    p.add_argument("--fused-qkv", action="store_true")
    a = p.parse_args()
    if a.config == "xl" and a.device == "cpu":
        print("the xl configuration is a GPU benchmark (no GPU here): run with --config tiny, or on a GPU")
        return
    size = 64 if a.config == "tiny" else 512
    batch = a.batch or (16 if a.config == "tiny" else 32)
    n = a.n or (64 if a.config == "tiny" else 128)
    n_ref = a.n_reference or 4
    pipe = build(a.config).to(a.device)
    print(f"machine: {machine()}")
    ref = run(pipe, n_ref, 1, 100, "ddpm", size, autocast=False)
    gpu = pipe.device.type == "cuda"
    if a.fused_qkv:
        pipe.transformer.base.fuse_qkv_projections()
    if a.compile:
        pipe.transformer = torch.compile(pipe.transformer)
    ours = run(pipe, n, batch, 20, "dpm++", size, autocast=gpu)
    f_ours = flops_per_image(pipe if not a.compile else build(a.config).to(a.device), size, 20, 2)
    print(f"config {a.config}: {size}² images, transformer depth {pipe.transformer.config.depth if hasattr(pipe.transformer, 'config') else '?'}")
    print(f"reference (fp32, batch 1, DDPM 100 steps, CFG 4): {ref:.3f} images/s")
    print(f"chexforge ({'bf16 autocast' if gpu else 'fp32'}, batch {batch}, DPM-Solver++ 20 steps, batched CFG): {ours:.3f} images/s")
    print(f"ratio: {ours / ref:.1f}x")
    print(f"FLOPs per image (chexforge defaults): {f_ours / 1e9:,.1f} GFLOP; achieved {ours * f_ours / 1e12:.3f} TFLOP/s")
    if gpu:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak:
            print(f"fraction of {name}'s dense bf16 peak ({peak:.0f} TFLOP/s): {ours * f_ours / 1e12 / peak:.1%}")


if __name__ == "__main__":
    main()
