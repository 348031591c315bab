"""The online feature store: each user's recent history and friends in Redis, plus an event stream.

The server reads a user's features in **one round trip** (one ``MULTI``/``EXEC`` of plain
reads, plus one ``EVALSHA`` for friends-of-friends) and writes each interaction or friendship
change atomically together with its event (one ``EVALSHA``), so a write is visible to the next
read from any worker or machine that uses the same Redis.

Request-time calls go over :mod:`serving.resp` (a raw socket per thread, or one pipelined
connection for the server's event loop: the ``a*`` methods); redis-py serves bulk loads, scans
and the stream, and everything when ``fast_path`` is off or the URL is not redis:// / unix://.

Key schema (``ns`` = :attr:`StoreConfig.namespace`; ``v1`` versions the layout, so a new
layout can be published beside the old one and switched over)::

    {ns}:v1:h:{user}   zset    item -> last interaction time (ms); recency order, at most
                               history_cap members (the oldest are dropped)
    {ns}:v1:w:{user}   hash    item -> summed interaction weight; always the same members
                               as the zset (an item dropped from history loses its weight)
    {ns}:v1:f:{user}   set     friend ids; undirected, so b in f:a  <=>  a in f:b
    {ns}:v1:events     stream  one entry per write, for retraining:
                               type=interaction  user item weight ts
                               type=friend_add | friend_remove  user friend ts changed(0|1)

The ``{ns}`` above is a placeholder, not a Redis Cluster hash tag. Ids are used verbatim after
the prefix (any string without NUL is fine). Equal timestamps order by item id.

Sharding: the scripts touch several keys at once (a user's h/w/f keys, the event stream, and
for friends-of-friends the friend sets of up to ``fof_friends_cap`` other users, whose names
are built inside the script). That is fine on a single Redis, or a primary with replicas, but
Redis Cluster requires every key of a script to be declared and to live in one hash slot.
Moving to Cluster would need: hash-tagged per-user keys (``{ns}:v1:h:{<user>}``) so one user's
h/w/f share a slot; the stream split per slot (or the event appended by the caller after the
feature write, at-least-once); and friends-of-friends either read with a client-side
pipeline across slots (more than one round trip) or precomputed into a per-user key offline.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from socialrec.serving import resp

SCHEMA_VERSION = "v1"


class StoreUnavailable(RuntimeError):
    """Redis is down, timing out or refusing: reads should degrade, writes must fail loudly."""


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
    # Request-path calls (read, log, friend) go over serving.resp (one raw socket per thread)
    # when the URL is redis:// or unix://; False, or any other URL, uses redis-py throughout.
    fast_path: bool = True
    spin_us: int = 0  # fast path: busy-poll this long for a reply before sleeping on the socket


@dataclass
class UserFeatures:
    """What the user tower and the friend ranker need about one user, as Redis holds it now."""

    history: list[tuple[str, float]] = field(default_factory=list)  # (item, weight), newest first
    friends: list[str] = field(default_factory=list)  # sorted
    fof: dict[str, int] = field(default_factory=dict)  # candidate -> mutual friends (if asked)


# Lua helpers shared by the scripts below. Weights travel as strings: a Lua number returned
# to Redis is truncated to an integer, a string is not.
_LUA_LIB = """
local CHUNK = 1000  -- unpack() has a stack limit: pass long lists in chunks

local function chunked(cmd, key, list)
  for i = 1, #list, CHUNK do
    redis.call(cmd, key, unpack(list, i, math.min(i + CHUNK - 1, #list)))
  end
end

local function cap_history(h, w, cap)
  local n = redis.call('ZCARD', h)
  if n <= cap then return 0 end
  local old = redis.call('ZRANGE', h, 0, n - cap - 1)
  redis.call('ZREMRANGEBYRANK', h, 0, n - cap - 1)
  chunked('HDEL', w, old)
  return #old
end

local function xadd(stream, maxlen, ...)
  if tonumber(maxlen) > 0 then
    return redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', ...)
  end
  return redis.call('XADD', stream, '*', ...)
end
"""

# Friends-of-friends, computed inside Redis so only the top candidates travel.
# KEYS: f of the user. ARGV: fof_friends_cap, fof_cap, friend-set key prefix, user.
# Returns {fof id, mutual count, ...}, highest count first, ties by id.
_FOF = (
    _LUA_LIB
    + """
local friends = redis.call('SMEMBERS', KEYS[1])
local fof = {}
if #friends == 0 then return fof end
table.sort(friends)  -- the first fof_friends_cap friends by id are scanned
local exclude = {[ARGV[4]] = true}
for _, f in ipairs(friends) do exclude[f] = true end
local counts = {}
for i = 1, math.min(#friends, tonumber(ARGV[1])) do
  for _, c in ipairs(redis.call('SMEMBERS', ARGV[3] .. friends[i])) do
    if not exclude[c] then counts[c] = (counts[c] or 0) + 1 end
  end
end
-- Highest count first, ties by id: bucket by count and sort each bucket with the default
-- comparator (no Lua function call per comparison), only until fof_cap ids are taken.
local buckets, top = {}, 0
for c, n in pairs(counts) do
  local b = buckets[n]
  if b == nil then
    b = {}
    buckets[n] = b
    if n > top then top = n end
  end
  b[#b + 1] = c
end
local want = 2 * tonumber(ARGV[2])
for n = top, 1, -1 do
  local b = buckets[n]
  if b ~= nil then
    table.sort(b)
    for _, c in ipairs(b) do
      if #fof >= want then break end
      fof[#fof + 1] = c
      fof[#fof + 1] = n
    end
    if #fof >= want then break end
  end
end
return fof
"""
)

# KEYS: h, w, events. ARGV: user, item, weight, ts, history_cap, stream maxlen (0: none).
# Recency is the latest ts seen for the item (ZADD GT), weights add up. Returns the event id.
_LOG = (
    _LUA_LIB
    + """
redis.call('ZADD', KEYS[1], 'GT', ARGV[4], ARGV[2])
redis.call('HINCRBYFLOAT', KEYS[2], ARGV[2], ARGV[3])
cap_history(KEYS[1], KEYS[2], tonumber(ARGV[5]))
return xadd(KEYS[3], ARGV[6], 'type', 'interaction', 'user', ARGV[1], 'item', ARGV[2],
            'weight', ARGV[3], 'ts', ARGV[4])
"""
)

# KEYS: h, w. ARGV: item, weight, ts, history_cap. Bulk load: the weight is *set* (re-running a
# publish is idempotent), no event. Returns how many items the cap dropped.
_UPSERT = (
    _LUA_LIB
    + """
redis.call('ZADD', KEYS[1], 'GT', ARGV[3], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return cap_history(KEYS[1], KEYS[2], tonumber(ARGV[4]))
"""
)

# KEYS: f of a, f of b, events. ARGV: a, b, ts, stream maxlen, op (add|remove).
# Returns the event id; the event says whether the graph changed.
_FRIEND = (
    _LUA_LIB
    + """
local cmd = ARGV[5] == 'add' and 'SADD' or 'SREM'
local changed = redis.call(cmd, KEYS[1], ARGV[2])
redis.call(cmd, KEYS[2], ARGV[1])
return xadd(KEYS[3], ARGV[4], 'type', 'friend_' .. ARGV[5], 'user', ARGV[1], 'friend', ARGV[2],
            'ts', ARGV[3], 'changed', tostring(changed))
"""
)


def features_from_replies(replies: list) -> UserFeatures:
    """UserFeatures from the read transaction's replies (either client's shapes)."""
    items, weights, friends = replies[0], replies[1], replies[2]
    if not isinstance(weights, dict):  # raw RESP2: a flat [field, value, ...] list
        it = iter(weights)
        weights = dict(zip(it, it, strict=True))
    history = [(i, float(weights.get(i) or 0.0)) for i in items]
    fof = replies[3] if len(replies) > 3 else []
    fof_counts = {fof[j]: int(fof[j + 1]) for j in range(0, len(fof), 2)}
    return UserFeatures(history=history, friends=sorted(friends), fof=fof_counts)


def _noscript(reply: object) -> bool:
    return isinstance(reply, Exception) and str(reply).startswith("NOSCRIPT")


def _check_id(name: str, value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _check_ts(ts_ms: int) -> str:
    ts = int(ts_ms)
    if ts < 0:
        raise ValueError(f"ts_ms must be >= 0, got {ts_ms}")
    return str(ts)


def _fmt_weight(weight: float) -> str:
    w = float(weight)
    if not math.isfinite(w):
        raise ValueError(f"weight must be finite, got {weight}")
    return repr(w)  # shortest round-trip form; Redis parses it exactly


def _progress(it: Iterable, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="row", total=len(it) if hasattr(it, "__len__") else None)


class FeatureStore:
    """Redis-backed user features; thread-safe (a connection pool and one fast-path connection
    per thread; the ``a*`` methods belong to one event loop), safe to use after fork."""

    def __init__(self, cfg: StoreConfig) -> None:
        self.cfg = cfg
        # One immediate retry on connection errors only: it heals a pooled connection that a
        # Redis restart closed (the command never reached Redis, so a write is not doubled).
        # No retry on timeouts: a timed-out write may have been applied.
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        self._r = redis.Redis.from_url(
            cfg.url,
            socket_timeout=cfg.socket_timeout_s,
            socket_connect_timeout=cfg.socket_timeout_s,
            decode_responses=True,
            health_check_interval=cfg.health_check_interval_s,
            retry=retry,
        )
        self._prefix = f"{cfg.namespace}:{SCHEMA_VERSION}:"
        self._events_key = self._prefix + "events"
        self._fof = self._r.register_script(_FOF)
        self._log = self._r.register_script(_LOG)
        self._upsert = self._r.register_script(_UPSERT)
        self._friend = self._r.register_script(_FRIEND)
        self._fast_scripts = {
            id(s): resp.Script(s.script) for s in (self._fof, self._log, self._friend)
        }
        self._fast = cfg.fast_path and urlparse(cfg.url).scheme in resp.SUPPORTED_SCHEMES
        self._local = threading.local()
        self._aconn: resp.AsyncRespConnection | None = None  # one event loop (the server's)

    # ---- keys --------------------------------------------------------------------------------
    def key(self, kind: str, user: str = "") -> str:
        """The Redis key of ``kind`` (h, w, f or events) for ``user``: the schema in one place."""
        return self._events_key if kind == "events" else f"{self._prefix}{kind}:{user}"

    # ---- reads -------------------------------------------------------------------------------
    def read(self, user_id: str, with_fof: bool = False) -> UserFeatures:
        """History, friends and (if asked) friends-of-friends of one user, in one round trip.

        One MULTI/EXEC written at once: ZREVRANGE (history, newest first), HGETALL (weights),
        SMEMBERS (friends) and, for friends-of-friends, one EVALSHA. Plain commands where
        they suffice: returning a long history through Lua costs Redis about five times the
        CPU. An unknown user gets empty features. Raises StoreUnavailable when Redis can't
        answer within the socket timeout.
        """
        cmds = self._read_cmds(user_id, with_fof)
        if not self._fast:
            return features_from_replies(self._read_redis_py(cmds))
        conn = self._sync_conn()
        replies = self._retry(lambda: conn.transaction(cmds))
        if with_fof and _noscript(replies[3]):
            replies = self._retry(lambda: conn.transaction(self._with_eval(cmds)))
        return features_from_replies(replies)

    async def aread(self, user_id: str, with_fof: bool = False) -> UserFeatures:
        """:meth:`read` for an asyncio event loop: other requests run while Redis answers."""
        return features_from_replies(await self.aread_replies(user_id, with_fof))

    async def aread_replies(self, user_id: str, with_fof: bool = False) -> list:
        """:meth:`aread` before parsing: the read transaction's replies, as the client gave
        them. :func:`features_from_replies` is a pure function of them, so equal replies mean
        equal features (what the server's result cache relies on)."""
        cmds = self._read_cmds(user_id, with_fof)
        if not self._fast:
            return self._read_redis_py(cmds)
        conn = self._async_conn()
        replies = await self._aretry(lambda: conn.transaction(cmds))
        if with_fof and _noscript(replies[3]):
            replies = await self._aretry(lambda: conn.transaction(self._with_eval(cmds)))
        return replies

    def _read_cmds(self, user_id: str, with_fof: bool) -> list[tuple]:
        cfg = self.cfg
        user = _check_id("user_id", user_id)
        f = self.key("f", user)
        cmds: list[tuple] = [
            ("ZREVRANGE", self.key("h", user), 0, cfg.history_cap - 1),
            ("HGETALL", self.key("w", user)),
            ("SMEMBERS", f),
        ]
        if with_fof:
            fof_args = (cfg.fof_friends_cap, cfg.fof_cap, self._prefix + "f:", user)
            cmds.append(("EVALSHA", self._fof.sha, 1, f, *fof_args))
        return cmds

    def _with_eval(self, cmds: list[tuple]) -> list[tuple]:
        """The same reads with the fof script sent as source (Redis lost its script cache)."""
        return [*cmds[:3], ("EVAL", _FOF, *cmds[3][2:])]

    def _read_redis_py(self, cmds: list[tuple]) -> list:
        try:
            for attempt in (0, 1):
                pipe = self._r.pipeline(transaction=True)
                for c in cmds:
                    pipe.execute_command(*c)
                replies = pipe.execute(raise_on_error=False)
                lost = len(cmds) > 3 and isinstance(replies[3], redis.exceptions.NoScriptError)
                if lost and attempt == 0:
                    self._r.script_load(_FOF)
                    continue
                for r in replies:
                    if isinstance(r, Exception):
                        raise r
                return replies
        except redis.exceptions.RedisError as e:
            raise StoreUnavailable(f"redis: {e}") from e
        raise AssertionError("unreachable")

    def events(self, after: str = "0-0", count: int = 1000) -> list[tuple[str, dict[str, str]]]:
        """Up to ``count`` stream entries with ids strictly after ``after``, oldest first."""
        try:
            rows = self._r.xrange(self._events_key, min=f"({after}", count=count)
        except redis.exceptions.RedisError as e:
            raise StoreUnavailable(f"redis: {e}") from e
        return [(eid, dict(fields)) for eid, fields in rows]

    def ping(self) -> bool:
        """True when Redis answers (for health checks); never raises."""
        try:
            return bool(self._r.ping())
        except redis.exceptions.RedisError:
            return False

    # ---- writes ------------------------------------------------------------------------------
    def log_interaction(self, user_id: str, item_id: str, weight: float, ts_ms: int) -> str:
        """Record one interaction and its event atomically; returns the stream entry id.

        ``ts_ms`` is taken as given (the server turns the proto's 0 = "now" into a time first).
        """
        return self._call(self._log, *self._log_args(user_id, item_id, weight, ts_ms))

    async def alog_interaction(self, user_id: str, item_id: str, weight: float, ts_ms: int) -> str:
        """:meth:`log_interaction` for an asyncio event loop."""
        return await self._acall(self._log, *self._log_args(user_id, item_id, weight, ts_ms))

    def _log_args(
        self, user_id: str, item_id: str, weight: float, ts_ms: int
    ) -> tuple[list[str], list[Any]]:
        user, item = _check_id("user_id", user_id), _check_id("item_id", item_id)
        args = [
            user,
            item,
            _fmt_weight(weight),
            _check_ts(ts_ms),
            self.cfg.history_cap,
            self.cfg.stream_maxlen or 0,
        ]
        return [self.key("h", user), self.key("w", user), self._events_key], args

    def add_friendship(self, a: str, b: str, ts_ms: int) -> str:
        """Add the undirected edge {a, b} (idempotent) and its event; returns the event id."""
        return self._call(self._friend, *self._friend_args("add", a, b, ts_ms))

    def remove_friendship(self, a: str, b: str, ts_ms: int) -> str:
        """Remove the undirected edge {a, b} (idempotent) and log it; returns the event id."""
        return self._call(self._friend, *self._friend_args("remove", a, b, ts_ms))

    async def aadd_friendship(self, a: str, b: str, ts_ms: int) -> str:
        """:meth:`add_friendship` for an asyncio event loop."""
        return await self._acall(self._friend, *self._friend_args("add", a, b, ts_ms))

    async def aremove_friendship(self, a: str, b: str, ts_ms: int) -> str:
        """:meth:`remove_friendship` for an asyncio event loop."""
        return await self._acall(self._friend, *self._friend_args("remove", a, b, ts_ms))

    def _friend_args(self, op: str, a: str, b: str, ts_ms: int) -> tuple[list[str], list[Any]]:
        a, b = _check_id("user_id", a), _check_id("friend_id", b)
        if a == b:
            raise ValueError(f"a user can't befriend themselves: {a!r}")
        keys = [self.key("f", a), self.key("f", b), self._events_key]
        return keys, [a, b, _check_ts(ts_ms), self.cfg.stream_maxlen or 0, op]

    def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        if self._fast:
            conn, fast = self._sync_conn(), self._fast_scripts[id(script)]
            return self._retry(lambda: conn.evalsha(fast, keys, args))
        try:
            return script(keys=keys, args=args)
        except redis.exceptions.RedisError as e:
            raise StoreUnavailable(f"redis: {e}") from e

    async def _acall(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """:meth:`_call` without blocking the event loop (fast path); the same retry rule.

        Other URLs (redis-py only) fall back to the blocking call.
        """
        if not self._fast:
            return self._call(script, keys, args)
        conn, fast = self._async_conn(), self._fast_scripts[id(script)]
        return await self._aretry(lambda: conn.evalsha(fast, keys, args))

    def _sync_conn(self) -> resp.RespConnection:
        """This thread's fast-path connection."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cfg = self.cfg
            conn = resp.RespConnection(cfg.url, timeout_s=cfg.socket_timeout_s, spin_us=cfg.spin_us)
            self._local.conn = conn
        return conn

    def _async_conn(self) -> resp.AsyncRespConnection:
        """The event loop's pipelined connection (the server has one loop per worker)."""
        if self._aconn is None:
            cfg = self.cfg
            self._aconn = resp.AsyncRespConnection(
                cfg.url, timeout_s=cfg.socket_timeout_s, spin_us=cfg.spin_us
            )
        return self._aconn

    @staticmethod
    def _retry(call: Callable[[], Any]) -> Any:
        """Like redis-py above: one immediate retry after a connection error (a Redis restart
        closes the socket under us), none after a timeout (a timed-out write may have been
        applied); every failure as StoreUnavailable."""
        for attempt in (0, 1):
            try:
                return call()
            except ConnectionError as e:
                if attempt:
                    raise StoreUnavailable(f"redis: {e}") from e
            except (TimeoutError, resp.RespError) as e:
                raise StoreUnavailable(f"redis: {e}") from e
        raise AssertionError("unreachable")

    @staticmethod
    async def _aretry(call: Callable[[], Awaitable[Any]]) -> Any:
        """:meth:`_retry` for coroutines."""
        for attempt in (0, 1):
            try:
                return await call()
            except ConnectionError as e:
                if attempt:
                    raise StoreUnavailable(f"redis: {e}") from e
            except (TimeoutError, resp.RespError) as e:
                raise StoreUnavailable(f"redis: {e}") from e
        raise AssertionError("unreachable")

    # ---- offline -----------------------------------------------------------------------------
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
        cap = self.cfg.history_cap
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
            pipe = self._r.pipeline(transaction=False)
            n = 0
            for user, item, weight, ts in _progress(history_rows, "history", progress):
                user, item = _check_id("user", str(user)), _check_id("item", str(item))
                keys = [self.key("h", user), self.key("w", user)]
                self._upsert(
                    keys=keys, args=[item, _fmt_weight(weight), _check_ts(ts), cap], client=pipe
                )
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
                a, b = _check_id("user", str(a)), _check_id("friend", str(b))
                if a == b:
                    raise ValueError(f"friend pair {n}: self-friendship {a!r}")
                pipe.sadd(self.key("f", a), b)
                pipe.sadd(self.key("f", b), a)
                users.update((a, b))
                n += 1
                if n % batch == 0:
                    counts["friend_pairs_new"] += sum(pipe.execute()[0::2])
            counts["friend_pairs_new"] += sum(pipe.execute()[0::2])
            counts["friend_pairs"] = n
            counts["friend_users"] = len(users)
        except redis.exceptions.RedisError as e:
            raise StoreUnavailable(f"redis: {e}") from e
        return counts

    def flush(self, events: bool = False) -> int:
        """Delete this namespace's features (and the event stream only if ``events``).

        SCAN + UNLINK, so other namespaces in the same database are untouched. Offline use:
        a live server reading meanwhile sees users disappear one by one.
        """
        pattern = _glob_escape(self._prefix) + "*"
        n = 0
        try:
            batch: list[str] = []
            for key in self._r.scan_iter(match=pattern, count=1000):
                if key == self._events_key and not events:
                    continue
                batch.append(key)
                if len(batch) >= 1000:
                    n += self._r.unlink(*batch)
                    batch = []
            if batch:
                n += self._r.unlink(*batch)
        except redis.exceptions.RedisError as e:
            raise StoreUnavailable(f"redis: {e}") from e
        return n

    def close(self) -> None:
        """Close the connection pool (and this thread's fast-path connection)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        if self._aconn is not None:
            self._aconn.close()
        self._r.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)
