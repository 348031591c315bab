"""Dynamic batching of one worker's engine work (docs/design.md "Dynamic batching").

Requests whose features have arrived from Redis queue here; the queue runs through the
engine as one batch (one tower run per head, one search per index:
``Engine.recommend_batch``). It never holds a request that nothing could join: a request
that finds no other request between validation and the engine (none reading features, none
queued) runs at once, in the caller's own step of the event loop. Otherwise it waits for
the requests still reading their features, at most ``wait_s`` (0: only for those whose
replies are already in, one turn of the event loop), and a full batch (``max_batch``) runs
at once.

The engine runs on the event loop (a short CPU burst; docs/design.md "Performance rules"),
so a batch forms from requests that became ready while the loop was busy, e.g. running the
previous batch. Everything here runs on the worker's event loop: no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

from socialrec.serving.engine import MAX_BATCH, Engine, Query, Result


class Batcher:
    """Queues ``(engine, query)`` pairs of one event loop and runs them in batches."""

    def __init__(
        self,
        max_batch: int,
        wait_s: float,
        observe: Callable[[int], None] | None = None,
        engine_cpu: Callable[[float], None] | None = None,
    ) -> None:
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"batch size must be between 1 and {MAX_BATCH}, got {max_batch}")
        if wait_s < 0:
            raise ValueError(f"batch wait must be >= 0, got {wait_s}")
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.observe = observe  # called with each batch's size (a metric)
        self.engine_cpu = engine_cpu  # called with each batch's thread CPU seconds (a metric)
        self.reading = 0  # requests between validation and the engine (reading features)
        self._queue: list[tuple[Engine, Query, asyncio.Future]] = []
        self._timer: asyncio.Handle | asyncio.TimerHandle | None = None

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around a request's feature read: while it reads, queued requests may wait for it.
        If it leaves without queueing (degraded, failed) and was the last one awaited, the
        queue runs now."""
        self.reading += 1
        try:
            yield
        finally:
            self.reading -= 1
            if not self.reading and self._queue and self._timer is not None:
                self._timer.cancel()
                self._timer = asyncio.get_running_loop().call_soon(self._flush)

    async def run(self, engine: Engine, query: Query) -> Result:
        """The engine's answer to ``query``, computed in a batch with the requests queued
        with it (the same answer as ``engine.recommend_batch([query])[0]``)."""
        if self.max_batch == 1:
            return self._batch(engine, [query])[0]
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((engine, query, fut))
        if len(self._queue) >= self.max_batch or not self.reading:
            self._flush()  # full, or nothing could join: run now, without a loop turn
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            if self.wait_s > 0:
                self._timer = loop.call_later(self.wait_s, self._flush)
            else:
                self._timer = loop.call_soon(self._flush)
        return await fut  # already done when the flush ran above: no suspension

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue, self._queue = self._queue, []
        live = [entry for entry in queue if not entry[2].done()]  # cancelled while queued
        while live:
            engine = live[0][0]  # a bundle swap may leave two engines in one queue
            same = [e for e in live if e[0] is engine]
            live = [e for e in live if e[0] is not engine]
            try:
                results = self._batch(engine, [q for _, q, _ in same])
            except Exception as e:  # answered INTERNAL by each request's dispatcher
                for _, _, fut in same:
                    fut.set_exception(e)
                continue
            for (_, _, fut), res in zip(same, results, strict=True):
                fut.set_result(res)

    def _batch(self, engine: Engine, queries: list[Query]) -> list[Result]:
        if self.observe is not None:
            self.observe(len(queries))
        if self.engine_cpu is None:
            return engine.recommend_batch(queries)
        t0 = time.thread_time()
        results = engine.recommend_batch(queries)
        self.engine_cpu(time.thread_time() - t0)
        return results
