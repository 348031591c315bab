"""Ratings in the loader and the tower, EASE's lambda and the teacher's hyperparameters chosen
on validation (issue #16)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from socialrec.training.baselines import choose_ease_lambda, ease
from socialrec.training.data import DataConfig, load_dataset, load_tsv
from socialrec.training.metrics import Graph, evaluate
from socialrec.training.model import TowerConfig, TwoTower, UserTower
from socialrec.training.run import RunConfig, prepare, run
from socialrec.training.split import validation_split
from socialrec.training.synthetic_ratings import RatingsConfig, generate_ratings, write_ratings_tsv
from socialrec.training.train import TrainConfig, fit
from socialrec.training.tune import TuneConfig, search_space, tune

ROOT = Path(__file__).resolve().parents[2]
SMALL = DataConfig(
    dataset="synthetic",
    synthetic_users=500,
    synthetic_items=250,
    synthetic_interactions=9000,
    seed=4,
)
FAST = TrainConfig(dim=32, epochs=12, batch_size=128, lr=5e-3, patience=4, eval_every=2, threads=1)
SMALL_RATINGS = RatingsConfig(n_users=300, n_items=400, mean_extra_per_user=30.0, seed=2)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _pairs(ds) -> dict[tuple[str, str], float]:
    return {
        (ds.user_ids[u], ds.item_ids[i]): float(w)
        for u, i, w in zip(ds.inter_user, ds.inter_item, ds.inter_weight, strict=True)
    }


# ---------------------------------------------------------------------------- duplicate rows

DUPS = ["user\titem\trating\tts", "a\tx\t3\t10", "a\tx\t3\t20", "b\tx\t5\t30", "b\tx\t2\t25"]


def test_ratings_keep_the_latest_rating_not_the_sum(tmp_path: Path) -> None:
    ds = load_tsv(_write(tmp_path / "r.tsv", DUPS), weight_kind="ratings")
    # Two ratings of 3 stay a 3 (a sum would make 6); b's latest row (ts 30) is the 5.
    assert _pairs(ds) == {("a", "x"): 3.0, ("b", "x"): 5.0}
    assert ds.report.merged_duplicate_interactions == 2
    assert ds.report.duplicate_rule == "last" and ds.report.weight_kind == "ratings"
    assert any("(rule: last)" in line for line in ds.describe())
    assert ds.inter_ts.tolist() == [20, 30]  # the latest timestamp is kept


@pytest.mark.parametrize(
    ("kind", "rule", "want"),
    [
        ("counts", None, {("a", "x"): 6.0, ("b", "x"): 7.0}),  # plays add up (the default)
        ("counts", "max", {("a", "x"): 3.0, ("b", "x"): 5.0}),
        ("ratings", "sum", {("a", "x"): 6.0, ("b", "x"): 7.0}),
        ("ratings", "last", {("a", "x"): 3.0, ("b", "x"): 5.0}),
    ],
)
def test_duplicate_rules(tmp_path: Path, kind: str, rule: str | None, want: dict) -> None:
    ds = load_tsv(_write(tmp_path / "r.tsv", DUPS), weight_kind=kind, duplicates=rule)
    assert _pairs(ds) == want


def test_last_without_timestamps_is_the_later_row(tmp_path: Path) -> None:
    p = _write(tmp_path / "r.tsv", ["a\tx\t4", "a\tx\t2", "a\ty\t1"])
    assert _pairs(load_tsv(p, weight_kind="ratings")) == {("a", "x"): 2.0, ("a", "y"): 1.0}


def test_bad_weight_kind_or_rule_is_a_clear_error(tmp_path: Path) -> None:
    p = _write(tmp_path / "r.tsv", DUPS)
    with pytest.raises(ValueError, match="unknown weight kind 'stars'"):
        load_tsv(p, weight_kind="stars")
    with pytest.raises(ValueError, match="unknown duplicate rule 'mean'"):
        load_dataset(DataConfig(dataset="tsv", interactions=str(p), duplicates="mean"))


# ------------------------------------------------------------------ the ratings generator


def test_ratings_generator_is_seeded_and_shaped_like_a_ratings_set(tmp_path: Path) -> None:
    rows = generate_ratings(SMALL_RATINGS)
    assert rows == generate_ratings(SMALL_RATINGS)
    assert rows != generate_ratings(replace(SMALL_RATINGS, seed=3))
    stars = np.array([r[2] for r in rows])
    assert set(stars.tolist()) == {1, 2, 3, 4, 5}
    ds = load_tsv(write_ratings_tsv(tmp_path / "r.tsv", SMALL_RATINGS), weight_kind="ratings")
    assert ds.n_friend_pairs == 0 and ds.n_users == SMALL_RATINGS.n_users
    assert np.bincount(ds.inter_user).min() >= SMALL_RATINGS.min_per_user
    # The re-rated pairs come back as duplicate rows, merged by the ratings rule.
    n_again = round(SMALL_RATINGS.rerated_fraction * (len(rows) / 1.01))
    assert abs(ds.report.merged_duplicate_interactions - n_again) <= 1
    assert ds.n_interactions == len(rows) - ds.report.merged_duplicate_interactions
    assert set(np.unique(ds.inter_weight).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}


# ---------------------------------------------------------------------- weight transforms


def _tower(transform: str, threshold: float = 0.0) -> UserTower:
    return UserTower(
        TowerConfig(5, 3, dim=2, weight_transform=transform, weight_threshold=threshold)
    )


W = torch.tensor([[1.0, 3.0, 5.0, 0.0], [4.0, 4.0, 0.0, 0.0]])  # (B, L), 0 = padding


@pytest.mark.parametrize(
    ("transform", "threshold", "want"),
    [
        ("binary", 0.0, [[1, 1, 1, 0], [1, 1, 0, 0]]),
        ("raw", 0.0, [[1, 3, 5, 0], [4, 4, 0, 0]]),
        # Mean of the real entries only: 3 for row 0, 4 for row 1; padding stays 0.
        ("centered", 0.0, [[-2, 0, 2, 0], [0, 0, 0, 0]]),
        ("threshold", 4.0, [[0, 0, 1, 0], [1, 1, 0, 0]]),
        ("log1p", 0.0, np.log1p(W.numpy()).tolist()),
    ],
)
def test_weight_transforms_literal(transform: str, threshold: float, want) -> None:
    got = _tower(transform, threshold).transform(W)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float32), atol=1e-6)


def test_unknown_weight_transform_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="weight_transform must be one of"):
        TowerConfig(5, 3, weight_transform="stars")


@pytest.mark.slow
@pytest.mark.parametrize("transform", ["centered", "threshold"])
def test_exported_tower_applies_the_transform_like_torch(transform: str, tmp_path: Path) -> None:
    """The transform is part of the tower graph: ONNX Runtime on raw weights gives the
    torch outputs (float32 round-off only)."""
    ort = pytest.importorskip("onnxruntime")
    from socialrec.compression.export import TowerForExport, export_onnx

    torch.manual_seed(0)
    model = TwoTower(
        TowerConfig(7, 4, dim=8, weight_transform=transform, weight_threshold=3.0)
    ).eval()
    path = export_onnx(model.user_tower, tmp_path / "t.onnx")
    hi = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    hw = torch.tensor([[1.0, 3.0, 5.0, 0.0], [4.0, 2.0, 0.0, 0.0]])
    fi = torch.tensor([[1, 2], [0, 0]])
    fw = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    want = [t.detach().numpy() for t in TowerForExport(model.user_tower)(hi, hw, fi, fw)]
    sess = ort.InferenceSession(str(path))
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(
        None, dict(zip(names, [hi.numpy(), hw.numpy(), fi.numpy(), fw.numpy()], strict=True))
    )
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)


# ------------------------------------------------------------------------- EASE's lambda


def test_ease_lambda_is_the_validation_argmax() -> None:
    _, split = prepare(RunConfig(data=SMALL))
    val = validation_split(split)
    grid = (1.0, 30.0, 3000.0)
    sel = choose_ease_lambda(val, grid)
    tr = Graph(val.n_users, val.train_user, val.train_item)
    te = Graph(val.n_users, val.test_user, val.test_item)
    direct = [evaluate(ease(val, lam), tr, te)["recall@20"] for lam in grid]
    assert sel["grid"] == list(grid)
    np.testing.assert_allclose(sel["validation_recall@20"], direct, atol=1e-6)
    assert sel["chosen"] == grid[int(np.argmax(direct))]
    assert len(set(np.round(direct, 4))) > 1  # the grid spans lambdas that score differently


# ----------------------------------------------------------------------------- the study


def test_budget_zero_is_no_search() -> None:
    _, split = prepare(RunConfig(data=SMALL))
    cfg, record = tune(validation_split(split), FAST, TuneConfig(budget_min=0))
    assert cfg == FAST and record["budget_min"] == 0


def test_search_space_follows_the_data() -> None:
    _, split = prepare(RunConfig(data=SMALL))
    val = validation_split(split)
    space = search_space(val, FAST)
    assert "friend_loss_weight" in space  # synthetic has a friend graph and play counts
    assert set(space["weight_transform"]) >= {"binary", "log1p", "raw", "centered", "threshold"}
    flat = replace(
        val, train_weight=np.ones_like(val.train_weight), friends_train=val.friends_train[:0]
    )
    space = search_space(flat, replace(FAST, dim=48))
    assert "weight_transform" not in space and "friend_loss_weight" not in space
    assert 48 in space["dim"]  # the given config is always inside the space


@pytest.mark.slow
def test_study_starts_from_the_given_config_and_returns_its_best(capsys) -> None:
    _, split = prepare(RunConfig(data=SMALL))
    val = validation_split(split)
    kept: dict = {}
    cfg, rec = tune(
        val, FAST, TuneConfig(budget_min=2.0, trials=4, seed=1), progress=True, keep=kept
    )
    trials = rec["trials"]
    assert len(trials) == 4
    # Trial 0 is the given config, trained to completion.
    assert trials[0]["params"]["dim"] == FAST.dim and trials[0]["params"]["lr"] == FAST.lr
    assert trials[0]["state"] == "complete"
    done = [t for t in trials if t["state"] == "complete"]
    best = max(done, key=lambda t: t["value"])
    assert rec["best"]["number"] == best["number"] and rec["best"]["value"] == best["value"]
    assert rec["best"]["value"] >= trials[0]["value"]
    for k, v in best["params"].items():
        assert getattr(cfg, k) == v
    # The value is the mean of the scored heads' best validation recall@20.
    assert best["value"] == pytest.approx(np.mean(list(best["val_recall20"].values())))
    assert "[tune] 4 trials" in capsys.readouterr().out
    # The chosen trial ran to its end, so it is handed on as the teacher's selection phase:
    # the same model and log a fresh phase 1 with the chosen config produces.
    assert rec["selection_reused"] and not best.get("cut_by_budget")
    model, log = kept["selection"]
    fresh_model, fresh_log = fit(val, cfg, cfg.epochs, val=val, progress=False)
    assert log["best"] == fresh_log["best"]
    for (name, a), (_, b) in zip(
        model.state_dict().items(), fresh_model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.slow
def test_run_records_ease_selection_and_the_study(tmp_path: Path) -> None:
    """A content-only ratings dataset through the tsv loader: report.json holds EASE's grid,
    validation scores and choice, the study, and the teacher trained with the chosen config."""
    inter = write_ratings_tsv(tmp_path / "r.tsv", SMALL_RATINGS)
    data = DataConfig(dataset="tsv", interactions=str(inter), weight_kind="ratings")
    cfg = RunConfig(
        out=str(tmp_path / "run"),
        data=data,
        train=FAST,
        tune=TuneConfig(budget_min=1.0, trials=3),
        progress=False,
    )
    out = run(cfg)
    report = json.loads((out / "report.json").read_text())
    e = report["baseline_params"]["EASE"]
    assert e["chosen"] == e["lambda"] == e["grid"][int(np.argmax(e["validation_recall@20"]))]
    assert report["data_report"]["duplicate_rule"] == "last"
    study = report["teacher"]["tuning"]
    assert len(study["trials"]) == 3 and "weight_transform" in study["space"]
    assert "friend_loss_weight" not in study["space"]  # no friend graph
    chosen = study["chosen_config"]
    assert report["teacher"]["train_config"] == chosen
    if study["selection_reused"]:  # the teacher's epochs are the chosen trial's
        trial = next(t for t in study["trials"] if t["number"] == study["best"]["number"])
        best = report["teacher"]["train_log"]["best"]
        assert best["content"]["val_recall@20"] == trial["val_recall20"]["content"]
    assert json.loads((out / "run.json").read_text())["train"] == chosen
    assert report["friends"]["absent"] is True
    # EASE's test score is EASE refit on the whole train part with the chosen lambda.
    _, split = prepare(RunConfig(data=data))
    tr = Graph(split.n_users, split.train_user, split.train_item)
    te = Graph(split.n_users, split.test_user, split.test_item)
    want = evaluate(ease(split, e["lambda"]), tr, te)["recall@20"]
    assert report["content"]["EASE"]["recall@20"] == pytest.approx(want, abs=1e-9)


@pytest.mark.slow
def test_cli_tune_options(tmp_path: Path) -> None:
    inter = write_ratings_tsv(tmp_path / "r.tsv", replace(SMALL_RATINGS, n_users=150))
    out = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable, "-m", "socialrec.cli", "train", "--dataset", "tsv",
            "--interactions", str(inter), "--weight-kind", "ratings", "--out", str(out),
            "--epochs", "4", "--dim", "16", "--threads", "1", "--no-progress",
            "--tune-budget", "0.5", "--tune-trials", "2", "--ease-lambda", "50",
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["baseline_params"]["EASE"]["lambda"] == 50.0
    assert report["baseline_params"]["EASE"]["selection"] == "fixed by the config"
    assert len(report["teacher"]["tuning"]["trials"]) == 2
    assert report["data_report"]["merged_duplicate_interactions"] > 0
