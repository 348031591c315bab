"""Shared fixtures: a tiny base training run and its bundle, published into a fresh root per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from socialrec.training.data import DataConfig
from socialrec.training.train import TrainConfig

TINY = DataConfig(
    dataset="synthetic",
    synthetic_users=200,
    synthetic_items=150,
    synthetic_interactions=3000,
    seed=3,
)
FAST = TrainConfig(dim=16, epochs=6, batch_size=128, lr=5e-3, patience=4, eval_every=2, threads=1)


@pytest.fixture(scope="session")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `socialrec train` run on tiny synthetic data plus its fp32 bundle (~5 s)."""
    from socialrec.compression.export import export_run
    from socialrec.training.run import RunConfig, run

    out = run(
        RunConfig(out=str(tmp_path_factory.mktemp("base")), data=TINY, train=FAST, progress=False)
    )
    export_run(out)
    return out


@pytest.fixture
def root(base_run: Path, tmp_path: Path) -> Path:
    """A bundle root whose CURRENT is the base run's bundle (what the pipeline job leaves)."""
    from socialrec.serving.rollout import publish_bundle

    r = tmp_path / "bundles"
    publish_bundle(r, base_run / "bundle")
    return r


def copy_run(base_run: Path, dst: Path) -> Path:
    """A private copy of the base run (tests that change its files)."""
    shutil.copytree(base_run, dst)
    return dst
