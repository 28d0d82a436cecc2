"""Join shard outputs (or any chexforge output folders of one plan) into one dataset.

Every source file's SHA-256 is checked against its manifest before it is taken; a job id that
appears twice must have the same image (then it is kept once), otherwise the merge stops and
names it. Files are hard-linked when source and target share a local file system, else copied
(atomically). The merged manifest, COCO file, recipe and dataset card are written last. A
refused merge removes what it wrote; the target is locked while the merge writes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import pyarrow.parquet as pq

from .. import atomic
from ..contracts import manifest as mc
from ..contracts.jobs import RECIPE_KEY, table_bytes, with_recipe
from ..contracts.limits import load_json
from ..errors import UserError
from ..export import manifest as mf
from ..recipe.loader import recipe_from_json, recipe_to_yaml
from ..store import Store, open_store
from .lock import OutputLock
from .runner import write_dataset_files


def _files(row: dict) -> list[tuple[str, str]]:
    out = [(row[k], row[h]) for k, h in (("image_png", "sha256_png"), ("image_dicom", "sha256_dicom"),
                                         ("seg_dicom", "sha256_seg")) if row.get(k)]
    out += [(m["path"], m["sha256"]) for m in row.get("masks") or []]
    return out


def merge(sources: list[str], out: str, progress=None, break_lock: bool = False) -> dict:
    """Join output folders of one plan into `out`. Everything that can refuse the merge is checked
    before anything is written (the recipes, conflicting duplicates); a file whose hash does not
    match its manifest stops it during the copy, and then every file this merge wrote is removed
    again, so a refused merge leaves `out` as it found it. `out` is locked while it is written."""
    if not sources:
        raise UserError("name the output folders to merge")
    tables, recipes = [], []
    for src in sources:
        store = open_store(src)
        if not store.exists(mc.MANIFEST) and not mf.part_names(store):
            raise UserError("no manifest.parquet: not a chexforge output folder", src)
        table = mf.read_manifest(store)
        meta = {}
        if store.exists(mc.MANIFEST):
            meta = pq.read_schema(io.BytesIO(store.read_bytes(mc.MANIFEST))).metadata or {}
        recipes.append(load_json(meta[RECIPE_KEY], src, "the recipe in its manifest") if RECIPE_KEY in meta else None)
        tables.append((store, table))
    known = [r for r in recipes if r is not None]
    if any(json.dumps(r, sort_keys=True) != json.dumps(known[0], sort_keys=True) for r in known[1:]):
        raise UserError("the folders were made from different recipes; merge shards of one plan only")
    if known:
        recipe_from_json(known[0], f"{sources[0]}/manifest.parquet")  # a damaged recipe refuses before any write
    taken, deduped = _select_rows(tables)  # refuses conflicting duplicates: nothing written yet
    target = open_store(out)
    fresh = target.local_path() is not None and not target.local_path().exists()
    if hasattr(target, "mkdir"):
        target.mkdir()
    created: list[str] = []
    try:
        with OutputLock(target, break_lock=break_lock):
            target.sweep()
            return _write(target, taken, deduped, known[0] if known else {}, created, progress)
    except BaseException:
        _roll_back(target, created, fresh)
        raise


def _select_rows(tables: list[tuple[Store, object]]) -> tuple[list[tuple[Store, dict]], int]:
    """Every job once, with the folder it comes from; a job id twice with different images stops
    the merge, naming it (an identical duplicate is kept once)."""
    seen: dict[str, tuple[Store, dict]] = {}
    taken, deduped = [], 0
    for store, table in tables:
        for row in table.to_pylist():
            job = row["job_id"]
            if job in seen:
                if _signature(row) != _signature(seen[job][1]):
                    raise UserError(f"job {job} is in {seen[job][0].root} and {store.root} with different images")
                deduped += 1
                continue
            seen[job] = (store, row)
            taken.append((store, row))
    return taken, deduped


def _write(target: Store, taken: list[tuple[Store, dict]], deduped: int, recipe_json: dict, created: list[str],
           progress) -> dict:
    rows_out, copied = [], 0
    for store, row in taken:
        if row["status"] == "ok":
            for rel, digest in _files(row):
                if _take(store, target, rel, digest):
                    created.append(rel)
                copied += 1
        rows_out.append(row)
        if progress:
            progress(len(rows_out))
    merged = mf.rows_to_table(rows_out)
    if recipe_json:
        merged = with_recipe(merged, recipe_json)
    for rel in (mc.MANIFEST, "recipe.yaml", "coco.json", "datalist.json", "metadata.parquet", "README.md"):
        if not target.exists(rel):
            created.append(rel)
    target.write_bytes(mc.MANIFEST, table_bytes(merged))
    for rel in mf.part_names(target):
        target.remove(rel)
    if recipe_json:
        target.write_text("recipe.yaml", recipe_to_yaml(recipe_from_json(recipe_json, "the merged recipe")))
    write_dataset_files(target, recipe_json, merged)
    ok = sum(r["status"] == "ok" for r in rows_out)
    return {"jobs": len(rows_out), "ok": ok, "failed": len(rows_out) - ok, "files": copied, "duplicates": deduped}


def _roll_back(target: Store, created: list[str], fresh: bool) -> None:
    """Remove the files a refused merge wrote, the folders it left empty, and `out` itself when
    the merge created it."""
    for rel in created:
        with contextlib.suppress(Exception):
            target.remove(rel)
    local = target.local_path()
    if local is None:
        return
    folders = sorted({os.path.dirname(rel) for rel in created if os.path.dirname(rel)}, key=len, reverse=True)
    for rel in folders:
        path = os.path.join(local, rel)
        while os.path.normpath(path) != os.path.normpath(local):
            try:
                os.rmdir(path)  # only when empty
            except OSError:
                break
            path = os.path.dirname(path)
    if fresh:
        with contextlib.suppress(OSError):
            os.rmdir(local)


def _signature(row: dict) -> tuple:
    return (row["status"], row.get("sha256_png"), row.get("sha256_dicom"), row.get("sha256_seg"))


def _take(source: Store, target: Store, rel: str, digest: str) -> bool:
    """Verify a file's hash at the source, then link or copy it into the target. Returns whether
    the file is new in the target."""
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
            return False
        dst_local.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src_local, dst_local)
            return True
        except OSError:
            data = src_local.read_bytes()
    new = not target.exists(rel)
    target.write_bytes(rel, data if data is not None else Path(src_local).read_bytes())
    return new


__all__ = ["merge"]
