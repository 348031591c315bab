"""The item cold-start protocol (training/coldstart.py) on tiny hand-made data."""

from __future__ import annotations

import numpy as np
import pytest
from socialrec.training.coldstart import (
    Ranker,
    make_holdout,
    parse_counts,
    popularity,
    rank_metrics,
    replay_order,
)
from socialrec.training.dataset import Dataset
from socialrec.training.metrics import evaluate
from socialrec.training.split import SplitConfig, split_dataset

# (user, item, timestamp): items 0 and 1 have 5 and 4 interactions (eligible with a replay of
# 2 and 2 left to score), items 2..5 are the known catalogue.
ROWS = [
    (0, 0, 50), (1, 0, 10), (2, 0, 30), (3, 0, 40), (4, 0, 20),
    (0, 1, 90), (2, 1, 70), (5, 1, 80), (3, 1, 60),
    (0, 2, 1), (1, 2, 1), (2, 2, 1),
    (3, 3, 1), (4, 3, 1), (5, 3, 1),
    (0, 4, 1), (5, 4, 1),
    (1, 5, 1), (4, 5, 1),
]  # fmt: skip


def _dataset(timestamps: bool = True) -> Dataset:
    rows = sorted(ROWS)
    u, i, ts = (np.array(c) for c in zip(*rows, strict=True))
    return Dataset(
        name="tiny",
        user_ids=np.array([f"u{k}" for k in range(6)]),
        item_ids=np.array([f"i{k}" for k in range(6)]),
        inter_user=u.astype(np.int32),
        inter_item=i.astype(np.int32),
        inter_weight=np.arange(1, len(rows) + 1, dtype=np.float32),
        friends=np.array([[0, 1], [2, 3]], np.int32),
        inter_ts=ts.astype(np.int64) if timestamps else None,
    )


def _holdout(ds: Dataset, test_fraction: float = 0.0):
    split = split_dataset(ds, SplitConfig(seed=0, test_fraction=test_fraction))
    h = make_holdout(ds, split, share=1.0, max_replay=2, min_remaining=2, seed=0)
    return split, h


def test_only_items_with_enough_interactions_are_held_out() -> None:
    _, h = _holdout(_dataset())
    held = np.concatenate([h.items["validation"], h.items["test"]])
    assert sorted(held.tolist()) == [0, 1]
    assert len(h.items["validation"]) == 1 and len(h.items["test"]) == 1
    assert h.eligible == 2
    with pytest.raises(ValueError, match="fewer than 2"):
        make_holdout(_dataset(), split_dataset(_dataset()), 1.0, 3, 2, 0)  # only item 0 left


def test_no_held_out_item_in_training() -> None:
    ds = _dataset()
    _, h = _holdout(ds)
    base, items = h.training_split(None)
    assert base.n_items == 4 and items.tolist() == [2, 3, 4, 5]  # not in the catalogue at all
    trained = items[base.train_item]
    assert not np.isin(trained, [0, 1]).any()
    assert len(base.train_user) == 10  # every row of the known items (test_fraction 0)
    assert base.test_user.size == 0 and base.friends_test.size == 0


def test_the_retrain_sees_exactly_the_replayed_interactions() -> None:
    _, h = _holdout(_dataset())
    full, items = h.training_split(2)
    assert full.n_items == 6 and items.tolist() == list(range(6))
    pairs = set(zip(full.train_user.tolist(), full.train_item.tolist(), strict=True))
    fresh = {p for p in pairs if p[1] in (0, 1)}
    assert fresh == {(1, 0), (4, 0), (3, 1), (2, 1)}  # the two earliest of each item


def test_replay_takes_the_earliest_interactions() -> None:
    _, h = _holdout(_dataset())
    for name in ("validation", "test"):
        st = h.stage(name, 2)
        (item,) = st.items.tolist()
        want = {0: ({1, 4}, {2, 3, 0}), 1: ({3, 2}, {5, 0})}[item]
        assert set(st.replay_user.tolist()) == want[0]
        assert set(st.remaining_user.tolist()) == want[1]
        assert set(st.replay_item.tolist()) == set(st.remaining_item.tolist()) == {item}


def test_without_timestamps_the_replay_order_is_seeded() -> None:
    ds = _dataset(timestamps=False)
    a, how = replay_order(ds, 3)
    b, _ = replay_order(ds, 3)
    assert how == "seeded"
    np.testing.assert_array_equal(a, b)
    for item in range(ds.n_items):  # a permutation of 0..n-1 within every item
        r = np.sort(a[ds.inter_item == item])
        np.testing.assert_array_equal(r, np.arange(len(r)))
    assert any(not np.array_equal(a, replay_order(ds, s)[0]) for s in range(4, 10))


def test_scoring_counts_only_the_remaining_interactions() -> None:
    _, h = _holdout(_dataset())
    h.items = {"validation": np.array([0, 1]), "test": np.array([], np.int64)}
    st = h.stage("validation", 2)
    mask, targets = h.mask(st), h.fresh_targets(st)
    # Replays: item 0 by users 1, 4; item 1 by users 3, 2. Remaining: item 0 by 2, 3, 0 and
    # item 1 by 5, 0. Every user ranks item 1 above item 0 (fresh items only), k = 1.
    users = np.tile(np.array([[0.0, 1.0]], np.float32), (6, 1))  # [u, 1]: scores are the biases
    rows = np.zeros((6, 2), np.float32)
    rows[0, 1], rows[1, 1] = 1.0, 2.0
    ranker = Ranker(users, rows, h.known_items)
    fn = ranker.score_fn(st.items, rows[st.items], catalogue=False)
    m = rank_metrics(fn, mask, {"t": targets}, 6, columns=st.items, ks=(1,))["t"]
    # user 0: targets {0, 1}, top 1 -> 1/2; users 2 and 3 replayed item 1 (masked, not a
    # target): top item 0 -> 1; user 5: target 1 -> 1; users 1 and 4 only replayed: not scored.
    assert m["recall@1"] == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert m["users"] == 4
    assert np.flatnonzero(targets.counts()).tolist() == [0, 2, 3, 5]
    # the same through the protocol's own metric code (full width, -inf outside the stage)
    full = np.full((6, 6), -np.inf, np.float32)
    full[:, st.items] = fn(np.arange(6))
    assert evaluate(lambda b: full[b], mask, targets, ks=(1,))["recall@1"] == m["recall@1"]
    # in the catalogue the known items compete: here they score 0 < every fresh item
    fn = ranker.score_fn(st.items, rows[st.items], catalogue=True)
    got = rank_metrics(fn, mask, {"t": targets}, 6, ks=(1,))["t"]["recall@1"]
    assert got == pytest.approx(0.875)
    # ... and when they score higher, the fresh items never reach the top 1
    rows[2:, 1] = 5.0
    ranker = Ranker(users, rows, h.known_items)
    fn = ranker.score_fn(st.items, rows[st.items], catalogue=True)
    assert rank_metrics(fn, mask, {"t": targets}, 6, ks=(1,))["t"]["recall@1"] == 0.0


def test_known_item_targets_are_split_between_the_stages() -> None:
    ds = _dataset()
    split, h = _holdout(ds, test_fraction=0.5)
    v, t = h.known_targets["validation"], h.known_targets["test"]
    got = sorted(zip(*v, strict=True)) + sorted(zip(*t, strict=True))
    want = [
        (u, i)
        for u, i in zip(split.test_user.tolist(), split.test_item.tolist(), strict=True)
        if i not in (0, 1)
    ]
    assert sorted(got) == sorted(want) and len(set(got)) == len(got)
    st = h.stage("validation", 2)
    overall = h.overall_targets("validation", st)
    assert overall.counts().sum() == len(v[0]) + len(st.remaining_user)


def test_popularity_sums_the_replayed_weights() -> None:
    _, h = _holdout(_dataset())
    h.items = {"validation": np.array([0, 1]), "test": np.array([], np.int64)}
    st = h.stage("validation", 2)
    pop = popularity(st)
    for k, item in enumerate(st.items):
        assert pop[k] == pytest.approx(st.replay_weight[st.replay_item == item].sum())


def test_parse_counts() -> None:
    assert parse_counts("1, 5,20") == (1, 5, 20)
    for bad in ("", "0", "a,b"):
        with pytest.raises(ValueError):
            parse_counts(bad)
