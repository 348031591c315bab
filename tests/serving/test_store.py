"""The Redis feature store against a real redis-server and a real Redis Cluster: contents,
atomic writes, one round trip per read, the event stream, bulk loading and behaviour when
Redis dies or hangs (a single node) or a primary fails over (a cluster)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis
import redis.cluster
from socialrec.serving import schema
from socialrec.serving.offline_store import OfflineStore, advance
from socialrec.serving.redis_local import RedisNotInstalled, start_cluster, start_redis
from socialrec.serving.schema import UserFeatures
from socialrec.serving.store import (
    FeatureStore,
    StoreConfig,
    StoreDataError,
    StoreUnavailable,
    WriteConflict,
    _unavailable,
)

PATHS = ["blocking", "async-resp", "async-redis-py"]
# Every store test runs on every request path of each backend: a single Redis (blocking, and
# async over both clients) and a Redis Cluster (blocking, and async over redis-py's cluster
# client, the only one there).
SINGLE_PATHS = [f"single-{p}" for p in PATHS]
CLUSTER_PATHS = ["cluster-blocking", "cluster-async"]
# The cluster runs belong to the slow tier (make test-slow): a 6-node cluster per session.
SLOW_CLUSTER_PATHS = [pytest.param(p, marks=pytest.mark.slow) for p in CLUSTER_PATHS]
BACKEND_PATHS = SINGLE_PATHS + SLOW_CLUSTER_PATHS


class Calls:
    """One of the store's request paths behind the blocking call names: the blocking redis-py
    methods, or the server's async methods over either async client (on one event loop)."""

    def __init__(self, cfg: StoreConfig, path: str) -> None:
        client = "redis-py" if path.endswith("async-redis-py") else "resp"
        self.store = FeatureStore(replace(cfg, client=client))
        self.offline = OfflineStore(cfg)
        self.keys = self.store.keys
        self._loop = None if path.endswith("blocking") else asyncio.new_event_loop()

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

    def block(self, *args) -> str:
        return self._run("block", *args)

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


@pytest.fixture(params=BACKEND_PATHS)
def path(request: pytest.FixtureRequest) -> str:
    """Backend and request path, e.g. "single-async-resp" or "cluster-blocking"."""
    return request.param


@pytest.fixture
def cluster(path: str) -> bool:
    return path.startswith("cluster-")


@pytest.fixture
def store_config(
    request: pytest.FixtureRequest, cluster: bool, redis_namespace: str
) -> StoreConfig:
    if cluster:
        url = request.getfixturevalue("redis_cluster").url
    else:
        url = request.getfixturevalue("redis_server").url
    return StoreConfig(url=url, namespace=redis_namespace, cluster=cluster)


@pytest.fixture
def store(store_config: StoreConfig, path: str) -> Iterator[Calls]:
    with Calls(store_config, path) as s:
        yield s


@pytest.fixture
def raw(store_config: StoreConfig) -> Iterator[redis.Redis]:
    """A plain client (the cluster one on a cluster), to look at keys behind the store's back."""
    if store_config.cluster:
        r = redis.cluster.RedisCluster.from_url(store_config.url, decode_responses=True)
    else:
        r = redis.Redis.from_url(store_config.url, decode_responses=True)
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


@pytest.mark.parametrize("path", SINGLE_PATHS)
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


@pytest.mark.parametrize("path", SLOW_CLUSTER_PATHS)
def test_cluster_read_commands(store: Calls, redis_cluster) -> None:
    """A cluster friend read, by the nodes' own command counters: the user's six plain reads
    and the scanned friends' sets (no script, no transaction); a content read: five reads
    and the takedown version's GET."""
    for a, b in [("u", "a"), ("u", "b"), ("a", "x"), ("b", "x")]:
        store.add_friendship(a, b, 0)
    store.read("u", with_fof=True)  # warm up: connections to every node read, the layout
    store.read("u")

    def counts() -> dict[str, int]:
        total: dict[str, int] = {}
        for n in redis_cluster.nodes:
            with redis.Redis(port=n.port, decode_responses=True) as r:
                for k, v in r.info("commandstats").items():
                    total[k] = total.get(k, 0) + v["calls"]
        return total

    def delta(read) -> dict[str, int]:
        before = counts()
        read()
        after = counts()
        out = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        for ours in ("info", "hello", "client|setinfo"):  # the counting clients' own
            out.pop(f"cmdstat_{ours}", None)
        # Cluster housekeeping that may land in the window (layout refreshes, replication
        # pings), not part of the read.
        for k in list(out):
            if k.startswith("cmdstat_cluster") or k in (
                "cmdstat_ping",
                "cmdstat_replconf",
                "cmdstat_readonly",
                "cmdstat_command",
            ):
                del out[k]
        return out

    got = delta(lambda: store.read("u", with_fof=True))
    assert got == {
        "cmdstat_zrevrange": 1,
        "cmdstat_hgetall": 1,
        # u's friends, dismissed users and both block sets (apart: a migrating slot refuses
        # a SUNION while one has moved), a's and b's friends
        "cmdstat_smembers": 6,
    }
    assert store.read("u", with_fof=True).fof == {"x": 2}
    got = delta(lambda: store.read("u"))
    assert got == {"cmdstat_zrevrange": 1, "cmdstat_hgetall": 1, "cmdstat_smembers": 3,
                   "cmdstat_get": 1}  # fmt: skip


def test_ids_with_braces_and_one_slot_per_user(store: Calls, raw: redis.Redis) -> None:
    """Ids holding braces work (the hash tag comes first and is ours), and in a cluster every
    key of one user, its request ids and its stream shard share one slot."""
    users = ["{a}", "}{", "a{b}c", "{", "}", "plain"]
    for i, u in enumerate(users):
        store.log_interaction(u, f"item{{{i}}}", 1.0, i + 1)
        store.add_friendship(u, "plain" if u != "plain" else "{a}", i + 1)
    for u in users:
        assert store.read(u).history[0][0].startswith("item{")
    assert store.read("plain").friends == sorted(set(users) - {"plain"})
    assert store.read("{a}", with_fof=True).fof == {
        u: 1 for u in users if u not in ("{a}", "plain")
    }
    with pytest.raises(ValueError, match="namespace"):
        schema.Keys("a{b}")  # its brace would be the hash tag of every key
    if isinstance(raw, redis.cluster.RedisCluster):
        k = store.keys
        for u in users:
            names = [k.user(kind, u) for kind in ("h", "w", "f", "s", "d", "du", "b", "bb", "ev")]
            names += [
                k.request(u, "rid", "log"),
                k.request(u, "", "log"),
                k.stream(schema.shard_of(u)),
            ]
            assert len({raw.keyslot(n) for n in names}) == 1, u


def test_block_unfriends_both_sides_and_replays_once(store: Calls) -> None:
    """A block removes the friendship on both sides and refuses a new one either way; a
    repeat of the block's request id after an unblock and a new friendship changes nothing."""
    store.add_friendship("u", "v", 1)
    first = store.block("block", "u", "v", 2, "blk-1")
    assert store.read("u").friends == [] and store.read("v").friends == []
    assert store.read("u", with_fof=True).blocked == {"v"}
    assert store.read("v", with_fof=True).blocked == {"u"}  # the reverse index
    for a, b in [("u", "v"), ("v", "u")]:
        with pytest.raises(WriteConflict):
            store.add_friendship(a, b, 3)
    store.block("unblock", "u", "v", 4)
    assert store.read("v", with_fof=True).blocked == frozenset()
    store.add_friendship("v", "u", 5)
    assert store.block("block", "u", "v", 6, "blk-1") == first  # replayed: nothing applied
    assert store.read("u").friends == ["v"] and store.read("v").friends == ["u"]
    assert store.read("v", with_fof=True).blocked == frozenset()
    types = sorted(f["type"] for _, f in store.events())
    assert types == ["block", "friend_add", "friend_add", "friend_remove", "unblock"]


@pytest.mark.slow
@pytest.mark.parametrize("path", CLUSTER_PATHS)
def test_cluster_mirrors_converge_whatever_the_order(store: Calls) -> None:
    """Cluster friendship writes are an owner step and a mirror step: a mirror step that
    arrives after a newer one (two writes racing) is ignored, and a write whose mirror step
    never ran is completed by a retry with the same request id (nothing applied twice)."""
    s = store.store
    add = s.friend_plan("add", "u", "v", 1)
    add_owner = s._call(next(add))  # the owner step of an add ...
    assert store.read("u").friends == ["v"] and store.read("v").friends == []
    store.remove_friendship("v", "u", 2)  # ... then a whole remove ...
    with pytest.raises(StopIteration):
        add.send(s._call(add.send(add_owner)))  # ... then the add's (older) mirror step
    assert store.read("u").friends == [] and store.read("v").friends == []

    half = s.friend_plan("add", "v", "u", 3, "req-1")
    s._call(next(half))  # the process died before the mirror step
    assert store.read("u").friends == ["v"] and store.read("v").friends == []
    eid = store.add_friendship("v", "u", 3, "req-1")  # the client's retry
    assert store.read("u").friends == ["v"] and store.read("v").friends == ["u"]
    assert store.add_friendship("v", "u", 3, "req-1") == eid
    assert [f["changed"] for _, f in store.events()] == ["1", "1", "1"]  # add, remove, add


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
    assert len({eid.split("@")[1] for eid in (e1, e2, e3)}) == 1  # u's shard (u owns {u, v})
    with OfflineStore(store_config) as s:
        after_e1 = advance({}, events[:1])
        assert [eid for eid, _ in s.events(after=after_e1)] == [e2, e3]  # strictly after
        assert [eid for eid, _ in s.events(count=1)] == [e1]  # count: per shard
        assert s.events(after=advance(after_e1, s.events(after=after_e1))) == []


def test_wrong_type_is_a_data_error_not_an_outage(store: Calls, raw: redis.Redis) -> None:
    """A key of the wrong type under one user: that user's reads (content and friends, also
    as a friend scanned by someone else's read) and writes fail as data errors, which degrade
    only that user; cluster errors (CLUSTERDOWN, TRYAGAIN) count as Redis being down."""
    raw.set(store.keys.user("f", "bad"), "a string where a set belongs")
    store.log_interaction("ok", "i", 1.0, 1)
    with pytest.raises(StoreDataError):
        store.read("bad")
    with pytest.raises(StoreDataError):
        store.read("bad", with_fof=True)
    with pytest.raises(StoreDataError):
        store.add_friendship("bad", "ok", 1)
    raw.sadd(store.keys.user("f", "ok"), "bad")  # ok's friend read scans bad's friend set
    with pytest.raises(StoreDataError):
        store.read("ok", with_fof=True)
    assert store.read("ok").history == [("i", 1.0)]
    assert _unavailable(redis.exceptions.ClusterDownError("CLUSTERDOWN"))
    assert _unavailable(redis.exceptions.TryAgainError("TRYAGAIN"))
    assert not _unavailable(redis.exceptions.ResponseError("WRONGTYPE"))


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
    store_config: StoreConfig, path: str, redis_namespace: str, cluster: bool
) -> None:
    other = replace(store_config, namespace=redis_namespace + "-other")
    with Calls(store_config, path) as s, Calls(other, path) as o:
        s.log_interaction("u", "i", 1.0, 1)
        s.add_friendship("u", "v", 1)
        o.log_interaction("u", "i", 1.0, 1)
        # h, w, s and two friend sets (and in a cluster the edge's two version hashes); the
        # stream shard (u's: u owns the edge {u, v}) is kept
        assert s.offline.flush() == (7 if cluster else 5)
        assert s.read("u") == UserFeatures() and len(s.events()) == 2
        assert o.read("u").history == [("i", 1.0)]
        assert s.offline.flush(events=True) == 1 and s.events() == []


@pytest.mark.parametrize("path", SINGLE_PATHS)
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


@pytest.mark.parametrize("path", SINGLE_PATHS)
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


@pytest.mark.parametrize("path", ["single-async-resp", "single-async-redis-py", "cluster-async"])
def test_concurrent_async_reads_match_the_blocking_ones(
    store_config: StoreConfig, path: str
) -> None:
    """Many reads in flight on one event loop each get their own user's answer."""
    client = "resp" if path.endswith("resp") else "redis-py"
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


@pytest.mark.slow
@pytest.mark.parametrize("path", CLUSTER_PATHS)
def test_cluster_primary_fails_over(tmp_path, path: str) -> None:
    """Kill the primary that owns a user's slot: while nothing serves the slot, the user's
    reads and writes fail fast with StoreUnavailable; once its replica is promoted, the same
    store object reads what was written before (replicated with WAIT first) and writes again
    (redis-py refreshes the cluster's layout and follows MOVED); the old primary comes back as
    a replica."""
    try:
        c = start_cluster(dir=tmp_path, node_timeout_ms=1000)
    except RedisNotInstalled as e:
        pytest.skip(str(e))
    with c, Calls(StoreConfig(url=c.url, namespace="t", cluster=True), path) as s:
        s.log_interaction("u", "a", 2.0, 1)
        s.add_friendship("u", "v", 1)
        c.wait_replicated()
        primary = c.primary_for_key(s.keys.user("h", "u"))
        (replica,) = c.replicas_of(primary)
        c.kill(primary)
        for call in (lambda: s.read("u"), lambda: s.log_interaction("u", "b", 1.0, 2)):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                call()
            assert time.monotonic() - t0 < 2.0
        c.wait_ok(30)  # the replica took over every slot of the dead primary
        assert c.role(replica) == "master"
        want = UserFeatures([("a", 2.0)], ["v"], {}, seen=frozenset({"a"}))
        assert s.read("u") == want
        s.log_interaction("u", "b", 1.0, 2)
        s.add_friendship("u", "w", 2)
        assert [i for i, _ in s.read("u").history] == ["b", "a"]
        assert s.read("u", with_fof=True).friends == ["v", "w"]
        assert [f["type"] for _, f in s.events()] == [
            "interaction", "friend_add", "interaction", "friend_add",
        ]  # fmt: skip
        c.restart(primary)
        c.wait_ok(30)
        assert c.role(primary) == "slave"
        assert [i for i, _ in s.read("u").history] == ["b", "a"]


@pytest.mark.slow
@pytest.mark.parametrize("path", CLUSTER_PATHS)
def test_cluster_reads_alone_recover_after_a_failover(tmp_path, path: str) -> None:
    """Only reads after the primary of a user's slot dies (no write that would re-read the
    layout by accident): once its replica is promoted, the same store's reads answer again
    within seconds, also when the dead primary is the node the URL names first. A cluster
    pipeline hands back a dead node's connection error as a reply, and the client kept its
    old layout, so reads went on failing until a write happened to refresh it."""
    try:
        c = start_cluster(dir=tmp_path, node_timeout_ms=1000)
    except RedisNotInstalled as e:
        pytest.skip(str(e))
    with c:
        probe = FeatureStore(StoreConfig(url=c.url, namespace="t", cluster=True))
        user = next(u for u in (f"u{i}" for i in range(10_000))
                    if c.primary_for_key(probe.keys.user("h", u)).port == c.nodes[0].port)  # fmt: skip
        probe.close()
        with Calls(StoreConfig(url=c.url, namespace="t", cluster=True), path) as s:
            s.log_interaction(user, "a", 2.0, 1)
            c.wait_replicated()
            assert s.read(user).history == [("a", 2.0)]
            c.kill(c.primary_for_key(s.keys.user("h", user)))
            with pytest.raises(StoreUnavailable):
                s.read(user)
            c.wait_ok(30)
            deadline = time.monotonic() + 10
            while True:
                try:
                    got = s.read(user, with_fof=True)
                    break
                except StoreUnavailable:
                    assert time.monotonic() < deadline, "reads did not recover"
                    time.sleep(0.1)
            assert got.history == [("a", 2.0)]


@pytest.mark.slow
def test_cluster_ranks_friends_of_friends_as_the_script(
    redis_server, redis_cluster, redis_namespace: str
) -> None:
    """On a random graph with blocks and dismissals, small caps (so the scan cap, ties and
    the cut all matter): the cluster's ranking in Python equals the single Redis's script."""
    rng = random.Random(5)
    users = [f"u{i}" if i % 7 else f"u{{{i}}}" for i in range(150)]  # some ids with braces
    pairs = {tuple(rng.sample(users, 2)) for _ in range(900)}
    base = StoreConfig(url=redis_server.url, namespace=redis_namespace, fof_cap=5)
    base = replace(base, fof_friends_cap=6)
    both = [base, replace(base, url=redis_cluster.url, cluster=True)]
    for cfg in both:
        with OfflineStore(cfg) as off, FeatureStore(cfg) as s:
            off.bulk_load([], sorted(pairs), progress=False)
            r = random.Random(6)
            for _ in range(40):
                a, b = r.sample(users, 2)
                if r.random() < 0.5:
                    s.block("block", a, b, 1)
                else:
                    s.dismiss(a, "", b, 1)
    with FeatureStore(both[0]) as single, FeatureStore(both[1]) as cluster:
        got = [(single.read(u, with_fof=True), cluster.read(u, with_fof=True)) for u in users]
    assert all(a == b for a, b in got)
    assert sum(len(a.fof) == 5 for a, _ in got) > 50  # the cut applies to many users


def test_cluster_seeds_parse_every_node() -> None:
    """A host list inside one URL: the first host keeps the URL's credentials, path and
    options; a bad entry is refused with the password masked."""
    from socialrec.serving.store import StoreConfig, cluster_seeds

    first, rest = cluster_seeds(
        "rediss://:p,w@10.0.0.1:7000, 10.0.0.2:7001,h3/0?ssl_cert_reqs=none"
    )
    assert first == "rediss://:p,w@10.0.0.1:7000/0?ssl_cert_reqs=none"
    assert rest == [("10.0.0.2", 7001), ("h3", 6379)]
    assert cluster_seeds("redis://h1:7000") == ("redis://h1:7000", [])
    for bad in ("redis://:secret@h1:7000,:7001", "redis://:secret@h1:7000,,h2", "redis://"):
        with pytest.raises(ValueError) as e:
            cluster_seeds(bad)
        assert "secret" not in str(e.value)
    with pytest.raises(ValueError, match="bad host"):  # at start, not at the first request
        StoreConfig(url="redis://:secret@h1:7000,:7001", cluster=True)


@pytest.mark.slow
@pytest.mark.parametrize("path", CLUSTER_PATHS)
def test_cluster_store_starts_and_serves_with_its_first_seed_down(
    redis_cluster, redis_namespace: str, path: str
) -> None:
    """A URL naming a dead node first and a live one after it: the store is made, reads and
    writes work. With every seed dead, the store is still made (a server starts and answers
    degraded) and a read raises StoreUnavailable."""
    from socialrec.serving.redis_local import find_free_port

    dead = f"127.0.0.1:{find_free_port()}"
    live = redis_cluster.url.removeprefix("redis://").removesuffix("/0")
    cfg = StoreConfig(url=f"redis://{dead},{live}/0", namespace=redis_namespace, cluster=True)
    with Calls(cfg, path) as s:
        s.log_interaction("seeded", "a", 1.0, 1)
        assert s.read("seeded").history == [("a", 1.0)]
    store = FeatureStore(replace(cfg, url=f"redis://{dead}/0"))  # connects at first use
    try:
        with pytest.raises(StoreUnavailable):
            if path.endswith("blocking"):
                store.read("seeded")
            else:
                asyncio.run(store.aread("seeded"))
    finally:
        store.close()
