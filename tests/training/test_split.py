"""The seeded 80/20 split: determinism, partition, per-user counts, validation, export."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from socialrec.training.data import load_tsv
from socialrec.training.dataset import Dataset
from socialrec.training.split import (
    SPLIT_FILES,
    Split,
    SplitConfig,
    export_split,
    split_dataset,
    validation_split,
)


def _dataset(seed: int = 0, n_users: int = 60, n_items: int = 40, n_pairs: int = 90) -> Dataset:
    """Random dataset: users with 1..15 interactions (so 1- and 2-item users occur), string ids."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_users):
        n = 1 + u % 15  # every count 1..15 appears
        users += [u] * n
        items += sorted(rng.choice(n_items, n, replace=False).tolist())
    a = rng.integers(0, n_users, 4 * n_pairs)
    b = rng.integers(0, n_users, 4 * n_pairs)
    keep = a < b
    keys = np.unique(a[keep] * n_users + b[keep])[:n_pairs]
    friends = np.stack([keys // n_users, keys % n_users], axis=1).astype(np.int32)
    return Dataset(
        name="t",
        user_ids=np.array([f"user {u:03d}" for u in range(n_users)], dtype=str),
        item_ids=np.array([f"item-{i}" for i in range(n_items)], dtype=str),
        inter_user=np.array(users, np.int32),
        inter_item=np.array(items, np.int32),
        inter_weight=rng.integers(1, 100, len(users)).astype(np.float32),
        friends=friends,
    )


def _arrays(s: Split) -> list[np.ndarray]:
    return [
        s.train_user,
        s.train_item,
        s.train_weight,
        s.test_user,
        s.test_item,
        s.friends_train,
        s.friends_test,
    ]


def _pairs(u: np.ndarray, i: np.ndarray) -> Counter[tuple[int, int]]:
    return Counter(zip(u.tolist(), i.tolist(), strict=True))


def _friend_pairs(p: np.ndarray) -> Counter[tuple[int, int]]:
    return Counter(map(tuple, p.tolist()))


def test_same_seed_same_split_and_sha() -> None:
    ds = _dataset()
    s1, s2 = split_dataset(ds, SplitConfig(seed=7)), split_dataset(ds, SplitConfig(seed=7))
    for x, y in zip(_arrays(s1), _arrays(s2), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert s1.sha256() == s2.sha256()
    assert len(s1.sha256()) == 64


def test_split_ignores_global_numpy_state() -> None:
    ds = _dataset()
    np.random.seed(1)
    s1 = split_dataset(ds, SplitConfig(seed=3))
    np.random.seed(2)
    s2 = split_dataset(ds, SplitConfig(seed=3))
    assert s1.sha256() == s2.sha256()


def test_different_seed_different_split() -> None:
    ds = _dataset()
    s1, s2 = split_dataset(ds, SplitConfig(seed=1)), split_dataset(ds, SplitConfig(seed=2))
    assert s1.sha256() != s2.sha256()
    # Not only the seed in the hash header: the rows themselves differ.
    assert _pairs(s1.test_user, s1.test_item) != _pairs(s2.test_user, s2.test_item)
    assert _friend_pairs(s1.friends_test) != _friend_pairs(s2.friends_test)


def test_sha_changes_when_one_row_moves() -> None:
    s = split_dataset(_dataset(), SplitConfig(seed=0))
    moved = Split(**{**s.__dict__, "test_item": s.test_item.copy()})
    moved.test_item[0] = (moved.test_item[0] + 1) % s.n_items
    assert moved.sha256() != s.sha256()


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_train_test_partition_all_interactions(seed: int) -> None:
    ds = _dataset(seed)
    s = split_dataset(ds, SplitConfig(seed=seed))
    train = _pairs(s.train_user, s.train_item)
    test = _pairs(s.test_user, s.test_item)
    assert not set(train) & set(test)
    assert train + test == _pairs(ds.inter_user, ds.inter_item)
    # Training weights travel with their rows.
    rows = zip(
        ds.inter_user.tolist(), ds.inter_item.tolist(), ds.inter_weight.tolist(), strict=True
    )
    w = {(u, i): x for u, i, x in rows}
    got = zip(s.train_user.tolist(), s.train_item.tolist(), s.train_weight.tolist(), strict=True)
    assert all(w[(u, i)] == x for u, i, x in got)
    assert s.n_users == ds.n_users and s.n_items == ds.n_items and s.seed == seed


@pytest.mark.parametrize("seed", [0, 5])
def test_per_user_test_count(seed: int) -> None:
    ds = _dataset(seed)
    s = split_dataset(ds, SplitConfig(seed=seed))
    n = np.bincount(ds.inter_user, minlength=ds.n_users)
    got = np.bincount(s.test_user, minlength=ds.n_users)
    for u in range(ds.n_users):
        want = min(math.floor(0.2 * n[u] + 0.5), n[u] - 1)
        assert got[u] == want, (u, n[u])
    # Spot checks of the rounding: n=1 -> 0, 2 -> 0 (0.4 + 0.5 floors to 0), 3 -> 1 (1.1),
    # 7 -> 1 (1.9), 8 -> 2 (2.1), 13 -> 3 (3.1).
    by_n = {int(n[u]): int(got[u]) for u in range(ds.n_users)}
    assert [by_n[k] for k in (1, 2, 3, 7, 8, 13)] == [0, 0, 1, 1, 2, 3]
    assert np.all(np.bincount(s.train_user, minlength=ds.n_users) >= 1)


def test_friend_pairs_twenty_percent_test() -> None:
    ds = _dataset(n_pairs=90)
    s = split_dataset(ds, SplitConfig(seed=0))
    assert len(s.friends_test) == 18  # floor(0.2 * 90 + 0.5)
    assert len(s.friends_train) == 72
    assert _friend_pairs(s.friends_train) + _friend_pairs(s.friends_test) == _friend_pairs(
        ds.friends
    )
    assert not set(_friend_pairs(s.friends_train)) & set(_friend_pairs(s.friends_test))
    ds7 = _dataset(n_pairs=7)
    assert len(split_dataset(ds7).friends_test) == 1  # floor(1.4 + 0.5)


def test_no_friends_splits_to_empty() -> None:
    ds = _dataset()
    ds.friends = np.zeros((0, 2), np.int32)
    s = split_dataset(ds)
    assert s.friends_train.shape == (0, 2) and s.friends_test.shape == (0, 2)


def test_validation_split_carves_only_from_train() -> None:
    ds = _dataset()
    s = split_dataset(ds, SplitConfig(seed=0))
    v = validation_split(s, fraction=0.1, seed=1)
    assert _pairs(v.train_user, v.train_item) + _pairs(v.test_user, v.test_item) == _pairs(
        s.train_user, s.train_item
    )
    assert not set(_pairs(v.test_user, v.test_item)) & set(_pairs(s.test_user, s.test_item))
    assert not set(_pairs(v.train_user, v.train_item)) & set(_pairs(s.test_user, s.test_item))
    n = np.bincount(s.train_user, minlength=s.n_users)
    want = np.minimum(np.floor(0.1 * n + 0.5), np.maximum(n - 1, 0))
    assert np.array_equal(np.bincount(v.test_user, minlength=s.n_users), want)
    assert _friend_pairs(v.friends_train) + _friend_pairs(v.friends_test) == _friend_pairs(
        s.friends_train
    )
    assert len(v.friends_test) == math.floor(0.1 * len(s.friends_train) + 0.5)
    assert v.sha256() == validation_split(s, fraction=0.1, seed=1).sha256()
    assert v.sha256() != validation_split(s, fraction=0.1, seed=2).sha256()


def _read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def _external(ds: Dataset, u: np.ndarray, i: np.ndarray) -> set[tuple[str, str]]:
    return set(zip(ds.user_ids[u].tolist(), ds.item_ids[i].tolist(), strict=True))


def _check_export(ds: Dataset, s: Split, out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted([*SPLIT_FILES, "SPLIT_SHA256"])
    assert (out / "SPLIT_SHA256").read_text() == s.sha256() + "\n"
    weight = {
        (ds.user_ids[u], ds.item_ids[i]): w
        for u, i, w in zip(ds.inter_user, ds.inter_item, ds.inter_weight.tolist(), strict=True)
    }
    for name, u, i in (
        ("content_train.tsv", s.train_user, s.train_item),
        ("content_test.tsv", s.test_user, s.test_item),
    ):
        header, rows = _read_tsv(out / name)
        assert header == ["user", "item", "weight"]
        assert len(rows) == len(u)
        assert {(r[0], r[1]) for r in rows} == _external(ds, u, i)
        # Weights (test ones looked up in the dataset) are the original weights.
        assert all(float(r[2]) == weight[(r[0], r[1])] for r in rows)
        back = load_tsv(out / name)  # the loader reads the exported file as user data
        assert _external(back, back.inter_user, back.inter_item) == _external(ds, u, i)
    for name, pairs in (
        ("friends_train.tsv", s.friends_train),
        ("friends_test.tsv", s.friends_test),
    ):
        header, rows = _read_tsv(out / name)
        assert header == ["user", "friend"]
        want = set(
            zip(ds.user_ids[pairs[:, 0]].tolist(), ds.user_ids[pairs[:, 1]].tolist(), strict=True)
        )
        assert {(r[0], r[1]) for r in rows} == want and len(rows) == len(pairs)


def test_export_split_round_trip(tmp_path: Path) -> None:
    ds = _dataset()
    s = split_dataset(ds, SplitConfig(seed=11))
    out = export_split(ds, s, tmp_path / "split")
    assert out == tmp_path / "split"
    _check_export(ds, s, out)
    # The exported training file plus friends reload into the same training data.
    back = load_tsv(out / "content_train.tsv", out / "friends_train.tsv")
    assert {frozenset(back.user_ids[p].tolist()) for p in back.friends} == {
        frozenset(ds.user_ids[p].tolist()) for p in s.friends_train
    }


def test_export_keeps_ids_with_quotes_and_punctuation(tmp_path: Path) -> None:
    """Ids are any strings without tab/newline; the export must write them verbatim (no CSV
    quoting), or 'a"b' comes back as '"a""b"'."""
    rows = [
        ('o"neil', "it's", 2.0),
        ('o"neil', '"quoted"', 1.5),
        ('o"neil', "x,y", 1.0),
        ('o"neil', "plain", 1.0),
        ('o"neil', "more", 1.0),
        ("ünï cødé", '"quoted"', 3.0),
        ("ünï cødé", "plain", 1.0),
        ("ünï cødé", "x,y", 4.0),
        ("ünï cødé", "more", 1.0),
        ("ünï cødé", "it's", 1.0),
    ]
    inter = tmp_path / "in.tsv"
    inter.write_text("".join(f"{u}\t{i}\t{w}\n" for u, i, w in rows), encoding="utf-8")
    fr = tmp_path / "fr.tsv"
    fr.write_text('o"neil\tünï cødé\n', encoding="utf-8")
    ds = load_tsv(inter, fr)
    s = split_dataset(ds, SplitConfig(seed=0))
    assert len(s.test_user) == 2  # one of five per user
    _check_export(ds, s, export_split(ds, s, tmp_path / "out"))
