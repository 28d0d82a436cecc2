"""PNG encoding: 16-bit grayscale images and 8-bit masks (0 / 255). They read back through
chexforge/contracts/images.py (`read_gray`, `read_mask`), the one reader."""

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
