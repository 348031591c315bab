"""The in-memory dataset shape every source produces, and its load report.

:class:`Dataset` holds interactions (COO) and an undirected friend graph over dense indices
``0..n-1`` with the external ids alongside; :class:`LoadReport` counts what a loader or the
generator did besides keeping rows verbatim. File loaders live in ``training.data``, the
generator in ``training.synthetic``; both build on this module and on nothing of each other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

# LoadReport counter -> how the summary names it (only non-zero counters are shown).
_COUNTER_LABELS = {
    "merged_duplicate_interactions": "duplicate (user, item) rows merged",
    "repeat_interactions_summed": "repeat interactions summed (same user and item again: "
    "play counts add up)",
    "skipped_zero_weight_interactions": "interactions skipped (total weight 0)",
    "merged_reverse_friend_rows": "friend rows listed in both directions merged",
    "merged_duplicate_friend_rows": "duplicate friend rows merged",
    "skipped_self_friendships": "self-friendships skipped",
    "friends_only_users": "users with friends but no interactions",
    "items_without_names": "items without a name",
    "merged_id_spellings": "id spellings merged into one id (surrounding spaces, Unicode NFC)",
    "rows_without_timestamp": "rows with an empty timestamp (time unknown)",
}


@dataclass
class LoadReport:
    """What the loader did besides reading rows verbatim (nothing is dropped silently)."""

    rows_read: int = 0
    merged_duplicate_interactions: int = 0  # files: the same (user, item) on several rows
    repeat_interactions_summed: int = 0  # generator: a (user, item) drawn again (repeat listens)
    merged_reverse_friend_rows: int = 0
    merged_duplicate_friend_rows: int = 0
    skipped_self_friendships: int = 0
    skipped_zero_weight_interactions: int = 0
    friends_only_users: int = 0
    items_without_names: int = 0
    merged_id_spellings: int = 0  # files: an id written a second way (spaces, not NFC)
    rows_without_timestamp: int = 0  # files: an empty timestamp field (time unknown, -1)
    weight_kind: str = "counts"  # what an interaction weight is: counts (plays) | ratings
    duplicate_rule: str = "sum"  # how duplicate (user, item) rows merged: sum | max | last
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int | str | list[str]]:
        return {k: v for k, v in self.__dict__.items()}

    def lines(self) -> list[str]:
        """One readable line per non-zero counter, then the notes."""
        out = [
            f"{label}: {getattr(self, k):,}"
            + (f" (rule: {self.duplicate_rule})" if k == "merged_duplicate_interactions" else "")
            for k, label in _COUNTER_LABELS.items()
            if getattr(self, k)
        ]
        return out + list(self.notes)


@dataclass
class Dataset:
    """Interactions (COO) and an undirected friend graph over dense indices.

    ``inter_user``/``inter_item``/``inter_weight`` (and optional ``inter_ts``) are one row per
    unique (user, item) pair; ``friends`` is (P, 2) int32 with ``a < b`` and no duplicates.
    """

    name: str
    user_ids: np.ndarray  # (U,) str: external id of each user index
    item_ids: np.ndarray  # (I,) str: external id of each item index
    inter_user: np.ndarray  # (N,) int32
    inter_item: np.ndarray  # (N,) int32
    inter_weight: np.ndarray  # (N,) float32, > 0
    friends: np.ndarray  # (P, 2) int32, a < b
    inter_ts: np.ndarray | None = None  # (N,) int64 or None
    item_names: np.ndarray | None = None  # (I,) str or None
    report: LoadReport = field(default_factory=LoadReport)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return len(self.inter_user)

    @property
    def n_friend_pairs(self) -> int:
        return len(self.friends)

    def summary(self) -> dict[str, int | str]:
        return {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "friend_pairs": self.n_friend_pairs,
        }

    def describe(self) -> list[str]:
        """A short human summary: sizes on one line, then what loading merged or dropped."""
        head = (
            f"{self.name}: {self.n_users:,} users, {self.n_items:,} items, "
            f"{self.n_interactions:,} interactions, {self.n_friend_pairs:,} friend pairs"
        )
        return [head, *self.report.lines()]

    def fingerprint(self) -> str:
        """sha256 over ids, interactions and friend pairs: identifies the data a model saw."""
        h = hashlib.sha256()
        for arr in (self.inter_user, self.inter_item, self.inter_weight, self.friends):
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update("\x1f".join(self.user_ids.tolist()).encode())
        h.update("\x1f".join(self.item_ids.tolist()).encode())
        return h.hexdigest()


def csr_rows(
    n_rows: int, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, data) of a CSR matrix from COO, rows sorted, without scipy."""
    order = np.argsort(rows, kind="stable")
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    data = np.ones(len(rows), np.float32) if vals is None else np.asarray(vals, np.float32)[order]
    return indptr, np.asarray(cols)[order].astype(np.int32), data


def csr_grouped(
    n_rows: int, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR from COO rows already grouped by row: the order inside a row is kept.

    Unlike :func:`csr_rows` nothing is re-sorted, so an order chosen inside each row
    (e.g. heaviest history entry first) survives.
    """
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return indptr, np.asarray(cols).astype(np.int32), np.asarray(vals).astype(np.float32)
