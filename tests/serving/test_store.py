"""The Redis feature store against a real redis-server: contents, atomic writes, one round trip
per read, the event stream, bulk loading and behaviour when Redis dies or hangs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis
from socialrec.serving.offline_store import OfflineStore
from socialrec.serving.redis_local import RedisNotInstalled, start_redis
from socialrec.serving.schema import UserFeatures
from socialrec.serving.store import FeatureStore, StoreConfig, StoreUnavailable

PATHS = ["blocking", "async-resp", "async-redis-py"]


class Calls:
    """One of the store's request paths behind the blocking call names: the blocking redis-py
    methods, or the server's async methods over either async client (on one event loop)."""

    def __init__(self, cfg: StoreConfig, path: str) -> None:
        client = "redis-py" if path == "async-redis-py" else "resp"
        self.store = FeatureStore(replace(cfg, client=client))
        self.offline = OfflineStore(cfg)
        self.keys = self.store.keys
        self._loop = None if path == "blocking" else asyncio.new_event_loop()

    def _run(self, name: str, *args, **kw):
        if self._loop is None:
            return getattr(self.store, name)(*args, **kw)
        return self._loop.run_until_complete(getattr(self.store, "a" + name)(*args, **kw))

    def read(self, user: str, with_fof: bool = False) -> UserFeatures:
        return self._run("read", user, with_fof=with_fof)

    def log_interaction(self, *args) -> str:
        return self._run("log_interaction", *args)

    def add_friendship(self, *args) -> str:
        return self._run("add_friendship", *args)

    def remove_friendship(self, *args) -> str:
        return self._run("remove_friendship", *args)

    def events(self, *args, **kw):
        return self.offline.events(*args, **kw)

    def ping(self) -> bool:
        return self.store.ping()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run_until_complete(self.store.aclose())
            self._loop.close()
        self.store.close()
        self.offline.close()

    def __enter__(self) -> Calls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> str:
    """Every store test runs on every request path: blocking, and async over both clients."""
    return request.param


@pytest.fixture
def store_config(redis_server, redis_namespace: str) -> StoreConfig:
    return StoreConfig(url=redis_server.url, namespace=redis_namespace)


@pytest.fixture
def store(store_config: StoreConfig, path: str) -> Iterator[Calls]:
    with Calls(store_config, path) as s:
        yield s


@pytest.fixture
def raw(redis_server) -> Iterator[redis.Redis]:
    """A plain client, to look at keys behind the store's back."""
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield r
    r.close()


def test_unknown_user_is_empty(store: Calls) -> None:
    assert store.read("nobody") == UserFeatures([], [], {})
    assert store.read("nobody", with_fof=True) == UserFeatures([], [], {})


def test_log_then_read_newest_first_weights_summed(store: Calls) -> None:
    store.log_interaction("u", "a", 1.0, 1000)
    store.log_interaction("u", "b", 2.5, 2000)
    assert store.read("u").history == [("b", 2.5), ("a", 1.0)]
    store.log_interaction("u", "a", 0.5, 3000)  # repeat: weight adds up, a is newest again
    assert store.read("u").history == [("a", 1.5), ("b", 2.5)]


def test_recency_is_the_latest_timestamp(store: Calls) -> None:
    store.log_interaction("u", "a", 1.0, 5000)
    store.log_interaction("u", "b", 1.0, 4000)
    store.log_interaction("u", "a", 1.0, 1000)  # a late-arriving old event doesn't age `a`
    assert store.read("u").history == [("a", 2.0), ("b", 1.0)]


def test_history_cap_drops_oldest_items_and_their_weights(
    store_config: StoreConfig, path: str, raw: redis.Redis
) -> None:
    with Calls(replace(store_config, history_cap=3), path) as s:
        for t, item in enumerate("abcde"):
            s.log_interaction("u", item, float(t + 1), 1000 + t)
        assert s.read("u").history == [("e", 5.0), ("d", 4.0), ("c", 3.0)]
        assert sorted(raw.hkeys(s.keys.user("w", "u"))) == ["c", "d", "e"]  # no leaked weights
        assert raw.zcard(s.keys.user("h", "u")) == 3
        s.log_interaction("u", "a", 1.0, 10)  # older than everything kept: dropped at once
        assert [i for i, _ in s.read("u").history] == ["e", "d", "c"]
        assert sorted(raw.hkeys(s.keys.user("w", "u"))) == ["c", "d", "e"]


def test_friendship_is_symmetric_and_idempotent(store: Calls) -> None:
    store.add_friendship("a", "b", 1)
    store.add_friendship("b", "a", 2)  # same edge
    assert store.read("a").friends == ["b"]
    assert store.read("b").friends == ["a"]
    store.remove_friendship("b", "a", 3)
    store.remove_friendship("a", "b", 4)  # already gone: succeeds, changes nothing
    assert store.read("a").friends == [] and store.read("b").friends == []
    changed = [(f["type"], f["changed"]) for _, f in store.events()]
    assert changed == [
        ("friend_add", "1"),
        ("friend_add", "0"),
        ("friend_remove", "1"),
        ("friend_remove", "0"),
    ]


def test_friends_of_friends_on_a_hand_made_graph(store: Calls) -> None:
    #   u - a, u - b, u - c;  a - b (mutual friends, both already u's friends)
    #   a - x, b - x, c - x  -> x: 3 mutual;  a - y, b - y -> y: 2;  c - z -> z: 1
    #   w (a stranger to u, friend of nobody u knows) must not appear
    edges = [("u", "a"), ("u", "b"), ("u", "c"), ("a", "b")]
    edges += [("a", "x"), ("b", "x"), ("c", "x"), ("a", "y"), ("b", "y"), ("c", "z"), ("w", "q")]
    for a, b in edges:
        store.add_friendship(a, b, 0)
    f = store.read("u", with_fof=True)
    assert f.friends == ["a", "b", "c"]
    assert f.fof == {"x": 3, "y": 2, "z": 1}  # no u (self), no a/b (already friends)
    assert store.read("u").fof == {}  # only computed when asked
    assert store.read("x", with_fof=True).fof == {"u": 3, "y": 2, "z": 1}


def test_fof_caps(store_config: StoreConfig, path: str) -> None:
    with Calls(replace(store_config, fof_cap=2, fof_friends_cap=1), path) as s:
        for a, b in [("u", "a"), ("u", "b"), ("a", "x"), ("a", "y"), ("a", "z"), ("b", "x")]:
            s.add_friendship(a, b, 0)
        # only friend "a" (first by id) is scanned; 3 candidates at count 1, the first 2 by id
        assert s.read("u", with_fof=True).fof == {"x": 1, "y": 1}


def test_read_is_one_transaction(store: Calls, raw: redis.Redis) -> None:
    """Redis's own command counters: a read with friends-of-friends is one MULTI/EXEC (written
    in one go, so one round trip) of three plain reads and one EVALSHA, nothing else."""
    for a, b in [("u", "a"), ("a", "x")]:
        store.add_friendship(a, b, 0)
    store.log_interaction("u", "i", 1.0, 1)
    store.read("u", with_fof=True)  # warm up: connection handshake, script already loaded
    before = raw.info("commandstats")
    feats = store.read("u", with_fof=True)
    after = raw.info("commandstats")

    assert feats == UserFeatures([("i", 1.0)], ["a"], {"x": 1})
    calls = {
        k: after[k]["calls"] - before.get(k, {}).get("calls", 0)
        for k in after
        if after[k]["calls"] != before.get(k, {}).get("calls", 0)
    }
    assert calls == {
        "cmdstat_multi": 1,
        "cmdstat_zrevrange": 1,
        "cmdstat_hgetall": 1,
        # u's friends and dismissed users; in the script: u's block sets (both ways), dismissed
        # users and friends again, then a's friends
        "cmdstat_smembers": 7,
        "cmdstat_sunion": 1,  # blocked either way
        "cmdstat_evalsha": 1,
        "cmdstat_exec": 1,
        "cmdstat_info": 1,  # the INFO that took `before`
    }


def test_read_survives_a_flushed_script_cache(store: Calls, raw: redis.Redis) -> None:
    """After a Redis restart the script cache is empty: the read reloads the script itself."""
    store.add_friendship("u", "a", 0)
    store.add_friendship("a", "x", 0)
    assert store.read("u", with_fof=True).fof == {"x": 1}
    raw.script_flush()
    assert store.read("u", with_fof=True).fof == {"x": 1}
    raw.script_flush()
    store.log_interaction("u", "i", 1.0, 1)  # a write reloads its script too
    assert store.read("u").history == [("i", 1.0)]


def test_events_have_the_right_fields(store_config: StoreConfig, path: str) -> None:
    with Calls(replace(store_config, stream_maxlen=1000), path) as s:
        e1 = s.log_interaction("u", "item:1", 0.25, 1700000000123)
        e2 = s.add_friendship("u", "v", 1700000000456)
        e3 = s.remove_friendship("v", "u", 1700000000789)
        events = s.events()
    assert [eid for eid, _ in events] == [e1, e2, e3]
    assert events[0][1] == {
        "type": "interaction",
        "user": "u",
        "item": "item:1",
        "weight": "0.25",
        "ts": "1700000000123",
    }
    assert events[1][1] == {
        "type": "friend_add",
        "user": "u",
        "friend": "v",
        "ts": "1700000000456",
        "changed": "1",
    }
    assert events[2][1]["type"] == "friend_remove" and events[2][1]["user"] == "v"
    with OfflineStore(store_config) as s:
        assert [eid for eid, _ in s.events(after=e1)] == [e2, e3]  # strictly after
        assert [eid for eid, _ in s.events(count=1)] == [e1]


def test_bad_arguments_raise_value_error_before_any_write(store: Calls) -> None:
    for call in (
        lambda: store.log_interaction("", "i", 1.0, 0),
        lambda: store.log_interaction("u", "", 1.0, 0),
        lambda: store.log_interaction("u", "i", float("nan"), 0),
        lambda: store.log_interaction("u", "i", float("inf"), 0),
        lambda: store.log_interaction("u", "i", 1.0, -1),
        lambda: store.add_friendship("u", "u", 0),
        lambda: store.remove_friendship("u", "", 0),
        lambda: store.read(""),
    ):
        with pytest.raises(ValueError):
            call()
    assert store.events() == []


def test_bulk_load_counts_contents_and_no_events(
    store_config: StoreConfig, path: str, raw: redis.Redis
) -> None:
    rows = [("u1", f"i{t}", float(t), 100 + t) for t in range(5)] + [("u2", "i0", 0.3, 0)]
    pairs = [("u1", "u2"), ("u2", "u3"), ("u2", "u1")]  # the last repeats the first
    cfg = replace(store_config, history_cap=3)
    with Calls(cfg, path) as s, OfflineStore(cfg) as off:
        counts = off.bulk_load(rows, pairs, batch=2, progress=False)
        assert counts == {
            "interactions": 6,
            "history_users": 2,
            "history_dropped": 2,  # u1 had 5 items, cap 3
            "friend_pairs": 3,
            "friend_pairs_new": 2,
            "friend_users": 3,
        }
        assert s.read("u1").history == [("i4", 4.0), ("i3", 3.0), ("i2", 2.0)]
        assert sorted(raw.hkeys(s.keys.user("w", "u1"))) == ["i2", "i3", "i4"]
        assert s.read("u2", with_fof=True) == UserFeatures([("i0", 0.3)], ["u1", "u3"], {})
        assert s.events() == []  # training data is not a new event
        again = off.bulk_load(rows, pairs, progress=False)  # idempotent: weights are set, not added
        assert again["friend_pairs_new"] == 0
        assert s.read("u1").history == [("i4", 4.0), ("i3", 3.0), ("i2", 2.0)]


def test_flush_deletes_only_this_namespace(
    store_config: StoreConfig, path: str, redis_namespace: str
) -> None:
    other = replace(store_config, namespace=redis_namespace + "-other")
    with Calls(store_config, path) as s, Calls(other, path) as o:
        s.log_interaction("u", "i", 1.0, 1)
        s.add_friendship("u", "v", 1)
        o.log_interaction("u", "i", 1.0, 1)
        assert s.offline.flush() == 5  # h, w, s and two friend sets; the stream is kept
        assert s.read("u") == UserFeatures() and len(s.events()) == 2
        assert o.read("u").history == [("i", 1.0)]
        assert s.offline.flush(events=True) == 1 and s.events() == []


@pytest.mark.parametrize("path", PATHS)
def test_redis_killed_then_restarted(tmp_path, path: str) -> None:
    """Down: reads and writes raise StoreUnavailable fast. Back: the same store object works,
    and what was written before the SIGKILL came back from the AOF."""
    try:
        server = start_redis(dir=tmp_path)
    except RedisNotInstalled as e:
        pytest.skip(str(e))
    with server, Calls(StoreConfig(url=server.url, namespace="t"), path) as s:
        s.log_interaction("u", "a", 2.0, 1)
        s.add_friendship("u", "v", 1)
        server.kill()
        for call in (
            lambda: s.read("u"),
            lambda: s.log_interaction("u", "b", 1.0, 2),
            lambda: s.add_friendship("u", "w", 2),
        ):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                call()
            assert time.monotonic() - t0 < 1.0
        assert s.ping() is False
        server.restart()
        assert s.ping() is True
        assert s.read("u") == UserFeatures([("a", 2.0)], ["v"], {}, seen=frozenset({"a"}))
        s.log_interaction("u", "b", 1.0, 2)
        assert [i for i, _ in s.read("u").history] == ["b", "a"]

        server.kill()  # restart with no failed call in between: the stale pooled
        server.restart()  # connection is replaced by the one retry, no error reaches us
        assert [i for i, _ in s.read("u").history] == ["b", "a"]
        assert len(s.events()) == 3


@pytest.mark.parametrize("path", PATHS)
def test_hung_redis_times_out(tmp_path, path: str) -> None:
    """A Redis that accepts connections but never answers (SIGSTOP) fails by the socket timeout."""
    try:
        server = start_redis(dir=tmp_path, appendonly=False)
    except RedisNotInstalled as e:
        pytest.skip(str(e))
    with server, Calls(StoreConfig(url=server.url, namespace="t"), path) as s:
        s.log_interaction("u", "a", 1.0, 1)
        server.pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                s.read("u")
            # socket_timeout 0.25 s, timeouts are not retried; 1 s leaves room for a busy box
            assert time.monotonic() - t0 < 1.0
        finally:
            server.resume()
        assert s.read("u").history == [("a", 1.0)]


def test_missing_binary_says_how_to_install() -> None:
    with pytest.raises(RedisNotInstalled, match="apt-get install redis-server"):
        start_redis(binary="no-such-redis-server-binary")


def test_serving_imports_no_torch_or_training() -> None:
    code = (
        "import sys, socialrec.serving.store, socialrec.serving.publish, socialrec.serving.redis_local; "
        "bad = [m for m in ('torch', 'socialrec.training', 'socialrec.compression') if m in sys.modules]; "
        "sys.exit(str(bad) if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("client", ["resp", "redis-py"])
def test_concurrent_async_reads_match_the_blocking_ones(
    store_config: StoreConfig, client: str
) -> None:
    """Many reads in flight on one event loop each get their own user's answer."""
    with FeatureStore(replace(store_config, client=client)) as s:
        s.log_interaction("u", "a", 1.5, 10)
        s.add_friendship("u", "v", 11)
        s.add_friendship("v", "w", 12)

        async def main() -> list[UserFeatures]:
            users = ("u", "v", "w") * 5
            got = await asyncio.gather(*(s.aread(u, with_fof=True) for u in users))
            await s.aclose()
            return got

        got = asyncio.run(main())
        assert got == [s.read(u, with_fof=True) for u in ("u", "v", "w") * 5]
        assert got[0] == UserFeatures([("a", 1.5)], ["v"], {"w": 1})
