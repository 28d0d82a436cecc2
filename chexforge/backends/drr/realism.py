"""Realism statistics of rendered radiographs: heart and lung sizes against published normals,
and lung-field shape statistics that can be computed identically on any frontal lung mask.

Used by the backend (the cardiothoracic ratio a Cardiomegaly insertion aims at is measured with
`row_span`), by bench/drr_realism.py (the full table in docs/drr.md, "Realism") and by
tests/test_drr_realism.py (a fast check that rendered normals stay inside the published ranges).

Two kinds of lung mask:
- *projected*: what the backend records, every pixel whose ray crosses the lung (so the lung
  behind the heart, the spine and the mediastinum and the posterior recesses below the diaphragm
  dome are included);
- *field*: the projected lung where nothing denser covers it: without the pixels whose ray also
  crosses the upper abdomen (liver, spleen, stomach...) or the midline mediastinal shadow (airway,
  oesophagus, great veins, aortic arch, vertebral bodies; `cover_slabs`). This is the lung field a reader outlines on a
  radiograph (the v7labs masks in torchxrayvision are drawn this way: two lungs apart, the
  midline shadow between them, the lung behind the heart included), and the lung height of radiographic morphometry (apex to
  dome) is measured on it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from .geometry import Geometry
from .project import MASK_MM, Slabs, project

ABDOMEN = ("liver", "spleen", "stomach", "pancreas", "gallbladder", "duodenum", "small_bowel", "colon",
           "kidney_left", "kidney_right", "adrenal_gland_left", "adrenal_gland_right")
# The midline shadow between the lung fields: airway, oesophagus, great veins and the aortic arch
# (the aorta above the heart), and the vertebral bodies (see `cover_slabs`). The heart is not in
# it: readers outline the lung behind it (retrocardiac lung), as the v7labs masks do.
MEDIASTINUM = ("superior_vena_cava", "brachiocephalic_trunk", "brachiocephalic_vein_left", "brachiocephalic_vein_right",
               "trachea", "esophagus")


@dataclass(frozen=True)
class Published:
    """A normal range for adult PA radiographs and where it comes from (docs/drr.md lists the sources)."""

    low: float
    high: float
    plane: str  # "detector": measured on the film/image (magnified); "ratio": dimensionless
    source: str


# Ranges are the interval a normal adult population's middle ~90 % occupies, from the cited
# means and SDs (mean ± 1.645 SD) or the cited limits of normal, pooled over the sexes.
PUBLISHED = {
    # Nickol & Wade 1982 (median 0.43-0.46, 2.2 % of normal Caucasian men above 0.50);
    # Pan Afr Med J 2017;27:201 (men 0.466 ± 0.039); Danzer 1919 (upper limit 0.50).
    "ctr": Published(0.39, 0.50, "ratio", "Danzer 1919; Nickol & Wade 1982; Pan Afr Med J 2017;27:201"),
    # Transverse thoracic diameter, inner rib to inner rib: men 29.7 ± 2.7 cm, women 27.1 ± 2.6 cm
    # (Pan Afr Med J 2017;27:201); 1.645 SD below the women's and above the men's mean.
    "width_both_cm": Published(22.8, 34.1, "detector", "Pan Afr Med J 2017;27:201; Obikili & Okoye 2006"),
    # Lung apex to the dome of the hemidiaphragm, limits of normal 16-28 cm (women) and 18-30 cm
    # (men), right ~1.5 cm shorter than left (West Afr J Med 2007, record id 17402510).
    "height_apex_dome_right_cm": Published(16.0, 30.0, "detector", "West Afr J Med 2007 (id 17402510)"),
    "height_apex_dome_left_cm": Published(16.0, 30.0, "detector", "West Afr J Med 2007 (id 17402510)"),
    # The right lung is the larger: ~55 % of the lung fields on a PA film (Loyola chest atlas);
    # 53.3 ± 1.3 % (range 50.5-56.3 %) of the lung volume on upright CT (Yamada et al. 2020).
    "right_share_of_field_area": Published(0.50, 0.58, "ratio", "Loyola chest atlas; Yamada et al. 2020"),
}


def cover_slabs(phantom) -> Slabs:
    """What covers the lung fields on a frontal film, as one occupancy volume along the frontal
    beam: the upper abdomen, the midline mediastinal structures, the aortic arch and the
    vertebral bodies (the part of each thoracic vertebra in front of the spinal cord: the
    paraspinal lung overlies the transverse processes and stays in the field)."""
    occ = phantom.region(ABDOMEN + MEDIASTINUM)
    labels = phantom.labels.numpy()
    heart = phantom.heart
    if "aorta" in phantom.structures and heart.any():
        top = np.nonzero(heart.any(axis=(0, 1)))[0].max()
        arch = labels == phantom.structures["aorta"]
        arch[:, :, : top + 1] = False
        occ |= arch
    spine = phantom.region(tuple(f"vertebrae_T{i}" for i in range(1, 13)))
    if "spinal_cord" in phantom.structures and spine.any():
        cord = labels == phantom.structures["spinal_cord"]
        has = cord.any(axis=(0, 1))
        y = np.arange(cord.shape[1])
        cord_y = np.where(has, (cord.sum(0) * y[:, None]).sum(0) / np.maximum(cord.sum(axis=(0, 1)), 1), -1)
        ahead = y[None, :, None] > cord_y[None, None, :] + 5.0 / phantom.spacing[1]
        spine &= ahead & has[None, None, :]
    occ |= spine
    return Slabs.from_xyz(torch.from_numpy(occ.astype(np.float32)), axis=1)


def geometry_from_meta(meta: dict) -> Geometry:
    g = meta["geometry"]
    return Geometry(**{f.name: tuple(g[f.name]) if isinstance(g[f.name], list) else g[f.name] for f in fields(Geometry)})


def field_masks(scene, sample, cover: Slabs | None = None, projector: str = "joseph", backend=None,
                job: dict | None = None) -> dict[str, np.ndarray]:
    """The lung fields of `sample`: its projected lungs where no abdomen or mediastinum covers
    them (largest piece per lung, holes filled).

    `scene`: the one `sample` was rendered on (`DRRBackend.scene_for(job)`); `cover` (from
    `cover_slabs(scene.phantom)`) saves rebuilding that volume for each image of one CT;
    `projector`: the backend's (DRROptions.projector), so both masks come from the same rays;
    `backend` and `job`: to project through the job's virtual patient (its deformation).
    """
    if cover is None:
        cover = cover_slabs(scene.phantom)
    cover.data = cover.data.to(scene.device)
    geom = geometry_from_meta(sample.meta)
    rays = backend.rays_for(job, scene, geom) if backend is not None and job is not None else scene.rays(geom)
    covered = (project(cover, *rays, projector=projector)[0].view(geom.size, geom.size) > MASK_MM)
    # A reader's outline follows the mediastinal border smoothly: bridge the intervertebral discs
    # (unlabelled gaps of a few mm between vertebral bodies) by closing the cover over 2 cm vertically.
    reach = max(1, int(round(20.0 / geom.pixel_mm / 2)))
    covered = ndi.binary_closing(np.pad(covered.cpu().numpy(), ((reach, reach), (0, 0))),
                                 structure=np.ones((2 * reach + 1, 1), bool))[reach:-reach]
    return {f"lung_{side}": largest(sample.masks[f"lung_{side}"] & ~covered) for side in ("left", "right")}


def largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask.copy()
    sizes = ndi.sum_labels(mask, lab, np.arange(1, n + 1))
    return ndi.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))


def extent(mask: np.ndarray) -> tuple[int, int]:
    """(height, width) of a mask in pixels (rows and columns it spans)."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if len(rows) == 0:
        return 0, 0
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def row_span(mask: np.ndarray) -> int:
    """The widest single row of a mask (pixels), as the cardiothoracic ratio measures widths."""
    rows = np.nonzero(mask.any(1))[0]
    if len(rows) == 0:
        return 0
    cols = np.arange(mask.shape[1])
    sub = mask[rows]
    return int((np.where(sub, cols, -1).max(1) - np.where(sub, cols, mask.shape[1]).min(1) + 1).max())


def apex_to_dome(mask: np.ndarray) -> int:
    """Rows from a lung field's apex to the top of its hemidiaphragm dome.

    The dome is the highest point of the field's lower border over the middle half of the
    lung's width (the mid-clavicular region, clear of the mediastinum and the chest wall).
    """
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return 0
    c0, c1 = cols.min(), cols.max()
    lo, hi = c0 + (c1 - c0) * 0.25, c0 + (c1 - c0) * 0.75
    bottom = [np.nonzero(mask[:, c])[0].max() for c in range(int(np.ceil(lo)), int(hi) + 1) if mask[:, c].any()]
    return int(min(bottom) - rows.min() + 1)


def solidity(mask: np.ndarray) -> float:
    """Area over convex-hull area (1 = convex)."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 3:
        return float("nan")
    # Pixel corners, so a one-pixel-wide mask still has a hull with area.
    pts = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    try:
        return float(mask.sum() / ConvexHull(pts).volume)
    except QhullError:
        return float("nan")


def costophrenic_angle(mask: np.ndarray, lateral: int) -> float:
    """Angle (degrees) of the lateral costophrenic recess of a lung field.

    `lateral` is the image direction of the chest wall (-1: left of the image, i.e. the patient's
    right lung; +1: right). The recess tip is the field's most inferolateral pixel; the angle is
    taken between straight lines fitted to the lateral border above the tip and to the
    diaphragm border medial to it, each over 12 % of the lung's height.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) < 20:
        return float("nan")
    h, _ = extent(mask)
    span = max(4, int(round(0.12 * h)))
    tip = int(np.argmax(ys + lateral * xs))
    ty, tx = ys[tip], xs[tip]
    # Lateral border: for each row above the tip, the outermost column.
    wall_rows = [r for r in range(ty - span, ty) if r >= 0 and mask[r].any()]
    wall = [(r, (np.nonzero(mask[r])[0].max() if lateral > 0 else np.nonzero(mask[r])[0].min())) for r in wall_rows]
    # Diaphragm border: for each column medial to the tip, the lowest row.
    dia_cols = [tx - lateral * k for k in range(1, span + 1)]
    dia = [(np.nonzero(mask[:, c])[0].max(), c) for c in dia_cols if 0 <= c < mask.shape[1] and mask[:, c].any()]
    if len(wall) < 3 or len(dia) < 3:
        return float("nan")
    wr, wc = np.array(wall, dtype=float).T
    dr, dc = np.array(dia, dtype=float).T
    # Directions pointing away from the tip: up along the wall, medially along the diaphragm.
    slope_w = np.polyfit(wr, wc, 1)[0]  # d col / d row along the wall
    v_wall = np.array([-1.0, -slope_w])  # (d row, d col) going up
    slope_d = np.polyfit(dc, dr, 1)[0]  # d row / d col along the diaphragm
    v_dia = np.array([-lateral * slope_d, -lateral * 1.0])  # going medially
    cos = v_wall @ v_dia / (np.linalg.norm(v_wall) * np.linalg.norm(v_dia))
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1))))


def shape_stats(left: np.ndarray, right: np.ndarray, aspect: float = 1.0) -> dict[str, float]:
    """Scale-free shape statistics of a pair of frontal lung-field masks on one square grid.

    `left`/`right` are the patient's lungs (image right/left). `aspect` is the original image's
    height/width, for masks that were resampled from a non-square image (it corrects the
    height/width ratios; fractions, centroids and solidity do not change under the resampling).
    """
    n = left.size
    out: dict[str, float] = {"field_area_fraction": float((left | right).sum() / n)}
    out["right_left_area_ratio"] = float(right.sum() / max(left.sum(), 1))
    both = left | right
    rows = np.nonzero(both.any(1))[0]
    out["width_fraction"] = float(row_span(both) / both.shape[1])  # thoracic width / image width
    out["top_y"] = float(rows.min() / both.shape[0]) if len(rows) else float("nan")
    out["bottom_y"] = float((rows.max() + 1) / both.shape[0]) if len(rows) else float("nan")
    for side, m, lateral in (("right", right, -1), ("left", left, +1)):
        h, w = extent(m)
        ys, xs = np.nonzero(m)
        out[f"{side}_height_width"] = float(h / max(w, 1) * aspect)
        out[f"{side}_centroid_x"] = float(xs.mean() / m.shape[1]) if len(xs) else float("nan")
        out[f"{side}_centroid_y"] = float(ys.mean() / m.shape[0]) if len(ys) else float("nan")
        out[f"{side}_solidity"] = solidity(m)
        out[f"{side}_cp_angle_deg"] = costophrenic_angle(m, lateral)
    return out


def size_stats(masks: dict[str, np.ndarray], field: dict[str, np.ndarray], meta: dict) -> dict[str, float]:
    """Sizes of one rendered radiograph: detector-plane and patient-plane (÷ magnification)."""
    g = meta["geometry"]
    px, mag = float(g["pixel_mm"]), float(g["magnification"])
    n = masks["lung_left"].size
    both = masks["lung_left"] | masks["lung_right"]
    out = {"ctr": float(meta["ctr"]), "magnification": mag}
    for name, m in (("left", masks["lung_left"]), ("right", masks["lung_right"]), ("both", both)):
        h, w = extent(m)
        out[f"area_{name}_cm2_patient"] = float(m.sum() * px**2 / mag**2 / 100)
        out[f"area_{name}_fraction"] = float(m.sum() / n)
        out[f"height_{name}_cm_patient"] = h * px / mag / 10
        out[f"width_{name}_cm_patient"] = w * px / mag / 10
    out["width_both_cm"] = row_span(both) * px / 10  # at the detector, as film measurements are
    for side in ("left", "right"):
        out[f"height_apex_dome_{side}_cm"] = apex_to_dome(field[f"lung_{side}"]) * px / 10
        out[f"height_apex_dome_{side}_cm_patient"] = out[f"height_apex_dome_{side}_cm"] / mag
    fb = field["lung_left"] | field["lung_right"]
    out["field_area_both_cm2_patient"] = float(fb.sum() * px**2 / mag**2 / 100)
    out["right_share_of_field_area"] = float(field["lung_right"].sum() / max(fb.sum(), 1))
    return out


def summarize(values: list[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return {"n": 0}
    return {"n": int(len(v)), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "p5": float(np.percentile(v, 5)), "p95": float(np.percentile(v, 95))}
