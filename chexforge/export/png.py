"""PNG encoding: 16-bit grayscale images and 8-bit masks (0 / 255)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png16_bytes(image: np.ndarray, compress_level: int = 3) -> bytes:
    """Float [0, 1] (H, W) → 16-bit grayscale PNG."""
    pixels = np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def mask_bytes(mask: np.ndarray) -> bytes:
    """Bool (H, W) → 8-bit PNG with 0 outside and 255 inside (opens as a picture anywhere)."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def read_png(path) -> np.ndarray:
    """A PNG written here → float [0, 1] (images) or bool (masks)."""
    with Image.open(path) as im:
        a = np.asarray(im)
    if a.dtype == np.uint16 or im.mode.startswith("I"):
        return a.astype(np.float32) / 65535
    return a > 127
