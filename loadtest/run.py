"""`socialrec loadtest`: our server and its peers under the same Locust load, side by side.

One command, one machine, one report: a private redis-server gets the run published (train
part) into a namespace per server; `socialrec serve` runs as a subprocess on free ports and
Locust (headless, a subprocess) drives it; then each peer gets the same Locust settings right
after, one at a time: the naive peer (loadtest/naive_server.py) and the Ray Serve peer
(loadtest/ray_peer.py, ``--peers naive,ray``). The machine is shared and noisy, so what
counts are the ratios measured in the same run (docs/design.md "Performance rules").

Measured per server: client percentiles (Locust CSV, Aggregated row), per-stage server
histograms (Prometheus /metrics before/after), server CPU-seconds per request (psutil: the
server and its workers, before/after) and a check that every acknowledged write is in the
event stream and in the user's features. ``fault`` injects one failure mid-run into our
server's run: SIGKILL a worker, restart Redis, or hot-swap the bundle.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from socialrec.loadtest.balancer import HAProxy, find_haproxy
from socialrec.loadtest.ids import ZipfIds
from socialrec.serving.bundle import copy_bundle
from socialrec.serving.harness import SERVING, ServerProcess
from socialrec.serving.offline_store import OfflineStore
from socialrec.serving.redis_local import LocalCluster, RedisProcess, start_cluster, start_redis
from socialrec.serving.schema import Keys
from socialrec.serving.store import FeatureStore, StoreConfig

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SHAPES = ("constant", "steps")
# kill-primary: a cluster only (a replica is promoted); kill-server: replicas >= 2 (SIGKILL one
# serving replica with its workers, restart it after server_down_s)
FAULTS = ("none", "kill-worker", "restart-redis", "swap-bundle", "kill-primary", "kill-server")
PEER_NAME = "naive-torch"
# --peers: key -> the name reported for it; each peer runs after ours with the same settings
PEERS = {"naive": PEER_NAME, "ray": "ray-serve"}
RAY_MAX_ONGOING_REQUESTS = 4  # per replica of the Ray peer (docs/benchmarks.md "Ray Serve peer")
RAY_IDLE_S = 5.0  # the Ray peer's idle CPU is read over this long before its load
RAY_READY_TIMEOUT_S = 180.0  # a local Ray head, Serve and the replicas take ~20 s on 2 idle cores
THREAD_ENV = {v: "1" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


@dataclass(frozen=True)
class LoadTestConfig:
    run: str  # run directory (teacher.pt; RUN/bundle is exported if missing)
    duration: float = 60.0  # seconds of Locust load per server
    out: str | None = None  # default RUN/loadtest
    users: int = 8  # simulated app backends (one channel each), closed loop
    spawn_rate: float = 8.0
    workers: int = 2  # our server's worker processes
    shape: str = "constant"  # or "steps": 1, 2, 4, ... users up to `users`
    fault: str = "none"
    peer: bool = True  # also run the peers with the same Locust settings
    peers: tuple[str, ...] = ("naive",)  # which peers (keys of PEERS), in order
    k: int = 10
    zipf: float = 1.1
    seed: int = 0
    fault_at: float = 0.5  # fraction of the duration at which the fault hits
    redis_pause_s: float = 1.0  # restart-redis: how long Redis stays down
    serve_args: tuple[str, ...] = ()  # extra `socialrec serve` flags for our server
    steps: tuple[int, ...] = ()  # shape "steps": user counts to step through (default 1, 2, 4, ..)
    unix_socket: bool = False  # both servers reach the private Redis over its Unix socket
    replicas: int = 1  # `socialrec serve` instances; > 1: behind HAProxy (loadtest/balancer.py)
    redis_cluster: bool = False  # a local Redis Cluster (3 primaries + 3 replicas), not one Redis
    ack_replicas: int = 0  # our server's --ack-replicas (writes acknowledged after WAIT N)
    server_down_s: float = 3.0  # kill-server: how long the killed replica stays down
    new_items: float = 0.2  # share of logged interactions with items the bundle does not know


# ---- processes --------------------------------------------------------------------------


class Proc:
    """A subprocess with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str]) -> None:
        self.cmd = cmd
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115  (closed in stop)
        self.p = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.pid = self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def tail(self, n: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_cpu(self, timeout_s: float) -> tuple[int, float]:
        """Exit code and CPU seconds of the finished process, its reaped children included.

        The exit is awaited with WNOWAIT: the process stays a zombie whose final CPU times
        psutil can still read (user + system, plus children_user/children_system for what it
        reaped: the same total as wait4's rusage), and only then is it reaped.
        """
        deadline = time.monotonic() + timeout_s
        while os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.cmd[:4]} did not finish in {timeout_s}s:\n{self.tail()}")
            time.sleep(0.1)
        t = psutil.Process(self.pid).cpu_times()
        code = self.p.wait()
        self._log.close()
        return code, t.user + t.system + t.children_user + t.children_system

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        if not self._log.closed:
            self._log.close()


def children(pid: int) -> list[int]:
    """Pids of the direct children of ``pid`` (none if it is gone)."""
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid``, its reaped children and all live descendants.

    Each process's cpu_times() holds its own time and, in children_user/children_system, that
    of the children it has reaped: a worker that died and was reaped still counts (its time
    before the first reading cancels out), while a live one is counted as a descendant.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue  # exited between the listing and the reading
        total += t.user + t.system + t.children_user + t.children_system
    return total


class RayPeerProcess(ServerProcess):
    """The Ray Serve peer (loadtest/ray_peer.py) as a subprocess: ready when it prints its
    ready line, which it does after one call through its own gRPC proxy answered (Serve's
    proxy has no grpc.health.v1 service).

    Ray's processes (GCS, raylet, agents, Serve controller, proxy, replicas) are all
    descendants of this one, so ``tree_cpu_s(pid)`` counts them; ``marker`` is set in its
    environment, which they inherit, so :meth:`outside_tree` can check that none escaped.
    """

    def __init__(self, args: list[str], **kw) -> None:
        self.marker = secrets.token_hex(8)
        env = {**kw.pop("env", {}), "SOCIALREC_PEER_MARKER": self.marker}
        super().__init__(args, program=("socialrec.loadtest.ray_peer",), env=env,
                         ready_timeout_s=RAY_READY_TIMEOUT_S, **kw)  # fmt: skip

    def wait_health(self, status: int = SERVING, timeout_s: float | None = None) -> RayPeerProcess:
        from socialrec.loadtest.ray_peer import READY

        deadline = time.monotonic() + (self.ready_timeout_s if timeout_s is None else timeout_s)
        while READY not in self.log_text():
            if not self.alive():
                raise RuntimeError(f"the Ray peer exited with {self.proc.returncode} before "
                                   f"serving; its log ({self.log_path}) ends:\n{self.tail()}")  # fmt: skip
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Ray peer is not serving after {self.ready_timeout_s}s; "
                                   f"its log ({self.log_path}) ends:\n{self.tail()}")  # fmt: skip
            time.sleep(0.2)
        return self

    def outside_tree(self) -> dict:
        """Processes of this peer (by the environment marker) and how many are not its
        descendants (their CPU would be missed)."""
        try:
            tree = {self.pid, *(p.pid for p in psutil.Process(self.pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            tree = set()
        marked = set()
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.environ().get("SOCIALREC_PEER_MARKER") == self.marker:
                    marked.add(p.pid)
        return {"in_tree": len(tree), "marked_outside_tree": len(marked - tree)}


# ---- metrics ------------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, ...], dict]:
    """Histograms and counters from /metrics: (metric, labels...) -> {buckets, sum, count}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[tuple[str, ...], dict] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = dict(s.labels)
            le = labels.pop("le", None)
            key = (fam.name, *(f"{k}={v}" for k, v in sorted(labels.items())))
            h = out.setdefault(key, {"buckets": {}, "sum": 0.0, "count": 0.0, "value": 0.0})
            if s.name.endswith("_bucket") and le is not None:
                h["buckets"][float(le)] = s.value
            elif s.name.endswith("_sum"):
                h["sum"] = s.value
            elif s.name.endswith("_count"):
                h["count"] = s.value
            else:
                h["value"] = s.value
    return out


def _hist_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus-style quantile: linear inside the bucket that holds the rank (seconds)."""
    edges = sorted(buckets)
    total = buckets[edges[-1]] if edges else 0.0
    if total <= 0:
        return None
    rank, lo, prev = q * total, 0.0, 0.0
    for le in edges:
        c = buckets[le]
        if c >= rank:
            if le == float("inf"):
                return lo
            return lo + (le - lo) * (rank - prev) / max(c - prev, 1e-12)
        lo, prev = le, c
    return lo


def histogram_diff(before: dict, after: dict, metric: str) -> dict[str, dict[str, dict]]:
    """{method: {stage or "rpc": {count, mean_ms, p50_ms, p99_ms}}} over the window."""
    out: dict[str, dict[str, dict]] = {}
    for key, h in after.items():
        if key[0] != metric:
            continue
        labels = dict(kv.split("=", 1) for kv in key[1:])
        b = before.get(key, {"buckets": {}, "sum": 0.0, "count": 0.0})
        n = h["count"] - b["count"]
        if n <= 0:
            continue
        buckets = {le: c - b["buckets"].get(le, 0.0) for le, c in h["buckets"].items()}
        p50, p99 = _hist_quantile(buckets, 0.5), _hist_quantile(buckets, 0.99)
        out.setdefault(labels.get("method", ""), {})[labels.get("stage", "rpc")] = {
            "count": int(n),
            "mean_ms": round((h["sum"] - b["sum"]) / n * 1000, 4),
            "p50_ms": round(p50 * 1000, 4) if p50 is not None else None,
            "p99_ms": round(p99 * 1000, 4) if p99 is not None else None,
        }
    return out


def counter_values(snap: dict, metric: str) -> dict[str, float]:
    return {",".join(k[1:]): v["value"] for k, v in snap.items() if k[0] == metric}


# ---- client side --------------------------------------------------------------------------


def read_locust_csv(path: Path) -> dict:
    """Aggregated and per-method client numbers from a Locust stats CSV (TAG_final_stats.csv,
    written by grpc_user.py once the runner has stopped: see its ``_final_reports``)."""

    def num(row: dict, col: str) -> float | None:
        v = row.get(col, "N/A")
        return None if v in ("N/A", "", None) else float(v)

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict = {"methods": {}}
    for row in rows:
        entry = {
            "requests": int(row["Request Count"]),
            "failures": int(row["Failure Count"]),
            "rps": num(row, "Requests/s"),
            "mean_ms": num(row, "Average Response Time"),
            "p50_ms": num(row, "50%"),
            "p95_ms": num(row, "95%"),
            "p99_ms": num(row, "99%"),
        }
        if row["Name"] == "Aggregated":
            out.update(entry)
        else:
            out["methods"][row["Name"]] = entry
    return out


def _rows(out: Path, prefix: str, tag: str) -> list[dict]:
    """The JSON rows every Locust process wrote to OUT/PREFIX-TAG-PID.json, in file order."""
    return [
        r for f in sorted(out.glob(f"{prefix}-{tag}-*.json")) for r in json.loads(f.read_text())
    ]


def read_status(out: Path, tag: str) -> dict[str, dict[str, int]]:
    """{method: {status code: calls}} summed over the Locust processes' status files."""
    res: dict[str, dict[str, int]] = {}
    for r in _rows(out, "status", tag):
        m = res.setdefault(r["method"], {})
        m[r["code"]] = m.get(r["code"], 0) + r["count"]
    return res


def verify_writes(store: FeatureStore, out: Path, tag: str, after_id: str) -> dict:
    """Every acknowledged write (logged by the locustfile) must be in the event stream and in
    the user's features. An item the history cap pushed out counts as ``evicted``, not lost."""
    acked = [
        json.loads(line)
        for f in sorted(out.glob(f"writes-{tag}-*.jsonl"))
        for line in f.read_text().splitlines()
        if line.strip()
    ]
    from socialrec.serving.offline_store import OfflineStore, advance

    events: dict[str, dict[str, str]] = {}
    cursor = {str(sh): after_id for sh in store.keys.shards}  # every shard, from that time
    with OfflineStore(store.cfg) as stream:
        while batch := stream.events(after=cursor, count=1000):
            events.update(batch)
            cursor = advance(cursor, batch)
    friend_events = {
        (e["user"], e["friend"]) for e in events.values() if e.get("type") == "friend_add"
    }

    # A retried write applied twice shows as two stream events with the same fields where
    # the client had one acknowledgement (its request_id makes the retry a no-op instead).
    def fields(e: dict) -> tuple:
        return (e["user"], e["item"], int(e["ts"]), round(float(e["weight"]), 6))

    in_stream_n = Counter(fields(e) for e in events.values() if e.get("type") == "interaction")
    acked_n = Counter(fields(w) for w in acked if w["type"] == "interaction")
    counted_twice = sum(max(in_stream_n[k] - n, 0) for k, n in acked_n.items())
    missing_stream, missing_features, evicted, n_lost, lost = 0, 0, 0, 0, []
    for w in acked:
        in_stream, in_features = True, True
        if w["type"] == "interaction":
            e = events.get(w["event_id"])
            in_stream = (
                e is not None
                and e.get("user") == w["user"]
                and e.get("item") == w["item"]
                and int(e.get("ts", -1)) == w["ts"]
                and abs(float(e.get("weight", "nan")) - w["weight"]) < 1e-6
            )
            hist = store.read(w["user"]).history
            if w["item"] not in {i for i, _ in hist}:
                if len(hist) >= store.cfg.history_cap:
                    evicted += 1
                else:
                    in_features = False
        else:
            in_stream = (w["user"], w["friend"]) in friend_events
            in_features = (
                w["friend"] in store.read(w["user"]).friends
                and w["user"] in store.read(w["friend"]).friends
            )
        missing_stream += not in_stream
        missing_features += not in_features
        if not (in_stream and in_features):
            n_lost += 1
            if len(lost) < 5:
                lost.append({**w, "in_stream": in_stream, "in_features": in_features})
    return {
        "acknowledged": len(acked),
        "interactions": sum(w["type"] == "interaction" for w in acked),
        "friendships": sum(w["type"] == "friend_add" for w in acked),
        "stream_events": len(events),
        "missing_in_stream": missing_stream,
        "missing_in_features": missing_features,
        "evicted_by_history_cap": evicted,
        # writes Redis applied whose reply never reached the client (e.g. cut by a fault):
        # not acknowledged, so not lost; a client retry would apply them twice
        "unacknowledged_in_stream": max(len(events) - len(acked), 0),
        "lost": n_lost,
        "lost_examples": lost,
        "counted_twice": counted_twice,
        "retried": sum(w.get("attempts", 1) > 1 for w in acked),
    }


# ---- one server under load ----------------------------------------------------------------


def _point(root: Path, name: str) -> None:
    """Move the root's CURRENT pointer atomically (write a temp file, rename over)."""
    tmp = root / "CURRENT.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "CURRENT")


def _steps(users: int) -> list[int]:
    steps, n = [], 1
    while n < users:
        steps.append(n)
        n *= 2
    return [*steps, users]


def locust_env(cfg: LoadTestConfig, bundle: Path, out: Path, tag: str, token: str) -> dict:
    env = {
        **os.environ,
        **THREAD_ENV,
        "SOCIALREC_USER_IDS": str(bundle / "user_ids.txt"),
        "SOCIALREC_ITEM_IDS": str(bundle / "item_ids.txt"),
        "SOCIALREC_LOADTEST_OUT": str(out),
        "SOCIALREC_LOADTEST_TAG": tag,
        "SOCIALREC_WRITE_TOKEN": token,
        "SOCIALREC_ZIPF": str(cfg.zipf),
        "SOCIALREC_K": str(cfg.k),
        "SOCIALREC_SEED": str(cfg.seed),
        "SOCIALREC_SHAPE": cfg.shape,
        "SOCIALREC_NEW_ITEMS": str(cfg.new_items),
    }
    if cfg.shape == "steps":
        steps = list(cfg.steps) or _steps(cfg.users)
        env["SOCIALREC_STEPS"] = ",".join(map(str, steps))
        env["SOCIALREC_STEP_S"] = str(cfg.duration / len(steps))
    return env


class Backend:
    """The feature store under test: one private redis-server, or a local Redis Cluster
    (3 primaries + 3 replicas, cfg.redis_cluster)."""

    def __init__(self, cfg: LoadTestConfig, dir: Path) -> None:
        self.cluster: LocalCluster | None = None
        self.redis: RedisProcess | None = None
        shutil.rmtree(dir, ignore_errors=True)  # what an interrupted run left (cluster state)
        if cfg.redis_cluster:
            self.cluster = start_cluster(dir=dir)
        else:
            self.redis = start_redis(dir=dir, unixsocket=cfg.unix_socket)
        self.serve_url = (
            self.redis.unix_url if self.redis is not None and cfg.unix_socket else self.url
        )

    @property
    def url(self) -> str:
        return self.cluster.url if self.cluster is not None else self.redis.url  # type: ignore[union-attr]

    def store_cfg(self, namespace: str) -> StoreConfig:
        return StoreConfig(url=self.url, namespace=namespace, cluster=self.cluster is not None)

    def cluster_flags(self) -> list[str]:
        return ["--redis-cluster"] if self.cluster is not None else []

    def pids(self) -> dict[int, int]:
        """{port: pid} of the running redis-servers."""
        nodes = self.cluster.nodes if self.cluster is not None else [self.redis]
        return {n.port: n.proc.pid for n in nodes if n is not None and n.running}

    def cleanup(self) -> None:
        if self.cluster is not None:
            self.cluster.cleanup()
        if self.redis is not None:
            self.redis.cleanup()


class Fleet:
    """The servers under test: one, or ``n`` replicas behind HAProxy (per-call balancing).

    CPU is counted per window over every replica's process tree; a replica killed during the
    window is counted up to its kill (read just before it), its replacement from its start.
    """

    def __init__(self, make: Callable[[int | None], ServerProcess], n: int, dir: Path) -> None:
        self.make = make
        self.servers = [make(None) for _ in range(n)]
        self.balancer = (
            HAProxy([(f"r{i}", s.address) for i, s in enumerate(self.servers)], dir)
            if n > 1
            else None
        )
        self._base: dict[int, float] = {}
        self._retired = 0.0

    @property
    def address(self) -> str:
        return self.balancer.address if self.balancer is not None else self.servers[0].address

    def start(self) -> Fleet:
        for s in self.servers:
            s.start()
        for s in self.servers:
            s.wait_serving()
        if self.balancer is not None:
            self.balancer.start()
            self.wait_in_rotation(len(self.servers), 30.0)
        return self

    def wait_in_rotation(self, n_up: int, timeout_s: float) -> float | None:
        """Seconds until the balancer has ``n_up`` replicas UP (None: not within timeout_s)."""
        assert self.balancer is not None
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if sum(v == "UP" for v in self.balancer.server_status().values()) == n_up:
                return round(time.monotonic() - t0, 2)
            time.sleep(0.05)
        return None

    def metrics_ports(self) -> list[int]:
        return [s.metrics_port for s in self.servers if s.metrics_port is not None and s.alive()]

    def begin_window(self) -> None:
        self._base = {s.pid: tree_cpu_s(s.pid) for s in self.servers}
        self._retired = 0.0

    def window_cpu_s(self) -> float:
        live = sum(tree_cpu_s(s.pid) - self._base.get(s.pid, 0.0) for s in self.servers)
        return self._retired + live

    def kill(self, i: int) -> ServerProcess:
        """SIGKILL replica ``i`` and its workers (its CPU so far is kept for the window)."""
        victim = self.servers[i]
        self._retired += tree_cpu_s(victim.pid) - self._base.get(victim.pid, 0.0)
        pids = [victim.pid, *children(victim.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        victim.stop(timeout_s=5)  # reaps it
        return victim

    def replace(self, i: int) -> ServerProcess:
        """Start a new replica on replica ``i``'s port and wait until it serves."""
        new = self.make(self.servers[i].port)
        self.servers[i] = new
        new.start().wait_serving()
        return new

    def stop(self) -> None:
        if self.balancer is not None:
            self.balancer.stop()
        for s in self.servers:
            s.stop()


def scrape_fleet(ports: list[int]) -> dict[int, dict]:
    return {p: scrape(p) for p in ports}


def _merge(snaps: list[dict]) -> dict:
    """Sum of several /metrics snapshots (histogram buckets, sums, counts and values add up)."""
    out: dict = {}
    for snap in snaps:
        for key, h in snap.items():
            m = out.setdefault(key, {"buckets": {}, "sum": 0.0, "count": 0.0, "value": 0.0})
            for le, c in h["buckets"].items():
                m["buckets"][le] = m["buckets"].get(le, 0.0) + c
            for f in ("sum", "count", "value"):
                m[f] += h[f]
    return out


def fleet_window(before: dict[int, dict], after: dict[int, dict]) -> tuple[dict, dict]:
    """(before, after) summed over the replicas still answering at the end; a replica started
    during the window counts from zero; one killed in it drops out (its calls are in the
    client numbers, not in the server histograms)."""
    return _merge([before.get(p, {}) for p in after]), _merge(list(after.values()))


def read_timeline(out: Path, tag: str) -> dict[int, dict[str, int]]:
    """{unix second: {"ok": calls, "failed": calls}} summed over the Locust processes."""
    res: dict[int, dict[str, int]] = {}
    for r in _rows(out, "timeline", tag):
        sec = res.setdefault(int(r["t"]), {"ok": 0, "failed": 0})
        sec[r["what"]] += r["count"]
    return res


def recovery(timeline: dict[int, dict[str, int]], t_fault: float) -> dict:
    """Failed calls from the fault on and how long until the last of them (seconds after the
    fault; 0 when nothing failed)."""
    after = {t: v for t, v in timeline.items() if t >= int(t_fault)}
    failed_secs = [t for t, v in after.items() if v["failed"]]
    return {
        "failed_after_fault": sum(v["failed"] for v in after.values()),
        "ok_after_fault": sum(v["ok"] for v in after.values()),
        "seconds_with_failures": len(failed_secs),
        "recovered_after_s": (
            round(max(failed_secs) + 1 - t_fault, 1) if failed_secs else 0.0
        ),  # end of the last second that had a failure
    }


def drive(
    cfg: LoadTestConfig,
    tag: str,
    fleet: Fleet,
    bundle: Path,
    out: Path,
    token: str,
    backend: Backend,
    store: FeatureStore,
    metrics: bool = False,
    fault=None,
) -> dict:
    """Run Locust against a SERVING fleet and measure it; ``fault()`` is called mid-run."""
    old = [f for p in ("writes", "status", "timeline") for f in out.glob(f"{p}-{tag}-*.json*")]
    for f in [*old, out / f"{tag}_final_stats.csv", out / f"steps-{tag}.json"]:
        f.unlink(missing_ok=True)
    after_id = f"{int(time.time() * 1000) - 1}-0"
    before = scrape_fleet(fleet.metrics_ports()) if metrics else {}
    redis_pids = backend.pids()
    fleet.begin_window()
    rcpu0 = {port: tree_cpu_s(pid) for port, pid in redis_pids.items()}
    lb_pid = fleet.balancer.cpu_pid() if fleet.balancer is not None else None
    lb0 = tree_cpu_s(lb_pid) if lb_pid else 0.0
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(cfg.users), "-r", str(cfg.spawn_rate), "-t", f"{int(round(cfg.duration))}s",
        "--csv", str(out / tag), "--html", str(out / f"{tag}.html"),
        "--host", fleet.address, "--stop-timeout", "5", "--exit-code-on-error", "0",
    ]  # fmt: skip
    locust = Proc(cmd, out / f"{tag}-locust.log", locust_env(cfg, bundle, out, tag, token))
    fault_info, t_fault = None, None
    if fault is not None:
        t_at = time.monotonic() + cfg.fault_at * cfg.duration
        while time.monotonic() < t_at and locust.alive():
            time.sleep(0.05)
        t_fault = time.time()
        fault_info = fault()
    code, locust_cpu = locust.wait_cpu(cfg.duration + 120)
    if code != 0:
        raise RuntimeError(f"locust exited with {code}:\n{locust.tail()}")
    cpu = fleet.window_cpu_s()
    # a restarted redis-server is a new process: its CPU before the fault is gone, so a
    # node whose pid changed gives no number
    now_pids = backend.pids()
    rcpu = (
        sum(tree_cpu_s(pid) - rcpu0[port] for port, pid in redis_pids.items())
        if now_pids == redis_pids
        else None
    )
    lb_cpu = tree_cpu_s(lb_pid) - lb0 if lb_pid else None
    after = scrape_fleet(fleet.metrics_ports()) if metrics else {}
    client = read_locust_csv(out / f"{tag}_final_stats.csv")
    n = max(client.get("requests", 0), 1)
    res = {
        "rps": client.get("rps"),
        "p50_ms": client.get("p50_ms"),
        "p95_ms": client.get("p95_ms"),
        "p99_ms": client.get("p99_ms"),
        "mean_ms": client.get("mean_ms"),
        "failures": client.get("failures"),
        "requests": client.get("requests"),
        "server_cpu_us_per_request": round(cpu / n * 1e6, 1),
        "redis_cpu_us_per_request": round(rcpu / n * 1e6, 1) if rcpu is not None else None,
        "balancer_cpu_us_per_request": round(lb_cpu / n * 1e6, 1) if lb_cpu is not None else None,
        "locust_cpu_s": round(locust_cpu, 2),
        "server_cpu_s": round(cpu, 2),
        "replicas": len(fleet.servers),
        "methods": client["methods"],
        "status": read_status(out, tag),
        "writes": verify_writes(store, out, tag, after_id),
    }
    if fleet.balancer is not None:
        res["balancer"] = {
            name: {"status": r["status"], "calls": int(r["stot"] or 0)}
            for name, r in fleet.balancer.stats().items()
        }
    if metrics:
        b, a = fleet_window(before, after)
        res["stages"] = histogram_diff(b, a, "socialrec_stage_seconds")
        res["server_rpc"] = histogram_diff(b, a, "socialrec_rpc_seconds")
        res["bundle_info"] = counter_values(a, "socialrec_bundle_info")
        res["bundle_reloads"] = counter_values(a, "socialrec_bundle_reloads")
        res["fresh"] = {
            "items_per_worker": counter_values(a, "socialrec_fresh_items"),
            "lag": histogram_diff(b, a, "socialrec_fresh_lag_seconds").get("", {}).get("rpc"),
            "errors": counter_values(a, "socialrec_fresh_errors"),
        }
        res["degraded_reads"] = {
            k: v - counter_values(b, "socialrec_degraded").get(k, 0.0)
            for k, v in counter_values(a, "socialrec_degraded").items()
        }
    if fault_info is not None:
        res["fault"] = {**fault_info, **recovery(read_timeline(out, tag), t_fault)}
    if cfg.shape == "steps" and (f := out / f"steps-{tag}.json").exists():
        steps = json.loads(f.read_text())
        res["steps"], res["capacity"] = steps["steps"], steps["capacity"]
    return res


def hot_user(cfg: LoadTestConfig, bundle: Path) -> str:
    """The user the load generator draws most often (rank 1 of its Zipf order)."""
    return ZipfIds(bundle / "user_ids.txt", cfg.zipf, cfg.seed).ids[0]


def make_fault(
    cfg: LoadTestConfig,
    fleet: Fleet,
    backend: Backend,
    root: Path | None,
    src: Path,
    namespace: str,
):
    """The callable that injects ``cfg.fault`` and returns what it did (timings, pids)."""

    def kill_worker() -> dict:
        server = fleet.servers[0]
        victims = sorted(children(server.pid))
        if not victims:
            return {"kind": cfg.fault, "error": "no worker process found"}
        victim = victims[0]
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        new: list[int] = []
        while time.monotonic() - t0 < 30 and not new:  # the supervisor restarts it
            new = [p for p in children(server.pid) if p not in victims]
            time.sleep(0.05)
        return {
            "kind": cfg.fault,
            "killed_pid": victim,
            "replacement_pid": new[0] if new else None,
            "replaced_after_s": round(time.monotonic() - t0, 2) if new else None,
        }

    def restart_redis() -> dict:
        redis = backend.redis
        assert redis is not None
        t0 = time.monotonic()
        redis.kill()
        time.sleep(cfg.redis_pause_s)
        redis.restart()
        return {"kind": cfg.fault, "down_s": round(time.monotonic() - t0, 2)}

    def swap_bundle() -> dict:
        assert root is not None
        t0 = time.monotonic()
        copy_bundle(src, root / "b", "loadtest-b")
        _point(root, "b")
        return {"kind": cfg.fault, "from": "loadtest-a", "to": "loadtest-b",
                "copy_s": round(time.monotonic() - t0, 2)}  # fmt: skip

    def kill_primary() -> dict:
        cluster = backend.cluster
        assert cluster is not None
        user = hot_user(cfg, src)
        key = Keys(namespace).user("h", user)
        primary = cluster.primary_for_key(key)
        replicas = cluster.replicas_of(primary)
        t0 = time.monotonic()
        cluster.kill(primary)
        promoted, promoted_s = None, None
        while time.monotonic() - t0 < 30 and promoted is None:
            promoted = next((r for r in replicas if cluster.role(r) == "master"), None)
            time.sleep(0.02)
        if promoted is not None:
            promoted_s = round(time.monotonic() - t0, 2)
        cluster.wait_ok(30.0)
        ok_s = round(time.monotonic() - t0, 2)
        cluster.restart(primary)  # it rejoins as a replica of the promoted node
        return {
            "kind": cfg.fault,
            "hot_user": user,
            "killed_primary_port": primary.port,
            "promoted_replica_port": promoted.port if promoted is not None else None,
            "promoted_after_s": promoted_s,
            "cluster_ok_after_s": ok_s,
            "old_primary_rejoined_as": cluster.role(primary),
        }

    def kill_server() -> dict:
        t0 = time.monotonic()
        victim = fleet.kill(0)
        down_s = fleet.wait_in_rotation(len(fleet.servers) - 1, 30.0)
        time.sleep(max(cfg.server_down_s - (time.monotonic() - t0), 0.0))
        t1 = time.monotonic()
        new = fleet.replace(0)
        serving_s = round(time.monotonic() - t1, 2)
        back_s = fleet.wait_in_rotation(len(fleet.servers), 30.0)
        return {
            "kind": cfg.fault,
            "killed_pid": victim.pid,
            "marked_down_after_s": down_s,
            "down_s": round(t1 - t0, 2),
            "replacement_pid": new.pid,
            "replacement_serving_after_s": serving_s,
            "back_in_rotation_after_s": (
                round(serving_s + back_s, 2) if back_s is not None else None
            ),
        }

    return {
        "none": None,
        "kill-worker": kill_worker,
        "restart-redis": restart_redis,
        "swap-bundle": swap_bundle,
        "kill-primary": kill_primary,
        "kill-server": kill_server,
    }[cfg.fault]


# ---- the command ---------------------------------------------------------------------------


def ensure_bundle(run_dir: Path) -> Path:
    """RUN/bundle, exported from RUN/teacher.pt first if it is not there yet."""
    bundle = run_dir / "bundle"
    if not (bundle / "manifest.json").exists():
        from socialrec.compression.export import export_run

        export_run(run_dir, bundle)
    return bundle


def check_config(cfg: LoadTestConfig) -> None:
    """ValueError naming the setting for a configuration the run cannot honour."""
    if cfg.shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {cfg.shape!r}")
    if cfg.fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, got {cfg.fault!r}")
    if cfg.duration <= 0 or cfg.users <= 0 or cfg.workers <= 0 or cfg.replicas <= 0:
        raise ValueError("duration, users, workers and replicas must be positive")
    if not 0 <= cfg.new_items <= 1:
        raise ValueError(f"new_items must be a share in [0, 1], got {cfg.new_items}")
    if cfg.ack_replicas < 0:
        raise ValueError(f"ack_replicas must be >= 0, got {cfg.ack_replicas}")
    if any(n <= 0 for n in cfg.steps) or list(cfg.steps) != sorted(set(cfg.steps)):
        raise ValueError(f"steps must be increasing positive user counts, got {list(cfg.steps)}")
    if cfg.fault == "kill-primary" and not cfg.redis_cluster:
        raise ValueError("fault kill-primary needs redis_cluster (a replica to promote)")
    if cfg.fault == "restart-redis" and cfg.redis_cluster:
        raise ValueError("fault restart-redis is for one redis-server; a cluster: kill-primary")
    if cfg.fault == "kill-server" and cfg.replicas < 2:
        raise ValueError("fault kill-server needs replicas >= 2 (another replica takes the calls)")
    if cfg.redis_cluster and cfg.unix_socket:
        raise ValueError("unix_socket applies to one redis-server, not a cluster")
    if cfg.peer:
        if not cfg.peers or len(set(cfg.peers)) != len(cfg.peers):
            raise ValueError(f"peers must name each peer once, got {list(cfg.peers)}")
        if bad := [p for p in cfg.peers if p not in PEERS]:
            raise ValueError(f"unknown peer {bad[0]!r}: one of {sorted(PEERS)}")
        if "ray" in cfg.peers and importlib.util.find_spec("ray") is None:
            raise ValueError("peer 'ray' needs Ray Serve: pip install -e '.[peer]'")


def run(cfg: LoadTestConfig) -> Path:
    """Run the load test (ours, then each peer) and write OUT/summary.json; returns its path."""
    check_config(cfg)
    run_dir = Path(cfg.run).resolve()
    if not (run_dir / "teacher.pt").exists():
        raise FileNotFoundError(f"{run_dir / 'teacher.pt'}: not a trained run")
    out = Path(cfg.out or run_dir / "loadtest").resolve()
    out.mkdir(parents=True, exist_ok=True)
    bundle = ensure_bundle(run_dir)
    if cfg.replicas > 1:
        find_haproxy()  # a clear error before anything starts
    token = secrets.token_hex(16)
    summary: dict = {}
    results: dict[str, dict] = {}  # peer key -> its figures

    from socialrec.serving.publish import PublishConfig
    from socialrec.serving.publish import run as publish

    backend = Backend(cfg, out / "redis-data")
    cluster_flags = backend.cluster_flags()
    try:
        peers = cfg.peers if cfg.peer else ()
        namespaces = {"ours": "lt-ours", "naive": "lt-peer", "ray": "lt-ray"}
        for tag, ns in namespaces.items():
            if tag != "ours" and tag not in peers:
                continue
            with OfflineStore(backend.store_cfg(ns)) as s:
                s.flush(events=True)
            publish(PublishConfig(run=str(run_dir), redis_url=backend.url, namespace=ns,
                                  train_only=True, progress=False,
                                  cluster=backend.cluster is not None))  # fmt: skip

        # ---- ours
        serve_bundle, root = bundle, None
        if cfg.fault == "swap-bundle":
            root = out / "bundles"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            copy_bundle(bundle, root / "a", "loadtest-a")
            _point(root, "a")
            serve_bundle = root
        env = {**THREAD_ENV, "SOCIALREC_WRITE_TOKEN": token}
        args = [
            "--bundle", str(serve_bundle), "--redis-url", backend.serve_url, *cluster_flags,
            "--namespace", namespaces["ours"], "--workers", str(cfg.workers),
            "--watch-interval", "0.5", *cfg.serve_args,
        ]  # fmt: skip
        if cfg.ack_replicas:
            args += ["--ack-replicas", str(cfg.ack_replicas)]
        logs = itertools.count()  # one log file per server process started

        def ours_server(port: int | None) -> ServerProcess:
            return ServerProcess(
                args, port=port, metrics=True, env=env, stop_timeout_s=15.0,
                log=out / f"ours-server-{next(logs)}.log",
            )  # fmt: skip

        fleet = Fleet(ours_server, cfg.replicas, out / "ours-haproxy")
        try:
            fleet.start()
            with FeatureStore(backend.store_cfg(namespaces["ours"])) as store:
                fault = make_fault(cfg, fleet, backend, root, bundle, namespaces["ours"])
                ours = drive(cfg, "ours", fleet, bundle, out, token, backend, store,
                             metrics=True, fault=fault)  # fmt: skip
        finally:
            fleet.stop()
        summary.update(ours)

        # ---- the peers, one after the other, same Locust settings, right after
        for name in peers:
            results[name] = run_peer(cfg, name, run_dir, bundle, out, token, backend, env,
                                     namespaces[name], logs)  # fmt: skip
    finally:
        backend.cleanup()
        shutil.rmtree(out / "redis-data", ignore_errors=True)

    # "peer" and "ratios": the naive peer's, as before --peers; every peer's under "peers"
    summary["peer"] = results.get("naive")
    summary["ratios"] = _ratios(summary, results.get("naive"))
    summary["peers"] = results
    summary["ratios_by_peer"] = {name: _peer_ratios(summary, r) for name, r in results.items()}
    summary["config"] = {
        **asdict(cfg),
        "run": str(run_dir),
        "out": str(out),
        "bundle": str(bundle),
        "bundle_variant": _manifest(bundle).get("variant", {}).get("name"),
        "bundle_version": _manifest(bundle).get("bundle_version"),
        "locustfile": str(LOCUSTFILE.relative_to(ROOT)),
        "argv": sys.argv,
        "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=1))
    return path


def run_peer(
    cfg: LoadTestConfig,
    name: str,
    run_dir: Path,
    bundle: Path,
    out: Path,
    token: str,
    backend: Backend,
    env: dict[str, str],
    namespace: str,
    logs: itertools.count,
) -> dict:
    """One peer under the Locust settings ours had; RuntimeError naming the peer (with the
    tail of its log) if it does not start.

    naive: ``cfg.replicas`` naive servers (behind HAProxy when more than one). ray: one local
    Ray head whose deployment has ``cfg.workers * cfg.replicas`` replicas on as many Ray CPUs
    (the worker processes ours had), balanced by Serve's own proxy.
    """
    cluster_flags = backend.cluster_flags()
    if name == "naive":
        pargs = ["--run", str(run_dir), "--redis-url", backend.serve_url, *cluster_flags,
                 "--namespace", namespace]  # fmt: skip

        def make(port: int | None) -> ServerProcess:
            return ServerProcess(
                pargs, port=port, env=env, stop_timeout_s=15.0,
                log=out / f"peer-server-{next(logs)}.log",
                program=("socialrec.loadtest.naive_server",),
            )  # fmt: skip

        fleet, tag = Fleet(make, cfg.replicas, out / "peer-haproxy"), "peer"
    else:
        n = cfg.workers * cfg.replicas
        rargs = ["--bundle", str(bundle), "--redis-url", backend.serve_url, *cluster_flags,
                 "--namespace", namespace, "--replicas", str(n), "--num-cpus", str(n),
                 "--max-ongoing-requests", str(RAY_MAX_ONGOING_REQUESTS)]  # fmt: skip

        def make(port: int | None) -> ServerProcess:
            return RayPeerProcess(rargs, port=port, env=env, stop_timeout_s=30.0,
                                  log=out / f"{name}-server-{next(logs)}.log")  # fmt: skip

        fleet, tag = Fleet(make, 1, out / f"{name}-haproxy"), name
    try:
        try:
            fleet.start()
        except RuntimeError as e:
            raise RuntimeError(f"peer {name!r} ({PEERS[name]}) failed to start: {e}") from None
        idle = None
        if name == "ray":  # what the Ray head burns with no calls (counted in the window too)
            pid, t0 = fleet.servers[0].pid, time.monotonic()
            c0 = tree_cpu_s(pid)
            time.sleep(RAY_IDLE_S)
            idle = round((tree_cpu_s(pid) - c0) / (time.monotonic() - t0), 3)
        with FeatureStore(backend.store_cfg(namespace)) as s:
            res = drive(cfg, tag, fleet, bundle, out, token, backend, s)
        if name == "ray":
            res["processes"] = fleet.servers[0].outside_tree()  # type: ignore[attr-defined]
            res["ray"] = {"replicas": cfg.workers * cfg.replicas,
                          "max_ongoing_requests": RAY_MAX_ONGOING_REQUESTS,
                          "idle_cpu_cores": idle}  # fmt: skip
    finally:
        fleet.stop()
    return {"name": PEERS[name], **res}


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _ratios(ours: dict, peer: dict | None) -> dict | None:
    if not peer:
        return None

    def div(a, b):
        return round(a / b, 2) if a is not None and b else None

    return {
        "rps_vs_peer": div(ours["rps"], peer["rps"]),
        "cpu_per_request_peer_over_ours": div(
            peer["server_cpu_us_per_request"], ours["server_cpu_us_per_request"]
        ),
        "p99_peer_over_ours": div(peer["p99_ms"], ours["p99_ms"]),
    }


def _peer_ratios(ours: dict, peer: dict) -> dict:
    """:func:`_ratios` plus, for a steps run, capacity (the best step within the p99 bound)."""
    res = _ratios(ours, peer) or {}
    if "capacity" in ours or "capacity" in peer:
        a, b = ours.get("capacity") or {}, peer.get("capacity") or {}
        ok = a.get("rps") is not None and b.get("rps")
        res["capacity_vs_peer"] = round(a["rps"] / b["rps"], 2) if ok else None
    return res


def print_summary(path: Path) -> None:
    """A few lines for the terminal; the full numbers are in summary.json."""
    s = json.loads(path.read_text())

    def line(name: str, r: dict) -> str:
        return (
            f"{name:12s} {r['rps'] or 0:8.1f} rps  p50 {r['p50_ms']} ms  p95 {r['p95_ms']} ms  "
            f"p99 {r['p99_ms']} ms  failures {r['failures']}/{r['requests']}  "
            f"server CPU {r['server_cpu_us_per_request']} us/request  "
            f"writes lost {r['writes']['lost']}/{r['writes']['acknowledged']}, "
            f"counted twice {r['writes'].get('counted_twice')}"
        )

    print(line("socialrec", s))
    for name, peer in (s.get("peers") or {}).items():
        print(line(peer["name"], peer))
        print(f"ratios vs {name}: {s['ratios_by_peer'][name]}")
    if s.get("balancer"):
        print("replicas behind haproxy: " + ", ".join(
            f"{name} {b['status']} {b['calls']} calls" for name, b in s["balancer"].items()
        ))  # fmt: skip
    if s.get("fault"):
        print(f"fault: {s['fault']}  status: {s['status']}")
    if s.get("capacity") is not None or s.get("steps"):
        print(f"capacity (p99 <= 25 ms): {s.get('capacity')}")
        for peer in (s.get("peers") or {}).values():
            print(f"  {peer['name']}: {peer.get('capacity')}")
    print(f"wrote {path}")
