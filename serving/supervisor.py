"""The process supervisor: forks the workers, serves the metrics endpoint, restarts the dead.

Workers are forked before any gRPC server exists and share the port (``grpc.so_reuseport``);
every library in a worker runs on one thread (docs/design.md "Performance rules").
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

from socialrec.serving.config import ServerConfig, load_token
from socialrec.serving.observability import setup_logging
from socialrec.serving.worker import worker_main

log = logging.getLogger("socialrec.server")


def pin_threads() -> None:
    """One thread per library per worker (docs/design.md "Performance rules"); call before
    numpy, ONNX Runtime or FAISS start their thread pools."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"


def serve(cfg: ServerConfig) -> int:
    """Fork ``cfg.workers`` processes (before any gRPC server exists), serve metrics, supervise.

    SIGHUP is forwarded to every worker (bundle reload); SIGTERM/SIGINT stop them all. A
    worker that dies is restarted.
    """
    import multiprocessing as mp
    import tempfile

    pin_threads()
    setup_logging()
    if load_token(cfg) is None:
        log.warning(
            "writes are disabled: no write token (set SOCIALREC_WRITE_TOKEN or --token-file); "
            "LogInteraction and friendship calls will answer UNAUTHENTICATED",
            extra={"event": "writes_disabled"},
        )
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
            target=worker_main, args=(cfg, i), daemon=False, name=f"socialrec-worker-{i}"
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
