"""The pleura: pneumothorax and pleural thickening, both measured inward from the lung surface.

- Pneumothorax: air between the chest wall and a lung that has fallen away from it. The rim
  depth is `D × f`, f = 1 at the apex and along the lateral wall, fading toward the base and
  thinner medially (upright patient: air rises apically and laterally). Lung voxels nearer the
  lung surface than the rim become air (no lung markings); the rest is the collapsed lung, denser
  by part of its lost volume, with a thin soft-tissue shell at its edge: the visceral pleural
  line (tangent rays make it a sharp white line). Severity = D (the apical/lateral rim depth).
  Mask: detector pixels whose rays cross the rim but no lung of that side.
- Pleural Other (pleural thickening): a soft-tissue band of undulating thickness lining the
  lateral chest wall over part of its height, or an apical cap, inside the rib cage. Wall
  voxels are those whose nearest lung surface lies laterally (or above), read from the gradient
  of the lung's distance map. Severity = band thickness.
"""

from __future__ import annotations

import numpy as np

from .findings import Inserter, Insertion, PlacementError, hu_to_mu, smoothstep

PNEUMOTHORAX_MM = {"small": (8, 16), "moderate": (18, 30), "large": (35, 55)}
PLEURAL_MM = {"small": (3, 6), "moderate": (6, 11), "large": (11, 18)}
COLLAPSED_GAIN = 0.7  # share of the lost volume that shows as extra density of the collapsed lung


def pneumothorax(ins: Inserter, scene, side: str, severity: str | None, rng: np.random.Generator) -> Insertion:
    if side in scene.rim:
        raise PlacementError(f"a second pneumothorax on the {side}")
    depth_mm = float(rng.uniform(*PNEUMOTHORAX_MM[severity or "moderate"]))
    lung = ins.lung(side)
    depth = ins.pleural_mm(side)
    lat, _, zf = ins.lung_frame(side)
    lateral = smoothstep((lat - 0.3) / 0.55)
    apical = smoothstep((zf - 0.6) / 0.35) * (0.35 + 0.65 * smoothstep((lat - 0.1) / 0.4))  # a cap, thin medially
    rim_mm = (depth_mm * np.maximum(apical, lateral * smoothstep((zf - 0.12) / 0.35)) * lung.mask).astype(np.float32)
    rim = lung.mask & (depth < rim_mm)
    kept = lung.mask & ~rim
    if kept.sum() < 0.15 * lung.mask.sum():
        raise PlacementError(f"a {depth_mm:.0f} mm pneumothorax leaves no {side} lung")
    gain = 1 + COLLAPSED_GAIN * (lung.mask.sum() / kept.sum() - 1)
    mu0 = ins.ph.mu.numpy()[lung.box]
    collapsed = np.minimum(mu0 * gain, np.maximum(mu0, hu_to_mu(40.0)))
    pleura = kept & (depth - rim_mm < 1.5 * ins.spacing.min()) & (rim_mm > 2)
    mu = np.where(rim, 0.0, np.where(pleura, 0.5 * collapsed + 0.5 * hu_to_mu(40.0), collapsed))
    scene.rim[side] = rim_mm
    meta = {"rim_mm": round(depth_mm, 1), "collapse_fraction": round(1 - float(kept.sum() / lung.mask.sum()), 3)}
    return ins.finish("Pneumothorax", side, lung.origin, lung.mask.astype(np.float32), mu, meta,
                      label=rim, beyond=kept, focal=False)


def wall_normals(ins: Inserter, side: str) -> tuple[np.ndarray, np.ndarray]:
    """(n_x, n_z) of the unit gradient of the lung's distance map over the lung crop: it points
    away from the nearest lung surface."""
    def make():
        d = ins.pleural_mm(side)
        gx, gy, gz = np.gradient(d, *ins.spacing)
        norm = np.sqrt(gx**2 + gy**2 + gz**2) + 1e-6
        return (gx / norm).astype(np.float32), (gz / norm).astype(np.float32)
    return ins.cached(("normals", side), make)


def pleural_thickening(ins: Inserter, scene, side: str, severity: str | None, rng: np.random.Generator) -> Insertion:
    thick_mm = float(rng.uniform(*PLEURAL_MM[severity or "moderate"]))
    lung = ins.lung(side)
    depth = ins.pleural_mm(side)
    nx, nz = wall_normals(ins, side)
    lat, _, zf = ins.lung_frame(side)
    toward_medial = -1.0 if side == "right" else 1.0  # the right lung is +x
    if rng.random() < 0.3:
        kind = "apical cap"
        extent = smoothstep((-nz - 0.4) / 0.3) * smoothstep((zf - 0.72) / 0.1)
    else:
        kind = "lateral"
        z0, length = rng.uniform(0.2, 0.55), rng.uniform(0.25, 0.45)
        band = smoothstep((zf - z0) / 0.12) * smoothstep((z0 + length - zf) / 0.12)
        # The chest wall only: surfaces facing medially in the lung's outer part (not the walls
        # of hilar notches, whose normals can point anywhere).
        extent = smoothstep((nx * toward_medial - 0.65) / 0.2) * smoothstep((lat - 0.5) / 0.2) * band
    undulation = 0.6 + 0.4 * np.clip(0.5 + 0.5 * ins.smooth_noise(lung.mask.shape, 25.0, rng), 0, 1)
    thick = thick_mm * extent * undulation
    occ = smoothstep((thick - depth) / ins.spacing.min() + 0.5) * lung.mask * (thick > 0.5)
    meta = {"kind": kind, "thickness_mm": round(thick_mm, 1)}
    return ins.finish("Pleural Other", side, lung.origin, occ.astype(np.float32), hu_to_mu(45.0), meta, focal=False)
