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
        prior, fcfg = engine.fresh_prior, self.settings(engine)
        assert prior is not None and fcfg is not None
        features = await self.store.aread(user)
        weight = next((w for i, w in features.history if i == item), None)
        if weight is None:  # dropped from the capped history already: the event still counts
            weight = 1.0
        x = engine.content_vector(features.history, features.friends)
        if x is None:  # the bundle knows nothing of this user: no vector to fold in
            if self.metrics:
                self.metrics.child(self.metrics.fresh_errors, "no_user_vector").inc()
            return False
        entry = json.dumps(
            {"w": float(weight), "ts": int(ts_ms), "b": engine.version, "x": _encode(x)},
            separators=(",", ":"),
        )
        seq, entries = await self.store.afresh_record(item, user, ts_ms, entry, fcfg.max_users)
        xs, ws, tss = [], [], []
        for _, raw in entries:
            try:
                e = json.loads(raw)
                if e.get("b") != engine.version:  # a vector of another bundle's space
                    continue
                v = _decode(e["x"], prior.dim)
                w = float(e["w"])
            except (ValueError, KeyError, TypeError):
                continue
            if v is None or not np.isfinite(w) or w <= 0:
                continue
            xs.append(v)
            ws.append(w)
            tss.append(int(e.get("ts", 0)))
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
        v, r = await self.store.afresh_versions()
        if self.index is not None and self.index.version == (v, r, engine.version):
            return False
        v, r, entries, removed = await self.store.afresh_registry()
        self.build(engine, v, r, entries, removed)
        return True

    def build(
        self, engine: Engine, v: int, r: int, entries: dict[str, str], removed: frozenset[str]
    ) -> FreshIndex:
        """A new side index from registry entries (not the live bundle's items, not taken down,
        rows computed by this bundle), swapped in; lag observed for new or changed entries."""
        dim = engine.items.d
        rows, updated, n_users, entry_ms = {}, {}, {}, {}
        for item, raw in entries.items():
            try:
                e = json.loads(raw)
                entry_ms[item] = ms = int(e["ms"])
                if item in engine.item_index or item in removed or e.get("b") != engine.version:
                    continue
                row, n = _decode(e["row"], dim), int(e["n"])
            except (ValueError, KeyError, TypeError):
                continue
            if row is None:
                continue
            rows[item], updated[item], n_users[item] = row, ms, n
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
