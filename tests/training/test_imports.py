"""Module layout of the pipeline side: no import cycles, no private names shared across modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# repository folder -> package it is installed as (pyproject.toml package-dir)
PACKAGES = {
    "training": "socialrec.training",
    "compression": "socialrec.compression",
    "socialrec": "socialrec",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    pkg = PACKAGES[rel.parts[0]]
    return pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for folder in PACKAGES for p in sorted((ROOT / folder).glob("*.py"))}


def _top_level_imports(path: Path) -> set[str]:
    """socialrec modules imported at module level (function-level imports are lazy)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("socialrec"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("socialrec"))
    return out


def test_no_import_cycle_between_pipeline_modules() -> None:
    mods = _modules()
    graph = {m: {i for i in _top_level_imports(p) if i in mods and i != m} for m, p in mods.items()}
    done: set[str] = set()

    def visit(m: str, stack: list[str]) -> None:
        if m in stack:
            cycle = stack[stack.index(m) :] + [m]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if m in done:
            return
        for dep in sorted(graph[m]):
            visit(dep, [*stack, m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


def test_no_private_name_imported_from_another_module() -> None:
    folders = [*PACKAGES, "tests/training", "tests/compression", "tests/retrain"]
    bad = []
    for folder in folders:
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("socialrec"):
                    bad += [
                        f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}"
                        for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")
                    ]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "module",
    ["socialrec.training.synthetic", "socialrec.training.data", "socialrec.training.dataset"],
)
def test_each_data_module_imports_alone_in_a_fresh_interpreter(module: str) -> None:
    code = f"import {module}\nimport sys\nprint(sorted(m for m in sys.modules if m.startswith('socialrec.training')))"
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    if module == "socialrec.training.synthetic":
        assert "socialrec.training.data'" not in r.stdout  # the generator needs no file loader


def test_retrain_is_a_top_level_pipeline_stage() -> None:
    import socialrec.retrain as retrain

    assert retrain.RetrainConfig.__module__ == "socialrec.retrain"
    assert not (ROOT / "compression" / "retrain.py").exists()
