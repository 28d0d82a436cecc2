"""PNG encoding: 16-bit grayscale images and 8-bit masks (0 / 255). Reading is
chexforge/contracts/images.py's one reader; `read_png` here only picks image or mask by depth."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..contracts.images import read_with_depth


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
    """A PNG written here → float [0, 1] (a 16-bit image) or bool (an 8-bit mask, inside > one half)."""
    a, bits = read_with_depth(path)
    return a if bits == 16 else a > 0.5
