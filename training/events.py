"""App events (the Redis stream) applied to a Dataset, and the dataset written back out as TSV.

:func:`merge_events` is a pure function: base :class:`~training.dataset.Dataset` + events in
stream order -> a new Dataset. What each event type does (:data:`EVENT_TYPES`):

- ``interaction``: adds weight to (user, item) (new users and items get new indices after the
  existing ones). Sums are float64 and each (user, item) sum is clamped to
  :data:`MAX_TOTAL_WEIGHT` (the server's cap) before the cast to the dataset's float32, so
  no sum is ever ``inf`` or ``0`` and the TSV written from it always reloads.
- ``friend_add`` / ``friend_remove``: add or remove an undirected pair, in stream order.
- ``dismiss_item``: the user's (user, item) positive is dropped at that point of the stream;
  a later interaction with the item counts again (see :func:`merge_events` for why dropping
  rather than negative feedback).
- ``dismiss_user``: the pair {user, target} is dropped from the friend positives if present.
- ``block`` / ``unblock``: a block drops the pair {user, blocked} (the server also logs the
  friendship's removal as a ``friend_remove``; a base pair Redis never held comes without
  one) and, as the server does, a ``friend_add`` of the pair is refused (skipped, counted)
  while either side's block holds, so a blocked pair is never a friend positive. An unblock
  restores nothing; a friendship added after it counts.
- ``item_remove`` / ``item_restore``: an item whose latest such event is a remove is taken
  down: it leaves the catalogue (no index, no name, so no vector, no popularity) and every
  interaction with it is dropped; a restore brings back all of them.

Events that cannot be applied (and types this version does not know) are skipped and counted
in :class:`MergeStats` and the report's notes, never dropped silently.

:func:`write_tsv` materialises a Dataset as the ``tsv`` loader's files, so a retraining run is
an ordinary ``socialrec train`` run whose run.json points at its own data.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from socialrec.training.data import DataConfig
from socialrec.training.dataset import Dataset, LoadReport

Event = tuple[str, dict[str, str]]  # (event id "ms-seq@shard", or "ms-seq" from v1; fields)
EVENT_TYPES = (
    "interaction",
    "friend_add",
    "friend_remove",
    "dismiss_item",
    "dismiss_user",
    "block",
    "unblock",
    "item_remove",
    "item_restore",
)
# A user's summed weight for one item is capped here, as the server caps it
# (socialrec.serving.schema.MAX_TOTAL_WEIGHT; a test checks they agree).
MAX_TOTAL_WEIGHT = 1e9
# The smallest weight kept: a positive sum below float32's smallest normal would cast to 0 (or
# a subnormal) and the loader drops zero-weight rows; clamped up instead, so the row survives.
MIN_WEIGHT = float(np.finfo(np.float32).tiny)
MAX_TS = 2**62  # timestamps (ms) beyond this can't be an event time: skipped and counted
_NAME_BREAKS = re.compile(r"[\t\r\n]")
_BAD_ID = re.compile(r"^\s|\s$|[\t\r\n]")  # ids the TSV round trip would change


def stream_key(event_id: str) -> tuple[int, int, str]:
    """Event ids in stream order: "<ms>-<seq>@<shard>" (the sharded stream of store layout v2;
    one shard's ids in its stream order, shards by time, then shard) or a plain stream id
    "<ms>-<seq>" (layout v1). Numeric, since string order is wrong: "9-0" > "10-0"."""
    sid, _, shard = event_id.partition("@")
    ms, _, seq = sid.partition("-")
    return int(ms), int(seq or 0), shard


@dataclass(frozen=True)
class MergeStats:
    """What merge_events did with each event (counted, so nothing vanishes silently).

    ``removed_item_ids`` (the taken-down items, sorted) is reported beside the counts, not in
    :meth:`as_dict`, which stays small however many items moderation has taken down.
    """

    interactions: int = 0
    friend_adds: int = 0
    friend_removes: int = 0
    dismissed_items: int = 0  # dismiss_item events applied
    dismissed_users: int = 0  # dismiss_user events applied
    blocks: int = 0
    unblocks: int = 0
    item_removes: int = 0
    item_restores: int = 0
    new_users: int = 0
    new_items: int = 0  # new items left in the catalogue (taken-down ones not counted)
    removed_items: int = 0  # items taken down at the end of the stream (left out)
    interactions_dropped_by_takedowns: int = 0  # (user, item) rows of taken-down items
    interactions_dropped_by_dismissals: int = 0  # (user, item) rows a dismiss_item dropped
    friend_pairs_dropped_by_dismissals: int = 0
    friend_pairs_dropped_by_blocks: int = 0
    clamped_weights: int = 0  # (user, item) sums clamped into [MIN_WEIGHT, MAX_TOTAL_WEIGHT]
    skipped: int = 0  # events not applied (unknown types included)
    skip_reasons: dict[str, int] = field(default_factory=dict)  # why -> events skipped
    unknown_types: dict[str, int] = field(default_factory=dict)  # type -> events skipped
    removed_item_ids: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, int | dict[str, int]]:
        return {k: v for k, v in self.__dict__.items() if k != "removed_item_ids"}


def _ts(value: str) -> int | None:
    """An event's ``ts`` as int ms (-1 when absent), or None when it is not a usable time."""
    try:
        ts = int(value) if value.lstrip("-").isdigit() else int(float(value))
    except (ValueError, OverflowError):  # "abc", "nan", "inf", "1e400"
        return None
    return ts if ts <= MAX_TS else None


def merge_events(ds: Dataset, events: Sequence[Event]) -> tuple[Dataset, MergeStats]:
    """Apply ``events`` (stream order) to ``ds``; returns the new Dataset and what was applied.

    Duplicate (user, item) weights add up (float64, clamped to MAX_TOTAL_WEIGHT) and the
    latest timestamp wins, as in the loaders. An event with an empty id, an id the TSV files
    cannot carry, two equal user ids, a non-positive or non-numeric weight or timestamp, or
    an unknown type is skipped and counted (unknown types also by name).

    Takedowns are state, not history: the catalogue leaves out the items whose *latest*
    remove/restore in ``events`` is a remove. They persist across retrains because retraining
    merges the base data with *every* event it ever consumed (``ROOT/events.jsonl``), not
    only the new ones: a takedown stays in that log, so every later merge applies it again,
    until a later restore in the same log undoes it; and the restore brings the item's
    interactions back, which a merged state that had dropped them could not. The same replay
    keeps friend removals, dismissals and blocks.

    Dismissals drop the positive rather than add negative feedback. A dataset row is a
    positive with a weight and the towers train on a softmax over the whole catalogue (or
    sampled negatives on large ones), so a dropped pair already counts as a negative for
    that user; weighting it as a *hard* negative would need a new data column and loss term
    (training/model.py, train.py), and no dataset carries dismissals to measure the two on
    the validation split. A later interaction with the item is new evidence and counts.
    """
    users = ds.user_ids.tolist()
    items = ds.item_ids.tolist()
    uidx = {s: k for k, s in enumerate(users)}
    iidx = {s: k for k, s in enumerate(items)}
    has_ts = ds.inter_ts is not None
    ts0 = ds.inter_ts if ds.inter_ts is not None else np.full(ds.n_interactions, -1, np.int64)
    # (user, item) -> [summed weight (float64), latest ts (int, -1: unknown)]
    rows: dict[tuple[int, int], list] = {
        (int(u), int(i)): [float(w), int(t)]
        for u, i, w, t in zip(ds.inter_user, ds.inter_item, ds.inter_weight, ts0, strict=True)
    }
    pairs: set[tuple[int, int]] = {(int(a), int(b)) for a, b in ds.friends}
    blocks: set[tuple[str, str]] = set()  # (user, blocked) held at this point of the stream
    takedown: dict[str, bool] = {}  # item -> is its latest remove/restore a remove
    n = dict.fromkeys(
        (
            "interactions", "friend_adds", "friend_removes", "dismissed_items",
            "dismissed_users", "blocks", "unblocks", "item_removes", "item_restores",
            "interactions_dropped_by_dismissals", "friend_pairs_dropped_by_dismissals",
            "friend_pairs_dropped_by_blocks", "skipped",
        ),
        0,
    )  # fmt: skip
    reasons: dict[str, int] = {}
    unknown: dict[str, int] = {}

    def skip(why: str) -> None:
        n["skipped"] += 1
        reasons[why] = reasons.get(why, 0) + 1

    def index(table: dict[str, int], ids: list[str], s: str) -> int:
        k = table.get(s)
        if k is None:
            k = table[s] = len(ids)
            ids.append(s)
        return k

    def known_pair(a: str, b: str) -> tuple[int, int] | None:
        """The pair {a, b} of users the data already has (None if either is unknown)."""
        ua, ub = uidx.get(a), uidx.get(b)
        return None if ua is None or ub is None else (min(ua, ub), max(ua, ub))

    def bad(*ids: str) -> bool:
        return any(not s or _BAD_ID.search(s) for s in ids)

    for _, f in events:
        kind = f.get("type")
        if kind not in EVENT_TYPES:
            name = str(kind)[:64]
            unknown[name] = unknown.get(name, 0) + 1
            skip(f"unknown event type {name!r}")
            continue
        if kind in ("item_remove", "item_restore"):
            item = f.get("item", "")
            if bad(item):
                skip("empty id or id with tab, line break or surrounding space")
                continue
            takedown[item] = kind == "item_remove"
            n["item_removes" if kind == "item_remove" else "item_restores"] += 1
            continue
        a = f.get("user", "")
        other = {"interaction": "item", "friend_add": "friend", "friend_remove": "friend"}
        b = f.get(other.get(kind, "target" if kind.startswith("dismiss") else "blocked"), "")
        if bad(a, b):
            skip("empty id or id with tab, line break or surrounding space")
            continue
        if kind == "interaction":
            try:
                w = float(f.get("weight", "nan"))
            except ValueError:
                skip("non-numeric weight or ts")
                continue
            ts = _ts(f.get("ts", "-1"))
            if ts is None:
                skip("non-numeric weight or ts")
                continue
            if not np.isfinite(w) or w <= 0:
                skip("weight not a positive number")
                continue
            key = (index(uidx, users, a), index(iidx, items, b))
            prev = rows.get(key)
            if prev is None:
                rows[key] = [w, ts]
            else:  # float64; even a sum that overflows to inf is clamped below
                prev[0] += w
                prev[1] = max(prev[1], ts)
            has_ts = has_ts or ts >= 0
            n["interactions"] += 1
            continue
        if kind == "dismiss_item":
            ua, ib = uidx.get(a), iidx.get(b)
            if ua is not None and ib is not None and rows.pop((ua, ib), None) is not None:
                n["interactions_dropped_by_dismissals"] += 1
            n["dismissed_items"] += 1
            continue
        if a == b:
            skip("self-friendship" if kind.startswith("friend") else f"{kind} of oneself")
            continue
        if kind == "friend_add" and ((a, b) in blocks or (b, a) in blocks):
            skip("friend_add while one user blocks the other (the server refuses it)")
            continue
        if kind in ("friend_add", "friend_remove"):
            ua, ub = index(uidx, users, a), index(uidx, users, b)
            pair = (min(ua, ub), max(ua, ub))
            if kind == "friend_add":
                pairs.add(pair)
                n["friend_adds"] += 1
            else:
                pairs.discard(pair)
                n["friend_removes"] += 1
            continue
        if kind == "unblock":
            blocks.discard((a, b))
            n["unblocks"] += 1
            continue
        pair = known_pair(a, b)  # dismiss_user or block
        if pair is not None and pair in pairs:
            pairs.discard(pair)
            n[f"friend_pairs_dropped_by_{'blocks' if kind == 'block' else 'dismissals'}"] += 1
        if kind == "block":
            blocks.add((a, b))
            n["blocks"] += 1
        else:
            n["dismissed_users"] += 1

    # Takedowns: the items leave the catalogue (indices after them shift down, order kept).
    removed = tuple(sorted(s for s, down in takedown.items() if down))
    gone = np.zeros(len(items), dtype=bool)
    gone[[iidx[s] for s in removed if s in iidx]] = True
    new_index = np.cumsum(~gone) - 1
    n_dropped = sum(1 for _, i in rows if gone[i])
    rows = {(u, int(new_index[i])): v for (u, i), v in rows.items() if not gone[i]}
    kept_items = [s for s, g in zip(items, gone.tolist(), strict=True) if not g]

    keys = np.array(sorted(rows), dtype=np.int64).reshape(-1, 2)
    weights = np.array([rows[(int(u), int(i))][0] for u, i in keys], dtype=np.float64)
    ts_col = np.array([rows[(int(u), int(i))][1] for u, i in keys], dtype=np.int64)
    clamped = np.clip(weights, MIN_WEIGHT, MAX_TOTAL_WEIGHT)  # then float32: finite, > 0
    n_clamped = int((clamped != weights).sum())
    fr = np.array(sorted(pairs), dtype=np.int32).reshape(-1, 2)
    names = None
    if ds.item_names is not None:
        all_names = ds.item_names.tolist() + [""] * (len(items) - ds.n_items)
        kept = [s for s, g in zip(all_names, gone.tolist(), strict=True) if not g]
        names = np.array(kept, dtype=str)
    stats = MergeStats(
        new_users=len(users) - ds.n_users,
        new_items=int((~gone[ds.n_items :]).sum()),
        removed_items=len(removed),
        interactions_dropped_by_takedowns=n_dropped,
        clamped_weights=n_clamped,
        skip_reasons=reasons,
        unknown_types=unknown,
        removed_item_ids=removed,
        **n,
    )
    report = LoadReport(**{k: v for k, v in ds.report.as_dict().items() if k != "notes"})
    applied = {k: v for k, v in stats.as_dict().items() if k != "skip_reasons"}
    report.notes = list(ds.report.notes) + [
        f"events applied: {applied}",
        *(f"events skipped ({why}): {c}" for why, c in reasons.items()),
    ]
    merged = Dataset(
        name=ds.name,
        user_ids=np.array(users, dtype=str),
        item_ids=np.array(kept_items, dtype=str),
        inter_user=keys[:, 0].astype(np.int32),
        inter_item=keys[:, 1].astype(np.int32),
        inter_weight=clamped.astype(np.float32),
        inter_ts=ts_col if has_ts else None,
        friends=fr,
        item_names=names,
        report=report,
    )
    return merged, stats


def write_tsv(ds: Dataset, out_dir: str | Path) -> DataConfig:
    """Write ``ds`` as the tsv loader's files (header lines included); returns their DataConfig.

    Weights are written with ``repr`` of the float32 value, which reads back bit-exactly.
    Users that only have friends appear in friends.tsv; a user with neither interactions nor
    friends (and an item with neither interactions nor a names file) carries no signal and does
    not survive the round trip. Index order may differ from ``ds``: the loader's is used.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    users, items = ds.user_ids.tolist(), ds.item_ids.tolist()
    for s in users + items:
        if not s or _BAD_ID.search(s):
            raise ValueError(f"id {s!r} cannot be written to a TSV file (tab, line break, space)")
    ts = ds.inter_ts
    with (out / "interactions.tsv").open("w", encoding="utf-8", newline="") as f:
        f.write("user\titem\tweight" + ("\tts" if ts is not None else "") + "\n")
        for r in range(ds.n_interactions):
            line = f"{users[ds.inter_user[r]]}\t{items[ds.inter_item[r]]}\t{float(ds.inter_weight[r])!r}"
            if ts is not None:
                line += "\t" + (str(int(ts[r])) if ts[r] >= 0 else "")
            f.write(line + "\n")
    with (out / "friends.tsv").open("w", encoding="utf-8", newline="") as f:
        f.write("user\tfriend\n")
        for a, b in ds.friends:
            f.write(f"{users[a]}\t{users[b]}\n")
    names = None
    if ds.item_names is not None:
        names = out / "item_names.tsv"
        with names.open("w", encoding="utf-8", newline="") as f:
            f.write("item\tname\n")
            for i, name in zip(items, ds.item_names.tolist(), strict=True):
                clean = _NAME_BREAKS.sub(" ", name)
                f.write(f"{i}\t{clean}\n")
    return DataConfig(
        dataset="tsv",
        interactions=str((out / "interactions.tsv").resolve()),
        friends=str((out / "friends.tsv").resolve()),
        item_names=str(names.resolve()) if names else None,
    )
