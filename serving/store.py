"""The online feature store: what a request reads and writes in Redis.

A single Redis (``StoreConfig.cluster`` False): a read is **one round trip**, one
``MULTI``/``EXEC`` of plain reads (history, weights, friends) plus, for friend answers, one
``EVALSHA`` of the friends-of-friends script. A write is one ``EVALSHA`` that updates the
features and appends its event to the stream atomically, so it is visible to the next read
from any worker or machine that uses the same Redis.

Redis Cluster (``cluster`` True, redis-py's cluster clients for everything): a read is one
pipelined exchange with the user's node (and the takedown version's node, at the same time),
not a transaction; a friend read adds a second exchange that reads the friends' friend sets
on their nodes, all nodes at once, and ranks friends-of-friends in Python. One-user writes are
the same atomic scripts; friendship and block writes are an owner step and a mirror step
(:mod:`socialrec.serving.schema`, "Cluster writes").

Acknowledged writes (``StoreConfig.ack_replicas`` N > 0): every script call of a write is
followed by ``WAIT N ack_timeout_ms`` on the same connection (WAIT counts only the calling
connection's own writes), sent pipelined with it on a connection used for writes only, so a
WAIT that waits for a slow replica never stalls the reads. Fewer than N replicas within the
timeout: :class:`ReplicationTimeout` (the write is applied on the primary but not
acknowledged; a retry with the same request id applies nothing twice and waits again, see
"Replays write" in :mod:`socialrec.serving.schema`).

Key layout and scripts: :mod:`socialrec.serving.schema`; bulk loads, flushes and the event
stream: :mod:`socialrec.serving.offline_store`.

Two APIs over the same commands:
- ``async`` methods for the server's event loop, over an asynchronous client chosen by
  :attr:`StoreConfig.client` (see :class:`AsyncClient`); no call blocks the loop.
- blocking methods (the same names without ``a``) over redis-py, for tools, tests and the naive peer.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlparse

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry
from socialrec.serving import schema
from socialrec.serving.schema import (
    MAX_TOTAL_WEIGHT,
    SHARDS,
    UserFeatures,
    check_id,
    check_request_id,
    check_ts,
    check_weight,
)

CLIENTS = ("resp", "redis-py")


class StoreUnavailable(RuntimeError):
    """Redis is down, timing out or refusing: reads should degrade, writes must fail loudly."""


class StoreDataError(StoreUnavailable):
    """Redis answered, but with an error about the data (a key of the wrong type, a value that
    does not parse): reads degrade for this request only; a write cannot be applied."""


class WriteConflict(Exception):
    """The store refused a write that conflicts with its state (a friendship under a block)."""


def _refusal(message: str) -> Exception:
    """The error an error reply of a write script stands for."""
    if message.startswith("BLOCKED"):
        return WriteConflict(message.removeprefix("BLOCKED").strip())
    return StoreDataError(f"redis: {message}")


class ConnectionLost(StoreUnavailable):
    """The connection failed before a reply: retried once at once (a restart closes sockets)."""


class TryAgain(StoreUnavailable):
    """A Redis Cluster slot is migrating and the command, which ran nowhere, should be sent
    again shortly (TRYAGAIN, or redis-py giving up on ASK and TRYAGAIN redirections)."""


class ReplicationTimeout(StoreUnavailable):
    """A write (one script call of it) was applied on the primary, but WAIT did not confirm it
    on ``wanted`` replicas within ``timeout_ms`` (``confirmed`` did; None: WAIT itself failed):
    the write is not acknowledged. A retry with the same request id applies nothing twice
    (the scripts replay) and waits for the replicas again."""

    def __init__(
        self, wanted: int, timeout_ms: int, confirmed: int | None = None, detail: str = ""
    ) -> None:
        self.wanted, self.timeout_ms, self.confirmed = wanted, timeout_ms, confirmed
        if confirmed is None:
            what = f"its replication to {wanted} replica(s) could not be confirmed ({detail})"
        else:
            what = f"only {confirmed} of {wanted} replicas confirmed it within {timeout_ms} ms"
        super().__init__(
            f"write applied on the primary, but {what}, so it is not acknowledged; "
            "retrying with the same request_id is safe (it is not applied twice)"
        )


def _acknowledged(cfg: StoreConfig, acks: Any) -> None:
    """ReplicationTimeout unless ``acks`` (WAIT's reply, or the error in its place) counts
    ``cfg.ack_replicas`` replicas."""
    n, t = cfg.ack_replicas, cfg.ack_timeout_ms
    if isinstance(acks, Exception):
        raise ReplicationTimeout(n, t, detail=f"WAIT: {acks}")
    try:
        got = int(acks)
    except (TypeError, ValueError):
        raise ReplicationTimeout(n, t, detail=f"WAIT answered {acks!r}") from None
    if got < n:
        raise ReplicationTimeout(n, t, confirmed=got)


@dataclass(frozen=True)
class StoreConfig:
    url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "socialrec"
    history_cap: int = 256  # items kept per user, most recent first
    fof_friends_cap: int = 100  # friends whose friend sets a fof read scans (first by id)
    fof_cap: int = 200  # fof candidates returned, highest mutual count first
    socket_timeout_s: float = 0.25  # connect and read timeout: how fast "Redis down" is noticed
    stream_maxlen: int | None = None  # approximate cap on the event stream (None: unbounded)
    health_check_interval_s: int = 30  # PING a pooled connection idle this long before use
    request_id_ttl_s: int = 3600  # idempotency window: a repeated request_id is a no-op this long
    # The server's asynchronous client: "resp" (socialrec.serving.resp, redis:// and unix://
    # only; other URLs use redis-py) or "redis-py" (redis.asyncio with hiredis).
    client: str = "resp"
    # Redis Cluster: ``url`` names any node (the others are discovered from it), and every
    # client is redis-py's cluster client (``client`` does not apply).
    cluster: bool = False
    # Durability: > 0 acknowledges a write only after WAIT confirms that many replicas of its
    # primary have it, waiting at most ack_timeout_ms (else ReplicationTimeout).
    ack_replicas: int = 0
    ack_timeout_ms: int = 500

    def __post_init__(self) -> None:
        if self.cluster:
            cluster_seeds(self.url)  # a bad host list fails here, at start, not per request
        if not isinstance(self.ack_replicas, int) or self.ack_replicas < 0:
            raise ValueError(f"ack_replicas must be an integer >= 0, got {self.ack_replicas!r}")
        if not isinstance(self.ack_timeout_ms, int) or self.ack_timeout_ms < 1:
            # WAIT with timeout 0 would block until the replicas answer, however long
            raise ValueError(f"ack_timeout_ms must be an integer >= 1, got {self.ack_timeout_ms!r}")

    @property
    def wait(self) -> tuple:
        """The WAIT command that follows each script call of an acknowledged write."""
        return ("WAIT", self.ack_replicas, self.ack_timeout_ms)

    @property
    def write_timeout_s(self) -> float:
        """The read timeout of the connections acknowledged writes use: a script call and a
        WAIT that may take ack_timeout_ms."""
        return self.socket_timeout_s + self.ack_timeout_ms / 1000


class AsyncClient(Protocol):
    """What the async request path needs from a single Redis's client (a cluster's,
    :class:`RedisPyClusterAsyncClient`, has ``pipeline`` in place of ``transaction``).

    Failures are raised as :class:`ConnectionLost` (the connection dropped) or
    :class:`StoreUnavailable` (timeout, error reply, anything else); nothing blocks the loop.
    """

    async def transaction(self, commands: list[tuple]) -> list: ...

    async def evalsha(self, sha: str, source: str, keys: list[str], args: list[Any]) -> Any: ...

    async def acked(self, sha: str, source: str, keys: list[str], args: list[Any]) -> tuple:
        """The script call and ``StoreConfig.wait`` pipelined on one connection used for
        writes only: (the script's reply, WAIT's reply or the error in its place). The
        script's own errors raise as for :meth:`evalsha`."""
        ...

    async def close(self) -> None: ...


class RedisPyAsyncClient:
    """redis.asyncio (hiredis parser) behind :class:`AsyncClient`; errors as StoreUnavailable."""

    def __init__(self, cfg: StoreConfig) -> None:
        # No retry inside redis-py: the store's one rule (_aretry) applies to every client.
        opts = {**_redis_py_options(cfg), "retry": Retry(NoBackoff(), 0)}
        self._r = redis.asyncio.Redis.from_url(cfg.url, **opts)
        self._cfg = cfg
        # Acknowledged writes: a pool of their own, with room for WAIT in the read timeout.
        self._w: redis.asyncio.Redis | None = None

    async def transaction(self, commands: list[tuple]) -> list:
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                for c in commands:
                    pipe.execute_command(*c)
                replies = await pipe.execute(raise_on_error=False)
        except redis.exceptions.RedisError as e:
            raise _store_error(e) from e
        return replies

    async def evalsha(self, sha: str, source: str, keys: list[str], args: list[Any]) -> Any:
        try:
            try:
                return await self._r.evalsha(sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                return await self._r.eval(source, len(keys), *keys, *args)
        except redis.exceptions.ResponseError as e:
            raise _refusal(str(e)) from e
        except redis.exceptions.RedisError as e:
            raise _store_error(e) from e

    async def acked(self, sha: str, source: str, keys: list[str], args: list[Any]) -> tuple:
        if self._w is None:
            opts = {**_ack_options(self._cfg), "retry": Retry(NoBackoff(), 0)}
            self._w = redis.asyncio.Redis.from_url(self._cfg.url, **opts)
        try:
            for script in (("EVALSHA", sha), ("EVAL", source)):
                # a pipeline holds one pooled connection: the WAIT counts this script's write
                async with self._w.pipeline(transaction=False) as pipe:
                    pipe.execute_command(*script, len(keys), *keys, *args)
                    pipe.execute_command(*self._cfg.wait)
                    reply, acks = await pipe.execute(raise_on_error=False)
                if not _noscript(reply):
                    break
        except redis.exceptions.RedisError as e:
            raise _store_error(e) from e
        if isinstance(reply, Exception):
            raise _refusal(str(reply))
        return reply, acks

    async def close(self) -> None:
        await self._r.aclose()
        if self._w is not None:
            await self._w.aclose()


# Idle write connections a "resp" client keeps for acknowledged writes (more are opened while
# more acknowledged writes are in flight; each holds its connection until its WAIT answers).
MAX_IDLE_WRITERS = 16


class RespAsyncClient:
    """:mod:`socialrec.serving.resp`'s pipelined connection behind :class:`AsyncClient`."""

    def __init__(self, cfg: StoreConfig) -> None:
        from socialrec.serving import resp

        self._resp = resp
        self._conn = resp.AsyncRespConnection(cfg.url, timeout_s=cfg.socket_timeout_s)
        self._cfg = cfg
        # Acknowledged writes never use the shared connection: a WAIT blocks its connection
        # (every command queued behind it) for up to ack_timeout_ms. Each write takes an idle
        # connection of its own for its script call and WAIT.
        self._writers: list = []

    async def transaction(self, commands: list[tuple]) -> list:
        return await self._guard(self._conn.transaction(commands))

    async def evalsha(self, sha: str, source: str, keys: list[str], args: list[Any]) -> Any:
        return await self._guard(self._conn.evalsha(sha, source, keys, args))

    async def acked(self, sha: str, source: str, keys: list[str], args: list[Any]) -> tuple:
        cfg = self._cfg
        if self._writers:
            conn = self._writers.pop()
        else:
            conn = self._resp.AsyncRespConnection(cfg.url, timeout_s=cfg.write_timeout_s)
        try:
            script = ("EVALSHA", sha, len(keys), *keys, *args)
            reply, acks = await self._guard(conn.pipeline([script, cfg.wait]))
            if _noscript(reply):  # nothing was run: send the source
                script = ("EVAL", source, len(keys), *keys, *args)
                reply, acks = await self._guard(conn.pipeline([script, cfg.wait]))
        finally:
            if len(self._writers) < MAX_IDLE_WRITERS:
                self._writers.append(conn)
            else:
                conn.close()
        if isinstance(reply, ConnectionError):  # before the script's reply: maybe never sent
            raise ConnectionLost(f"redis: {reply}")
        if isinstance(reply, (TimeoutError, OSError)):
            raise StoreUnavailable(f"redis: {reply}")
        if isinstance(reply, Exception):  # an error reply
            raise _refusal(str(reply))
        return reply, acks

    async def _guard(self, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except ConnectionError as e:
            raise ConnectionLost(f"redis: {e}") from e
        except self._resp.RespError as e:
            raise _refusal(str(e)) from e
        except (TimeoutError, OSError) as e:
            raise StoreUnavailable(f"redis: {e}") from e

    async def close(self) -> None:
        self._conn.close()
        for conn in self._writers:
            conn.close()
        self._writers.clear()


class RedisPyClusterAsyncClient:
    """redis.asyncio's cluster client: :meth:`pipeline` (no transaction: a cluster pipeline
    sends each node its commands, all nodes at once) and :meth:`evalsha` (all keys in one
    slot). redis-py follows MOVED/ASK and refreshes the cluster's layout after a failed node.
    """

    def __init__(self, cfg: StoreConfig) -> None:
        self._r = cluster_client(cfg, _cluster_options(cfg), aio=True)
        self._cfg = cfg
        # Acknowledged writes: a cluster client of their own (room for WAIT in the read
        # timeout); _refresh: re-read the layout before the next one (a node failed). The
        # layout is re-read with NodesManager.initialize(), which keeps the known nodes'
        # connection pools (aclose() would cut the connections of writes in flight).
        self._w: redis.asyncio.cluster.RedisCluster | None = None
        self._refresh = False
        # The read client's layout is re-read the same way before its next call after a node
        # could not answer: a cluster pipeline returns a dead node's connection error as a
        # reply and redis-py then keeps its old slot map, so reads would keep going to a
        # failed primary's address after its replica took over.
        self._read_refresh = False

    async def _fresh_layout(self) -> None:
        self._read_refresh = False  # one refresh, whatever else is in flight
        await self._r.nodes_manager.initialize()

    def _failed(self, e: Exception) -> StoreUnavailable:
        self._read_refresh = True
        return _store_error(e)

    async def pipeline(self, commands: list[tuple]) -> list:
        """The replies, errors about data (WRONGTYPE) as values; StoreUnavailable if a node
        can't answer (and the layout is re-read before the next call)."""
        try:
            if self._read_refresh:  # no coroutine per call on the read path
                await self._fresh_layout()
            pipe = self._r.pipeline(transaction=False)
            for c in commands:
                pipe.execute_command(*c)
            return _unavailable_replies(await pipe.execute(raise_on_error=False))
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as e:
            raise self._failed(e) from e
        except StoreUnavailable:
            self._read_refresh = True
            raise

    async def evalsha(self, sha: str, source: str, keys: list[str], args: list[Any]) -> Any:
        try:
            if self._read_refresh:  # no coroutine per call on the read path
                await self._fresh_layout()
            try:
                return await self._r.evalsha(sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:  # a new node (or a promoted replica)
                return await self._r.eval(source, len(keys), *keys, *args)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as e:
            raise (self._failed(e) if _unavailable(e) else _refusal(str(e))) from e

    async def acked(self, sha: str, source: str, keys: list[str], args: list[Any]) -> tuple:
        """The script call and WAIT as one cluster pipeline whose commands all name the node
        that owns the keys' slot (``target_nodes``): redis-py sends one node's commands on one
        connection, in order. Redirections are not followed command by command
        (``allow_redirections=False``: a MOVED script would run elsewhere while the WAIT
        stayed here); a MOVED or ASK reply means the script did not run, and the pair is sent
        again to the node named."""
        if self._w is None:
            self._w = cluster_client(self._cfg, _cluster_ack_options(self._cfg), aio=True)
        w = self._w
        try:
            await w.initialize()  # the first time only
            if self._refresh:
                self._refresh = False
                await w.nodes_manager.initialize()
            node, asking = w.get_node_from_key(keys[0]), False
            script = ("EVALSHA", sha)
            for _ in range(_REDIRECTS):
                pipe = w.pipeline(transaction=False)
                if asking:
                    pipe.execute_command("ASKING", target_nodes=node)
                pipe.execute_command(*script, len(keys), *keys, *args, target_nodes=node)
                pipe.execute_command(*self._cfg.wait, target_nodes=node)
                replies = await pipe.execute(raise_on_error=False, allow_redirections=False)
                reply, acks = replies[-2:]
                if isinstance(reply, redis.exceptions.MovedError):  # the layout changed
                    await w.nodes_manager.initialize()
                    node, asking = w.get_node_from_key(keys[0]), False
                elif isinstance(reply, redis.exceptions.AskError):  # the slot is migrating
                    node, asking = _ask_node(w, reply), True
                elif _noscript(reply):  # the same node again (with ASKING if it was asked)
                    script = ("EVAL", source)
                else:
                    break
            else:
                raise StoreUnavailable(f"redis: still redirected after {_REDIRECTS} tries")
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as e:
            if _unavailable(e):
                self._refresh = True
                raise _store_error(e) from e
            raise _refusal(str(e)) from e
        return self._script_reply(reply), acks

    def _script_reply(self, reply: Any) -> Any:
        if isinstance(reply, Exception):
            if _unavailable(reply):
                self._refresh = True
                raise _store_error(reply)
            raise _refusal(str(reply))
        return reply

    async def close(self) -> None:
        await self._r.aclose()
        if self._w is not None:
            await self._w.aclose()


_REDIRECTS = 5  # acknowledged cluster writes: MOVED/ASK/NOSCRIPT replies followed at most


def _ask_node(client: Any, e: redis.exceptions.AskError) -> Any:
    """The node an ASK reply names (a node of the layout: the slot's importing primary)."""
    node = client.get_node(host=e.host, port=e.port)
    if node is None:
        raise StoreUnavailable(f"redis: ASK to unknown node {e.host}:{e.port}")
    return node


def async_client(cfg: StoreConfig) -> AsyncClient | RedisPyClusterAsyncClient:
    """The configured client; "resp" falls back to redis-py for URLs it does not speak; a
    cluster always gets redis-py's cluster client."""
    if cfg.client not in CLIENTS:
        raise ValueError(f"client must be one of {CLIENTS}, got {cfg.client!r}")
    if cfg.cluster:
        return RedisPyClusterAsyncClient(cfg)
    if cfg.client == "resp" and urlparse(cfg.url).scheme in ("redis", "unix"):
        return RespAsyncClient(cfg)
    return RedisPyAsyncClient(cfg)


def _redis_py_options(cfg: StoreConfig) -> dict[str, Any]:
    # One immediate retry on connection errors only: it heals a pooled connection that a
    # Redis restart closed (the command never reached Redis, so a write is not doubled).
    # No retry on timeouts: a timed-out write may have been applied.
    return {
        "socket_timeout": cfg.socket_timeout_s,
        "socket_connect_timeout": cfg.socket_timeout_s,
        "decode_responses": True,
        "health_check_interval": cfg.health_check_interval_s,
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
    }


# redis-py's cluster clients retry a command after a connection error *or a timeout* (it
# cannot be limited to connection errors), refreshing the cluster's layout in between; no
# retry inside them, so a timed-out write is not sent twice. The store's own one retry
# after a lost connection (_aretry, _retry) runs on the refreshed layout.
CLUSTER_RETRIES = 0


def _cluster_options(cfg: StoreConfig) -> dict[str, Any]:
    return {**_redis_py_options(cfg), "retry": Retry(NoBackoff(), CLUSTER_RETRIES)}


def _ack_options(cfg: StoreConfig) -> dict[str, Any]:
    """Single Redis, acknowledged writes: the store's options with room for WAIT in the read
    timeout (connecting still times out after socket_timeout_s)."""
    return {**_redis_py_options(cfg), "socket_timeout": cfg.write_timeout_s}


def _cluster_ack_options(cfg: StoreConfig) -> dict[str, Any]:
    return {**_cluster_options(cfg), "socket_timeout": cfg.write_timeout_s}


_MULTI_HOST = re.compile(
    r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?)(?P<hosts>[^/?#]*)(?P<tail>.*)$"
)


def cluster_seeds(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A Redis Cluster URL's first node as a URL of its own (scheme, credentials, path and
    options kept) and the other seed nodes its host list names, as (host, port):
    ``redis://:pw@h1:7000,h2:7001,h3:7002/0?opt=1``. The client starts from whichever seed
    answers and re-reads the layout from any known node, so one seed being down stops
    neither a start nor a failover's recovery; every node gets the URL's credentials and
    options. ValueError (naming no credentials) for a host list with an empty or bad entry."""
    m = _MULTI_HOST.match(url.strip())
    if m is None:
        raise ValueError(f"redis url {redact(url)!r} is not scheme://[user:password@]host:port")
    hosts = [h.strip() for h in m["hosts"].split(",")]
    seeds = []
    for h in hosts:
        u = urlparse("redis://" + h)
        try:
            port = u.port or 6379
        except ValueError:
            port = None
        if not h or not u.hostname or port is None or u.username or u.path:
            raise ValueError(f"redis url {redact(url)!r}: bad host {h!r} in its host list")
        seeds.append((u.hostname, port))
    return m["head"] + hosts[0] + m["tail"], seeds[1:]


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and logs)."""
    return re.sub(r"(://[^:@/]*:)[^@/]*@", r"\1***@", url)


def cluster_client(cfg: StoreConfig, options: dict[str, Any], aio: bool = False) -> Any:
    """redis-py's cluster client (blocking, or redis.asyncio's with ``aio``) over every seed
    ``cfg.url`` names (:func:`cluster_seeds`)."""
    module = redis.asyncio.cluster if aio else redis.cluster
    first, seeds = cluster_seeds(cfg.url)
    nodes = [module.ClusterNode(host, port) for host, port in seeds]
    return module.RedisCluster.from_url(first, startup_nodes=nodes, **options)


def redis_py(cfg: StoreConfig) -> redis.Redis | redis.cluster.RedisCluster:
    """A blocking redis-py client with the store's timeouts and retry rule (the cluster
    client when ``cfg.cluster``)."""
    if cfg.cluster:
        return cluster_client(cfg, _cluster_options(cfg))
    return redis.Redis.from_url(cfg.url, **_redis_py_options(cfg))


def _noscript(reply: object) -> bool:
    """Redis has not cached the script (redis-py's NoScriptError, or resp's raw error)."""
    return isinstance(reply, redis.exceptions.NoScriptError) or (
        isinstance(reply, Exception) and str(reply).startswith("NOSCRIPT")
    )


# Errors about the cluster, not the data (some are ResponseErrors in redis-py): CLUSTERDOWN,
# TRYAGAIN, a redirection that could not be followed, a slot no node serves.
_CLUSTER_ERRORS = (
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.AskError,
    redis.exceptions.RedisClusterException,
)


def _unavailable(e: Exception) -> bool:
    """True for an error that says Redis could not answer (not one about the data)."""
    return isinstance(e, _CLUSTER_ERRORS) or not isinstance(e, redis.exceptions.ResponseError)


def _unavailable_replies(replies: list) -> list:
    """``replies``, or ConnectionLost / StoreUnavailable if one of them says a node could not
    answer (a cluster pipeline returns those as values too)."""
    for r in replies:
        if isinstance(r, Exception) and _unavailable(r):
            raise _store_error(r)
    return replies


def _data_errors(replies: list) -> None:
    """StoreDataError if a reply is an error (e.g. WRONGTYPE: a key written by something else)."""
    for r in replies:
        if isinstance(r, Exception):
            raise StoreDataError(f"redis: {r}")


def _join_blocks(replies: list) -> list:
    """A cluster friend read's replies with its two block sets (the last two) as one list,
    as the single-Redis read's SUNION returns them."""
    *head, blocks, blocked_by = replies
    return [*head, list({*blocks, *blocked_by})]


def features(replies: list, friends: bool) -> UserFeatures:
    """Parsed features of a read transaction's replies; StoreDataError if any reply is an error
    (e.g. WRONGTYPE: a key written by something else) or a value does not parse."""
    _data_errors(replies)
    try:
        return schema.parse_features(replies, friends)
    except (TypeError, ValueError, IndexError) as e:
        raise StoreDataError(f"redis: unreadable features ({e})") from e


def _store_error(e: Exception) -> StoreUnavailable:
    if isinstance(e, redis.exceptions.ConnectionError) and not isinstance(
        e, redis.exceptions.TimeoutError
    ):
        return ConnectionLost(f"redis: {e}")
    if isinstance(e, redis.exceptions.TryAgainError) or "TTL exhausted" in str(e):
        return TryAgain(f"redis: {e}")
    return StoreUnavailable(f"redis: {e}")


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _sha1(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


@dataclass(frozen=True)
class Step:
    """One script call of a write: all of ``keys`` are in one slot."""

    script: str
    keys: list[str]
    args: list[Any]


# A write: validates its arguments before the first step, yields the script calls one at a
# time (each gets the reply of the one before) and returns the event id.
Plan = Generator[Step, Any, str]


def _owner_reply(reply: str) -> tuple[str, str, str]:
    """(stream id or '-', version, present) of an EDGE or BLOCK_SET reply."""
    sid, version, present = str(reply).split(" ")
    return sid, version, present


class FeatureStore:
    """A user's features and the writes that change them; safe to use after fork.

    The ``async`` methods belong to one event loop (the server's worker); the blocking
    methods are thread-safe (a redis-py connection pool).
    """

    def __init__(self, cfg: StoreConfig) -> None:
        self.cfg = cfg
        self.keys = schema.Keys(cfg.namespace)
        # The blocking client, made at first use: a cluster client connects when it is made,
        # and a server must start (and answer degraded) while its Redis is down.
        self._sync: redis.Redis | redis.cluster.RedisCluster | None = None
        self._sync_lock = threading.Lock()
        # Acknowledged writes: a client of their own, its read timeout long enough for WAIT
        # (made at first use, like the blocking client).
        self._w: redis.Redis | redis.cluster.RedisCluster | None = None
        self._refresh = False  # cluster, acknowledged writes: re-read the layout first
        self._read_refresh = False  # cluster, blocking pipelines: likewise (see _pipeline)
        self._client: AsyncClient | RedisPyClusterAsyncClient | None = None  # per event loop
        scripts = (schema.FOF, schema.LOG, schema.FRIEND, schema.DISMISS, schema.BLOCK)
        scripts += (schema.ITEM, schema.EDGE, schema.BLOCK_SET, schema.MIRROR)
        scripts += (schema.FRESH_RECORD, schema.FRESH_PUBLISH, schema.FRESH_RETIRE)
        self._sha = {s: _sha1(s) for s in scripts}

    @property
    def _r(self) -> redis.Redis | redis.cluster.RedisCluster:
        if self._sync is None:
            with self._sync_lock:  # the blocking API is used from many threads
                if self._sync is None:
                    try:
                        self._sync = redis_py(self.cfg)
                    except (
                        redis.exceptions.RedisError,
                        redis.exceptions.RedisClusterException,
                    ) as e:
                        raise _store_error(e) from e
        return self._sync

    # ---- commands (pure: what to send) -------------------------------------------------------
    def read_commands(self, user_id: str, with_fof: bool) -> list[tuple]:
        """The read of a content read, or of a friend read (``with_fof``).

        Both: history (newest first), weights, friends. Content: seen items, dismissed items,
        the takedown set's version. Friends: dismissed users, blocked users (both
        directions), and on a single Redis friends-of-friends (one EVALSHA, always last; a
        cluster reads them in a second exchange, see :meth:`fof_commands`). Plain commands
        where they suffice: returning a long history through Lua costs Redis about five
        times the CPU.
        """
        cfg, k = self.cfg, self.keys
        user = check_id("user_id", user_id)
        if with_fof:
            h, w, f, b, bb, du = k.user_keys(user, "h", "w", "f", "b", "bb", "du")
        else:
            h, w, f, s, d = k.user_keys(user, "h", "w", "f", "s", "d")
        cmds: list[tuple] = [("ZREVRANGE", h, 0, cfg.history_cap - 1), ("HGETALL", w),
                             ("SMEMBERS", f)]  # fmt: skip
        if with_fof and cfg.cluster:
            # The two block sets read apart (joined by _join_blocks): while a slot migrates,
            # a command naming both is refused whenever only one of them has moved.
            cmds += [("SMEMBERS", du), ("SMEMBERS", b), ("SMEMBERS", bb)]
        elif with_fof:
            cmds += [("SMEMBERS", du), ("SUNION", b, bb)]
            fof_args = (cfg.fof_friends_cap, cfg.fof_cap, k.prefix, user, SHARDS)
            cmds.append(("EVALSHA", self._sha[schema.FOF], 4, f, b, bb, du, *fof_args))
        else:
            cmds += [("SMEMBERS", s), ("SMEMBERS", d), ("GET", k.removed_version)]
        return cmds

    def fof_commands(self, user_id: str, replies: list) -> tuple[list[str], set[str], list]:
        """Cluster friend reads: (friends to scan, excluded users, their SMEMBERS commands)
        from the first exchange's replies (friends, dismissed users, blocked either way)."""
        user = check_id("user_id", user_id)
        excluded = set(replies[3]) | set(replies[4])
        scan = schema.fof_scan(user, replies[2], excluded, self.cfg.fof_friends_cap)
        return scan, excluded, [("SMEMBERS", self.keys.user("f", f)) for f in scan]

    def _fof_features(self, user: str, replies: list, excluded: set, sets: list) -> UserFeatures:
        _data_errors(sets)
        fof = schema.rank_fof(user, replies[2], excluded, sets, self.cfg.fof_cap)
        return features([*replies, fof], True)

    def log_plan(
        self,
        user_id: str,
        item_id: str,
        weight: float,
        ts_ms: int,
        request_id: str = "",
        now_ms: int | None = None,
    ) -> Plan:
        """Record one interaction and its event; ValueError if a field is out of bounds (see
        :mod:`socialrec.serving.schema`).

        ``ts_ms`` is taken as given (the server turns the proto's 0 = "now" into a time first)
        and may be at most a day ahead of ``now_ms`` when that is given.
        """
        user, item = check_id("user_id", user_id), check_id("item_id", item_id)
        rid, k = check_request_id(request_id), self.keys
        args = [
            user,
            item,
            repr(check_weight(weight)),
            check_ts(ts_ms, now_ms),
            self.cfg.history_cap,
            self.cfg.stream_maxlen or 0,
            self.cfg.request_id_ttl_s,
            repr(MAX_TOTAL_WEIGHT),
        ]
        shard = schema.shard_of(user)
        keys = [k.user("h", user), k.user("w", user), k.stream(shard), k.request(user, rid, "log")]
        sid = yield Step(schema.LOG, [*keys, k.user("s", user)], args)
        return schema.event_id(sid, shard)

    def friend_plan(self, op: str, a: str, b: str, ts_ms: int, request_id: str = "") -> Plan:
        """Add or remove the undirected edge {a, b} and log it (in the edge owner's shard)."""
        a, b = check_id("user_id", a), check_id("friend_id", b)
        if a == b:
            raise ValueError(f"a user can't befriend themselves: {a!r}")
        rid, k, ts = check_request_id(request_id), self.keys, check_ts(ts_ms)
        maxlen, ttl = self.cfg.stream_maxlen or 0, self.cfg.request_id_ttl_s
        o, m = schema.edge_owner(a, b)
        so = schema.shard_of(o)
        if not self.cfg.cluster:
            keys = [
                k.user("f", a),
                k.user("f", b),
                k.stream(so),
                k.request(a, rid, f"friend_{op}", so),
            ]
            keys += [k.user("b", a), k.user("b", b)]
            sid = yield Step(schema.FRIEND, keys, [a, b, ts, maxlen, op, ttl])
            return schema.event_id(sid, so)
        sid = yield from self._edge(op, a, b, ts, k.request(a, rid, f"friend_{op}", so), "always")
        return schema.event_id(sid, so)

    def _edge(self, op: str, a: str, b: str, ts: str, request_key: str, log: str) -> Plan:
        """Cluster: the owner step then the mirror step of an edge change; the stream id."""
        k, maxlen, ttl = self.keys, self.cfg.stream_maxlen or 0, self.cfg.request_id_ttl_s
        o, m = schema.edge_owner(a, b)
        keys = [k.user("f", o), k.user("b", o), k.user("bb", o), k.user("ev", o)]
        keys += [k.stream(schema.shard_of(o)), request_key]
        reply = yield Step(schema.EDGE, keys, [m, op, ts, maxlen, ttl, a, b, log])
        sid, version, present = _owner_reply(reply)
        yield Step(schema.MIRROR, [k.user("f", m), k.user("ev", m)], [o, version, present])
        return sid

    def dismiss_plan(
        self, user_id: str, item_id: str, other_user_id: str, ts_ms: int, request_id: str = ""
    ) -> Plan:
        """Record that the user dismissed an item or a person."""
        user = check_id("user_id", user_id)
        if bool(item_id) == bool(other_user_id):
            raise ValueError("exactly one of item_id and other_user_id must be set")
        kind, target = ("item", item_id) if item_id else ("user", other_user_id)
        target = check_id("item_id" if item_id else "other_user_id", target)
        if kind == "user" and target == user:
            raise ValueError("other_user_id must differ from user_id")
        rid, k, shard = check_request_id(request_id), self.keys, schema.shard_of(user)
        key = k.user("d" if kind == "item" else "du", user)
        args = [user, target, kind, check_ts(ts_ms), self.cfg.stream_maxlen or 0]
        keys = [key, k.stream(shard), k.request(user, rid, "dismiss")]
        sid = yield Step(schema.DISMISS, keys, [*args, self.cfg.request_id_ttl_s])
        return schema.event_id(sid, shard)

    def block_plan(
        self, op: str, user_id: str, blocked_id: str, ts_ms: int, request_id: str = ""
    ) -> Plan:
        """``op`` block or unblock of ``blocked_id`` by ``user_id``; a block also removes the
        friendship (its friend_remove event in the edge owner's shard)."""
        a, b = check_id("user_id", user_id), check_id("blocked_id", blocked_id)
        if a == b:
            raise ValueError("blocked_id must differ from user_id")
        rid, k, ts = check_request_id(request_id), self.keys, check_ts(ts_ms)
        maxlen, ttl = self.cfg.stream_maxlen or 0, self.cfg.request_id_ttl_s
        sa, so = schema.shard_of(a), schema.shard_of(schema.edge_owner(a, b)[0])
        if not self.cfg.cluster:
            keys = [k.user("b", a), k.user("bb", b), k.user("f", a), k.user("f", b)]
            keys += [k.stream(sa), k.request(a, rid, op), k.stream(so)]
            sid = yield Step(schema.BLOCK, keys, [a, b, op, ts, maxlen, ttl])
            return schema.event_id(sid, sa)
        keys = [k.user("b", a), k.user("bv", a), k.stream(sa), k.request(a, rid, op)]
        reply = yield Step(schema.BLOCK_SET, keys, [b, op, ts, maxlen, ttl, a])
        sid, version, present = _owner_reply(reply)
        yield Step(schema.MIRROR, [k.user("bb", b), k.user("bbv", b)], [a, version, present])
        if op == "block":  # the unfriend part has its own request-id key (kind "ru")
            yield from self._edge("remove", a, b, ts, k.request(a, rid, op, so, "ru"), "changed")
        return schema.event_id(sid, sa)

    def item_plan(self, op: str, item_id: str, ts_ms: int, request_id: str = "") -> Plan:
        """Take an item down (``op`` remove) or restore it."""
        item, rid, k = check_id("item_id", item_id), check_request_id(request_id), self.keys
        g = schema.GLOBAL_SHARD
        keys = [k.removed, k.removed_version, k.stream(g), k.request("", rid, f"item_{op}", g)]
        args = [item, op, check_ts(ts_ms), self.cfg.stream_maxlen or 0, self.cfg.request_id_ttl_s]
        sid = yield Step(schema.ITEM, keys, args)
        return schema.event_id(sid, g)

    # ---- async (the server) ------------------------------------------------------------------
    def _aclient(self) -> Any:
        if self._client is None:
            self._client = async_client(self.cfg)
        return self._client

    async def aread(self, user_id: str, with_fof: bool = False) -> UserFeatures:
        """History, friends and (if asked) friends-of-friends of one user: one round trip on a
        single Redis, two for a friend read in a cluster.

        An unknown user gets empty features. Raises StoreUnavailable when Redis can't answer
        within the socket timeout.
        """
        cmds = self.read_commands(user_id, with_fof)
        client = self._aclient()
        if self.cfg.cluster:
            replies = await _aretry(lambda: client.pipeline(cmds))
            if not with_fof:
                return features(replies, False)
            _data_errors(replies)  # before the second exchange
            replies = _join_blocks(replies)
            scan, excluded, fof_cmds = self.fof_commands(user_id, replies)
            sets = await _aretry(lambda: client.pipeline(fof_cmds)) if fof_cmds else []
            return self._fof_features(check_id("user_id", user_id), replies, excluded, sets)
        replies = await _aretry(lambda: client.transaction(cmds))
        if with_fof and _noscript(replies[-1]):  # Redis lost its script cache: send the source
            cmds[-1] = ("EVAL", schema.FOF, *cmds[-1][2:])
            replies = await _aretry(lambda: client.transaction(cmds))
        return features(replies, with_fof)

    async def aremoved(self) -> tuple[int, frozenset[str]]:
        """The takedown set and its version, read together (one MULTI/EXEC; a pipeline to
        their node in a cluster)."""
        k, client = self.keys, self._aclient()
        cmds = [("GET", k.removed_version), ("SMEMBERS", k.removed)]
        batch = client.pipeline if self.cfg.cluster else client.transaction
        replies = await _aretry(lambda: batch(cmds))
        _data_errors(replies)
        version, items = replies
        return int(version or 0), frozenset(items)

    # ---- fresh items (best effort: no WAIT; see docs/design.md "Fresh items: serving") -------
    async def _ascript(self, script: str, keys: list[str], args: list[Any]) -> Any:
        client = self._aclient()
        sha = self._sha[script]
        return await _aretry(lambda: client.evalsha(sha, script, keys, args))

    async def afresh_record(
        self, item_id: str, user_id: str, ts_ms: int, entry: str, max_users: int
    ) -> tuple[int, list[tuple[str, str]]]:
        """Record (overwrite) one user's entry for a fresh item, keep the ``max_users`` most
        recent: (the item's record sequence number, [(user, entry), ...] oldest first)."""
        item, user, k = check_id("item_id", item_id), check_id("user_id", user_id), self.keys
        keys = [k.item("fu", item), k.item("fv", item), k.item("fn", item)]
        reply = await self._ascript(schema.FRESH_RECORD, keys, [user, int(ts_ms), entry, max_users])
        seq, rest = int(reply[0]), [_text(x) for x in reply[1:]]
        return seq, list(zip(rest[::2], rest[1::2], strict=True))

    async def afresh_publish(self, item_id: str, seq: int, entry: str) -> int:
        """Set a fresh item's registry entry if ``seq`` is newer than the one it holds: the
        registry's new version, or 0 when a newer entry was already there."""
        k = self.keys
        value = f"{int(seq)}|{entry}"
        keys = [k.fresh, k.fresh_version]
        return int(await self._ascript(schema.FRESH_PUBLISH, keys, [item_id, int(seq), value]))

    async def afresh_retire(self, item_id: str, entry: str, keep_s: int) -> int:
        """Remove a fresh item's registry entry if it still is ``entry`` (FRESH_RETIRE), and let
        the item's own keys expire after ``keep_s`` (kept so that a rollback to a bundle that
        did not know the item folds it in again from its users at its next interaction). The
        registry's new version, or 0 when the entry had changed (nothing removed)."""
        k = self.keys
        item = check_id("item_id", item_id)
        v = int(await self._ascript(schema.FRESH_RETIRE, [k.fresh, k.fresh_version], [item, entry]))
        if v:
            keys = [k.item(kind, item) for kind in ("fu", "fv", "fn")]
            await self._aglobal([("EXPIRE", key, int(keep_s)) for key in keys])  # one slot
        return v

    async def afresh_lease(self, owner: str, ttl_s: int) -> bool:
        """Take the registry's tidying lease for ``ttl_s`` (SET NX EX): True for the one worker
        that got it. Tidying is idempotent, so the lease only keeps workers from repeating it."""
        cmd = ("SET", self.keys.fresh_lease, owner, "NX", "EX", max(1, int(ttl_s)))
        (got,) = await self._aglobal([cmd])
        return got is not None and got is not False

    async def afresh_entries(self, item_id: str) -> list[tuple[str, str]]:
        """A fresh item's recorded users and their entries, oldest first (read only)."""
        k, item = self.keys, check_id("item_id", item_id)
        users, entries = await self._aglobal(
            [("ZRANGE", k.item("fu", item), 0, -1), ("HGETALL", k.item("fv", item))]
        )
        pairs = (
            entries
            if isinstance(entries, dict)
            else dict(zip(entries[::2], entries[1::2], strict=True))
        )
        got = {_text(u): _text(e) for u, e in pairs.items()}
        return [(u, got[u]) for u in (_text(x) for x in users) if u in got]

    async def _aglobal(self, cmds: list[tuple]) -> list:
        client = self._aclient()
        batch = client.pipeline if self.cfg.cluster else client.transaction
        replies = await _aretry(lambda: batch(cmds))
        _data_errors(replies)
        return replies

    async def afresh_versions(self) -> tuple[int, int]:
        """(fresh registry version, takedown version): one exchange with the {g} slot."""
        k = self.keys
        v, r = await self._aglobal([("GET", k.fresh_version), ("GET", k.removed_version)])
        return int(v or 0), int(r or 0)

    async def afresh_registry(self) -> tuple[int, int, dict[str, str], frozenset[str]]:
        """(registry version, takedown version, item -> entry JSON, taken-down items), read
        together (one MULTI/EXEC; one pipeline to the {g} slot's node in a cluster)."""
        k = self.keys
        cmds = [
            ("GET", k.fresh_version),
            ("GET", k.removed_version),
            ("HGETALL", k.fresh),
            ("SMEMBERS", k.removed),
        ]
        v, r, reg, removed = await self._aglobal(cmds)
        pairs = reg if isinstance(reg, dict) else dict(zip(reg[::2], reg[1::2], strict=True))
        entries = {}
        for item, value in pairs.items():
            _, _, entry = _text(value).partition("|")
            entries[_text(item)] = entry
        return int(v or 0), int(r or 0), entries, frozenset(_text(x) for x in removed)

    async def alog_interaction(
        self,
        user_id: str,
        item_id: str,
        weight: float,
        ts_ms: int,
        request_id: str = "",
        now_ms: int | None = None,
    ) -> str:
        """Record one interaction and its event atomically; returns the event id (the first
        call's, and nothing applied, for a repeated ``request_id``)."""
        return await self._arun(self.log_plan(user_id, item_id, weight, ts_ms, request_id, now_ms))

    async def aadd_friendship(self, a: str, b: str, ts_ms: int, request_id: str = "") -> str:
        """Add the undirected edge {a, b} (idempotent) and its event; returns the event id."""
        return await self._arun(self.friend_plan("add", a, b, ts_ms, request_id))

    async def aremove_friendship(self, a: str, b: str, ts_ms: int, request_id: str = "") -> str:
        """Remove the undirected edge {a, b} (idempotent) and log it; returns the event id."""
        return await self._arun(self.friend_plan("remove", a, b, ts_ms, request_id))

    async def adismiss(
        self, user_id: str, item_id: str, other_user_id: str, ts_ms: int, request_id: str = ""
    ) -> str:
        """Never recommend ``item_id`` (or ``other_user_id``) to ``user_id`` again."""
        return await self._arun(
            self.dismiss_plan(user_id, item_id, other_user_id, ts_ms, request_id)
        )

    async def ablock(
        self, op: str, user_id: str, blocked_id: str, ts_ms: int, request_id: str = ""
    ) -> str:
        """Block (``op`` "block") or unblock; a block also removes the friendship."""
        return await self._arun(self.block_plan(op, user_id, blocked_id, ts_ms, request_id))

    async def aitem(self, op: str, item_id: str, ts_ms: int, request_id: str = "") -> str:
        """Take an item down (``op`` "remove") or restore it, for everyone."""
        return await self._arun(self.item_plan(op, item_id, ts_ms, request_id))

    async def _arun(self, plan: Plan) -> str:
        client, acked = self._aclient(), self.cfg.ack_replicas > 0
        try:
            step = next(plan)  # the arguments are checked here, before anything is sent
            while True:
                h = self._sha[step.script]
                if acked:  # the step's script call, then WAIT on its connection
                    reply, acks = await _aretry(
                        lambda s=step, h=h: client.acked(h, s.script, s.keys, s.args)
                    )
                    _acknowledged(self.cfg, acks)  # before the next step runs
                else:
                    reply = await _aretry(
                        lambda s=step, h=h: client.evalsha(h, s.script, s.keys, s.args)
                    )
                step = plan.send(reply)
        except StopIteration as done:
            return done.value

    async def aclose(self) -> None:
        """Close the async client (the event loop's connection)."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    # ---- blocking (tools, tests, the naive peer) --------------------------------------------
    def read(self, user_id: str, with_fof: bool = False) -> UserFeatures:
        """:meth:`aread` over redis-py, blocking."""
        cmds = self.read_commands(user_id, with_fof)
        try:
            if self.cfg.cluster:
                replies = _retry(lambda: self._pipeline(cmds))
                if not with_fof:
                    return features(replies, False)
                _data_errors(replies)
                replies = _join_blocks(replies)
                scan, excluded, fof_cmds = self.fof_commands(user_id, replies)
                sets = _retry(lambda: self._pipeline(fof_cmds)) if fof_cmds else []
                return self._fof_features(check_id("user_id", user_id), replies, excluded, sets)
            for attempt in (0, 1):
                pipe = self._r.pipeline(transaction=True)
                for c in cmds:
                    pipe.execute_command(*c)
                replies = pipe.execute(raise_on_error=False)
                if with_fof and attempt == 0 and _noscript(replies[-1]):
                    self._r.script_load(schema.FOF)
                    continue
                return features(replies, with_fof)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as e:
            raise StoreUnavailable(f"redis: {e}") from e
        raise AssertionError("unreachable")

    def _pipeline(self, cmds: list[tuple]) -> list:
        """Cluster: the commands as one pipeline (each node gets its own, all at once); after
        a node could not answer, the layout is re-read first (see RedisPyClusterAsyncClient)."""
        try:
            if self._read_refresh:
                self._read_refresh = False
                self._r.nodes_manager.initialize()
            pipe = self._r.pipeline(transaction=False)
            for c in cmds:
                pipe.execute_command(*c)
            return _unavailable_replies(pipe.execute(raise_on_error=False))
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as e:
            self._read_refresh = True
            raise _store_error(e) from e
        except StoreUnavailable:
            self._read_refresh = True
            raise

    def log_interaction(
        self, user_id: str, item_id: str, weight: float, ts_ms: int, request_id: str = ""
    ) -> str:
        """:meth:`alog_interaction` over redis-py, blocking."""
        return self._run(self.log_plan(user_id, item_id, weight, ts_ms, request_id))

    def add_friendship(self, a: str, b: str, ts_ms: int, request_id: str = "") -> str:
        """:meth:`aadd_friendship` over redis-py, blocking."""
        return self._run(self.friend_plan("add", a, b, ts_ms, request_id))

    def remove_friendship(self, a: str, b: str, ts_ms: int, request_id: str = "") -> str:
        """:meth:`aremove_friendship` over redis-py, blocking."""
        return self._run(self.friend_plan("remove", a, b, ts_ms, request_id))

    def dismiss(
        self, user_id: str, item_id: str, other_user_id: str, ts_ms: int, request_id: str = ""
    ) -> str:
        """:meth:`adismiss` over redis-py, blocking."""
        return self._run(self.dismiss_plan(user_id, item_id, other_user_id, ts_ms, request_id))

    def block(
        self, op: str, user_id: str, blocked_id: str, ts_ms: int, request_id: str = ""
    ) -> str:
        """:meth:`ablock` over redis-py, blocking."""
        return self._run(self.block_plan(op, user_id, blocked_id, ts_ms, request_id))

    def item(self, op: str, item_id: str, ts_ms: int, request_id: str = "") -> str:
        """:meth:`aitem` over redis-py, blocking."""
        return self._run(self.item_plan(op, item_id, ts_ms, request_id))

    def _run(self, plan: Plan) -> str:
        try:
            step = next(plan)
            while True:
                step = plan.send(_retry(lambda s=step: self._call(s)))
        except StopIteration as done:
            return done.value

    def _call(self, step: Step) -> Any:
        if self.cfg.ack_replicas > 0:
            reply, acks = self._acked_call(step)
            _acknowledged(self.cfg, acks)
            return reply
        keys, args = step.keys, step.args
        try:
            try:
                return self._r.evalsha(self._sha[step.script], len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                return self._r.eval(step.script, len(keys), *keys, *args)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as e:
            if not _unavailable(e):
                raise _refusal(str(e)) from e
            raise (_store_error(e) if self.cfg.cluster else StoreUnavailable(f"redis: {e}")) from e

    def _acked_call(self, step: Step) -> tuple:
        """:meth:`_call` followed by WAIT on the same connection: (reply, WAIT's reply or
        the error in its place). Single Redis: a pipeline (it holds one pooled connection);
        cluster: a pipeline on the node's own client for the keys' slot, which follows no
        redirection (a MOVED or ASK reply: the script did not run, the pair goes again to the
        node named)."""
        keys, args, cfg = step.keys, step.args, self.cfg
        script = ("EVALSHA", self._sha[step.script])
        try:
            if self._w is None:
                if cfg.cluster:
                    self._w = cluster_client(cfg, _cluster_ack_options(cfg))
                else:
                    self._w = redis.Redis.from_url(cfg.url, **_ack_options(cfg))
            w = self._w
            if not cfg.cluster:
                for _ in (0, 1):
                    pipe = w.pipeline(transaction=False)
                    pipe.execute_command(*script, len(keys), *keys, *args)
                    pipe.execute_command(*cfg.wait)
                    reply, acks = pipe.execute(raise_on_error=False)
                    if not _noscript(reply):
                        break
                    script = ("EVAL", step.script)
                if isinstance(reply, Exception):
                    raise _refusal(str(reply))
                return reply, acks
            if self._refresh:
                self._refresh = False
                w.nodes_manager.initialize()
            node, asking = w.get_node_from_key(keys[0]), False
            for _ in range(_REDIRECTS):
                pipe = w.get_redis_connection(node).pipeline(transaction=False)
                if asking:
                    pipe.execute_command("ASKING")
                pipe.execute_command(*script, len(keys), *keys, *args)
                pipe.execute_command(*cfg.wait)
                reply, acks = pipe.execute(raise_on_error=False)[-2:]
                if isinstance(reply, redis.exceptions.MovedError):  # the layout changed
                    w.nodes_manager.initialize()
                    node, asking = w.get_node_from_key(keys[0]), False
                elif isinstance(reply, redis.exceptions.AskError):  # the slot is migrating
                    node, asking = _ask_node(w, reply), True
                elif _noscript(reply):  # the same node again (with ASKING if it was asked)
                    script = ("EVAL", step.script)
                else:
                    break
            else:
                raise StoreUnavailable(f"redis: still redirected after {_REDIRECTS} tries")
            if isinstance(reply, Exception):
                raise reply
            return reply, acks
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as e:
            if not _unavailable(e):
                raise _refusal(str(e)) from e
            if not cfg.cluster:
                raise StoreUnavailable(f"redis: {e}") from e
            self._refresh = True
            raise _store_error(e) from e

    def ping(self) -> bool:
        """True when Redis answers (for health checks; in a cluster, every primary); never
        raises."""
        try:
            return bool(self._r.ping())
        except (redis.exceptions.RedisError, StoreUnavailable):
            return False

    def close(self) -> None:
        """Close the blocking connection pool (the async client closes with :meth:`aclose`)."""
        if self._sync is not None:
            self._sync.close()
        if self._w is not None:
            self._w.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Pauses before sending a command again that a migrating slot refused (TryAgain): the keys
# of one user move together within a few milliseconds of one another.
TRYAGAIN_PAUSES_S = (0.02, 0.05, 0.1)


async def _aretry(call: Callable[[], Awaitable[Any]]) -> Any:
    """One immediate retry after a lost connection (a Redis restart closes the socket under
    us), none after a timeout (a timed-out write may have been applied); up to three after a
    pause while a cluster slot migrates (TryAgain: the command ran nowhere)."""
    for pause in TRYAGAIN_PAUSES_S:
        try:
            return await call()
        except ConnectionLost:
            return await call()
        except TryAgain:
            await asyncio.sleep(pause)
    return await call()


def _retry(call: Callable[[], Any]) -> Any:
    """:func:`_aretry`, blocking. On a single Redis, redis-py's own retry already did the
    retry after a lost connection (ConnectionLost and TryAgain come from the cluster path)."""
    for pause in TRYAGAIN_PAUSES_S:
        try:
            return call()
        except ConnectionLost:
            return call()
        except TryAgain:
            time.sleep(pause)
    return call()
