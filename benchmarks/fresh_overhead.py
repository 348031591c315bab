"""Where fresh items' server CPU goes: the three costs they add, each measured alone.

1. **The fresh write step** (``FreshItems.on_interaction`` after a ``LogInteraction`` with an
   item the bundle does not know): one feature read, one tower run, ``FRESH_RECORD``, the
   fold-in, ``FRESH_PUBLISH``. Compared with the interaction write itself
   (``FeatureStore.alog_interaction``) and with the step for a known item (a dict lookup).
2. **A side-index rebuild** (``FreshItems.refresh`` after a registry change: ``HGETALL`` of
   the registry, decoding the entries that changed, a new ``IndexFlatIP``) at registry sizes
   R; and a worker's first build, which decodes every entry.
3. **A content read with the side index** (``Engine.recommend_content`` with a side index of
   R rows vs none: the extra search and merge).

CPU is the calling thread's (``time.thread_time``; Redis's own CPU is not counted, as the load
test's server CPU does not count it), median of ``--reps`` repetitions, in microseconds. Then
the load test's rates turn them into CPU per request: how many fresh writes per request (the
task mix: 7% of requests log an interaction, ``--new-items`` of them with a new item) and how
many rebuilds per second (at most one per poll interval per worker while the registry
changes) at the registry size the load test reached.

    python benchmarks/fresh_overhead.py --run runs/lastfm

Writes benchmarks/reports/fresh-overhead.json (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from socialrec.compression.export import export_run
from socialrec.serving.config import ServerConfig
from socialrec.serving.engine import Engine, FreshIndex
from socialrec.serving.fresh_serving import FreshItems, _encode
from socialrec.serving.redis_local import start_redis
from socialrec.serving.store import FeatureStore, StoreConfig

LOG_SHARE = 0.07  # loadtest/locustfile.py: LogInteraction's share of the task mix


def _cpu_us(fn, reps: int) -> float:
    """Median thread CPU of one call of ``fn`` (microseconds)."""
    out = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        out.append(time.thread_time() - t0)
    return float(np.median(out) * 1e6)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/lastfm", help="training run (its bundle is exported)")
    ap.add_argument("--bundle", help="use this bundle instead of exporting one from --run")
    ap.add_argument("--reps", type=int, default=200, help="repetitions per measurement")
    ap.add_argument("--sizes", default="0,100,250,1000,10000", help="registry sizes R")
    ap.add_argument("--new-items", type=float, default=0.2, help="share of writes to new items")
    ap.add_argument("--rps", type=float, default=600.0, help="load-test requests per second")
    ap.add_argument("--workers", type=int, default=2, help="server workers (rebuilds each)")
    ap.add_argument("--poll-s", type=float, default=0.25, help="fresh-item poll interval")
    ap.add_argument("--registry", type=int, default=250, help="registry size in the load test")
    ap.add_argument("--out", default="benchmarks/reports/fresh-overhead.json")
    a = ap.parse_args(argv)
    sizes = [int(x) for x in a.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="fresh-overhead-"))
    bundle = Path(a.bundle) if a.bundle else export_run(a.run, tmp / "bundle")
    engine = Engine.load(bundle)
    if engine.fresh_prior is None:
        print(f"{bundle}: no fresh_prior.npz; export the bundle again", file=sys.stderr)
        return 2
    redis = start_redis(dir=tmp / "redis")
    try:
        report = asyncio.run(_measure(a, engine, redis.url, sizes))
    finally:
        redis.stop()
    report.update(
        {
            "command": "python benchmarks/fresh_overhead.py " + " ".join(argv or sys.argv[1:]),
            "bundle": str(bundle),
            "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "measured_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    _print(report)
    print(f"wrote {a.out}")
    return 0


async def _measure(a, engine: Engine, url: str, sizes: list[int]) -> dict:
    store = FeatureStore(StoreConfig(url=url, namespace="fresh-overhead"))
    cfg = ServerConfig(bundle="", redis_url=url)
    holder = SimpleNamespace(live=SimpleNamespace(engine=engine))
    fresh = FreshItems(cfg, holder, store, None)
    known = list(engine.item_index)[:50]
    users = [f"u{j}" for j in range(64)]
    now = int(time.time() * 1000)
    for j, u in enumerate(users):  # a few known items each, so every user has a vector
        for t, item in enumerate(known[j % 10 : j % 10 + 8]):
            await store.alog_interaction(u, item, 1.0, now - 10_000 + t, "", now)

    async def cpu_async(make, reps: int) -> float:
        out = []
        for i in range(reps):
            coro = make(i)
            t0 = time.thread_time()
            await coro
            out.append(time.thread_time() - t0)
        return float(np.median(out) * 1e6)

    write_us = await cpu_async(
        lambda i: store.alog_interaction(users[i % 64], known[i % 50], 1.0, now + i, "", now),
        a.reps,
    )
    known_step_us = await cpu_async(
        lambda i: fresh.on_interaction(users[i % 64], known[i % 50], now + i, now), a.reps
    )
    # fresh items with 1..10 users each: each call records one more user and refolds
    fresh_step_us = await cpu_async(
        lambda i: fresh.on_interaction(users[i % 64], f"new-{i // 10}", now + i, now), a.reps
    )
    # a user's features are read, the tower run: the part of the step a content read also pays
    tower_us = _cpu_us(lambda: engine.content_vector([(known[0], 1.0)] * 8, []), a.reps)

    rng = np.random.default_rng(0)
    dim = engine.items.d
    rebuild, read = {}, {}
    feats = await store.aread(users[0])
    base_us = _cpu_us(
        lambda: engine.recommend_content(feats.history, feats.friends, 20, (), None), a.reps
    )
    for r in sizes:
        rows = rng.normal(0, 0.05, (r, dim)).astype(np.float32)
        entries = {
            f"r{r}-{j}": json.dumps(
                {"row": _encode(rows[j]), "n": 3, "ms": now, "b": engine.version},
                separators=(",", ":"),
            )
            for j in range(r)
        }
        fetch_reps = max(5, min(a.reps, 200_000 // max(r, 1)))
        # the registry in Redis, read the way a poll reads it
        await store._aglobal([("DEL", store.keys.fresh)])
        if entries:
            pairs = [x for k, v in entries.items() for x in (k, f"1|{v}")]
            for i in range(0, len(pairs), 2000):
                await store._aglobal([("HSET", store.keys.fresh, *pairs[i : i + 2000])])
        fetch_us = await cpu_async(lambda i: store.afresh_registry(), fetch_reps)

        def cold(entries=entries) -> None:
            fresh._decoded = {}  # every entry parsed, as at a worker's first build
            fresh.build(engine, 1, 0, entries, frozenset())

        cold_us = _cpu_us(cold, max(3, fetch_reps // 4))
        # a rebuild after a change: the entries of the previous build are parsed already
        build_us = _cpu_us(
            lambda entries=entries: fresh.build(engine, 1, 0, entries, frozenset()), fetch_reps
        )
        index = fresh.index
        assert isinstance(index, FreshIndex) and len(index) == r
        with_us = _cpu_us(
            lambda index=index: engine.recommend_content(
                feats.history, feats.friends, 20, (), index
            ),
            a.reps,
        )
        rebuild[r] = {
            "fetch_us": round(fetch_us, 1),
            "build_us": round(build_us, 1),
            "first_build_us": round(cold_us, 1),
        }
        read[r] = {"read_us": round(with_us, 1), "extra_us": round(with_us - base_us, 1)}
    await store.aclose()

    # the load test's rates -> CPU per request
    fresh_writes_per_request = LOG_SHARE * a.new_items
    reg = min(sizes, key=lambda s: abs(s - a.registry))
    rebuilds_per_s = a.workers / a.poll_s  # an upper bound: one per poll per worker
    per_request = {
        "fresh_write_step_us": round(fresh_writes_per_request * fresh_step_us, 1),
        "rebuilds_us": round(
            rebuilds_per_s * (rebuild[reg]["fetch_us"] + rebuild[reg]["build_us"]) / a.rps, 1
        ),
        "side_index_search_us": round(0.7 * read[reg]["extra_us"], 1),  # 70% content reads
    }
    per_request["total_us"] = round(sum(per_request.values()), 1)
    return {
        "what": "fresh items' server CPU by part (thread CPU, medians, microseconds)",
        "write": {
            "log_interaction_us": round(write_us, 1),
            "fresh_step_known_item_us": round(known_step_us, 1),
            "fresh_step_new_item_us": round(fresh_step_us, 1),
            "of_which_tower_us": round(tower_us, 1),
        },
        "content_read_without_side_index_us": round(base_us, 1),
        "rebuild_by_registry_size": rebuild,
        "content_read_by_side_index_size": read,
        "load_test_rates": {
            "fresh_writes_per_request": fresh_writes_per_request,
            "rebuilds_per_s_upper_bound": rebuilds_per_s,
            "rps": a.rps,
            "registry_size": reg,
        },
        "per_request_at_load_test_rates": per_request,
    }


def _print(r: dict) -> None:
    w = r["write"]
    print(
        f"write: LogInteraction {w['log_interaction_us']:.0f} us; fresh step: known item "
        f"{w['fresh_step_known_item_us']:.1f} us, new item {w['fresh_step_new_item_us']:.0f} us "
        f"(tower {w['of_which_tower_us']:.0f} us)"
    )
    print(f"content read without side index: {r['content_read_without_side_index_us']:.0f} us")
    print(
        f"{'R':>6s} {'fetch us':>9s} {'build us':>9s} {'1st build':>9s} {'read us':>8s} "
        f"{'extra us':>9s}"
    )
    for size, b in r["rebuild_by_registry_size"].items():
        c = r["content_read_by_side_index_size"][size]
        print(
            f"{size:>6} {b['fetch_us']:9.0f} {b['build_us']:9.0f} {b['first_build_us']:9.0f} "
            f"{c['read_us']:8.0f} "
            f"{c['extra_us']:9.0f}"
        )
    p = r["per_request_at_load_test_rates"]
    print("per request at the load test's rates: " + ", ".join(f"{k} {v}" for k, v in p.items()))


if __name__ == "__main__":
    raise SystemExit(main())
