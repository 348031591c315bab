"""Recall@K / NDCG@K and the full-ranking evaluate() on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from socialrec.training.metrics import (
    KS,
    METRIC_KEYS,
    Graph,
    TieBroken,
    absent,
    absent_reason,
    evaluate,
    is_absent,
    recall_ndcg,
    topk,
)
from socialrec.training.split import Split


def test_topk_best_first() -> None:
    s = np.array([[0.1, 0.9, 0.5, 0.3], [4.0, -1.0, 2.0, 3.0]], np.float32)
    assert topk(s, 2).tolist() == [[1, 2], [0, 3]]
    assert topk(s, 4).tolist() == [[1, 2, 3, 0], [0, 3, 2, 1]]
    assert topk(s, 1).tolist() == [[1], [0]]


def test_topk_clamps_k_to_candidates_and_puts_neg_inf_last() -> None:
    s = np.array([[-np.inf, 2.0, 1.0]], np.float32)
    assert topk(s, 10).tolist() == [[1, 2, 0]]


def test_topk_matches_full_sort_on_random_scores() -> None:
    rng = np.random.default_rng(0)
    s = rng.permutation(50 * 30).reshape(50, 30).astype(np.float32)  # distinct: no ties
    assert np.array_equal(topk(s, 7), np.argsort(-s, axis=1)[:, :7])


def test_topk_ties_at_the_cut_go_to_the_lower_index() -> None:
    """A top-k cut inside a run of equal scores keeps the lowest indices, in index order
    (argpartition alone would pick any of the tied candidates)."""
    s = np.zeros((2, 50), np.float32)
    s[0, 7] = 1.0
    s[1, [40, 3]] = 2.0
    assert topk(s, 5).tolist() == [[7, 0, 1, 2, 3], [3, 40, 0, 1, 2]]


def test_topk_tie_break_key_orders_equal_scores() -> None:
    s = np.array([[1.0, 3.0, 1.0, 1.0, 3.0, -np.inf]], np.float32)
    key = np.array([5.0, 1.0, 9.0, 5.0, 2.0, 100.0])
    # 3.0: items 1 (key 1), 4 (key 2) -> 4, 1.  1.0: 0 (5), 2 (9), 3 (5) -> 2, 0, 3.  -inf last.
    assert topk(s, 6, key).tolist() == [[4, 1, 2, 0, 3, 5]]
    assert topk(s, 3, key).tolist() == [[4, 1, 2]]
    assert topk(s, 6).tolist() == [[1, 4, 0, 2, 3, 5]]  # no key: lower index first


def test_topk_nan_ranks_last_like_neg_inf() -> None:
    s = np.array([[np.nan, 0.5, -np.inf, 0.7]], np.float32)
    assert topk(s, 4).tolist() == [[3, 1, 0, 2]]  # NaN and -inf tie: lower index first


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_equals_lexsort_on_heavy_ties(seed: int) -> None:
    """Against a full sort by (score desc, key desc, index asc) on 3-valued scores."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 3, (20, 60)).astype(np.float32)
    s[rng.random(s.shape) < 0.1] = -np.inf
    key = rng.integers(0, 4, 60)
    idx = np.arange(60)
    for k in (1, 7, 59, 60, 80):
        want = np.stack([np.lexsort((idx, -key, -row))[: min(k, 60)] for row in s])
        assert np.array_equal(topk(s, k, key), want)
        plain = np.stack([np.lexsort((idx, -row))[: min(k, 60)] for row in s])
        assert np.array_equal(topk(s, k), plain)


def test_evaluate_uses_the_tie_break_key_of_a_tie_broken_scorer() -> None:
    # Every candidate scores 0: only the key decides. Test item 3 has the largest key.
    flat = lambda users: np.zeros((len(users), 5), np.float32)  # noqa: E731
    key = np.array([0.0, 1.0, 2.0, 4.0, 3.0])
    empty = Graph(1, np.zeros(0, np.int64), np.zeros(0, np.int64))
    test = _graph(1, {0: [3]})
    assert evaluate(TieBroken(flat, key), empty, test, ks=(1,))["recall@1"] == 1.0
    assert evaluate(flat, empty, test, ks=(1,))["recall@1"] == 0.0  # index order: item 0 first
    assert np.array_equal(TieBroken(flat, key)(np.array([0, 1])), np.zeros((2, 5)))


def _pairs_split(friends_train: list, friends_test: list, test_items: int = 1) -> Split:
    i32 = np.int32
    return Split(
        n_users=3,
        n_items=2,
        train_user=np.array([0], i32),
        train_item=np.array([0], i32),
        train_weight=np.ones(1, np.float32),
        test_user=np.zeros(test_items, i32),
        test_item=np.ones(test_items, i32),
        friends_train=np.array(friends_train, i32).reshape(-1, 2),
        friends_test=np.array(friends_test, i32).reshape(-1, 2),
        seed=0,
    )


def test_absent_entries_and_reasons() -> None:
    assert absent("why") == {"absent": True, "reason": "why"}
    assert is_absent(absent("why")) and is_absent(None)
    assert not is_absent({"recall@20": 0.0}) and not is_absent({"teacher": {}})
    assert absent_reason(_pairs_split([], []), "friends") == "no friend pairs in the dataset"
    assert "all in training" in absent_reason(_pairs_split([(0, 1)], []), "friends")
    assert absent_reason(_pairs_split([(0, 1)], [(1, 2)]), "friends") is None
    assert absent_reason(_pairs_split([], [], test_items=1), "content") is None
    assert "no held-out interactions" in absent_reason(_pairs_split([], [], 0), "content")


def test_recall_ndcg_hand_computed() -> None:
    hits = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=bool)
    n_rel = np.array([2, 1, 3])
    r, n = recall_ndcg(hits, n_rel, 3)
    # row 0: 2 of 2 relevant found -> recall 1; DCG = 1/log2(2) + 1/log2(4) = 1.5,
    #        IDCG (2 relevant) = 1 + 1/log2(3) = 1.6309...
    # row 1: 1 of 1 at rank 2 -> recall 1; NDCG = (1/log2(3)) / 1 = 0.6309...
    # row 2: nothing found -> 0, 0
    assert r.tolist() == [1.0, 1.0, 0.0]
    assert n[0] == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)), abs=1e-12)
    assert n[1] == pytest.approx(1 / math.log2(3), abs=1e-12)
    assert n[2] == 0.0


def test_recall_denominator_is_all_relevant_even_above_k() -> None:
    hits = np.array([[0, 1, 1]], dtype=bool)
    r, n = recall_ndcg(hits, np.array([5]), 2)
    # Only the first k=2 ranks count: one hit at rank 2 of 5 relevant -> recall 1/5 (not 1/2);
    # IDCG@2 caps at 2 relevant: 1 + 1/log2(3).
    assert r[0] == pytest.approx(0.2, abs=1e-12)
    assert n[0] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)), abs=1e-12)


# 6 items, every user scores item 0 best, then 1, 2, ... (no ties).
_SCORES = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], np.float32)


def _fixed(n_items: int = 6):
    def score(users: np.ndarray) -> np.ndarray:
        return np.tile(_SCORES[:n_items], (len(users), 1))

    return score


def _graph(n_users: int, rows: dict[int, list[int]]) -> Graph:
    u = [k for k, v in rows.items() for _ in v]
    i = [x for v in rows.values() for x in v]
    return Graph(n_users, np.array(u, np.int64), np.array(i, np.int64))


# user 0: train {0}, test {1, 4}       user 1: train {1, 2}, test {0}
# user 2: train {},  test {2, 3, 4, 5} user 3: train {0}, no test -> not evaluated
_TRAIN = {0: [0], 1: [1, 2], 3: [0]}
_TEST = {0: [1, 4], 1: [0], 2: [2, 3, 4, 5]}


@pytest.mark.parametrize("batch_size", [1, 2, 256])
def test_evaluate_hand_computed(batch_size: int) -> None:
    got = evaluate(_fixed(), _graph(4, _TRAIN), _graph(4, _TEST), batch_size=batch_size, ks=(1, 3))
    # Ranked lists after masking training positives (top 3):
    #   u0: [1, 2, 3] hits [1,0,0]; u1: [0, 3, 4] hits [1,0,0]; u2: [0, 1, 2] hits [0,0,1]
    # recall@1 = (1/2 + 1/1 + 0) / 3 = 0.5
    # recall@3 = (1/2 + 1/1 + 1/4) / 3 = 1.75 / 3       (u2: denominator 4 > K=3)
    # ndcg@1   = (1 + 1 + 0) / 3
    # ndcg@3   = (1/(1 + 1/log2 3)  +  1  +  (1/log2 4) / (1 + 1/log2 3 + 1/log2 4)) / 3
    l3 = 1 / math.log2(3)
    ndcg3 = (1 / (1 + l3) + 1.0 + 0.5 / (1 + l3 + 0.5)) / 3
    assert list(got) == ["recall@1", "recall@3", "ndcg@1", "ndcg@3"]
    assert got["recall@1"] == pytest.approx(0.5, abs=1e-12)
    assert got["recall@3"] == pytest.approx(1.75 / 3, abs=1e-12)
    assert got["ndcg@1"] == pytest.approx(2 / 3, abs=1e-12)
    assert got["ndcg@3"] == pytest.approx(ndcg3, abs=1e-12)


def test_evaluate_without_masking_would_differ() -> None:
    """Sanity of the case above: without train positives the numbers change (u0 would hit 0)."""
    empty = Graph(4, np.zeros(0, np.int64), np.zeros(0, np.int64))
    got = evaluate(_fixed(), empty, _graph(4, _TEST), ks=(1,))
    # u0: top1 = 0 (miss), u1: top1 = 0 (hit), u2: top1 = 0 (miss) -> recall@1 = 1/3
    assert got["recall@1"] == pytest.approx(1 / 3, abs=1e-12)


def test_evaluate_exclude_self() -> None:
    # Friends: 4 users as candidates, everyone scores user 0 best, then 1, 2, 3.
    score = _fixed(4)
    train = Graph.undirected(4, np.array([[1, 2]]))
    test = Graph.undirected(4, np.array([[0, 1]]))
    on = evaluate(score, train, test, exclude_self=True, ks=(1,))
    off = evaluate(score, train, test, exclude_self=False, ks=(1,))
    # exclude_self: u0 ranks [1, 2, 3] -> hit; u1 ranks [0, 3] (2 is a train friend) -> hit.
    assert on["recall@1"] == 1.0 and on["ndcg@1"] == 1.0
    # without it: u0's top is itself (miss), u1's top is 0 (hit) -> 1/2
    assert off["recall@1"] == pytest.approx(0.5, abs=1e-12)


def test_evaluate_fewer_candidates_than_k() -> None:
    """K larger than the catalogue ranks everything (a tiny dataset must not crash)."""
    got = evaluate(_fixed(5), _graph(1, {0: [0]}), _graph(1, {0: [3]}), ks=(2, 10))
    # Ranking [1, 2, 3, 4, 0(-inf)]: the test item is at rank 3.
    # @2: miss -> 0, 0.  @10: recall 1/1, NDCG = (1/log2(4)) / 1 = 0.5
    assert got == {"recall@2": 0.0, "recall@10": 1.0, "ndcg@2": 0.0, "ndcg@10": 0.5}


def test_evaluate_default_keys_and_no_test_users() -> None:
    empty = Graph(3, np.zeros(0, np.int64), np.zeros(0, np.int64))
    got = evaluate(lambda u: np.zeros((len(u), 30), np.float32), empty, empty)
    assert tuple(got) == METRIC_KEYS == ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
    assert KS == (10, 20)
    assert all(v == 0.0 for v in got.values())


def test_evaluate_max_users_samples_seeded() -> None:
    rng = np.random.default_rng(3)
    n_users, n_items = 40, 25
    test = _graph(
        n_users, {u: rng.choice(n_items, 2, replace=False).tolist() for u in range(n_users)}
    )
    empty = Graph(n_users, np.zeros(0, np.int64), np.zeros(0, np.int64))
    table = rng.random((n_users, n_items)).astype(np.float32)
    seen: list[np.ndarray] = []

    def score(users: np.ndarray) -> np.ndarray:
        seen.append(users.copy())
        return table[users]

    a = evaluate(score, empty, test, max_users=10, seed=5, ks=(5,))
    first = np.concatenate(seen)
    seen.clear()
    b = evaluate(score, empty, test, max_users=10, seed=5, ks=(5,))
    assert a == b
    assert len(first) == 10 and np.array_equal(first, np.concatenate(seen))
    assert np.all(np.diff(first) > 0)
