"""CPU per request of the engine's tower and search at batch 1, 4, 8 and 16, side by side.

Why: dynamic batching (serving/batcher.py) is worth its queue only if one tower run and one
search per index over B requests cost less per request than B runs of one; these numbers
choose ``serve --batch-max``. Requests are random users (engine_latency.make_queries: histories
of the bundle's items, friends, friends-of-friends), half content, half friends, interleaved
as a worker sees them. Each round runs every batch size over the same requests, in turn, so the
shared machine's noise hits all sizes alike; the report keeps each size's median over rounds.
CPU is the thread's CPU time (``time.thread_time``) around ``Engine.recommend_batch``; the
stage split (tower = features + ``session.run``, search = FAISS, rank = filter + answer) is
each stage's share of the answers' wall-clock timings applied to that CPU time (a batch's
shared stages counted once).

    python benchmarks/batching.py --bundle DIR [--n 1600] [--rounds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as in the server (docs/design.md rule 1)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_latency import make_queries  # noqa: E402
from socialrec.serving.engine import (  # noqa: E402
    ContentQuery,
    Engine,
    EngineConfig,
    FriendQuery,
    Query,
)

SIZES = (1, 4, 8, 16)


def requests(engine: Engine, n: int, k: int, seed: int) -> list[Query]:
    """n reads, content and friends alternating, the content ones leaving out their history."""
    out: list[Query] = []
    for i, (user, hist, fr, fof) in enumerate(make_queries(engine, n, 50, 20, 20, seed)):
        if i % 2 == 0:
            out.append(ContentQuery(hist, fr, k, frozenset(item for item, _ in hist)))
        else:
            out.append(FriendQuery(user, hist, fr, fof, k, frozenset()))
    return out


def measure(engine: Engine, queries: list[Query], size: int) -> dict[str, float]:
    """Microseconds per request: CPU of recommend_batch, and the stage split."""
    cpu = 0.0
    stages = {"tower": 0.0, "search": 0.0, "rank": 0.0}
    for at in range(0, len(queries) - size + 1, size):
        batch = queries[at : at + size]
        c0 = time.thread_time()
        results = engine.recommend_batch(batch)
        cpu += time.thread_time() - c0
        t = results[0].timings  # the batch's shared stages (every row carries the same)
        stages["tower"] += t["onnx"]
        stages["search"] += t["faiss"]
        stages["rank"] += sum(r.timings["rank"] for r in results)
    n = (len(queries) // size) * size
    # The stages are wall-clock (preemption on a shared host inflates them all alike): report
    # each one's share of the measured CPU.
    scale = cpu / max(sum(stages.values()), 1e-12)
    return {"cpu_us": 1e6 * cpu / n, **{f"{s}_us": 1e6 * v * scale / n for s, v in stages.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle directory")
    p.add_argument("--n", type=int, default=1600, help="requests per batch size and round")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the report as JSON here")
    a = p.parse_args(argv)

    engine = Engine.load(a.bundle, config=EngineConfig())
    engine.warmup()
    queries = requests(engine, a.n, a.k, a.seed)
    for size in SIZES:  # untimed pass: caches and allocator warm for every shape
        measure(engine, queries[: 20 * size], size)
    rounds: dict[int, list[dict[str, float]]] = {s: [] for s in SIZES}
    for r in range(a.rounds):
        for size in SIZES:
            rounds[size].append(measure(engine, queries, size))
        row = "  ".join(f"B={s}: {rounds[s][-1]['cpu_us']:7.1f}" for s in SIZES)
        print(f"round {r + 1}/{a.rounds}  CPU us/request  {row}", flush=True)
    med = {
        s: {key: statistics.median(x[key] for x in v) for key in v[0]} for s, v in rounds.items()
    }
    base = med[1]["cpu_us"]
    print(
        f"\nbundle {engine.version}: {len(engine.item_ids)} items, {len(engine.user_ids)} users, "
        f"index {engine.bundle.manifest.get('index')}; {a.n} requests (content/friends "
        f"alternating), k={a.k}, median of {a.rounds} rounds, one thread; microseconds per request"
    )
    print(f"{'batch':>6}{'CPU':>9}{'vs B=1':>8}{'tower':>9}{'search':>9}{'rank':>9}")
    for s in SIZES:
        m = med[s]
        print(
            f"{s:>6}{m['cpu_us']:>9.1f}{m['cpu_us'] / base:>8.2f}{m['tower_us']:>9.1f}"
            f"{m['search_us']:>9.1f}{m['rank_us']:>9.1f}"
        )
    if a.out:
        report = {
            "command": "python benchmarks/batching.py " + " ".join(argv or sys.argv[1:]),
            "bundle": engine.version,
            "items": len(engine.item_ids),
            "users": len(engine.user_ids),
            "index": engine.bundle.manifest.get("index"),
            "dims": engine.bundle.manifest.get("dims"),
            "n": a.n,
            "k": a.k,
            "rounds": a.rounds,
            "machine": f"{platform.machine()} {platform.python_version()} {os.cpu_count()} cpus",
            "load": os.getloadavg(),
            "median_us_per_request": {
                str(s): {key: round(v, 1) for key, v in m.items()} for s, m in med.items()
            },
            "cpu_vs_batch_1": {str(s): round(m["cpu_us"] / base, 3) for s, m in med.items()},
            "per_round": {
                str(s): [{key: round(v, 1) for key, v in x.items()} for x in v]
                for s, v in rounds.items()
            },
        }
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
