"""A contact sheet: a grid of generated images with their masks and boxes drawn on, captioned."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from ..contracts.images import read_gray, read_mask
from ..contracts.jobs import laterality_column
from ..contracts.vocabulary import FINDING_NAMES, NO_FINDING
from ..plan.summary import ok_mask
from ..store import Store, open_store

ANATOMY_COLOURS = {"lungs": (60, 220, 90), "lung_left": (60, 220, 90), "lung_right": (60, 220, 90), "heart": (235, 70, 70)}
LESION_COLOUR = (255, 210, 0)
BOX_COLOURS = [(0, 160, 255), (255, 120, 0), (200, 80, 255), (0, 220, 220), (255, 60, 160)]


def _outline(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def tile(store: Store, row: dict, size: int, overlays: bool = True) -> Image.Image:
    image = read_gray(io.BytesIO(store.read_bytes(row["image_png"]))) if row.get("image_png") else \
        _dicom_pixels(io.BytesIO(store.read_bytes(row["image_dicom"])))
    grey = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    rgb = np.stack([grey] * 3, -1)
    if overlays:
        for m in row.get("masks") or []:
            mask = read_mask(io.BytesIO(store.read_bytes(m["path"])))
            colour = ANATOMY_COLOURS.get(m["name"], LESION_COLOUR)
            rgb[_outline(mask)] = colour
    im = Image.fromarray(rgb).resize((size, size), Image.BILINEAR)
    if overlays:
        draw = ImageDraw.Draw(im)
        labels = sorted({b["label"] for b in row.get("realised_boxes") or []})
        for box in row.get("realised_boxes") or []:
            colour = BOX_COLOURS[labels.index(box["label"]) % len(BOX_COLOURS)]
            xy = [box["x0"] * size, box["y0"] * size, box["x1"] * size - 1, box["y1"] * size - 1]
            draw.rectangle(xy, outline=colour, width=2)
            draw.text((xy[0] + 2, max(0, xy[1] - 11)), box["label"], fill=colour, font=ImageFont.load_default())
    return im


def _dicom_pixels(data) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(data)
    return ds.pixel_array.astype(np.float32) / (2 ** int(ds.BitsStored) - 1)


def row_findings(row: dict) -> list[str]:
    """The findings a manifest row has, No Finding aside, in vocabulary order."""
    return [f for f in FINDING_NAMES if f != NO_FINDING and row.get(f)]


def caption(row: dict) -> str:
    present = row_findings(row)
    lat = [row.get(laterality_column(f)) for f in present]
    text = ", ".join(f"{f} {side}" if side else f for f, side in zip(present, lat)) or NO_FINDING
    return f"{row['cohort']} · {row['view']} {row['sex']}{row['age']}\n{text}"


def contact_sheet(out: Store | str | Path, manifest: pa.Table, n: int = 24, tile_px: int = 256, columns: int = 6,
                  overlays: bool = True) -> bytes:
    """PNG bytes of up to `n` images, spread evenly over the cohorts."""
    store = out if isinstance(out, Store) else open_store(out)
    ok = manifest.filter(ok_mask(manifest)).to_pylist()
    picked = _spread(ok, n)
    if not picked:
        raise ValueError("no images to show")
    return draw_sheet(store, picked, tile_px, columns, overlays)


def draw_sheet(store: Store, rows: list[dict], tile_px: int = 256, columns: int = 6, overlays: bool = True) -> bytes:
    """PNG bytes of these manifest rows' images, in order, left to right and top to bottom."""
    columns = min(columns, len(rows))
    cap = 30
    sheet = Image.new("RGB", (columns * tile_px, -(-len(rows) // columns) * (tile_px + cap)), (18, 18, 18))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, row in enumerate(rows):
        x, y = (i % columns) * tile_px, (i // columns) * (tile_px + cap)
        sheet.paste(tile(store, row, tile_px, overlays), (x, y))
        draw.multiline_text((x + 4, y + tile_px + 2), caption(row), fill=(230, 230, 230), font=font, spacing=2)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def _spread(rows: list[dict], n: int) -> list[dict]:
    """Round-robin over cohorts so every cohort shows up."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["cohort"], []).append(r)
    out: list[dict] = []
    while len(out) < n and any(by.values()):
        for k in list(by):
            if by[k] and len(out) < n:
                out.append(by[k].pop(0))
    return out
