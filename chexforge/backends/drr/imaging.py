"""From line integrals to a processed radiograph, in the order physics and a detector apply them.

1. Exposure: primary photons per pixel N = N0 * exp(-integral), N0 set by the dose and the
   pixel area (so noise per mm² does not depend on the output size).
2. Scatter: a broad blur of the primary field times the scatter-to-primary ratio behind an
   anti-scatter grid; it lowers contrast most where the body is thick.
3. Quantum noise: Poisson, drawn as a Gaussian of variance N (N is in the thousands).
4. Detector blur: a Gaussian point-spread function (scintillator light spread).
5. Log transform back to attenuation units.
6. Display processing ("clinical"): windowing on the body, large-scale dynamic-range
   compression (lungs and mediastinum both readable), unsharp-mask edge enhancement and an
   S-shaped tone curve, like the multi-frequency processing of clinical DR systems.
   "raw" stops after a linear window.
Output is MONOCHROME2 float in [0, 1]: bone and soft tissue bright, air dark.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PHOTONS_PER_MM2 = 2.0e4  # unattenuated quanta per mm² at dose 1.0 (order of a clinical PA exposure)


def gaussian_blur(img: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of an (H, W) image with reflected borders."""
    if sigma_px < 0.3:
        return img
    radius = min(int(math.ceil(3 * sigma_px)), min(img.shape) - 1)
    x = torch.arange(-radius, radius + 1, device=img.device, dtype=img.dtype)
    k = torch.exp(-0.5 * (x / sigma_px) ** 2)
    k = k / k.sum()
    out = F.pad(img[None, None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1))
    out = F.conv2d(out, k.view(1, 1, -1, 1))
    return out[0, 0]


def expose(integral: torch.Tensor, pixel_mm: float, dose: float, scatter: float, blur_mm: float,
           generator: torch.Generator) -> torch.Tensor:
    """Line integrals (H, W) → detected log signal (H, W), noise and blur included."""
    n0 = PHOTONS_PER_MM2 * dose * pixel_mm**2
    primary = n0 * torch.exp(-integral)
    if scatter > 0:
        primary = primary + scatter * gaussian_blur(primary, 40.0 / pixel_mm)
    noise = torch.randn(primary.shape, generator=generator, device="cpu").to(primary)
    counts = (primary + noise * primary.clamp_min(1.0).sqrt()).clamp_min(0.5)
    counts = gaussian_blur(counts, blur_mm / pixel_mm)
    return -torch.log(counts / (n0 * (1 + scatter)))


def display(log_signal: torch.Tensor, body: torch.Tensor, pixel_mm: float, processing: str = "clinical") -> torch.Tensor:
    """Detected log signal → displayed image in [0, 1] (MONOCHROME2)."""
    inside = log_signal[body] if body.any() else log_signal.flatten()
    lo = torch.quantile(inside.float(), 0.005)
    hi = torch.quantile(inside.float(), 0.995)
    x = (log_signal - lo) / (hi - lo).clamp_min(1e-6)
    if processing == "raw":
        return x.clamp(0, 1)
    # Dynamic-range compression: pull the slowly varying part toward the body mean.
    coarse = gaussian_blur(x, 25.0 / pixel_mm)
    x = x - 0.55 * (coarse - coarse[body].mean() if body.any() else coarse.mean())
    # Unsharp masking for edges and fine lung markings.
    x = x + 0.9 * (x - gaussian_blur(x, 2.0 / pixel_mm))
    # S-shaped tone curve around the body's median, mapped back to [0, 1].
    ref = x[body] if body.any() else x.flatten()
    mid, spread = torch.quantile(ref.float(), 0.5), (torch.quantile(ref.float(), 0.98) - torch.quantile(ref.float(), 0.02)).clamp_min(1e-6)
    y = torch.sigmoid(4.0 * (x - mid) / spread)
    lo, hi = torch.sigmoid(torch.tensor(-3.0)), torch.sigmoid(torch.tensor(3.0))
    return ((y - lo) / (hi - lo)).clamp(0, 1)
