"""The friend score the server serves: the tower's inner product plus a mutual-friends bonus.

The server ranks friend candidates by ``u_f . [w, b] + fof_weight * log1p(mutual friends)``
(serving.engine). The weight is a hyperparameter like any other: it is chosen here on the
validation split (with the selection-phase teacher, the one that never saw validation's
held-out pairs), carried by every bundle of the run, and the blend is scored on the test split
once next to the tower alone. A dataset without a friend graph has no weight to choose.

Scored without the server's candidate caps (a friend read scans the first 100 friends and
keeps the 200 friends-of-friends with most mutual friends): they bind only for users with
very many friends, and there the served bonus covers the strongest friends-of-friends.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from socialrec.serving.bundle import DEFAULT_FOF_WEIGHT
from socialrec.training.baselines import friend_matrix
from socialrec.training.metrics import Graph, absent_reason, evaluate
from socialrec.training.split import Split

# Validation grid; it holds the server's default (DEFAULT_FOF_WEIGHT, 1.0).
FOF_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def blended(
    friend_scores: Callable[[np.ndarray], np.ndarray], split: Split, weight: float
) -> Callable[[np.ndarray], np.ndarray]:
    """users -> (B, U) tower friend scores + weight * log1p(common training friends)."""
    return _blend(friend_scores, friend_matrix(split), weight)


def _blend(friend_scores, a, weight: float) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`blended` over a prepared friend matrix ``a`` (U, U) of the split."""

    def score(users: np.ndarray) -> np.ndarray:
        s = friend_scores(users)
        if weight == 0:
            return s
        mutual = np.asarray((a[users] @ a).todense(), dtype=np.float32)  # (B, U)
        return s + np.float32(weight) * np.log1p(mutual)

    return score


def choose_fof_weight(
    friend_scores: Callable[[np.ndarray], np.ndarray],
    val: Split,
    weights: tuple[float, ...] = FOF_WEIGHTS,
    max_users: int | None = None,
) -> dict:
    """The grid's weight with the best validation recall@20 (ties: the smaller weight), or
    ``chosen: None`` with the reason when validation has no friend pairs."""
    why = absent_reason(val, "friends")
    if why:
        return {"chosen": None, "reason": why}
    ftr = Graph.undirected(val.n_users, val.friends_train)
    fte = Graph.undirected(val.n_users, val.friends_test)
    a = friend_matrix(val)  # built once for the whole grid
    grid = {}
    for w in weights:
        m = evaluate(_blend(friend_scores, a, w), ftr, fte, exclude_self=True, max_users=max_users)
        grid[str(w)] = m["recall@20"]
    best = max(weights, key=lambda w: (grid[str(w)], -w))
    return {"chosen": best, "selection": "validation recall@20", "val_recall@20": grid}


def valid_weight(value: object) -> float | None:
    """``value`` as a fof weight (a finite number >= 0), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    w = float(value)
    return w if math.isfinite(w) and w >= 0 else None


def manifest_block(report: dict | None) -> dict:
    """The manifest's ``friends`` block of a bundle built from a run with this report: the
    weight chosen on validation, else the default (a run from before the choice, or one
    without a friend graph), with ``source`` saying which."""
    choice = ((report or {}).get("teacher") or {}).get("train_log", {}).get("fof_weight") or {}
    w = valid_weight(choice.get("chosen"))
    if w is None:
        why = choice.get("reason") or "the run chose no weight"
        return {"fof_weight": DEFAULT_FOF_WEIGHT, "source": f"default ({why})"}
    return {"fof_weight": w, "source": "the run's validation recall@20 (training.fof_blend)"}
