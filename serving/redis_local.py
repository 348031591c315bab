"""A throwaway local ``redis-server`` for demos and tests: start, stop, kill, pause, restart.

Binds 127.0.0.1 only, no RDB snapshots; with ``appendonly`` (the default) writes go to an AOF
in ``dir``, so :meth:`RedisProcess.restart` (same port, same dir) brings the data back, even
after :meth:`RedisProcess.kill`: Redis writes the AOF to the OS before it replies.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

INSTALL_HINT = (
    "redis-server was not found on PATH; install it (Debian/Ubuntu: `apt-get install "
    "redis-server`, macOS: `brew install redis`) or pass binary=/path/to/redis-server"
)


class RedisNotInstalled(FileNotFoundError):
    """The ``redis-server`` binary is missing."""


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """One ``redis-server`` subprocess on a fixed port and data directory."""

    def __init__(
        self,
        port: int,
        dir: Path,
        appendonly: bool,
        binary: str,
        owns_dir: bool = False,
        unixsocket: bool = False,
    ) -> None:
        self.port = port
        self.dir = dir
        self.appendonly = appendonly
        self.binary = binary
        self.owns_dir = owns_dir  # created by start_redis: cleanup() removes it
        self.unixsocket = unixsocket  # also listen on dir/redis.sock (see unix_url)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """The Unix-socket URL (only when started with ``unixsocket=True``)."""
        if not self.unixsocket:
            raise RuntimeError("this redis-server was started without a unix socket")
        return f"unix://{self.dir / 'redis.sock'}?db=0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        """Start the server and return once it answers PING (RuntimeError if it doesn't)."""
        if self.running:
            return self
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--dir", str(self.dir),
        ]  # fmt: skip
        if self.unixsocket:
            cmd += ["--unixsocket", str(self.dir / "redis.sock"), "--unixsocketperm", "700"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        """Poll PING (short timeouts) until this process, not another on the port, answers."""
        assert self.proc is not None
        client = redis.Redis(
            port=self.port,
            socket_timeout=0.2,
            socket_connect_timeout=0.2,
            retry=Retry(NoBackoff(), 0),
        )
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with code {self.proc.returncode} on port "
                        f"{self.port}:\n{self.log_tail()}"
                    )
                try:
                    if client.info("server")["process_id"] == self.proc.pid:
                        return
                except redis.exceptions.RedisError:  # not listening yet, or loading the AOF
                    pass
                time.sleep(0.01)  # poll interval
        finally:
            client.close()
        self.kill()
        raise RuntimeError(
            f"redis-server did not answer on port {self.port} within {timeout_s}s:\n"
            f"{self.log_tail()}"
        )

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (Redis flushes the AOF and exits); SIGKILL if it takes longer than timeout_s."""
        if self.running:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, for fault tests: no shutdown work at all."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung Redis)."""
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self, timeout_s: float = 10.0) -> RedisProcess:
        """Stop if running, then start on the same port and dir (the AOF data comes back)."""
        self.stop()
        return self.start(timeout_s)

    def cleanup(self) -> None:
        """Stop, and remove the data dir if start_redis created it."""
        self.stop()
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def start_redis(
    port: int | None = None,
    dir: str | Path | None = None,
    appendonly: bool = True,
    binary: str = "redis-server",
    timeout_s: float = 10.0,
    unixsocket: bool = False,
) -> RedisProcess:
    """Start ``redis-server`` on 127.0.0.1 (a free port if none given) and wait until it answers.

    ``unixsocket`` also opens ``dir/redis.sock`` (:attr:`RedisProcess.unix_url`): a server on the
    same machine as Redis skips the TCP stack with it.

    ``dir`` defaults to a new temporary directory, removed by ``cleanup()`` / ``with``.
    """
    path = shutil.which(binary)
    if path is None:
        raise RedisNotInstalled(INSTALL_HINT)
    owns = dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="socialrec-redis-")) if dir is None else Path(dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    # A free port can be taken between find_free_port() and redis binding it: try a few.
    attempts = 1 if port is not None else 5
    for attempt in range(attempts):
        rp = RedisProcess(port or find_free_port(), data_dir, appendonly, path, owns, unixsocket)
        try:
            return rp.start(timeout_s)
        except RuntimeError:
            rp.kill()
            if attempt == attempts - 1:
                if owns:
                    shutil.rmtree(data_dir, ignore_errors=True)
                raise
    raise AssertionError("unreachable")
