"""How soon a fresh item is served: from the N-th acknowledged interaction with an item the
bundle does not know to the first RecommendContent that returns it to a similar user.

A real server (``socialrec serve`` through serving/harness.py's ServerProcess, ``--workers``
processes, fresh-item poll every ``--poll-s``) over a real redis-server, serving a bundle
exported here from ``--run`` (so it carries ``fresh_prior.npz``). Per fresh item: N users who
share a taste (the same few known items in their history) interact with it; a user with that
same history then asks for ``k`` items every ``--probe-ms`` until the item is there (or
``--timeout-s`` passes: counted as missed). Each item starts at a random phase of the poll
interval (a sleep of uniform(0, poll) s), so the loop does not lock onto the poll ticks. Reports p50/p99/max of that latency and the
server's ``socialrec_fresh_lag_seconds`` histogram (registry entry ack -> a worker's side index).

    python benchmarks/fresh_latency.py --run runs/synthetic --items 50

Writes benchmarks/reports/fresh-latency.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from socialrec.compression.export import export_run
from socialrec.serving.harness import ServerProcess
from socialrec.serving.redis_local import start_redis

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc

TOKEN = "fresh-latency-token"


def _lag_histogram(url: str) -> dict:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    buckets, count, total = {}, 0.0, 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name != "socialrec_fresh_lag_seconds":
            continue
        for s in fam.samples:
            if s.name.endswith("_bucket"):
                le = s.labels["le"]
                buckets[le] = buckets.get(le, 0.0) + s.value
            elif s.name.endswith("_count"):
                count += s.value
            elif s.name.endswith("_sum"):
                total += s.value
    return {
        "count": int(count),
        "mean_s": round(total / count, 4) if count else None,
        "buckets_le": {k: int(v) for k, v in buckets.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/synthetic", help="run directory with teacher.pt")
    p.add_argument("--items", type=int, default=50, help="fresh items measured")
    p.add_argument("--users", type=int, default=3, help="interacting users per fresh item (N)")
    p.add_argument("--taste", type=int, default=5, help="known items in the shared history")
    p.add_argument("--k", type=int, default=100, help="k of the probing RecommendContent")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--poll-s", type=float, default=0.25, help="the server's --fresh-poll-s")
    p.add_argument("--method", default="ridge", help="the server's --fresh-method")
    p.add_argument("--probe-ms", type=float, default=5.0, help="pause between probes")
    p.add_argument("--timeout-s", type=float, default=5.0, help="give up on an item after this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/reports/fresh-latency.json")
    a = p.parse_args(argv)

    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="fresh-latency-"))
    t0 = time.perf_counter()
    bundle = export_run(a.run, tmp / "bundle")
    export_s = time.perf_counter() - t0
    items = (bundle / "item_ids.txt").read_text().split("\n")[:-1]
    token = tmp / "token"
    token.write_text(TOKEN)
    redis = start_redis(dir=tmp / "redis")
    rng = random.Random(a.seed)
    args = ["--bundle", str(bundle), "--redis-url", redis.url, "--token-file", str(token)]
    args += ["--workers", str(a.workers), "--fresh-poll-s", str(a.poll_s)]
    args += ["--fresh-method", a.method, "--max-k", str(max(a.k, 50))]
    auth = (("authorization", f"Bearer {TOKEN}"),)
    lat, missed = [], 0
    try:
        with ServerProcess(args, metrics=True) as server:
            stub = pb_grpc.RecommenderStub(server.channel())

            def log(user: str, item: str, ts: int = 0) -> None:
                req = pb.LogInteractionRequest(
                    user_id=user, item_id=item, weight=1.0, timestamp_ms=ts
                )
                stub.LogInteraction(req, metadata=auth, timeout=5)

            for n in range(a.items):
                fresh, taste = f"fresh-{n}", rng.sample(items, a.taste)
                users = [f"fan-{n}-{j}" for j in range(a.users)] + [f"sim-{n}"]
                for u in users:
                    for t, item in enumerate(taste):
                        log(u, item, 1000 + t)
                req = pb.RecommendContentRequest(user_id=users[-1], k=a.k)
                # A random phase against the workers' poll ticks: without it each item's writes
                # start right after the tick that served the item before (the loop locks on).
                time.sleep(rng.uniform(0, a.poll_s))
                for u in users[:-1]:
                    log(u, fresh)
                acked = time.perf_counter()  # the N-th interaction's ack
                while True:
                    got = stub.RecommendContent(req, timeout=5)
                    if any(r.id == fresh for r in got.items):
                        lat.append(time.perf_counter() - acked)
                        break
                    if time.perf_counter() - acked > a.timeout_s:
                        missed += 1
                        break
                    time.sleep(a.probe_ms / 1000)
            time.sleep(2 * a.poll_s)  # every worker's poll has seen the last item
            lag = _lag_histogram(server.metrics_url)
    finally:
        redis.stop()
    ms = np.array(lat) * 1000
    summary = {
        "served": len(lat),
        "missed": missed,
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
        "max_ms": round(float(ms.max()), 1) if len(ms) else None,
    }
    report = {
        "command": shlex.join(["python", "benchmarks/fresh_latency.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "what": "ms from the N-th acknowledged LogInteraction with a fresh item to the first "
        "RecommendContent (a user with the fans' history) that returns it",
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "export_s": round(export_s, 1),
        "fold_in_settings": json.loads((bundle / "manifest.json").read_text()).get("fresh"),
        "latency": summary,
        "server_fresh_lag_seconds": lag,
        "wall_s": round(time.time() - t_start, 1),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["latency"]), "lag:", json.dumps(lag))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
