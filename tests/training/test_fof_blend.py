"""The served friend blend: its weight chosen on validation, scored on test, carried by the
bundle, and used by the engine exactly as training scored it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from socialrec.training.baselines import friend_matrix
from socialrec.training.fof_blend import (
    FOF_WEIGHTS,
    blended,
    choose_fof_weight,
    manifest_block,
)
from socialrec.training.metrics import absent_reason
from socialrec.training.split import Split


def _path_split(n: int, with_friends: bool) -> Split:
    """``n`` users on a path of friendships (0-1-2-...), one item each; the pairs (u, u + 2)
    for every third u are held out (friends of a friend)."""
    none = np.zeros((0, 2), np.int32)
    path = np.array([[u, u + 1] for u in range(n - 1)], np.int32)
    held = np.array([[u, u + 2] for u in range(0, n - 2, 3)], np.int32)
    return Split(
        n_users=n,
        n_items=3,
        train_user=np.arange(n, dtype=np.int32),
        train_item=(np.arange(n) % 3).astype(np.int32),
        train_weight=np.ones(n, np.float32),
        test_user=np.zeros(0, np.int32),
        test_item=np.zeros(0, np.int32),
        friends_train=path if with_friends else none,
        friends_test=held if with_friends else none,
        seed=0,
    )


def test_blend_adds_the_log_of_common_friends_to_the_tower_scores() -> None:
    split = _path_split(6, True)
    flat = np.zeros((6, 6), np.float32)
    score = blended(lambda users: flat[users].copy(), split, 2.0)
    got = score(np.array([0, 2]))
    # 0 and 2 share friend 1; 0 and 3 share nobody; 2 and 4 share 3.
    assert got[0, 2] == pytest.approx(2.0 * math.log1p(1))
    assert got[0, 3] == 0.0
    assert got[1, 4] == pytest.approx(2.0 * math.log1p(1))
    assert np.array_equal(blended(lambda u: flat[u].copy(), split, 0.0)(np.array([0])), flat[:1])


def test_weight_is_the_best_on_validation_and_absent_without_friends() -> None:
    n = 30
    split = _path_split(n, True)
    # A tower that prefers distant users: only the mutual-friends bonus lifts u + 2 into the
    # top 20 of the 27 candidates.
    far = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]).astype(np.float32) / n
    choice = choose_fof_weight(lambda users: far[users].copy(), split, weights=(0.0, 4.0, 8.0))
    grid = choice["val_recall@20"]
    assert set(grid) == {"0.0", "4.0", "8.0"}
    assert grid["0.0"] < 0.5 and grid["4.0"] == grid["8.0"] == 1.0
    assert choice["chosen"] == 4.0  # ties go to the smaller weight
    assert FOF_WEIGHTS[0] == 0.0 and 1.0 in FOF_WEIGHTS

    lonely = _path_split(n, False)
    none = choose_fof_weight(lambda users: far[users].copy(), lonely)
    assert none["chosen"] is None
    assert none["reason"] == absent_reason(lonely, "friends")


def test_manifest_block_carries_the_choice_or_says_it_is_the_default() -> None:
    chosen = {"teacher": {"train_log": {"fof_weight": {"chosen": 2.0}}}}
    assert manifest_block(chosen)["fof_weight"] == 2.0
    for report in (
        None,
        {},
        {"teacher": {"train_log": {"fof_weight": {"chosen": None, "reason": "x"}}}},
    ):
        block = manifest_block(report)
        assert block["fof_weight"] == 1.0 and block["source"].startswith("default")
    bad = {"teacher": {"train_log": {"fof_weight": {"chosen": float("nan")}}}}
    assert manifest_block(bad)["source"].startswith("default")


@pytest.mark.parametrize(
    "block",
    [
        {"fof_weight": -1.0},
        {"fof_weight": "2"},
        {"fof_weight": True},
        {"fof_weight": float("inf")},
        [],
        3.0,
    ],
)
def test_engine_refuses_a_malformed_weight_for_the_default(block) -> None:
    from socialrec.serving.bundle import DEFAULT_FOF_WEIGHT, bundle_fof_weight

    w, bad = bundle_fof_weight({"friends": block})
    assert w == DEFAULT_FOF_WEIGHT and bad and "friends.fof_weight" in bad
    assert bundle_fof_weight({}) == (DEFAULT_FOF_WEIGHT, None)
    assert bundle_fof_weight({"friends": {"fof_weight": 0}}) == (0.0, None)


@pytest.fixture(scope="module")
def friend_run(tmp_path_factory) -> Path:
    from socialrec.compression.export import export_run
    from socialrec.training.data import DataConfig
    from socialrec.training.run import RunConfig, run
    from socialrec.training.train import TrainConfig

    out = tmp_path_factory.mktemp("fofrun")
    data = DataConfig(synthetic_users=300, synthetic_items=200, synthetic_interactions=6000, seed=3)
    cfg = RunConfig(
        out=str(out),
        data=data,
        train=TrainConfig(dim=16, epochs=6, eval_every=2, threads=1, refit=False),
        progress=False,
    )
    run(cfg)
    export_run(out)
    return out


def test_run_reports_the_served_blend_and_the_bundle_carries_its_weight(friend_run) -> None:
    from socialrec.serving.engine import Engine, EngineConfig
    from socialrec.training.run import SERVED_FRIENDS, format_table

    report = json.loads((friend_run / "report.json").read_text())
    choice = report["teacher"]["train_log"]["fof_weight"]
    assert choice["chosen"] in FOF_WEIGHTS
    assert choice["val_recall@20"][str(choice["chosen"])] == max(choice["val_recall@20"].values())
    served = report["friends"][SERVED_FRIENDS]
    assert 0.0 <= served["recall@20"] <= 1.0
    assert SERVED_FRIENDS in format_table(report)

    manifest = json.loads((friend_run / "bundle" / "manifest.json").read_text())
    assert manifest["friends"]["fof_weight"] == choice["chosen"]
    engine = Engine.load(friend_run / "bundle")
    assert engine.fof_weight == choice["chosen"]
    assert Engine.load(friend_run / "bundle", config=EngineConfig(fof_weight=3.5)).fof_weight == 3.5


def test_engine_ranks_friends_as_training_scored_the_blend(friend_run) -> None:
    """The served top 10 (tower + ANN + friends-of-friends, flat index) is the top 10 of the
    blend training scored, for users with friends: the report's row is what the server does."""
    from socialrec.serving.engine import Engine, EngineConfig
    from socialrec.training.features import Features
    from socialrec.training.run import load_run
    from socialrec.training.train import Scorer, load_checkpoint

    ds, split, _ = load_run(friend_run)
    model, _ = load_checkpoint(friend_run / "teacher.pt")
    w = 1.5
    engine = Engine.load(friend_run / "bundle", config=EngineConfig(fof_weight=w))
    score = blended(Scorer(model, Features.from_split(split)).friends, split, w)
    a = friend_matrix(split).tocsr()
    names = [str(x) for x in ds.user_ids]
    items = [str(x) for x in ds.item_ids]
    users = [u for u in range(split.n_users) if a[u].nnz][:25]
    agree = []
    for u in users:
        s = score(np.array([u]))[0]
        friends = a[u].indices.tolist()
        s[[u, *friends]] = -np.inf
        want = [names[j] for j in np.argsort(-s, kind="stable")[:10]]
        mutual = np.asarray((a[u] @ a).todense()).ravel()
        fof = {
            names[j]: int(m) for j, m in enumerate(mutual) if m > 0 and j != u and j not in friends
        }
        mine = split.train_user == u
        history = [
            (items[i], float(x))
            for i, x in zip(split.train_item[mine], split.train_weight[mine], strict=True)
        ]
        got = engine.recommend_friends(names[u], history, [names[f] for f in friends], fof, 10)
        agree.append(len(set(want) & {r.id for r in got.items}) / 10)
    # ONNX Runtime and torch differ in the last bits: a near-tie may swap at the 10th place.
    assert np.mean(agree) >= 0.97, agree
