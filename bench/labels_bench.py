"""Reading real label files: chexforge's readers against a plain pandas read of the same file.

The baseline is `pandas.read_csv` of the file alone (no validation, no mapping); chexforge's
reader parses, validates every label and demographic cell and maps to the vocabulary.
Target: a 200,000-row label file in seconds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from chexforge.labels.readers import read_labels, resolve  # noqa: E402


def main() -> None:
    print(f"machine: {machine()}")
    for name in ("xrv:chexpert", "xrv:nih", "xrv:padchest"):
        path = resolve(name)
        t0 = time.perf_counter()
        raw = pd.read_csv(path, low_memory=False)
        base = time.perf_counter() - t0
        t0 = time.perf_counter()
        tidy = read_labels(name)
        ours = time.perf_counter() - t0
        print(f"{name}: {len(raw):,} rows | pandas read_csv {base:.2f} s | chexforge reader {ours:.2f} s "
              f"({len(tidy) / ours:,.0f} rows/s, {ours / base:.1f}x the bare read)")


if __name__ == "__main__":
    main()
