"""One worker process: a grpc.aio server on the shared port, the live bundle, hot reload.

Bundles hot-reload on SIGHUP or when the watched pointer changes: the new bundle is loaded,
verified and warmed in a background thread, then swapped in with one reference assignment;
a bad bundle is refused with a log line and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from socialrec.serving.bundle import BundleError
from socialrec.serving.cache import ResultCache
from socialrec.serving.config import POINTER, ServerConfig, bundle_key, resolve_bundle
from socialrec.serving.engine import Engine
from socialrec.serving.observability import Metrics, setup_logging
from socialrec.serving.servicer import Dispatcher, Live, RecommenderService
from socialrec.serving.store import FeatureStore, StoreConfig
from socialrec.serving.streams import CappedHealth, CappedReflection, OpenStreams

from socialrec.v1 import recommender_pb2 as pb

log = logging.getLogger("socialrec.server")
SERVICE = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
MAX_PENDING = 10_000  # calls gRPC core may hold for the dispatcher (see build_server)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
TRIM_INTERVAL_S = 5.0  # how often a worker returns its heap's free pages (trim_memory)
RETRY_REFUSED_S = 30.0  # a refused bundle the pointer still names is tried again this often


class EngineHolder:
    """The live bundle (engine + its result cache); swapped atomically, never mutated."""

    def __init__(self, cfg: ServerConfig, metrics: Metrics | None) -> None:
        self.cfg = cfg
        self.key = bundle_key(cfg)
        self.live: Live | None = None
        self.path: Path | None = None
        self.metrics = metrics
        self._lock = threading.Lock()

    @property
    def engine(self) -> Engine | None:
        return self.live.engine if self.live else None

    def load(self, path: Path) -> bool:
        """Load, verify and warm ``path``; swap it in only if all of that succeeds."""
        with self._lock:
            t0 = time.perf_counter()
            try:
                engine = Engine.load(path, verify=True, config=self.cfg.engine, public_key=self.key)
                engine.warmup()
            except Exception as e:  # any failure leaves the old bundle serving
                self.refused(path, e)
                return False
            old = self.engine.version if self.engine else None
            budget = self.cfg.result_cache_mb << 20
            self.live = Live(engine, ResultCache(budget) if budget else None)
            self.path = path
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

    def refused(self, path: Path | str, error: BaseException) -> None:
        """Log and count a bundle (or pointer) that will not be served."""
        msg = str(error) if isinstance(error, BundleError) else f"{type(error).__name__}: {error}"
        log.error(
            "bundle refused", extra={"event": "bundle_refused", "bundle": str(path), "error": msg}
        )
        if self.metrics:
            self.metrics.reloads.labels("refused").inc()


def remember_good(cfg: ServerConfig, path: Path) -> None:
    """Record ``path`` as the last bundle a worker loaded (atomic; best effort)."""
    if cfg.last_good_file:
        with contextlib.suppress(OSError):
            tmp = Path(f"{cfg.last_good_file}.{os.getpid()}")
            tmp.write_text(str(path))
            tmp.replace(cfg.last_good_file)


def last_good(cfg: ServerConfig) -> Path | None:
    """The last bundle any worker of this server loaded, if any."""
    if not cfg.last_good_file:
        return None
    try:
        return Path(Path(cfg.last_good_file).read_text())
    except OSError:
        return None


def store_config(cfg: ServerConfig) -> StoreConfig:
    """The feature store settings a server runs with."""
    return StoreConfig(
        url=cfg.redis_url,
        namespace=cfg.namespace,
        history_cap=cfg.history_cap,
        client=cfg.redis_client,
        cluster=cfg.redis_cluster,
        ack_replicas=cfg.ack_replicas,
        ack_timeout_ms=cfg.ack_timeout_ms,
    )


def _libc():
    """The C library's symbols (glibc's mallopt/malloc_trim), or None where it has none."""
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Have glibc's malloc serve blocks of 256 KiB and more with their own mappings, returned to
    the system when freed. By default its threshold rises to 32 MiB after the first large
    free, so request-sized buffers (gRPC messages, their Python copies) come from the heap and
    stay mapped after a burst of big requests. No-op where it is not glibc. With
    :func:`trim_memory` it keeps what a burst of big requests leaves behind small (measured,
    docs/operations.md "Memory")."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 256 << 10)


async def trim_memory(interval_s: float = TRIM_INTERVAL_S) -> None:
    """Every ``interval_s``, hand the heap's free pages back to the system (``malloc_trim``,
    in a thread: it walks every arena, gRPC's threads' included). Runs until cancelled."""
    libc = _libc()
    if libc is None:
        return
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval_s)
        await loop.run_in_executor(None, libc.malloc_trim, 0)


def build_server(
    cfg: ServerConfig, service: RecommenderService
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A grpc.aio server with the recommender, health and reflection services, bound to
    ``cfg.host:cfg.port`` (port 0: the OS picks one), not started; and the bound port.

    Call it inside the event loop that will run the server."""
    # The dispatcher sheds load itself (counted, RESOURCE_EXHAUSTED); gRPC's own limit stays
    # as a backstop well above it.
    # gRPC core cancels calls that wait unrequested beyond its pending-request limits (1,000
    # soft, 3,000 hard), answering CANCELLED; with room for 10,000 per worker a burst reaches
    # the dispatcher instead, which answers RESOURCE_EXHAUSTED at once beyond its limit.
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", cfg.max_request_bytes),
            ("grpc.server.max_pending_requests", MAX_PENDING),
            ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING),
        ],
        maximum_concurrent_rpcs=2 * cfg.max_concurrent_rpcs + 64,
    )
    dispatcher = Dispatcher(service, service.metrics, cfg.max_concurrent_rpcs)
    server.add_generic_rpc_handlers((dispatcher.handler(),))
    streams = OpenStreams(cfg.max_open_streams)  # Watch and reflection share one cap
    health_servicer = CappedHealth(streams)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        CappedReflection(names, streams), server
    )
    address = f"{cfg.host}:{cfg.port}"
    if cfg.tls_cert and cfg.tls_key:
        creds = grpc.ssl_server_credentials(
            [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())]
        )
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    return server, health_servicer, port


async def serve_worker(
    cfg: ServerConfig, worker: int = 0, ready: threading.Event | None = None
) -> None:
    """Run one worker's gRPC server until SIGTERM/SIGINT; SIGHUP reloads the bundle."""
    metrics = Metrics() if cfg.metrics_port is not None else None
    holder = EngineHolder(cfg, metrics)
    store = FeatureStore(store_config(cfg))
    service = RecommenderService(cfg, holder, store, metrics)
    server, health_servicer, _ = build_server(cfg, service)
    address = f"{cfg.host}:{cfg.port}"
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
            remember_good(cfg, target)
        return ok

    pointer_error = ""

    async def resolve() -> Path | None:
        nonlocal pointer_error
        try:
            target = resolve_bundle(cfg.bundle)
        except Exception as e:  # a bad pointer: refused like a bad bundle, the old one serves
            if str(e) != pointer_error:  # once per distinct problem, not every interval
                pointer_error = str(e)
                holder.refused(Path(cfg.bundle) / POINTER, e)
            return None
        pointer_error = ""
        return target

    # Load before listening: SO_REUSEPORT hands new connections to every listening worker, so a
    # worker that listened first would answer UNAVAILABLE while its siblings already serve
    # (at start-up, and when the supervisor replaces a dead worker). A worker whose bundle
    # fails to load (or whose pointer is bad) listens anyway, NOT_SERVING, and keeps watching.
    target = await resolve()
    failed: Path | None = None
    failed_at = 0.0
    if target is not None and not await load(target):
        failed, failed_at = target, time.monotonic()
    if holder.live is None and (good := last_good(cfg)) is not None:
        log.warning(
            "serving the last good bundle until the pointer names a good one",
            extra={"event": "last_good", "bundle": str(good)},
        )
        await load(good)
    await server.start()
    loop_kind = type(asyncio.get_running_loop()).__module__.split(".")[0]  # uvloop or asyncio
    log.info(
        "worker listening",
        extra={"event": "listening", "address": address, "worker": worker, "loop": loop_kind},
    )

    async def watch() -> None:
        """Reload when the pointer names another bundle, or on SIGHUP (always). A refused
        bundle is retried every RETRY_REFUSED_S (a half-copied one may complete), so workers
        converge on what the pointer names. Nothing here can stop the loop."""
        nonlocal failed, failed_at
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reload_now.wait(), timeout=cfg.watch_interval_s)
            forced = reload_now.is_set()
            reload_now.clear()
            try:
                target = await resolve()
                if target is None or (target == holder.path and not forced):
                    continue
                retry = time.monotonic() - failed_at >= RETRY_REFUSED_S
                if forced or target != failed or retry:
                    if await load(target):
                        failed = None
                    else:
                        failed, failed_at = target, time.monotonic()
            except Exception as e:  # keep watching whatever happened
                log.error("bundle watcher error", extra={"event": "watch_error", "error": repr(e)})

    loop.add_signal_handler(signal.SIGHUP, reload_now.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if ready is not None:
        ready.set()
    watcher = asyncio.create_task(watch())
    # Fresh items: the side index follows the registry (and rebuilds for a new bundle).
    poller = asyncio.create_task(service.fresh.run()) if cfg.fresh_items else None
    trimmer = asyncio.create_task(trim_memory())
    await stop.wait()
    log.info("worker stopping", extra={"event": "stopping", "worker": worker})
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=2.0)
    watcher.cancel()
    trimmer.cancel()
    if poller is not None:
        poller.cancel()
    await store.aclose()
    store.close()


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (Linux PR_SET_PDEATHSIG),
    and exit now if the parent is already gone (it may have died before the call)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(0)


def worker_main(cfg: ServerConfig, worker: int, parent: int) -> None:
    """Entry point of a forked worker process."""
    # Not the supervisor's handlers: until the event loop installs its own, SIGTERM/SIGINT
    # end a starting worker at once, and a reload request (SIGHUP) is moot.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    die_with_parent(parent)
    return_freed_memory()
    setup_logging()
    with asyncio.Runner(loop_factory=event_loop_factory(cfg.event_loop)) as runner:
        runner.run(serve_worker(cfg, worker))


def event_loop_factory(name: str):
    """The new-loop function of ``serve --event-loop`` (None: asyncio's default loop)."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if name == "asyncio":
        return None
    raise ValueError(f"event loop must be 'uvloop' or 'asyncio', got {name!r}")
