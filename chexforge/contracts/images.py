"""The one image reader: any PNG or JPEG → grayscale float32 in [0, 1], and the one resize.

Everything that reads pixels (`chexforge eval`'s image sets, training data, masks, the contact
sheet) reads them here, so a file means the same numbers everywhere.

Modes read (as Pillow opens them):

    L                 8-bit gray                      value / 255
    I;16, I;16B, I    16-bit gray (PNG, TIFF)         value / 65535
    LA                8-bit gray + alpha              gray / 255 (alpha ignored)
    RGB, RGBA, RGBX   8-bit colour (+ alpha)          BT.601 luma / 255 (alpha ignored)
    P, PA             8-bit palette                   the palette's RGB, then as RGB
    1                 bilevel                         0 or 1
    CMYK, YCbCr       JPEG colour                     converted to RGB, then as RGB
    F                 32-bit float (TIFF)             taken as is

The bit depth comes from the file's mode, never from the pixel values: a dark 16-bit image stays
dark. Colour becomes gray by the BT.601 luma weights 0.299 R + 0.587 G + 0.114 B (Pillow's own
"L" conversion), computed exactly, so a gray image saved as RGB, RGBA or a gray palette reads
back the very values of the gray original. Alpha is ignored, not composited. Pillow opens a
16-bit RGB PNG as 8-bit RGB; it is read as such. Values are clipped to [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from ..errors import UserError

LUMA = (299, 587, 114)  # BT.601 weights in thousandths: integer arithmetic, exact for gray
DEPTH16 = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Pillow's modes of a 16-bit gray file
CONVERT_TO_RGB = ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


def pixels(im: Image.Image) -> tuple[np.ndarray, int]:
    """An opened image → (H×W float32 in [0, 1], its bit depth: 8, 16, or 32 for float files)."""
    mode = im.mode
    if mode in CONVERT_TO_RGB:
        im, mode = im.convert("RGBA" if mode in ("P", "PA") else "RGB"), "RGB"
    if mode == "1":
        im, mode = im.convert("L"), "L"
    a = np.asarray(im)
    if mode == "F":
        return np.clip(np.nan_to_num(a.astype(np.float32)), 0.0, 1.0), 32
    if mode in DEPTH16:
        scale, bits = 65535.0, 16
    elif mode in ("L", "LA", "RGB", "RGBA", "RGBX"):
        scale, bits = 255.0, 8
    else:
        raise ValueError(f"unsupported image mode {mode!r}")
    if a.ndim == 3 and a.shape[-1] >= 3:  # colour → luma, exact in integers
        a = (a[..., 0].astype(np.int64) * LUMA[0] + a[..., 1].astype(np.int64) * LUMA[1]
             + a[..., 2].astype(np.int64) * LUMA[2]).astype(np.float64) / (1000.0 * scale)
    else:
        a = (a[..., 0] if a.ndim == 3 else a).astype(np.float64) / scale
    return np.clip(a, 0.0, 1.0).astype(np.float32), bits


def read_gray(source: str | Path | IO[bytes], size: int | None = None) -> np.ndarray:
    """A PNG/JPEG (a path or a binary file object) → H×W float32 in [0, 1]; size×size (see
    `resize`) when `size` is given. An unreadable file is a UserError naming it."""
    return read_with_depth(source, size)[0]


def read_with_depth(source: str | Path | IO[bytes], size: int | None = None) -> tuple[np.ndarray, int]:
    """`read_gray` and the file's bit depth (8, 16, or 32 for float files)."""
    try:
        with Image.open(source) as im:
            a, bits = pixels(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"unreadable image ({e})", source if isinstance(source, (str, Path)) else None) from None
    return (resize(a, size) if size is not None else a), bits


def read_mask(source: str | Path | IO[bytes], size: int | None = None) -> np.ndarray:
    """A mask image → H×W bool: inside where the gray value is above one half (chexforge writes 0 / 255).
    An 8-bit gray file at its own size (every mask chexforge writes) is compared on its bytes,
    value > 127, which is value / 255 > 0.5 without the float image (a third of the time per mask
    at 512 px, read for every mask by coco.json, eval and the dataset classes)."""
    if size is None:
        try:
            with Image.open(source) as im:
                if im.mode == "L":
                    return np.asarray(im) > 127
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise UserError(f"unreadable image ({e})", source if isinstance(source, (str, Path)) else None) from None
        if not isinstance(source, (str, Path)):
            source.seek(0)
    return read_gray(source, size) > 0.5


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """H×W float → size×size float32 in [0, 1]; the aspect ratio is not kept. Pillow's bilinear
    filter on the float image: when shrinking its support widens with the scale (antialiased, a
    triangle-weighted area average), when enlarging it is plain bilinear interpolation. It never
    overshoots, so values stay in [0, 1]."""
    image = np.asarray(image, np.float32)
    if image.shape == (size, size):
        return image
    out = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return np.clip(out, 0.0, 1.0).astype(np.float32)
