"""Observability of the server: Prometheus metrics and one-JSON-object-per-line logs."""

from __future__ import annotations

import json
import logging
import time

# Latency buckets from 50 us to 1 s: a cache hit is tens of microseconds, a timeout 250 ms.
BUCKETS = (
    5e-5, 1e-4, 1.5e-4, 2e-4, 3e-4, 4e-4, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3,
    7.5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip


class Metrics:
    """Prometheus metrics; in multi-worker mode they live in PROMETHEUS_MULTIPROC_DIR."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.latency = Histogram(
            "socialrec_rpc_seconds", "RPC latency", ["method"], buckets=BUCKETS
        )
        self.stage = Histogram(
            "socialrec_stage_seconds",
            "Latency of a request stage",
            ["method", "stage"],
            buckets=BUCKETS,
        )
        self.batch_size = Histogram(
            "socialrec_batch_size",
            "Requests per engine batch (dynamic batching; 1: a request ran alone)",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16),
        )
        self.engine_cpu = Counter(
            "socialrec_engine_cpu_seconds",
            "Thread CPU time of the engine's batches (tower, searches, filtering and ranking; "
            "divide by socialrec_batch_size_sum for the engine's CPU per read)",
        )
        self.requests = Counter(
            "socialrec_requests_total", "RPCs by final status", ["method", "code"]
        )
        self.reloads = Counter(
            "socialrec_bundle_reloads_total", "Bundle loads by outcome", ["outcome"]
        )
        self.degraded = Counter(
            "socialrec_degraded_total",
            "Reads answered without Redis, by why (unavailable: Redis down or slow; bad_data: "
            "a key of the wrong type or an unreadable value)",
            ["method", "reason"],
        )
        self.version = Gauge(
            "socialrec_bundle_info",
            "Live bundle version (value 1)",
            ["version"],
            multiprocess_mode="livemax",
        )
        self.fresh_items = Gauge(
            "socialrec_fresh_items",
            "Fresh items in this worker's side index",
            multiprocess_mode="livesum",
        )
        self.fresh_lag = Histogram(
            "socialrec_fresh_lag_seconds",
            "From the write that made a fresh item's registry entry (its ack) to this worker's "
            "side index including it",
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
        )
        self.fresh_errors = Counter(
            "socialrec_fresh_errors_total",
            "Fresh-item steps that failed or could not run (the interaction itself is recorded)",
            ["stage"],
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


class RateLimitedLog:
    """At most ``per_s`` log lines a second from one source; the rest are counted and the
    count is reported with the next line that gets through (bad requests must not flood logs)."""

    def __init__(self, logger: logging.Logger, per_s: float = 1.0) -> None:
        self.logger = logger
        self.interval = 1.0 / per_s
        self._next = 0.0
        self.suppressed = 0

    def warning(self, msg: str, **extra: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self.suppressed += 1
            return
        self._next = now + self.interval
        extra = {**extra, "suppressed_since_last": self.suppressed}
        self.suppressed = 0
        self.logger.warning(msg, extra=extra)


_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, worker pid and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for k, v in record.__dict__.items():
            if k not in _RECORD_FIELDS:
                out[k] = v
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the whole process."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
