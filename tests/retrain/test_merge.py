"""merge_events on literal data, the TSV round trip, and the mapped served evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from socialrec.training.data import load_dataset
from socialrec.training.dataset import Dataset
from socialrec.training.events import merge_events, stream_key, write_tsv


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
    assert stats.as_dict() == {
        "interactions": 2,
        "friend_adds": 2,
        "friend_removes": 2,
        "new_users": 1,
        "new_items": 1,
        "skipped": 3,  # self-friendship, negative weight, unknown type: counted, not silent
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
