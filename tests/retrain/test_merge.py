"""merge_events on literal data, the TSV round trip, and the mapped served evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from socialrec.training.data import load_dataset
from socialrec.training.dataset import Dataset
from socialrec.training.events import MergeStats, merge_events, stream_key, write_tsv


def _base() -> Dataset:
    # users a, b, c; items x, y; a-x 1.0, b-y 2.0; friends a-b, b-c
    return Dataset(
        name="lit",
        user_ids=np.array(["a", "b", "c"]),
        item_ids=np.array(["x", "y"]),
        inter_user=np.array([0, 1], np.int32),
        inter_item=np.array([0, 1], np.int32),
        inter_weight=np.array([1.0, 2.0], np.float32),
        friends=np.array([[0, 1], [1, 2]], np.int32),
    )


def _triples(ds: Dataset) -> dict[tuple[str, str], float]:
    return {
        (ds.user_ids[u], ds.item_ids[i]): float(w)
        for u, i, w in zip(ds.inter_user, ds.inter_item, ds.inter_weight, strict=True)
    }


def _pairs(ds: Dataset) -> set[frozenset[str]]:
    return {frozenset((ds.user_ids[a], ds.user_ids[b])) for a, b in ds.friends}


def _nonzero(stats: MergeStats) -> dict:
    return {k: v for k, v in stats.as_dict().items() if v}


EVENTS = [
    ("1-0", {"type": "interaction", "user": "a", "item": "x", "weight": "0.5", "ts": "10"}),
    ("2-0", {"type": "interaction", "user": "new", "item": "z", "weight": "3", "ts": "20"}),
    ("3-0", {"type": "friend_add", "user": "new", "friend": "c", "ts": "30", "changed": "1"}),
    ("4-0", {"type": "friend_remove", "user": "b", "friend": "a", "ts": "40", "changed": "1"}),
    ("5-0", {"type": "friend_add", "user": "a", "friend": "b", "ts": "50", "changed": "1"}),
    ("6-0", {"type": "friend_remove", "user": "c", "friend": "b", "ts": "60", "changed": "1"}),
    ("7-0", {"type": "friend_add", "user": "d", "friend": "d", "ts": "70", "changed": "0"}),
    ("8-0", {"type": "interaction", "user": "b", "item": "y", "weight": "-1", "ts": "80"}),
    ("9-0", {"type": "mystery"}),
]


def test_merge_on_literal_data() -> None:
    base = _base()
    merged, stats = merge_events(base, EVENTS)
    # new ids are appended after the existing ones, old indices unchanged
    assert merged.user_ids.tolist() == ["a", "b", "c", "new"]
    assert merged.item_ids.tolist() == ["x", "y", "z"]
    assert _triples(merged) == {("a", "x"): 1.5, ("b", "y"): 2.0, ("new", "z"): 3.0}
    # stream order: a-b removed then added back; b-c removed; new-c added; d-d skipped
    assert _pairs(merged) == {frozenset("ab"), frozenset(("new", "c"))}
    assert (merged.friends[:, 0] < merged.friends[:, 1]).all()
    assert _nonzero(stats) == {
        "interactions": 2,
        "friend_adds": 2,
        "friend_removes": 2,
        "new_users": 1,
        "new_items": 1,
        "skipped": 3,  # self-friendship, negative weight, unknown type: counted, not silent
        "unknown_types": {"mystery": 1},
        "skip_reasons": {
            "self-friendship": 1,
            "weight not a positive number": 1,
            "unknown event type 'mystery'": 1,
        },
    }
    assert any("skipped (self-friendship): 1" in n for n in merged.report.notes)
    assert merged.inter_ts is not None and merged.inter_ts.tolist() == [10, -1, 20]
    # pure: the input is untouched
    assert _triples(base) == {("a", "x"): 1.0, ("b", "y"): 2.0} and len(base.friends) == 2


def test_merge_is_order_sensitive_for_friendships() -> None:
    add = ("1-0", {"type": "friend_add", "user": "a", "friend": "c", "ts": "1"})
    rm = ("2-0", {"type": "friend_remove", "user": "c", "friend": "a", "ts": "2"})
    assert frozenset("ac") in _pairs(merge_events(_base(), [rm, add])[0])
    assert frozenset("ac") not in _pairs(merge_events(_base(), [add, rm])[0])


def test_stream_key_orders_numerically() -> None:
    assert sorted(["10-0", "9-1", "9-0"], key=stream_key) == ["9-0", "9-1", "10-0"]


def test_tsv_round_trip_keeps_every_row(tmp_path: Path) -> None:
    merged, _ = merge_events(_base(), EVENTS)
    back = load_dataset(write_tsv(merged, tmp_path / "data"))
    assert _triples(back) == _triples(merged)
    assert _pairs(back) == _pairs(merged)
    assert set(back.user_ids.tolist()) == set(merged.user_ids.tolist())


def test_mapped_served_eval_equals_served_eval_on_own_split(base_run: Path) -> None:
    """On the bundle's own dataset the id mapping is the identity: same numbers exactly."""
    from socialrec.compression.served_eval import served_evaluate
    from socialrec.training.run import load_run

    ds, split, _ = load_run(base_run)
    ref = served_evaluate(base_run / "bundle", split)
    got = served_evaluate(base_run / "bundle", split, user_ids=ds.user_ids, item_ids=ds.item_ids)
    for task in ("content", "friends"):
        for key, v in ref[task].items():
            assert abs(got[task][key] - v) < 1e-9, (task, key)  # same ranking, float sums


# --------------------------------------------------------------------------- feed controls


def _ev(n: int, kind: str, **fields: str) -> tuple[str, dict[str, str]]:
    return f"{n}-0", {"type": kind, "ts": str(n), **fields}


def test_dismiss_item_drops_the_pair_until_a_later_interaction() -> None:
    events = [
        _ev(1, "interaction", user="a", item="y", weight="2"),
        _ev(2, "dismiss_item", user="a", target="y", changed="1"),
        _ev(3, "dismiss_item", user="b", target="y", changed="1"),  # a base row
        _ev(4, "dismiss_item", user="c", target="x", changed="1"),  # nothing to drop
        _ev(5, "dismiss_item", user="c", target="nowhere", changed="1"),  # unknown item
    ]
    merged, stats = merge_events(_base(), events)
    assert _triples(merged) == {("a", "x"): 1.0}
    assert merged.item_ids.tolist() == ["x", "y"]  # a dismissal never adds an id
    assert stats.dismissed_items == 4 and stats.interactions_dropped_by_dismissals == 2
    # stream order: an interaction after the dismissal is new evidence and counts again
    again = [*events, _ev(6, "interaction", user="a", item="y", weight="0.5")]
    assert _triples(merge_events(_base(), again)[0])[("a", "y")] == 0.5


def test_dismiss_user_drops_the_friend_pair() -> None:
    merged, stats = merge_events(_base(), [_ev(1, "dismiss_user", user="c", target="b")])
    assert _pairs(merged) == {frozenset("ab")}
    assert stats.dismissed_users == 1 and stats.friend_pairs_dropped_by_dismissals == 1
    merged, stats = merge_events(_base(), [_ev(1, "dismiss_user", user="a", target="c")])
    assert _pairs(merged) == {frozenset("ab"), frozenset("bc")}  # not friends: nothing to drop
    assert stats.friend_pairs_dropped_by_dismissals == 0


def test_block_keeps_the_pair_out_of_friends_while_it_holds() -> None:
    # The server logs friend_remove then block; a base pair it never held comes without one,
    # and a friend_add while the block holds (refused by the server) only comes from elsewhere.
    events = [
        _ev(1, "friend_remove", user="a", friend="b", changed="1"),
        _ev(2, "block", user="a", blocked="b", changed="1"),
        _ev(3, "block", user="c", blocked="b", changed="1"),  # base pair, no friend_remove
        _ev(4, "friend_add", user="b", friend="a", changed="1"),
    ]
    merged, stats = merge_events(_base(), events)
    assert _pairs(merged) == set()
    assert stats.blocks == 2 and stats.friend_pairs_dropped_by_blocks == 1
    assert stats.friend_adds == 0 and stats.skipped == 1  # the add refused, counted
    # an unblock restores nothing; a friendship added after it counts
    unblocked = [*events, _ev(5, "unblock", user="a", blocked="b", changed="1")]
    assert _pairs(merge_events(_base(), unblocked)[0]) == set()
    unblocked.append(_ev(6, "friend_add", user="a", friend="b", changed="1"))
    assert _pairs(merge_events(_base(), unblocked)[0]) == {frozenset("ab")}
    # a block holds both ways: b blocking a refuses a's add of b
    rev = [_ev(1, "block", user="b", blocked="a"), _ev(2, "friend_add", user="a", friend="b")]
    assert frozenset("ab") not in _pairs(merge_events(_base(), rev)[0])


def test_takedown_leaves_the_catalogue_until_restored(tmp_path: Path) -> None:
    base = _base()
    base.item_names = np.array(["X", "Y"])
    events = [
        _ev(1, "interaction", user="a", item="y", weight="1"),
        _ev(2, "item_remove", item="y", changed="1"),
        _ev(3, "interaction", user="c", item="y", weight="1"),  # while down: dropped too
        _ev(4, "item_remove", item="never-seen", changed="1"),
        _ev(5, "interaction", user="c", item="z", weight="4"),
    ]
    merged, stats = merge_events(base, events)
    assert merged.item_ids.tolist() == ["x", "z"] and merged.item_names.tolist() == ["X", ""]
    assert _triples(merged) == {("a", "x"): 1.0, ("c", "z"): 4.0}
    assert stats.removed_item_ids == ("never-seen", "y") and stats.removed_items == 2
    assert stats.interactions_dropped_by_takedowns == 3  # b-y (base), a-y, c-y
    assert stats.new_items == 1 and stats.item_removes == 2
    back = load_dataset(write_tsv(merged, tmp_path / "down"))  # names file: y must not return
    assert "y" not in back.item_ids.tolist() and _triples(back) == _triples(merged)
    # the latest remove/restore decides; a restore brings back every interaction
    restored, stats = merge_events(base, [*events, _ev(6, "item_restore", item="y")])
    assert _triples(restored)[("b", "y")] == 2.0 and _triples(restored)[("c", "y")] == 1.0
    assert _triples(restored)[("a", "y")] == 1.0 and "y" in restored.item_ids.tolist()
    assert (
        stats.removed_item_ids == ("never-seen",) and stats.interactions_dropped_by_takedowns == 0
    )
    again = [*events, _ev(6, "item_restore", item="y"), _ev(7, "item_remove", item="y")]
    assert "y" not in merge_events(base, again)[0].item_ids.tolist()


def test_unknown_and_malformed_events_are_counted_not_fatal() -> None:
    events = [
        _ev(1, "reaction", user="a", item="x"),
        _ev(2, "reaction", user="b", item="y"),
        ("3-0", {"user": "a"}),  # no type at all
        _ev(4, "interaction", user="a", item="x", weight="1", ts="1e400"),  # int(inf) overflows
        _ev(5, "interaction", user="a", item="x", weight="inf"),
        _ev(6, "item_remove", item=""),
        _ev(7, "block", user="a", blocked="a"),
        _ev(8, "dismiss_user", user="a", target=""),
    ]
    merged, stats = merge_events(_base(), events)
    assert stats.unknown_types == {"reaction": 2, "None": 1}
    assert stats.skipped == len(events) and _triples(merged) == _triples(_base())
    assert any("unknown event type 'reaction'): 2" in n for n in merged.report.notes)


def test_float64_merge_clamps_to_the_servers_cap_and_reloads(tmp_path: Path) -> None:
    from socialrec.serving.schema import MAX_TOTAL_WEIGHT as SERVER_CAP
    from socialrec.training.events import MAX_TOTAL_WEIGHT, MIN_WEIGHT

    assert MAX_TOTAL_WEIGHT == SERVER_CAP
    events = [
        _ev(1, "interaction", user="a", item="big", weight="3.4e38"),
        _ev(2, "interaction", user="a", item="big", weight="3.4e38"),  # float32 sum: inf
        _ev(3, "interaction", user="b", item="huge", weight="1.7e308"),
        _ev(4, "interaction", user="b", item="huge", weight="1.7e308"),  # float64 sum: inf
        _ev(5, "interaction", user="c", item="tiny", weight="1e-50"),  # float32: 0
    ]
    merged, stats = merge_events(_base(), events)
    w = _triples(merged)
    assert w[("a", "big")] == w[("b", "huge")] == 1e9 and np.isfinite(merged.inter_weight).all()
    assert w[("c", "tiny")] == np.float32(MIN_WEIGHT) > 0
    assert stats.clamped_weights == 3 and stats.interactions == 5
    back = load_dataset(write_tsv(merged, tmp_path / "data"))
    assert _triples(back) == w
