"""Fresh items in a worker: the write path's fold-in and the polled side index.

docs/design.md "Fresh items: serving". The estimator itself is :mod:`socialrec.serving.fresh`
(pure numpy); this module does its I/O:

* :meth:`FreshItems.on_interaction` runs after an interaction with an item the live bundle
  does not know was stored: it reads the user's features (one round trip), runs the tower
  (one ``session.run``), records the user's entry on the item's own keys (one script, the
  item's slot), folds the item in from those entries and, when eligible, publishes its row to
  the global registry (one script, the ``{g}`` slot). It never raises: a failure is logged
  (rate-limited) and counted, the interaction stays acknowledged.
* :meth:`FreshItems.run` polls the registry's version every ``fresh_poll_s``; on a change (or
  a takedown, or a new bundle) it reads the registry, builds a new :class:`FreshIndex` and
  swaps it in with one reference assignment.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

import numpy as np
from socialrec.serving.config import ServerConfig
from socialrec.serving.engine import Engine, FreshIndex
from socialrec.serving.fresh import FoldInConfig, bundle_config, fold_in
from socialrec.serving.observability import Metrics, RateLimitedLog
from socialrec.serving.store import FeatureStore

log = logging.getLogger("socialrec.server")


def _encode(x: np.ndarray) -> str:
    return base64.b64encode(np.asarray(x, "<f4").tobytes()).decode("ascii")


def _decode(s: str, dim: int) -> np.ndarray | None:
    x = np.frombuffer(base64.b64decode(s), dtype="<f4")
    return x.astype(np.float32) if x.shape == (dim,) and np.isfinite(x).all() else None


def _entry(raw: str, row: bool = False) -> dict | None:
    """A stored user entry (``row``: a registry entry) as a dict with checked numeric fields,
    or None when it is not one (a corrupt entry is skipped, never fatal)."""
    try:
        e = json.loads(raw)
        if row:
            e["ms"], e["n"] = int(e["ms"]), int(e["n"])
        else:
            e["w"], e["ts"] = float(e["w"]), int(e.get("ts", 0))
            if not np.isfinite(e["w"]) or e["w"] <= 0:
                return None
        return e if isinstance(e.get("row" if row else "x"), str) else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# What becomes of items that stop being fresh (FreshItems.tidy; docs/design.md).
# A bundle live this long on a worker takes over (or re-folds) fresh items: longer than the
# workers need to converge on a new CURRENT, so workers on two bundles do not undo each other.
TAKEOVER_GRACE_S = 60.0
TIDY_EVERY_S = 30.0  # with no registry change, tidying is still tried this often
MAX_AGE_S = 30 * 86400  # an unknown item with no interaction this long leaves the registry
KEEP_S = 7 * 86400  # a retired item's own keys (its users) are kept this long, for rollbacks
LEASE_S = 10  # one worker tidies at a time; the others wait at least this long
TIDY_BATCH = 200  # items tidied per registry change at most


class FreshItems:
    """One worker's fresh items: the fold-in after writes, and the side index searches use."""

    def __init__(
        self, cfg: ServerConfig, holder: Any, store: FeatureStore, metrics: Metrics | None
    ) -> None:
        self.cfg = cfg
        self.holder = holder
        self.store = store
        self.metrics = metrics
        self.index: FreshIndex | None = None  # swapped whole, never mutated
        self._entry_ms: dict[str, int] | None = None  # every registry entry's time, last build
        self._fail_log = RateLimitedLog(log)
        self._poll_log = RateLimitedLog(log)
        self._settings: tuple[str, FoldInConfig | None] | None = None  # (bundle version, ...)
        self._bundle: str | None = None  # the live bundle's version at the last poll
        self._since = time.monotonic()  # when it became live here
        self._entries: dict[str, str] = {}  # the registry as last read
        self._decoded: dict[str, tuple] = {}  # item -> (entry, width, parsed, row): last build
        self._tidied = 0.0  # monotonic time of the last tidying attempt
        self.tidy_every_s = TIDY_EVERY_S
        self.takeover_grace_s = TAKEOVER_GRACE_S
        self.max_age_s = MAX_AGE_S
        self.keep_s = KEEP_S
        self.lease_s = LEASE_S
        self.tidy_batch = TIDY_BATCH

    def settings(self, engine: Engine) -> FoldInConfig | None:
        """The fold-in settings for ``engine``'s bundle: ``--fresh-method``'s when given, else
        the ones the bundle carries (manifest ``fresh``: its run's validation choice). None
        when the bundle's block is malformed (fresh items off for it, one warning)."""
        if self.cfg.fresh is not None:
            return self.cfg.fresh
        if self._settings is None or self._settings[0] != engine.version:
            try:
                got, source = bundle_config(engine.bundle.manifest)
                log.info(
                    "fresh-item fold-in settings", extra={"event": "fresh_settings",
                    "bundle": engine.version, "settings": got.__dict__, "source": source},
                )  # fmt: skip
            except ValueError as e:
                got = None
                log.warning(
                    "bundle's fold-in settings are malformed; fresh items are off for it",
                    extra={"event": "fresh_off", "bundle": engine.version, "error": str(e)},
                )
            if got is not None and got.method == "ridge" and engine.fresh_prior is not None:
                # the (D + 1)^2 inverse every ridge fold-in shares: computed here (the first
                # poll after a load), not inside the first fresh write
                engine.fresh_prior.ridge_base(got.negatives, got.lam)
            self._settings = (engine.version, got)
        return self._settings[1]

    def enabled(self, engine: Engine) -> bool:
        return (
            self.cfg.fresh_items
            and engine.fresh_prior is not None
            and self.settings(engine) is not None
        )

    def _failed(self, stage: str, error: BaseException, **extra: object) -> None:
        if self.metrics:
            self.metrics.child(self.metrics.fresh_errors, stage).inc()
        self._fail_log.warning(
            "fresh item step failed; the interaction stays recorded",
            event="fresh_error", stage=stage, error=f"{type(error).__name__}: {error}", **extra,
        )  # fmt: skip

    # ---- write path ------------------------------------------------------------------------
    async def on_interaction(self, user: str, item: str, ts_ms: int, ack_ms: int) -> bool | None:
        """After ``user``'s interaction with ``item`` was stored: fold the item in if the live
        bundle does not know it. True: a row was published; False: not eligible (yet) or
        nothing newer to publish; None: not a fresh item, fresh items off, or failed."""
        live = self.holder.live
        if live is None:
            return None
        engine = live.engine
        if item in engine.item_index or not self.enabled(engine):
            return None
        try:
            return await self._fold(engine, user, item, ts_ms, ack_ms)
        except Exception as e:  # never fails the write that was already acknowledged
            self._failed("write", e, user=user, item=item)
            return None

    async def _fold(self, engine: Engine, user: str, item: str, ts_ms: int, ack_ms: int) -> bool:
        features = await self.store.aread(user)
        weight = next((w for i, w in features.history if i == item), None)
        if weight is None:  # dropped from the capped history already: the event still counts
            weight = 1.0
        got = await self._record(engine, item, user, features, weight, ts_ms)
        return got is not None and await self._publish(engine, item, *got, ack_ms)

    async def _record(
        self, engine: Engine, item: str, user: str, features: Any, weight: float, ts_ms: int
    ) -> tuple[int, list[tuple[str, str]]] | None:
        """Record ``user``'s entry (vector in ``engine``'s space) for ``item``: the item's
        (sequence number, entries), or None for a user the bundle has no vector for."""
        fcfg = self.settings(engine)
        assert fcfg is not None
        x = engine.content_vector(features.history, features.friends)
        if x is None:  # the bundle knows nothing of this user: no vector to fold in
            if self.metrics:
                self.metrics.child(self.metrics.fresh_errors, "no_user_vector").inc()
            return None
        entry = json.dumps(
            {"w": float(weight), "ts": int(ts_ms), "b": engine.version, "x": _encode(x)},
            separators=(",", ":"),
        )
        return await self.store.afresh_record(item, user, ts_ms, entry, fcfg.max_users)

    async def _publish(
        self, engine: Engine, item: str, seq: int, entries: list[tuple[str, str]], ack_ms: int
    ) -> bool:
        """Fold ``item`` in from its entries of ``engine``'s bundle; publish the row if eligible."""
        prior, fcfg = engine.fresh_prior, self.settings(engine)
        assert prior is not None and fcfg is not None
        xs, ws, tss = [], [], []
        for _, raw in entries:
            e = _entry(raw)
            if e is None or e.get("b") != engine.version:  # a vector of another bundle's space
                continue
            v = _decode(e["x"], prior.dim)
            if v is None:
                continue
            xs.append(v)
            ws.append(e["w"])
            tss.append(e["ts"])
        if not xs:
            return False
        row = fold_in(np.stack(xs), np.array(ws), prior, fcfg, np.array(tss))
        if row is None:
            return False
        value = json.dumps(
            {"row": _encode(row), "n": len(xs), "ms": int(ack_ms), "b": engine.version},
            separators=(",", ":"),
        )
        return await self.store.afresh_publish(item, seq, value) > 0

    # ---- tidying the registry ----------------------------------------------------------------
    async def tidy(self, engine: Engine, entries: dict[str, str]) -> dict[str, int]:
        """What becomes of items that stop being fresh, done by one worker at a time (a lease):

        * taken over: the live bundle knows the item (a retrain trained on it) and the entry
          was computed by another bundle: the entry leaves the registry, the item's own keys
          expire after ``keep_s``;
        * re-folded: the live bundle does not know the item but the entry was computed in
          another bundle's space (a retrain that did not take it over): every recorded user's
          vector is recomputed with this bundle's tower (features read now) and the row
          published again, so the item keeps being served without waiting for new writes;
        * expired: no interaction for ``max_age_s`` and still unknown: the entry leaves the
          registry (its keys expire after ``keep_s``).

        Taking over and re-folding wait until the bundle has been live here for
        ``takeover_grace_s``, so that workers still on the previous bundle (a rollout or a
        rollback converging) and this one do not undo each other.

        At most ``tidy_batch`` items per call; returns the counts."""
        done = {"taken_over": 0, "refolded": 0, "expired": 0}
        now_ms = time.time() * 1000
        settled = time.monotonic() - self._since >= self.takeover_grace_s
        todo: list[tuple[str, str, str]] = []
        for item, raw in entries.items():
            e = _entry(raw, row=True)
            if e is None:
                continue
            if item in engine.item_index:
                if settled and e.get("b") != engine.version:
                    todo.append(("taken_over", item, raw))
            elif now_ms - e["ms"] > self.max_age_s * 1000:
                todo.append(("expired", item, raw))
            elif settled and e.get("b") != engine.version:
                todo.append(("refolded", item, raw))
        if not todo:
            return done
        if not await self.store.afresh_lease(f"{id(self)}@{engine.version}", self.lease_s):
            return done  # another worker is at it; what is left is seen at a later change
        for what, item, raw in todo[: self.tidy_batch]:
            if what == "refolded":
                ok = await self._refold(engine, item)
            else:
                ok = await self.store.afresh_retire(item, raw, self.keep_s) > 0
            done[what] += int(ok)
        if any(done.values()):
            log.info("fresh-item registry tidied", extra={"event": "fresh_tidy", **done})
        return done

    async def _refold(self, engine: Engine, item: str) -> bool:
        """Re-record every user of ``item`` with ``engine``'s tower, then publish its row."""
        users = [(u, e) for u, raw in await self.store.afresh_entries(item) if (e := _entry(raw))]
        todo = [(u, e) for u, e in users if e.get("b") != engine.version] or users[-1:]
        got = None  # (re-recording one user even when none is stale gives a newer seq to publish)
        for user, e in todo:
            features = await self.store.aread(user)
            got = await self._record(engine, item, user, features, e["w"], e["ts"]) or got
        if got is None:
            return False
        return await self._publish(engine, item, *got, int(time.time() * 1000))

    # ---- side index ------------------------------------------------------------------------
    async def run(self) -> None:
        """Poll the registry forever (cancel to stop); nothing here stops the loop."""
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self.metrics:
                    self.metrics.child(self.metrics.fresh_errors, "poll").inc()
                self._poll_log.warning(
                    "fresh-item registry poll failed", event="fresh_poll_error",
                    error=f"{type(e).__name__}: {e}",
                )  # fmt: skip
            await asyncio.sleep(max(0.01, self.cfg.fresh_poll_s))

    async def refresh(self) -> bool:
        """One poll: rebuild and swap the side index if the registry, the takedown set or the
        live bundle changed since the last build. True if it swapped."""
        live = self.holder.live
        if live is None:
            return False
        engine = live.engine
        if not self.enabled(engine):
            if self.index is not None:
                self.index = None
                self._set_gauge(0)
            return False
        if engine.version != self._bundle:
            self._bundle, self._since = engine.version, time.monotonic()
        v, r = await self.store.afresh_versions()
        if self.index is not None and self.index.version == (v, r, engine.version):
            if self._entries and time.monotonic() - self._tidied >= self.tidy_every_s:
                await self._tidy(engine, self._entries)  # the grace may have ended meanwhile
            return False
        v, r, entries, removed = await self.store.afresh_registry()
        self.build(engine, v, r, entries, removed)
        self._entries = entries
        await self._tidy(engine, entries)
        return True

    async def _tidy(self, engine: Engine, entries: dict[str, str]) -> None:
        self._tidied = time.monotonic()
        try:
            await self.tidy(engine, entries)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the side index was swapped already; tidying waits
            self._failed("tidy", e)

    def build(
        self, engine: Engine, v: int, r: int, entries: dict[str, str], removed: frozenset[str]
    ) -> FreshIndex:
        """A new side index from registry entries (not the live bundle's items, not taken down,
        rows computed by this bundle), swapped in; lag observed for new or changed entries."""
        dim = engine.items.d
        rows, updated, n_users, entry_ms = {}, {}, {}, {}
        seen, decoded = self._decoded, {}
        for item, raw in entries.items():
            got = seen.get(item)
            if got is None or got[0] != raw or got[1] != dim:  # parse only new or changed ones
                e = _entry(raw, row=True)
                got = (raw, dim, None) if e is None else (raw, dim, e, _decode(e["row"], dim))
            decoded[item] = got
            if len(got) < 4:
                continue
            e, row = got[2], got[3]
            entry_ms[item] = e["ms"]
            if row is None or item in engine.item_index or item in removed:
                continue
            if e.get("b") != engine.version:
                continue
            rows[item], updated[item], n_users[item] = row, e["ms"], e["n"]
        self._decoded = decoded  # only the registry's current entries
        previous = (
            self.index
            if self.index is not None and self.index.version[2:] == (engine.version,)
            else None
        )  # build numbers carry over within one bundle (the cache's check)
        index = FreshIndex.build(
            rows, dim, (v, r, engine.version), updated, n_users, previous=previous
        )
        self.index = index  # the swap: one reference assignment
        before, self._entry_ms = self._entry_ms, entry_ms
        if self.metrics and before is not None:
            # Lag of entries new or changed since the last build (not of the whole registry
            # at a worker's first build, nor of an item back after a restore or a reload).
            now_ms = time.time() * 1000
            for item, ms in updated.items():
                if before.get(item) != ms:
                    self.metrics.fresh_lag.observe(max(0.0, (now_ms - ms) / 1000))
        self._set_gauge(len(index))
        return index

    def _set_gauge(self, n: int) -> None:
        if self.metrics:
            self.metrics.fresh_items.set(n)
