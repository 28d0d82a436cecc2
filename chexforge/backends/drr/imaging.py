"""From line integrals to a processed radiograph, in the order physics and a detector apply them.

Polychromatic chain (default, `polychromatic: true`; docs/drr.md, "Image chain"):

1. Materials: each CT voxel is split into water-equivalent and cortical-bone-equivalent
   density (a two-material basis), so a ray has two line integrals, water `tw` and bone `tb`
   in g/cm². Soft tissue, fat and air are water-like; above 150 HU a voxel is a mixture of
   soft tissue and ICRU-44 cortical bone matching its CT number at the CT's effective energy
   (70 keV). Inserted findings count as water of the same attenuation at 60 keV.
2. Spectrum: a tungsten-anode tube at `spectrum_kvp` behind 2.5 mm Al + 0.1 mm Cu (SpekPy
   table, `data/spectra.json`), photons per mm² set by the exposure (`dose` 1.0 = an entrance
   air kerma of 0.1 mGy, a typical digital PA chest).
3. Attenuation per 1 keV bin with the NIST mass attenuation coefficients of water and cortical
   bone (tables below), through an anti-scatter grid, absorbed in a CsI:Tl scintillator, and
   summed as detected energy (an energy-integrating flat panel). The detected energy and its
   Poisson variance are tabulated once over (tw, tb) and read per pixel by bilinear lookup.
4. Scatter behind the grid: a broad kernel over the primary, its strength growing with the
   water-equivalent thickness (`scatter` = scatter-to-primary ratio behind 20 cm of water).
5. Quantum noise (Poisson, energy-weighted, drawn as Gaussian), then the detector MTF (a
   Gaussian core of sigma `blur_mm` plus the scintillator's low-frequency drop), then
   electronic noise.
6. Log transform back to attenuation units, then display processing (step 7 below).

Legacy chain (`polychromatic: false`): one effective energy (~60 keV) with a bone gain in the CT
conversion, scatter as a broad blur times a uniform SPR, Gaussian quantum noise and Gaussian
detector blur; kept for comparison.

7. Display processing ("clinical"): windowing on the body, large-scale dynamic-range
   compression (lungs and mediastinum both readable), unsharp-mask edge enhancement and an
   S-shaped tone curve, like the multi-frequency processing of clinical DR systems.
   "raw" stops after a linear window.
Output is MONOCHROME2 float in [0, 1]: bone and soft tissue bright, air dark.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .ct import BONE_GAIN, MU_WATER

PHOTONS_PER_MM2 = 2.0e4  # legacy chain: unattenuated quanta per mm² at dose 1.0

# ---- physical data ---------------------------------------------------------------------------

# Mass attenuation coefficients mu/rho (cm²/g, coherent scattering included) from the NIST
# X-Ray Mass Attenuation Coefficients tables (J. H. Hubbell and S. M. Seltzer, NIST Standard
# Reference Database 126, Table 4: "Water, Liquid" and "Bone, Cortical (ICRU-44)", density
# 1.92 g/cm³), at the table's own energies.
NIST_ENERGY_KEV = (10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0)
NIST_MU_RHO = {
    "water": (5.329, 1.673, 0.8096, 0.3756, 0.2683, 0.2269, 0.2059, 0.1837, 0.1707, 0.1505),
    "bone": (28.51, 9.032, 4.001, 1.331, 0.6655, 0.4242, 0.3148, 0.2229, 0.1855, 0.1480),
}
BONE_DENSITY = 1.92  # g/cm³, ICRU-44 cortical bone
CT_ENERGY_KEV = 70.0  # effective energy of a 120 kVp CT, at which the phantom's HU were measured
BONE_HU = 150.0  # above this the phantom's CT conversion (ct.py) treats a voxel as bone-bearing
SOFT_AT_BONE_HU = 1 + BONE_HU / 1000  # water-equivalent density of the soft end of the mixture

# Exposure, grid and detector (docs/drr.md, "Image chain", lists the sources and assumptions).
REFERENCE_ESAK_UGY = 100.0  # entrance air kerma (free in air, no backscatter) at dose 1.0
REFERENCE_SKIN_MM = 1540.0  # focus-to-skin distance for that kerma (PA: 1800 mm SID, ~26 cm chest + gap)
REFERENCE_SID_MM = 1800.0
GRID_PRIMARY = 0.70  # primary transmission of a 12:1 focused grid
CSI_MM = 0.6  # CsI:Tl needle layer thickness
CSI_FILL = 0.75  # packing fraction of the needles
CSI_DENSITY = 4.51  # g/cm³
LFD_FRACTION = 0.08  # the scintillator's low-frequency drop: share of light in a long tail ...
LFD_LENGTH_MM = 1.5  # ... with an exponential PSF of this length
DEL_MM = 0.143  # native detector element pitch (electronic noise is per element)
ELECTRONIC_QUANTA = 2.0  # electronic noise per element, in x-ray quanta of the mean energy
SCATTER_SIGMA_MM = 40.0  # scatter kernel (Gaussian sigma at the detector)
SCATTER_REF_MM = 200.0  # `scatter` is the SPR behind the grid for this water-equivalent thickness

SPECTRA = Path(__file__).resolve().parent / "data" / "spectra.json"


def mass_attenuation(material: str, energy_kev) -> np.ndarray:
    """NIST mu/rho (cm²/g) of 'water' or 'bone' at `energy_kev`, log-log interpolated."""
    e = np.log(np.asarray(NIST_ENERGY_KEV))
    v = np.log(np.asarray(NIST_MU_RHO[material]))
    return np.exp(np.interp(np.log(np.asarray(energy_kev, dtype=np.float64)), e, v))


def bone_hu() -> float:
    """CT number of ICRU-44 cortical bone at the CT's effective energy (about 1590 HU)."""
    ratio = BONE_DENSITY * mass_attenuation("bone", CT_ENERGY_KEV) / mass_attenuation("water", CT_ENERGY_KEV)
    return float(1000 * (ratio - 1))


# Attenuation (1/mm, in the phantom's single-energy units) that one g/cm³ of bone basis adds on
# top of its water basis share: mu = MU_WATER * rho_water + BONE_K * rho_bone for every voxel.
BONE_K = MU_WATER * (SOFT_AT_BONE_HU + BONE_GAIN * (bone_hu() - BONE_HU) / 1000) / BONE_DENSITY


def bone_density(mu: torch.Tensor) -> torch.Tensor:
    """Cortical-bone basis density (g/cm³) of each voxel of a phantom's attenuation volume.

    Inverts ct.py's conversion (mu = MU_WATER * (1.15 + BONE_GAIN * (HU - 150) / 1000) above
    150 HU) to the CT number, then takes the cortical-bone fraction of a soft-tissue/bone
    mixture with that CT number at the CT's energy. Below 150 HU there is no bone.
    """
    hu_above = 1000 * (mu / MU_WATER - SOFT_AT_BONE_HU) / BONE_GAIN
    frac = hu_above.clamp_min(0) / (bone_hu() - BONE_HU)
    return (BONE_DENSITY * frac).to(torch.float32)


def material_paths(integral: torch.Tensor, bone_path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Line integrals → (water, bone) basis mass thickness in g/cm².

    `integral` is the phantom's attenuation along the ray (findings included), `bone_path` the
    bone density along it ((g/cm³)·mm).
    """
    water_mm = (integral - BONE_K * bone_path) / MU_WATER
    return (water_mm / 10).clamp_min(0), (bone_path / 10).clamp_min(0)


@lru_cache(maxsize=1)
def _spectra() -> dict:
    return json.loads(SPECTRA.read_text())


def spectrum(kvp: float) -> tuple[np.ndarray, np.ndarray]:
    """(bin energies keV, photons per mm² and keV per µGy of air kerma) at `kvp`.

    Tabulated every 10 kVp; in between, the two neighbours are blended linearly and cut at kvp.
    """
    t = _spectra()
    kvps = sorted(int(k) for k in t["spectra"])
    if not kvps[0] <= kvp <= kvps[-1]:
        raise ValueError(f"spectrum_kvp must be within {kvps[0]}-{kvps[-1]} kVp")
    e = np.asarray(t["energy_keV"])
    lo = max(k for k in kvps if k <= kvp)
    hi = min(k for k in kvps if k >= kvp)
    w = 0.0 if hi == lo else (kvp - lo) / (hi - lo)
    flu = (1 - w) * np.asarray(t["spectra"][str(lo)]) + w * np.asarray(t["spectra"][str(hi)])
    return e, np.where(e < kvp, flu, 0.0)


def csi_absorption(energy_kev: np.ndarray) -> np.ndarray:
    """Fraction of photons of each bin absorbed in the CsI layer."""
    t = _spectra()
    mu_rho = np.interp(energy_kev, np.asarray(t["energy_keV"]), np.asarray(t["csi_mu_rho"]))
    return 1 - np.exp(-mu_rho * CSI_DENSITY * CSI_FILL * CSI_MM / 10)


@dataclass
class Beam:
    """The detected-energy response of one spectrum and detector, tabulated over (tw, tb)."""

    kvp: float
    tw_max: float  # g/cm² of water covered by the table
    tb_max: float  # g/cm² of bone
    log_signal: torch.Tensor  # (2, n_b, n_w): ln(detected energy) and ln(its variance) per unattenuated photon/mm²
    fluence_per_ugy: float  # photons / mm² / µGy (air kerma) of the unattenuated beam
    mean_energy: float  # keV, detected-energy-weighted, unattenuated
    effective_mu_water: float  # 1/mm, water, unattenuated beam (for the legacy comparison)

    @classmethod
    def build(cls, kvp: float, n_w: int = 384, n_b: int = 96, tw_max: float = 80.0, tb_max: float = 24.0) -> Beam:
        e, flu = spectrum(kvp)
        keep = flu > 0
        e, flu = e[keep], flu[keep]
        total = float(flu.sum())
        q = flu / total  # photons per bin per unattenuated photon
        absorbed = q * csi_absorption(e)
        mw, mb = mass_attenuation("water", e), mass_attenuation("bone", e)
        tw = np.linspace(0, tw_max, n_w)
        tb = np.linspace(0, tb_max, n_b)
        att = np.exp(-(tb[:, None, None] * mb + tw[None, :, None] * mw))  # (n_b, n_w, E)
        signal = att @ (absorbed * e)
        variance = att @ (absorbed * e**2)
        table = np.stack([np.log(signal), np.log(variance)]).astype(np.float32)
        mean_e = float((absorbed * e * e).sum() / (absorbed * e).sum())
        mu_eff = float(-np.log(signal[0, 1] / signal[0, 0]) / (tw[1] * 10))
        return cls(kvp, tw_max, tb_max, torch.from_numpy(table), total, mean_e, mu_eff)

    def lookup(self, tw: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        """(2, H, W) ln(signal), ln(variance) at each pixel's (tw, tb), bilinear."""
        gx = 2 * (tw / self.tw_max).clamp(0, 1) - 1
        gy = 2 * (tb / self.tb_max).clamp(0, 1) - 1
        grid = torch.stack([gx, gy], -1)[None].float()
        table = self.log_signal.to(grid.device)[None]
        out = F.grid_sample(table, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
        # Beyond the table's edge, continue along the edge's slope (thicker than any chest).
        extra = (tw - self.tw_max).clamp_min(0)
        if bool((extra > 0).any()):
            slope = (self.log_signal[:, 0, -1] - self.log_signal[:, 0, -2]) / (self.tw_max / (self.log_signal.shape[-1] - 1))
            out = out + slope.to(out)[:, None, None] * extra[None]
        return out


@lru_cache(maxsize=8)
def beam(kvp: float) -> Beam:
    return Beam.build(float(kvp))


def mtf(f: torch.Tensor, sigma_mm: float) -> torch.Tensor:
    """Detector MTF at spatial frequency `f` (cycles/mm): Gaussian core + low-frequency drop."""
    core = torch.exp(-2 * math.pi**2 * sigma_mm**2 * f**2)
    tail = 1 / (1 + (2 * math.pi * LFD_LENGTH_MM * f) ** 2)
    return (1 - LFD_FRACTION) * core + LFD_FRACTION * tail


def apply_mtf(img: torch.Tensor, pixel_mm: float, sigma_mm: float) -> torch.Tensor:
    """Filter an (H, W) image with the detector MTF (reflected borders, FFT)."""
    pad = min(max(4, int(math.ceil(4 * LFD_LENGTH_MM / pixel_mm))), min(img.shape) - 1)
    x = F.pad(img[None, None], (pad, pad, pad, pad), mode="reflect")[0, 0]
    fy = torch.fft.fftfreq(x.shape[0], d=pixel_mm, device=img.device)
    fx = torch.fft.rfftfreq(x.shape[1], d=pixel_mm, device=img.device)
    f = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    out = torch.fft.irfft2(torch.fft.rfft2(x) * mtf(f, sigma_mm).to(x.dtype), s=x.shape)
    return out[pad:-pad, pad:-pad]


def smooth(img: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """A very broad Gaussian blur, computed on a coarser grid (for smooth fields like scatter)."""
    factor = max(1, int(sigma_px // 6))
    if factor == 1:
        return gaussian_blur(img, sigma_px)
    h, w = img.shape
    small = F.avg_pool2d(img[None, None], factor, ceil_mode=True)[0, 0]
    small = gaussian_blur(small, sigma_px / factor)
    return F.interpolate(small[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]


def detector_kerma_ugy(dose: float) -> float:
    """Air kerma (µGy, free in air, no patient) at the detector plane for a relative `dose`."""
    return dose * REFERENCE_ESAK_UGY * (REFERENCE_SKIN_MM / REFERENCE_SID_MM) ** 2


def expose_poly(integral: torch.Tensor, bone_path: torch.Tensor, pixel_mm: float, dose: float, scatter: float,
                blur_mm: float, generator: torch.Generator, kvp: float = 120.0) -> torch.Tensor:
    """Line integrals (H, W) → detected log signal (H, W) with the polychromatic chain."""
    b = beam(kvp)
    tw, tb = material_paths(integral, bone_path)
    n0 = detector_kerma_ugy(dose) * b.fluence_per_ugy * GRID_PRIMARY * pixel_mm**2  # photons per pixel
    ln = b.lookup(tw, tb)
    primary = n0 * torch.exp(ln[0])  # detected energy, keV
    variance = n0 * torch.exp(ln[1])
    if scatter > 0:
        water_mm = 10 * tw
        scat = scatter * smooth(primary * (water_mm / SCATTER_REF_MM), SCATTER_SIGMA_MM / pixel_mm)
        variance = variance + scat * (variance / primary.clamp_min(1e-12))
        primary = primary + scat
    noise = torch.randn(primary.shape, generator=generator, device="cpu").to(primary)
    signal = apply_mtf(primary + noise * variance.sqrt(), pixel_mm, blur_mm)
    electronic = ELECTRONIC_QUANTA * b.mean_energy * (pixel_mm / DEL_MM)
    signal = signal + electronic * torch.randn(primary.shape, generator=generator, device="cpu").to(primary)
    floor = 0.5 * b.mean_energy  # half a quantum: keeps the log finite where nothing gets through
    return -torch.log(signal.clamp_min(floor) / (n0 * float(torch.exp(b.log_signal[0, 0, 0]))))


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
    """Legacy single-energy chain: line integrals (H, W) → detected log signal (H, W)."""
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
    lo, hi = torch.quantile(inside.float(), torch.tensor([0.005, 0.995], device=inside.device))
    x = (log_signal - lo) / (hi - lo).clamp_min(1e-6)
    if processing == "raw":
        return x.clamp(0, 1)
    # Dynamic-range compression: pull the slowly varying part toward the body mean.
    coarse = smooth(x, 25.0 / pixel_mm)
    # The mean in float64: a float32 sum's rounding depends on how many threads split it, and the
    # same job must give the same pixels whatever the worker count (--devices cpu vs cpu:2).
    level = (coarse[body] if body.any() else coarse).double().mean().to(coarse.dtype)
    x = x - 0.55 * (coarse - level)
    # Unsharp masking for edges and fine lung markings.
    x = x + 0.9 * (x - gaussian_blur(x, 2.0 / pixel_mm))
    # S-shaped tone curve around the body's median, mapped back to [0, 1].
    ref = x[body] if body.any() else x.flatten()
    q02, mid, q98 = torch.quantile(ref.float(), torch.tensor([0.02, 0.5, 0.98], device=ref.device))
    spread = (q98 - q02).clamp_min(1e-6)
    y = torch.sigmoid(4.0 * (x - mid) / spread)
    lo, hi = torch.sigmoid(torch.tensor(-3.0)), torch.sigmoid(torch.tensor(3.0))
    return ((y - lo) / (hi - lo)).clamp(0, 1)
