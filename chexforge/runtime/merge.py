"""Join shard outputs (or any chexforge output folders of one plan) into one dataset.

Every source file's SHA-256 is checked against its manifest before it is taken; a job id that
appears twice must have the same image (then it is kept once), otherwise the merge stops and
names it. Files are hard-linked when source and target share a local file system, else copied
(atomically). The merged manifest, COCO file, recipe and dataset card are written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pyarrow.parquet as pq

from .. import atomic
from ..contracts.jobs import RECIPE_KEY, table_bytes, with_recipe
from ..errors import UserError
from ..export import manifest as mf
from ..recipe.loader import recipe_to_yaml
from ..recipe.schema import Recipe
from ..store import Store, open_store
from .runner import write_dataset_files


def _files(row: dict) -> list[tuple[str, str]]:
    out = [(row[k], row[h]) for k, h in (("image_png", "sha256_png"), ("image_dicom", "sha256_dicom")) if row.get(k)]
    out += [(m["path"], m["sha256"]) for m in row.get("masks") or []]
    return out


def merge(sources: list[str], out: str, progress=None) -> dict:
    if not sources:
        raise UserError("name the output folders to merge")
    target = open_store(out)
    if hasattr(target, "mkdir"):
        target.mkdir()
    target.sweep()
    tables, recipes, seen = [], [], {}
    for src in sources:
        store = open_store(src)
        if not store.exists(mf.MANIFEST) and not mf.part_names(store):
            raise UserError("no manifest.parquet: not a chexforge output folder", src)
        table = mf.read_manifest(store)
        meta = {}
        if store.exists(mf.MANIFEST):
            meta = pq.read_schema(io.BytesIO(store.read_bytes(mf.MANIFEST))).metadata or {}
        recipes.append(json.loads(meta[RECIPE_KEY]) if RECIPE_KEY in meta else None)
        tables.append((store, table))
    known = [r for r in recipes if r is not None]
    if any(json.dumps(r, sort_keys=True) != json.dumps(known[0], sort_keys=True) for r in known[1:]):
        raise UserError("the folders were made from different recipes; merge shards of one plan only")
    rows_out, copied, deduped = [], 0, 0
    for store, table in tables:
        for row in table.to_pylist():
            job = row["job_id"]
            if job in seen:
                if _signature(row) != _signature(seen[job][1]):
                    raise UserError(f"job {job} is in {seen[job][0].root} and {store.root} with different images")
                deduped += 1
                continue
            seen[job] = (store, row)
            if row["status"] == "ok":
                for rel, digest in _files(row):
                    _take(store, target, rel, digest)
                    copied += 1
            rows_out.append(row)
            if progress:
                progress(len(rows_out))
    merged = mf.rows_to_table(rows_out)
    recipe_json = known[0] if known else {}
    if known:
        merged = with_recipe(merged, recipe_json)
    target.write_bytes(mf.MANIFEST, table_bytes(merged))
    for rel in mf.part_names(target):
        target.remove(rel)
    if recipe_json:
        target.write_text("recipe.yaml", recipe_to_yaml(Recipe.model_validate(recipe_json)))
    write_dataset_files(target, recipe_json, merged)
    ok = sum(r["status"] == "ok" for r in rows_out)
    return {"jobs": len(rows_out), "ok": ok, "failed": len(rows_out) - ok, "files": copied, "duplicates": deduped}


def _signature(row: dict) -> tuple:
    return (row["status"], row.get("sha256_png"), row.get("sha256_dicom"))


def _take(source: Store, target: Store, rel: str, digest: str) -> None:
    """Verify a file's hash at the source, then link or copy it into the target."""
    src_local, dst_local = source.local_path(rel), target.local_path(rel)
    data = source.read_bytes(rel) if src_local is None else None
    if src_local is not None:
        if not src_local.exists():
            raise UserError(f"{rel} is in the manifest but missing", source.root)
        actual = atomic.sha256_file(src_local)
    else:
        actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise UserError(f"{rel}: SHA-256 {actual[:12]}… does not match the manifest's {digest[:12]}…; the file changed "
                        "after it was written", source.root)
    if src_local is not None and dst_local is not None:
        if dst_local.exists():
            return
        dst_local.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src_local, dst_local)
            return
        except OSError:
            data = src_local.read_bytes()
    target.write_bytes(rel, data if data is not None else Path(src_local).read_bytes())


__all__ = ["merge"]
