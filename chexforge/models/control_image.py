"""The control image: a job's masks and class-coloured boxes drawn at the output resolution.

Masks are filled in their class colour; boxes are drawn as filled rectangles at half intensity
with a full-intensity outline, so overlapping findings stay distinguishable. The colour table is
fixed (it is part of a trained model's contract).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..contracts.vocabulary import ANATOMY, FINDINGS

_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
]
COLOURS: dict[str, tuple[int, int, int]] = {}
for i, name in enumerate([f.name for f in FINDINGS if f.localizable] + list(ANATOMY)):
    COLOURS[name] = _PALETTE[i % len(_PALETTE)]


def draw(size: int, boxes: list[dict] | None = None, masks: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """uint8 RGB (size, size, 3); black where nothing is asked for."""
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    for name, mask in (masks or {}).items():
        m = np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127
        canvas[m] = COLOURS.get(name, (255, 255, 255))
    if boxes:
        im = Image.fromarray(canvas)
        d = ImageDraw.Draw(im)
        for b in boxes:
            colour = COLOURS.get(b["label"], (255, 255, 255))
            xy = [b["x0"] * size, b["y0"] * size, b["x1"] * size - 1, b["y1"] * size - 1]
            d.rectangle(xy, fill=tuple(c // 2 for c in colour), outline=colour, width=max(1, size // 128))
        canvas = np.asarray(im)
    return canvas


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 RGB images → (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
