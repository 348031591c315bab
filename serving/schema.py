"""The feature store's layout in Redis: key names, Lua scripts, value checks, and parsing.

One place for what the online store (:mod:`socialrec.serving.store`) and the offline
operations (:mod:`socialrec.serving.offline_store`) must agree on. The same layout serves a
single Redis (with replicas) and a Redis Cluster.

Key schema (``ns`` = the namespace, which may not hold ``{`` or ``}``; ``v2`` versions the
layout, so a new layout can be published beside the old one and switched over; ``{s}`` is a
literal Redis Cluster hash tag, ``s`` = the user's *shard*, see below)::

    {ns}:v2:{s}:h:{user}   zset    item -> last interaction time (ms); recency order, at most
                                   history_cap members (the oldest are dropped)
    {ns}:v2:{s}:w:{user}   hash    item -> summed interaction weight; always the same members
                                   as the zset (an item dropped from history loses its weight)
    {ns}:v2:{s}:f:{user}   set     friend ids; undirected, so b in f:a  <=>  a in f:b
    {ns}:v2:{s}:s:{user}   set     every item the user ever interacted with (seen; not capped)
    {ns}:v2:{s}:d:{user}   set     items the user dismissed
    {ns}:v2:{s}:du:{user}  set     users the user dismissed as friend suggestions
    {ns}:v2:{s}:b:{user}   set     users the user blocks
    {ns}:v2:{s}:bb:{user}  set     users who block the user (the reverse of b)
    {ns}:v2:{s}:ev:{user}  hash    cluster only: friendship versions (see "Cluster writes")
    {ns}:v2:{s}:bv:{user}  hash    cluster only: versions of the user's blocks
    {ns}:v2:{s}:bbv:{user} hash    cluster only: versions of blocks against the user
    {ns}:v2:{s}:r:{op}:{n}:{user}:{request_id}
                           string  the event id a write of kind op (log, friend_add, dismiss,
                                   block, item_remove, ...) with that request id got (n is the
                                   length of user); expires after the idempotency window; s is
                                   the shard whose script the request id guards
    {ns}:v2:{s}:events     stream  shard s of the event stream (one entry per write)
    {ns}:v2:{g}:removed    set     items taken down (for everyone)
    {ns}:v2:{g}:removed:v  int     bumped by every takedown or restore
    {ns}:v2:{g}:events     stream  the takedown events (shard "g")
    {ns}:v2:{s}:fu:{item}  zset    fresh items: user -> latest interaction time (ms), at most
                                   FoldInConfig.max_users (the oldest are dropped); s = the
                                   item's shard (sha1(item) mod SHARDS, as for users)
    {ns}:v2:{s}:fv:{item}  hash    fresh items: user -> JSON {w, ts, b, x} (total weight, time,
                                   bundle version, base64 float32 content vector); the same
                                   members as fu
    {ns}:v2:{s}:fn:{item}  int     fresh items: bumped by every record (orders registry writes)
    {ns}:v2:{g}:fresh      hash    fresh-item registry: item -> "<seq>|<JSON row entry>"
    {ns}:v2:{g}:fresh:v    int     bumped by every registry change (workers poll it)

**Shards and hash tags.** A user's shard is ``sha1(user)`` mod :data:`SHARDS` (:func:`shard_of`;
the Lua scripts compute the same with ``redis.sha1hex``). Every key of a user carries the tag
``{<shard>}``, so Redis Cluster keeps all of one user's keys in one slot whatever the user id
holds: the id itself (which may contain braces) comes after the tag, and a namespace with
braces is refused, so the first ``{`` of every key opens our tag. The takedown keys have the
fixed tag ``{g}``.

**The event stream is sharded the same way**: shard ``s`` is the stream ``{ns}:v2:{s}:events``
in the same slot as the keys of the users of that shard, so each write script changes the
features and appends its event in one atomic step even in a cluster. A write goes to the
shard of its user; a friendship change (and the ``friend_remove`` a block logs) to the shard of
the edge's *owner*, the smaller id of the two, so every event of one edge is in one shard and
in order. Event ids are ``<stream id>@<shard>`` (:func:`event_id`); events of one shard are in
stream order; across shards, :func:`event_order` sorts by stream id time, then shard. Readers
keep a cursor per shard (see ``OfflineStore.events``). :data:`SHARDS` (1024) is the unit of
data placement in a cluster (each shard is one slot: 1024 of them balance well over a few
dozen primaries) and the number of streams a reader polls.

**Single Redis vs Cluster.** The reads and the one-user writes (interactions, dismissals,
takedowns) are the same scripts in both. Two things differ:

- friends-of-friends: on a single Redis one script (:data:`FOF`) reads the friend sets of up
  to ``fof_friends_cap`` friends inside Redis (building their key names from the prefix and
  :data:`SHARDS`); in a cluster those sets are in other slots, so the store reads them with a
  pipeline (one batch per node, all nodes at once) and ranks in Python (:func:`rank_fof`, the
  same ranking);
- writes that touch two users (friendships, blocks): on a single Redis one script changes
  both sides atomically (:data:`FRIEND`, :data:`BLOCK`). In a cluster the two users' keys
  are in different slots, so a write is a script on the owner's side (the truth, the
  idempotency record and the event) followed by a *mirror* script on the other side, see
  "Cluster writes".

**Cluster writes.** An edge {a, b} is owned by o = min(a, b). :data:`EDGE` runs on o's slot:
it checks blocks, changes ``f:o``, bumps the edge's version ``ev:o[m]`` (m: the other end) and
logs the event; :data:`MIRROR` then sets ``f:m`` to the owner's state if that version is newer
than the one ``ev:m[o]`` last applied. Blocks work the same way with the blocker's ``b`` set as
the truth (:data:`BLOCK_SET`, version ``bv``) and ``bb`` of the blocked user as the mirror
(:data:`BLOCK_MIRROR`, applied versions ``bbv``); a block then removes the friendship with
EDGE and MIRROR. Versions make mirrors converge to the owner's state whatever order
concurrent writes' mirror steps arrive in. A write whose mirror step did not run (the
process died, a node failed) leaves the other side stale until the write is retried: a retry
with the same request id replays the owner step (nothing applied twice) and runs the mirror
again; a retry without one applies again (no change, an event with changed=0).

**Replays write.** A repeated request id changes nothing, but its script still writes the
request-id key again (same value, same TTL; a MIRROR that finds its version applied writes that
version again): on a primary with replicas, ``WAIT`` after a replay then covers the original
write too, which a replay that wrote nothing would acknowledge at once
(``StoreConfig.ack_replicas``).

Every script is compatible with Redis 6.2 (``ZADD GT``, exclusive ``XRANGE`` bounds,
``SET KEEPTTL``).
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain

SCHEMA_VERSION = "v2"
SHARDS = 1024  # user shards: one hash tag (so one cluster slot) and one event stream each
GLOBAL_SHARD = "g"  # the takedown set, its version and its events


def shard_of(user: str) -> int:
    """The user's shard: the first 32 bits of sha1(user) mod SHARDS (the scripts agree)."""
    return int.from_bytes(hashlib.sha1(user.encode()).digest()[:4], "big") % SHARDS


def edge_owner(a: str, b: str) -> tuple[str, str]:
    """(owner, other) of the undirected edge {a, b}: the owner is the smaller id."""
    return (a, b) if a < b else (b, a)


def event_id(stream_id: str, shard: int | str) -> str:
    """The event id of stream entry ``stream_id`` of ``shard``: ``"<ms>-<seq>@<shard>"``."""
    return f"{stream_id}@{shard}"


def split_event_id(eid: str) -> tuple[str, str]:
    """(stream id, shard) of an event id; an id without a shard (layout v1) gives shard ''."""
    sid, _, shard = eid.partition("@")
    return sid, shard


def event_order(eid: str) -> tuple[int, int, str]:
    """Sort key of event ids: stream id time and sequence, then shard (also for v1 ids)."""
    sid, shard = split_event_id(eid)
    ms, _, seq = sid.partition("-")
    return int(ms), int(seq or 0), shard


class Keys:
    """Key names of one namespace."""

    def __init__(self, namespace: str) -> None:
        if "{" in namespace or "}" in namespace:
            raise ValueError(f"a namespace may not hold '{{' or '}}': {namespace!r}")
        self.prefix = f"{namespace}:{SCHEMA_VERSION}:"
        self.removed = self.tag(GLOBAL_SHARD) + "removed"  # items taken down (global)
        self.removed_version = self.tag(GLOBAL_SHARD) + "removed:v"  # bumped by each change
        self.shards: list[int | str] = [*range(SHARDS), GLOBAL_SHARD]  # every stream shard
        self.fresh = self.tag(GLOBAL_SHARD) + "fresh"  # fresh-item registry (global)
        self.fresh_version = self.tag(GLOBAL_SHARD) + "fresh:v"  # bumped by each change
        self.fresh_lease = self.tag(GLOBAL_SHARD) + "fresh:lease"  # one worker tidies at a time

    def item(self, kind: str, item: str) -> str:
        """The key of ``kind`` (fu, fv, fn) for a fresh ``item``, in the item's shard."""
        return f"{self.tag(shard_of(item))}{kind}:{item}"

    def tag(self, shard: int | str) -> str:
        """The prefix of every key of ``shard`` (it holds the shard's hash tag)."""
        return f"{self.prefix}{{{shard}}}:"

    def user(self, kind: str, user: str) -> str:
        """The key of ``kind`` (h, w, f, s, d, du, b, bb, ev, bv, bbv) for ``user``."""
        return self.user_keys(user, kind)[0]

    def user_keys(self, user: str, *kinds: str) -> list[str]:
        """The keys of ``kinds`` for ``user`` (see :meth:`user`), hashing the user once."""
        tag = self.tag(shard_of(user))
        return [f"{tag}{kind}:{user}" for kind in kinds]

    def stream(self, shard: int | str) -> str:
        """Event stream shard ``shard``."""
        return self.tag(shard) + "events"

    def request(
        self,
        user: str,
        request_id: str,
        op: str,
        shard: int | str | None = None,
        kind: str = "r",
    ) -> str:
        """The idempotency key of ``request_id`` sent by ``user`` for the write ``op`` (log,
        friend_add, dismiss, block, item_remove, ...: a request id names one request, so the
        same id on another kind of write is another request), in ``shard`` (default: the
        user's): the shard whose script the request id guards. ``kind`` "ru" is the unfriend
        step of a block in a cluster (a second script the same request id guards).

        Without a request id it is the shard's "no request id" key, which the scripts never
        read or write (a key, not '', so that every key of a script is in one slot). The
        user's length comes before the user, so ("a:b", "c") and ("a", "b:c") are different
        keys; ops hold no ':'.
        """
        tag = self.tag(shard_of(user) if shard is None else shard)
        if not request_id:
            return tag + "r:"
        return f"{tag}{kind}:{op}:{len(user)}:{user}:{request_id}"


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
            fof=dict(zip(fof[::2], map(int, fof[1::2]), strict=True)),
            dismissed=frozenset(replies[3]),
            blocked=frozenset(replies[4]),
        )
    return UserFeatures(
        **base,
        seen=frozenset(replies[3]),
        dismissed=frozenset(replies[4]),
        removed_version=int(replies[5] or 0),
    )


def fof_scan(user: str, friends: list[str], excluded: set[str], friends_cap: int) -> list[str]:
    """The friends whose friend sets a friends-of-friends read scans: not the user, nobody
    blocked (either way) or dismissed, the first ``friends_cap`` by id (as :data:`FOF`)."""
    return sorted(f for f in friends if f != user and f not in excluded)[:friends_cap]


def rank_fof(
    user: str,
    friends: list[str],
    excluded: set[str],
    friend_sets: list[list[str]],
    fof_cap: int,
) -> list:
    """Friends-of-friends from the scanned friends' sets, ranked as :data:`FOF` ranks them
    inside Redis: ``[id, mutual count, ...]``, highest count first, ties by id, at most
    ``fof_cap`` ids; never the user, a friend, or anyone in ``excluded``."""
    counts = Counter(chain.from_iterable(friend_sets))  # counted in C
    for u in (user, *friends, *excluded):
        counts.pop(u, None)
    buckets: dict[int, list[str]] = {}  # by count, so only the buckets taken are sorted
    for c, n in counts.items():
        buckets.setdefault(n, []).append(c)
    out: list = []
    for n in sorted(buckets, reverse=True):
        for c in sorted(buckets[n]):
            if len(out) >= 2 * fof_cap:
                return out
            out += (c, n)
    return out


MAX_ID_LEN = 256  # characters, after NFC normalisation (the server may set a lower limit)
MAX_REQUEST_ID_LEN = 128
MAX_WEIGHT = 1e6  # one interaction's weight, at most
MAX_TOTAL_WEIGHT = 1e9  # a user's summed weight for one item is capped here
MAX_FUTURE_MS = 24 * 3600 * 1000  # live timestamps may run this far ahead of the server clock
# Characters no id may hold: control (Cc), invisible format (Cf: zero-width space, bidi
# marks, ...), surrogates (Cs), line and paragraph separators (Zl, Zp).
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# Letters and symbols that draw nothing (Hangul fillers, the blank Braille pattern).
_BLANK = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def check_id(name: str, value: str, max_len: int = MAX_ID_LEN) -> str:
    """``value`` in NFC form, or ValueError naming the field: ids must be strings of at most
    ``max_len`` characters with a visible character, no control or invisible format
    characters, and no leading or trailing whitespace.

    NFC makes "café" typed with a combining accent and with a precomposed é one id (so the
    self-friendship check and every key see the same user).
    """
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    # Before any per-character work, so a flood of huge ids stays cheap to refuse: composing
    # to NFC turns at most 4 code points into one (e.g. U+1FAF from 4), so a string over
    # 4 * max_len cannot pass.
    if len(value) > 4 * max_len:
        raise ValueError(f"{name} is longer than {max_len} characters ({len(value)})")
    if not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {shown(value)}")
    if not value.isascii():
        value = unicodedata.normalize("NFC", value)
        bad = next((c for c in value if unicodedata.category(c) in _BAD_CATEGORIES), None)
        if bad is not None:
            raise ValueError(f"{name} holds a control or invisible character U+{ord(bad):04X}")
        if not any(_visible(c) for c in value):
            raise ValueError(f"{name} has no visible character, got {shown(value)}")
    elif not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        raise ValueError(f"{name} holds a control character U+{ord(bad):04X}")
    if len(value) > max_len:
        raise ValueError(f"{name} is longer than {max_len} characters ({len(value)})")
    if value[0].isspace() or value[-1].isspace():  # " 7" and "7" would be two users
        raise ValueError(f"{name} has leading or trailing whitespace, got {shown(value)}")
    return value


def _visible(c: str) -> bool:
    """Whether ``c`` shows as something: a letter, digit, punctuation or symbol that is not a
    blank filler (marks, spaces and fillers alone make ids that look empty)."""
    return unicodedata.category(c)[0] in "LNPS" and c not in _BLANK


def shown(value: str, limit: int = 40) -> str:
    """``value`` as error messages quote it: its repr, cut to ``limit`` characters with the
    full length noted (a message must not echo a huge value back)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


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

-- Idempotency: a request-id key holds the first answer. The shard's "no request id" key is
-- its tag followed by 'r:' alone (the first '}' closes the tag: namespaces have no braces).
local function guarded(key)
  return string.sub(key, string.find(key, '}', 1, true) + 1) ~= ':r:'
end

-- A replay writes the key again (same value, same TTL): a write replicated after the original
-- one, so a WAIT after the replay covers the original write too (a replay that wrote nothing
-- would not advance the connection's replication offset, and its WAIT would return at once).
local function replayed(key)
  if not guarded(key) then return false end
  local prev = redis.call('GET', key)
  if prev then redis.call('SET', key, prev, 'KEEPTTL') end
  return prev
end

local function remember(key, answer, ttl)
  if guarded(key) then redis.call('SET', key, answer, 'EX', ttl) end
  return answer
end

-- schema.shard_of: the first 32 bits of sha1(user) mod the number of shards.
local function shard_of(user, shards)
  return tonumber(string.sub(redis.sha1hex(user), 1, 8), 16) % shards
end

local function xadd(stream, maxlen, ...)
  if tonumber(maxlen) > 0 then
    return redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', ...)
  end
  return redis.call('XADD', stream, '*', ...)
end
"""

# Friends-of-friends, computed inside Redis so only the top candidates travel (single Redis:
# the friends' sets are undeclared keys, built from the prefix and each friend's shard).
# KEYS: f, b, bb, du of the user. ARGV: fof_friends_cap, fof_cap, key prefix ("{ns}:v2:"),
# user, SHARDS.
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
  local f = friends[i]
  local key = ARGV[3] .. '{' .. shard_of(f, tonumber(ARGV[5])) .. '}:f:' .. f
  for _, c in ipairs(redis.call('SMEMBERS', key)) do
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

# KEYS: h, w, events (the user's shard), request-id key, s. ARGV: user, item, weight, ts, history_cap,
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

# Single Redis. KEYS: f of a, f of b, events (the edge owner's shard), request-id key (in that
# shard), b of a, b of b. ARGV: a, b, ts, stream maxlen, op (add|remove), request-id ttl (s).
# Returns the event id (the first one for a repeated request id); the event says whether the
# graph changed. Adding an edge one end of which blocks the other is refused (BLOCKED).
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

# KEYS: the user's dismissed set (d or du), events (the user's shard), request-id key. ARGV: user, target,
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

# Single Redis. KEYS: b of a, bb of b, f of a, f of b, events (a's shard), request-id key (a's
# shard), events (the shard of the edge {a, b}'s owner). ARGV: a, b, op (block|unblock), ts,
# stream maxlen, request-id ttl (s). A block also removes the friendship {a, b}, logged as its
# own friend_remove event (so retraining drops the edge as for any removal). Returns the block
# event's id.
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
    xadd(KEYS[7], ARGV[5], 'type', 'friend_remove', 'user', ARGV[1], 'friend', ARGV[2],
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

# KEYS: removed set, its version counter, events (shard g), request-id key. ARGV: item, op
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

# ---- Redis Cluster: writes that touch two users, as an owner step and a mirror step ----------

# The owner o of the edge {o, m} (o < m), on o's slot. KEYS: f, b, bb, ev of o; events (o's
# shard); request-id key (o's shard). ARGV: m, op (add|remove), ts, stream maxlen, request-id
# ttl (s), the event's user and friend (as the caller named them), log (always|changed: only
# when the edge changed). Returns "<event id or -> <version> <present 1|0>" (a repeated
# request id: the first answer); adding an edge under a block is refused (BLOCKED).
EDGE = (
    LUA_LIB
    + """
local prev = replayed(KEYS[6])
if prev then return prev end
local add = ARGV[2] == 'add'
if add and (redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1
            or redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1) then
  return redis.error_reply('BLOCKED one of the users blocks the other')
end
local changed = redis.call(add and 'SADD' or 'SREM', KEYS[1], ARGV[1])
local version = redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
local id = '-'
if ARGV[8] == 'always' or changed == 1 then
  id = xadd(KEYS[5], ARGV[4], 'type', 'friend_' .. ARGV[2], 'user', ARGV[6], 'friend', ARGV[7],
            'ts', ARGV[3], 'changed', tostring(changed))
end
return remember(KEYS[6], id .. ' ' .. version .. ' ' .. (add and '1' or '0'), ARGV[5])
"""
)

# The blocker a, on a's slot. KEYS: b, bv of a; events (a's shard); request-id key (a's
# shard). ARGV: the blocked user, op (block|unblock), ts, stream maxlen, request-id ttl (s), a.
# Returns "<event id> <version> <present 1|0>" (a repeated request id: the first answer).
BLOCK_SET = (
    LUA_LIB
    + """
local prev = replayed(KEYS[4])
if prev then return prev end
local block = ARGV[2] == 'block'
local changed = redis.call(block and 'SADD' or 'SREM', KEYS[1], ARGV[1])
local version = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
local id = xadd(KEYS[3], ARGV[4], 'type', ARGV[2], 'user', ARGV[6], 'blocked', ARGV[1],
                'ts', ARGV[3], 'changed', tostring(changed))
return remember(KEYS[4], id .. ' ' .. version .. ' ' .. (block and '1' or '0'), ARGV[5])
"""
)

# The mirror side: f of m after EDGE (versions in ev of m), or bb of the blocked user after
# BLOCK_SET (versions in bbv). KEYS: the set, its version hash. ARGV: the member (the owner or
# the blocker), the owner step's version, present (1|0). Applies only a version newer than
# the last applied one, so mirrors converge whatever order mirror steps arrive in. Returns 1
# if applied, 0 if a newer state was already there (then the applied version is written again,
# unchanged: a write replicated after the one that applied it, for a WAIT, as in replayed()).
MIRROR = """
local applied = redis.call('HGET', KEYS[2], ARGV[1])
local seen = tonumber(applied or '0')
if tonumber(ARGV[2]) <= seen then
  if applied then redis.call('HSET', KEYS[2], ARGV[1], applied) end
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call(ARGV[3] == '1' and 'SADD' or 'SREM', KEYS[1], ARGV[1])
return 1
"""

# ---- Fresh items (docs/design.md "Fresh items: serving") ----------------------------------

# One user's interaction with a fresh item, on the item's slot. KEYS: fu, fv, fn of the item.
# ARGV: user, ts (ms), entry (JSON), max_users. The user's entry is overwritten (a replay or a
# repeat never counts a user twice), only the max_users most recent users are kept. Returns
# {seq, user, entry, user, entry, ...}, oldest first.
FRESH_RECORD = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local n = redis.call('ZCARD', KEYS[1])
local cap = tonumber(ARGV[4])
if n > cap then
  local old = redis.call('ZRANGE', KEYS[1], 0, n - cap - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - cap - 1)
  for i = 1, #old do redis.call('HDEL', KEYS[2], old[i]) end
end
local out = {redis.call('INCR', KEYS[3])}
local users = redis.call('ZRANGE', KEYS[1], 0, -1)
for i = 1, #users do
  out[#out + 1] = users[i]
  out[#out + 1] = redis.call('HGET', KEYS[2], users[i]) or ''
end
return out
"""

# Publish a fresh item's row, on the {g} slot. KEYS: the registry, its version. ARGV: item,
# seq (the FRESH_RECORD answer it was computed from), value ("<seq>|<JSON>"). Only a newer seq
# replaces the entry (concurrent writers publish in any order); a change bumps the version.
# Returns the version after the call (0: an older seq, nothing written).
FRESH_PUBLISH = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local seq = tonumber(string.match(cur, '^(%d+)|'))
  if seq and seq >= tonumber(ARGV[2]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return redis.call('INCR', KEYS[2])
"""

# Retire a fresh item's registry entry, on the {g} slot: when the live bundle knows the item (a
# retrain took it over) or it had no interaction for FRESH_MAX_AGE. KEYS: the registry, its
# version. ARGV: item, the entry (JSON after "<seq>|") the caller decided on. Only that entry is
# removed: one published since is newer information and stays. Returns the version after the
# call (0: the entry had changed or was gone, nothing removed).
FRESH_RETIRE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local bar = string.find(cur, '|', 1, true)
if not bar or string.sub(cur, bar + 1) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return redis.call('INCR', KEYS[2])
"""
