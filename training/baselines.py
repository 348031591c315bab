"""Classical baselines scored on the same split in the same run as the teacher.

Content: MostPopular, ItemKNN (cosine, binary input, no neighbour pruning: it has no
tunable), EASE (binary input; lambda chosen per dataset on validation,
:func:`choose_ease_lambda`). Friends: CommonNeighbors, AdamicAdar. Each is ``fit(split)`` then a score function
``(users) -> (B, n_candidates)``.

Ties rank as in the baselines' standard forms: CommonNeighbors and AdamicAdar order equal
scores by candidate degree in the training friend graph, MostPopular and ItemKNN by item
popularity (training users), higher first, then by lower index (:class:`TieBroken`). For
MostPopular the key is its own score, so its ties stay in index order. EASE and the teacher
score continuously; their (rare) ties rank by index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from socialrec.training.metrics import Graph, TieBroken, evaluate
from socialrec.training.split import Split
from tqdm import tqdm

ScoreFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class BaselineConfig:
    # None: chosen per dataset on the validation split (carved from train, never test) from
    # ease_lambdas, a log-scale grid; a number fixes it.
    ease_lambda: float | None = None
    ease_lambdas: tuple[float, ...] = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
    ease_max_items: int = 30_000  # dense item x item inverse; skipped (and reported) above this

    def __post_init__(self) -> None:
        if self.ease_lambda is not None and not self.ease_lambda > 0:
            raise ValueError(f"ease_lambda must be > 0, got {self.ease_lambda}")
        if not self.ease_lambdas or min(self.ease_lambdas) <= 0:
            raise ValueError(f"ease_lambdas must be positive numbers, got {self.ease_lambdas}")


def interaction_matrix(split: Split) -> sp.csr_matrix:
    """Binary user x item matrix of the training part."""
    data = np.ones(len(split.train_user), dtype=np.float32)
    x = sp.csr_matrix(
        (data, (split.train_user, split.train_item)), shape=(split.n_users, split.n_items)
    )
    x.data[:] = 1.0  # duplicates cannot occur (unique pairs), but keep the matrix binary regardless
    return x


def friend_matrix(split: Split) -> sp.csr_matrix:
    """Symmetric binary adjacency of the training friend pairs."""
    a, b = split.friends_train[:, 0], split.friends_train[:, 1]
    data = np.ones(2 * len(a), dtype=np.float32)
    return sp.csr_matrix(
        (data, (np.concatenate([a, b]), np.concatenate([b, a]))),
        shape=(split.n_users, split.n_users),
    )


def item_popularity(split: Split) -> np.ndarray:
    """Training users per item (the interactions are unique (user, item) pairs).  (I,)"""
    return np.bincount(split.train_item, minlength=split.n_items).astype(np.float32)


def friend_degree(a: sp.csr_matrix) -> np.ndarray:
    """Training friends per user, from the symmetric adjacency.  (U,)"""
    return np.asarray(a.sum(axis=1), dtype=np.float32).ravel()


def most_popular(split: Split) -> TieBroken:
    pop = item_popularity(split)  # (I,)
    return TieBroken(lambda users: np.broadcast_to(pop, (len(users), split.n_items)), pop)


def item_knn(split: Split) -> TieBroken:
    """Cosine item-item similarity, applied as X_b D^-1/2 X^T X D^-1/2 without materialising S;
    ties by item popularity."""
    x = interaction_matrix(split)
    norm = np.sqrt(np.asarray(x.sum(axis=0)).ravel())  # (I,)
    inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0).astype(np.float32)
    xn = (x @ sp.diags(inv)).tocsr()  # (U, I) columns scaled
    xt = x.T.tocsr()  # (I, U)

    def score(users: np.ndarray) -> np.ndarray:
        # x_b S = (x_b D^-1/2 X^T)(X D^-1/2); x is binary, so x_b D^-1/2 is xn[b].
        user_user = xn[users] @ xt  # (B, U) sparse
        return np.asarray((user_user @ xn).todense(), dtype=np.float32)  # (B, I)

    return TieBroken(score, item_popularity(split))


def ease_weights(split: Split, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """EASE's item-item weights on the items with a training user: (active item indices (A,),
    B (A, A) float32), B = I - P / diag(P), P = (X^T X + lam I)^-1, diag(B) = 0 (Steck 2019).

    Items without a training user have a zero row and column in X^T X, so their block of P is
    diagonal and their column of B is 0: solving on the active items alone is exact."""
    x = interaction_matrix(split)
    active = np.flatnonzero(np.asarray(x.sum(axis=0)).ravel() > 0)
    xa = x[:, active].tocsr()
    g = (xa.T @ xa).toarray().astype(np.float32)  # (A, A) Gram matrix, SPD after + lam I
    g[np.diag_indices_from(g)] += lam
    chol, info = scipy.linalg.lapack.spotrf(g, lower=1, overwrite_a=1)
    if info != 0:
        raise RuntimeError(f"EASE: Cholesky failed (info={info}); raise the EASE lambda")
    p, info = scipy.linalg.lapack.spotri(chol, lower=1, overwrite_c=1)
    if info != 0:
        raise RuntimeError(f"EASE: inverse failed (info={info})")
    p = np.tril(p) + np.tril(p, -1).T  # spotri fills one triangle
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return active, np.ascontiguousarray(b, dtype=np.float32)


def ease(split: Split, lam: float) -> ScoreFn:
    """EASE scores of every item for a batch of users (:func:`ease_weights`)."""
    active, b = ease_weights(split, lam)
    xa = interaction_matrix(split)[:, active].tocsr()
    n_items = split.n_items

    def score(users: np.ndarray) -> np.ndarray:
        out = np.zeros((len(users), n_items), dtype=np.float32)
        out[:, active] = np.asarray(xa[users] @ b, dtype=np.float32)
        return out

    return score


def common_neighbors(split: Split) -> TieBroken:
    """Number of common training friends; ties by candidate degree."""
    a = friend_matrix(split)
    return TieBroken(
        lambda users: np.asarray((a[users] @ a).todense(), dtype=np.float32), friend_degree(a)
    )


def adamic_adar(split: Split) -> TieBroken:
    """Sum over common neighbours w of 1 / log(deg w); neighbours of degree < 2 link nobody;
    ties by candidate degree."""
    a = friend_matrix(split)
    deg = friend_degree(a)
    wt = np.divide(1.0, np.log(np.maximum(deg, 1.0)), out=np.zeros_like(deg), where=deg >= 2)
    aw = (sp.diags(wt.astype(np.float32)) @ a).tocsr()
    return TieBroken(lambda users: np.asarray((a[users] @ aw).todense(), dtype=np.float32), deg)


def _fixed(lam: float | None) -> float:
    if lam is None:
        raise ValueError("EASE needs a fixed lambda here: choose one first (choose_ease_lambda)")
    return lam


def choose_ease_lambda(
    val: Split, lambdas: tuple[float, ...], max_users: int | None = None, progress: bool = False
) -> dict[str, object]:
    """EASE fitted on ``val``'s train part for each lambda and scored on its held-out part;
    the highest validation recall@20 wins (ties: the smaller lambda)."""
    tr = Graph(val.n_users, val.train_user, val.train_item)
    te = Graph(val.n_users, val.test_user, val.test_item)
    bar = tqdm(lambdas, desc="EASE lambda (validation)", disable=not progress)
    scores = [evaluate(ease(val, lam), tr, te, max_users=max_users)["recall@20"] for lam in bar]
    best = int(np.argmax(scores))  # first maximum: lambdas are tried in the given order
    return {
        "grid": [float(lam) for lam in lambdas],
        "validation_recall@20": [round(float(s), 6) for s in scores],
        "chosen": float(lambdas[best]),
    }


def content_baselines(split: Split, cfg: BaselineConfig) -> dict[str, Callable[[], ScoreFn] | str]:
    """Builders of score functions by name (fit lazily, one at a time, to bound memory);
    a string instead says why that baseline was skipped."""
    out: dict[str, Callable[[], ScoreFn] | str] = {
        "MostPopular": lambda: most_popular(split),
        "ItemKNN": lambda: item_knn(split),
    }
    if split.n_items <= cfg.ease_max_items:
        out["EASE"] = lambda: ease(split, _fixed(cfg.ease_lambda))
    else:
        out["EASE"] = (
            f"skipped: {split.n_items} items > ease_max_items={cfg.ease_max_items} (dense inverse)"
        )
    return out


def friend_baselines(split: Split) -> dict[str, Callable[[], ScoreFn] | str]:
    return {
        "CommonNeighbors": lambda: common_neighbors(split),
        "AdamicAdar": lambda: adamic_adar(split),
    }
