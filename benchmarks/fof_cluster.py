"""Friend reads on a single Redis (friends-of-friends in one Lua script) vs a Redis Cluster
(the friends' sets read with a pipeline per node, ranked in Python), side by side.

Starts a local redis-server and a local cluster (3 primaries + 3 replicas), loads the same
random friend graph into both, checks that both rank the same friends-of-friends, then runs
``FeatureStore.aread(user, with_fof=True)`` (the server's async path) with ``--concurrency``
reads in flight, alternating the variants ``--rounds`` times. Per variant and round: Redis CPU
per read (INFO cpu, summed over every node), the calling process's CPU per read (what a server
worker spends on the read: client, parsing, and in the cluster the ranking), latency p50 and
p99. Reported: per-round numbers and the medians.

    python benchmarks/fof_cluster.py --users 4000 --degree 60 --reads 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import redis
from socialrec.serving.offline_store import OfflineStore
from socialrec.serving.redis_local import start_cluster, start_redis
from socialrec.serving.store import FeatureStore, StoreConfig

VARIANTS = ("single-resp", "single-redis-py", "cluster")


def graph(users: int, degree: int, seed: int) -> list[tuple[str, str]]:
    """About ``degree`` friends per user on average, uniformly random pairs."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, users, users * degree // 2)
    b = rng.integers(0, users, users * degree // 2)
    return [
        (f"user-{x}", f"user-{y}") for x, y in zip(a.tolist(), b.tolist(), strict=True) if x != y
    ]


def redis_cpu_s(ports: list[int]) -> float:
    """used_cpu_user + used_cpu_sys summed over the nodes, in seconds."""
    total = 0.0
    for p in ports:
        with redis.Redis(port=p) as r:
            cpu = r.info("cpu")
            total += float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return total


async def reads(store: FeatureStore, users: list[str], concurrency: int) -> list[float]:
    """Latency (s) of each read, ``concurrency`` in flight."""
    todo = iter(users)
    lat: list[float] = []

    async def worker() -> None:
        for u in todo:
            t0 = time.perf_counter()
            await store.aread(u, with_fof=True)
            lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await store.aclose()
    return lat


def measure(cfg: StoreConfig, ports: list[int], users: list[str], concurrency: int) -> dict:
    store = FeatureStore(cfg)
    asyncio.run(reads(store, users[:200], concurrency))  # warm up: connections, layout, scripts
    cpu0, proc0, t0 = redis_cpu_s(ports), time.process_time(), time.perf_counter()
    lat = asyncio.run(reads(store, users, concurrency))
    wall, proc1, cpu1 = time.perf_counter() - t0, time.process_time(), redis_cpu_s(ports)
    store.close()
    n = len(lat)
    q = np.quantile(np.array(lat), [0.5, 0.99])
    return {
        "reads": n,
        "redis_cpu_us_per_read": round((cpu1 - cpu0) / n * 1e6, 1),
        "client_cpu_us_per_read": round((proc1 - proc0) / n * 1e6, 1),
        "p50_ms": round(float(q[0]) * 1e3, 3),
        "p99_ms": round(float(q[1]) * 1e3, 3),
        "reads_per_s": round(n / wall, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=4000)
    ap.add_argument("--degree", type=int, default=60, help="average friends per user")
    ap.add_argument("--reads", type=int, default=2000, help="friend reads per variant and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, variants alternating")
    ap.add_argument("--concurrency", type=int, default=8, help="reads in flight")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/reports/fof-cluster.json")
    a = ap.parse_args()

    pairs = graph(a.users, a.degree, a.seed)
    rng = random.Random(a.seed)
    with start_redis(appendonly=False) as single, start_cluster() as cluster:
        base = StoreConfig(url=single.url, namespace="fofbench")
        cfgs = {
            "single-resp": replace(base, client="resp"),
            "single-redis-py": replace(base, client="redis-py"),
            "cluster": replace(base, url=cluster.url, cluster=True),
        }
        ports = {
            "single-resp": [single.port],
            "single-redis-py": [single.port],
            "cluster": [n.port for n in cluster.nodes],
        }
        for cfg in (base, cfgs["cluster"]):
            with OfflineStore(cfg) as off:
                t0 = time.perf_counter()
                counts = off.bulk_load([], pairs, progress=False)
                print(f"loaded {counts['friend_pairs_new']} pairs in "
                      f"{time.perf_counter() - t0:.1f}s ({'cluster' if cfg.cluster else 'single'})")  # fmt: skip
        sample = [f"user-{rng.randrange(a.users)}" for _ in range(50)]
        with FeatureStore(base) as s1, FeatureStore(cfgs["cluster"]) as s2:
            same = all(s1.read(u, with_fof=True) == s2.read(u, with_fof=True) for u in sample)
            friends = [len(s1.read(u).friends) for u in sample]
        assert same, "the cluster path ranks friends-of-friends differently"
        rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(a.rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for v in order:
                users = [f"user-{rng.randrange(a.users)}" for _ in range(a.reads)]
                row = measure(cfgs[v], ports[v], users, a.concurrency)
                rows[v].append({"round": r, **row})
                print(f"round {r + 1}/{a.rounds} {v:16s} {row}", flush=True)
    keys = ("redis_cpu_us_per_read", "client_cpu_us_per_read", "p50_ms", "p99_ms", "reads_per_s")
    medians = {v: {k: statistics.median(x[k] for x in rows[v]) for k in keys} for v in VARIANTS}
    for v in VARIANTS:
        m = medians[v]
        m["total_cpu_us_per_read"] = round(
            m["redis_cpu_us_per_read"] + m["client_cpu_us_per_read"], 1
        )
    report = {
        "what": "friend reads (aread with_fof): single Redis + Lua fof vs Redis Cluster + "
        "pipelined per-node friend-set reads ranked in Python",
        "args": vars(a),
        "graph": {
            "users": a.users,
            "pairs": len(pairs),
            "friends_median": statistics.median(friends),
        },
        "same_fof_on_sample": same,
        "rounds": rows,
        "medians": medians,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\n{'variant':16s} {'redis us/read':>14s} {'client us/read':>15s} {'p50 ms':>8s} {'p99 ms':>8s}"
    )
    for v in VARIANTS:
        m = medians[v]
        print(f"{v:16s} {m['redis_cpu_us_per_read']:14.1f} {m['client_cpu_us_per_read']:15.1f} "
              f"{m['p50_ms']:8.3f} {m['p99_ms']:8.3f}")  # fmt: skip
    print(f"report: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
