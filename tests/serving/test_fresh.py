"""The fold-in estimator (serving/fresh.py): recovery, invariances, input checks, eligibility."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from socialrec.serving.fresh import METHODS, FoldInConfig, FoldInPrior, eligible_count, fold_in

D = 16


def _population(seed: int = 0, n_users: int = 4000, n_items: int = 300):
    """Users' tower outputs [tanh(.), 1] and a centred catalogue of item rows [v, b]."""
    rng = np.random.default_rng(seed)
    x = np.tanh(rng.normal(0, 0.7, (n_users, D)))
    x = np.concatenate([x, np.ones((n_users, 1))], axis=1).astype(np.float32)
    t = np.concatenate([rng.normal(0, 1, (n_items, D)), rng.normal(-1, 0.3, (n_items, 1))], axis=1)
    # training pairs as a trained model has them: each item's users drawn by their scores
    pi = np.repeat(np.arange(n_items), 10)
    pu = np.concatenate([_fans(rng, x, t[i, :-1], 10) for i in range(n_items)])
    return rng, x, t.astype(np.float32), FoldInPrior.from_catalogue(x, t, pu, pi)


def _fans(rng, x: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    """n users drawn with probability softmax(x . v): the users a planted item attracts."""
    logits = x[:, :-1].astype(np.float64) @ v
    p = np.exp(logits - logits.max())
    return rng.choice(len(x), n, replace=False, p=p / p.sum())


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize(
    "cfg",
    [
        FoldInConfig(method="mean"),
        FoldInConfig(method="mean_centered"),
        FoldInConfig(method="ridge", lam=1.0, negatives=0.0),
        FoldInConfig(method="ridge", lam=1.0, negatives=30.0),
    ],
    ids=["mean", "mean_centered", "ridge", "ridge_negatives"],
)
def test_recovers_a_planted_item_vector(cfg: FoldInConfig) -> None:
    rng, x, _, prior = _population()
    v = rng.normal(0, 1, D)
    v *= 4 / np.linalg.norm(v)
    few = fold_in(x[_fans(rng, x, v, 3)], np.ones(3), prior, cfg)
    many = fold_in(x[_fans(rng, x, v, 300)], np.ones(300), prior, replace(cfg, max_users=300))
    assert many.shape == (D + 1,) and many.dtype == np.float32
    assert _cos(many[:-1], v) > 0.9
    assert _cos(many[:-1], v) > _cos(few[:-1], v)  # more users, closer to the planted vector


def test_the_planted_item_ranks_its_fans_above_random_users() -> None:
    rng, x, _, prior = _population(1)
    v = rng.normal(0, 1, D)
    v *= 4 / np.linalg.norm(v)
    fans = _fans(rng, x, v, 50)
    theta = fold_in(x[fans], np.ones(50), prior, FoldInConfig(lam=1.0, negatives=30.0))
    others = np.setdiff1d(np.arange(len(x)), fans)
    fresh_fans = _fans(rng, x[others], v, 50)  # fans the estimator never saw
    assert (x[others][fresh_fans] @ theta).mean() > (x[others] @ theta).mean() + 0.1


def test_ridge_matches_the_direct_closed_form() -> None:
    rng, x, _, prior = _population(2)
    idx = rng.choice(len(x), 12, replace=False)
    w = rng.uniform(0.5, 3, 12)
    for neg in (0.0, 10.0):
        cfg = FoldInConfig(lam=3.0, negatives=neg, weight_transform="raw", calibration="none")
        theta = fold_in(x[idx], w, prior, cfg)
        ww = w / w.mean()
        xs = x[idx].astype(np.float64)
        a = xs.T @ (ww[:, None] * xs) + neg * prior.user_gram + 3.0 * np.eye(D + 1)
        r = prior.pos_score * (ww @ xs) + neg * prior.neg_score * prior.user_mean
        r += 3.0 * prior.item_mean
        np.testing.assert_allclose(theta, np.linalg.solve(a, r), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_invariant_to_the_order_of_users(method: str) -> None:
    rng, x, _, prior = _population(3)
    idx = rng.choice(len(x), 20, replace=False)
    w = rng.uniform(1, 5, 20)
    cfg = FoldInConfig(method=method, weight_transform="log1p", negatives=5.0)
    a = fold_in(x[idx], w, prior, cfg)
    perm = rng.permutation(20)
    b = fold_in(x[idx][perm], w[perm], prior, cfg)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_one_user_is_enough_when_min_interactions_is_one() -> None:
    _, x, _, prior = _population()
    for method in METHODS:
        theta = fold_in(x[:1], np.ones(1), prior, FoldInConfig(method=method))
        assert theta is not None and np.isfinite(theta).all()


def test_min_interactions_counts_users_with_weight() -> None:
    _, x, _, prior = _population()
    cfg = FoldInConfig(min_interactions=3)
    assert fold_in(x[:2], np.ones(2), prior, cfg) is None
    assert fold_in(x[:3], np.array([1.0, 0.0, 2.0]), prior, cfg) is None  # a zero is no interaction
    assert fold_in(x[:3], np.ones(3), prior, cfg) is not None
    assert eligible_count(np.array([1.0, 0.0, 2.0]), cfg) == 2


def test_zero_weight_rows_are_ignored() -> None:
    _, x, _, prior = _population()
    cfg = FoldInConfig(negatives=3.0)
    with_zero = fold_in(x[:4], np.array([1.0, 0.0, 1.0, 1.0]), prior, cfg)
    without = fold_in(x[[0, 2, 3]], np.ones(3), prior, cfg)
    np.testing.assert_allclose(with_zero, without, rtol=1e-6)


def test_only_the_most_recent_max_users_are_used() -> None:
    _, x, _, prior = _population()
    cfg = FoldInConfig(max_users=2)
    ts = np.array([30, 10, 20, 40])
    got = fold_in(x[:4], np.ones(4), prior, cfg, timestamps=ts)
    np.testing.assert_allclose(got, fold_in(x[[0, 3]], np.ones(2), prior, cfg), rtol=1e-6)
    # without timestamps: the last rows (callers pass them oldest first)
    got = fold_in(x[:4], np.ones(4), prior, cfg)
    np.testing.assert_allclose(got, fold_in(x[[2, 3]], np.ones(2), prior, cfg), rtol=1e-6)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda x, w: (np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), w), "NaN"),
        (lambda x, w: (x, np.array([1.0, np.nan, 1.0])), "NaN"),
        (lambda x, w: (np.where(x > 0.5, np.inf, x), w), "infinite"),
        (lambda x, w: (x, np.zeros(3)), "all weights are zero"),
        (lambda x, w: (x, np.array([1.0, -1.0, 1.0])), ">= 0"),
        (lambda x, w: (x[:, :-1], w), "tower outputs"),
        (lambda x, w: (x, np.ones(2)), "one per user"),
        (lambda x, w: (x[:0], w[:0]), "empty"),
    ],
    ids=[
        "nan_vecs",
        "nan_weights",
        "inf_vecs",
        "zero_weights",
        "negative",
        "width",
        "lengths",
        "empty",
    ],
)
def test_bad_inputs_raise_a_clear_value_error(mutate, match: str) -> None:
    _, x, _, prior = _population()
    xs, w = mutate(x[:3].copy(), np.ones(3))
    with pytest.raises(ValueError, match=match):
        fold_in(xs, w, prior, FoldInConfig())


def test_config_checks() -> None:
    for bad in (
        {"method": "svd"},
        {"lam": 0.0},
        {"lam": float("nan")},
        {"negatives": -1.0},
        {"min_interactions": 0},
        {"max_users": 2, "min_interactions": 3},
        {"weight_transform": "sqrt"},
    ):
        with pytest.raises(ValueError):
            FoldInConfig(**bad)


def test_prior_round_trips_through_npz(tmp_path) -> None:
    rng, x, _, prior = _population()
    path = prior.save(tmp_path / "prior.npz")
    again = FoldInPrior.load(path)
    idx = rng.choice(len(x), 7, replace=False)
    cfg = FoldInConfig(negatives=3.0)
    np.testing.assert_array_equal(
        fold_in(x[idx], np.ones(7), prior, cfg), fold_in(x[idx], np.ones(7), again, cfg)
    )
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a fold-in prior"):
        FoldInPrior.load(tmp_path / "other.npz")


def test_imports_without_torch() -> None:
    code = "import sys, socialrec.serving.fresh; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
