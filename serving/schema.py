"""The feature store's layout in Redis: key names, Lua scripts, value checks, and parsing.

One place for what the online store (:mod:`socialrec.serving.store`) and the offline
operations (:mod:`socialrec.serving.offline_store`) must agree on.

Key schema (``ns`` = the namespace; ``v1`` versions the layout, so a new layout can be
published beside the old one and switched over)::

    {ns}:v1:h:{user}   zset    item -> last interaction time (ms); recency order, at most
                               history_cap members (the oldest are dropped)
    {ns}:v1:w:{user}   hash    item -> summed interaction weight; always the same members
                               as the zset (an item dropped from history loses its weight)
    {ns}:v1:f:{user}   set     friend ids; undirected, so b in f:a  <=>  a in f:b
    {ns}:v1:s:{user}   set     every item the user ever interacted with (seen; not capped)
    {ns}:v1:d:{user}   set     items the user dismissed
    {ns}:v1:du:{user}  set     users the user dismissed as friend suggestions
    {ns}:v1:b:{user}   set     users the user blocks
    {ns}:v1:bb:{user}  set     users who block the user (the reverse of b)
    {ns}:v1:removed    set     items taken down (for everyone)
    {ns}:v1:removed:v  int     bumped by every takedown or restore
    {ns}:v1:r:{n}:{user}:{request_id}
                       string  the event id a write with that request id got (n is the
                               length of user); expires after the idempotency window
    {ns}:v1:events     stream  one entry per write, for retraining:
                               type=interaction  user item weight ts
                               type=friend_add | friend_remove  user friend ts changed(0|1)

The ``{ns}`` above is a placeholder, not a Redis Cluster hash tag. Ids are used verbatim after
the prefix (any string without NUL is fine). Equal timestamps order by item id.

Sharding: the scripts touch several keys at once (a user's h/w/f keys, the event stream, and
for friends-of-friends the friend sets of up to ``fof_friends_cap`` other users, whose names
are built inside the script). That is fine on a single Redis, or a primary with replicas, but
Redis Cluster requires every key of a script to be declared and to live in one hash slot.
Moving to Cluster needs hash-tagged per-user keys, a stream split per slot, and
friends-of-friends read across slots or precomputed per user.

Every script is compatible with Redis 6.2 (``ZADD GT``, exclusive ``XRANGE`` bounds).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field

SCHEMA_VERSION = "v1"


class Keys:
    """Key names of one namespace."""

    def __init__(self, namespace: str) -> None:
        self.prefix = f"{namespace}:{SCHEMA_VERSION}:"
        self.events = self.prefix + "events"
        self.removed = self.prefix + "removed"  # items taken down (global)
        self.removed_version = self.prefix + "removed:v"  # bumped by every takedown/restore
        self.friends_prefix = self.prefix + "f:"  # the fof script builds friend-set keys from it

    def user(self, kind: str, user: str) -> str:
        """The key of ``kind`` (h, w or f) for ``user``."""
        return f"{self.prefix}{kind}:{user}"

    def request(self, user: str, request_id: str) -> str:
        """The idempotency key of ``request_id`` sent by ``user`` ('' when there is none).

        The user's length comes first, so ("a:b", "c") and ("a", "b:c") are different keys.
        """
        return f"{self.prefix}r:{len(user)}:{user}:{request_id}" if request_id else ""


@dataclass(frozen=True)
class UserFeatures:
    """What the user tower and the friend ranker need about one user, as Redis holds it now.

    Compared by value: equal features give equal answers (the result cache relies on it), so
    treat one as immutable once built.
    """

    history: list[tuple[str, float]] = field(default_factory=list)  # (item, weight), newest 1st
    friends: list[str] = field(default_factory=list)  # sorted
    fof: dict[str, int] = field(default_factory=dict)  # candidate -> mutual friends (friends)
    # What must not be recommended: content reads fill seen and dismissed (items), friend
    # reads fill dismissed (users) and blocked (either direction).
    seen: frozenset[str] = frozenset()
    dismissed: frozenset[str] = frozenset()
    blocked: frozenset[str] = frozenset()
    removed_version: int = 0  # content reads: the takedown set's version (0: none yet)

    @property
    def size(self) -> int:
        """Entries held, for cache accounting."""
        return (
            len(self.history) + len(self.friends) + len(self.fof) + len(self.seen)
            + len(self.dismissed) + len(self.blocked)
        )  # fmt: skip


def _pairs(reply: list | dict) -> dict:
    if isinstance(reply, dict):  # redis-py's HGETALL
        return reply
    it = iter(reply)  # raw RESP2: a flat [field, value, ...] list
    return dict(zip(it, it, strict=True))


def parse_features(replies: list, friends: bool) -> UserFeatures:
    """UserFeatures from the read transaction's replies (RESP2 lists or redis-py's dicts).

    Content reads: history, weights, friends, seen, dismissed items, takedown version.
    Friend reads: history, weights, friends, dismissed users, blocked (both ways), fof.
    """
    weights = _pairs(replies[1])
    history = [(i, float(weights.get(i) or 0.0)) for i in replies[0]]
    base = {"history": history, "friends": sorted(replies[2])}
    if friends:
        fof = replies[5]
        return UserFeatures(
            **base,
            fof={fof[j]: int(fof[j + 1]) for j in range(0, len(fof), 2)},
            dismissed=frozenset(replies[3]),
            blocked=frozenset(replies[4]),
        )
    return UserFeatures(
        **base,
        seen=frozenset(replies[3]),
        dismissed=frozenset(replies[4]),
        removed_version=int(replies[5] or 0),
    )


MAX_ID_LEN = 256  # characters, after NFC normalisation (the server may set a lower limit)
MAX_REQUEST_ID_LEN = 128
MAX_WEIGHT = 1e6  # one interaction's weight, at most
MAX_TOTAL_WEIGHT = 1e9  # a user's summed weight for one item is capped here
MAX_FUTURE_MS = 24 * 3600 * 1000  # live timestamps may run this far ahead of the server clock
# Characters no id may hold: control (Cc), invisible format (Cf: zero-width space, bidi
# marks, ...), surrogates (Cs), line and paragraph separators (Zl, Zp).
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def check_id(name: str, value: str, max_len: int = MAX_ID_LEN) -> str:
    """``value`` in NFC form, or ValueError naming the field: ids must be non-blank strings of
    at most ``max_len`` characters with no control or invisible format characters.

    NFC makes "café" typed with a combining accent and with a precomposed é one id (so the
    self-friendship check and every key see the same user).
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if not value.isascii():
        value = unicodedata.normalize("NFC", value)
        bad = next((c for c in value if unicodedata.category(c) in _BAD_CATEGORIES), None)
        if bad is not None:
            raise ValueError(f"{name} holds a control or invisible character U+{ord(bad):04X}")
    elif not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        raise ValueError(f"{name} holds a control character U+{ord(bad):04X}")
    if len(value) > max_len:
        raise ValueError(f"{name} is longer than {max_len} characters")
    return value


def check_request_id(value: str) -> str:
    """An optional idempotency key: '' (none) or an id of at most MAX_REQUEST_ID_LEN."""
    return check_id("request_id", value, MAX_REQUEST_ID_LEN) if value else ""


def check_ts(ts_ms: int, now_ms: int | None = None) -> str:
    """A timestamp in ms as Redis gets it; ValueError if negative or, when ``now_ms`` is
    given, more than MAX_FUTURE_MS ahead of it (a far-future time would pin an item first in
    a history forever)."""
    ts = int(ts_ms)
    if ts < 0:
        raise ValueError(f"timestamp_ms must be >= 0, got {ts_ms}")
    if now_ms is not None and ts > now_ms + MAX_FUTURE_MS:
        raise ValueError(f"timestamp_ms is more than 24 h in the future, got {ts_ms}")
    return str(ts)


def check_weight(weight: float) -> float:
    """A live interaction's weight: finite, > 0 and at most MAX_WEIGHT."""
    w = float(weight)
    if not (math.isfinite(w) and 0 < w <= MAX_WEIGHT):
        raise ValueError(f"weight must be a finite number in (0, {MAX_WEIGHT:g}], got {weight}")
    return w


def fmt_weight(weight: float) -> str:
    """A finite weight in its shortest round-trip form (Redis parses it exactly)."""
    w = float(weight)
    if not math.isfinite(w):
        raise ValueError(f"weight must be finite, got {weight}")
    return repr(w)


LUA_LIB = """
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

-- Idempotency: a request-id key ('' when the call has none) holds the first answer.
local function replayed(key)
  if key == '' then return false end
  return redis.call('GET', key)
end

local function remember(key, answer, ttl)
  if key ~= '' then redis.call('SET', key, answer, 'EX', ttl) end
  return answer
end

local function xadd(stream, maxlen, ...)
  if tonumber(maxlen) > 0 then
    return redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', ...)
  end
  return redis.call('XADD', stream, '*', ...)
end
"""

# Friends-of-friends, computed inside Redis so only the top candidates travel.
# KEYS: f, b, bb, du of the user. ARGV: fof_friends_cap, fof_cap, friend-set key prefix, user.
# Candidates never include the user, friends, anyone blocked in either direction or dismissed;
# friends in a block (which cannot persist: a block removes the friendship) are not scanned.
# Returns {fof id, mutual count, ...}, highest count first, ties by id.
FOF = (
    LUA_LIB
    + """
local exclude = {[ARGV[4]] = true}
for i = 2, 4 do
  for _, u in ipairs(redis.call('SMEMBERS', KEYS[i])) do exclude[u] = true end
end
local friends = {}
for _, f in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not exclude[f] then friends[#friends + 1] = f end
end
local fof = {}
if #friends == 0 then return fof end
table.sort(friends)  -- the first fof_friends_cap friends by id are scanned
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

# KEYS: h, w, events, request-id key (''), s. ARGV: user, item, weight, ts, history_cap,
# stream maxlen (0: none), request-id ttl (s), cap on the summed weight.
# Recency is the latest ts seen for the item (ZADD GT), weights add up (capped). Returns the
# event id; a repeated request id returns the first call's event id and changes nothing.
LOG = (
    LUA_LIB
    + """
local prev = replayed(KEYS[4])
if prev then return prev end
redis.call('ZADD', KEYS[1], 'GT', ARGV[4], ARGV[2])
redis.call('SADD', KEYS[5], ARGV[2])
local total = tonumber(redis.call('HINCRBYFLOAT', KEYS[2], ARGV[2], ARGV[3]))
if total > tonumber(ARGV[8]) then redis.call('HSET', KEYS[2], ARGV[2], ARGV[8]) end
cap_history(KEYS[1], KEYS[2], tonumber(ARGV[5]))
return remember(KEYS[4], xadd(KEYS[3], ARGV[6], 'type', 'interaction', 'user', ARGV[1],
                              'item', ARGV[2], 'weight', ARGV[3], 'ts', ARGV[4]), ARGV[7])
"""
)

# KEYS: h, w, s. ARGV: item, weight, ts, history_cap. Bulk load: the weight is *set* (re-running
# a publish is idempotent), no event. Returns how many items the cap dropped.
UPSERT = (
    LUA_LIB
    + """
redis.call('ZADD', KEYS[1], 'GT', ARGV[3], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return cap_history(KEYS[1], KEYS[2], tonumber(ARGV[4]))
"""
)

# KEYS: f of a, f of b, events, request-id key (''), b of a, b of b. ARGV: a, b, ts, stream
# maxlen, op (add|remove), request-id ttl (s). Returns the event id (the first one for a
# repeated request id); the event says whether the graph changed. Adding an edge one end of
# which blocks the other is refused with a BLOCKED error.
FRIEND = (
    LUA_LIB
    + """
local prev = replayed(KEYS[4])
if prev then return prev end
if ARGV[5] == 'add' and (redis.call('SISMEMBER', KEYS[5], ARGV[2]) == 1
                         or redis.call('SISMEMBER', KEYS[6], ARGV[1]) == 1) then
  return redis.error_reply('BLOCKED one of the users blocks the other')
end
local cmd = ARGV[5] == 'add' and 'SADD' or 'SREM'
local changed = redis.call(cmd, KEYS[1], ARGV[2])
redis.call(cmd, KEYS[2], ARGV[1])
return remember(KEYS[4], xadd(KEYS[3], ARGV[4], 'type', 'friend_' .. ARGV[5], 'user', ARGV[1],
                              'friend', ARGV[2], 'ts', ARGV[3], 'changed', tostring(changed)),
                ARGV[6])
"""
)

# KEYS: the user's dismissed set (d or du), events, request-id key (''). ARGV: user, target,
# kind (item|user), ts, stream maxlen, request-id ttl (s). Returns the event id.
DISMISS = (
    LUA_LIB
    + """
local prev = replayed(KEYS[3])
if prev then return prev end
local changed = redis.call('SADD', KEYS[1], ARGV[2])
return remember(KEYS[3], xadd(KEYS[2], ARGV[5], 'type', 'dismiss_' .. ARGV[3], 'user', ARGV[1],
                              'target', ARGV[2], 'ts', ARGV[4], 'changed', tostring(changed)),
                ARGV[6])
"""
)

# KEYS: b of a, bb of b, f of a, f of b, events, request-id key (''). ARGV: a, b, op
# (block|unblock), ts, stream maxlen, request-id ttl (s). A block also removes the friendship
# {a, b}, logged as its own friend_remove event (so retraining drops the edge as for any
# removal). Returns the block event's id.
BLOCK = (
    LUA_LIB
    + """
local prev = replayed(KEYS[6])
if prev then return prev end
local changed
if ARGV[3] == 'block' then
  changed = redis.call('SADD', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[1])
  local unfriended = redis.call('SREM', KEYS[3], ARGV[2])
  redis.call('SREM', KEYS[4], ARGV[1])
  if unfriended == 1 then
    xadd(KEYS[5], ARGV[5], 'type', 'friend_remove', 'user', ARGV[1], 'friend', ARGV[2],
         'ts', ARGV[4], 'changed', '1')
  end
else
  changed = redis.call('SREM', KEYS[1], ARGV[2])
  redis.call('SREM', KEYS[2], ARGV[1])
end
return remember(KEYS[6], xadd(KEYS[5], ARGV[5], 'type', ARGV[3], 'user', ARGV[1],
                              'blocked', ARGV[2], 'ts', ARGV[4], 'changed', tostring(changed)),
                ARGV[6])
"""
)

# KEYS: removed set, its version counter, events, request-id key (''). ARGV: item, op
# (remove|restore), ts, stream maxlen, request-id ttl (s). Every change bumps the version,
# which every content read fetches, so workers reload the set at their next read.
ITEM = (
    LUA_LIB
    + """
local prev = replayed(KEYS[4])
if prev then return prev end
local changed
if ARGV[2] == 'remove' then
  changed = redis.call('SADD', KEYS[1], ARGV[1])
else
  changed = redis.call('SREM', KEYS[1], ARGV[1])
end
redis.call('INCR', KEYS[2])
return remember(KEYS[4], xadd(KEYS[3], ARGV[4], 'type', 'item_' .. ARGV[2], 'item', ARGV[1],
                              'ts', ARGV[3], 'changed', tostring(changed)), ARGV[5])
"""
)
