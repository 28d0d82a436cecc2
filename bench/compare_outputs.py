"""Compare two chexforge output folders, for refactors that must keep behaviour.

    python bench/compare_outputs.py BEFORE AFTER

Every file (images, masks, DICOM, COCO, card, recipe, contact sheet) byte for byte, and the
manifest cell by cell without what differs from run to run by nature: the timing columns and the
backend's `meta.seconds`. Exit status 1 when anything differs.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

SKIP = {".run.json", "manifest.parquet"}  # the heartbeat, and the manifest (compared by cell below)


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and ".parts" not in p.parts and p.name not in SKIP}


def manifest_rows(root: Path):
    table = pq.read_table(root / "manifest.parquet")
    table = table.drop([c for c in table.column_names if c.startswith("seconds_")])
    rows = table.to_pylist()
    for row in rows:
        meta = json.loads(row["meta"]) if row.get("meta") else {}
        meta.pop("seconds", None)
        row["meta"] = meta
    return table.schema, rows


def main(a: Path, b: Path) -> int:
    fa, fb = file_hashes(a), file_hashes(b)
    files = sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
    (sa, ra), (sb, rb) = manifest_rows(a), manifest_rows(b)
    cells = [(i, k) for i, (x, y) in enumerate(zip(ra, rb)) for k in x.keys() | y.keys() if x.get(k) != y.get(k)]
    print(f"files: {len(fa)} vs {len(fb)}, differing: {files[:20] or 'none'}")
    print(f"manifest: {len(ra)} vs {len(rb)} rows, schema {'equal' if sa.equals(sb, check_metadata=True) else 'DIFFERENT'}, "
          f"differing cells (row, column): {cells[:20] or 'none'}")
    same = not files and not cells and len(ra) == len(rb) and sa.equals(sb, check_metadata=True)
    print("same" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
