"""The import layers of docs/architecture.md, checked over the source (module- and function-level
imports alike): a package imports only from packages on lower floors, so no cycle can form."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "chexforge"

# Lowest first; packages on one floor do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "atomic", "store", "devices"),
    ("contracts",),
    ("recipe", "labels"),
    ("priors",),
    ("plan",),
    ("models",),
    ("backends",),
    ("qc",),
    ("export",),
    ("runtime",),
    ("balance", "evaluate", "data"),
    ("cli",),
]
FLOOR = {pkg: i for i, floor in enumerate(LAYERS) for pkg in floor}
# Within the lowest floor the three modules stand alone except these (crash-safe writes and
# local stores both raise one-line errors; a store writes through `atomic`).
FLOOR0 = {("atomic", "errors"), ("store", "errors"), ("store", "atomic"), ("devices", "errors")}


def imported_packages(path: Path, root: Path = ROOT) -> set[str]:
    """The chexforge packages a module imports, wherever the import statement stands."""
    rel = path.relative_to(root).parts
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[:-1])[: len(rel) - node.level]
                module = ".".join(base + ([node.module] if node.module else []))
                if module:
                    out.add(module.split(".")[0])
                else:  # `from . import x` at the package root
                    out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("chexforge."):
                out.add(node.module.split(".")[1])
            elif node.module == "chexforge":
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("chexforge."))
    return out


def package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    return rel[0] if len(rel) > 1 else Path(rel[0]).stem


def test_every_package_has_a_floor():
    packages = {package_of(p) for p in ROOT.rglob("*.py")} - {"__init__", "__main__"}
    assert packages <= set(FLOOR), f"add {sorted(packages - set(FLOOR))} to LAYERS and docs/architecture.md"


def test_imports_follow_the_layers():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        src = package_of(path)
        if src in ("__init__", "__main__"):
            continue
        for dst in imported_packages(path) - {src, "__version__"}:
            if dst not in FLOOR:
                continue
            if FLOOR[dst] > FLOOR[src] or (FLOOR[dst] == FLOOR[src] and (src, dst) not in FLOOR0):
                wrong.append(f"{path.relative_to(ROOT.parent)}: {src} (floor {FLOOR[src]}) imports {dst} (floor {FLOOR[dst]})")
    assert not wrong, "imports against docs/architecture.md's layers:\n" + "\n".join(wrong)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    # The check itself must bite: imports inside functions, relative or absolute, are found.
    pkg = tmp_path / "chexforge" / "recipe"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from ..runtime import run\n    import chexforge.qc.rules\n"
                              "    from .schema import Recipe\n")
    assert imported_packages(pkg / "x.py", tmp_path / "chexforge") == {"runtime", "qc", "recipe"}
