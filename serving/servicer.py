"""The gRPC servicer: validate, read features, call the engine, build the reply.

Ranking lives in the engine (pure), state in Redis (:mod:`socialrec.serving.store`), the
exact result cache in :mod:`socialrec.serving.cache`, the live bundle in the worker's holder.
Handlers run on the worker's event loop: they await Redis and call the engine directly (a
short CPU burst; a thread hop would cost more than it saves).
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Protocol

import grpc
from socialrec.serving.cache import ResultCache
from socialrec.serving.config import ServerConfig, load_token
from socialrec.serving.engine import Engine, Result
from socialrec.serving.observability import Metrics
from socialrec.serving.schema import UserFeatures
from socialrec.serving.store import FeatureStore, StoreUnavailable

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc

log = logging.getLogger("socialrec.server")
REDIS_RETRY_S = 0.5  # after a failed read, answer from the bundle this long before trying again


@dataclass(frozen=True)
class Live:
    """What one bundle serves with: its engine and the result cache that belongs to it."""

    engine: Engine
    cache: ResultCache | None


class Holder(Protocol):
    live: Live | None


class RecommenderService(pb_grpc.RecommenderServicer):
    """Validation, auth and response shaping over the live engine and the feature store."""

    def __init__(
        self, cfg: ServerConfig, holder: Holder, store: FeatureStore, metrics: Metrics | None
    ) -> None:
        self.cfg = cfg
        self.holder = holder
        self.store = store
        self.metrics = metrics
        self.token = load_token(cfg)
        self._redis_down_until = 0.0  # circuit breaker: skip Redis reads briefly after a failure

    # ---- helpers -------------------------------------------------------------------------
    async def _read(self, user_id: str, with_fof: bool) -> UserFeatures | None:
        """The user's features from Redis, or None (degraded). After a failure, reads skip
        Redis for ``REDIS_RETRY_S`` so an outage costs one socket timeout, not one per request."""
        now = time.monotonic()
        if now < self._redis_down_until:
            return None
        try:
            return await self.store.aread(user_id, with_fof=with_fof)
        except StoreUnavailable as e:
            self._redis_down_until = now + REDIS_RETRY_S
            log.warning(
                "redis unavailable; answering from the bundle",
                extra={"event": "redis_down", "error": str(e)},
            )
            return None

    async def _fail(
        self, context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode, msg: str
    ):
        if self.metrics:
            self.metrics.child(self.metrics.requests, method, code.name).inc()
        await context.abort(code, msg)

    def _check_id(self, name: str, value: str) -> str | None:
        if not value or not value.strip():
            return f"{name} must be a non-empty string"
        if len(value) > self.cfg.max_id_len:
            return f"{name} is longer than {self.cfg.max_id_len} characters"
        return None

    def _check_k(self, k: int) -> str | None:
        if k <= 0 or k > self.cfg.max_k:
            return f"k must be between 1 and {self.cfg.max_k}, got {k}"
        return None

    async def _authorize(self, context: grpc.aio.ServicerContext, method: str) -> None:
        if self.token is None:
            await self._fail(
                context,
                method,
                grpc.StatusCode.UNAUTHENTICATED,
                "writes are disabled: the server has no write token "
                "(set SOCIALREC_WRITE_TOKEN or --token-file)",
            )
        got = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not got.startswith("Bearer ") or not hmac.compare_digest(
            got[7:].encode(), self.token.encode()
        ):
            await self._fail(
                context,
                method,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid 'authorization: Bearer <token>' metadata",
            )

    async def _live(self, context: grpc.aio.ServicerContext, method: str) -> Live:
        live = self.holder.live
        if live is None:
            await self._fail(context, method, grpc.StatusCode.UNAVAILABLE, "no bundle loaded yet")
        return live

    async def _deadline(self, context: grpc.aio.ServicerContext, method: str) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await self._fail(
                context,
                method,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "deadline exceeded before the request was answered",
            )

    def _observe(
        self, context, method: str, t0: float, result: Result, redis_s: float | None
    ) -> None:
        # Which worker answered: lets clients and tests see requests spread over processes.
        context.set_trailing_metadata((("x-socialrec-worker", str(os.getpid())),))
        if not self.metrics:
            return
        m = self.metrics
        m.child(m.latency, method).observe(time.perf_counter() - t0)
        m.child(m.requests, method, "OK").inc()
        if redis_s is not None:
            m.child(m.stage, method, "redis").observe(redis_s)
        for stage, secs in result.timings.items():
            m.child(m.stage, method, stage).observe(secs)

    # ---- reads -----------------------------------------------------------------------------
    async def _recommend(
        self, method: str, request, context, friends: bool
    ) -> tuple[Result, Engine, bool]:
        """Shared read path: validate, read features (one Redis round trip), rank or fall back."""
        t0 = time.perf_counter()
        err = self._check_id("user_id", request.user_id) or self._check_k(request.k)
        if err:
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, err)
        live = await self._live(context, method)
        engine = live.engine
        t1 = time.perf_counter()
        features = await self._read(request.user_id, friends)
        redis_s = time.perf_counter() - t1 if features is not None else None
        await self._deadline(context, method)
        if features is None:
            if self.metrics:
                self.metrics.child(self.metrics.degraded, method).inc()
            if friends:
                result = engine.popular_friends(request.user_id, request.k)
            else:
                result = engine.popular_content(request.k)
        else:
            result = rank(live, request.user_id, request.k, friends, features)
        self._observe(context, method, t0, result, redis_s)
        return result, engine, features is None

    async def RecommendContent(
        self, request: pb.RecommendContentRequest, context
    ) -> pb.RecommendContentResponse:
        result, engine, degraded = await self._recommend(
            "RecommendContent", request, context, friends=False
        )
        return pb.RecommendContentResponse(
            items=[
                pb.Recommendation(id=s.id, score=s.score, reason=s.reason) for s in result.items
            ],
            bundle_version=engine.version,
            cold_start=result.cold_start,
            degraded=degraded,
        )

    async def RecommendFriends(
        self, request: pb.RecommendFriendsRequest, context
    ) -> pb.RecommendFriendsResponse:
        result, engine, degraded = await self._recommend(
            "RecommendFriends", request, context, friends=True
        )
        return pb.RecommendFriendsResponse(
            users=[
                pb.Recommendation(
                    id=s.id, score=s.score, reason=s.reason, mutual_friends=s.mutual_friends
                )
                for s in result.items
            ],
            bundle_version=engine.version,
            cold_start=result.cold_start,
            degraded=degraded,
        )

    # ---- writes ----------------------------------------------------------------------------
    async def _write(self, context, method: str, fn, *args) -> str:
        t0 = time.perf_counter()
        await self._deadline(context, method)
        try:
            event_id = await fn(*args)
        except StoreUnavailable as e:
            await self._fail(
                context,
                method,
                grpc.StatusCode.UNAVAILABLE,
                f"feature store unavailable, write not recorded: {e}",
            )
        except ValueError as e:
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.metrics:
            m, dt = self.metrics, time.perf_counter() - t0
            m.child(m.latency, method).observe(dt)
            m.child(m.stage, method, "redis").observe(dt)
            m.child(m.requests, method, "OK").inc()
        return event_id

    async def LogInteraction(
        self, request: pb.LogInteractionRequest, context
    ) -> pb.LogInteractionResponse:
        method = "LogInteraction"
        await self._authorize(context, method)
        err = self._check_id("user_id", request.user_id) or self._check_id(
            "item_id", request.item_id
        )
        if not err and (not math.isfinite(request.weight) or request.weight <= 0):
            err = f"weight must be a finite number > 0, got {request.weight}"
        if not err and request.timestamp_ms < 0:
            err = f"timestamp_ms must be >= 0 (0 = server time), got {request.timestamp_ms}"
        if err:
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, err)
        ts = request.timestamp_ms or int(time.time() * 1000)
        event_id = await self._write(
            context,
            method,
            self.store.alog_interaction,
            request.user_id,
            request.item_id,
            float(request.weight),
            ts,
        )
        return pb.LogInteractionResponse(event_id=event_id)

    async def _friendship(
        self, request: pb.FriendshipRequest, context, method: str, fn
    ) -> pb.FriendshipResponse:
        await self._authorize(context, method)
        err = self._check_id("user_id", request.user_id) or self._check_id(
            "friend_id", request.friend_id
        )
        if not err and request.user_id == request.friend_id:
            err = "friend_id must differ from user_id"
        if err:
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, err)
        await self._write(
            context, method, fn, request.user_id, request.friend_id, int(time.time() * 1000)
        )
        return pb.FriendshipResponse()

    async def AddFriendship(self, request: pb.FriendshipRequest, context) -> pb.FriendshipResponse:
        return await self._friendship(request, context, "AddFriendship", self.store.aadd_friendship)

    async def RemoveFriendship(
        self, request: pb.FriendshipRequest, context
    ) -> pb.FriendshipResponse:
        return await self._friendship(
            request, context, "RemoveFriendship", self.store.aremove_friendship
        )


def rank(live: Live, user_id: str, k: int, friends: bool, features: UserFeatures) -> Result:
    """The engine's answer for these features, through the live bundle's exact result cache.

    A hit comes back with ``timings == {"cache": secs}``.
    """
    cache, engine = live.cache, live.engine
    slot = (friends, user_id, k)
    if cache is not None:
        t0 = time.perf_counter()
        hit = cache.get(slot, features)
        if hit is not None:
            return Result(
                hit.items, hit.cold_start, {"cache": time.perf_counter() - t0}, hit.unknown
            )
    f = features
    if friends:
        res = engine.recommend_friends(user_id, f.history, f.friends, f.fof, k)
    else:
        res = engine.recommend_content(f.history, f.friends, k)
    if cache is not None:
        cache.put(slot, features, res)
    return res
