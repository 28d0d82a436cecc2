"""The one image reader (chexforge/contracts/images.py): every mode a gray image can be saved in
reads back the same values, the bit depth comes from the file and never from the data, and
`chexforge eval` reads an RGB reference folder as it reads the gray originals."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from chexforge.cli import main
from chexforge.contracts.images import read_gray, read_mask, read_with_depth, resize
from chexforge.errors import UserError
from chexforge.evaluate.images import load_set
from chexforge.export.png import mask_bytes, png16_bytes

GRAY = (np.arange(48 * 40).reshape(48, 40) * 7 % 256).astype(np.uint8)  # every 8-bit level, in a pattern


def _save(tmp_path, name, im: Image.Image):
    path = tmp_path / name
    im.save(path)
    return path


def test_a_gray_image_reads_the_same_in_every_mode(tmp_path):
    expect = GRAY.astype(np.float32) / np.float32(255)
    gray = Image.fromarray(GRAY)
    rgba = gray.convert("RGBA")
    rgba.putalpha(77)  # alpha is ignored, not composited
    files = {
        "L": _save(tmp_path, "l.png", gray),
        "I;16": _save(tmp_path, "i16.png", Image.fromarray(GRAY.astype(np.uint16) * 257)),  # v/255 == 257v/65535
        "RGB": _save(tmp_path, "rgb.png", gray.convert("RGB")),
        "RGBA": _save(tmp_path, "rgba.png", rgba),
        "P": _save(tmp_path, "p.png", gray.convert("P")),
        "LA": _save(tmp_path, "la.png", gray.convert("LA")),
    }
    for mode, path in files.items():
        with Image.open(path) as im:
            assert im.mode == mode
        a = read_gray(path)
        assert a.dtype == np.float32 and a.shape == (48, 40)
        assert np.array_equal(a, expect), mode
    assert np.array_equal(read_gray(files["RGB"], 40), resize(expect, 40))  # read, then the one resize


def test_rgb_becomes_bt601_luma():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    buf.seek(0)
    a = read_gray(buf)
    want = np.array([[0.299, 0.587, 0.114, (2.99 + 11.74 + 3.42) / 255]], np.float32)
    assert np.allclose(a, want, rtol=0, atol=1e-7)


def test_a_dark_16_bit_image_is_not_rescaled_by_its_maximum(tmp_path):
    dark = np.array([[0, 100, 200], [50, 150, 255]], np.uint16)  # max ≤ 255, but a 16-bit file
    path = _save(tmp_path, "dark.png", Image.fromarray(dark))
    a, bits = read_with_depth(path)
    assert bits == 16
    assert np.array_equal(a, (dark / 65535).astype(np.float32))
    assert a.max() < 0.004
    assert np.array_equal(read_gray(path, 3), resize(a, 3))
    assert read_gray(path, 3).max() < 0.004


def test_the_chexforge_writers_round_trip(tmp_path):
    image = np.random.default_rng(2).random((30, 20), dtype=np.float32)
    back, bits = read_with_depth(io.BytesIO(png16_bytes(image)))
    assert bits == 16 and back.shape == (30, 20)
    assert np.abs(back - image).max() <= 0.5 / 65535 + 1e-7
    mask = np.zeros((30, 20), bool)
    mask[3:9, 4:15] = True
    assert np.array_equal(read_mask(io.BytesIO(mask_bytes(mask))), mask)


def test_resize_is_bilinear_area_and_keeps_the_range():
    a = np.zeros((64, 64), np.float32)
    a[:, 32:] = 1.0
    r = resize(a, 16)
    assert r.shape == (16, 16) and r.dtype == np.float32
    assert r.min() >= 0.0 and r.max() <= 1.0
    assert np.array_equal(r[:, :7], np.zeros((16, 7), np.float32)) and np.array_equal(r[:, 9:], np.ones((16, 7), np.float32))
    assert r.mean() == pytest.approx(0.5, abs=1e-6)  # the area is kept: half dark, half bright
    assert np.array_equal(resize(a, 64), a)
    checker = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)
    # Antialiased: one-pixel detail averages out (the border rows see half a kernel).
    assert np.allclose(resize(checker, 16)[1:-1, 1:-1], 0.5, atol=1e-6)


def test_an_unreadable_file_is_one_line(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError) as e:
        read_gray(bad)
    assert e.value.line().startswith(f"{bad}: unreadable image") and "\n" not in e.value.line()


def _smooth(seed: int, size: int = 40) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    r = np.random.default_rng(seed)
    img = sum(r.uniform(-1, 1) * np.exp(-((x - r.uniform()) ** 2 + (y - r.uniform()) ** 2) / 0.02) for _ in range(3))
    return ((img - img.min()) / np.ptp(img) * 255).round().astype(np.uint8)


def test_eval_reads_an_rgb_reference_as_its_gray_original(tmp_path):
    gray, rgb, gen = tmp_path / "gray", tmp_path / "rgb", tmp_path / "gen"
    for folder in (gray, rgb, gen):
        folder.mkdir()
    for i in range(6):
        Image.fromarray(_smooth(i)).save(gray / f"r{i}.png")
        Image.fromarray(_smooth(i)).convert("RGB").save(rgb / f"r{i}.png")
        Image.fromarray(_smooth(100 + i)).save(gen / f"g{i}.png")
    a, b = load_set(gray, 32), load_set(rgb, 32)
    assert a.ids == b.ids and np.array_equal(a.images, b.images)
    assert 0.3 < float(b.images.mean()) < 0.7  # not read as nearly all white (the old RGB bug)
    metrics = []
    for ref in (gray, rgb):
        dest = tmp_path / f"rep-{ref.name}"
        assert main(["eval", str(gen), "--reference", str(ref), "--features", "random", "--size", "32",
                     "--out", str(dest)]) == 0
        metrics.append(json.loads((dest / "metrics.json").read_text()))
    assert metrics[0]["fidelity"]["available"] and metrics[0]["fidelity"] == metrics[1]["fidelity"]
    for m in metrics:
        m["memorization"].pop("figure", None)
    assert metrics[0]["memorization"]["available"] and metrics[0]["memorization"] == metrics[1]["memorization"]
