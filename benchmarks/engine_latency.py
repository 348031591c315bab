"""Single-thread latency of the retrieval engine on a bundle: median and p99 per call, in µs.

Why: the engine is the part of every RPC that the server's own code controls (ONNX tower +
FAISS search + filtering); this isolates it from gRPC and Redis. Queries are random users:
histories drawn from the bundle's item ids, friends and friends-of-friends from its user ids,
all generated before timing starts. Run: ``python benchmarks/engine_latency.py --bundle DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault(
    "OMP_NUM_THREADS", "1"
)  # as in the server (docs/design.md "Performance rules")

import numpy as np  # noqa: E402
from socialrec.serving.engine import Engine, EngineConfig  # noqa: E402

Query = tuple[str, list[tuple[str, float]], list[str], dict[str, int]]


def make_queries(
    engine: Engine, n: int, history: int, friends: int, fof: int, seed: int
) -> list[Query]:
    """n random users: 1..history items with play-count weights, 0..friends friends, fof."""
    rng = np.random.default_rng(seed)
    items, users = engine.item_ids, engine.user_ids
    out: list[Query] = []
    for _ in range(n):
        n_h = int(rng.integers(1, min(history, len(items)) + 1))
        n_f = int(rng.integers(0, min(friends, len(users) - 1) + 1))
        hist = rng.choice(len(items), n_h, replace=False).tolist()
        w = rng.integers(1, 100, n_h).tolist()
        people = rng.choice(len(users), 1 + n_f + fof, replace=False).tolist()
        out.append(
            (
                users[people[0]],
                [(items[i], float(x)) for i, x in zip(hist, w, strict=True)],
                [users[u] for u in people[1 : 1 + n_f]],
                {users[u]: int(rng.integers(1, 6)) for u in people[1 + n_f :]},
            )
        )
    return out


def summarise(wall: list[float], stages: list[dict[str, float]]) -> dict[str, float]:
    """Median and p99 of wall time and the median of each stage, in microseconds."""
    us = np.array(wall) * 1e6
    out = {"median_us": float(np.median(us)), "p99_us": float(np.percentile(us, 99))}
    for name in stages[0]:
        out[f"{name}_median_us"] = float(np.median([s[name] for s in stages]) * 1e6)
    return {key: round(v, 1) for key, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="bundle directory (socialrec export)")
    p.add_argument("--n", type=int, default=2000, help="queries per call type")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--history", type=int, default=50, help="longest random history")
    p.add_argument("--friends", type=int, default=20, help="most friends per user")
    p.add_argument("--fof", type=int, default=20, help="friends-of-friends per user")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    engine = Engine.load(args.bundle, config=EngineConfig())
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.warmup()
    t_warm = time.perf_counter() - t0
    queries = make_queries(engine, args.n, args.history, args.friends, args.fof, args.seed)

    results: dict[str, dict[str, float]] = {}
    for name in ("recommend_content", "recommend_friends"):
        wall: list[float] = []
        stages: list[dict[str, float]] = []
        for user, hist, fr, fof in queries:
            s = time.perf_counter()
            if name == "recommend_content":
                res = engine.recommend_content(hist, fr, args.k)
            else:
                res = engine.recommend_friends(user, hist, fr, fof, args.k)
            wall.append(time.perf_counter() - s)
            stages.append(res.timings)
        results[name] = summarise(wall, stages)

    report = {
        "bundle": engine.version,
        "items": len(engine.item_ids),
        "users": len(engine.user_ids),
        "dims": engine.bundle.manifest.get("dims"),
        "index": engine.bundle.manifest.get("index"),
        "n": args.n,
        "k": args.k,
        "load_s": round(t_load, 3),
        "warmup_s": round(t_warm, 3),
        "machine": f"{platform.machine()} {platform.python_version()} {os.cpu_count()} cpus",
        **results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"bundle {report['bundle']}: {report['items']} items, {report['users']} users, "
        f"dims {report['dims']}, index {report['index']}; load {t_load:.2f}s, warmup {t_warm:.2f}s"
    )
    print(f"{args.n} queries, k={args.k}, single thread; microseconds")
    print(f"{'call':<20}{'median':>9}{'p99':>9}{'onnx':>9}{'faiss':>9}{'rank':>9}")
    for name, r in results.items():
        print(
            f"{name:<20}{r['median_us']:>9.1f}{r['p99_us']:>9.1f}{r['onnx_median_us']:>9.1f}"
            f"{r['faiss_median_us']:>9.1f}{r['rank_median_us']:>9.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
