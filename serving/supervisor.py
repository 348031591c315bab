"""The process supervisor: checks what a start needs, forks the workers, serves the metrics
endpoint, replaces dead workers, and takes every worker down with it.

Workers are forked before any gRPC server exists and share the port (``grpc.so_reuseport``);
every library in a worker runs on one thread (docs/design.md "Performance rules").
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from socialrec.serving.bundle import open_bundle
from socialrec.serving.config import ServerConfig, bundle_key, load_token, resolve_bundle
from socialrec.serving.observability import setup_logging
from socialrec.serving.threads import pin_threads
from socialrec.serving.worker import store_config, worker_main

log = logging.getLogger("socialrec.server")
STOP_GRACE_S = 10.0  # after SIGTERM, workers still alive this long later are killed
BACKOFF_MAX_S = 30.0  # a worker that keeps dying is restarted at most this often
HEALTHY_S = 10.0  # a worker that lived this long resets its back-off


class StartupError(RuntimeError):
    """Something the server needs at start is missing or taken; nothing was started."""


def _port_free(host: str, port: int, what: str) -> None:
    """StartupError if ``host:port`` is taken (checked without SO_REUSEPORT, so another server
    sharing the port does not pass unnoticed). SO_REUSEADDR, as the gRPC server binds: the
    connections of a server that just died linger in TIME_WAIT, and must not stop its
    replacement from starting on the same port."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise StartupError(f"{what} {host}:{port} is not available ({e.strerror})") from None


def check_startup(cfg: ServerConfig) -> None:
    """Everything a start needs, checked before any process is forked (StartupError)."""
    if cfg.workers < 1:
        raise StartupError(f"--workers must be >= 1, got {cfg.workers}")
    try:
        store_config(cfg)  # --ack-replicas, --ack-timeout-ms
    except ValueError as e:
        raise StartupError(f"feature store: {e}") from None
    root = Path(cfg.bundle)
    if not root.is_dir():
        raise StartupError(f"bundle {cfg.bundle}: no such directory")
    try:
        key = bundle_key(cfg)
        if any(root.iterdir()):  # an empty bundle root waits for its first bundle
            open_bundle(resolve_bundle(root), verify=True, public_key=key)
    except Exception as e:
        raise StartupError(f"bundle {cfg.bundle}: {e}") from None
    try:
        load_token(cfg)
    except OSError as e:
        raise StartupError(f"token file: {e}") from None
    _port_free(cfg.host, cfg.port, "gRPC port")
    if cfg.metrics_port is not None:
        _port_free(cfg.host, cfg.metrics_port, "metrics port")
    if cfg.metrics_port == cfg.port:
        raise StartupError(f"gRPC and metrics ports are both {cfg.port}")


def serve(cfg: ServerConfig) -> int:
    """Check, fork ``cfg.workers`` processes (before any gRPC server exists), serve metrics,
    supervise. Returns the exit code: 2 (one line on stderr, nothing left running) when the
    start fails.

    SIGHUP is forwarded to every worker (bundle reload); SIGTERM/SIGINT stop them all (killed
    after STOP_GRACE_S). A worker that dies is replaced, with exponential back-off while it
    keeps dying; workers get SIGTERM from the kernel if the supervisor itself dies.
    """
    import multiprocessing as mp
    import tempfile

    pin_threads()
    setup_logging()
    try:
        check_startup(cfg)
    except StartupError as e:
        print(f"socialrec serve: error: {e}", file=sys.stderr)
        return 2
    if not any(Path(cfg.bundle).iterdir()):
        log.warning(
            "bundle root is empty: NOT_SERVING until a bundle and its CURRENT pointer appear",
            extra={"event": "waiting_for_bundle", "bundle": cfg.bundle},
        )
    if load_token(cfg) is None:
        log.warning(
            "writes are disabled: no write token (set SOCIALREC_WRITE_TOKEN or --token-file); "
            "LogInteraction and friendship calls will answer UNAUTHENTICATED",
            extra={"event": "writes_disabled"},
        )
    if bundle_key(cfg) is None:
        log.warning(
            "bundle signatures are not checked: no --bundle-key (or SOCIALREC_BUNDLE_PUBLIC_KEY)",
            extra={"event": "bundle_key_missing"},
        )
    if cfg.metrics_port is not None:
        mdir = os.environ.setdefault(
            "PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="socialrec-metrics-")
        )
        for f in Path(mdir).glob("*.db"):
            f.unlink()
    state = tempfile.mkdtemp(prefix="socialrec-serve-")
    cfg = replace(cfg, last_good_file=str(Path(state) / "last-good-bundle"))
    ctx = mp.get_context("fork")
    procs: dict[int, mp.Process] = {}
    started: dict[int, float] = {}
    backoff: dict[int, float] = {}
    me = os.getpid()

    def start(i: int) -> None:
        p = ctx.Process(
            target=worker_main, args=(cfg, i, me), daemon=False, name=f"socialrec-worker-{i}"
        )
        p.start()
        procs[i], started[i] = p, time.monotonic()

    stopping = threading.Event()

    def stop_all() -> None:
        for p in procs.values():
            if p.pid and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs.values():
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in procs.values():
            if p.is_alive():
                log.warning("worker did not stop; killing", extra={"event": "worker_kill"})
                p.kill()
                p.join(timeout=5)

    def forward(signum, _frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping.set()
            return
        for p in procs.values():
            if p.pid and p.is_alive():
                os.kill(p.pid, signal.SIGHUP)

    for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(s, forward)
    try:
        # Metrics first: once a worker answers SERVING, /metrics is there too. The HTTP
        # thread only runs while a scrape is served, and workers never touch it.
        if cfg.metrics_port is not None:
            from prometheus_client import CollectorRegistry, multiprocess, start_http_server

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            try:
                start_http_server(cfg.metrics_port, addr=cfg.host, registry=registry)
            except OSError as e:  # taken between the check and now
                print(
                    f"socialrec serve: error: metrics port {cfg.metrics_port}: {e}",
                    file=sys.stderr,
                )
                return 2
            log.info("metrics listening", extra={"event": "metrics", "port": cfg.metrics_port})
        for i in range(cfg.workers):
            start(i)
        due: dict[int, float] = {}
        while not stopping.is_set():
            now = time.monotonic()
            for i, p in list(procs.items()):
                if p.is_alive() or i in due:
                    continue
                lived = now - started[i]
                delay = 0.0 if lived >= HEALTHY_S else min(2 * backoff.get(i, 0.25), BACKOFF_MAX_S)
                backoff[i] = delay
                due[i] = now + delay
                log.warning(
                    "worker died; restarting",
                    extra={
                        "event": "worker_restart",
                        "worker": i,
                        "exitcode": p.exitcode,
                        "delay_s": round(delay, 2),
                    },
                )
                if cfg.metrics_port is not None:
                    from prometheus_client import multiprocess

                    multiprocess.mark_process_dead(p.pid)
            for i, when in list(due.items()):
                if now >= when:
                    del due[i]
                    start(i)
            stopping.wait(0.2)
    finally:
        stop_all()
        shutil.rmtree(state, ignore_errors=True)
    return 0
