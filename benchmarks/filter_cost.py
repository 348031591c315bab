"""What the feed filters cost: RecommendContent latency with 0 vs 1,000 filtered items,
measured side by side (interleaved calls, one client, one worker, result cache off).

Three kinds of call per user, in turn:
- ``none``: nothing filtered beyond the user's history;
- ``exclude``: the request carries 1,000 ``exclude_ids`` (items the user would otherwise get);
- ``dismissed``: a twin of the user (same history and friends) that has dismissed 1,000
  other items (read from Redis in the feature round trip, as a long-lived user's filter
  state is).
Reports client-side p50 / p99 per kind and the ratio to ``none``, and checks every answer
still has k items.

    python benchmarks/filter_cost.py --run runs/synthetic --n 600 --out REPORT.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from socialrec.loadtest.run import ensure_bundle
from socialrec.serving.harness import ServerProcess
from socialrec.serving.offline_store import OfflineStore
from socialrec.serving.redis_local import start_redis
from socialrec.serving.store import FeatureStore, StoreConfig

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc

KINDS = ("none", "exclude", "dismissed")


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="training run (RUN/bundle exported if missing)")
    ap.add_argument("--n", type=int, default=600, help="calls per kind")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--filtered", type=int, default=1000, help="items filtered per call")
    ap.add_argument("--out", help="write the report here (JSON)")
    a = ap.parse_args()

    bundle = ensure_bundle(Path(a.run))
    items = (bundle / "item_ids.txt").read_text().split("\n")[:-1]
    users = (bundle / "user_ids.txt").read_text().split("\n")[:-1]
    if len(items) < a.filtered + a.k:
        sys.exit(f"the bundle has {len(items)} items; --filtered {a.filtered} leaves too few")
    rng = random.Random(0)
    sample = rng.sample(users, min(len(users), 100))
    with start_redis(appendonly=False) as redis:
        from socialrec.serving.publish import PublishConfig
        from socialrec.serving.publish import run as publish

        ns = "filter-cost"
        cfg = StoreConfig(url=redis.url, namespace=ns)
        with OfflineStore(cfg) as off:
            off.flush(events=True)
        publish(PublishConfig(run=a.run, redis_url=redis.url, namespace=ns, progress=False))
        # Each sampled user gets a twin with the same history and friends that has also
        # dismissed 1,000 other items.
        with FeatureStore(cfg) as store:
            for u in sample:
                f = store.read(u)
                for t, (item, w) in enumerate(reversed(f.history)):
                    store.log_interaction(f"{u}~d", item, w, 1 + t)
                for friend in f.friends:
                    store.add_friendship(f"{u}~d", friend, 1)
                seen = {item for item, _ in f.history}
                for item in rng.sample([i for i in items if i not in seen], a.filtered):
                    store.dismiss(f"{u}~d", item, "", 1)
        args = ["--bundle", str(bundle), "--redis-url", redis.url, "--namespace", ns,
                "--workers", "1", "--result-cache-mb", "0"]  # fmt: skip
        with ServerProcess(args) as server, server.channel() as ch:
            stub = pb_grpc.RecommenderStub(ch)
            lat: dict[str, list[float]] = {k: [] for k in KINDS}
            short = dict.fromkeys(KINDS, 0)
            for i in range(a.n + 20):  # the first 20 rounds warm up
                u = sample[i % len(sample)]
                exclude = rng.sample(items, a.filtered)
                reqs = {
                    "none": pb.RecommendContentRequest(user_id=u, k=a.k),
                    "exclude": pb.RecommendContentRequest(user_id=u, k=a.k, exclude_ids=exclude),
                    "dismissed": pb.RecommendContentRequest(user_id=f"{u}~d", k=a.k),
                }
                for kind in rng.sample(KINDS, len(KINDS)):  # a new order every round
                    t0 = time.perf_counter()
                    res = stub.RecommendContent(reqs[kind], timeout=10)
                    dt = (time.perf_counter() - t0) * 1e3
                    if i >= 20:
                        lat[kind].append(dt)
                        short[kind] += len(res.items) < a.k
    base = lat["none"]
    report = {
        "command": " ".join(sys.argv),
        "calls_per_kind": a.n,
        "k": a.k,
        "filtered": a.filtered,
        "kinds": {
            k: {
                "p50_ms": round(statistics.median(v), 3),
                "p99_ms": round(quantile(v, 0.99), 3),
                "p50_over_none": round(statistics.median(v) / statistics.median(base), 2),
                "p99_over_none": round(quantile(v, 0.99) / quantile(base, 0.99), 2),
                "answers_short_of_k": short[k],
            }
            for k, v in lat.items()
        },
    }
    for k, r in report["kinds"].items():
        print(
            f"{k:10s} p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
            f"({r['p50_over_none']}x / {r['p99_over_none']}x of none)  "
            f"short answers {r['answers_short_of_k']}"
        )
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
