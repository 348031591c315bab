"""Teacher model, training task, checkpoints, the train CLI and a 2-process DDP run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from socialrec.training.data import DataConfig
from socialrec.training.model import (
    TowerConfig,
    TwoTower,
    multinomial_nll,
    normalise,
    pool,
    sampled_nll,
    with_bias_slot,
)
from socialrec.training.run import RunConfig, prepare, run
from socialrec.training.split import validation_split
from socialrec.training.train import (
    TrainConfig,
    evaluate_model,
    load_checkpoint,
    save_checkpoint,
    train_teacher,
)

from ..conftest import socialrec_cli

ROOT = Path(__file__).resolve().parents[2]
SMALL = DataConfig(
    dataset="synthetic",
    synthetic_users=600,
    synthetic_items=300,
    synthetic_interactions=12000,
    seed=3,
)
FAST = TrainConfig(dim=64, epochs=30, batch_size=128, lr=5e-3, patience=8, eval_every=2, threads=1)


def test_pool_and_normalise_literal() -> None:
    table = torch.nn.Embedding(3, 2)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
    ids = torch.tensor([[0, 1, 2]])
    w = normalise(torch.tensor([[3.0, 4.0, 0.0]]))  # (1, 3): 3/5, 4/5, padding stays 0
    assert torch.allclose(w, torch.tensor([[0.6, 0.8, 0.0]]))
    assert torch.allclose(pool(table, ids, w), torch.tensor([[0.6, 0.8]]))
    assert torch.equal(normalise(torch.zeros(1, 3)), torch.zeros(1, 3))  # empty history: no NaN
    assert torch.equal(with_bias_slot(torch.tensor([[2.0, 3.0]])), torch.tensor([[2.0, 3.0, 1.0]]))


def test_multinomial_nll_literal_and_masked() -> None:
    logits = torch.tensor([[0.0, 0.0, float("-inf")]])  # third candidate masked (e.g. self)
    target = torch.tensor([[1.0, 0.0, 0.0]])
    # softmax over the two live logits is 1/2 each -> -log(1/2)
    assert math.isclose(float(multinomial_nll(logits, target)), math.log(2), rel_tol=1e-6)


def test_sampled_nll_matches_manual_softmax() -> None:
    torch.manual_seed(0)
    u = torch.randn(1, 4)
    table = torch.randn(6, 4)
    bias = torch.randn(6)
    log_q = torch.log(torch.full((6,), 1 / 6))
    pos = torch.tensor([[1, 2]])
    mask = torch.tensor([[1.0, 1.0]])
    neg = torch.tensor([0, 2, 5])  # 2 is an accidental hit: must be masked out
    got = sampled_nll(u, table, bias, pos, mask, neg, log_q)
    s = u[0] @ table.T + bias - log_q  # (6,)
    want = 0.0
    for p in (1, 2):
        denom = torch.logsumexp(torch.stack([s[p], s[0], s[5]]), 0)
        want += float(denom - s[p]) / 2
    assert math.isclose(float(got), want, rel_tol=1e-5)


def test_tower_runs_for_unseen_user_and_empty_inputs() -> None:
    m = TwoTower(TowerConfig(n_items=10, n_users=5, dim=8)).eval()
    # A user not in the training data is just a history and friends: no user-id lookup.
    hist = torch.tensor([[3, 7, 0]])
    hw = torch.tensor([[2.0, 1.0, 0.0]])
    fr = torch.tensor([[0]])
    fw = torch.tensor([[0.0]])  # no friends
    u_c, u_f = m.user_tower(hist, hw, fr, fw)
    assert u_c.shape == (1, 8) and u_f.shape == (1, 8)
    assert torch.isfinite(u_c).all() and torch.isfinite(u_f).all()
    # Inner-product search with the bias slot gives the same scores as the logits.
    v = m.item_vectors()
    assert torch.allclose(with_bias_slot(u_c) @ v.T, m.content_logits(u_c), atol=1e-6)


@pytest.fixture(scope="module")
def small_run() -> tuple:
    cfg = RunConfig(out="unused", data=SMALL, train=FAST, progress=False)
    ds, split = prepare(cfg)
    model, log = train_teacher(split, validation_split(split), FAST, progress=False)
    return ds, split, model, log


def test_teacher_beats_most_popular_on_synthetic(small_run) -> None:
    from socialrec.training.baselines import most_popular
    from socialrec.training.metrics import Graph, evaluate

    _, split, model, log = small_run
    got = evaluate_model(model, split)
    pop = evaluate(
        most_popular(split),
        Graph(split.n_users, split.train_user, split.train_item),
        Graph(split.n_users, split.test_user, split.test_item),
    )
    assert got["content"]["recall@20"] > 1.2 * pop["recall@20"], (got, pop)
    assert got["friends"]["recall@20"] > 0.05
    assert log["best"]["content"]["epoch"] >= 1


def test_checkpoint_round_trip(small_run, tmp_path: Path) -> None:
    _, split, model, _ = small_run
    path = save_checkpoint(model, FAST, tmp_path / "teacher.pt")
    loaded, ck = load_checkpoint(path)
    assert ck["train_config"]["dim"] == FAST.dim and ck["tower_config"]["n_items"] == split.n_items
    assert evaluate_model(loaded, split) == evaluate_model(model, split)


def test_training_is_seeded(small_run) -> None:
    _, split, model, _ = small_run
    cfg = replace(FAST, epochs=2, eval_every=1)
    a, _ = train_teacher(split, validation_split(split), cfg, progress=False)
    b, _ = train_teacher(split, validation_split(split), cfg, progress=False)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka


def test_early_stop_says_why_selection_ended(small_run, capsys) -> None:
    """Early stopping prints the epoch, the best validation recall@20 and the patience."""
    from socialrec.training.train import fit

    _, split, _, _ = small_run
    val = validation_split(split)
    cfg = replace(FAST, epochs=40, patience=1, eval_every=1)
    _, log = fit(val, cfg, cfg.epochs, val=val, progress=True, desc="select")
    out = capsys.readouterr().out
    assert "stopped_early" in log, log["epochs"][-1]
    stop = log["stopped_early"]
    best = log["best"]
    assert f"select: early stop at epoch {stop} of 40" in out
    assert "(patience)" in out and "last 1 epochs" in out
    for task in ("content", "friends"):
        b = best[task]
        assert f"{task} {b['val_recall@20']:.4f} at epoch {b['epoch']}" in out


def test_sampled_softmax_path_learns(monkeypatch, small_run) -> None:
    """Large catalogues train with sampled softmax + log-Q; force it on small data."""
    import socialrec.training.train as tr

    _, split, _, _ = small_run
    monkeypatch.setattr(tr, "FULL_SOFTMAX_MAX", 10)
    cfg = replace(FAST, negatives=128)
    model, log = train_teacher(split, validation_split(split), cfg, progress=False)
    assert log["softmax"] == {"content": "sampled", "friends": "sampled"}
    from socialrec.training.baselines import most_popular
    from socialrec.training.metrics import Graph, evaluate

    pop = evaluate(
        most_popular(split),
        Graph(split.n_users, split.train_user, split.train_item),
        Graph(split.n_users, split.test_user, split.test_item),
    )
    assert evaluate_model(model, split)["content"]["recall@20"] > pop["recall@20"]


def test_run_writes_report_and_split(tmp_path: Path) -> None:
    cfg = RunConfig(
        out=str(tmp_path / "run"), data=SMALL, train=replace(FAST, epochs=4), progress=False
    )
    out = run(cfg)
    report = json.loads((out / "report.json").read_text())
    keys = {"recall@10", "recall@20", "ndcg@10", "ndcg@20"}
    assert set(report["content"]) == {"MostPopular", "ItemKNN", "EASE", "teacher"}
    assert set(report["friends"]) == {"CommonNeighbors", "AdamicAdar", "teacher", "teacher+fof"}
    for task in ("content", "friends"):
        for m in report[task].values():
            assert set(m) == keys and all(0.0 <= v <= 1.0 for v in m.values())
    assert report["dataset"]["users"] == 600
    assert (out / "split" / "SPLIT_SHA256").read_text().strip() == report["split"]["sha256"]
    assert (out / "teacher.pt").exists()


def _cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return socialrec_cli(*args, timeout=timeout, env=env)


def test_cli_split_matches_train_split(tmp_path: Path) -> None:
    """`split` and `train` share the default seed: the exported split is the one scored."""
    size = [
        "--synthetic-users",
        "400",
        "--synthetic-items",
        "200",
        "--synthetic-interactions",
        "6000",
    ]
    r = _cli("split", *size, "--export", str(tmp_path / "split"))
    assert r.returncode == 0, r.stderr
    r = _cli(
        "train",
        *size,
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "2",
        "--dim",
        "16",
        "--threads",
        "1",
        "--tune-budget",
        "0",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert "teacher" in r.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert (tmp_path / "split" / "SPLIT_SHA256").read_text().strip() == report["split"]["sha256"]
    for name in ("content_train.tsv", "content_test.tsv", "friends_train.tsv", "friends_test.tsv"):
        assert (tmp_path / "split" / name).read_bytes() == (
            tmp_path / "run" / "split" / name
        ).read_bytes()


def test_cli_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("user\titem\tweight\nu1\ti1\t3\nu2\ti2\t-1\n")
    r = _cli(
        "split", "--dataset", "tsv", "--interactions", str(bad), "--export", str(tmp_path / "o")
    )
    assert r.returncode == 2
    assert f"{bad}:3:" in r.stderr and "weight" in r.stderr


def _interactions_only_tsv(path: Path) -> Path:
    """A tsv dataset with no friends file: the synthetic generator's interactions only."""
    from socialrec.training.synthetic import SyntheticConfig, generate

    ds = generate(SyntheticConfig(n_users=400, n_items=300, n_interactions=8000, seed=5))
    rows = zip(
        ds.inter_user.tolist(), ds.inter_item.tolist(), ds.inter_weight.tolist(), strict=True
    )
    path.write_text("user\titem\tweight\n" + "".join(f"u{u}\ti{i}\t{w!r}\n" for u, i, w in rows))
    return path


def test_dataset_without_friends_reports_the_friends_task_absent(tmp_path: Path) -> None:
    """No friend graph: report.json says the friends task is absent (no baseline, no teacher
    row, no 0.0), the table prints one line saying so, and selection ignores that head."""
    inter = _interactions_only_tsv(tmp_path / "interactions.tsv")
    out = tmp_path / "run"
    args = ["--interactions", str(inter), "--out", str(out), "--epochs", "6", "--dim", "16"]
    r = _cli("train", "--dataset", "tsv", *args, "--threads", "1", "--tune-budget", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["friend_pairs"] == 0
    assert report["friends"] == {"absent": True, "reason": "no friend pairs in the dataset"}
    # "teacher pre-KD" when the distilled teacher won the content head on validation.
    rows = {"MostPopular", "ItemKNN", "EASE", "teacher"}
    assert rows <= set(report["content"]) <= rows | {"teacher pre-KD"}
    assert report["content"]["teacher"]["recall@20"] > 0.0
    assert report["teacher"]["refine"]["heads"]["friends"]["kept"] == "teacher"
    friends_lines = [line for line in r.stdout.splitlines() if line.startswith("friends")]
    assert friends_lines == [
        "friends  absent: no friend pairs in the dataset; no model is scored on this task"
    ]
    log = report["teacher"]["train_log"]
    assert log["best"]["friends"] == {
        "epoch": None,
        "val_recall@20": None,
        "absent": "no friend pairs in the dataset",
    }
    assert set(log["refit"]["epochs"]) == {"content"}
    assert all("val_friends_recall@20" not in e for e in log["epochs"])
    assert "friends absent (no friend pairs in the dataset; kept at the last epoch)" in r.stdout


@pytest.mark.slow
def test_ddp_two_processes(tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo) trains through the same code path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "socialrec.cli", "train", "--synthetic-users", "400", "--synthetic-items", "200",
        "--synthetic-interactions", "6000", "--out", str(tmp_path / "ddp"), "--epochs", "4",
        "--dim", "16", "--threads", "1", "--no-progress",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["teacher"]["train_log"]["world_size"] == 2
    assert np.isfinite(report["content"]["teacher"]["recall@20"])
