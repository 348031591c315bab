"""Loading data: Last.fm and user TSV files, and :func:`load_dataset` over every source.

Every loader returns a :class:`~training.dataset.Dataset` whose users and items are dense
indices ``0..n-1`` with the external ids (strings, as the source spells them) kept alongside,
plus a :class:`~training.dataset.LoadReport` that counts every row that was merged or skipped.
Bad rows raise :class:`DataError` naming the file, line, field and value. Synthetic data
comes from ``training.synthetic``, which :func:`load_dataset` calls.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from socialrec.training.dataset import Dataset, LoadReport
from socialrec.training.synthetic import SyntheticConfig, generate


class DataError(ValueError):
    """A bad input row: the message names file, line, field and value."""

    def __init__(self, path: str | Path, line: int, message: str) -> None:
        self.path = str(path)
        self.line = line
        super().__init__(f"{path}:{line}: {message}")


def canonical_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Undirected pairs (min, max), deduplicated; returns (pairs, n_self_loops, n_duplicates)."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    self_loop = a == b
    lo, hi = np.minimum(a, b)[~self_loop], np.maximum(a, b)[~self_loop]
    n = int(max(lo.max(initial=0), hi.max(initial=0)) + 1)
    keys = np.unique(lo * n + hi)
    pairs = (
        np.stack([keys // n, keys % n], axis=1).astype(np.int32)
        if len(keys)
        else np.zeros((0, 2), np.int32)
    )
    return pairs, int(self_loop.sum()), int(len(lo) - len(keys))


def _read_rows(
    path: Path, n_min: int, n_max: int, header: bool | None
) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) of a tab-separated file; checks the column count.

    ``header=None`` detects a header: the first line is one when its third column (weight)
    is not a number or, for two-column files, its first field is a column name (user, userID, ...).
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("r", encoding="utf-8", newline="") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if lineno == 1 and (
                header is True or (header is None and _looks_like_header(line, n_min))
            ):
                continue
            if not line.strip():
                continue  # blank lines (e.g. at the end of a file) carry no row
            parts = line.split("\t")
            if not n_min <= len(parts) <= n_max:
                want = str(n_min) if n_min == n_max else f"{n_min} to {n_max}"
                raise DataError(
                    path,
                    lineno,
                    f"expected {want} tab-separated columns, found {len(parts)}: {line[:80]!r}",
                )
            yield lineno, parts


def _looks_like_header(line: str, n_min: int) -> bool:
    parts = line.split("\t")
    if n_min >= 3 and len(parts) >= 3:
        try:
            float(parts[2])
            return False
        except ValueError:
            return True
    # Two-column files (friends, names): a header's first field is a column name. Matching whole
    # fields, not substrings, keeps a first row such as "david\tuser_2" as data.
    first = re.sub(r"[^a-z0-9]", "", parts[0].lower())  # "User_ID" -> "userid"
    return first in _HEADER_FIRST_FIELDS


_HEADER_FIRST_FIELDS = frozenset(
    {"user", "userid", "item", "itemid", "friend", "friendid", "id", "artist", "artistid"}
)


def _parse_weight(path: Path, lineno: int, value: str) -> float:
    try:
        w = float(value)
    except ValueError:
        raise DataError(path, lineno, f"field 'weight' is not a number: {value!r}") from None
    if not np.isfinite(w) or w < 0:
        raise DataError(path, lineno, f"field 'weight' must be a finite number >= 0, got {value!r}")
    return w


def _check_id(path: Path, lineno: int, name: str, value: str, numeric: bool) -> str:
    value = value.strip()
    if not value:
        raise DataError(path, lineno, f"field '{name}' is empty")
    if numeric and not re.fullmatch(r"-?[0-9]+", value):
        raise DataError(path, lineno, f"field '{name}' is not an integer id: {value!r}")
    return value


DUPLICATE_RULES = ("sum", "max", "last")
WEIGHT_KINDS = ("counts", "ratings")
# What duplicate (user, item) rows become when no rule is given: play counts add up; a
# rating given again replaces the earlier one (two 3-star rows stay a 3, not a 6).
DEFAULT_DUPLICATES = {"counts": "sum", "ratings": "last"}


def duplicate_rule(weight_kind: str, duplicates: str | None = None) -> str:
    """The rule for duplicate (user, item) rows: ``duplicates`` if given, else the kind's default."""
    if weight_kind not in WEIGHT_KINDS:
        raise ValueError(f"unknown weight kind {weight_kind!r}: choose {' or '.join(WEIGHT_KINDS)}")
    rule = duplicates or DEFAULT_DUPLICATES[weight_kind]
    if rule not in DUPLICATE_RULES:
        raise ValueError(f"unknown duplicate rule {rule!r}: choose {', '.join(DUPLICATE_RULES)}")
    return rule


def _build(
    name: str,
    inter_rows: list[tuple[str, str, float, int | None]],
    friend_rows: list[tuple[str, str]],
    item_names: dict[str, str] | None,
    report: LoadReport,
    sort_numeric: bool,
    duplicates: str = "sum",
) -> Dataset:
    """Turn parsed rows into a Dataset: dense ids, merged duplicates (counted), canonical pairs.

    ``duplicates`` says what several rows of one (user, item) become: ``sum`` (play counts),
    ``max``, or ``last`` (the row with the latest timestamp; without timestamps, the later
    row in the file). The latest timestamp is kept in every case.
    """
    if duplicates not in DUPLICATE_RULES:
        raise ValueError(
            f"unknown duplicate rule {duplicates!r}: choose {', '.join(DUPLICATE_RULES)}"
        )
    report.duplicate_rule = duplicates
    user_set: dict[str, None] = {}
    item_set: dict[str, None] = {}
    for u, i, _, _ in inter_rows:
        user_set.setdefault(u)
        item_set.setdefault(i)
    n_with_history = len(user_set)
    for a, b in friend_rows:
        user_set.setdefault(a)
        user_set.setdefault(b)
    report.friends_only_users = len(user_set) - n_with_history
    if item_names is not None:
        for i in item_names:
            item_set.setdefault(i)
    key = (lambda s: (int(s) if s.lstrip("-").isdigit() else 0, s)) if sort_numeric else None
    users = np.array(sorted(user_set, key=key) if sort_numeric else list(user_set), dtype=str)
    items = np.array(sorted(item_set, key=key) if sort_numeric else list(item_set), dtype=str)
    uidx = {s: k for k, s in enumerate(users.tolist())}
    iidx = {s: k for k, s in enumerate(items.tolist())}

    merged: dict[tuple[int, int], list[float]] = {}
    for u, i, w, ts in inter_rows:
        k = (uidx[u], iidx[i])
        prev = merged.get(k)
        if prev is None:
            merged[k] = [w, -1 if ts is None else ts]
        else:
            report.merged_duplicate_interactions += 1
            t = -1 if ts is None else ts
            if duplicates == "sum":
                prev[0] += w
            elif duplicates == "max":
                prev[0] = max(prev[0], w)
            elif t >= prev[1]:  # "last": the latest row; equal timestamps: the later row
                prev[0] = w
            prev[1] = max(prev[1], t)
    has_ts = any(r[3] is not None for r in inter_rows)
    keys = np.array(list(merged.keys()), dtype=np.int64).reshape(-1, 2)
    vals = np.array(list(merged.values()), dtype=np.float64).reshape(-1, 2)
    keep = vals[:, 0] > 0
    # A (user, item) whose merged weight is 0 carries no signal: skipped and counted.
    report.skipped_zero_weight_interactions = int((~keep).sum())
    keys, vals = keys[keep], vals[keep]

    if friend_rows:
        fa = np.fromiter((uidx[a] for a, _ in friend_rows), dtype=np.int64, count=len(friend_rows))
        fb = np.fromiter((uidx[b] for _, b in friend_rows), dtype=np.int64, count=len(friend_rows))
        n = len(users)
        directed = np.unique(fa * n + fb)
        report.merged_duplicate_friend_rows += len(fa) - len(directed)
        pairs, n_self, n_dup = canonical_pairs(directed // n, directed % n)
        report.skipped_self_friendships += n_self
        report.merged_reverse_friend_rows += n_dup
    else:
        pairs = np.zeros((0, 2), np.int32)

    names = None
    if item_names is not None:
        names = np.array([item_names.get(s, "") for s in items.tolist()], dtype=str)
        report.items_without_names = int(sum(1 for s in items.tolist() if s not in item_names))
    order = np.lexsort((keys[:, 1], keys[:, 0])) if len(keys) else np.zeros(0, np.int64)
    return Dataset(
        name=name,
        user_ids=users,
        item_ids=items,
        inter_user=keys[order, 0].astype(np.int32),
        inter_item=keys[order, 1].astype(np.int32),
        inter_weight=vals[order, 0].astype(np.float32),
        inter_ts=vals[order, 1].astype(np.int64) if has_ts else None,
        friends=pairs,
        item_names=names,
        report=report,
    )


def load_lastfm(data_dir: str | Path) -> Dataset:
    """HetRec 2011 Last.fm-2k: user_artists.dat, user_friends.dat, artists.dat (tab-separated, header)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(
            f"{d}: Last.fm data directory not found (expected user_artists.dat, user_friends.dat, artists.dat)"
        )
    report = LoadReport()
    inter: list[tuple[str, str, float, int | None]] = []
    path = d / "user_artists.dat"
    for lineno, (u, i, w) in _read_rows(path, 3, 3, header=True):
        inter.append(
            (
                _check_id(path, lineno, "userID", u, True),
                _check_id(path, lineno, "artistID", i, True),
                _parse_weight(path, lineno, w),
                None,
            )
        )
    report.rows_read += len(inter)
    friends: list[tuple[str, str]] = []
    path = d / "user_friends.dat"
    if path.exists():
        for lineno, (a, b) in _read_rows(path, 2, 2, header=True):
            friends.append(
                (
                    _check_id(path, lineno, "userID", a, True),
                    _check_id(path, lineno, "friendID", b, True),
                )
            )
        report.rows_read += len(friends)
    else:
        report.notes.append(f"{path} not found: no friend graph (friend features empty)")
    names: dict[str, str] | None = None
    path = d / "artists.dat"
    if path.exists():
        names = {}
        for lineno, parts in _read_rows(path, 2, 4, header=True):
            names[_check_id(path, lineno, "id", parts[0], True)] = parts[1]
    return _build("lastfm", inter, friends, names, report, sort_numeric=True)


def load_tsv(
    interactions: str | Path,
    friends: str | Path | None = None,
    item_names: str | Path | None = None,
    name: str = "tsv",
    weight_kind: str = "counts",
    duplicates: str | None = None,
) -> Dataset:
    """User data: interactions ``user, item, weight[, timestamp]``; optional ``user, friend`` and ``item, name`` files.

    Ids are any non-empty strings. A header line is detected and skipped. ``weight_kind``
    says what the weight is (``counts``: plays, clicks; ``ratings``: stars); duplicate
    (user, item) rows are merged by ``duplicates`` (default: ``sum`` for counts, ``last``
    for ratings, see :func:`duplicate_rule`) and counted; friend rows in both directions are
    merged and counted; self-friendships are skipped and counted.
    """
    rule = duplicate_rule(weight_kind, duplicates)
    report = LoadReport()
    path = Path(interactions)
    inter: list[tuple[str, str, float, int | None]] = []
    for lineno, parts in _read_rows(path, 3, 4, header=None):
        u = _check_id(path, lineno, "user", parts[0], False)
        i = _check_id(path, lineno, "item", parts[1], False)
        w = _parse_weight(path, lineno, parts[2])
        ts = None
        if len(parts) == 4 and parts[3].strip():
            try:
                ts = int(float(parts[3]))
            except ValueError:
                raise DataError(
                    path, lineno, f"field 'timestamp' is not a number: {parts[3]!r}"
                ) from None
        inter.append((u, i, w, ts))
    report.rows_read += len(inter)
    if not inter:
        raise DataError(path, 0, "no interaction rows")
    fr: list[tuple[str, str]] = []
    if friends is not None:
        fpath = Path(friends)
        for lineno, (a, b) in _read_rows(fpath, 2, 2, header=None):
            fr.append(
                (
                    _check_id(fpath, lineno, "user", a, False),
                    _check_id(fpath, lineno, "friend", b, False),
                )
            )
        report.rows_read += len(fr)
    names: dict[str, str] | None = None
    if item_names is not None:
        npath = Path(item_names)
        names = {}
        for lineno, parts in _read_rows(npath, 2, 64, header=None):
            names[_check_id(npath, lineno, "item", parts[0], False)] = parts[1]
    report.weight_kind = weight_kind
    return _build(name, inter, fr, names, report, sort_numeric=False, duplicates=rule)


@dataclass(frozen=True)
class DataConfig:
    """Which dataset to load; ``synthetic`` is the embedded default."""

    dataset: str = "synthetic"  # lastfm | tsv | synthetic
    data_dir: str | None = None  # lastfm directory
    interactions: str | None = None  # tsv: interactions file
    friends: str | None = None  # tsv: optional friends file
    item_names: str | None = None  # tsv: optional item-names file
    weight_kind: str = "counts"  # tsv: counts (plays, clicks) | ratings (stars)
    duplicates: str | None = None  # tsv: sum | max | last; None: sum for counts, last for ratings
    synthetic_users: int = SyntheticConfig.n_users
    synthetic_items: int = SyntheticConfig.n_items
    synthetic_interactions: int = SyntheticConfig.n_interactions
    seed: int = SyntheticConfig.seed  # synthetic generator seed


def load_dataset(cfg: DataConfig) -> Dataset:
    """Dispatch on ``cfg.dataset``; a clear error for a missing path or unknown name."""
    if cfg.dataset == "lastfm":
        if not cfg.data_dir:
            raise ValueError(
                "--dataset lastfm needs --data-dir (e.g. ../shared/datasets/hetrec2011-lastfm-2k)"
            )
        return load_lastfm(cfg.data_dir)
    if cfg.dataset == "tsv":
        if not cfg.interactions:
            raise ValueError(
                "--dataset tsv needs --interactions FILE (user, item, weight[, timestamp])"
            )
        return load_tsv(
            cfg.interactions,
            cfg.friends,
            cfg.item_names,
            weight_kind=cfg.weight_kind,
            duplicates=cfg.duplicates,
        )
    if cfg.dataset == "synthetic":
        return generate(
            SyntheticConfig(
                n_users=cfg.synthetic_users,
                n_items=cfg.synthetic_items,
                n_interactions=cfg.synthetic_interactions,
                seed=cfg.seed,
            )
        )
    raise ValueError(f"unknown dataset {cfg.dataset!r}: choose lastfm, tsv or synthetic")
