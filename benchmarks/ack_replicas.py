"""What ``--ack-replicas 1`` costs a write: LogInteraction-equivalent writes
(``FeatureStore.alog_interaction``, the server's async path, a fresh request id each) with
``ack_replicas`` 0 and 1 side by side, alternating rounds, on

- ``single-resp`` / ``single-redis-py``: a local primary with one replica (REPLICAOF), through
  the server's two single-node clients;
- ``cluster``: a local Redis Cluster (3 primaries + 3 replicas), redis-py's cluster client;

each one write at a time (``sequential``) and with ``--concurrency`` writes in flight
(``concurrent``). Per variant and round: latency p50 and p99 (us) and writes per second; the
medians over rounds and the ratios ack 1 / ack 0 are printed side by side. As a check that the
acknowledged rounds really waited, the WAIT commands the primaries ran are counted (one per
acknowledged write) and every acknowledged write's history entry is looked up on a replica.

    python benchmarks/ack_replicas.py --writes 2000 --rounds 3 --concurrency 16

Writes benchmarks/reports/ack-replicas.json (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import redis
from socialrec.serving.redis_local import (
    LocalCluster,
    RedisProcess,
    _node_client,
    start_cluster,
    start_redis,
)
from socialrec.serving.store import FeatureStore, StoreConfig

USERS, ITEMS = 1000, 500


def _waits(ports: list[int]) -> int:
    """WAIT commands run so far, summed over these nodes."""
    total = 0
    for port in ports:
        c = _node_client(port, timeout_s=5)
        try:
            total += int(c.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
        finally:
            c.close()
    return total


async def _round(store: FeatureStore, n: int, concurrency: int, rng: random.Random) -> dict:
    """``n`` writes, ``concurrency`` in flight; per-write latencies and throughput."""
    lat = np.empty(n)
    writes = [
        (f"u{rng.randrange(USERS)}", f"i{rng.randrange(ITEMS)}", uuid.uuid4().hex) for _ in range(n)
    ]
    now = int(time.time() * 1000)
    sem = asyncio.Semaphore(concurrency)

    async def one(j: int) -> None:
        user, item, rid = writes[j]
        async with sem:
            t0 = time.perf_counter_ns()
            await store.alog_interaction(user, item, 1.0, now, rid, now)
            lat[j] = (time.perf_counter_ns() - t0) / 1000

    t0 = time.perf_counter()
    if concurrency == 1:
        for j in range(n):
            await one(j)
    else:
        await asyncio.gather(*(one(j) for j in range(n)))
    wall = time.perf_counter() - t0
    return {
        "p50_us": round(float(np.percentile(lat, 50)), 1),
        "p99_us": round(float(np.percentile(lat, 99)), 1),
        "writes_per_s": round(n / wall),
        "writes": n,
        "_last": writes[-1],
    }


async def _bench(
    name: str, base: StoreConfig, primaries: list[int], replica_of, a: argparse.Namespace
) -> dict:
    """Both ack settings of one backend, alternating, both modes; medians and ratios."""
    rng = random.Random(a.seed)
    stores = {ack: FeatureStore(replace(base, ack_replicas=ack)) for ack in (0, 1)}
    out: dict = {"rounds": {}, "medians": {}, "ratios": {}, "checks": {}}
    try:
        for s in stores.values():  # scripts cached, connections open
            for j in range(50):
                await s.alog_interaction("warm", f"w{j}", 1.0, 1, uuid.uuid4().hex)
        for mode, conc in (("sequential", 1), ("concurrent", a.concurrency)):
            rows: dict[int, list[dict]] = {0: [], 1: []}
            waits = 0
            for r in range(a.rounds):
                order = (0, 1) if r % 2 == 0 else (1, 0)
                for ack in order:
                    before = _waits(primaries)
                    row = await _round(stores[ack], a.writes, conc, rng)
                    ran = _waits(primaries) - before
                    if ack == 1:
                        waits += ran
                        user, item, _ = row["_last"]  # the last acknowledged write: replicated
                        key = stores[1].keys.user("h", user)
                        out["checks"].setdefault("last_write_on_replica", True)
                        if replica_of(key).zscore(key, item) is None:
                            out["checks"]["last_write_on_replica"] = False
                    elif ran:
                        raise RuntimeError(f"{name}: {ran} WAITs with ack_replicas 0")
                    del row["_last"]
                    rows[ack].append(row)
                    print(f"  {name:16s} {mode:10s} round {r + 1} ack {ack}: {row}", flush=True)
            out["checks"][f"{mode}_waits"] = {
                "ran": waits,
                "acknowledged_writes": a.writes * a.rounds,
            }
            med = {
                ack: {k: statistics.median(x[k] for x in rows[ack]) for k in ("p50_us", "p99_us", "writes_per_s")}
                for ack in (0, 1)
            }  # fmt: skip
            out["rounds"][mode] = {f"ack{ack}": rows[ack] for ack in (0, 1)}
            out["medians"][mode] = {f"ack{ack}": med[ack] for ack in (0, 1)}
            out["ratios"][mode] = {
                "p50": round(med[1]["p50_us"] / med[0]["p50_us"], 2),
                "p99": round(med[1]["p99_us"] / med[0]["p99_us"], 2),
                "writes_per_s": round(med[1]["writes_per_s"] / med[0]["writes_per_s"], 2),
            }
    finally:
        for s in stores.values():
            await s.aclose()
            s.close()
    return out


def _single(a: argparse.Namespace) -> tuple[RedisProcess, RedisProcess, redis.Redis]:
    primary = start_redis(appendonly=False)
    replica = start_redis(appendonly=False)
    r = redis.Redis(port=replica.port, decode_responses=True, socket_timeout=5)
    r.replicaof("127.0.0.1", primary.port)
    deadline = time.monotonic() + 30
    while r.info("replication").get("master_link_status") != "up":
        if time.monotonic() > deadline:
            raise RuntimeError("the replica did not connect")
        time.sleep(0.05)
    return primary, replica, r


def _cluster_replica(c: LocalCluster):
    clients: dict[int, redis.Redis] = {}

    def replica_of(key: str) -> redis.Redis:
        (rep,) = c.replicas_of(c.primary_for_key(key))
        if rep.port not in clients:
            clients[rep.port] = _node_client(rep.port, timeout_s=5)
            clients[rep.port].execute_command("READONLY")
        return clients[rep.port]

    return replica_of, clients


def _print_table(results: dict) -> None:
    print()
    print(f"{'backend':16s} {'mode':10s} {'p50 ack0':>9s} {'p50 ack1':>9s} {'ratio':>6s} "
          f"{'p99 ack0':>9s} {'p99 ack1':>9s} {'ratio':>6s} {'w/s ack0':>9s} {'w/s ack1':>9s}")  # fmt: skip
    for name, res in results.items():
        for mode, med in res["medians"].items():
            r = res["ratios"][mode]
            z, o = med["ack0"], med["ack1"]
            print(
                f"{name:16s} {mode:10s} {z['p50_us']:9.0f} {o['p50_us']:9.0f} {r['p50']:6.2f} "
                f"{z['p99_us']:9.0f} {o['p99_us']:9.0f} {r['p99']:6.2f} "
                f"{z['writes_per_s']:9.0f} {o['writes_per_s']:9.0f}"
            )
    print("(latencies in us, medians over rounds; ratio = ack 1 / ack 0)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writes", type=int, default=2000, help="writes per round and variant")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per variant")
    ap.add_argument("--concurrency", type=int, default=16, help="writes in flight (concurrent)")
    ap.add_argument("--ack-timeout-ms", type=int, default=500)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/reports/ack-replicas.json")
    a = ap.parse_args()

    t_start = time.perf_counter()
    results: dict = {}
    primary, replica, rr = _single(a)
    cluster = start_cluster()
    replica_of, cclients = _cluster_replica(cluster)
    try:
        info = primary.info
        base = StoreConfig(url=primary.url, namespace="bench", ack_timeout_ms=a.ack_timeout_ms)
        for client in ("resp", "redis-py"):
            results[f"single-{client}"] = asyncio.run(
                _bench(
                    f"single-{client}",
                    replace(base, client=client, namespace=f"bench-{client}"),
                    [primary.port],
                    lambda key: rr,
                    a,
                )
            )
        cbase = replace(base, url=cluster.url, cluster=True, namespace="bench-cluster")
        primaries = [n.port for n in cluster.nodes if cluster.role(n) == "master"]
        results["cluster"] = asyncio.run(_bench("cluster", cbase, primaries, replica_of, a))
    finally:
        rr.close()
        for c in cclients.values():
            c.close()
        cluster.cleanup()
        replica.cleanup()
        primary.cleanup()

    _print_table(results)
    report = {
        "what": "LogInteraction-equivalent writes (FeatureStore.alog_interaction) with "
        "ack_replicas 0 vs 1, alternating rounds; single primary + 1 replica and a local "
        "cluster of 3 primaries + 3 replicas, all on loopback",
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "args": vars(a),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "redis": info.describe(),
            "redis_py": redis.__version__,
        },
        "seconds": round(time.perf_counter() - t_start, 1),
        "results": results,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {a.out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
