"""Start a gRPC server as a subprocess and wait until it is healthy (tests, load tests,
benchmarks). No torch: the server is reached only through its command line and gRPC health.

    with ServerProcess(["--bundle", "runs/demo/bundle", "--redis-url", url], metrics=True) as s:
        stub = RecommenderStub(s.channel())  # s.address, s.pid, s.metrics_port, s.log_path
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from socialrec.serving.redis_local import find_free_port

SERVICE = "socialrec.v1.Recommender"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
POLL_S = 0.1


def new_channel(address: str) -> grpc.Channel:
    """An insecure channel with a connection of its own (own subchannel pool): no reconnect
    backoff shared with earlier channels, and SO_REUSEPORT hands it to any worker."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def health_status(address: str, timeout_s: float = 1.0) -> int:
    """The Recommender's gRPC health status (raises grpc.RpcError if there is no answer)."""
    with new_channel(address) as ch:
        req = health_pb2.HealthCheckRequest(service=SERVICE)
        return health_pb2_grpc.HealthStub(ch).Check(req, timeout=timeout_s).status


def wait_health(
    address: str,
    status: int = SERVING,
    timeout_s: float = 120.0,
    alive: Callable[[], bool] | None = None,
    describe: Callable[[], str] = str,
) -> None:
    """Poll gRPC health until the Recommender reports ``status``; raise RuntimeError if the
    server exits first (``alive`` says False) or ``timeout_s`` passes. Each poll opens a new
    connection, so a server that comes up late is seen at once, not after a backoff."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"server at {address} exited (last health {last}):\n{describe()}")
        try:
            last = health_status(address)
            if last == status:
                return
        except grpc.RpcError as e:
            last = e.code()
        time.sleep(POLL_S)
    raise RuntimeError(
        f"server at {address} not in health {status} after {timeout_s}s (last {last}):\n"
        f"{describe()}"
    )


def wait_serving(
    address: str,
    timeout_s: float = 120.0,
    alive: Callable[[], bool] | None = None,
    describe: Callable[[], str] = str,
) -> None:
    """:func:`wait_health` for SERVING."""
    wait_health(address, SERVING, timeout_s, alive, describe)


class ServerProcess:
    """``python -m socialrec.cli serve --port PORT ARGS`` (or another gRPC server module) as a
    subprocess on 127.0.0.1, its output in a log file.

    ``with`` starts it and waits until SERVING (stopping it if that fails); :meth:`start`
    alone does not wait. :meth:`stop` sends SIGTERM, then SIGKILL after ``stop_timeout_s``.
    The child's environment is this process's plus ``env``, without PROMETHEUS_MULTIPROC_DIR:
    each server gets a metrics directory of its own (the server empties the one it uses).
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        port: int | None = None,
        metrics: bool = False,
        env: Mapping[str, str] | None = None,
        log: str | Path | None = None,
        program: Sequence[str] = ("socialrec.cli", "serve"),
        ready_timeout_s: float = 120.0,
        stop_timeout_s: float = 20.0,
    ) -> None:
        if {a.partition("=")[0] for a in args} & {"--port", "--metrics-port"}:
            raise ValueError("ports are chosen by ServerProcess (port=, metrics=)")
        self.port = port or find_free_port()
        self.metrics_port = find_free_port() if metrics else None
        self.address = f"127.0.0.1:{self.port}"
        ports = ["--port", str(self.port)]
        if self.metrics_port is not None:
            ports += ["--metrics-port", str(self.metrics_port)]
        self.cmd = [sys.executable, "-m", *program, *ports, *args]
        self.env = {**os.environ, **(env or {})}
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self._own_log = log is None  # a temporary log, made by start() and deleted by stop()
        self.log_path: Path | None = Path(log) if log is not None else None
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def metrics_url(self) -> str:
        assert self.metrics_port is not None, "started without metrics=True"
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> ServerProcess:
        """Start the subprocess (it is not serving yet)."""
        assert self.proc is None, "already started"
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="socialrec-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        with self.log_path.open("w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        """The last lines of the log (for error messages)."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def channel(self) -> grpc.Channel:
        """A new insecure channel to the server, with a connection of its own."""
        return new_channel(self.address)

    def health(self, timeout_s: float = 1.0) -> int:
        """The Recommender's health status now (raises grpc.RpcError if no answer)."""
        return health_status(self.address, timeout_s)

    def wait_health(self, status: int = SERVING, timeout_s: float | None = None) -> ServerProcess:
        """Wait until health reports ``status``; RuntimeError with the log tail if the
        process exits first or the timeout (default ``ready_timeout_s``) passes."""
        timeout = self.ready_timeout_s if timeout_s is None else timeout_s
        wait_health(self.address, status, timeout, alive=self.alive, describe=self.tail)
        return self

    def wait_serving(self, timeout_s: float | None = None) -> ServerProcess:
        return self.wait_health(SERVING, timeout_s)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL if it is still running after the timeout; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout_s if timeout_s is None else timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.wait_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
