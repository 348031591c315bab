"""The gRPC servicer: validate, read features, call the engine, build the reply.

Ranking lives in the engine (pure), state in Redis (:mod:`socialrec.serving.store`), the
exact result cache in :mod:`socialrec.serving.cache`, the live bundle in the worker's holder.
Handlers run on the worker's event loop: they await Redis and call the engine directly (a
short CPU burst; a thread hop would cost more than it saves).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
from socialrec.serving.batcher import Batcher
from socialrec.serving.cache import ResultCache
from socialrec.serving.config import ServerConfig, load_admin_token, load_token
from socialrec.serving.engine import (
    ContentQuery,
    Engine,
    FreshIndex,
    FriendQuery,
    Query,
    Result,
    still_exact,
)
from socialrec.serving.fresh_serving import FreshItems
from socialrec.serving.observability import Metrics, RateLimitedLog
from socialrec.serving.schema import UserFeatures, check_id
from socialrec.serving.store import (
    FeatureStore,
    ReplicationTimeout,
    StoreDataError,
    StoreUnavailable,
    TryAgain,
    WriteConflict,
)

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc

log = logging.getLogger("socialrec.server")
SERVICE = pb.DESCRIPTOR.services_by_name["Recommender"]
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
        self.admin_token = load_admin_token(cfg)
        # Items taken down, as of the version every content read fetches (see _removed_items).
        self._removed: tuple[int, frozenset[str]] = (0, frozenset())
        self._redis_down_until = 0.0  # circuit breaker: skip Redis reads briefly after a failure
        self._bad_data_log = RateLimitedLog(log)
        self._ack_log = RateLimitedLog(log)
        self._down_log = RateLimitedLog(log)  # every read fails while Redis is down
        # Fresh items: the fold-in after writes and the side index (its poller is started by
        # the worker, see worker.serve_worker).
        self.fresh = FreshItems(cfg, holder, store, metrics)
        # Dynamic batching of the engine work (docs/design.md "Dynamic batching").
        observe = metrics.batch_size.observe if metrics else None
        engine_cpu = metrics.engine_cpu.inc if metrics else None
        self.batcher = Batcher(cfg.batch_max, cfg.batch_wait_us / 1e6, observe, engine_cpu)

    # ---- helpers -------------------------------------------------------------------------
    async def _read(self, method: str, user_id: str, with_fof: bool) -> UserFeatures | None:
        """The user's features from Redis, or None (degraded). After Redis failed, reads skip
        it for ``REDIS_RETRY_S`` so an outage costs one socket timeout, not one per request;
        bad data under one user's keys degrades that user's answer only."""
        now = time.monotonic()
        if now < self._redis_down_until:
            self._degraded(method, "unavailable")
            return None
        try:
            return await self.store.aread(user_id, with_fof=with_fof)
        except StoreDataError as e:
            self._degraded(method, "bad_data")
            self._bad_data_log.warning(
                "unreadable features; answering from the bundle",
                event="bad_data", user=user_id, error=str(e),
            )  # fmt: skip
            return None
        except TryAgain:  # one migrating cluster slot: this read degrades, not every read
            self._degraded(method, "unavailable")
            return None
        except StoreUnavailable as e:
            self._redis_down_until = now + REDIS_RETRY_S
            self._degraded(method, "unavailable")
            self._down_log.warning(
                "redis unavailable; answering from the bundle", event="redis_down", error=str(e)
            )
            return None

    def _degraded(self, method: str, reason: str) -> None:
        if self.metrics:
            self.metrics.child(self.metrics.degraded, method, reason).inc()

    async def _fail(
        self, context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode, msg: str
    ):
        # Counted before the abort: the client may see the status before this coroutine ends.
        if self.metrics:
            self.metrics.child(self.metrics.requests, method, code.name).inc()
        await abort(context, code, msg)

    async def _id(self, context, method: str, name: str, value: str) -> str:
        """``value`` as the store keys it (NFC), or INVALID_ARGUMENT naming the field."""
        try:
            return check_id(name, value, self.cfg.max_id_len)
        except ValueError as e:
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def _k(self, context, method: str, k: int) -> int:
        if k <= 0 or k > self.cfg.max_k:
            msg = f"k must be between 1 and {self.cfg.max_k}, got {k}"
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, msg)
        return k

    async def _authorize(
        self, context: grpc.aio.ServicerContext, method: str, admin: bool = False
    ) -> None:
        """The bearer token must be the write token (or, for ``admin`` RPCs, the admin token;
        the write token there is PERMISSION_DENIED). Compared in constant time."""
        want = self.admin_token if admin else self.token
        if want is None:
            what = "admin RPCs are" if admin else "writes are"
            hint = (
                "SOCIALREC_ADMIN_TOKEN or --admin-token-file"
                if admin
                else ("SOCIALREC_WRITE_TOKEN or --token-file")
            )
            await self._fail(
                context,
                method,
                grpc.StatusCode.UNAUTHENTICATED,
                f"{what} disabled: the server has no token for them (set {hint})",
            )
        got = dict(context.invocation_metadata() or ()).get("authorization", "")
        # The scheme is case-insensitive (RFC 7235); the token is not.
        presented = got[7:].encode() if got[:7].lower() == "bearer " else b""
        if presented and hmac.compare_digest(presented, want.encode()):
            return
        if (
            admin
            and self.token
            and presented
            and hmac.compare_digest(presented, self.token.encode())
        ):
            await self._fail(
                context,
                method,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs the admin token; the write token is not enough",
            )
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
        if redis_s is not None:
            m.child(m.stage, method, "redis").observe(redis_s)
        for stage, secs in result.timings.items():
            m.child(m.stage, method, stage).observe(secs)

    # ---- reads -----------------------------------------------------------------------------
    async def _exclude(self, context, method: str, ids) -> frozenset[str]:
        if len(ids) > self.cfg.max_exclude:
            msg = f"exclude_ids holds {len(ids)} ids; at most {self.cfg.max_exclude}"
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, msg)
        try:
            return frozenset(check_id("exclude_ids", x, self.cfg.max_id_len) for x in ids)
        except ValueError as e:
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def _removed_items(self, version: int | None) -> frozenset[str]:
        """Items taken down, at least as new as ``version`` (the one the feature read just saw;
        None: Redis is down, use what is known). The set is fetched again only when a read
        shows a newer version, so a takedown is seen by the next content read of any worker."""
        known, items = self._removed
        if version is None or version == known:
            return items
        try:
            self._removed = await self.store.aremoved()
        except StoreUnavailable as e:
            log.warning(
                "could not refresh taken-down items", extra={"event": "removed", "error": str(e)}
            )
        return self._removed[1]

    async def _recommend(
        self, method: str, request, context, friends: bool
    ) -> tuple[Result, Engine, bool]:
        """Shared read path: validate, read features and filters (one Redis round trip), rank
        or fall back; filters apply to every answer, fallbacks included."""
        t0 = time.perf_counter()
        user = await self._id(context, method, "user_id", request.user_id)
        k = await self._k(context, method, request.k)
        exclude = await self._exclude(context, method, request.exclude_ids)
        live = await self._live(context, method)
        engine = live.engine
        t1 = time.perf_counter()
        with self.batcher.arriving():
            features = await self._read(method, user, friends)
            redis_s = time.perf_counter() - t1 if features is not None else None
            await self._deadline(context, method)
            removed: frozenset[str] = frozenset()
            if not friends:
                removed = await self._removed_items(
                    None if features is None else features.removed_version
                )
        if features is None:
            if friends:
                # No suggestions: without the store the user's blocks are unknown, and a
                # blocked person must never be suggested (popular users could include one).
                result = Result([], False, {"rank": 0.0})
            else:
                result = engine.popular_content(k, exclude=removed | exclude)
        else:
            fresh = self.fresh.index if self.cfg.fresh_items and not friends else None
            slot = (friends, user, k)
            result = cached(live, slot, features, exclude, fresh)
            if result is None:
                query = make_query(user, k, friends, features, exclude, removed, fresh)
                result = await self.batcher.run(engine, query)
                if live.cache is not None and not exclude:
                    live.cache.put(slot, features, result)
        self._observe(context, method, t0, result, redis_s)
        return result, engine, features is None

    async def RecommendContent(
        self, request: pb.RecommendContentRequest, context
    ) -> pb.RecommendContentResponse:
        result, engine, degraded = await self._recommend(
            "RecommendContent", request, context, friends=False
        )
        reply = pb.RecommendContentResponse(
            bundle_version=engine.version, cold_start=result.cold_start, degraded=degraded
        )
        add = reply.items.add  # built in place: half the CPU of Recommendation(...) then a copy
        for s in result.items:
            add(id=s.id, score=s.score, reason=s.reason)
        return reply

    async def RecommendFriends(
        self, request: pb.RecommendFriendsRequest, context
    ) -> pb.RecommendFriendsResponse:
        result, engine, degraded = await self._recommend(
            "RecommendFriends", request, context, friends=True
        )
        reply = pb.RecommendFriendsResponse(
            bundle_version=engine.version, cold_start=result.cold_start, degraded=degraded
        )
        add = reply.users.add
        for s in result.items:
            add(id=s.id, score=s.score, reason=s.reason, mutual_friends=s.mutual_friends)
        return reply

    # ---- writes ----------------------------------------------------------------------------
    async def _write(self, context, method: str, fn, *args) -> str:
        t0 = time.perf_counter()
        await self._deadline(context, method)
        try:
            event_id = await fn(*args)
        except ValueError as e:
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except WriteConflict as e:
            await self._fail(context, method, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except StoreDataError as e:
            await self._fail(
                context,
                method,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"write not recorded: the store holds data it cannot apply to ({e})",
            )
        except ReplicationTimeout as e:  # applied on the primary, its replicas did not confirm
            self._ack_log.warning(
                "write not acknowledged: replicas did not confirm it",
                event="ack_timeout", method=method, error=str(e),
            )  # fmt: skip
            await self._fail(context, method, grpc.StatusCode.UNAVAILABLE, str(e))
        except StoreUnavailable as e:
            await self._fail(
                context,
                method,
                grpc.StatusCode.UNAVAILABLE,
                f"feature store did not confirm the write ({e}); it may or may not be recorded: "
                "retry with the same request_id",
            )
        if self.metrics:
            m, dt = self.metrics, time.perf_counter() - t0
            m.child(m.latency, method).observe(dt)
            m.child(m.stage, method, "redis").observe(dt)
        return event_id

    async def LogInteraction(
        self, request: pb.LogInteractionRequest, context
    ) -> pb.LogInteractionResponse:
        method = "LogInteraction"
        await self._authorize(context, method)
        user = await self._id(context, method, "user_id", request.user_id)
        item = await self._id(context, method, "item_id", request.item_id)
        now = int(time.time() * 1000)
        event_id = await self._write(
            context,
            method,
            self.store.alog_interaction,
            user,
            item,
            request.weight,
            request.timestamp_ms or now,
            request.request_id,
            now,
        )
        if self.cfg.fresh_items:  # never raises: the write above is acknowledged whatever happens
            ack = int(time.time() * 1000)
            await self.fresh.on_interaction(user, item, request.timestamp_ms or now, ack)
        return pb.LogInteractionResponse(event_id=event_id)

    async def _friendship(
        self, request: pb.FriendshipRequest, context, method: str, fn
    ) -> pb.FriendshipResponse:
        await self._authorize(context, method)
        user = await self._id(context, method, "user_id", request.user_id)
        friend = await self._id(context, method, "friend_id", request.friend_id)
        if user == friend:
            await self._fail(
                context,
                method,
                grpc.StatusCode.INVALID_ARGUMENT,
                "friend_id must differ from user_id",
            )
        now = int(time.time() * 1000)
        event_id = await self._write(context, method, fn, user, friend, now, request.request_id)
        return pb.FriendshipResponse(event_id=event_id)

    async def AddFriendship(self, request: pb.FriendshipRequest, context) -> pb.FriendshipResponse:
        return await self._friendship(request, context, "AddFriendship", self.store.aadd_friendship)

    async def RemoveFriendship(
        self, request: pb.FriendshipRequest, context
    ) -> pb.FriendshipResponse:
        return await self._friendship(
            request, context, "RemoveFriendship", self.store.aremove_friendship
        )

    async def Dismiss(self, request: pb.DismissRequest, context) -> pb.DismissResponse:
        method = "Dismiss"
        await self._authorize(context, method)
        user = await self._id(context, method, "user_id", request.user_id)
        item, other = request.item_id, request.other_user_id
        if item:  # exactly one of the two must be set: the store says so if not
            item = await self._id(context, method, "item_id", item)
        if other:
            other = await self._id(context, method, "other_user_id", other)
        now = int(time.time() * 1000)
        event_id = await self._write(
            context, method, self.store.adismiss, user, item, other, now, request.request_id
        )
        return pb.DismissResponse(event_id=event_id)

    async def _block(self, request: pb.BlockRequest, context, method: str, op: str):
        await self._authorize(context, method)
        user = await self._id(context, method, "user_id", request.user_id)
        blocked = await self._id(context, method, "blocked_id", request.blocked_id)
        now = int(time.time() * 1000)
        event_id = await self._write(
            context, method, self.store.ablock, op, user, blocked, now, request.request_id
        )
        return pb.BlockResponse(event_id=event_id)

    async def BlockUser(self, request: pb.BlockRequest, context) -> pb.BlockResponse:
        return await self._block(request, context, "BlockUser", "block")

    async def UnblockUser(self, request: pb.BlockRequest, context) -> pb.BlockResponse:
        return await self._block(request, context, "UnblockUser", "unblock")

    async def _item(self, request: pb.ItemRequest, context, method: str, op: str):
        await self._authorize(context, method, admin=True)
        item = await self._id(context, method, "item_id", request.item_id)
        now = int(time.time() * 1000)
        event_id = await self._write(
            context, method, self.store.aitem, op, item, now, request.request_id
        )
        return pb.ItemResponse(event_id=event_id)

    async def RemoveItem(self, request: pb.ItemRequest, context) -> pb.ItemResponse:
        return await self._item(request, context, "RemoveItem", "remove")

    async def RestoreItem(self, request: pb.ItemRequest, context) -> pb.ItemResponse:
        return await self._item(request, context, "RestoreItem", "restore")


class CallEnded(Exception):
    """An abort found the call already over (its deadline passed or the client cancelled it):
    gRPC has answered it, so nothing more can be sent."""


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, msg: str):
    """``context.abort``, or :class:`CallEnded` when the call is already over (gRPC then
    refuses to send a status; it raised ExecuteBatchError, an internal type, before)."""
    try:
        await context.abort(code, msg)
    except grpc.aio.AbortError:
        raise
    except Exception:
        if _over(context):
            raise CallEnded(code.name) from None
        raise


async def _refuse(context: grpc.aio.ServicerContext, code: grpc.StatusCode, msg: str):
    """:func:`abort` for the dispatcher, outside the servicer: a call already over ends with
    CancelledError, which gRPC takes silently."""
    try:
        await abort(context, code, msg)
    except CallEnded:
        raise asyncio.CancelledError() from None


def _expired(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _over(context: grpc.aio.ServicerContext) -> bool:
    """Whether gRPC has already answered the call (done, or its deadline has passed)."""
    return context.done() or _expired(context)


class Malformed:
    """A request whose bytes did not parse (the handler answers INVALID_ARGUMENT)."""

    def __init__(self, error: str) -> None:
        self.error = error


def _safe_parser(message: type) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return message.FromString(data)
        except Exception as e:  # DecodeError, or anything else protobuf raises on bad bytes
            return Malformed(type(e).__name__)

    return parse


class Dispatcher:
    """Every RPC of the service through one wrapper: malformed bytes are INVALID_ARGUMENT,
    load beyond ``max_in_flight`` is shed with RESOURCE_EXHAUSTED, an unexpected error is
    INTERNAL (logged, rate-limited; never UNKNOWN), and every answered status, shed and
    cancelled calls included, is counted in ``socialrec_requests_total{method,code}`` (here,
    or by the servicer's ``_fail`` for the statuses it answers)."""

    def __init__(
        self, service: RecommenderService, metrics: Metrics | None, max_in_flight: int
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._bad_log = RateLimitedLog(log)
        self._bug_log = RateLimitedLog(log)

    def handler(self) -> grpc.GenericRpcHandler:
        handlers = {}
        for m in SERVICE.methods:
            req, resp = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                self._wrap(m.name, getattr(self.service, m.name)),
                request_deserializer=_safe_parser(req),
                response_serializer=resp.SerializeToString,
            )
        return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        if self.metrics:
            self.metrics.child(self.metrics.requests, method, code.name).inc()

    def _ended(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Count a call that ended under its handler as gRPC answered it: its deadline, or
        cancelled. The handler then ends with CancelledError, which gRPC takes silently (a
        response or a status can no longer be sent)."""
        code = grpc.StatusCode.DEADLINE_EXCEEDED if _expired(context) else grpc.StatusCode.CANCELLED
        self._count(method, code)

    def _wrap(self, method: str, fn):
        async def call(request, context: grpc.aio.ServicerContext):
            if isinstance(request, Malformed):
                self._count(method, grpc.StatusCode.INVALID_ARGUMENT)
                self._bad_log.warning(
                    "malformed request", event="bad_request", method=method, error=request.error
                )
                await _refuse(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request bytes are not a valid {method} request message",
                )
            if self.in_flight >= self.max_in_flight:
                self._count(method, grpc.StatusCode.RESOURCE_EXHAUSTED)
                await _refuse(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server busy ({self.in_flight} requests in flight); retry with backoff",
                )
            self.in_flight += 1
            try:
                reply = await fn(request, context)
                self._count(method, grpc.StatusCode.OK)
                return reply
            except grpc.aio.AbortError:
                raise  # counted by the servicer's _fail before it aborted
            except asyncio.CancelledError:  # gRPC cancels the handler when the call ends
                self._ended(method, context)
                raise
            except CallEnded:  # counted by _fail; gRPC answered the call itself
                raise asyncio.CancelledError() from None
            except Exception as e:
                if _over(context):  # the client was answered already
                    self._ended(method, context)
                    self._bug_log.warning(
                        "error after the call ended", event="internal_error", method=method,
                        error=f"{type(e).__name__}: {e}",
                    )  # fmt: skip
                    raise asyncio.CancelledError() from None
                self._count(method, grpc.StatusCode.INTERNAL)
                self._bug_log.warning(
                    "internal error", event="internal_error", method=method,
                    error=f"{type(e).__name__}: {e}",
                )  # fmt: skip
                await _refuse(context, grpc.StatusCode.INTERNAL, "internal error")
            finally:
                self.in_flight -= 1

        return call


def cached(
    live: Live,
    slot: tuple[bool, str, int],
    features: UserFeatures,
    exclude: frozenset[str],
    fresh: FreshIndex | None,
) -> Result | None:
    """The result cache's answer for ``slot`` = (friends, user, k) and these features, if it
    holds one that is still exact; None otherwise, and always for a request with its own
    ``exclude`` list (it bypasses the cache). A hit comes back with
    ``timings == {"cache": secs}``."""
    cache = live.cache
    if cache is None or exclude:
        return None
    t0 = time.perf_counter()
    hit = cache.get(slot, features)
    if hit is not None and (slot[0] or still_exact(hit, slot[2], fresh)):
        return Result(hit.items, hit.cold_start, {"cache": time.perf_counter() - t0}, hit.unknown)
    return None


def make_query(
    user_id: str,
    k: int,
    friends: bool,
    features: UserFeatures,
    exclude: frozenset[str] = frozenset(),
    removed: frozenset[str] = frozenset(),
    fresh: FreshIndex | None = None,
) -> Query:
    """The engine query of a read: content answers leave out everything the user has seen and
    dismissed and every item taken down; friend answers everyone dismissed or blocked either
    way; both leave out ``exclude`` (the request's own list)."""
    f = features
    if friends:
        banned = _union(f.dismissed, f.blocked, exclude)
        return FriendQuery(user_id, f.history, f.friends, f.fof, k, banned)
    return ContentQuery(
        f.history, f.friends, k, _union(f.seen, f.dismissed, removed, exclude), fresh
    )


def _union(*sets: frozenset[str]) -> frozenset[str]:
    """The union of ``sets``, not copied when at most one is non-empty (the usual content
    read: its seen set, nothing dismissed, taken down or excluded)."""
    full = [s for s in sets if s]
    if len(full) == 1:
        return full[0]
    return frozenset().union(*full)


def rank(
    live: Live,
    user_id: str,
    k: int,
    friends: bool,
    features: UserFeatures,
    exclude: frozenset[str] = frozenset(),
    removed: frozenset[str] = frozenset(),
    fresh: FreshIndex | None = None,
) -> Result:
    """The engine's filtered answer for these features (:func:`make_query`), through the
    live bundle's exact result cache (:func:`cached`), unbatched; the servicer does the same
    through its batcher.

    The filters are part of the features (the takedown set by its version), so the cache
    stays exact; a request with its own exclude list bypasses it. Content answers also search
    the ``fresh`` side index. A cached content answer is reused after the side index changed
    only if no fresh row that changed since could enter it
    (:func:`socialrec.serving.engine.still_exact`: the stored query vector against the changed
    rows, a few microseconds), so fresh writes do not empty the cache and the cache stays exact.
    """
    slot = (friends, user_id, k)
    hit = cached(live, slot, features, exclude, fresh)
    if hit is not None:
        return hit
    query = make_query(user_id, k, friends, features, exclude, removed, fresh)
    res = live.engine.recommend_batch([query])[0]
    if live.cache is not None and not exclude:
        live.cache.put(slot, features, res)
    return res
