"""The result cache's check of fresh items: a cached content answer survives a side-index
rebuild exactly when no fresh row that changed since could enter it (engine.still_exact),
and the build numbers behind it carry over between builds (FreshIndex.build)."""

from __future__ import annotations

import numpy as np
from socialrec.serving.engine import (
    REASON_FRESH,
    REASON_TASTE,
    FreshIndex,
    Result,
    Scored,
    still_exact,
)

DIM = 3
Q = np.array([[1.0, 0.0, 0.0]], np.float32)  # the query: a row scores its first component


def _row(score: float) -> np.ndarray:
    return np.array([score, 0.5, -0.5], np.float32)


def _build(rows: dict[str, float], ms: dict[str, int], previous: FreshIndex | None = None):
    return FreshIndex.build(
        {i: _row(s) for i, s in rows.items()}, DIM, ("v",), ms, dict.fromkeys(rows, 3),
        previous=previous,
    )  # fmt: skip


def _answer(scores: list[float], fresh_seq: int | None, ids: list[str] | None = None) -> Result:
    ids = ids or [f"i{j}" for j in range(len(scores))]
    items = [
        Scored(i, s, REASON_FRESH if i.startswith("f") else REASON_TASTE)
        for i, s in zip(ids, scores, strict=True)
    ]
    return Result(items, False, {}, query=Q, fresh_seq=fresh_seq)


def test_build_numbers_carry_over_for_unchanged_entries() -> None:
    first = _build({"fa": 0.1, "fb": 0.2}, {"fa": 1, "fb": 1})
    assert first.seq == 1 and first.changed.tolist() == [1, 1] and first.dropped_seq == 0
    second = _build({"fa": 0.1, "fb": 0.9, "fc": 0.3}, {"fa": 1, "fb": 2, "fc": 2}, first)
    assert second.seq == 2
    assert dict(zip(second.ids, second.changed.tolist(), strict=True)) == {
        "fa": 1, "fb": 2, "fc": 2,
    }  # fmt: skip
    assert second.dropped_seq == 0
    third = _build({"fb": 0.9, "fc": 0.3}, {"fb": 2, "fc": 2}, second)  # fa left
    assert third.dropped_seq == 3
    assert dict(zip(third.ids, third.changed.tolist(), strict=True)) == {"fb": 2, "fc": 2}


def test_an_answer_survives_rows_that_cannot_enter_it() -> None:
    first = _build({"fa": 0.1}, {"fa": 1})
    answer = _answer([3.0, 2.0, 1.0], fresh_seq=first.seq)
    assert still_exact(answer, 3, first)  # same build
    low = _build({"fa": 0.1, "fb": 0.5}, {"fa": 1, "fb": 2}, first)  # fb scores 0.5 < 1.0
    assert still_exact(answer, 3, low)


def test_an_answer_is_recomputed_when_a_changed_row_could_enter_it() -> None:
    first = _build({"fa": 0.1}, {"fa": 1})
    answer = _answer([3.0, 2.0, 1.0], fresh_seq=first.seq)
    high = _build({"fa": 0.1, "fb": 1.5}, {"fa": 1, "fb": 2}, first)  # fb beats the 3rd item
    assert not still_exact(answer, 3, high)
    tie = _build({"fa": 0.1, "fb": 1.0}, {"fa": 1, "fb": 2}, first)
    assert not still_exact(answer, 3, tie)
    assert not still_exact(
        _answer([3.0, 2.0], fresh_seq=first.seq),
        3,
        _build({"fa": 0.1, "fb": -5.0}, {"fa": 1, "fb": 2}, first),
    )  # short answer: anything enters


def test_a_fresh_item_in_the_answer_that_changed_or_left_forces_a_recompute() -> None:
    first = _build({"fa": 2.0}, {"fa": 1})
    answer = _answer([3.0, 2.0, 1.0], fresh_seq=first.seq, ids=["i0", "fa", "i2"])
    moved = _build({"fa": 0.2}, {"fa": 2}, first)  # its vector was refreshed: it fell
    assert not still_exact(answer, 3, moved)
    gone = _build({}, {}, first)
    assert not still_exact(answer, 3, gone)
    assert not still_exact(answer, 3, None)  # fresh items turned off: it must not stay


def test_cold_start_and_fresh_free_answers_do_not_depend_on_the_side_index() -> None:
    cold = Result([Scored("i0", 1.0, "popular")], True, {})
    assert still_exact(cold, 3, _build({"fa": 9.0}, {"fa": 1}))
    plain = _answer([3.0, 2.0, 1.0], fresh_seq=None)
    assert still_exact(plain, 3, None)
    assert not still_exact(plain, 3, _build({"fa": 9.0}, {"fa": 1}))
    assert still_exact(plain, 3, _build({"fa": -9.0}, {"fa": 1}))
