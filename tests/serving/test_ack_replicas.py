"""Acknowledged writes (``StoreConfig.ack_replicas``, ``serve --ack-replicas``): a write is
acknowledged only once WAIT, on the connection that wrote it, confirms the replicas have it.

Real redis-server processes on loopback: a primary with one replica (started here, REPLICAOF,
paused with SIGSTOP to play a replica that does not answer), and in the slow tier the
session's Redis Cluster and a `socialrec serve` subprocess."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace

import grpc
import pytest
import redis
from socialrec.serving import schema
from socialrec.serving.offline_store import OfflineStore
from socialrec.serving.redis_local import RedisNotInstalled, RedisProcess, start_redis
from socialrec.serving.store import (
    FeatureStore,
    ReplicationTimeout,
    StoreConfig,
    StoreUnavailable,
)

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc

TIMEOUT_MS = 300  # ack_timeout_ms of these tests: long enough for a busy 2-core box
PATHS = ["blocking", "async-resp", "async-redis-py"]
TOKEN = "in-process-token"  # tests/serving/conftest.py
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@dataclass
class Replicated:
    """A primary and its one replica (plain clients on both, to look behind the store)."""

    primary: RedisProcess
    replica: RedisProcess
    p: redis.Redis
    r: redis.Redis


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, decode_responses=True, socket_timeout=5)


def _wait_link_up(r: redis.Redis, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while r.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica did not connect to its primary"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def replicated() -> Iterator[Replicated]:
    """A primary and a replica of it (REPLICAOF), link up; both stopped at the end."""
    try:
        primary = start_redis(appendonly=False)
    except RedisNotInstalled as e:
        pytest.skip(str(e))
    replica = start_redis(appendonly=False)
    p, r = _client(primary.port), _client(replica.port)
    try:
        r.replicaof("127.0.0.1", primary.port)
        _wait_link_up(r)
        yield Replicated(primary, replica, p, r)
    finally:
        replica.resume()
        p.close()
        r.close()
        replica.cleanup()
        primary.cleanup()


@pytest.fixture
def paused(replicated: Replicated) -> Iterator[Replicated]:
    """The replica stopped (SIGSTOP) for the test, resumed and caught up afterwards."""
    replicated.replica.pause()
    try:
        yield replicated
    finally:
        replicated.replica.resume()
        _wait_link_up(replicated.r)
        replicated.p.execute_command("WAIT", 1, 5000)


def _cfg(replicated: Replicated, replicas: int = 1, **kw) -> StoreConfig:
    ns = f"ack-{uuid.uuid4().hex[:10]}"
    return StoreConfig(
        url=replicated.primary.url,
        namespace=ns,
        ack_replicas=replicas,
        ack_timeout_ms=TIMEOUT_MS,
        **kw,
    )


class Calls:
    """The blocking methods, or the async ones over one client on one event loop, behind the
    blocking names (as in test_store.py)."""

    def __init__(self, cfg: StoreConfig, path: str) -> None:
        client = "redis-py" if path.endswith("redis-py") else "resp"
        self.store = FeatureStore(replace(cfg, client=client))
        self.keys = self.store.keys
        self._loop = None if path.endswith("blocking") else asyncio.new_event_loop()

    def __getattr__(self, name: str):
        def call(*args):
            if self._loop is None:
                return getattr(self.store, name)(*args)
            return self._loop.run_until_complete(getattr(self.store, "a" + name)(*args))

        return call

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run_until_complete(self.store.aclose())
            self._loop.close()
        self.store.close()

    def __enter__(self) -> Calls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _events(cfg: StoreConfig) -> list:
    with OfflineStore(cfg) as o:
        return o.events()


def _waits(r: redis.Redis) -> int:
    """WAIT commands the server has run so far."""
    return int(r.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


# ---- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"), [("ack_replicas", -1), ("ack_timeout_ms", -5), ("ack_timeout_ms", 0)]
)
def test_bad_settings_are_refused_naming_the_field(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=rf"{field} .*got {value}"):
        StoreConfig(**{field: value})


def test_the_server_passes_its_settings_to_the_store() -> None:
    from socialrec.serving.config import ServerConfig
    from socialrec.serving.worker import store_config

    got = store_config(ServerConfig(bundle="b", ack_replicas=2, ack_timeout_ms=750))
    assert (got.ack_replicas, got.ack_timeout_ms) == (2, 750)
    assert store_config(ServerConfig(bundle="b")).ack_replicas == 0


def test_serve_refuses_bad_settings_before_forking() -> None:
    from socialrec.serving.config import ServerConfig
    from socialrec.serving.supervisor import StartupError, check_startup

    with pytest.raises(StartupError, match="ack_replicas must be an integer >= 0, got -1"):
        check_startup(ServerConfig(bundle="no-such-bundle", ack_replicas=-1))


def test_without_ack_replicas_no_wait_is_sent(replicated: Replicated) -> None:
    cfg = _cfg(replicated, replicas=0)
    before = _waits(replicated.p)
    for path in PATHS:
        with Calls(cfg, path) as s:
            s.log_interaction("u", "i", 1.0, 1)
    assert _waits(replicated.p) == before


# ---- a primary and one replica ---------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_acknowledged_write_is_on_the_replica_when_it_returns(
    replicated: Replicated, path: str
) -> None:
    cfg = _cfg(replicated)
    for script in (schema.LOG, schema.FRIEND, schema.DISMISS, schema.BLOCK, schema.ITEM):
        replicated.p.script_load(script)  # no NOSCRIPT (and second WAIT) in the count
    before = _waits(replicated.p)
    with Calls(cfg, path) as s:
        s.log_interaction("u", "i", 2.0, 1, "r1")
        # no waiting here: the call returned after WAIT confirmed the replica
        assert replicated.r.zrange(s.keys.user("h", "u"), 0, -1) == ["i"]
        s.add_friendship("u", "v", 2, "f1")
        assert replicated.r.smembers(s.keys.user("f", "v")) == {"u"}
        s.dismiss("u", "x", "", 3, "d1")
        s.block("block", "u", "w", 4, "b1")
        s.item("remove", "gone", 5, "t1")
        assert replicated.r.sismember(s.keys.user("bb", "w"), "u")
        assert replicated.r.smembers(s.keys.removed) == {"gone"}
    assert _waits(replicated.p) - before == 5  # one WAIT per script call


@pytest.mark.parametrize("path", PATHS)
def test_unconfirmed_write_times_out_is_applied_and_a_retry_counts_once(
    replicated: Replicated, path: str
) -> None:
    cfg = _cfg(replicated)
    with Calls(cfg, path) as s:
        history = s.keys.user("h", "u")
        replicated.replica.pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(ReplicationTimeout) as e:
                s.log_interaction("u", "i", 1.0, 1, "req-1")
            took = time.monotonic() - t0
            # applied on the primary, not on the (stopped) replica
            assert replicated.p.zrange(history, 0, -1) == ["i"]
        finally:
            replicated.replica.resume()
        assert e.value.confirmed == 0 and e.value.wanted == 1
        assert f"only 0 of 1 replicas confirmed it within {TIMEOUT_MS} ms" in str(e.value)
        assert "retrying with the same request_id is safe" in str(e.value)
        assert isinstance(e.value, StoreUnavailable)  # the servicer's UNAVAILABLE
        assert TIMEOUT_MS / 1000 * 0.9 <= took < TIMEOUT_MS / 1000 + 2.0  # WAIT's timeout
        _wait_link_up(replicated.r)
        first = s.log_interaction("u", "i", 1.0, 1, "req-1")  # the retry, same request id
        assert replicated.r.zrange(history, 0, -1) == ["i"]
        assert s.read("u").history == [("i", 1.0)]  # not summed twice
    events = _events(cfg)
    assert [(eid, f["type"]) for eid, f in events] == [(first, "interaction")]


@pytest.mark.parametrize("path", PATHS)
def test_a_replay_waits_for_the_original_write(replicated: Replicated, path: str) -> None:
    """A replay (same request id) applies nothing, yet its WAIT must cover the first write.
    Replayed while the replica is still stopped, from a connection that wrote before the first
    write (another worker's pooled one) or from a brand-new one, it times out too instead of
    acknowledging a write no replica has. (Redis 7.2+ and Valkey move a connection's WAIT
    offset only for commands that replicate, so a replay that wrote nothing would be
    acknowledged at once there; Redis <= 7.0 moves it for every command.)"""
    cfg = _cfg(replicated)
    with Calls(cfg, path) as s, Calls(cfg, path) as older:
        older.log_interaction("w", "i", 1.0, 1, "warm")  # its connection, acknowledged
        replicated.replica.pause()
        try:
            with pytest.raises(ReplicationTimeout):
                s.log_interaction("u", "i", 1.0, 1, "req-1")
            with pytest.raises(ReplicationTimeout):
                s.add_friendship("u", "v", 2, "f-1")
            with Calls(cfg, path) as new:
                for other in (older, new):
                    with pytest.raises(ReplicationTimeout):
                        other.log_interaction("u", "i", 1.0, 1, "req-1")
                    with pytest.raises(ReplicationTimeout):
                        other.add_friendship("u", "v", 2, "f-1")
            # the request key still expires when the first write said (the replay kept its TTL)
            key = schema.Keys(cfg.namespace).request("u", "req-1", "log")
            assert cfg.request_id_ttl_s - 60 < replicated.p.ttl(key) <= cfg.request_id_ttl_s
        finally:
            replicated.replica.resume()
        _wait_link_up(replicated.r)
        s.log_interaction("u", "i", 1.0, 1, "req-1")
    assert [f["type"] for _, f in _events(cfg)] == ["interaction", "interaction", "friend_add"]


def _offset(r: redis.Redis) -> int:
    return int(r.info("replication")["master_repl_offset"])


def test_replays_write_something_to_the_replication_stream(replicated: Replicated) -> None:
    """Whatever the server's WAIT rule: a replay (and a mirror step that finds its version
    applied) changes nothing, yet puts a write into the primary's replication stream after the
    original one, and its reply is the first call's."""
    cfg = _cfg(replicated, replicas=0)
    k = schema.Keys(cfg.namespace)
    with FeatureStore(cfg) as s:
        first = s.log_interaction("u", "i", 1.0, 1, "r1")
        before = _offset(replicated.p)
        assert s.log_interaction("u", "i", 1.0, 1, "r1") == first
        assert _offset(replicated.p) > before
        assert s.read("u").history == [("i", 1.0)]
    mirror = [k.user("f", "m"), k.user("ev", "m"), "o", 1, 1]
    assert replicated.p.eval(schema.MIRROR, 2, *mirror) == 1  # applied
    before = _offset(replicated.p)
    assert replicated.p.eval(schema.MIRROR, 2, *mirror) == 0  # already applied
    assert _offset(replicated.p) > before
    assert replicated.p.hgetall(k.user("ev", "m")) == {"o": "1"}
    assert replicated.p.smembers(k.user("f", "m")) == {"o"}


def test_more_replicas_than_there_are_times_out(replicated: Replicated) -> None:
    cfg = _cfg(replicated, replicas=2)
    with Calls(cfg, "async-resp") as s, pytest.raises(ReplicationTimeout) as e:
        s.log_interaction("u", "i", 1.0, 1, "r")
    assert e.value.confirmed == 1 and "only 1 of 2 replicas" in str(e.value)
    assert replicated.r.zrange(schema.Keys(cfg.namespace).user("h", "u"), 0, -1) == ["i"]


def test_refusals_and_no_script_cache_still_work(replicated: Replicated) -> None:
    """A script's own error is still its error (a blocked friendship), and a primary that lost
    its script cache gets the source (the script runs once, then WAIT)."""
    from socialrec.serving.store import WriteConflict

    cfg = _cfg(replicated)
    for path in PATHS:
        with Calls(replace(cfg, namespace=f"{cfg.namespace}-{path}"), path) as s:
            s.block("block", "a", "b", 1)
            with pytest.raises(WriteConflict):
                s.add_friendship("a", "b", 2)
            replicated.p.script_flush()
            s.log_interaction("u", "i", 1.0, 3)
            assert replicated.r.zrange(s.keys.user("h", "u"), 0, -1) == ["i"]


@pytest.mark.parametrize("client", ["resp", "redis-py"])
def test_reads_do_not_wait_behind_an_unconfirmed_write(paused: Replicated, client: str) -> None:
    """On one event loop, reads go on while a write waits for a replica that does not answer:
    the write's WAIT is on a connection of its own."""
    store = FeatureStore(replace(_cfg(paused), client=client))

    async def main() -> tuple[bool, BaseException | None]:
        await store.aread("u")  # the shared read connection exists before the write
        write = asyncio.ensure_future(store.alog_interaction("u", "i", 1.0, 1, "r"))
        await asyncio.sleep(0.05)  # the write is waiting in WAIT now
        for _ in range(5):
            await store.aread("u")
        done_before = write.done()
        err = None
        try:
            await write
        except ReplicationTimeout as e:
            err = e
        await store.aclose()
        return done_before, err

    try:
        write_done_before_reads, err = asyncio.run(main())
    finally:
        store.close()
    assert not write_done_before_reads and isinstance(err, ReplicationTimeout)


# ---- the servicer ----------------------------------------------------------------------------


def test_servicer_answers_unavailable_with_the_message(
    server_config, replicated: Replicated, inproc
) -> None:
    cfg = replace(
        server_config, redis_url=replicated.primary.url, ack_replicas=1, ack_timeout_ms=TIMEOUT_MS
    )
    s = inproc(cfg, metrics=True)
    req = pb.LogInteractionRequest(user_id="u", item_id="i", weight=1.0, request_id="svc-1")
    unavailable = s.count("LogInteraction", "UNAVAILABLE")
    replicated.replica.pause()
    try:
        with pytest.raises(grpc.RpcError) as e:
            s.stub.LogInteraction(req, metadata=AUTH, timeout=10)
    finally:
        replicated.replica.resume()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "only 0 of 1 replicas confirmed it" in e.value.details()
    assert "retrying with the same request_id is safe" in e.value.details()
    assert s.count("LogInteraction", "UNAVAILABLE") == unavailable + 1
    _wait_link_up(replicated.r)
    event_id = s.stub.LogInteraction(req, metadata=AUTH, timeout=10).event_id
    store_cfg = StoreConfig(url=replicated.primary.url, namespace=cfg.namespace)
    assert [eid for eid, _ in _events(store_cfg)] == [event_id]
    # reads are not acknowledged writes: answered while the replica is stopped
    replicated.replica.pause()
    try:
        r = s.stub.RecommendContent(pb.RecommendContentRequest(user_id="u", k=5), timeout=10)
    finally:
        replicated.replica.resume()
    assert not r.degraded and len(r.items) == 5
    _wait_link_up(replicated.r)


# ---- slow tier: a real server, and a Redis Cluster -------------------------------------------


@pytest.mark.slow
def test_served_write_is_unavailable_until_the_replica_answers(
    small_bundle, replicated: Replicated
) -> None:
    from socialrec.serving.harness import ServerProcess

    ns = f"srv-{uuid.uuid4().hex[:8]}"
    args = [
        "--bundle", str(small_bundle), "--redis-url", replicated.primary.url,
        "--namespace", ns, "--workers", "1",
        "--ack-replicas", "1", "--ack-timeout-ms", str(TIMEOUT_MS),
    ]  # fmt: skip
    req = pb.LogInteractionRequest(user_id="u", item_id="i", weight=1.0, request_id="srv-1")
    env = {"SOCIALREC_WRITE_TOKEN": TOKEN}
    with ServerProcess(args, env=env, ready_timeout_s=60) as srv, srv.channel() as ch:
        stub = pb_grpc.RecommenderStub(ch)
        replicated.replica.pause()
        try:
            with pytest.raises(grpc.RpcError) as e:
                stub.LogInteraction(req, metadata=AUTH, timeout=10)
        finally:
            replicated.replica.resume()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, srv.tail()
        assert "only 0 of 1 replicas confirmed it" in e.value.details()
        _wait_link_up(replicated.r)
        event_id = stub.LogInteraction(req, metadata=AUTH, timeout=10).event_id
    events = _events(StoreConfig(url=replicated.primary.url, namespace=ns))
    assert [eid for eid, _ in events] == [event_id]


def _cluster_writer(s: Calls):
    """The store's cluster client for acknowledged writes (made by its first one)."""
    return s.store._w if s._loop is None else s.store._client._w


@pytest.mark.slow
@pytest.mark.parametrize("path", ["blocking", "async-resp"])  # async: redis-py's cluster client
def test_cluster_acknowledged_writes(redis_cluster, path: str) -> None:
    from socialrec.serving.redis_local import _node_client

    c = redis_cluster
    cfg = StoreConfig(
        url=c.url, namespace=f"ackc-{uuid.uuid4().hex[:8]}", cluster=True,
        ack_replicas=1, ack_timeout_ms=TIMEOUT_MS,
    )  # fmt: skip
    owners: list = []
    try:
        with Calls(cfg, path) as s:
            key = s.keys.user("h", "u")
            primary = c.primary_for_key(key)
            (replica,) = c.replicas_of(primary)
            rc = _node_client(replica.port, timeout_s=5)
            owners.append(rc)
            rc.execute_command("READONLY")
            s.log_interaction("u", "i", 1.0, 1, "r1")
            assert rc.zrange(key, 0, -1) == ["i"]  # on the replica when the call returned

            # a stale slot table (the slot's owner moved): the script is answered MOVED and
            # runs on the right primary, and the WAIT follows it there
            w = _cluster_writer(s)
            other = next(n for n in w.get_primaries() if n.port != primary.port)
            w.nodes_manager.slots_cache[w.keyslot(key)] = [other]
            s.log_interaction("u", "j", 1.0, 2, "r2")
            assert rc.zrange(key, 0, -1) == ["i", "j"]

            replica.pause()
            try:
                with pytest.raises(ReplicationTimeout):
                    s.log_interaction("u", "k", 1.0, 3, "r3")
                # a replay on a fresh connection
                with Calls(cfg, path) as other_store, pytest.raises(ReplicationTimeout):
                    other_store.log_interaction("u", "k", 1.0, 3, "r3")
            finally:
                replica.resume()
            c.wait_ok(30)
            s.log_interaction("u", "k", 1.0, 3, "r3")
            assert rc.zrange(key, 0, -1) == ["i", "j", "k"]

            # a friendship in a cluster: the owner step, then the mirror step on the other
            # user's node. Its replica stopped: the mirror step times out; a replay (the
            # owner step replays, the mirror finds its version applied) must still wait.
            a, b = _users_on_two_primaries(c, s)
            mirror_primary = c.primary_for_key(s.keys.user("f", b))
            (mirror_replica,) = c.replicas_of(mirror_primary)
            mirror_replica.pause()
            try:
                with pytest.raises(ReplicationTimeout):
                    s.add_friendship(a, b, 4, "f1")
                with Calls(cfg, path) as other_store, pytest.raises(ReplicationTimeout):
                    other_store.add_friendship(a, b, 4, "f1")
            finally:
                mirror_replica.resume()
            c.wait_ok(30)
            s.add_friendship(a, b, 4, "f1")
            assert _read_once_available(s, b).friends == [a]
        events = [f["type"] for _, f in _events(cfg)]
        assert sorted(events) == ["friend_add"] + ["interaction"] * 3
    finally:
        for n in c.nodes:
            n.resume()
        for rc in owners:
            rc.close()
        c.wait_ok(30)


def _read_once_available(s: Calls, user: str, timeout_s: float = 10.0):
    """A friend read right after a replica resumed: its primary may still be busy syncing it
    and miss the store's 0.25 s connect timeout (StoreUnavailable, the documented transient
    answer); the read is retried until it answers, as a client would."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return s.read(user, True)
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _users_on_two_primaries(c, s: Calls) -> tuple[str, str]:
    """(a, b), a < b (a owns the edge), whose keys are on different primaries."""
    port = c.primary_for_key(s.keys.user("f", "a0")).port
    for i in range(1, 200):
        b = f"b{i}"
        if c.primary_for_key(s.keys.user("f", b)).port != port:
            return "a0", b
    raise AssertionError("no user on another primary")


@pytest.mark.slow
def test_cluster_write_and_wait_follow_a_migrating_slot(tmp_path) -> None:
    """A slot being migrated (ASK), then moved (MOVED): the script and its WAIT go together
    to the node that runs the script. The user's keys migrated to the importing node, whose
    replica is stopped: a replay (ASK; Redis runs a multi-key script in a migrating slot only
    when all its keys are there) times out, where a WAIT left on the migrating node would
    have acknowledged it. After the move, the store's stale layout is answered MOVED and the
    write lands, waited for, on the new owner. A cluster of its own: the test moves a slot."""
    from socialrec.serving.redis_local import _node_client, start_cluster

    try:
        c = start_cluster(dir=tmp_path)
    except RedisNotInstalled as e:
        pytest.skip(str(e))
    clients: list[redis.Redis] = []

    def client(node: RedisProcess) -> redis.Redis:
        clients.append(_node_client(node.port, timeout_s=5))
        return clients[-1]

    try:
        cfg = StoreConfig(url=c.url, namespace="t", cluster=True, ack_replicas=1)
        for path, user in (("blocking", "ask-blocking"), ("async-resp", "ask-async")):
            with Calls(replace(cfg, ack_timeout_ms=TIMEOUT_MS), path) as s:
                key = s.keys.user("h", user)
                source = c.primary_for_key(key)
                target = next(n for n in c.nodes if c.role(n) == "master" and n is not source)
                (target_replica,) = c.replicas_of(target)
                src, dst = client(source), client(target)
                slot = int(src.execute_command("CLUSTER KEYSLOT", key))
                first = s.log_interaction(user, "i", 1.0, 1, "r1")

                src_id = src.execute_command("CLUSTER MYID")
                dst_id = dst.execute_command("CLUSTER MYID")
                dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
                src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
                moving = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
                assert len(moving) >= 4  # h, w, s, the stream, the request key
                src.execute_command(
                    "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *moving
                )
                assert src.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0

                target_replica.pause()
                try:
                    with pytest.raises(ReplicationTimeout):
                        s.log_interaction(user, "i", 1.0, 1, "r1")  # ASK: runs on the target
                finally:
                    target_replica.resume()
                c.wait_ok(30)
                assert s.log_interaction(user, "i", 1.0, 1, "r1") == first

                others = [n for n in c.nodes if c.role(n) == "master" and n not in (source, target)]
                for n in (target, source, *others):
                    client(n).execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
                c.wait_ok(30)
                assert c.primary_for_key(key) is target
                s.log_interaction(user, "j", 1.0, 2, "r2")  # stale layout: MOVED, then target
                rc = client(target_replica)
                rc.execute_command("READONLY")
                # waited for on the new owner: its replica holds both (once the replica's own
                # view of the layout, learnt by gossip, names its primary as the slot's owner)
                assert _replica_read(rc, key) == ["i", "j"]
                assert s.read(user).history == [("j", 1.0), ("i", 1.0)]
            got = [eid for eid, f in _events(cfg) if f["user"] == user]
            assert got[0] == first and len(got) == 2
    finally:
        for n in c.nodes:
            n.resume()
        for r in clients:
            r.close()
        c.cleanup()


def _replica_read(rc: redis.Redis, key: str, within_s: float = 15.0) -> list:
    """ZRANGE of ``key`` on a replica, retried while the replica still answers MOVED (its
    layout lags its primary's by a gossip round after a slot moved)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return rc.zrange(key, 0, -1)
        except redis.exceptions.MovedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
