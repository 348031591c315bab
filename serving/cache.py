"""The exact result cache: the last answer per (call, user, k), reused only for equal features.

The engine's answer is a pure function of the bundle and (call, user, k, features), so an
answer stored with features equal to the ones just read from Redis *is* the answer: nothing
here can be stale, and no write needs to invalidate anything (a write that changes what Redis
holds for the user changes the features and misses). Every request still reads Redis.

One slot per (call, user, k) keeps the newest features. Slots are evicted least recently used
once the bytes they hold pass ``budget_bytes``. An entry's bytes are estimated from what it
holds (its key, features and results) with CPython 3.11 object sizes rounded up; a test checks
the estimate against tracemalloc's count of the real allocations. A new bundle gets a new cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from socialrec.serving.engine import Result
from socialrec.serving.schema import UserFeatures

# Upper bounds of CPython 3.11 (64-bit) object sizes, in bytes, as held by one cache entry.
ENTRY = 400  # OrderedDict node, slot tuple, entry tuple, UserFeatures, Result, their lists/dicts
STR = 64  # a str object's header (short ASCII; payload counted separately, x4 for non-ASCII)
HISTORY = 56 + 32 + 8  # (item, weight) tuple + float + list slot, plus the item str
FRIEND = 8  # list slot, plus the friend str
FOF = 112  # dict entry share + int, plus the candidate str
RESULT = 80 + 32 + 8  # Scored (4 slots) + float score + list slot; ids are the bundle's strings
SETS = 3 * 216  # the seen / dismissed / blocked frozensets, empty
SET_ITEM = 48  # one frozenset member's share of its hash table, plus the member str
QUERY = 112  # a numpy array's header (the query vector), plus its data


def _str_bytes(s: str) -> int:
    return STR + (len(s) if s.isascii() else 4 * len(s))


def entry_bytes(slot: tuple, features: UserFeatures, result: Result) -> int:
    """Estimated bytes one cache entry holds (an upper bound; see the module docstring)."""
    n = ENTRY + _str_bytes(slot[1])
    n += sum(HISTORY + _str_bytes(item) for item, _ in features.history)
    n += sum(FRIEND + _str_bytes(f) for f in features.friends)
    n += sum(FOF + _str_bytes(c) for c in features.fof)
    n += SETS + sum(
        SET_ITEM + _str_bytes(x)
        for members in (features.seen, features.dismissed, features.blocked)
        for x in members
    )
    n += RESULT * len(result.items)
    if result.query is not None:  # the query vector kept for the fresh-items check
        n += QUERY + result.query.nbytes
    return n


class ResultCache:
    """LRU of (call, user, k) -> (features, result), at most ``budget_bytes`` in total."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.size = 0  # estimated bytes held
        self._slots: OrderedDict[tuple, tuple[UserFeatures, Result, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, slot: tuple, features: UserFeatures) -> Result | None:
        """The stored answer of ``slot`` if it was computed from equal features, else None."""
        with self._lock:
            entry = self._slots.get(slot)
            if entry is None or entry[0] != features:
                return None
            self._slots.move_to_end(slot)
            return entry[1]

    def put(self, slot: tuple, features: UserFeatures, result: Result) -> None:
        """Keep ``result`` as the answer of ``slot`` for ``features`` (replacing the old one)."""
        weight = entry_bytes(slot, features, result)
        if weight > self.budget:
            return
        with self._lock:
            old = self._slots.pop(slot, None)
            if old is not None:
                self.size -= old[2]
            self._slots[slot] = (features, result, weight)
            self.size += weight
            while self.size > self.budget:
                _, (_, _, w) = self._slots.popitem(last=False)
                self.size -= w

    def __len__(self) -> int:
        return len(self._slots)
