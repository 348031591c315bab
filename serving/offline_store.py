"""Offline operations on the feature store: bulk load, flush, and reading the event stream.

Blocking redis-py calls (its cluster client when ``StoreConfig.cluster``), for the pipeline
(``publish``, ``retrain``), tools and tests; the request path lives in
:mod:`socialrec.serving.store`. Same key layout and scripts (:mod:`socialrec.serving.schema`).

The event stream has one shard per user shard plus the takedown shard (``Keys.shards``). A
reader keeps a **cursor**, the last stream id it consumed in each shard ({shard: stream id},
shards it lacks start at the beginning), and moves it with :func:`advance` over the entries
it has durably consumed; every entry of every shard is then read exactly once, whatever order
writes to different shards arrived in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import redis
from socialrec.serving import schema
from socialrec.serving.schema import check_id, check_ts, fmt_weight
from socialrec.serving.store import StoreConfig, StoreUnavailable, redis_py

Event = tuple[str, dict[str, str]]  # (event id "<stream id>@<shard>", fields)
Cursor = dict[str, str]  # shard (as a string) -> the last stream id consumed in it


def _stream_order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def advance(cursor: Mapping[str, str], rows: Iterable[Event]) -> Cursor:
    """``cursor`` moved past ``rows`` (entries :meth:`OfflineStore.events` returned)."""
    out = dict(cursor)
    for eid, _ in rows:
        sid, shard = schema.split_event_id(eid)
        if _stream_order(sid) > _stream_order(out.get(shard, "0-0")):
            out[shard] = sid
    return out


def _progress(it: Iterable, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="row", total=len(it) if hasattr(it, "__len__") else None)


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


class OfflineStore:
    """Bulk writes, scans and stream reads of one namespace (thread-safe, redis-py pool)."""

    def __init__(self, cfg: StoreConfig) -> None:
        self.cfg = cfg
        self.keys = schema.Keys(cfg.namespace)
        try:  # a cluster client connects here: an unreachable seed or a bad password
            self._r = redis_py(cfg)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as e:
            raise StoreUnavailable(f"redis: {e}") from e

    def events(self, after: str | Mapping[str, str] = "0-0", count: int = 1000) -> list[Event]:
        """Up to ``count`` entries *of each shard* with stream ids strictly after the cursor,
        in event order (:func:`schema.event_order`: time, then shard).

        ``after``: a cursor ({shard: stream id}; shards it lacks start at the beginning), or
        one stream id for every shard (e.g. "0-0": everything; "<ms>-0": what came after a
        time). One pipelined XRANGE per shard (in a cluster, one batch per node). Each shard's
        entries are the first ones after its cursor, so :func:`advance` over them skips none.
        """
        shards = self.keys.shards

        def read() -> list:
            pipe = self._r.pipeline(transaction=False)
            for sh in shards:
                start = after if isinstance(after, str) else after.get(str(sh), "0-0")
                pipe.xrange(self.keys.stream(sh), min=f"({start}", count=count)
            return pipe.execute()

        try:
            try:
                replies = read()
            except redis.exceptions.ConnectionError:  # once more: a cluster client has
                replies = read()  # refreshed its layout after a failed node meanwhile
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as e:
            raise StoreUnavailable(f"redis: {e}") from e
        rows = [
            (schema.event_id(sid, sh), dict(fields))
            for sh, reply in zip(shards, replies, strict=True)
            for sid, fields in reply
        ]
        rows.sort(key=lambda r: schema.event_order(r[0]))
        return rows

    def bulk_load(
        self,
        history_rows: Iterable[tuple[str, str, float, int]],
        friend_pairs: Iterable[tuple[str, str]],
        batch: int = 5000,
        progress: bool = True,
    ) -> dict[str, int]:
        """Load (user, item, weight, ts) rows and friend pairs with pipelined writes; no events.

        Training data is not a new event, so nothing goes to the stream. A row *sets* the
        item's weight (rows are one per (user, item), as a Dataset holds them), so loading the
        same data twice gives the same store. The history cap applies as for live writes.
        Not transactional: a reader may see a half-loaded store while this runs.
        """
        cap, k = self.cfg.history_cap, self.keys
        counts = {
            "interactions": 0,
            "history_users": 0,
            "history_dropped": 0,
            "friend_pairs": 0,
            "friend_pairs_new": 0,
            "friend_users": 0,
        }
        users: set[str] = set()
        try:
            # On every primary of a cluster. A failover during the load (a promoted replica
            # lacks the script) fails it: run it again, it is idempotent.
            sha = self._r.script_load(schema.UPSERT)
            sha = sha if isinstance(sha, str) else next(iter(sha.values()))
            pipe = self._r.pipeline(transaction=False)
            n = 0
            for user, item, weight, ts in _progress(history_rows, "history", progress):
                user, item = check_id("user", str(user)), check_id("item", str(item))
                keys = [k.user("h", user), k.user("w", user), k.user("s", user)]
                args = (item, fmt_weight(weight), check_ts(ts), cap)
                pipe.execute_command("EVALSHA", sha, 3, *keys, *args)  # (evalsha() is
                # refused on a cluster pipeline, the raw command is routed by its keys)
                users.add(user)
                n += 1
                if n % batch == 0:
                    counts["history_dropped"] += sum(pipe.execute())
            counts["history_dropped"] += sum(pipe.execute())
            counts["interactions"] = n
            counts["history_users"] = len(users)

            users.clear()
            n = 0
            for a, b in _progress(friend_pairs, "friends", progress):
                a, b = check_id("user", str(a)), check_id("friend", str(b))
                if a == b:
                    raise ValueError(f"friend pair {n}: self-friendship {a!r}")
                pipe.sadd(k.user("f", a), b)
                pipe.sadd(k.user("f", b), a)
                users.update((a, b))
                n += 1
                if n % batch == 0:
                    counts["friend_pairs_new"] += sum(pipe.execute()[0::2])
            counts["friend_pairs_new"] += sum(pipe.execute()[0::2])
            counts["friend_pairs"] = n
            counts["friend_users"] = len(users)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as e:
            raise StoreUnavailable(f"redis: {e}") from e
        return counts

    def flush(self, events: bool = False) -> int:
        """Delete this namespace's features (and the event stream's shards only if ``events``).

        SCAN + UNLINK, so other namespaces in the same database are untouched. Offline use:
        a live server reading meanwhile sees users disappear one by one.
        """
        pattern = _glob_escape(self.keys.prefix) + "*"
        streams = {self.keys.stream(sh) for sh in self.keys.shards}
        n = 0
        try:
            batch: list[str] = []
            for key in self._r.scan_iter(match=pattern, count=1000):  # every primary
                if key in streams and not events:
                    continue
                batch.append(key)
                if len(batch) >= 1000:
                    n += self._r.unlink(*batch)
                    batch = []
            if batch:
                n += self._r.unlink(*batch)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as e:
            raise StoreUnavailable(f"redis: {e}") from e
        return n

    def close(self) -> None:
        self._r.close()

    def __enter__(self) -> OfflineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
