"""Shared by the load-test files: the tiny synthetic run they serve (and, re-exported,
the `socialrec` command as a subprocess)."""

from __future__ import annotations

from pathlib import Path

from ..conftest import socialrec_cli


def train_tiny_run(out: Path) -> Path:
    """A tiny synthetic run (fixed recipe, no hyperparameter search, no distillation) at
    ``out``."""
    r = socialrec_cli(
        "train", "--synthetic-users", "400", "--synthetic-items", "250",
        "--synthetic-interactions", "8000", "--epochs", "3", "--dim", "16", "--threads", "1",
        "--tune-budget", "0", "--no-refine", "--no-progress", "--out", str(out), timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return out
