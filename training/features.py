"""User-tower inputs built from a split: padded history and friend lists per user.

These are exactly the features the online store holds (capped history with weights, friend
ids), laid out as padded (B, L) arrays for batches of users.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from socialrec.training.dataset import csr_grouped, csr_rows
from socialrec.training.split import Split


@dataclass
class Features:
    """CSR history (sorted by weight, heaviest first) and CSR friends of every user."""

    n_users: int
    n_items: int
    hist_indptr: np.ndarray
    hist_items: np.ndarray
    hist_weight: np.ndarray
    fr_indptr: np.ndarray
    fr_users: np.ndarray
    max_history: int
    max_friends: int

    @classmethod
    def from_split(cls, split: Split, max_history: int = 256, max_friends: int = 256) -> Features:
        order = np.lexsort((-split.train_weight, split.train_user))
        u, i, w = split.train_user[order], split.train_item[order], split.train_weight[order]
        indptr, items, weight = csr_grouped(split.n_users, u, i, w)
        a, b = split.friends_train[:, 0], split.friends_train[:, 1]
        fu = np.concatenate([a, b])
        fv = np.concatenate([b, a])
        f_indptr, f_users, _ = csr_rows(split.n_users, fu, fv)
        return cls(
            split.n_users,
            split.n_items,
            indptr,
            items,
            weight,
            f_indptr,
            f_users,
            max_history,
            max_friends,
        )

    def history(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Padded (ids, weights) of the users' histories, zero weight on padding.  (B, L)"""
        return _padded(self.hist_indptr, self.hist_items, self.hist_weight, users, self.max_history)

    def friends(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Padded (ids, ones) of the users' friends, zero on padding.  (B, F)"""
        ones = np.ones(len(self.fr_users), np.float32)
        return _padded(self.fr_indptr, self.fr_users, ones, users, self.max_friends)

    def active_users(self) -> np.ndarray:
        """Users with any history or friend: the ones a tower can say something about."""
        return np.flatnonzero((np.diff(self.hist_indptr) > 0) | (np.diff(self.fr_indptr) > 0))


def _padded(
    indptr: np.ndarray, cols: np.ndarray, vals: np.ndarray, users: np.ndarray, cap: int
) -> tuple[np.ndarray, np.ndarray]:
    start = indptr[users]  # (B,)
    lens = np.minimum(indptr[users + 1] - start, cap)  # (B,)
    width = max(int(lens.max(initial=0)), 1)
    pos = np.arange(width)[None, :]  # (1, L)
    mask = pos < lens[:, None]  # (B, L)
    idx = np.where(mask, start[:, None] + pos, 0)
    if len(cols) == 0:
        return np.zeros(mask.shape, np.int64), np.zeros(mask.shape, np.float32)
    ids = np.where(mask, cols[idx], 0).astype(np.int64)
    w = np.where(mask, vals[idx], 0).astype(np.float32)
    return ids, w
