"""Cost of the feature store's request-time calls, client wall time and Redis CPU, per call.

Starts a private redis-server, publishes a run's training data, then for every user of the
bundle (in order, several passes) times: PING (the round-trip floor), a content read, a
friends read (with friends-of-friends) and an interaction write. Redis CPU per call is the
redis-server process's CPU time (psutil, user + system) over the calls, divided by the calls;
client wall time is the caller's. Both request paths side by side: ``serving.resp`` (what the
server uses) and redis-py (``StoreConfig(fast_path=False)``).

    python benchmarks/redis_reads.py --run runs/lastfm [--passes 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from socialrec.serving.publish import PublishConfig  # noqa: E402
from socialrec.serving.publish import run as publish  # noqa: E402
from socialrec.serving.redis_local import start_redis  # noqa: E402
from socialrec.serving.store import FeatureStore, StoreConfig  # noqa: E402


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the redis-server process itself."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run directory with bundle/ (socialrec compress)")
    ap.add_argument("--passes", type=int, default=2, help="passes over all users per call kind")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()

    users = (Path(a.run) / "bundle" / "user_ids.txt").read_text().split("\n")[:-1]
    redis = start_redis(appendonly=False)
    results: dict = {}
    try:
        publish(PublishConfig(run=a.run, redis_url=redis.url, train_only=True, progress=False))
        for path, fast in (("serving.resp", True), ("redis-py", False)):
            store = FeatureStore(StoreConfig(url=redis.url, fast_path=fast))
            calls = {
                # PING over the same connection the other calls use
                "ping": (lambda u, i, s=store: s._sync_conn().execute("PING"))
                if fast
                else (lambda u, i, s=store: s.ping()),
                "content read": lambda u, i, s=store: s.read(u),
                "friends read (fof)": lambda u, i, s=store: s.read(u, with_fof=True),
                "log interaction": lambda u, i, s=store: s.log_interaction(
                    u, f"bench-item-{i % 500}", 1.0, 10**12 + i
                ),
            }
            for name, fn in calls.items():
                for i, u in enumerate(users[:200]):  # warm-up
                    fn(u, i)
                n = 0
                c0, t0 = cpu_s(redis.proc.pid), time.perf_counter()
                for _ in range(a.passes):
                    for i, u in enumerate(users):
                        fn(u, i)
                        n += 1
                wall, cpu = time.perf_counter() - t0, cpu_s(redis.proc.pid) - c0
                results.setdefault(name, {})[path] = {
                    "calls": n,
                    "client_us": round(wall / n * 1e6, 1),
                    "redis_cpu_us": round(cpu / n * 1e6, 1),
                }
            store.close()
    finally:
        redis.stop()

    print(f"{len(users)} users x {a.passes} passes per call kind; Redis CPU from psutil")
    print(f"{'call':22s} {'path':14s} {'client us':>10s} {'redis CPU us':>13s}")
    for name, by_path in results.items():
        for path, r in by_path.items():
            print(f"{name:22s} {path:14s} {r['client_us']:10.1f} {r['redis_cpu_us']:13.1f}")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
