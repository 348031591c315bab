"""The fixed evaluation split (docs/design.md): per-user 80/20 of interactions, 80/20 of friend pairs.

The split is a pure function of the dataset and the seed, so ``socialrec split`` and
``socialrec train`` with the same seed see the identical split, and its sha256 says so.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from socialrec.training.dataset import Dataset


@dataclass(frozen=True)
class SplitConfig:
    seed: int = 42
    test_fraction: float = 0.2


@dataclass
class Split:
    """Train/test parts over dense indices of one dataset."""

    n_users: int
    n_items: int
    train_user: np.ndarray  # (Ntr,) int32
    train_item: np.ndarray  # (Ntr,) int32
    train_weight: np.ndarray  # (Ntr,) float32
    test_user: np.ndarray  # (Nte,) int32
    test_item: np.ndarray  # (Nte,) int32
    friends_train: np.ndarray  # (Ptr, 2) int32, a < b
    friends_test: np.ndarray  # (Pte, 2) int32, a < b
    seed: int

    def sha256(self) -> str:
        """Fingerprint of exactly which rows landed in train and test."""
        h = hashlib.sha256(f"{self.n_users}:{self.n_items}:{self.seed}".encode())
        for arr in (
            self.train_user,
            self.train_item,
            self.test_user,
            self.test_item,
            self.friends_train,
            self.friends_test,
        ):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


def per_user_holdout(
    users: np.ndarray, n_users: int, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of rows held out: round(fraction * n_u) random rows of each user, keeping >= 1.

    A user with n rows gives floor(fraction * n + 0.5) of them, at most n - 1, so users with
    one or two interactions keep everything for training (no test item, not evaluated).
    """
    n = len(users)
    counts = np.bincount(users, minlength=n_users)  # (U,)
    n_out = np.minimum(np.floor(fraction * counts + 0.5), np.maximum(counts - 1, 0)).astype(
        np.int64
    )
    order = np.lexsort((rng.random(n), users))  # rows grouped by user, random within a user
    starts = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts[users[order]]
    return rank < n_out[users]


def split_dataset(ds: Dataset, cfg: SplitConfig = SplitConfig()) -> Split:
    """Seeded 80/20 split of each user's interactions and of the undirected friend pairs."""
    rng = np.random.default_rng(cfg.seed)
    test = per_user_holdout(ds.inter_user, ds.n_users, cfg.test_fraction, rng)
    perm = rng.permutation(len(ds.friends))
    n_test = int(np.floor(cfg.test_fraction * len(ds.friends) + 0.5))
    f_test = np.zeros(len(ds.friends), dtype=bool)
    f_test[perm[:n_test]] = True
    return Split(
        n_users=ds.n_users,
        n_items=ds.n_items,
        train_user=ds.inter_user[~test],
        train_item=ds.inter_item[~test],
        train_weight=ds.inter_weight[~test],
        test_user=ds.inter_user[test],
        test_item=ds.inter_item[test],
        friends_train=ds.friends[~f_test],
        friends_test=ds.friends[f_test],
        seed=cfg.seed,
    )


def validation_split(split: Split, fraction: float = 0.1, seed: int = 1) -> Split:
    """Carve a validation split out of the training part (model selection never sees test)."""
    rng = np.random.default_rng(seed)
    val = per_user_holdout(split.train_user, split.n_users, fraction, rng)
    perm = rng.permutation(len(split.friends_train))
    n_val = int(np.floor(fraction * len(split.friends_train) + 0.5))
    f_val = np.zeros(len(split.friends_train), dtype=bool)
    f_val[perm[:n_val]] = True
    return Split(
        n_users=split.n_users,
        n_items=split.n_items,
        train_user=split.train_user[~val],
        train_item=split.train_item[~val],
        train_weight=split.train_weight[~val],
        test_user=split.train_user[val],
        test_item=split.train_item[val],
        friends_train=split.friends_train[~f_val],
        friends_test=split.friends_train[f_val],
        seed=seed,
    )


SPLIT_FILES = ("content_train.tsv", "content_test.tsv", "friends_train.tsv", "friends_test.tsv")


def export_split(ds: Dataset, split: Split, out_dir: str | Path) -> Path:
    """Write the split as TSV with original ids and a header line, for scoring by other tools."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    uid, iid = ds.user_ids, ds.item_ids
    w_test = _weights_of(ds, split.test_user, split.test_item)
    for name, u, i, w in (
        ("content_train.tsv", split.train_user, split.train_item, split.train_weight),
        ("content_test.tsv", split.test_user, split.test_item, w_test),
    ):
        with (out / name).open("w", encoding="utf-8", newline="") as f:
            wr = _tsv_writer(f)
            wr.writerow(["user", "item", "weight"])
            wr.writerows(
                zip(uid[u].tolist(), iid[i].tolist(), [_fmt(x) for x in w.tolist()], strict=True)
            )
    for name, pairs in (
        ("friends_train.tsv", split.friends_train),
        ("friends_test.tsv", split.friends_test),
    ):
        with (out / name).open("w", encoding="utf-8", newline="") as f:
            wr = _tsv_writer(f)
            wr.writerow(["user", "friend"])
            wr.writerows(zip(uid[pairs[:, 0]].tolist(), uid[pairs[:, 1]].tolist(), strict=True))
    (out / "SPLIT_SHA256").write_text(split.sha256() + "\n")
    return out


def _tsv_writer(f: TextIO) -> Any:
    """Plain TSV: ids are written verbatim (no CSV quoting, so 'a"b' stays 'a"b' for load_tsv);
    an id holding a tab or newline, which no loader produces, raises instead of corrupting a row."""
    return csv.writer(
        f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE, quotechar=None
    )


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _weights_of(ds: Dataset, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Weights of (user, item) rows looked up in the dataset (rows are sorted by user, item)."""
    key_all = ds.inter_user.astype(np.int64) * ds.n_items + ds.inter_item
    pos = np.searchsorted(key_all, users.astype(np.int64) * ds.n_items + items)
    return ds.inter_weight[pos]
