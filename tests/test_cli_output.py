"""Terminal output read through a pipe (a CI log): rich falls back to 80 columns when stdout is not
a terminal and cut wide tables with "…"; the CLI's consoles take $COLUMNS, else 200 columns, and
its tables fold a word that does not fit instead of cropping it. Run as subprocesses, so stdout
really is a pipe."""

from __future__ import annotations

import os
import subprocess
import sys

from chexforge.contracts.backends import BACKENDS
from tests.conftest import write

LONG = "inpatients-over-eighty-with-cooccurring-effusion-cardiomegaly-and-support-devices"
WIDE = f"""
name: wide
seed: 1
backend: simulated
output: {{size: 64, formats: [png]}}
cohorts:
  - name: {LONG}
    count: 50
    view: {{AP: 0.7, PA: 0.3}}
    findings: {{Effusion: 0.5, Cardiomegaly: 0.5, Support Devices: 0.6, Enlarged Cardiomediastinum: 0.3,
               Lung Opacity: 0.4, Atelectasis: 0.3, Pneumothorax: 0.2, Consolidation: 0.2}}
  - {{name: outpatients, count: 20}}
"""


def piped(*args: str, columns: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    if columns is not None:
        env["COLUMNS"] = columns
    proc = subprocess.run([sys.executable, "-m", "chexforge.cli", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_plan_of_a_wide_recipe_through_a_pipe_is_not_cropped(tmp_path):
    recipe = write(tmp_path, WIDE)
    out = piped("plan", str(recipe), "--show", "2")
    assert "…" not in out
    assert LONG in out  # the whole cohort name, on one line
    assert max(len(line) for line in out.splitlines()) > 120  # wider than the 80 columns rich falls back to
    flat = " ".join(out.split())
    for text in ("Enlarged Cardiomediastinum 28%", "Support Devices 60%", "AP 70%, PA 30%", "outpatients"):
        assert text in flat, text
    # A narrow $COLUMNS is obeyed, and still nothing is cut: long words fold onto the next line.
    narrow = piped("plan", str(recipe), columns="60")
    assert "…" not in narrow and max(len(line) for line in narrow.splitlines()) <= 60
    assert "inpatie" in narrow and "ices" in narrow


def test_backends_through_a_pipe_lists_everything():
    out = piped("backends")
    assert "…" not in out
    flat = " ".join(out.split())
    for b in BACKENDS.values():
        assert b.name in out
        for f in b.findings:  # every finding of every backend, cell wrapping aside
            assert f.split()[-1] in flat
        assert ", ".join(b.layouts) in flat


def test_recipe_paths_named_in_the_makefile_and_docs_exist():
    """`make help` once named recipes/effusion.yaml, which never existed (the recipe is
    recipes/effusion-laterality.yaml): every recipes/... path the Makefile, the README or docs/
    name must be there (a glob must match something)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    texts = [root / "Makefile", root / "README.md", *sorted((root / "docs").glob("*.md"))]
    named = {(p.name, m) for p in texts for m in re.findall(r"recipes/[A-Za-z0-9_.*-]+\.ya?ml", p.read_text())}
    assert any(m == "recipes/quickstart.yaml" for _, m in named)  # the pattern finds what is there
    missing = [f"{name}: {m}" for name, m in sorted(named) if not list(root.glob(m))]
    assert not missing, missing
