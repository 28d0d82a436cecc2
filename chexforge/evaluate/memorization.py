"""Memorization screening: each generated image's nearest reference image by cosine similarity
of features, pairs above a threshold flagged, and a figure of the closest pairs.

Features are centred on the reference mean before the cosine: every chest radiograph shares a
large common component, which would otherwise make any two images look alike. An exact copy
still scores 1.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def nearest(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each generated feature row: (index of the nearest reference row, cosine similarity)."""
    mu = real.mean(axis=0, keepdims=True)
    r, f = real - mu, fake - mu
    r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    sim = f @ r.T
    j = sim.argmax(axis=1)
    return j, sim[np.arange(len(f)), j]


def screen(real: np.ndarray, fake: np.ndarray, fake_ids: list[str], real_ids: list[str], threshold: float) -> dict:
    j, s = nearest(real, fake)
    order = np.argsort(-s)
    flagged = [{"generated": fake_ids[i], "reference": real_ids[j[i]], "cosine": float(s[i])} for i in order if s[i] >= threshold]
    return {"available": True, "threshold": threshold, "flagged": len(flagged), "of": len(fake_ids),
            "max_cosine": float(s.max()), "median_cosine": float(np.median(s)), "pairs": flagged,
            "nearest": [int(x) for x in j], "cosine": [float(x) for x in s]}


def pairs_figure(fake_images: np.ndarray, real_images: np.ndarray, nearest_idx: list[int], cosine: list[float],
                 threshold: float, n: int = 8, tile: int = 160) -> bytes:
    """A PNG: the n closest (generated | nearest reference) pairs side by side, cosine above each."""
    order = np.argsort(-np.asarray(cosine))[:n]
    head = 18
    sheet = Image.new("RGB", (2 * tile + 8, len(order) * (tile + head)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, i in enumerate(order):
        y = row * (tile + head)
        for col, a in enumerate((fake_images[i], real_images[nearest_idx[i]])):
            im = Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)).resize((tile, tile), Image.BILINEAR)
            sheet.paste(im.convert("RGB"), (col * (tile + 8), y + head))
        flag = "  FLAGGED" if cosine[i] >= threshold else ""
        draw.text((2, y + 3), f"generated #{i} | reference #{nearest_idx[i]}   cos {cosine[i]:.3f}{flag}",
                  fill=(200, 0, 0) if flag else (0, 0, 0))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
