"""Shared by the load-test files: the `socialrec` command as a subprocess, and the tiny
synthetic run they serve."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def socialrec_cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "socialrec.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
