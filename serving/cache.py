"""The exact result cache: the last answer per (call, user, k), reused only for equal features.

The engine's answer is a pure function of the bundle and (call, user, k, features), so an
answer stored with features equal to the ones just read from Redis *is* the answer: nothing
here can be stale, and no write needs to invalidate anything (a write that changes what Redis
holds for the user changes the features and misses). Every request still reads Redis.

One slot per (call, user, k) keeps the newest features. Slots are evicted least recently used
once the entries they hold pass ``budget``; an entry weighs 1 + its feature entries (history,
friends, friends-of-friends) + its result entries. A new bundle gets a new cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from socialrec.serving.engine import Result
from socialrec.serving.schema import UserFeatures


class ResultCache:
    """LRU of (call, user, k) -> (features, result), bounded by ``budget`` entries in total."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0  # entries held
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
        weight = 1 + features.size + len(result.items)
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
