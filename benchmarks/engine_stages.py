"""The engine's CPU per read by stage on a run's real features, and what the item search could
cost done another way, side by side in one process.

Why: under load a read's engine work costs ~330 us of thread CPU in the server
(``socialrec_engine_cpu_seconds_total``; docs/benchmarks.md), about 1.8x an empty gRPC call's
whole cost, and the request-path targets of issue #15 hinge on whether it can shrink. This
publishes the run's data to a private redis-server, reads ``--n`` uniformly drawn users'
features as the server does (``FeatureStore.read``: the same keys, filters and
friends-of-friends), builds each read's engine query as the servicer does (``make_query``)
and times, per kind of read (content, friends), each stage alone over all the reads, then
the whole ``recommend_batch`` of one read (the sum of the stages falls short of it by what
the stages cost each other in cache when they alternate). Then the content search three
ways at each read's own depth (k + filtered + overfetch): the bundle's index as served, a
float32 ``IndexFlatIP`` over the same decoded vectors, and NumPy (one GEMV, ``argpartition``,
then sorting the k best), with how often each returns the served index's exact id list.

Figures are thread CPU (``time.thread_time``) per read, median over ``--rounds``; the stages
of one round run over the same reads in turn, so host noise hits them alike.

    python benchmarks/engine_stages.py --run RUN [--bundle DIR] [--n 1000] [--k 10]
        [--rounds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as in the server (docs/design.md rule 1)

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from socialrec.serving import publish  # noqa: E402
from socialrec.serving.engine import Engine  # noqa: E402
from socialrec.serving.redis_local import start_redis  # noqa: E402
from socialrec.serving.servicer import make_query  # noqa: E402
from socialrec.serving.store import FeatureStore, StoreConfig  # noqa: E402


def cpu_us(fn: Callable[[object], object], xs: Sequence[object]) -> float:
    """Thread CPU per call of ``fn`` over ``xs``, in microseconds."""
    t0 = time.thread_time()
    for x in xs:
        fn(x)
    return (time.thread_time() - t0) / len(xs) * 1e6


def numpy_search(X: np.ndarray, q: np.ndarray, depth: int) -> np.ndarray:
    """Ids of the ``depth`` best inner products of q (D,) over X (N, D), best first."""
    s = X @ q  # (N,)
    top = np.argpartition(s, -depth)[-depth:] if depth < len(s) else np.arange(len(s))
    return top[np.argsort(-s[top], kind="stable")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run directory (socialrec train)")
    p.add_argument("--bundle", help="bundle directory (default: RUN/bundle)")
    p.add_argument("--n", type=int, default=1000, help="users per kind of read")
    p.add_argument("--k", type=int, default=10, help="answer length (the load test's)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the report as JSON here")
    a = p.parse_args(argv)
    bundle = Path(a.bundle or Path(a.run) / "bundle")
    engine = Engine.load(bundle)
    engine.warmup()
    rng = random.Random(a.seed)
    users = [rng.choice(engine.user_ids) for _ in range(a.n)]
    with tempfile.TemporaryDirectory() as tmp, start_redis(dir=tmp) as redis:
        publish.run(publish.PublishConfig(run=a.run, redis_url=redis.url, progress=False))
        store = FeatureStore(StoreConfig(url=redis.url))
        queries = {
            kind: [make_query(u, a.k, fof, store.read(u, with_fof=fof)) for u in users]
            for kind, fof in (("content", False), ("friends", True))
        }
    rows = {
        "content": [r for q in queries["content"] if not _cold(r := engine._content_row(q))],
        "friends": [r for q in queries["friends"] if not _cold(r := engine._friend_row(q))],
    }
    heads = {"content": "content_vector", "friends": "friend_vector"}
    index = {"content": engine.items, "friends": engine.users}
    U = {
        kind: [engine._tower([r], heads[kind])[0] for r in rows[kind]]
        for kind in ("content", "friends")
    }
    X = engine.items.reconstruct_n(0, engine.items.ntotal)  # (N, D + 1) as the index decodes them
    flat = faiss.IndexFlatIP(X.shape[1])
    flat.add(X)
    depth = [r.kk for r in rows["content"]]
    Uc = U["content"]
    ref = [engine.items.search(u, d)[1][0] for u, d in zip(Uc, depth, strict=True)]
    agree = {
        "flat float32": np.mean([np.array_equal(flat.search(u, d)[1][0], ids)
                                 for u, d, ids in zip(Uc, depth, ref, strict=True)]),
        "numpy gemv": np.mean([np.array_equal(numpy_search(X, u[0], d), ids)
                               for u, d, ids in zip(Uc, depth, ref, strict=True)]),
    }  # fmt: skip
    out_slot: list = [None]

    def stages(kind: str) -> dict[str, Callable[[], float]]:
        rs, us, q = rows[kind], U[kind], queries[kind]
        pairs = list(zip(rs, us, strict=True))
        row = engine._content_row if kind == "content" else engine._friend_row
        rank = engine._content_rows if kind == "content" else engine._friend_rows
        idx = index[kind]

        def answer(pair) -> None:
            r, u = pair
            r.at = 0
            rank([r], u, 0.0, out_slot)

        return {
            "features + filters": lambda: cpu_us(row, q),
            "tower": lambda: cpu_us(lambda r: engine._tower([r], heads[kind]), rs),
            "search": lambda: cpu_us(lambda p: idx.search(p[1], p[0].kk), pairs),
            "search + rank": lambda: cpu_us(answer, pairs),
            "whole read": lambda: cpu_us(lambda x: engine.recommend_batch([x]), q),
        }

    at_depth = list(zip(Uc, depth, strict=True))
    alternatives = {
        "served index": lambda: cpu_us(lambda p: engine.items.search(p[0], p[1]), at_depth),
        "flat float32": lambda: cpu_us(lambda p: flat.search(p[0], p[1]), at_depth),
        "numpy gemv": lambda: cpu_us(lambda p: numpy_search(X, p[0][0], p[1]), at_depth),
    }  # fmt: skip
    plan = {f"{kind}: {name}": fn for kind in ("content", "friends")
            for name, fn in stages(kind).items()}  # fmt: skip
    plan.update({f"item search: {name}": fn for name, fn in alternatives.items()})
    times: dict[str, list[float]] = {name: [] for name in plan}
    for r in range(a.rounds):
        for name, fn in plan.items():
            times[name].append(fn())
        print(f"round {r + 1}/{a.rounds}", file=sys.stderr)
    med = {name: round(statistics.median(v), 1) for name, v in times.items()}
    print(
        f"\nbundle {engine.version} ({bundle}): {engine.items.ntotal} items, "
        f"{engine.users.ntotal} users; {a.n} uniformly drawn users of {a.run}, k={a.k}; "
        f"thread CPU us per read, median of {a.rounds} rounds"
    )
    for kind in ("content", "friends"):
        parts = [med[f"{kind}: {s}"] for s in ("features + filters", "tower", "search + rank")]
        print(f"  {kind:8s} " + "  ".join(f"{s} {med[f'{kind}: {s}']:7.1f}" for s in stages(kind)))
        print(f"  {'':8s} sum of features, tower, search + rank {sum(parts):.1f}")
    mean_depth = statistics.mean(depth)
    print(f"  item search at the reads' depth (mean {mean_depth:.0f}):")
    for name in alternatives:
        same = "" if name == "served index" else f"  same ids as served: {agree[name]:.3f}"
        print(f"    {name:14s} {med[f'item search: {name}']:7.1f}{same}")
    if a.out:
        report = {
            "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
            "bundle": str(bundle),
            "bundle_version": engine.version,
            "items": int(engine.items.ntotal),
            "users": int(engine.users.ntotal),
            "n": a.n,
            "k": a.k,
            "rounds": a.rounds,
            "mean_content_depth": mean_depth,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "median_cpu_us": med,
            "rounds_cpu_us": times,
            "same_ids_as_served": {k: float(v) for k, v in agree.items()},
        }
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _cold(r: object) -> bool:
    """Whether a row builder returned a finished (cold-start) answer instead of a row."""
    return not hasattr(r, "kk")


if __name__ == "__main__":
    sys.exit(main())
