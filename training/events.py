"""App events (the Redis stream) applied to a Dataset, and the dataset written back out as TSV.

:func:`merge_events` is a pure function: base :class:`~training.dataset.Dataset` + events in
stream order -> a new Dataset. Interactions add weight to (user, item) (new users and items
get new indices after the existing ones); ``friend_add`` / ``friend_remove`` add or remove an
undirected pair, in stream order. Events that cannot be applied are skipped and counted in
the report's notes, never dropped silently.

:func:`write_tsv` materialises a Dataset as the ``tsv`` loader's files, so a retraining run is
an ordinary ``socialrec train`` run whose run.json points at its own data.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from socialrec.training.data import DataConfig
from socialrec.training.dataset import Dataset, LoadReport

Event = tuple[str, dict[str, str]]  # (stream id "ms-seq", fields)
EVENT_TYPES = ("interaction", "friend_add", "friend_remove")
_NAME_BREAKS = re.compile(r"[\t\r\n]")
_BAD_ID = re.compile(r"^\s|\s$|[\t\r\n]")  # ids the TSV round trip would change


def stream_key(event_id: str) -> tuple[int, int]:
    """Redis stream ids ("ms-seq") in stream order (string order is wrong: "9-0" > "10-0")."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class MergeStats:
    """What merge_events did with each event (counted, so nothing vanishes silently)."""

    interactions: int = 0
    friend_adds: int = 0
    friend_removes: int = 0
    new_users: int = 0
    new_items: int = 0
    skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def merge_events(ds: Dataset, events: Sequence[Event]) -> tuple[Dataset, MergeStats]:
    """Apply ``events`` (stream order) to ``ds``; returns the new Dataset and what was applied.

    Duplicate (user, item) weights add up and the latest timestamp wins, as in the loaders.
    A friend event whose two ids are equal, an interaction with a non-positive or non-numeric
    weight, an id the TSV files cannot carry, or an unknown type is skipped and counted.
    """
    users = ds.user_ids.tolist()
    items = ds.item_ids.tolist()
    uidx = {s: k for k, s in enumerate(users)}
    iidx = {s: k for k, s in enumerate(items)}
    has_ts = ds.inter_ts is not None
    ts0 = ds.inter_ts if ds.inter_ts is not None else np.full(ds.n_interactions, -1, np.int64)
    rows: dict[tuple[int, int], list[float]] = {
        (int(u), int(i)): [float(w), int(t)]
        for u, i, w, t in zip(ds.inter_user, ds.inter_item, ds.inter_weight, ts0, strict=True)
    }
    pairs: set[tuple[int, int]] = {(int(a), int(b)) for a, b in ds.friends}
    n = {"interactions": 0, "friend_adds": 0, "friend_removes": 0, "skipped": 0}
    reasons: dict[str, int] = {}

    def skip(why: str) -> None:
        n["skipped"] += 1
        reasons[why] = reasons.get(why, 0) + 1

    def index(table: dict[str, int], ids: list[str], s: str) -> int:
        k = table.get(s)
        if k is None:
            k = table[s] = len(ids)
            ids.append(s)
        return k

    for _, f in events:
        kind = f.get("type")
        if kind not in EVENT_TYPES:
            skip(f"unknown event type {kind!r}")
            continue
        a = f.get("user", "")
        b = f.get("item" if kind == "interaction" else "friend", "")
        if not a or not b or _BAD_ID.search(a) or _BAD_ID.search(b):
            skip("empty id or id with tab, line break or surrounding space")
            continue
        if kind == "interaction":
            try:
                w = float(f.get("weight", "nan"))
                ts = int(float(f.get("ts", "-1")))
            except ValueError:
                skip("non-numeric weight or ts")
                continue
            if not np.isfinite(w) or w <= 0:
                skip("weight not a positive number")
                continue
            key = (index(uidx, users, a), index(iidx, items, b))
            prev = rows.get(key)
            if prev is None:
                rows[key] = [w, ts]
            else:
                prev[0] += w
                prev[1] = max(prev[1], ts)
            has_ts = has_ts or ts >= 0
            n["interactions"] += 1
            continue
        if a == b:
            skip("self-friendship")
            continue
        ua, ub = index(uidx, users, a), index(uidx, users, b)
        pair = (min(ua, ub), max(ua, ub))
        if kind == "friend_add":
            pairs.add(pair)
            n["friend_adds"] += 1
        else:
            pairs.discard(pair)
            n["friend_removes"] += 1

    keys = np.array(sorted(rows), dtype=np.int64).reshape(-1, 2)
    vals = np.array([rows[(int(u), int(i))] for u, i in keys], dtype=np.float64).reshape(-1, 2)
    fr = np.array(sorted(pairs), dtype=np.int32).reshape(-1, 2)
    names = None
    if ds.item_names is not None:
        names = np.array(ds.item_names.tolist() + [""] * (len(items) - ds.n_items), dtype=str)
    stats = MergeStats(new_users=len(users) - ds.n_users, new_items=len(items) - ds.n_items, **n)
    report = LoadReport(**{k: v for k, v in ds.report.as_dict().items() if k != "notes"})
    report.notes = list(ds.report.notes) + [
        f"events applied: {stats.as_dict()}",
        *(f"events skipped ({why}): {c}" for why, c in reasons.items()),
    ]
    merged = Dataset(
        name=ds.name,
        user_ids=np.array(users, dtype=str),
        item_ids=np.array(items, dtype=str),
        inter_user=keys[:, 0].astype(np.int32),
        inter_item=keys[:, 1].astype(np.int32),
        inter_weight=vals[:, 0].astype(np.float32),
        inter_ts=vals[:, 1].astype(np.int64) if has_ts else None,
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
