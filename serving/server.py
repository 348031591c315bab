"""The gRPC server: a thin servicer over the engine (ONNX + FAISS) and the Redis store.

One process per worker, forked before any gRPC server exists, all bound to the same port
with ``grpc.so_reuseport``; every library runs on one thread inside a worker. Handlers call
the engine directly on the event loop (a short CPU burst: thread hops would cost more than
they save) and await Redis over a pipelined connection (serving.resp), so a worker keeps
answering other requests while one waits for its features.

Bundles hot-reload on SIGHUP or when the watched pointer changes: the new bundle is loaded,
verified and warmed in a background thread, then swapped in with one reference assignment;
a bad bundle is refused with a log line and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from socialrec.serving.bundle import BundleError
from socialrec.serving.engine import Engine, EngineConfig, Result
from socialrec.serving.store import (
    FeatureStore,
    StoreConfig,
    StoreUnavailable,
    features_from_replies,
)

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc

log = logging.getLogger("socialrec.server")
SERVICE = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
POINTER = "CURRENT"
REDIS_RETRY_S = 0.5  # a bundle root may hold a pointer file naming the live bundle directory


@dataclass(frozen=True)
class ServerConfig:
    bundle: str
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "socialrec"
    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 1
    metrics_port: int | None = None
    max_k: int = 500
    max_id_len: int = 256
    max_concurrent_rpcs: int = 256
    write_token: str | None = None  # default: $SOCIALREC_WRITE_TOKEN or token_file
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    watch_interval_s: float = 2.0
    history_cap: int = 256
    redis_spin_us: int = 0  # see StoreConfig.spin_us
    engine: EngineConfig = field(default_factory=EngineConfig)


def resolve_bundle(path: str | Path) -> Path:
    """A bundle directory, or a root whose CURRENT file names the live bundle (relative to it)."""
    p = Path(path)
    pointer = p / POINTER
    if pointer.is_file():
        target = pointer.read_text().strip()
        return (p / target).resolve() if not os.path.isabs(target) else Path(target)
    return p.resolve()


def load_token(cfg: ServerConfig) -> str | None:
    if cfg.write_token:
        return cfg.write_token
    if cfg.token_file:
        return Path(cfg.token_file).read_text().strip() or None
    return os.environ.get("SOCIALREC_WRITE_TOKEN") or None


class EngineHolder:
    """The live engine; swapped atomically by a reload, never mutated in place."""

    def __init__(self, cfg: ServerConfig, metrics: Metrics | None) -> None:
        self.cfg = cfg
        self.engine: Engine | None = None
        self.path: Path | None = None
        self.metrics = metrics
        self._lock = threading.Lock()

    def load(self, path: Path) -> bool:
        """Load, verify and warm ``path``; swap it in only if all of that succeeds."""
        with self._lock:
            t0 = time.perf_counter()
            try:
                engine = Engine.load(path, verify=True, config=self.cfg.engine)
                engine.warmup()
            except (BundleError, OSError, RuntimeError, ValueError) as e:
                log.error(
                    "bundle refused",
                    extra={"event": "bundle_refused", "bundle": str(path), "error": str(e)},
                )
                if self.metrics:
                    self.metrics.reloads.labels("refused").inc()
                return False
            old = self.engine.version if self.engine else None
            self.engine, self.path = engine, path
            log.info(
                "bundle live",
                extra={
                    "event": "bundle_live",
                    "bundle": str(path),
                    "version": engine.version,
                    "previous": old,
                    "load_s": round(time.perf_counter() - t0, 3),
                },
            )
            if self.metrics:
                self.metrics.reloads.labels("ok").inc()
                self.metrics.set_version(engine.version)
            return True


class Metrics:
    """Prometheus metrics; in multi-worker mode they live in PROMETHEUS_MULTIPROC_DIR."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        buckets = (
            5e-5,
            1e-4,
            1.5e-4,
            2e-4,
            3e-4,
            4e-4,
            5e-4,
            7.5e-4,
            1e-3,
            1.5e-3,
            2e-3,
            3e-3,
            5e-3,
            7.5e-3,
            0.01,
            0.025,
            0.05,
            0.1,
            0.25,
            1.0,
        )
        self.latency = Histogram(
            "socialrec_rpc_seconds", "RPC latency", ["method"], buckets=buckets
        )
        self.stage = Histogram(
            "socialrec_stage_seconds",
            "Latency of a request stage",
            ["method", "stage"],
            buckets=buckets,
        )
        self.requests = Counter(
            "socialrec_requests_total", "RPCs by final status", ["method", "code"]
        )
        self.reloads = Counter(
            "socialrec_bundle_reloads_total", "Bundle loads by outcome", ["outcome"]
        )
        self.degraded = Counter(
            "socialrec_degraded_total", "Reads answered without Redis", ["method"]
        )
        self.version = Gauge(
            "socialrec_bundle_info",
            "Live bundle version (value 1)",
            ["version"],
            multiprocess_mode="livemax",
        )
        self._version: str | None = None
        self._children: dict[tuple, object] = {}

    def child(self, metric, *labels: str):
        """``metric.labels(*labels)``, cached: the lookup costs about as much as the update."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def set_version(self, version: str) -> None:
        if self._version is not None:
            self.version.labels(self._version).set(0)
        self.version.labels(version).set(1)
        self._version = version


class RecommenderService(pb_grpc.RecommenderServicer):
    """Validation, auth and response shaping; ranking lives in the engine, state in Redis."""

    def __init__(
        self, cfg: ServerConfig, holder: EngineHolder, store: FeatureStore, metrics: Metrics | None
    ) -> None:
        self.cfg = cfg
        self.holder = holder
        self.store = store
        self.metrics = metrics
        self.token = load_token(cfg)
        self._redis_down_until = 0.0  # circuit breaker: skip Redis reads briefly after a failure

    async def _read(self, user_id: str, with_fof: bool):
        """The feature read's raw replies from Redis, or None (degraded). After a failure, reads skip Redis for
        ``REDIS_RETRY_S`` so an outage costs one socket timeout, not one per request."""
        now = time.monotonic()
        if now < self._redis_down_until:
            return None
        try:
            return await self.store.aread_replies(user_id, with_fof=with_fof)
        except StoreUnavailable as e:
            self._redis_down_until = now + REDIS_RETRY_S
            log.warning(
                "redis unavailable; answering from the bundle",
                extra={"event": "redis_down", "error": str(e)},
            )
            return None

    # ---- helpers -------------------------------------------------------------------------
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
                "writes are disabled: the server has no write token (set SOCIALREC_WRITE_TOKEN or --token-file)",
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

    async def _engine(self, context: grpc.aio.ServicerContext, method: str) -> Engine:
        engine = self.holder.engine
        if engine is None:
            await self._fail(context, method, grpc.StatusCode.UNAVAILABLE, "no bundle loaded yet")
        return engine

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
        engine = await self._engine(context, method)
        t1 = time.perf_counter()
        replies = await self._read(request.user_id, friends)
        redis_s = time.perf_counter() - t1 if replies is not None else None
        await self._deadline(context, method)
        if replies is None:
            if self.metrics:
                self.metrics.child(self.metrics.degraded, method).inc()
            if friends:
                result = engine.popular_friends(request.user_id, request.k)
            else:
                result = engine.popular_content(request.k)
        else:
            result = engine.recommend(
                request.user_id,
                request.k,
                friends,
                replies,
                partial(features_from_replies, replies),
            )
        self._observe(context, method, t0, result, redis_s)
        return result, engine, replies is None

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


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, worker pid and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for k, v in record.__dict__.items():
            if k not in logging.LogRecord("", 0, "", 0, "", None, None).__dict__ and k not in (
                "message",
            ):
                out[k] = v
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


async def serve_worker(
    cfg: ServerConfig, worker: int = 0, ready: threading.Event | None = None
) -> None:
    """Run one worker's gRPC server until SIGTERM/SIGINT; SIGHUP reloads the bundle."""
    metrics = Metrics() if cfg.metrics_port is not None else None
    holder = EngineHolder(cfg, metrics)
    store = FeatureStore(
        StoreConfig(
            url=cfg.redis_url,
            namespace=cfg.namespace,
            history_cap=cfg.history_cap,
            spin_us=cfg.redis_spin_us,
        )
    )
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", 1 << 20)],
        maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
    )
    services = _GenericOnly(server)
    pb_grpc.add_RecommenderServicer_to_server(
        RecommenderService(cfg, holder, store, metrics), services
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, services)
    reflection.enable_server_reflection(
        (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), services
    )
    address = f"{cfg.host}:{cfg.port}"
    if cfg.tls_cert and cfg.tls_key:
        creds = grpc.ssl_server_credentials(
            [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())]
        )
        server.add_secure_port(address, creds)
    else:
        server.add_insecure_port(address)
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reload_now = asyncio.Event()

    async def load(target: Path) -> bool:
        ok = await loop.run_in_executor(None, holder.load, target)
        if ok:
            for name in ("", SERVICE):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        return ok

    # Load before listening: SO_REUSEPORT hands new connections to every listening worker, so a
    # worker that listened first would answer UNAVAILABLE while its siblings already serve
    # (at start-up, and when the supervisor replaces a dead worker). A worker whose bundle
    # fails to load listens anyway, NOT_SERVING, and keeps watching for a good one.
    target = resolve_bundle(cfg.bundle)
    failed: Path | None = None if await load(target) else target
    await server.start()
    log.info("worker listening", extra={"event": "listening", "address": address, "worker": worker})

    async def watch() -> None:
        """Reload when the pointer names another bundle (a refused one is not retried until
        the pointer moves again), or on SIGHUP (always). Bundles are immutable directories."""
        nonlocal failed
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reload_now.wait(), timeout=cfg.watch_interval_s)
            forced = reload_now.is_set()
            reload_now.clear()
            try:
                target = resolve_bundle(cfg.bundle)
            except OSError as e:
                log.error(
                    "bundle pointer unreadable", extra={"event": "pointer_error", "error": str(e)}
                )
                continue
            if forced or (target != holder.path and target != failed):
                failed = None if await load(target) else target

    loop.add_signal_handler(signal.SIGHUP, reload_now.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if ready is not None:
        ready.set()
    watcher = asyncio.create_task(watch())
    await stop.wait()
    log.info("worker stopping", extra={"event": "stopping", "worker": worker})
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=2.0)
    watcher.cancel()
    store.close()


class _GenericOnly:
    """A server as the generated ``add_*_to_server`` functions see it: services are added as
    generic handlers only, not also as registered methods.

    grpc.aio keeps one pending request per registered method and waits on all of them with
    ``asyncio.wait`` for every call it accepts (~9 methods over the three services here);
    generic dispatch is one dict lookup. The gain is small: ~1.5% of the server CPU of a
    trivial call in ``benchmarks/rpc_overhead.py`` (183.7 vs 186.4 us, medians of 5 rounds;
    rounds vary by +-7%), 4% in a first A/B run.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        pass  # already served through the generic handler added alongside


def pin_threads() -> None:
    """One thread per library per worker (DESIGN.md performance rules); before imports run."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"


def _worker_main(cfg: ServerConfig, worker: int) -> None:
    setup_logging()
    asyncio.run(serve_worker(cfg, worker))


def serve(cfg: ServerConfig) -> int:
    """Fork ``cfg.workers`` processes (before any gRPC server exists), serve metrics, supervise.

    SIGHUP is forwarded to every worker (bundle reload); SIGTERM/SIGINT stop them all. A
    worker that dies is restarted.
    """
    import multiprocessing as mp
    import tempfile

    pin_threads()
    setup_logging()
    if cfg.metrics_port is not None:
        mdir = os.environ.setdefault(
            "PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="socialrec-metrics-")
        )
        for f in Path(mdir).glob("*.db"):
            f.unlink()
    ctx = mp.get_context("fork")
    procs: dict[int, mp.Process] = {}

    def start(i: int) -> None:
        p = ctx.Process(
            target=_worker_main, args=(cfg, i), daemon=False, name=f"socialrec-worker-{i}"
        )
        p.start()
        procs[i] = p

    for i in range(cfg.workers):
        start(i)
    if cfg.metrics_port is not None:
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        start_http_server(cfg.metrics_port, addr=cfg.host, registry=registry)
        log.info("metrics listening", extra={"event": "metrics", "port": cfg.metrics_port})

    stopping = threading.Event()

    def forward(signum, _frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping.set()
        for p in procs.values():
            if p.pid and p.is_alive():
                os.kill(p.pid, signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM)

    for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(s, forward)
    while not stopping.is_set():
        for i, p in list(procs.items()):
            if not p.is_alive() and not stopping.is_set():
                log.warning(
                    "worker died; restarting",
                    extra={"event": "worker_restart", "worker": i, "exitcode": p.exitcode},
                )
                if cfg.metrics_port is not None:
                    from prometheus_client import multiprocess

                    multiprocess.mark_process_dead(p.pid)
                start(i)
        stopping.wait(0.5)
    for p in procs.values():
        p.join(timeout=10)
    return 0
