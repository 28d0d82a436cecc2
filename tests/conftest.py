from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture(scope="session")
def drr64():
    """One DRR backend for the session (the CT is prepared once; 64 px images are fast)."""
    from chexforge.backends.drr.backend import DRRBackend
    from chexforge.backends.drr.options import DRROptions

    return DRRBackend(DRROptions(), size=64)


@pytest.fixture(scope="session")
def drr128():
    from chexforge.backends.drr.backend import DRRBackend
    from chexforge.backends.drr.options import DRROptions

    return DRRBackend(DRROptions(), size=128)


def job(**kw) -> dict:
    base = {"job_id": "t", "cohort": "c", "seed": 1, "view": "PA", "sex": "M", "age": 60, "size": 128,
            "anatomy": ["lungs", "lung_left", "lung_right", "heart"]}
    base.update(kw)
    return base
