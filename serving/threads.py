"""Thread pinning for serving processes, importable before numpy, ONNX Runtime or FAISS."""

from __future__ import annotations

import os


def pin_threads() -> None:
    """One thread per library per worker (docs/design.md "Performance rules"); call before
    numpy, ONNX Runtime or FAISS are imported, so their pools start with one thread."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
