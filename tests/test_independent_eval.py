"""Tests for benchmarks/independent_eval.py on tiny hand-built splits."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "independent_eval.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("independent_eval", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses needs the module registered
    spec.loader.exec_module(mod)
    return mod


ie = _load()

# Hand-built case: 4 users (u1..u4), 5 items (a..e; e appears only in the test file).
TRAIN = [
    ("u1", "a"),
    ("u1", "b"),
    ("u2", "a"),
    ("u2", "b"),
    ("u2", "c"),
    ("u3", "c"),
    ("u3", "d"),
    ("u4", "a"),
    ("u4", "a"),  # duplicate row: X stays binary
]
TEST = [("u1", "c"), ("u2", "e"), ("u3", "a"), ("u4", "c")]

L2 = 1.0 / math.log2(3.0)  # NDCG of a single test item found at 0-based rank 1


def _write_split(split_dir: Path, train: list[tuple[str, str]], test: list[tuple[str, str]]):
    split_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("content_train.tsv", train), ("content_test.tsv", test)):
        lines = ["user\titem\tweight"] + [
            f"{u}\t{i}\t{w % 3 + 1}.5" for w, (u, i) in enumerate(rows)
        ]
        (split_dir / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name in ("friends_train.tsv", "friends_test.tsv"):
        (split_dir / name).write_text("user\tfriend\nu1\tu2\n", encoding="utf-8")


def _dense_x(train: list[tuple[str, str]], test: list[tuple[str, str]]):
    users = sorted({u for u, _ in train + test})
    items = sorted({i for _, i in train + test})
    X = np.zeros((len(users), len(items)))
    for u, i in train:
        X[users.index(u), items.index(i)] = 1.0
    T = np.zeros_like(X, dtype=bool)
    for u, i in test:
        T[users.index(u), items.index(i)] = True
    return X, T


def _brute_ease(X: np.ndarray, lam: float) -> np.ndarray:
    P = np.linalg.inv(X.T @ X + lam * np.eye(X.shape[1]))
    B = -P / np.diag(P)[None, :]
    np.fill_diagonal(B, 0.0)
    return X @ B


def _brute_knn(X: np.ndarray) -> np.ndarray:
    norms = np.sqrt((X * X).sum(axis=0))
    S = X.T @ X
    with np.errstate(divide="ignore", invalid="ignore"):
        S = np.where(np.outer(norms, norms) > 0, S / np.outer(norms, norms), 0.0)
    return X @ S


def _brute_metrics(scores: np.ndarray, X: np.ndarray, T: np.ndarray, k: int) -> tuple[float, float]:
    """Per-user loop with a full sort (no partitioning), straight from the protocol text."""
    recalls, ndcgs = [], []
    for u in range(X.shape[0]):
        test = set(np.flatnonzero(T[u]).tolist())
        if not test:
            continue
        s = np.where(X[u] > 0, -np.inf, scores[u])
        ranked = [j for j in np.argsort(-s, kind="stable") if np.isfinite(s[j])][:k]
        hits = [r for r, j in enumerate(ranked) if j in test]
        recalls.append(len(hits) / len(test))
        dcg = sum(1.0 / math.log2(r + 2) for r in hits)
        idcg = sum(1.0 / math.log2(r + 2) for r in range(min(len(test), k)))
        ndcgs.append(dcg / idcg)
    return float(np.mean(recalls)), float(np.mean(ndcgs))


def _assert_no_relevant_ties(scores: np.ndarray, X: np.ndarray, T: np.ndarray) -> None:
    """No test item shares its score with a non-test candidate (ranks are then well defined)."""
    for u in range(X.shape[0]):
        cand = X[u] == 0
        hit = np.round(scores[u][cand & T[u]], 12)
        miss = np.round(scores[u][cand & ~T[u]], 12)
        assert not np.isin(hit, miss).any(), f"user {u}: tie would make ranks arbitrary"


def _expected(scores: np.ndarray, X: np.ndarray, T: np.ndarray) -> dict[str, float]:
    out = {}
    for k in (10, 20):
        out[f"recall@{k}"], out[f"ndcg@{k}"] = _brute_metrics(scores, X, T, k)
    return out


def test_hand_computed_itemknn_and_ease() -> None:
    split = ie.build_split(TRAIN, TEST)
    assert split.items == ["a", "b", "c", "d", "e"]
    assert split.X.nnz == 8 and set(split.X.data.tolist()) == {1.0}
    rows = ie.select_eval_users(split, None)
    assert rows.tolist() == [0, 1, 2, 3]

    # ItemKNN by hand: cos(a,b)=2/sqrt6, cos(a,c)=1/sqrt6, cos(b,c)=1/2, cos(c,d)=1/sqrt2.
    # u1{a,b}: c=.908 > d=e=0 -> test c at rank 0.  u2{a,b,c}: d=.707 > e=0 -> e at rank 1.
    # u3{c,d}: b=.5 > a=.408 -> a at rank 1.        u4{a}: b=.816 > c=.408 -> c at rank 1.
    knn = ie.evaluate(split, ie.itemknn_scorer(split.X), rows)
    assert knn["recall@10"] == pytest.approx(1.0)
    assert knn["recall@20"] == pytest.approx(1.0)
    assert knn["ndcg@10"] == pytest.approx((1.0 + 3 * L2) / 4)
    assert knn["ndcg@20"] == pytest.approx((1.0 + 3 * L2) / 4)

    X, T = _dense_x(TRAIN, TEST)
    np.testing.assert_allclose(ie.itemknn_scorer(split.X)(rows), _brute_knn(X), atol=1e-12)
    ease_scores = _brute_ease(X, 2.0)
    np.testing.assert_allclose(ie.ease_scorer(split.X, 2.0)(rows), ease_scores, atol=1e-12)
    _assert_no_relevant_ties(ease_scores, X, T)
    ease = ie.evaluate(split, ie.ease_scorer(split.X, 2.0), rows, batch_size=3)
    for m, v in _expected(ease_scores, X, T).items():
        assert ease[m] == pytest.approx(v), m


def test_scores_match_dense_formulas_on_random_data() -> None:
    rng = np.random.default_rng(0)
    train = [(f"u{u}", f"i{i}") for u in range(30) for i in range(45) if rng.random() < 0.15]
    test = [(f"u{u}", f"i{i}") for u in range(30) for i in range(45) if rng.random() < 0.05]
    split = ie.build_split(train, test)
    X, _ = _dense_x(train, test)
    rows = np.arange(split.n_users)
    np.testing.assert_allclose(ie.itemknn_scorer(split.X)(rows), _brute_knn(X), atol=1e-10)
    np.testing.assert_allclose(ie.ease_scorer(split.X, 7.0)(rows), _brute_ease(X, 7.0), atol=1e-8)


def test_batch_metrics_match_brute_force_with_untied_scores() -> None:
    rng = np.random.default_rng(1)
    n_users, n_items = 25, 60
    X = (rng.random((n_users, n_items)) < 0.2).astype(float)
    T = (rng.random((n_users, n_items)) < 0.12) & (X == 0)
    T[3] = False  # a user without test items is skipped
    T[4, :] = X[4] == 0  # more test items than K: IDCG is capped at K
    scores = rng.random((n_users, n_items))  # continuous: no ties
    train = [(f"u{u:02d}", f"i{i:02d}") for u, i in zip(*np.nonzero(X), strict=True)]
    test = [(f"u{u:02d}", f"i{i:02d}") for u, i in zip(*np.nonzero(T), strict=True)]
    split = ie.build_split(train, test)
    assert split.n_users == n_users and split.n_items == n_items
    rows = ie.select_eval_users(split, None)
    assert 3 not in rows.tolist()
    got = ie.evaluate(split, lambda r: scores[r], rows, batch_size=7)
    for m, v in _expected(scores, X, T).items():
        assert got[m] == pytest.approx(v), m
    assert 0.0 < got["recall@10"] < got["recall@20"] < 1.0


def test_max_users_is_a_seeded_subset() -> None:
    split = ie.build_split(TRAIN, TEST + [("u5", "e")])  # u5: test only, no training row
    all_rows = ie.select_eval_users(split, None)
    assert len(all_rows) == 5
    sub = ie.select_eval_users(split, 2, seed=3)
    assert len(sub) == 2 and set(sub.tolist()) <= set(all_rows.tolist())
    assert sub.tolist() == ie.select_eval_users(split, 2, seed=3).tolist()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


def test_cli_exit_codes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_split(run / "split", TRAIN, TEST)
    X, T = _dense_x(TRAIN, TEST)
    lam = 3.0
    _assert_no_relevant_ties(_brute_ease(X, lam), X, T)
    _assert_no_relevant_ties(_brute_knn(X), X, T)
    right = {
        "EASE": _expected(_brute_ease(X, lam), X, T),
        "ItemKNN": _expected(_brute_knn(X), X, T),
    }
    report = {"baseline_params": {"EASE": {"lambda": lam}}, "content": right}
    (run / "report.json").write_text(json.dumps(report), encoding="utf-8")

    out = tmp_path / "res.json"
    ok = _run("--run", str(run), "--out", str(out))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ItemKNN ndcg@10" in ok.stdout
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["passed"] is True and res["ease_lambda"] == lam and res["n_eval_users"] == 4
    assert res["ours"]["ItemKNN"]["ndcg@10"] == pytest.approx((1.0 + 3 * L2) / 4)

    wrong = json.loads(json.dumps(report))
    wrong["content"]["ItemKNN"]["ndcg@20"] += 0.05
    bad_report = tmp_path / "wrong.json"
    bad_report.write_text(json.dumps(wrong), encoding="utf-8")
    bad = _run("--split", str(run / "split"), "--report", str(bad_report))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL" in bad.stdout
    # ... but a loose enough tolerance accepts it.
    loose = _run("--split", str(run / "split"), "--report", str(bad_report), "--tolerance", "0.1")
    assert loose.returncode == 0, loose.stdout + loose.stderr

    del wrong["content"]["EASE"]
    missing_report = tmp_path / "missing.json"
    missing_report.write_text(json.dumps(wrong), encoding="utf-8")
    missing = _run("--split", str(run / "split"), "--report", str(missing_report))
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert 'report["content"]["EASE"]' in missing.stdout
