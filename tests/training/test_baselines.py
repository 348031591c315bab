"""Baselines on a block dataset with a known answer, and against dense brute-force formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from socialrec.training.baselines import (
    BaselineConfig,
    adamic_adar,
    common_neighbors,
    content_baselines,
    ease,
    friend_baselines,
    item_knn,
    most_popular,
)
from socialrec.training.metrics import Graph, TieBroken, evaluate, topk
from socialrec.training.split import Split

_I32 = np.int32


def _split(
    train: list[tuple[int, int]],
    test: list[tuple[int, int]],
    n_users: int,
    n_items: int,
    friends_train: list[tuple[int, int]] = (),
    friends_test: list[tuple[int, int]] = (),
) -> Split:
    tr = np.array(train, np.int64).reshape(-1, 2)
    te = np.array(test, np.int64).reshape(-1, 2)
    return Split(
        n_users=n_users,
        n_items=n_items,
        train_user=tr[:, 0].astype(_I32),
        train_item=tr[:, 1].astype(_I32),
        train_weight=np.ones(len(tr), np.float32),
        test_user=te[:, 0].astype(_I32),
        test_item=te[:, 1].astype(_I32),
        friends_train=np.array(friends_train, _I32).reshape(-1, 2),
        friends_test=np.array(friends_test, _I32).reshape(-1, 2),
        seed=0,
    )


def _blocks() -> Split:
    """Users 0-3 (group A) use items 0-4, users 4-7 (group B) items 5-9. User u misses one item
    of its block (A: item u, B: item u + 1), which is its test item. Friends: each group is a
    clique; one pair per clique (0-1 and 4-5) is held out for test."""
    train, test = [], []
    for u in range(8):
        block = range(0, 5) if u < 4 else range(5, 10)
        missing = u if u < 4 else u + 1
        train += [(u, i) for i in block if i != missing]
        test.append((u, missing))
    cliques = [(a, b) for g in (range(0, 4), range(4, 8)) for a in g for b in g if a < b]
    held = [(0, 1), (4, 5)]
    return _split(train, test, 8, 10, [p for p in cliques if p not in held], held)


def _content_eval(split: Split, score) -> dict[str, float]:
    train = Graph(split.n_users, split.train_user, split.train_item)
    test = Graph(split.n_users, split.test_user, split.test_item)
    return evaluate(score, train, test, ks=(1, 10))


def _friend_eval(split: Split, score) -> dict[str, float]:
    train = Graph.undirected(split.n_users, split.friends_train)
    test = Graph.undirected(split.n_users, split.friends_test)
    return evaluate(score, train, test, exclude_self=True, ks=(1, 10))


@pytest.mark.parametrize("name", ["ItemKNN", "EASE"])
def test_content_baselines_recover_the_missing_block_item(name: str) -> None:
    s = _blocks()
    builders = content_baselines(s, BaselineConfig(ease_lambda=1.0))
    got = _content_eval(s, builders[name]())
    # The only unseen in-block item scores > 0, every other-block item scores 0: rank 1 for all.
    assert got == {"recall@1": 1.0, "recall@10": 1.0, "ndcg@1": 1.0, "ndcg@10": 1.0}


def test_content_block_scores_are_zero_across_blocks() -> None:
    s = _blocks()
    for score in (item_knn(s), ease(s, 1.0)):
        out = score(np.arange(8))
        assert np.all(out[:4, 5:] == 0) and np.all(out[4:, :5] == 0)
        assert np.all(out[np.arange(8), s.test_item] > 0)


@pytest.mark.parametrize("name", ["CommonNeighbors", "AdamicAdar"])
def test_friend_baselines_recover_the_held_out_pair(name: str) -> None:
    s = _blocks()
    got = _friend_eval(s, friend_baselines(s)[name]())
    # Users 0 and 1 share neighbours 2 and 3; no other non-friend of 0 shares any neighbour.
    assert got == {"recall@1": 1.0, "recall@10": 1.0, "ndcg@1": 1.0, "ndcg@10": 1.0}


def test_friend_block_scores_exact() -> None:
    s = _blocks()
    cn = common_neighbors(s)(np.array([0, 4]))
    # 0's train friends {2, 3}; 1's {2, 3}: 2 common. Self row: deg(0) = 2.
    assert cn[0].tolist() == [2, 2, 1, 1, 0, 0, 0, 0]
    assert cn[1].tolist() == [0, 0, 0, 0, 2, 2, 1, 1]
    aa = adamic_adar(s)(np.array([0]))
    # Common neighbours of 0 and 1 are 2 and 3, each of degree 3: 2 / ln 3.
    assert aa[0, 1] == pytest.approx(2 / math.log(3), rel=1e-6)
    assert aa[0, 2] == pytest.approx(1 / math.log(3), rel=1e-6)  # via 3 only
    assert np.all(aa[0, 4:] == 0)


def test_most_popular_ranks_by_training_counts() -> None:
    # Training counts per item: item 3 -> 4, item 0 -> 3, item 5 -> 2, item 1 -> 1, others 0.
    train = [(u, 3) for u in range(4)] + [(u, 0) for u in range(3)] + [(0, 5), (1, 5), (2, 1)]
    s = _split(train, [(3, 1), (3, 5)], n_users=4, n_items=6)  # test rows do not count
    out = most_popular(s)(np.array([0, 2, 3]))
    assert out.shape == (3, 6)
    assert np.array_equal(out, np.tile([3, 1, 0, 4, 0, 2], (3, 1)))
    assert topk(np.array(out), 4)[0].tolist() == [3, 0, 5, 1]
    # User 3 (the only one with test items {1, 5}) has seen item 3: its ranking is 0, 5, 1, ...
    # recall@1 = 0, recall@10 = 2/2; NDCG@10 = (1/log2 3 + 1/log2 4) / (1 + 1/log2 3).
    got = _content_eval(s, most_popular(s))
    assert got["recall@1"] == 0.0 and got["recall@10"] == 1.0
    l3 = 1 / math.log2(3)
    assert got["ndcg@10"] == pytest.approx((l3 + 0.5) / (1 + l3), abs=1e-12)


def _ranking(split: Split, score, user: int, friends: bool) -> list[int]:
    """A user's full ranked list as evaluate() builds it (train positives and self masked)."""
    train = (
        Graph.undirected(split.n_users, split.friends_train)
        if friends
        else Graph(split.n_users, split.train_user, split.train_item)
    )
    s = np.array(score(np.array([user])), np.float32)
    s[0, train.row(user)] = -np.inf
    masked = len(train.row(user))
    if friends:
        s[0, user] = -np.inf
        masked += 1
    key = score.key if isinstance(score, TieBroken) else None
    return topk(s, s.shape[1], key)[0, : s.shape[1] - masked].tolist()


def _tie_graph() -> Split:
    """Train friends 0-1, 0-12, 1-2, 1-3, 3-4, 3-5, 3-6, 8-9, 8-10, 8-11; test pair 0-3.

    Degrees: 0:2, 1:3, 2:1, 3:4, 4-6:1, 7:0, 8:3, 9-11:1, 12:1. For user 0 (friends 1, 12),
    candidates 2 and 3 share one neighbour (1, of degree 3): equal CN (1) and AA (1/ln 3).
    Every other candidate scores 0 (12 has degree 1, so it links nobody in AA either).
    """
    train = [(0, 1), (0, 12), (1, 2), (1, 3), (3, 4), (3, 5), (3, 6), (8, 9), (8, 10), (8, 11)]
    return _split([(0, 0)], [], 13, 1, train, [(0, 3)])


@pytest.mark.parametrize("name", ["CommonNeighbors", "AdamicAdar"])
def test_friend_baselines_break_ties_by_candidate_degree(name: str) -> None:
    s = _tie_graph()
    score = friend_baselines(s)[name]()
    assert isinstance(score, TieBroken)
    assert score.key.tolist() == [2, 3, 1, 4, 1, 1, 1, 0, 3, 1, 1, 1, 1]
    # Score 1 (CN) / 1/ln 3 (AA): 3 (degree 4) before 2 (degree 1). Score 0: 8 (degree 3),
    # then the degree-1 users in index order, then 7 (degree 0).
    assert _ranking(s, score, 0, friends=True) == [3, 2, 8, 4, 5, 6, 9, 10, 11, 7]
    # User 3 (friends 1, 4, 5, 6): 0 and 2 tie through 1; 0 has degree 2, 2 has degree 1.
    assert _ranking(s, score, 3, friends=True)[:2] == [0, 2]
    # Both ends of the test pair 0-3 rank the other first; by index, user 0 would rank 2 first.
    got = _friend_eval(s, score)
    assert got["recall@1"] == 1.0
    assert _friend_eval(s, score.score)["recall@1"] == 0.5  # the bare scores: index ties


def test_item_knn_breaks_ties_by_item_popularity() -> None:
    """User 0 has item 0 only. cos(0, 1) = 1 / sqrt(4 * 1) and cos(0, 2) = 2 / sqrt(4 * 4) are
    equal (exactly, in float32: powers of two); item 2 (4 users) is more popular than item 1
    (1 user). Items 3 (1 user) and 4 (2 users) share no user with item 0: both score 0."""
    train = [(0, 0), (1, 0), (1, 1), (2, 0), (2, 2), (3, 0), (3, 2), (4, 2), (5, 2)]
    train += [(6, 3), (7, 4), (8, 4)]
    s = _split(train, [(0, 2)], n_users=9, n_items=5)
    score = item_knn(s)
    assert isinstance(score, TieBroken) and score.key.tolist() == [4, 1, 4, 1, 2]
    out = score(np.array([0]))[0]
    assert out[1] == out[2] == pytest.approx(0.5) and out[3] == out[4] == 0.0
    assert _ranking(s, score, 0, friends=False) == [2, 1, 4, 3]
    assert _content_eval(s, score)["recall@1"] == 1.0
    assert _content_eval(s, score.score)["recall@1"] == 0.0  # index ties rank item 1 first


def test_most_popular_equal_counts_rank_by_index() -> None:
    """MostPopular's score is the popularity key itself: equal counts stay in index order."""
    train = [(0, 1), (1, 1), (2, 1), (0, 3), (1, 3), (2, 3), (0, 0), (1, 2), (2, 4)]
    s = _split(train, [], n_users=4, n_items=5)
    score = most_popular(s)
    assert isinstance(score, TieBroken) and score.key.tolist() == [1, 3, 1, 3, 1]
    assert _ranking(s, score, 3, friends=False) == [1, 3, 0, 2, 4]


def _random_split(seed: int, n_users: int = 30, n_items: int = 20) -> tuple[Split, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.random((n_users, n_items)) < 0.3).astype(np.float64)
    x[:, [3, 11]] = 0  # items without a training user
    u, i = np.nonzero(x)
    return _split(list(zip(u, i, strict=True)), [], n_users, n_items), x


@pytest.mark.parametrize("seed", [0, 1])
def test_item_knn_equals_dense_cosine(seed: int) -> None:
    s, x = _random_split(seed)
    norm = np.sqrt(x.sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        sim = (x.T @ x) / np.outer(norm, norm)
    sim[~np.isfinite(sim)] = 0.0
    want = x @ sim
    users = np.array([0, 5, 7, 29])
    got = item_knn(s)(users)
    assert got.dtype == np.float32 and got.shape == (4, 20)
    # float32 products of cosines <= 1 summed over <= 20 items (scores <= ~20): relative error
    # ~ 20 * eps32 (1.2e-7) ~ 2.4e-6; 1e-5 leaves margin and catches any wrong normalisation.
    np.testing.assert_allclose(got, want[users], rtol=1e-5, atol=1e-5)
    assert np.all(got[:, [3, 11]] == 0)


@pytest.mark.parametrize(("seed", "lam"), [(0, 10.0), (1, 3.0)])
def test_ease_equals_dense_closed_form(seed: int, lam: float) -> None:
    s, x = _random_split(seed)
    p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))  # float64
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    users = np.arange(30)
    want = x @ b
    got = ease(s, lam)(users)
    # The implementation uses a float32 Cholesky + inverse of X^T X + lam I (condition number
    # ~5 for lam=10, ~21 for lam=3 on these matrices), so P carries relative error up to about
    # cond * n * eps32 ~ 21 * 20 * 1.2e-7 ~ 5e-5 as a pessimistic a-priori bound; on these fixed
    # seeded matrices the score error is ~2e-7, so 1e-5 is a 50x margin and still far below the
    # score scale (~0.1-1): a wrong formula (missing diag(B) = 0, row/column mix-up) fails.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 0.05  # the comparison is not between near-zero arrays
    assert np.all(got[:, [3, 11]] == 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adamic_adar_and_common_neighbours_equal_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 25
    adj = np.triu(rng.random((n, n)) < 0.2, 1)
    pairs = np.argwhere(adj)
    s = _split([(0, 0)], [], n, 1, [tuple(p) for p in pairs.tolist()])
    nbrs = [set() for _ in range(n)]
    for a, b in pairs.tolist():
        nbrs[a].add(b)
        nbrs[b].add(a)
    deg = [len(x) for x in nbrs]
    users = np.arange(n)
    aa, cn = adamic_adar(s)(users), common_neighbors(s)(users)
    for u in range(n):
        for v in range(n):
            common = nbrs[u] & nbrs[v]
            assert cn[u, v] == len(common)
            if u == v:
                continue  # self scores are masked (exclude_self); deg-1 neighbours have no 1/log
            # Every common neighbour of two distinct users has degree >= 2.
            want = sum(1 / math.log(deg[w]) for w in common)
            # float32 of a sum of <= 25 terms of size <= 1/ln 2: 1e-5 relative is ample.
            assert aa[u, v] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_content_baselines_skip_ease_above_max_items() -> None:
    s = _blocks()  # 10 items
    skipped = content_baselines(s, BaselineConfig(ease_max_items=9))
    assert isinstance(skipped["EASE"], str)
    assert "10 items" in skipped["EASE"] and "ease_max_items=9" in skipped["EASE"]
    assert callable(skipped["MostPopular"]) and callable(skipped["ItemKNN"])
    kept = content_baselines(s, BaselineConfig(ease_max_items=10))
    assert callable(kept["EASE"])
    assert set(kept) == {"MostPopular", "ItemKNN", "EASE"}
    assert set(friend_baselines(s)) == {"CommonNeighbors", "AdamicAdar"}
