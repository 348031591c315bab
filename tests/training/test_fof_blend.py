"""The served friend blend: its weight chosen on validation, scored on test, carried by the
bundle, and used by the engine exactly as training scored it."""

from __future__ import annotations

import math

import numpy as np
import pytest
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
