"""Serving microbenchmark: full RPCs against an empty RPC, side by side, on one server.

Starts a private redis-server, publishes the run's training data, starts `socialrec serve`
(one worker by default), then sends interleaved sequential calls from one client: the
gRPC health Check (the empty RPC: same server, same transport, no work), RecommendContent
and RecommendFriends. Prints client latency (median, p99) of each, the ratio
RecommendContent / empty, and the server's own per-stage latency from its Prometheus
histograms (median and p99 interpolated inside buckets).

The server runs with its exact result cache off (``--result-cache-mb 0``; a later
``--serve-args`` flag wins): this read-only loop over a fixed set of users would otherwise
measure cache hits, not the tower and the search.

    python benchmarks/serving_latency.py --run runs/lastfm [--bundle DIR] [--n 3000]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from socialrec.serving.harness import ServerProcess  # noqa: E402
from socialrec.serving.redis_local import start_redis  # noqa: E402

from socialrec.v1 import recommender_pb2 as pb  # noqa: E402
from socialrec.v1 import recommender_pb2_grpc as pb_grpc  # noqa: E402


def histogram_quantiles(
    text: str, name: str, labels: dict[str, str], qs=(0.5, 0.99)
) -> dict[str, float]:
    """Quantiles (ms) of one Prometheus histogram series, linear inside the bucket."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if not line.startswith(f"{name}_bucket{{"):
            continue
        lab = dict(re.findall(r'(\w+)="([^"]*)"', line[line.index("{") : line.index("}")]))
        if any(lab.get(k) != v for k, v in labels.items()):
            continue
        le = float("inf") if lab["le"] == "+Inf" else float(lab["le"])
        buckets.append((le, float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return {}
    total = buckets[-1][1]
    out = {}
    for q in qs:
        target = q * total
        prev_le, prev_c = 0.0, 0.0
        for le, c in buckets:
            if c >= target:
                hi = le if np.isfinite(le) else prev_le
                frac = 0.0 if c == prev_c else (target - prev_c) / (c - prev_c)
                out[f"p{int(q * 100)}_ms"] = 1000 * (prev_le + frac * (hi - prev_le))
                break
            prev_le, prev_c = le, c
    out["count"] = total
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run", required=True, help="run directory (socialrec train)")
    ap.add_argument(
        "--bundle",
        help="bundle directory (default RUN/bundle; exported from the teacher if missing)",
    )
    ap.add_argument("--n", type=int, default=3000, help="calls of each kind")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument(
        "--unix-socket",
        action="store_true",
        help="the server talks to Redis over a Unix socket instead of loopback TCP",
    )
    ap.add_argument(
        "--serve-args",
        default="",
        help="extra `socialrec serve` flags, e.g. '--redis-client redis-py'",
    )
    a = ap.parse_args()

    run = Path(a.run)
    bundle = Path(a.bundle) if a.bundle else run / "bundle"
    if not (bundle / "manifest.json").exists():
        from socialrec.compression.export import export_run

        export_run(run, bundle)
    users = (bundle / "user_ids.txt").read_text().split("\n")[:-1]

    redis = start_redis(unixsocket=a.unix_socket)
    redis_url = redis.unix_url if a.unix_socket else redis.url
    server = None
    try:
        from socialrec.serving.publish import PublishConfig
        from socialrec.serving.publish import run as publish

        publish(PublishConfig(run=str(run), redis_url=redis.url, train_only=True, progress=False))
        args = ["--bundle", str(bundle), "--redis-url", redis_url, "--workers", str(a.workers),
                "--result-cache-mb", "0", *a.serve_args.split()]  # fmt: skip
        server = ServerProcess(
            args, metrics=True, env={"SOCIALREC_WRITE_TOKEN": "bench"}, ready_timeout_s=60
        ).start()
        channel = grpc.insecure_channel(server.address)
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.RecommenderStub(channel)
        server.wait_serving()

        rng = np.random.default_rng(0)
        ranks = np.arange(1, len(users) + 1, dtype=np.float64) ** -1.1
        picks = rng.choice(len(users), size=a.n + 200, p=ranks / ranks.sum())
        calls = {
            "empty (health.Check)": lambda u: health.Check(
                health_pb2.HealthCheckRequest(), timeout=5
            ),
            "RecommendContent": lambda u: stub.RecommendContent(
                pb.RecommendContentRequest(user_id=u, k=a.k), timeout=5
            ),
            "RecommendFriends": lambda u: stub.RecommendFriends(
                pb.RecommendFriendsRequest(user_id=u, k=a.k), timeout=5
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        for i, j in enumerate(picks):
            for name, fn in calls.items():  # interleaved: the machine's noise hits all alike
                t0 = time.perf_counter()
                fn(users[j])
                if i >= 200:  # warm-up
                    times[name].append(time.perf_counter() - t0)
        text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    finally:
        if server is not None:
            server.stop()
        redis.stop()

    manifest = json.loads((bundle / "manifest.json").read_text())
    size = sum(f["bytes"] for f in manifest["files"].values())
    print(
        f"bundle {manifest['bundle_version']} ({manifest.get('variant', {}).get('name', '?')}, {size / 1e6:.1f} MB, index {manifest.get('index')}); {a.n} calls each, k={a.k}, {a.workers} worker(s)"
    )
    print(
        f"redis over {'unix socket' if a.unix_socket else 'loopback TCP'}; serve flags: {a.serve_args or '(defaults)'}"
    )
    print(f"{'client latency':28s} {'median ms':>10s} {'p99 ms':>9s}")
    res: dict = {"client": {}, "server": {}}
    for name, t in times.items():
        ms = 1000 * np.array(t)
        res["client"][name] = {
            "median_ms": float(np.median(ms)),
            "p99_ms": float(np.percentile(ms, 99)),
        }
        print(f"{name:28s} {np.median(ms):10.3f} {np.percentile(ms, 99):9.3f}")
    empty = res["client"]["empty (health.Check)"]["median_ms"]
    for name in ("RecommendContent", "RecommendFriends"):
        ratio = res["client"][name]["median_ms"] / empty
        res[f"ratio_{name}_over_empty"] = ratio
        print(f"ratio {name} / empty (medians): {ratio:.2f}x")
    print(f"\n{'server-side (histograms)':28s} {'stage':8s} {'median ms':>10s} {'p99 ms':>9s}")
    for method in ("RecommendContent", "RecommendFriends"):
        rpc = histogram_quantiles(text, "socialrec_rpc_seconds", {"method": method})
        res["server"][method] = {"rpc": rpc}
        print(
            f"{method:28s} {'total':8s} {rpc.get('p50_ms', float('nan')):10.3f} {rpc.get('p99_ms', float('nan')):9.3f}"
        )
        for stage in ("redis", "onnx", "faiss", "rank"):
            q = histogram_quantiles(
                text, "socialrec_stage_seconds", {"method": method, "stage": stage}
            )
            res["server"][method][stage] = q
            print(
                f"{'':28s} {stage:8s} {q.get('p50_ms', float('nan')):10.3f} {q.get('p99_ms', float('nan')):9.3f}"
            )
    res["setup"] = {"unix_socket": a.unix_socket, "serve_args": a.serve_args, "workers": a.workers}
    res["bundle"] = {
        "version": manifest["bundle_version"],
        "bytes": size,
        "index": manifest.get("index"),
    }
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
