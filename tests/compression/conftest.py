"""Shared fixtures: one tiny synthetic training run, its teacher, and bundles built from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from socialrec.compression.export import bundle_meta, write_bundle
from socialrec.compression.quantize import quantize_tables
from socialrec.training.data import DataConfig
from socialrec.training.distill import DistillConfig, distill
from socialrec.training.model import TwoTower
from socialrec.training.run import RunConfig, load_run, run
from socialrec.training.train import TrainConfig, load_checkpoint, tower_config

TINY = DataConfig(
    dataset="synthetic",
    synthetic_users=400,
    synthetic_items=300,
    synthetic_interactions=8000,
    seed=5,
)
FAST = TrainConfig(dim=32, epochs=12, batch_size=128, lr=5e-3, patience=6, eval_every=2, threads=1)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete `socialrec train` run directory on tiny synthetic data (~10 s)."""
    out = tmp_path_factory.mktemp("run")
    return run(RunConfig(out=str(out), data=TINY, train=FAST, progress=False))


@pytest.fixture(scope="session")
def loaded(run_dir: Path):
    """(teacher, checkpoint, dataset, split, report) of the tiny run."""
    teacher, ck = load_checkpoint(run_dir / "teacher.pt")
    ds, split, report = load_run(run_dir)
    return teacher, ck, ds, split, report


@pytest.fixture(scope="session")
def student(loaded) -> TwoTower:
    """A 16-dim student distilled from the tiny teacher for a few epochs."""
    teacher, ck, _, split, _ = loaded
    tc = TrainConfig(**{**ck["train_config"], "threads": 1})
    torch.manual_seed(0)
    fresh = TwoTower(
        tower_config(TrainConfig(**{**ck["train_config"], "dim": 16}), split.n_users, split.n_items)
    )
    model, _ = distill(teacher, fresh, split, tc, {"content": 8, "friends": 8}, DistillConfig())
    return model.eval()


def make_bundle(loaded, model: TwoTower, out: Path, index: str = "flat", **kw) -> Path:
    """Bundle of ``model`` on the tiny run (what compression.run writes per variant)."""
    _, ck, ds, split, _ = loaded
    meta = bundle_meta(ds, split, ck["train_config"], {"name": out.name, "techniques": []}, {})
    return write_bundle(model, split, ds.user_ids, ds.item_ids, out, meta, index, **kw)


@pytest.fixture(scope="session")
def bundle_factory(loaded):
    """``make(model, out_dir, index="flat", **write_bundle_kwargs) -> bundle dir``."""
    return lambda model, out, index="flat", **kw: make_bundle(loaded, model, out, index, **kw)


@pytest.fixture(scope="session")
def bundles(loaded, student, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 teacher, fp32 student and int8 student bundles (+ their torch models)."""
    root = tmp_path_factory.mktemp("bundles")
    teacher = loaded[0]
    q = quantize_tables(student, 8)
    return {
        "teacher": make_bundle(loaded, teacher, root / "teacher"),
        "student": make_bundle(loaded, student, root / "student"),
        "student-int8": make_bundle(loaded, q, root / "student-int8", "sq8"),
        "student-int4": make_bundle(
            loaded, quantize_tables(student, 4), root / "student-int4", "sq8"
        ),
    }
