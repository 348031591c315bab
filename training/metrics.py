"""Recall@K and NDCG@K with full ranking, the protocol of docs/design.md.

Every scorer is evaluated the same way: scores for a batch of users over all candidates,
training positives (and, for friends, the user itself) set to -inf, top K taken. Equal
scores rank deterministically: by the scorer's secondary key when it has one
(:class:`TieBroken`), then by lower candidate index.

A task with no evaluable user (no test positive at all, e.g. friends on a dataset without a
friend graph) has no metrics: it is reported as :func:`absent`, never as zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from socialrec.training.dataset import csr_rows
from tqdm import tqdm

if TYPE_CHECKING:
    from socialrec.training.split import Split

KS = (10, 20)
METRIC_KEYS = tuple(f"{m}@{k}" for m in ("recall", "ndcg") for k in KS)
TASKS = ("content", "friends")


def absent(reason: str) -> dict:
    """The entry of a task that has no evaluable user (in report.json and served metrics)."""
    return {"absent": True, "reason": reason}


def is_absent(entry: dict | None) -> bool:
    """True for :func:`absent` entries (and None, a task missing altogether)."""
    return entry is None or entry.get("absent") is True


def absent_reason(split: Split, task: str) -> str | None:
    """Why ``task`` cannot be scored on ``split`` (no test positive), or None when it can."""
    if task == "content":
        if len(split.test_user):
            return None
        return "no held-out interactions to score (no user has enough interactions to hold one out)"
    if len(split.friends_test):
        return None
    if len(split.friends_train) == 0:
        return "no friend pairs in the dataset"
    return f"no held-out friend pairs to score ({len(split.friends_train)} pairs, all in training)"


@dataclass(frozen=True)
class TieBroken:
    """A score function whose equal scores rank by a secondary key, higher first.

    ``key`` is (n_candidates,), e.g. candidate degree or item popularity; :func:`evaluate`
    passes it to :func:`topk`. Calling the object returns the scores unchanged.
    """

    score: Callable[[np.ndarray], np.ndarray]
    key: np.ndarray

    def __call__(self, users: np.ndarray) -> np.ndarray:
        return self.score(users)


def topk(scores: np.ndarray, k: int, tie_break: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k largest scores per row, best first.  (B, n) -> (B, k)

    Ties are deterministic: equal scores rank by ``tie_break`` (n,) descending when given,
    then by lower index. NaN ranks as -inf.
    """
    n = scores.shape[1]
    k = min(k, n)
    if k <= 0:
        return np.zeros((scores.shape[0], 0), dtype=np.int64)
    if tie_break is None:
        return _topk_index_ties(scores, k)
    # Columns reordered by (key desc, index asc): lower position now means the better tie.
    order = np.lexsort((np.arange(n), -np.asarray(tie_break, dtype=np.float64)))
    return order[_topk_index_ties(scores[:, order], k)]


def _topk_index_ties(scores: np.ndarray, k: int) -> np.ndarray:
    """:func:`topk` with ties broken by lower index, exactly (1 <= k <= n)."""
    s = np.where(np.isnan(scores), -np.inf, scores) if np.isnan(scores).any() else scores
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]  # (B, k) a top k, ties at the edge arbitrary
    kth = np.take_along_axis(s, part, axis=1).min(axis=1, keepdims=True)  # (B, 1) k-th largest
    above = s > kth  # (B, n) fewer than k per row
    edge = s == kth
    need = k - above.sum(axis=1, keepdims=True)  # (B, 1) slots left for the tied edge value
    take = above | (edge & (np.cumsum(edge, axis=1, dtype=np.int64) <= need))  # k per row
    cols = np.nonzero(take)[1].reshape(len(s), k)  # ascending index within each row
    order = np.argsort(-np.take_along_axis(s, cols, axis=1), axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1)


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
    """Mean Recall@K / NDCG@K over users with >= 1 test positive (all 0.0 when there is none:
    callers report such a task as :func:`absent`).

    ``score_fn(users) -> (B, n_candidates)`` float scores; train positives (and self when
    ``exclude_self``) are masked. A :class:`TieBroken` score function ranks equal scores by
    its key. ``max_users`` evaluates a seeded sample (large data).
    """
    tie_break = score_fn.key if isinstance(score_fn, TieBroken) else None
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
        top = topk(s, kmax, tie_break)  # (B, kmax)
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
