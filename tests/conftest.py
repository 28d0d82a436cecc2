from __future__ import annotations

import os
import shutil
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PATIENCE = 300.0  # seconds a test waits for a state before it gives up: a safety net, never a timing


def required_tool(name: str, install: str) -> str:
    """The path of an external program a test needs. Missing: under CI=1 (set by .ci/run) the test
    fails, so a CI machine without it can never pass by skipping; elsewhere it is skipped."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} must be installed in CI ({install}; .ci/run installs it)")
        pytest.skip(f"{name} is not installed ({install})")
    return path


def wait_until(condition: Callable[[], object], what: str, timeout: float = PATIENCE) -> object:
    """Poll `condition` until it is true (and return its value). Tests wait for states (a part
    committed, a process gone), never for a number of seconds; `timeout` only keeps a broken run
    from hanging the suite, so it is far above any honest wait on a loaded machine."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"gave up after {timeout:.0f} s waiting for {what}"
        time.sleep(0.02)
    return value


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children(pid: int) -> dict[int, str]:
    """The live child processes of `pid` (Linux /proc): process id → start time (clock ticks)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(int(stat.parent.name))
        if fields and int(fields[1]) == pid and fields[0] not in "ZX":
            out[int(stat.parent.name)] = fields[19]
    return out


def exited(procs: dict[int, str]) -> bool:
    """Whether every process of `children(...)` has exited (a zombie or a reused id counts as gone)."""
    for pid, started in procs.items():
        fields = _stat(pid)
        if fields is not None and fields[0] not in "ZX" and fields[19] == started:
            return False
    return True


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture(scope="session")
def drr64():
    """One DRR backend for the session (each CT detail level is prepared once, as jobs ask for it)."""
    from chexforge.backends.drr.backend import DRRBackend
    from chexforge.backends.drr.options import DRROptions

    return DRRBackend(DRROptions())


@pytest.fixture(scope="session")
def drr128(drr64):
    return drr64  # the same backend: a job's size picks its level, not the backend


def job(**kw) -> dict:
    base = {"job_id": "t", "cohort": "c", "seed": 1, "view": "PA", "sex": "M", "age": 60, "size": 128,
            "anatomy": ["lungs", "lung_left", "lung_right", "heart"]}
    base.update(kw)
    return base


T5_WORDS = ["<pad>", "</s>", "<unk>"] + (
    "pa ap ll chest radiograph of a an year old woman man girl boy sex female male age race left right "
    "bilateral pleural effusion nodule lung mass no acute cardiopulmonary abnormality moderate small large "
    "cardiomegaly . , :").split()


def make_tiny_t5(folder, d_model: int = 32):
    """A T5 encoder and word-level tokenizer small enough to build in a test (no download)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(T5_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(T5_WORDS), d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                   decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny chexforge pipeline folder (random weights, control branch), built once."""
    from chexforge.models.build import init_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny"
    init_pipeline("tiny", "tiny", None, "tiny", None, seed=0).save(folder)
    return folder


def requested_masks_written(out: Path, finding_masks: bool) -> list[dict]:
    """Every ok row has a mask file for each structure its job named (`anatomy`) and, where the
    backend draws findings itself, for each finding it requested, with a box of that finding;
    each file is on disk, matches its hash and marks some pixels."""
    import pyarrow.parquet as pq

    from chexforge import atomic
    from chexforge.contracts.images import read_mask
    from chexforge.contracts.vocabulary import FINDING_NAMES, NO_FINDING

    rows = [r for r in pq.read_table(out / "manifest.parquet").to_pylist() if r["status"] == "ok"]
    assert rows
    for row in rows:
        findings = {f for f in FINDING_NAMES if f != NO_FINDING and row[f] == 1}
        wanted = set(row["anatomy"]) | (findings if finding_masks else set())
        assert {m["name"] for m in row["masks"]} == wanted, (row["cohort"], row["masks"])
        for m in row["masks"]:
            assert atomic.sha256_file(out / m["path"]) == m["sha256"] and read_mask(out / m["path"]).any(), m
        labels = {b["label"] for b in row["realised_boxes"]}
        assert labels <= findings and (not finding_masks or labels == findings), (row["cohort"], labels, findings)
        assert all(0 <= b["x0"] < b["x1"] <= 1 and 0 <= b["y0"] < b["y1"] <= 1 for b in row["realised_boxes"])
    return rows


def assert_finding_shows(normal, other_noise, ill, name: str, sign: int, sigmas: float = 3.0) -> np.ndarray:
    """The finding `name` changes `ill` against `normal` (same patient, pose and noise: only the
    finding differs) inside its mask, by more than `sigmas` noise SDs (from `other_noise`, another
    noise draw of `normal`), with the expected `sign` (denser = brighter, air = darker; 0: either,
    measured as a magnitude, as a fracture's darker gap and brighter overlap may cancel), barely
    anywhere far from it, and its boxes are exactly the mask's extent. Returns the mask."""
    from scipy import ndimage as ndi

    mask = ill.masks[name]
    assert mask.sum() > 10
    diff = ill.image - normal.image
    sigma = float((normal.image - other_noise.image)[mask].std() / np.sqrt(2))
    near = mask.copy()
    if name == "Pneumothorax":  # the collapsed lung, denser, belongs to the finding too
        near |= normal.masks["lung_left"] | normal.masks["lung_right"]
    far = ~ndi.binary_dilation(near, iterations=12)
    shift = float(np.median(diff[far]))  # the display's windowing may move everything a little
    inside = float(diff[mask].mean()) - shift if sign else float(np.abs(diff[mask] - shift).mean())
    assert abs(inside) > sigmas * sigma, (inside, sigma)
    if sign:
        assert np.sign(inside) == sign, inside
    assert float(np.abs(diff[far] - shift).mean()) < abs(inside) / 4  # the rest barely moves
    boxes = [b for b in ill.boxes if b["label"] == name]
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    assert min(b["x0"] for b in boxes) == pytest.approx(xs.min() / w)
    assert max(b["x1"] for b in boxes) == pytest.approx((xs.max() + 1) / w)
    assert max(b["y1"] for b in boxes) == pytest.approx((ys.max() + 1) / h)
    return mask
