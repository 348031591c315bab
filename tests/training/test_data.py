"""Loaders: load_tsv and load_lastfm on small good and bad files written inside each test."""

from __future__ import annotations

import re
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from socialrec.training.data import DataError, load_lastfm, load_tsv
from socialrec.training.dataset import Dataset


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _pairs(ds: Dataset) -> dict[tuple[str, str], float]:
    """(external user, external item) -> weight, through the dense indices."""
    users = ds.user_ids[ds.inter_user].tolist()
    items = ds.item_ids[ds.inter_item].tolist()
    return dict(zip(zip(users, items, strict=True), ds.inter_weight.tolist(), strict=True))


def _friend_set(ds: Dataset) -> set[frozenset[str]]:
    return {frozenset((ds.user_ids[a], ds.user_ids[b])) for a, b in ds.friends.tolist()}


# --------------------------------------------------------------------------- load_tsv: good


def test_header_is_detected_and_skipped(tmp_path: Path) -> None:
    p = _write(tmp_path / "i.tsv", ["user\titem\tweight", "u1\ti1\t2", "u2\ti1\t3"])
    ds = load_tsv(p)
    assert ds.report.rows_read == 2
    assert _pairs(ds) == {("u1", "i1"): 2.0, ("u2", "i1"): 3.0}
    assert "user" not in ds.user_ids.tolist()


def test_first_line_without_header_is_a_row(tmp_path: Path) -> None:
    p = _write(tmp_path / "i.tsv", ["u1\ti1\t2", "u2\ti2\t3"])
    ds = load_tsv(p)
    assert ds.report.rows_read == 2
    assert _pairs(ds) == {("u1", "i1"): 2.0, ("u2", "i2"): 3.0}


def test_four_columns_keep_timestamps(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "i.tsv",
        ["user\titem\tweight\tts", "a\tx\t1\t100", "a\ty\t1\t50", "a\tx\t2\t70", "b\tx\t1\t5"],
    )
    ds = load_tsv(p)
    assert ds.inter_ts is not None and ds.inter_ts.dtype == np.int64
    got = {
        (ds.user_ids[u], ds.item_ids[i]): (float(w), int(t))
        for u, i, w, t in zip(
            ds.inter_user, ds.inter_item, ds.inter_weight, ds.inter_ts, strict=True
        )
    }
    # (a, x) twice: weight 1 + 2 = 3, the latest timestamp (max(100, 70) = 100) wins.
    assert got == {("a", "x"): (3.0, 100), ("a", "y"): (1.0, 50), ("b", "x"): (1.0, 5)}


def test_three_columns_have_no_timestamps(tmp_path: Path) -> None:
    ds = load_tsv(_write(tmp_path / "i.tsv", ["u\ti\t1"]))
    assert ds.inter_ts is None


def test_string_ids_map_to_dense_indices_and_back(tmp_path: Path) -> None:
    rows = [
        ("alice", "song:Yesterday", 4.0),
        ("bob smith", "song:Yesterday", 1.0),
        ("alice", "ärger", 2.5),
        ("42", "7", 1.0),
        ("carol", "ärger", 1.0),
    ]
    p = _write(tmp_path / "i.tsv", [f"{u}\t{i}\t{w}" for u, i, w in rows])
    ds = load_tsv(p)
    assert ds.n_users == 4 and ds.n_items == 3 and ds.n_interactions == 5
    # Dense indices 0..n-1 and one index per external id.
    assert sorted(set(ds.inter_user.tolist())) == list(range(ds.n_users))
    assert sorted(set(ds.inter_item.tolist())) == list(range(ds.n_items))
    assert len(set(ds.user_ids.tolist())) == ds.n_users
    assert ds.inter_user.dtype == np.int32 and ds.inter_item.dtype == np.int32
    assert ds.inter_weight.dtype == np.float32
    # Round trip: user_ids[idx] gives back the external id of every input row.
    assert _pairs(ds) == {(u, i): w for u, i, w in rows}
    # Rows come sorted by (user index, item index).
    keys = ds.inter_user.astype(np.int64) * ds.n_items + ds.inter_item
    assert np.all(np.diff(keys) > 0)


def test_duplicate_interactions_merged_with_summed_weight(tmp_path: Path) -> None:
    p = _write(tmp_path / "i.tsv", ["u1\ti1\t1", "u1\ti1\t2.5", "u2\ti1\t1", "u1\ti1\t0.5"])
    ds = load_tsv(p)
    assert ds.report.rows_read == 4
    assert ds.report.merged_duplicate_interactions == 2
    assert _pairs(ds) == {("u1", "i1"): 4.0, ("u2", "i1"): 1.0}  # 1 + 2.5 + 0.5 = 4


def test_friends_both_directions_merged_and_counted(tmp_path: Path) -> None:
    inter = _write(tmp_path / "i.tsv", ["a\tx\t1", "b\tx\t1", "c\tx\t1"])
    fr = _write(tmp_path / "f.tsv", ["user\tfriend", "a\tb", "b\ta", "b\tc", "b\tc", "a\ta"])
    ds = load_tsv(inter, fr)
    assert _friend_set(ds) == {frozenset(("a", "b")), frozenset(("b", "c"))}
    assert ds.friends.shape == (2, 2) and ds.friends.dtype == np.int32
    assert np.all(ds.friends[:, 0] < ds.friends[:, 1])
    assert ds.report.merged_reverse_friend_rows == 1  # b-a after a-b
    assert ds.report.merged_duplicate_friend_rows == 1  # b-c twice
    assert ds.report.skipped_self_friendships == 1  # a-a
    assert ds.report.rows_read == 3 + 5


def test_self_friendship_skipped_and_counted(tmp_path: Path) -> None:
    inter = _write(tmp_path / "i.tsv", ["a\tx\t1"])
    fr = _write(tmp_path / "f.tsv", ["a\ta", "b\tb", "a\tb"])
    ds = load_tsv(inter, fr)
    assert ds.report.skipped_self_friendships == 2
    assert _friend_set(ds) == {frozenset(("a", "b"))}
    assert ds.report.friends_only_users == 1  # b has friends but no interactions


def test_zero_weight_rows_skipped_and_counted(tmp_path: Path) -> None:
    p = _write(tmp_path / "i.tsv", ["u1\ti1\t0", "u1\ti2\t3", "u2\ti2\t0.0"])
    ds = load_tsv(p)
    assert ds.report.skipped_zero_weight_interactions == 2
    assert _pairs(ds) == {("u1", "i2"): 3.0}
    assert np.all(ds.inter_weight > 0)


def test_no_friends_file_gives_empty_friends(tmp_path: Path) -> None:
    ds = load_tsv(_write(tmp_path / "i.tsv", ["u1\ti1\t1"]), None)
    assert ds.friends.shape == (0, 2)
    assert ds.friends.dtype == np.int32
    assert ds.n_friend_pairs == 0


def test_item_names_file(tmp_path: Path) -> None:
    inter = _write(tmp_path / "i.tsv", ["u1\ti1\t1", "u1\ti2\t1"])
    names = _write(tmp_path / "n.tsv", ["item\tname", "i1\tFirst Song", "i3\tNever Played"])
    ds = load_tsv(inter, item_names=names)
    assert ds.item_names is not None
    got = dict(zip(ds.item_ids.tolist(), ds.item_names.tolist(), strict=True))
    # i3 is only named (an item without interactions), i2 is played but has no name.
    assert got == {"i1": "First Song", "i2": "", "i3": "Never Played"}
    assert ds.report.items_without_names == 1


@pytest.mark.parametrize(
    ("a", "b"), [("david", "user_2"), ("user1", "user2"), ("Idris", "friend_7")]
)
def test_headerless_two_column_files_keep_their_first_row(tmp_path: Path, a: str, b: str) -> None:
    """A first row whose ids merely contain 'id'/'user'/'friend'/'name' is data, not a header."""
    inter = _write(tmp_path / "i.tsv", [f"{a}\tidol\t1", f"{b}\tidol\t1"])
    fr = _write(tmp_path / "f.tsv", [f"{a}\t{b}", f"{b}\tuser_3"])
    names = _write(tmp_path / "n.tsv", ["idol\tThe Name Game"])
    ds = load_tsv(inter, fr, names)
    assert _friend_set(ds) == {frozenset((a, b)), frozenset((b, "user_3"))}
    assert ds.item_names is not None and ds.item_names.tolist() == ["The Name Game"]
    assert ds.report.rows_read == 4


@pytest.mark.parametrize(
    "header", ["user\tfriend", "userID\tfriendID", "user_id\tfriend_id", "User\tFriend"]
)
def test_friend_header_variants_detected(tmp_path: Path, header: str) -> None:
    inter = _write(tmp_path / "i.tsv", ["a\tx\t1"])
    fr = _write(tmp_path / "f.tsv", [header, "a\tb"])
    ds = load_tsv(inter, fr)
    assert _friend_set(ds) == {frozenset(("a", "b"))}
    assert ds.n_users == 2


# --------------------------------------------------------------------------- load_tsv: bad


def _raises_at(path: Path, line: int, *fragments: str) -> re.Pattern[str]:
    return re.compile(
        re.escape(f"{path}:{line}:") + "".join(f".*{re.escape(f)}" for f in fragments)
    )


@pytest.mark.parametrize(
    ("row", "fragments"),
    [
        ("u2\ti2", ("expected 3 to 4 tab-separated columns, found 2", "'u2\\ti2'")),
        ("u2\ti2\t1\t5\textra", ("found 5",)),
        ("u2\ti2\tabc", ("'weight'", "'abc'")),
        ("u2\ti2\t-1", ("'weight'", "'-1'")),
        ("u2\ti2\tnan", ("'weight'", "'nan'")),
        ("u2\ti2\tinf", ("'weight'", "'inf'")),
        ("u2\ti2\t-inf", ("'weight'", "'-inf'")),
        ("\ti2\t1", ("'user'", "empty")),
        ("u2\t \t1", ("'item'", "empty")),
        ("u2\ti2\t1\tyesterday", ("'timestamp'", "'yesterday'")),
    ],
)
def test_bad_interaction_row_names_path_line_field_value(
    tmp_path: Path, row: str, fragments: tuple[str, ...]
) -> None:
    p = _write(tmp_path / "i.tsv", ["user\titem\tweight", "u1\ti1\t1", row, "u3\ti3\t1"])
    with pytest.raises(DataError, match=_raises_at(p, 3, *fragments)) as exc:
        load_tsv(p)
    assert exc.value.line == 3 and exc.value.path == str(p)


def test_bad_friend_row_names_path_and_line(tmp_path: Path) -> None:
    inter = _write(tmp_path / "i.tsv", ["a\tx\t1"])
    fr = _write(tmp_path / "f.tsv", ["a\tb", "b\t"])
    with pytest.raises(DataError, match=_raises_at(fr, 2, "'friend'", "empty")):
        load_tsv(inter, fr)
    fr3 = _write(tmp_path / "f3.tsv", ["a\tb", "a\tb\tc"])
    with pytest.raises(DataError, match=_raises_at(fr3, 2, "found 3")):
        load_tsv(inter, fr3)


def test_only_a_header_is_an_error(tmp_path: Path) -> None:
    p = _write(tmp_path / "i.tsv", ["user\titem\tweight"])
    with pytest.raises(DataError, match="no interaction rows"):
        load_tsv(p)


def test_missing_files_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.tsv"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_tsv(missing)
    inter = _write(tmp_path / "i.tsv", ["a\tx\t1"])
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nofriends.tsv"))):
        load_tsv(inter, tmp_path / "nofriends.tsv")


# --------------------------------------------------------------------------- load_lastfm


def _lastfm_dir(root: Path, friends: bool = True, inter_rows: list[str] | None = None) -> Path:
    d = root / "hetrec"
    d.mkdir()
    rows = inter_rows or ["2\t51\t13883", "2\t52\t11690", "10\t51\t100", "100\t7\t5", "10\t7\t1"]
    _write(d / "user_artists.dat", ["userID\tartistID\tweight", *rows])
    if friends:
        # HetRec lists every friendship in both directions; user 300 only has friends.
        _write(
            d / "user_friends.dat",
            ["userID\tfriendID", "2\t10", "10\t2", "10\t100", "100\t10", "2\t300", "300\t2"],
        )
    _write(
        d / "artists.dat",
        [
            "id\tname\turl\tpictureURL",
            "7\tThe Seven\thttp://www.last.fm/music/7\thttp://x/7.jpg",
            "51\tDuran Duran\thttp://www.last.fm/music/Duran+Duran\thttp://x/51.jpg",
            "99\tUnplayed\thttp://www.last.fm/music/U\t",
        ],
    )
    return d


def test_lastfm_counts_ordering_and_names(tmp_path: Path) -> None:
    ds = load_lastfm(_lastfm_dir(tmp_path))
    assert ds.name == "lastfm"
    # Numeric ordering (a string sort would give "10" < "100" < "2").
    assert ds.user_ids.tolist() == ["2", "10", "100", "300"]
    assert ds.item_ids.tolist() == ["7", "51", "52", "99"]
    assert ds.n_interactions == 5
    assert _pairs(ds) == {
        ("2", "51"): 13883.0,
        ("2", "52"): 11690.0,
        ("10", "51"): 100.0,
        ("100", "7"): 5.0,
        ("10", "7"): 1.0,
    }
    assert _friend_set(ds) == {frozenset(p) for p in (("2", "10"), ("10", "100"), ("2", "300"))}
    assert ds.report.merged_reverse_friend_rows == 3
    assert ds.report.friends_only_users == 1
    assert ds.report.rows_read == 5 + 6
    assert ds.item_names is not None
    assert ds.item_names.tolist() == ["The Seven", "Duran Duran", "", "Unplayed"]
    assert ds.report.items_without_names == 1  # artist 52
    assert ds.report.notes == []


@pytest.mark.parametrize("bad", ["x7", "1.5", "--5", "", "1e3"])
def test_lastfm_non_integer_id_names_line(tmp_path: Path, bad: str) -> None:
    d = _lastfm_dir(tmp_path, inter_rows=["2\t51\t1", "10\t52\t1", f"{bad}\t51\t3"])
    path = d / "user_artists.dat"
    with pytest.raises(DataError, match=_raises_at(path, 4, "'userID'")) as exc:
        load_lastfm(d)
    if bad:
        assert repr(bad) in str(exc.value)


def test_lastfm_without_friends_file(tmp_path: Path) -> None:
    ds = load_lastfm(_lastfm_dir(tmp_path, friends=False))
    assert ds.friends.shape == (0, 2)
    assert ds.n_users == 3 and ds.n_interactions == 5
    assert len(ds.report.notes) == 1 and "user_friends.dat" in ds.report.notes[0]
    assert any("user_friends.dat" in line for line in ds.report.lines())


def test_lastfm_missing_directory_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "gone"))):
        load_lastfm(tmp_path / "gone")


# --------------------------------------------------------------------------- property

_ID = st.text(alphabet="abcXYZ019_-:é", min_size=1, max_size=4)
_ROW = st.tuples(_ID, _ID, st.integers(min_value=1, max_value=10_000))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows=st.lists(_ROW, min_size=1, max_size=40), header=st.booleans())
def test_load_tsv_keeps_every_pair_with_summed_weight(
    rows: list[tuple[str, str, int]], header: bool
) -> None:
    # Weights are quarters of integers so every sum is exact in float32 (< 2**24 quarters).
    expected: dict[tuple[str, str], float] = defaultdict(float)
    for u, i, w in rows:
        expected[(u, i)] += w / 4
    with tempfile.TemporaryDirectory() as tmp:
        lines = ["user\titem\tweight"] if header else []
        p = _write(Path(tmp) / "i.tsv", lines + [f"{u}\t{i}\t{w / 4}" for u, i, w in rows])
        ds = load_tsv(p)
    assert _pairs(ds) == dict(expected)
    assert ds.report.rows_read == len(rows)
    assert ds.report.merged_duplicate_interactions == len(rows) - len(expected)
    assert ds.report.skipped_zero_weight_interactions == 0
    assert set(ds.user_ids.tolist()) == {u for u, _, _ in rows}
    assert set(ds.item_ids.tolist()) == {i for _, i, _ in rows}
    assert Counter(ds.inter_user.tolist()) == Counter(
        ds.user_ids.tolist().index(u) for u, _ in expected
    )
