"""Export cost per image at 512²: 16-bit PNG, DICOM DX, one mask PNG.

Baseline in the same run: writing the raw uint16 pixels with numpy (`ndarray.tofile`), the
floor any encoder is compared against.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from chexforge import atomic  # noqa: E402
from chexforge.export.dicom import dx_bytes  # noqa: E402
from chexforge.export.png import mask_bytes, png16_bytes  # noqa: E402

JOB = {"job_id": "0123456789abcdef", "cohort": "bench", "sex": "F", "age": 60, "view": "PA", "prompt": "PA chest radiograph."}


def per_image_ms(fn, n: int) -> float:
    fn(0)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n * 1000


def main(size: int = 512, n: int = 40) -> None:
    rng = np.random.default_rng(0)
    # A radiograph-like image: smooth structure plus noise (pure noise would not compress at all).
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = (0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy) + 0.02 * rng.standard_normal((size, size))).clip(0, 1).astype(np.float32)
    mask = (xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        raw = per_image_ms(lambda i: (image * 65535).astype(np.uint16).tofile(out / f"{i}.raw"), n)
        png = per_image_ms(lambda i: atomic.write_bytes(out / f"{i}.png", png16_bytes(image)), n)
        dcm = per_image_ms(lambda i: atomic.write_bytes(out / f"{i}.dcm", dx_bytes(image, {**JOB, "job_id": f"{i:016x}"}, 0.7)), n)
        msk = per_image_ms(lambda i: atomic.write_bytes(out / f"{i}_m.png", mask_bytes(mask)), n)
    print(f"machine: {machine()}")
    print(f"{size}² per image: raw uint16 {raw:.1f} ms | PNG-16 {png:.1f} ms | DICOM DX {dcm:.1f} ms | mask PNG {msk:.1f} ms")
    print(f"ratio to raw write: PNG {png / raw:.1f}x, DICOM {dcm / raw:.1f}x (files are hashed and fsynced; raw is not)")


if __name__ == "__main__":
    main()
