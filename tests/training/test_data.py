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


def test_summed_duplicate_weights_are_capped_like_the_servers(tmp_path: Path) -> None:
    """Rows each within the cap whose sum is not: the pair's weight stops at 1e9, as a live
    sum does in Redis (each row alone is checked as it is read)."""
    p = _write(tmp_path / "i.tsv", ["u1\ti1\t6e8", "u1\ti1\t6e8", "u2\ti1\t1"])
    assert _pairs(load_tsv(p))[("u1", "i1")] == pytest.approx(1e9)


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


# --------------------------------------------------------------------------- load_tsv: what serving refuses

NFD_CAFE = "cafe\u0301"  # "café" with a combining accent; NFC is "caf\u00e9"
NFC_CAFE = "caf\u00e9"


def test_ids_are_stored_nfc_and_spellings_merge(tmp_path: Path) -> None:
    """The server normalises ids to NFC: training must too, or an NFD item it learned is an
    unknown id to the server (seen items come back, exclude_ids misses them). Two spellings
    of one id are one user/item, their rows merged like duplicates, the spellings counted."""
    inter = _write(
        tmp_path / "i.tsv",
        [f"{NFD_CAFE}\t{NFD_CAFE}\t1", f"{NFC_CAFE}\t{NFC_CAFE}\t2", f"u2\t{NFD_CAFE}\t1"],
    )
    fr = _write(tmp_path / "f.tsv", [f"u2\t{NFD_CAFE}"])
    names = _write(tmp_path / "n.tsv", [f"{NFD_CAFE}\tLe Caf\u00e9"])
    ds = load_tsv(inter, fr, names)
    assert ds.user_ids.tolist() == [NFC_CAFE, "u2"]
    assert ds.item_ids.tolist() == [NFC_CAFE]
    assert _pairs(ds) == {(NFC_CAFE, NFC_CAFE): 3.0, ("u2", NFC_CAFE): 1.0}
    assert ds.report.merged_duplicate_interactions == 1
    assert ds.report.merged_id_spellings == 2  # one user and one item written two ways
    assert _friend_set(ds) == {frozenset((NFC_CAFE, "u2"))}
    assert ds.item_names is not None and ds.item_names.tolist() == ["Le Caf\u00e9"]
    assert any("spellings merged" in line for line in ds.report.lines())


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ("u\u200b1", "U+200B"),  # zero-width space
        ("\U0001f469\u200d\U0001f680", "U+200D"),  # emoji ZWJ sequence
        ("u\x0b1", "U+000B"),
        ("u1\x00", "U+0000"),  # numpy would strip it: a KeyError before
        ("u\ufeff1", "U+FEFF"),  # a byte order mark inside a line
        ("a\u2028b", "U+2028"),
        ("x" * 300, "longer than 256"),
    ],
)
@pytest.mark.parametrize("where", ["user", "item", "friend", "names"])
def test_ids_serving_refuses_are_refused_with_file_line_field(
    tmp_path: Path, bad: str, fragment: str, where: str
) -> None:
    rows = ["u1\ti1\t1", "u2\ti1\t1"]
    friends = ["u1\tu2"]
    names = ["i1\tOne"]
    if where == "user":
        rows.append(f"{bad}\ti1\t1")
        path, field = tmp_path / "i.tsv", "user"
    elif where == "item":
        rows.append(f"u1\t{bad}\t1")
        path, field = tmp_path / "i.tsv", "item"
    elif where == "friend":
        friends += ["u1\tu2", f"u1\t{bad}"]
        path, field = tmp_path / "f.tsv", "friend"
    else:
        names += ["i2\tTwo", f"{bad}\tBad"]
        path, field = tmp_path / "n.tsv", "item"
    inter = _write(tmp_path / "i.tsv", rows)
    fr = _write(tmp_path / "f.tsv", friends)
    nm = _write(tmp_path / "n.tsv", names)
    with pytest.raises(DataError, match=_raises_at(path, 3, f"field '{field}'", fragment)) as exc:
        load_tsv(inter, fr, nm)
    # The value is quoted, cut short: a huge id is not echoed back whole.
    assert repr(bad[:40]) in str(exc.value) and len(str(exc.value)) < len(str(path)) + 200


def test_a_50k_character_id_is_refused_cheaply(tmp_path: Path) -> None:
    """One huge id used to make every id array that wide (80 MB for 2,000 users)."""
    p = _write(tmp_path / "i.tsv", ["u1\ti1\t1", "y" * 50_000 + "\ti1\t1"])
    with pytest.raises(DataError, match=_raises_at(p, 2, "'user'", "longer than 256")) as exc:
        load_tsv(p)
    assert len(str(exc.value)) < 300


@pytest.mark.parametrize("header", [True, False])
def test_a_byte_order_mark_is_dropped(tmp_path: Path, header: bool) -> None:
    lines = (["user\titem\tweight"] if header else []) + ["u0\ti0\t1", "u1\ti0\t2", "u0\ti1\t1"]
    inter = tmp_path / "i.tsv"
    inter.write_bytes(b"\xef\xbb\xbf" + "".join(x + "\n" for x in lines).encode())
    fr = tmp_path / "f.tsv"
    fr.write_bytes("\ufeffu0\tu1\n".encode())
    ds = load_tsv(inter, fr)
    assert ds.user_ids.tolist() == ["u0", "u1"]
    assert ds.report.rows_read == 3 + 1
    assert _friend_set(ds) == {frozenset(("u0", "u1"))}


def test_a_file_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "i.tsv"
    p.write_bytes("u1\ti1\t1\nu2\ti1\t1\nZo\u00eb\ti1\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match=_raises_at(p, 3, "not UTF-8", "0xeb")) as exc:
        load_tsv(p)
    assert exc.value.line == 3 and "position" not in str(exc.value)


# Timestamps are milliseconds since the epoch, as everywhere else (publish, live events).
T = 1_600_000_000_000


def test_a_missing_timestamp_in_a_file_with_timestamps_is_an_error(tmp_path: Path) -> None:
    p = _write(tmp_path / "i.tsv", [f"u1\ti1\t1\t{T}", "u2\ti1\t1", f"u3\ti1\t1\t{T}"])
    with pytest.raises(DataError, match=_raises_at(p, 2, "'timestamp'", "missing", "line 1")):
        load_tsv(p)
    # The header names a timestamp column: every row needs one.
    q = _write(tmp_path / "j.tsv", ["user\titem\tweight\ttimestamp", "u1\ti1\t1", "u2\ti1\t1"])
    with pytest.raises(DataError, match=_raises_at(q, 2, "'timestamp'", "missing", "header")):
        load_tsv(q)


@pytest.mark.parametrize(
    "bad", ["-5", "1600000000000.75", "inf", "-inf", "nan", "1e30", "9223372036854775808"]
)
def test_bad_timestamps_name_file_line_field_value(tmp_path: Path, bad: str) -> None:
    p = _write(tmp_path / "i.tsv", [f"u1\ti1\t1\t{T}", f"u2\ti1\t1\t{T}", f"u3\ti1\t1\t{bad}"])
    with pytest.raises(DataError, match=_raises_at(p, 3, "'timestamp'", repr(bad))):
        load_tsv(p)


def test_timestamps_are_parsed_exactly(tmp_path: Path) -> None:
    """Integers, not float64: a 19-digit value keeps its last digits; a whole decimal is fine."""
    rows = ["a\tx\t1\t1600000000123456789", "a\ty\t1\t1.6e12", "b\tx\t1\t1600000000001.0"]
    ds = load_tsv(_write(tmp_path / "i.tsv", rows))
    assert ds.inter_ts is not None
    got = dict(zip(_pairs(ds), ds.inter_ts.tolist(), strict=True))
    assert got == {("a", "x"): 1600000000123456789, ("a", "y"): T, ("b", "x"): T + 1}


def test_an_empty_timestamp_field_is_an_unknown_time_and_counted(tmp_path: Path) -> None:
    """What retraining writes for rows of a dataset without times (events.write_tsv)."""
    p = _write(tmp_path / "i.tsv", ["user\titem\tweight\tts", f"a\tx\t1\t{T}", "a\ty\t1\t"])
    ds = load_tsv(p)
    assert ds.inter_ts is not None and ds.inter_ts.tolist() == [T, -1]
    assert ds.report.rows_without_timestamp == 1


def test_timestamps_that_look_like_seconds_warn_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secs = [f"u{k}\ti{k}\t1\t{1_600_000_000 + k}" for k in range(5)]
    ds = load_tsv(_write(tmp_path / "s.tsv", secs))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "look like seconds" in err and "s.tsv" in err
    assert any("look like seconds" in n for n in ds.report.notes)
    assert ds.inter_ts is not None and ds.inter_ts.tolist()[0] == 1_600_000_000  # not changed
    load_tsv(_write(tmp_path / "ms.tsv", [f"u1\ti1\t1\t{T}", "u2\ti1\t1\t5"]))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad", ["1e39", "1600000000000", "1000000000.5", "1.7e308"])
def test_weights_above_the_servers_cap_are_refused(tmp_path: Path, bad: str) -> None:
    """float32 storage made 1e39 inf; the server caps one user's weight for an item at 1e9."""
    p = _write(tmp_path / "i.tsv", ["u1\ti1\t1", "u2\ti1\t1", f"u3\ti1\t{bad}"])
    with pytest.raises(DataError, match=_raises_at(p, 3, "'weight'", "1e+09", repr(bad))):
        load_tsv(p)


def test_weights_up_to_the_cap_load_and_tiny_ones_count_as_zero(tmp_path: Path) -> None:
    p = _write(tmp_path / "i.tsv", ["u1\ti1\t1000000000", "u1\ti2\t1e-50", "u2\ti1\t1"])
    ds = load_tsv(p)
    assert _pairs(ds) == {("u1", "i1"): 1e9, ("u2", "i1"): 1.0}
    assert ds.report.skipped_zero_weight_interactions == 1  # 1e-50 is 0 as a float32
    assert np.all(ds.inter_weight > 0) and np.all(np.isfinite(ds.inter_weight))


@pytest.mark.parametrize("first", ["u1\ti5\tthree", "u1\ti5\tthree\t1600000000000", "u\ti\tw"])
def test_a_first_row_with_a_bad_weight_is_an_error_not_a_header(tmp_path: Path, first: str) -> None:
    p = _write(tmp_path / "i.tsv", [first, "u2\ti1\t1", "u3\ti1\t2"])
    with pytest.raises(DataError, match=_raises_at(p, 1, "'weight'", "not read as a header")):
        load_tsv(p)


@pytest.mark.parametrize(
    "header",
    [
        "user\titem\tweight",
        "userId\tmovieId\trating\ttimestamp",
        "user_id\ttrack_id\tplay_count",
        "USER\tITEM\tCOUNT\tTS",
    ],
)
def test_interaction_headers_are_detected(tmp_path: Path, header: str) -> None:
    ts = "\t5" if header.count("\t") == 3 else ""
    ds = load_tsv(_write(tmp_path / "i.tsv", [header, f"u1\ti1\t2{ts}"]))
    assert _pairs(ds) == {("u1", "i1"): 2.0}
    assert any("line 1 read as a header" in n for n in ds.report.notes)


@pytest.mark.parametrize(
    "header",
    [
        "src\tdst",
        "SRC\tDST",
        "source\ttarget",
        "user_a\tuser_b",
        "follower\tfollowee",
        "from\tto",
        "user_id\tfriend_id",
    ],
)
def test_common_friend_headers_do_not_become_users(tmp_path: Path, header: str) -> None:
    inter = _write(tmp_path / "i.tsv", ["a\tx\t1", "b\tx\t1"])
    fr = _write(tmp_path / "f.tsv", [header, "a\tb"])
    ds = load_tsv(inter, fr)
    assert ds.user_ids.tolist() == ["a", "b"]
    assert _friend_set(ds) == {frozenset(("a", "b"))}
    assert ds.report.friends_only_users == 0
    assert any("f.tsv: line 1 read as a header" in n for n in ds.report.notes)


@pytest.mark.parametrize("header", ["movieId\ttitle", "item_id\tname", "ItemID\tName\tURL"])
def test_common_item_name_headers_do_not_become_items(tmp_path: Path, header: str) -> None:
    inter = _write(tmp_path / "i.tsv", ["a\ti1\t1"])
    names = _write(tmp_path / "n.tsv", [header, "i1\tOne"])
    ds = load_tsv(inter, item_names=names)
    assert ds.item_ids.tolist() == ["i1"]
    assert ds.item_names is not None and ds.item_names.tolist() == ["One"]


def test_a_friends_first_row_with_one_real_id_is_data(tmp_path: Path) -> None:
    """Only a line of column names is a header: a user named "user" next to a real id is data."""
    inter = _write(tmp_path / "i.tsv", ["user\ti1\t1", "u1\ti1\t1"])
    fr = _write(tmp_path / "f.tsv", ["user\tu1", "u2\tu3"])
    ds = load_tsv(inter, fr)
    assert _friend_set(ds) == {frozenset(("user", "u1")), frozenset(("u2", "u3"))}


def test_an_item_name_keeps_everything_after_the_first_tab(tmp_path: Path) -> None:
    inter = _write(tmp_path / "i.tsv", ["a\ti1\t1", "a\ti2\t1"])
    names = _write(tmp_path / "n.tsv", ["i1\tA\tB side", "i2\tPlain"])
    ds = load_tsv(inter, item_names=names)
    assert ds.item_names is not None and ds.item_names.tolist() == ["A\tB side", "Plain"]


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
