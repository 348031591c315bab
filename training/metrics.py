"""Recall@K and NDCG@K with full ranking, the protocol of DESIGN.md.

Every scorer is evaluated the same way: scores for a batch of users over all candidates,
training positives (and, for friends, the user itself) set to -inf, top K taken.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from socialrec.training.dataset import csr_rows
from tqdm import tqdm

KS = (10, 20)
METRIC_KEYS = tuple(f"{m}@{k}" for m in ("recall", "ndcg") for k in KS)


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, best first.  (B, n) -> (B, k)"""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (B, k) unordered
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def recall_ndcg(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-user Recall@k and NDCG@k (binary gains) from a (B, >=k) hit matrix, best first.

    Fewer than k columns (fewer candidates than k) means the whole catalogue is ranked."""
    h = hits[:, :k].astype(np.float64)  # (B, min(k, n_candidates))
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # (k,)
    dcg = h @ discount[: h.shape[1]]
    ideal = np.cumsum(discount)[np.minimum(n_relevant, k) - 1]
    return h.sum(1) / n_relevant, dcg / ideal


class Graph:
    """Per-user positive sets as CSR, for masking (train) and hit lookup (test)."""

    def __init__(self, n_rows: int, rows: np.ndarray, cols: np.ndarray) -> None:
        self.indptr, self.indices, _ = csr_rows(n_rows, rows, cols)
        self.n_rows = n_rows

    @classmethod
    def undirected(cls, n_users: int, pairs: np.ndarray) -> Graph:
        a, b = pairs[:, 0], pairs[:, 1]
        return cls(n_users, np.concatenate([a, b]), np.concatenate([b, a]))

    def row(self, u: int) -> np.ndarray:
        return self.indices[self.indptr[u] : self.indptr[u + 1]]

    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)

    def batch(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row position in batch, column) of every positive of the given users."""
        starts, ends = self.indptr[users], self.indptr[users + 1]
        lens = ends - starts
        pos = np.repeat(np.arange(len(users)), lens)
        idx = (
            np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)])
            if len(users)
            else np.zeros(0, np.int64)
        )
        return pos, self.indices[idx]


def evaluate(
    score_fn: Callable[[np.ndarray], np.ndarray],
    train: Graph,
    test: Graph,
    exclude_self: bool = False,
    batch_size: int = 256,
    max_users: int | None = None,
    seed: int = 0,
    desc: str | None = None,
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """Mean Recall@K / NDCG@K over users with >= 1 test positive.

    ``score_fn(users) -> (B, n_candidates)`` float scores; train positives (and self when
    ``exclude_self``) are masked. ``max_users`` evaluates a seeded sample (large data).
    """
    users = np.flatnonzero(test.counts() > 0)
    if max_users is not None and len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    kmax = max(ks)
    sums = {key: 0.0 for key in (f"{m}@{k}" for m in ("recall", "ndcg") for k in ks)}
    batches = range(0, len(users), batch_size)
    for start in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        b = users[start : start + batch_size]
        s = np.array(score_fn(b), dtype=np.float32, copy=True)  # (B, n)
        rows, cols = train.batch(b)
        s[rows, cols] = -np.inf
        if exclude_self:
            s[np.arange(len(b)), b] = -np.inf
        top = topk(s, kmax)  # (B, kmax)
        rel = np.zeros(s.shape, dtype=bool)
        rows, cols = test.batch(b)
        rel[rows, cols] = True
        hits = np.take_along_axis(rel, top, axis=1)
        n_rel = test.counts()[b]
        for k in ks:
            r, n = recall_ndcg(hits, n_rel, k)
            sums[f"recall@{k}"] += float(r.sum())
            sums[f"ndcg@{k}"] += float(n.sum())
    n_users = max(len(users), 1)
    out = {key: sums[key] / n_users for key in sums}
    return {
        key: out[key]
        for key in sorted(out, key=lambda s: (s.split("@")[0] != "recall", int(s.split("@")[1])))
    }
