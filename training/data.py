"""Loading data: Last.fm and user TSV files, and :func:`load_dataset` over every source.

Every loader returns a :class:`~training.dataset.Dataset` whose users and items are dense
indices ``0..n-1`` with the external ids kept alongside (strings as the source spells them,
stripped and in NFC, the form the server keys them by), plus a
:class:`~training.dataset.LoadReport` that counts every row that was merged or skipped. Bad
rows, and ids the server would refuse, raise :class:`DataError` naming the file, line, field
and value. Synthetic data
comes from ``training.synthetic``, which :func:`load_dataset` calls.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np
from socialrec.serving.schema import MAX_ID_LEN, MAX_TOTAL_WEIGHT, check_id, shown
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
    path: Path,
    n_min: int,
    n_max: int,
    header: bool | None,
    *,
    split_once: bool = False,
    header_out: list[str] | None = None,
) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) of a tab-separated UTF-8 file; checks the column count.

    The file is read as ``utf-8-sig``: a byte order mark at its start is dropped. A file that
    is not UTF-8 raises :class:`DataError` naming the first line that is not. ``header=None``
    detects a header: the first line is one when its fields are all known column names (see
    :func:`_looks_like_header`); a skipped header's fields are appended to ``header_out``.
    ``split_once`` splits a line at its first tab only (a name may hold tabs).
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as f:
            for lineno, raw in enumerate(f, start=1):
                line = raw.rstrip("\r\n")
                if lineno == 1 and (
                    header is True
                    or (header is None and _looks_like_header(line, 2 if split_once else None))
                ):
                    if header_out is not None:
                        header_out.extend(line.split("\t"))
                    continue
                if not line.strip():
                    continue  # blank lines (e.g. at the end of a file) carry no row
                parts = line.split("\t", 1) if split_once else line.split("\t")
                if not n_min <= len(parts) <= n_max:
                    want = f"{n_min} to {n_max}" if n_min < n_max else str(n_min)
                    want = f"at least {n_min}" if split_once else want
                    raise DataError(
                        path,
                        lineno,
                        f"expected {want} tab-separated columns, found {len(parts)}: {line[:80]!r}",
                    )
                yield lineno, parts
    except UnicodeDecodeError:
        lineno, why = _first_undecodable_line(path)
        raise DataError(path, lineno, f"not UTF-8 text ({why}); save the file as UTF-8") from None


def _first_undecodable_line(path: Path) -> tuple[int, str]:
    """The number of the first line of ``path`` that is not UTF-8, and why (a byte and column).

    A line break byte never occurs inside a UTF-8 sequence, so lines decode one by one."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                return lineno, f"byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line"
    return 0, "undecodable"  # not reached: the text reader failed on some line


# Column names a header line may use, compared lowercase without punctuation ("User_ID" ->
# "userid"). Whole fields are matched, not substrings, so a first row such as
# "david\tuser_2" stays data; names a real id could plausibly take ("a", "u", "user1") are
# left out.
_USER_COLUMNS = {
    "user", "userid", "users", "username", "uid", "customer", "customerid", "member",
    "memberid", "visitor", "visitorid", "account", "accountid", "person", "personid",
    "reviewer", "reviewerid", "listener", "listenerid", "viewer", "viewerid", "id",
}  # fmt: skip
_ITEM_COLUMNS = {
    "item", "itemid", "items", "iid", "product", "productid", "sku", "movie", "movieid",
    "track", "trackid", "song", "songid", "artist", "artistid", "book", "bookid", "isbn",
    "asin", "video", "videoid", "article", "articleid", "post", "postid", "business",
    "businessid", "game", "gameid", "anime", "animeid", "content", "contentid", "doc", "docid",
}  # fmt: skip
_FRIEND_COLUMNS = {
    "friend", "friendid", "friends", "src", "dst", "source", "target", "sourceid", "targetid",
    "usera", "userb", "userida", "useridb", "useraid", "userbid", "follower", "followee",
    "followerid", "followeeid", "followed", "following", "from", "to", "fromid", "toid",
    "contact", "contactid", "buddy", "buddyid", "peer", "peerid",
}  # fmt: skip
_VALUE_COLUMNS = {
    "weight", "rating", "ratings", "score", "count", "counts", "plays", "playcount",
    "listens", "listencount", "clicks", "views", "value", "qty", "quantity", "freq",
    "frequency", "stars", "preference", "ts", "tsms", "timestamp", "timestampms", "time",
    "timems", "unixtime", "epoch", "epochms", "datetime", "date", "created", "createdat",
}  # fmt: skip
_NAME_COLUMNS = {
    "name", "title", "label", "itemname", "artistname", "moviename", "trackname", "songname",
    "productname", "description",
}  # fmt: skip
_HEADER_COLUMNS = frozenset(
    _USER_COLUMNS | _ITEM_COLUMNS | _FRIEND_COLUMNS | _VALUE_COLUMNS | _NAME_COLUMNS
)


def _looks_like_header(line: str, n_fields: int | None = None) -> bool:
    """Whether a first line is a header: its fields (the first ``n_fields`` of them, or all)
    are all known column names (:data:`_HEADER_COLUMNS`, compared case-insensitively without
    punctuation: ``userId``, ``user_id`` and ``USER ID`` are one name).

    So ``user\\titem\\tweight``, ``src\\tdst`` and ``movieId\\ttitle`` are headers, and a first
    row with any field that is not a column name (``u1\\ti5\\tthree``, ``user\\tu1``) is data.
    A data row made only of column names (a friends row of users called ``user`` and
    ``friend``) cannot be told from a header and is read as one.
    """
    parts = line.split("\t")[:n_fields]
    return all(re.sub(r"[^a-z0-9]", "", p.lower()) in _HEADER_COLUMNS for p in parts)


def _parse_weight(path: Path, lineno: int, value: str, hint: str = "") -> float:
    """A weight as written: a finite number in [0, MAX_TOTAL_WEIGHT] (the server's cap on one
    user's weight for one item), so the float32 it is stored as is finite too."""
    try:
        w = float(value)
    except ValueError:
        raise DataError(
            path, lineno, f"field 'weight' is not a number: {shown(value)}{hint}"
        ) from None
    if not (math.isfinite(w) and 0 <= w <= MAX_TOTAL_WEIGHT):
        raise DataError(
            path,
            lineno,
            f"field 'weight' must be a finite number from 0 to {MAX_TOTAL_WEIGHT:g}, "
            f"got {shown(value)}",
        )
    return w


_INT64_MAX = 2**63 - 1
# Below this every timestamp of a file is before 1973-03-03 in ms, or after the year 5000 in
# seconds: such a file almost surely holds seconds.
_SECONDS_LIKE_BELOW = 10**11


def _parse_ts(path: Path, lineno: int, value: str) -> int:
    """A timestamp: a whole number of milliseconds since the epoch, from 0 to 2**63-1.

    Parsed exactly (digits, or a decimal such as ``1.6e12`` or ``1600000000000.0`` whose
    value is whole), never through a float64, so a large value keeps every digit."""
    s = value.strip()
    if s.isascii() and s.isdigit() and len(s) <= 18:  # the common case: < 10**18 < 2**63
        return int(s)
    try:
        d = None if "_" in s else Decimal(s)
    except InvalidOperation:
        d = None
    if d is None:
        raise DataError(path, lineno, f"field 'timestamp' is not a number: {shown(value)}")
    if not (d.is_finite() and 0 <= d <= _INT64_MAX and d == d.to_integral_value()):
        raise DataError(
            path,
            lineno,
            "field 'timestamp' must be a whole number of milliseconds from 0 to 2**63-1, "
            f"got {shown(value)}",
        )
    return int(d)


def _check_id(path: Path, lineno: int, name: str, value: str, numeric: bool) -> str:
    """``value`` stripped and in NFC form, checked as the server checks ids (``check_id``:
    not blank, no control or invisible characters, at most MAX_ID_LEN characters)."""
    value = value.strip()
    if not value:
        raise DataError(path, lineno, f"field '{name}' is empty")
    if numeric and not re.fullmatch(r"-?[0-9]+", value):
        raise DataError(path, lineno, f"field '{name}' is not an integer id: {shown(value)}")
    try:
        return check_id(f"field '{name}'", value, MAX_ID_LEN)
    except ValueError as e:
        raise DataError(path, lineno, f"{e}: {shown(value)}") from None


class _Ids:
    """One id space (users, or items): each field as written -> its checked NFC id, cached.

    Two spellings that give one id (surrounding spaces, or NFC: "cafe" + U+0301 and "café")
    are one user or item; every spelling after the first is counted in ``merged``."""

    def __init__(self, numeric: bool = False) -> None:
        self.numeric = numeric
        self.by_field: dict[str, str] = {}
        self.ids: set[str] = set()
        self.merged = 0

    def __call__(self, path: Path, lineno: int, name: str, value: str) -> str:
        got = self.by_field.get(value)
        if got is None:
            got = _check_id(path, lineno, name, value, self.numeric)
            self.by_field[value] = got
            if got in self.ids:
                self.merged += 1
            else:
                self.ids.add(got)
        return got


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

    merged: dict[tuple[int, int], list] = {}  # (user, item) -> [weight, latest ts or -1]
    for u, i, w, ts in inter_rows:
        k = (uidx[u], iidx[i])
        prev = merged.get(k)
        if prev is None:
            merged[k] = [w, -1 if ts is None else ts]
        else:
            report.merged_duplicate_interactions += 1
            t = -1 if ts is None else ts
            if duplicates == "sum":  # capped like the server caps a live sum
                prev[0] = min(prev[0] + w, MAX_TOTAL_WEIGHT)
            elif duplicates == "max":
                prev[0] = max(prev[0], w)
            elif t >= prev[1]:  # "last": the latest row; equal timestamps: the later row
                prev[0] = w
            prev[1] = max(prev[1], t)
    has_ts = any(r[3] is not None for r in inter_rows)
    keys = np.array(list(merged.keys()), dtype=np.int64).reshape(-1, 2)
    weights = np.array([v[0] for v in merged.values()], dtype=np.float64)
    # int64 throughout: a float64 would round timestamps above 2**53 (ns-sized values).
    times = np.array([v[1] for v in merged.values()], dtype=np.int64)
    # A (user, item) whose merged weight is 0 carries no signal: skipped and counted (so is a
    # weight too small for the float32 it is stored as, e.g. 1e-50, which would become 0).
    keep = weights.astype(np.float32) > 0
    report.skipped_zero_weight_interactions = int((~keep).sum())
    keys, weights, times = keys[keep], weights[keep], times[keep]

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
        inter_weight=weights[order].astype(np.float32),
        inter_ts=times[order] if has_ts else None,
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
    user_id, item_id = _Ids(numeric=True), _Ids(numeric=True)
    inter: list[tuple[str, str, float, int | None]] = []
    path = d / "user_artists.dat"
    for lineno, (u, i, w) in _read_rows(path, 3, 3, header=True):
        inter.append(
            (
                user_id(path, lineno, "userID", u),
                item_id(path, lineno, "artistID", i),
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
                (user_id(path, lineno, "userID", a), user_id(path, lineno, "friendID", b))
            )
        report.rows_read += len(friends)
    else:
        report.notes.append(f"{path} not found: no friend graph (friend features empty)")
    names: dict[str, str] | None = None
    path = d / "artists.dat"
    if path.exists():
        names = {}
        for lineno, parts in _read_rows(path, 2, 4, header=True):
            names[item_id(path, lineno, "id", parts[0])] = parts[1]
    report.merged_id_spellings = user_id.merged + item_id.merged
    return _build("lastfm", inter, friends, names, report, sort_numeric=True)


def _header_note(path: Path, header: list[str]) -> str:
    return f"{path}: line 1 read as a header ({', '.join(header)})"


_NOT_A_HEADER = (
    " (line 1 is not read as a header: a header's fields must all be column names such as "
    "user, item, weight, timestamp)"
)


def load_tsv(
    interactions: str | Path,
    friends: str | Path | None = None,
    item_names: str | Path | None = None,
    name: str = "tsv",
    weight_kind: str = "counts",
    duplicates: str | None = None,
) -> Dataset:
    """User data: interactions ``user, item, weight[, timestamp]``; optional ``user, friend`` and ``item, name`` files.

    Files are UTF-8 (a byte order mark at the start is dropped). A first line whose fields
    are all known column names (``user``, ``item_id``, ``src``, ``movieId``, ``title``, ...;
    see :func:`_looks_like_header`) is a header and is skipped, with a note in the report;
    any other first line is data. Ids are checked as the server checks them
    (:func:`socialrec.serving.schema.check_id`: not blank, no control or invisible
    characters, at most MAX_ID_LEN characters) and kept in NFC form with surrounding spaces
    stripped, so spellings that differ only in those are one user or item (counted). A
    weight is a finite number from 0 to MAX_TOTAL_WEIGHT. A timestamp is a whole number of
    milliseconds since the epoch (>= 0, within int64); when any row (or the header) has a
    timestamp column every row must have the field, though it may be empty (time unknown,
    counted); a file whose timestamps all look like seconds gets a warning.

    ``weight_kind`` says what the weight is (``counts``: plays, clicks; ``ratings``: stars);
    duplicate (user, item) rows are merged by ``duplicates`` (default: ``sum`` for counts,
    ``last`` for ratings, see :func:`duplicate_rule`) and counted; friend rows in both
    directions are merged and counted; self-friendships are skipped and counted. In the
    item-names file the name is everything after the first tab.
    """
    rule = duplicate_rule(weight_kind, duplicates)
    report = LoadReport()
    user_id, item_id = _Ids(), _Ids()
    path = Path(interactions)
    header: list[str] = []
    inter: list[tuple[str, str, float, int | None]] = []
    ts_line = short_line = 0  # the first row with a timestamp field, and without one
    for lineno, parts in _read_rows(path, 3, 4, header=None, header_out=header):
        u = user_id(path, lineno, "user", parts[0])
        i = item_id(path, lineno, "item", parts[1])
        w = _parse_weight(path, lineno, parts[2], _NOT_A_HEADER if lineno == 1 else "")
        ts = None
        if len(parts) == 4:
            ts_line = ts_line or lineno
            if parts[3].strip():
                ts = _parse_ts(path, lineno, parts[3])
            else:
                report.rows_without_timestamp += 1
        else:
            short_line = short_line or lineno
        inter.append((u, i, w, ts))
    report.rows_read += len(inter)
    if not inter:
        raise DataError(path, 0, "no interaction rows")
    if (ts_line or len(header) >= 4) and short_line:
        where = f"line {ts_line} has one" if ts_line else "the header names one"
        raise DataError(
            path,
            short_line,
            f"field 'timestamp' is missing: the file has a timestamp column ({where}), "
            "so every row needs the field",
        )
    if header:
        report.notes.append(_header_note(path, header))
    times = [t for _, _, _, t in inter if t is not None]
    if times and max(times) < _SECONDS_LIKE_BELOW:
        warn = (
            f"{path}: every timestamp is below {_SECONDS_LIKE_BELOW:.0e}, so they look like "
            "seconds; they are read as milliseconds since the epoch"
        )
        print(f"warning: {warn}", file=sys.stderr)
        report.notes.append(warn)
    fr: list[tuple[str, str]] = []
    if friends is not None:
        fpath = Path(friends)
        header = []
        for lineno, (a, b) in _read_rows(fpath, 2, 2, header=None, header_out=header):
            fr.append((user_id(fpath, lineno, "user", a), user_id(fpath, lineno, "friend", b)))
        report.rows_read += len(fr)
        if header:
            report.notes.append(_header_note(fpath, header))
    names: dict[str, str] | None = None
    if item_names is not None:
        npath = Path(item_names)
        names = {}
        header = []
        rows = _read_rows(npath, 2, 2, header=None, split_once=True, header_out=header)
        for lineno, (i, item_name) in rows:
            names[item_id(npath, lineno, "item", i)] = item_name
        if header:
            report.notes.append(_header_note(npath, header))
    report.weight_kind = weight_kind
    report.merged_id_spellings = user_id.merged + item_id.merged
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
