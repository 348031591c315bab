"""Locust plumbing for gRPC: a timing interceptor, a base user, Zipf id pools, a steps shape.

Locustfiles import from here and declare only tasks (STYLE.md). Everything is configured
through environment variables set by ``loadtest/run.py`` (see :class:`Settings`), so a
locustfile also runs by hand: ``SOCIALREC_USER_IDS=... python -m locust -f ...``.

gevent: Locust monkey-patches the standard library; gRPC's C core needs its own hook
(:func:`grpc.experimental.gevent.init_gevent`) before the first channel exists, or a blocking
call stalls every greenlet of the process. Importing this module does it.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, constant, events
from locust.env import Environment
from locust.shape import LoadTestShape
from socialrec.loadtest.ids import ZipfIds

grpc_gevent.init_gevent()  # before any channel is created (module docstring)

STEP_P99_LIMIT_MS = 25.0  # the knee: the last step whose client p99 stays within this


@dataclass(frozen=True)
class Settings:
    """What the load generator needs to know, read once from the environment."""

    user_ids: str  # SOCIALREC_USER_IDS: the bundle's user_ids.txt (one id per line)
    item_ids: str  # SOCIALREC_ITEM_IDS: the bundle's item_ids.txt
    out: str  # SOCIALREC_LOADTEST_OUT: where write logs and status counts go
    tag: str = "ours"  # SOCIALREC_LOADTEST_TAG: file-name prefix (ours | peer)
    token: str = ""  # SOCIALREC_WRITE_TOKEN: bearer token for writes
    zipf: float = 1.1  # SOCIALREC_ZIPF: P(rank r) ~ r^-zipf
    k: int = 10  # SOCIALREC_K
    seed: int = 0  # SOCIALREC_SEED: id popularity order and per-user draws
    timeout_s: float = 5.0  # SOCIALREC_TIMEOUT_S: per-call deadline
    # SOCIALREC_NEW_ITEMS: share of interactions with items the bundle does not know (new
    # posts), drawn Zipf-like from SOCIALREC_NEW_ITEM_POOL ids, so some get many users soon
    new_items: float = 0.0
    new_item_pool: int = 200

    @classmethod
    def from_env(cls) -> Settings:
        e = os.environ
        return cls(
            user_ids=e.get("SOCIALREC_USER_IDS", ""),
            item_ids=e.get("SOCIALREC_ITEM_IDS", ""),
            out=e.get("SOCIALREC_LOADTEST_OUT", "."),
            tag=e.get("SOCIALREC_LOADTEST_TAG", "ours"),
            token=e.get("SOCIALREC_WRITE_TOKEN", ""),
            zipf=float(e.get("SOCIALREC_ZIPF", "1.1")),
            k=int(e.get("SOCIALREC_K", "10")),
            seed=int(e.get("SOCIALREC_SEED", "0")),
            timeout_s=float(e.get("SOCIALREC_TIMEOUT_S", "5")),
            new_items=float(e.get("SOCIALREC_NEW_ITEMS", "0")),
            new_item_pool=int(e.get("SOCIALREC_NEW_ITEM_POOL", "200")),
        )


class RpcStatusError(Exception):
    """A non-OK gRPC status, as Locust records it: ``CODE: details``."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        super().__init__(f"{code.name}: {details or ''}")
        self.code = code


STATUS: Counter[tuple[str, str]] = Counter()  # (method, code) -> calls, this process
# (unix second, "ok" | "failed") -> calls, this process: when failures happened and stopped
TIMELINE: Counter[tuple[int, str]] = Counter()
# What an app backend retries (README "Errors and retries"): the server could not do it now.
RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)
WRITE_BACKOFF_S = (0.1, 0.3, 1.0, 2.0)  # a write is tried 1 + len(...) times, same request_id


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Fires one Locust request event per unary call: type "grpc", name = the method name,
    time in ms, length = serialized reply size, exception on a non-OK status."""

    def __init__(self, environment: Environment) -> None:
        self.env = environment

    def intercept_unary_unary(self, continuation, client_call_details, request):
        name = client_call_details.method.rsplit("/", 1)[-1]
        t0 = time.perf_counter()
        call = continuation(client_call_details, request)
        code = call.code()  # blocks until the call is done
        ms = (time.perf_counter() - t0) * 1000.0
        exc, length, reply = None, 0, None
        if code == grpc.StatusCode.OK:
            reply = call.result()
            length = reply.ByteSize()
        else:
            exc = RpcStatusError(code, call.details())
        STATUS[(name, code.name)] += 1
        TIMELINE[(int(time.time()), "ok" if exc is None else "failed")] += 1
        self.env.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=ms,
            response_length=length,
            response=reply,
            context=None,
            exception=exc,
        )
        return call


class GrpcUser(User):
    """A simulated app backend with its own channel (own connection, so SO_REUSEPORT spreads
    users over server workers), an interceptor that reports to Locust, and id pools."""

    abstract = True
    wait_time = constant(0)  # closed loop: the next call as soon as the last one returns
    stub_class: Any = None
    _pools: dict[tuple[str, float, int], ZipfIds] = {}
    _counter = itertools.count()

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if self.host is None or self.stub_class is None:
            raise ValueError("GrpcUser needs --host HOST:PORT and a stub_class")
        self.settings = Settings.from_env()
        s = self.settings
        self.users = self._pool(s.user_ids, s)
        self.items = self._pool(s.item_ids, s)
        self.new_items = ZipfIds(
            None, s.zipf, s.seed, ids=[f"new-{s.seed}-{i}" for i in range(max(s.new_item_pool, 1))]
        )
        self.rng = random.Random(s.seed * 1_000_003 + next(self._counter))
        host = self.host.removeprefix("http://").removeprefix("grpc://")
        raw = grpc.insecure_channel(host, options=[("grpc.use_local_subchannel_pool", 1)])
        self._channel = grpc.intercept_channel(raw, LocustInterceptor(environment))
        self.stub = self.stub_class(self._channel)
        self.auth = (("authorization", f"Bearer {s.token}"),)

    @classmethod
    def _pool(cls, path: str, s: Settings) -> ZipfIds:
        key = (path, s.zipf, s.seed)
        if key not in cls._pools:
            cls._pools[key] = ZipfIds(path, s.zipf, s.seed)
        return cls._pools[key]

    def user(self) -> str:
        return self.users.draw(self.rng)

    def item(self) -> str:
        return self.items.draw(self.rng)

    def written_item(self) -> str:
        """The item of an interaction: now and then one the bundle does not know."""
        if self.settings.new_items and self.rng.random() < self.settings.new_items:
            return self.new_items.draw(self.rng)
        return self.item()

    def call(self, method: str, request: Any, write: bool = False) -> Any:
        """Call ``method``; the reply, or None on a non-OK status (already reported)."""
        try:
            return getattr(self.stub, method)(
                request,
                timeout=self.settings.timeout_s,
                metadata=self.auth if write else None,
            )
        except grpc.RpcError:
            return None

    def write(self, method: str, request: Any) -> tuple[Any, int]:
        """A write as an app backend sends it: with a fresh request_id, retried with the same
        one after a retryable status (the server applies a request_id once, so a retry never
        counts twice). (reply or None, attempts made); every attempt is reported to Locust."""
        request.request_id = f"lt-{self.rng.getrandbits(64):016x}"
        for attempt, pause in enumerate((*WRITE_BACKOFF_S, None), start=1):
            try:
                return getattr(self.stub, method)(
                    request, timeout=self.settings.timeout_s, metadata=self.auth
                ), attempt
            except grpc.RpcError as e:
                if pause is None or e.code() not in RETRYABLE:
                    return None, attempt
                time.sleep(pause)
        raise AssertionError("unreachable")

    def log_write(self, record: dict) -> None:
        """Append an acknowledged write to this process's JSONL log (checked after the run)."""
        _write_log(self.settings).write(json.dumps(record) + "\n")

    def on_stop(self) -> None:
        self._channel.close()


_LOG_LOCK = threading.Lock()
_LOG: dict[str, Any] = {}


def _write_log(s: Settings):
    with _LOG_LOCK:
        if "f" not in _LOG:
            path = Path(s.out) / f"writes-{s.tag}-{os.getpid()}.jsonl"
            _LOG["f"] = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        return _LOG["f"]


_ENV: dict[str, Environment] = {}


@events.init.add_listener
def _remember(environment: Environment, **_: Any) -> None:
    _ENV["env"] = environment


@events.quit.add_listener
def _final_reports(**_: Any) -> None:
    """After the runner has stopped: the complete stats CSV and per-method status counts.

    Locust's own PREFIX_stats.csv is rewritten once a second by a greenlet that shutdown
    kills, so it misses the last second; TAG_final_stats.csv has every request, in the same
    format (same columns, same percentile code).
    """
    from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

    s = Settings.from_env()
    out = Path(s.out)
    if "env" in _ENV:
        with open(out / f"{s.tag}_final_stats.csv", "w", newline="") as f:
            StatsCSV(_ENV["env"], PERCENTILES_TO_REPORT).requests_csv(csv.writer(f))
    rows = [{"method": m, "code": c, "count": n} for (m, c), n in sorted(STATUS.items())]
    (out / f"status-{s.tag}-{os.getpid()}.json").write_text(json.dumps(rows, indent=1))
    timeline = [{"t": t, "what": w, "count": n} for (t, w), n in sorted(TIMELINE.items())]
    (out / f"timeline-{s.tag}-{os.getpid()}.json").write_text(json.dumps(timeline))
    if "f" in _LOG:
        _LOG["f"].close()


class StepsShape(LoadTestShape):
    """Users step up (SOCIALREC_STEPS, e.g. "1,2,4,8") over equal slices of
    SOCIALREC_STEP_S seconds; per-step client stats go to OUT/steps-TAG.json.

    Active only when SOCIALREC_SHAPE=steps (a shape class in a locustfile otherwise
    overrides -u/-r). Per-step percentiles come from the difference of Locust's response
    time histograms at the step boundaries, so each step is measured on its own requests.
    """

    abstract = os.environ.get("SOCIALREC_SHAPE", "constant") != "steps"

    def __init__(self) -> None:
        super().__init__()
        e = os.environ
        self.steps = [int(x) for x in e.get("SOCIALREC_STEPS", "1,2,4,8").split(",")]
        self.step_s = float(e.get("SOCIALREC_STEP_S", "10"))
        self.settle_s = float(e.get("SOCIALREC_STEP_SETTLE_S", "1"))
        self.current = -1
        self.mark: tuple[float, dict[int, int], int, int] | None = None
        self.results: list[dict] = []

    def _snapshot(self) -> tuple[float, dict[int, int], int, int]:
        total = self.runner.stats.total
        return (
            time.perf_counter(),
            dict(total.response_times),
            total.num_requests,
            total.num_failures,
        )

    def _close_step(self) -> None:
        if self.mark is None:
            return
        t1, hist1, n1, f1 = self._snapshot()
        t0, hist0, n0, f0 = self.mark
        diff = {ms: c - hist0.get(ms, 0) for ms, c in hist1.items() if c > hist0.get(ms, 0)}
        n = n1 - n0
        self.results.append(
            {
                "users": self.steps[self.current],
                "seconds": round(t1 - t0, 2),
                "requests": n,
                "failures": f1 - f0,
                "rps": round(n / max(t1 - t0, 1e-9), 1),
                **{f"p{q}_ms": _percentile(diff, q / 100) for q in (50, 95, 99)},
            }
        )
        self.mark = None

    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        step = int(t // self.step_s)
        if step != self.current:
            self._close_step()
            self.current = step
            if step >= len(self.steps):
                self._write()
                return None
        if self.mark is None and t - step * self.step_s >= self.settle_s:
            self.mark = self._snapshot()  # measure after users have spawned and settled
        return self.steps[step], 100.0

    def _write(self) -> None:
        s = Settings.from_env()
        ok = [r for r in self.results if r["failures"] == 0 and r["p99_ms"] <= STEP_P99_LIMIT_MS]
        knee = max(ok, key=lambda r: r["rps"]) if ok else None
        out = {"p99_limit_ms": STEP_P99_LIMIT_MS, "steps": self.results, "capacity": knee}
        (Path(s.out) / f"steps-{s.tag}.json").write_text(json.dumps(out, indent=1))


def _percentile(hist: dict[int, int], q: float) -> float | None:
    """q-quantile of a {rounded ms: count} histogram (Locust's own rounding)."""
    n = sum(hist.values())
    if n == 0:
        return None
    rank, seen = q * n, 0
    for ms in sorted(hist):
        seen += hist[ms]
        if seen >= rank:
            return float(ms)
    return float(max(hist))
