"""Rebuild the x-ray tube spectra table (`data/spectra.json`) that the polychromatic image chain reads.

    pip install spekpy                      # only for rebuilding; chexforge never imports it
    python -m chexforge.backends.drr.spectra

The table holds, for tube voltages of 50-150 kVp in 10 kVp steps, the photon fluence per 1 keV
bin of a tungsten-anode tube (anode angle 12 degrees) behind a typical chest filtration
(2.5 mm Al inherent and collimator + 0.1 mm Cu added), as modelled by SpekPy v2
(Poludniowski et al., Med Phys 2021; its default "casim" physics), normalised per µGy of the
beam's air kerma (to turn a dose into photons per mm²), and the mass attenuation coefficient
of the detector's scintillator (CsI) at the bin energies, computed from the NIST XCOM
elemental tables that SpekPy ships (mixture rule, Cs 51.15 % / I 48.85 % by mass).
Nothing here runs when images are made: the backend reads the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "data" / "spectra.json"
KVPS = list(range(50, 151, 10))
ANODE_ANGLE_DEG = 12.0
FILTERS = [("Al", 2.5), ("Cu", 0.1)]  # mm
E_MIN, E_MAX = 10, 150  # keV, bin centres E_MIN + 0.5 ... E_MAX - 0.5


def build(out: Path = OUT) -> dict:
    import spekpy as sp

    centres = np.arange(E_MIN, E_MAX) + 0.5
    table: dict = {
        "source": "SpekPy v2 (Poludniowski et al. 2021), tungsten anode, casim physics",
        "spekpy_version": getattr(sp, "__version__", "unknown"),
        "anode_angle_deg": ANODE_ANGLE_DEG,
        "filtration_mm": {m: t for m, t in FILTERS},
        "energy_keV": centres.round(2).tolist(),
        "units": {"fluence": "photons / (mm² keV) per µGy of air kerma, free in air, same point",
                  "csi_mu_rho": "cm²/g"},
        "spectra": {},
        "mean_energy_keV": {},
        "hvl_mm_al": {},
    }
    for kvp in KVPS:
        s = sp.Spek(kvp=kvp, th=ANODE_ANGLE_DEG, dk=1)
        for m, t in FILTERS:
            s.filter(m, t)
        k, flu = s.get_spectrum()  # photons / (cm² keV mAs) at 1 m, bin centres k
        kerma = s.get_kerma()  # µGy / mAs at 1 m
        per_bin = np.interp(centres, k, flu, left=0.0, right=0.0) / 100.0 / kerma  # → per mm², per µGy
        table["spectra"][str(kvp)] = [float(f"{v:.5g}") for v in per_bin]
        table["mean_energy_keV"][str(kvp)] = round(float(s.get_emean()), 2)
        table["hvl_mm_al"][str(kvp)] = round(float(s.get_hvl1()), 3)
    mu_csi, _ = s.mu_data.get_mu_over_rho_composition("Cesium Iodide", centres)
    table["csi_mu_rho"] = [float(f"{v:.5g}") for v in mu_csi]
    # Cross-check of the NIST values typed into imaging.py against SpekPy's own tables.
    water, _ = s.mu_data.get_mu_over_rho_composition("Water, Liquid", centres)
    bone, _ = s.mu_data.get_mu_over_rho_composition("Bone, Cortical (ICRU)", centres)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    return {"water": water, "bone": bone, "energy": centres}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    ref = build(a.out)
    from .imaging import mass_attenuation

    e = ref["energy"]
    for name, key in (("water", "water"), ("cortical bone", "bone")):
        ours = mass_attenuation(key, e)
        rel = np.abs(ours / ref[key] - 1)
        sel = e >= 15
        print(f"{name}: typed NIST table vs SpekPy/XCOM, max |rel. diff| 15-150 keV = {rel[sel].max():.3%}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
