"""The worker's streaming side services (health ``Watch``, server reflection), capped.

A stream holds one of gRPC's concurrent-call slots for as long as the client keeps it open,
so without a cap of their own one anonymous client opening a few hundred idle ``Watch`` or
reflection streams would take every slot and lock the Recommender's calls out. Streams past
``cap`` open at once in one worker are answered RESOURCE_EXHAUSTED at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection


class OpenStreams:
    """How many streaming calls one worker has open, at most ``cap`` (one event loop: no lock)."""

    def __init__(self, cap: int) -> None:
        if cap < 0:
            raise ValueError(f"stream cap must be >= 0, got {cap}")
        self.cap = cap
        self.open = 0

    async def enter(self, context: grpc.aio.ServicerContext, what: str) -> None:
        if self.open >= self.cap:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many open {what} streams: at most {self.cap} per worker; close one "
                "or retry with backoff",
            )
        self.open += 1

    def leave(self) -> None:
        self.open -= 1


class CappedHealth(health.aio.HealthServicer):
    """grpc.health.v1 with ``Watch`` streams counted against ``streams``."""

    def __init__(self, streams: OpenStreams) -> None:
        super().__init__()
        self._streams = streams

    async def Watch(self, request, context) -> None:  # noqa: N802  (the proto's name)
        await self._streams.enter(context, "health Watch")
        try:
            await super().Watch(request, context)
        finally:
            self._streams.leave()


class CappedReflection(reflection.aio.ReflectionServicer):
    """Server reflection with its streams counted against ``streams``."""

    def __init__(self, service_names, streams: OpenStreams) -> None:
        super().__init__(service_names)
        self._streams = streams

    async def ServerReflectionInfo(self, request_iterator, context) -> AsyncIterator:  # noqa: N802
        await self._streams.enter(context, "reflection")
        try:
            async for reply in super().ServerReflectionInfo(request_iterator, context):
                yield reply
        finally:
            self._streams.leave()
