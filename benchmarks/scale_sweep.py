"""Scale sweep: bundle build cost, index size, worker memory and RPC latency vs catalogue size.

For each size N (items) in ``--sizes``:

1. **Data**: ``training.synthetic.generate`` with N items, U = min(N, ``--max-users``) users and
   ``--per-user`` (10) interactions per user on average; ``training.split.split_dataset``.
2. **Model** (the sweep measures cost, not quality): a real ``TwoTower`` of width ``--dim``
   whose weights are *not learnt by default*. Each user gets a random Gaussian vector r_u
   (U x dim); an item's vector is the L2-normalised sum of r_u over the users that interacted
   with it in the train split (a random projection of the item x user interaction matrix; items
   nobody touched get a random unit vector). The friend side's user vector is the normalised
   sum of that user's item vectors. The tower's input tables are set to the same vectors
   (item_in_* = item vectors, user_in_* = 0.5 x user vectors), biases 0.1 x log1p(count).
   With ``--train-steps S > 0`` that model is then trained for about S Adam steps of the
   project's own ``training.train.fit`` (one epoch over S x 256 randomly chosen train users;
   full softmax up to 60k candidates, sampled softmax beyond).
3. **Bundle**: ``compression.export.write_bundle`` with ``choose_index``'s default kind per
   side (timed, ONNX export included = "build s"); index bytes = items.faiss + users.faiss.
4. **Serving**: a private redis (``serving.redis_local.start_redis``) holding only a sample of
   the data (published with ``OfflineStore.bulk_load``): the train histories of the users the
   benchmark will query, and every friend pair touching them or their friends (so the
   friends-of-friends the server reads are complete). Then a real ``socialrec serve --workers 1``
   subprocess. ``--n`` sequential RecommendContent + RecommendFriends calls (interleaved,
   ``--warmup`` more first) for users drawn Zipf(1.1) from the user list. Server-side p50/p99
   come from the worker's Prometheus histogram ``socialrec_rpc_seconds`` (warm-up calls
   subtracted; quantiles interpolated inside buckets by ``serving_latency.histogram_quantiles``),
   client p50/p99 from wall time. Worker memory = RSS (psutil) and peak RSS (VmHWM) of the forked
   worker, after warm-up and after the timed calls.
5. **Recall**: recall@20 of the chosen index vs an exact ``IndexFlatIP`` over the same vectors
   for 200 query vectors built like the tower's (tanh of a random train user's pooled history,
   plus the bias slot 1); 1.0 when the chosen index is exact.

Writes OUT/scale.json, OUT/scale.md (table) and OUT/scale.png. Bundles go to OUT/bundle-N.

    python benchmarks/scale_sweep.py --sizes 10000,100000,1000000 --out runs/scale
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import faiss
import grpc
import numpy as np
import psutil
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serving_latency import histogram_quantiles  # noqa: E402
from socialrec.compression.export import bundle_meta, write_bundle  # noqa: E402
from socialrec.serving.harness import ServerProcess  # noqa: E402
from socialrec.serving.offline_store import OfflineStore  # noqa: E402
from socialrec.serving.publish import row_timestamps  # noqa: E402
from socialrec.serving.redis_local import start_redis  # noqa: E402
from socialrec.serving.store import StoreConfig  # noqa: E402
from socialrec.training.data import Dataset  # noqa: E402
from socialrec.training.model import TwoTower  # noqa: E402
from socialrec.training.split import Split, split_dataset  # noqa: E402
from socialrec.training.synthetic import SyntheticConfig, generate  # noqa: E402
from socialrec.training.train import TrainConfig, fit, tower_config  # noqa: E402

from socialrec.v1 import recommender_pb2 as pb  # noqa: E402
from socialrec.v1 import recommender_pb2_grpc as pb_grpc  # noqa: E402

METHODS = ("RecommendContent", "RecommendFriends")
MODEL_DESC = (
    "TwoTower initialised from a random projection: item vectors = normalised random "
    "projection of the item x user interaction matrix (sum of per-user Gaussian vectors), "
    "user vectors = normalised sum of their items' vectors"
)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def projection_model(split: Split, cfg: TrainConfig, seed: int) -> TwoTower:
    """A TwoTower whose weights come from a random projection of the interaction matrix."""
    g = torch.Generator().manual_seed(seed)
    d = cfg.dim
    users = torch.from_numpy(split.train_user.astype(np.int64))
    items = torch.from_numpy(split.train_item.astype(np.int64))
    r = torch.randn(split.n_users, d, generator=g) / d**0.5  # (U, d)
    item_vec = torch.zeros(split.n_items, d).index_add_(0, items, r[users])  # (I, d)
    empty = item_vec.abs().sum(1) == 0
    item_vec[empty] = torch.randn(int(empty.sum()), d, generator=g)
    item_vec = _unit(item_vec)
    user_vec = torch.zeros(split.n_users, d).index_add_(0, users, item_vec[items])  # (U, d)
    empty = user_vec.abs().sum(1) == 0
    user_vec[empty] = torch.randn(int(empty.sum()), d, generator=g)
    user_vec = _unit(user_vec)
    item_pop = torch.from_numpy(np.bincount(split.train_item, minlength=split.n_items))
    user_deg = torch.from_numpy(np.bincount(split.friends_train.ravel(), minlength=split.n_users))

    model = TwoTower(tower_config(cfg, split.n_users, split.n_items))
    t = model.user_tower
    with torch.no_grad():
        model.item_out.weight.copy_(item_vec)
        model.user_out.weight.copy_(user_vec)
        model.item_bias.copy_(0.1 * torch.log1p(item_pop.float()))
        model.user_bias.copy_(0.1 * torch.log1p(user_deg.float()))
        t.item_in_c.weight.copy_(item_vec)
        t.item_in_f.weight.copy_(item_vec)
        t.user_in_c.weight.copy_(0.5 * user_vec)
        t.user_in_f.weight.copy_(0.5 * user_vec)
    return model.eval()


def subset_users(split: Split, n_users: int, seed: int) -> Split:
    """The split restricted (train rows and friend pairs) to n_users random active users."""
    rng = np.random.default_rng(seed)
    active = np.unique(split.train_user)
    keep = np.zeros(split.n_users, dtype=bool)
    keep[rng.choice(active, min(n_users, len(active)), replace=False)] = True
    rows = keep[split.train_user]
    pairs = keep[split.friends_train[:, 0]] | keep[split.friends_train[:, 1]]
    return Split(
        n_users=split.n_users,
        n_items=split.n_items,
        train_user=split.train_user[rows],
        train_item=split.train_item[rows],
        train_weight=split.train_weight[rows],
        test_user=split.test_user[:0],
        test_item=split.test_item[:0],
        friends_train=split.friends_train[pairs],
        friends_test=split.friends_test[:0],
        seed=split.seed,
    )


def build_model(split: Split, cfg: TrainConfig, steps: int, seed: int) -> tuple[TwoTower, dict]:
    """Projection model, optionally trained for about ``steps`` Adam steps (one epoch)."""
    t0 = time.perf_counter()
    model = projection_model(split, cfg, seed)
    info: dict = {
        "kind": MODEL_DESC + ", no gradient steps (untrained)",
        "projection_s": round(time.perf_counter() - t0, 2),
    }
    if steps > 0:
        sub = subset_users(split, steps * cfg.batch_size, seed)
        t0 = time.perf_counter()
        model, log = fit(sub, cfg, 1, progress=False, init=model.train())
        info.update(
            kind=MODEL_DESC + f", then trained ~{steps} Adam steps of training.train.fit",
            train_s=round(time.perf_counter() - t0, 2),
            train_loss=log["epochs"][-1]["loss"],
            softmax=log["softmax"],
        )
    return model.eval(), info


def query_vectors(split: Split, item_vec: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n tower-like queries: [tanh(normalised pooled history of a random user), 1].  (n, D+1)"""
    rng = np.random.default_rng(seed)
    order = np.argsort(split.train_user, kind="stable")
    u_sorted = split.train_user[order]
    users = rng.choice(np.unique(u_sorted), n, replace=False)
    out = np.empty((n, item_vec.shape[1]), dtype=np.float32)
    for i, u in enumerate(users):
        lo, hi = np.searchsorted(u_sorted, [u, u + 1])
        h = split.train_item[order[lo:hi]]
        out[i, :-1] = np.tanh(item_vec[h, :-1].sum(0) / np.sqrt(len(h)))
    out[:, -1] = 1.0
    return out


def recall_vs_exact(index_path: Path, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Mean overlap@k of the stored index's results with exact inner-product search."""
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(np.ascontiguousarray(vectors, dtype=np.float32))
    _, truth = exact.search(queries, k)
    _, got = faiss.read_index(str(index_path)).search(queries, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, got, strict=True)]))


def zipf_picks(n_users: int, n: int, seed: int) -> np.ndarray:
    """n user indices drawn Zipf(1.1) over the user list (as in serving_latency.py)."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, n_users + 1, dtype=np.float64) ** -1.1
    return rng.choice(n_users, size=n, p=p / p.sum())


def publish_sample(ds: Dataset, split: Split, users: np.ndarray, url: str) -> dict[str, int]:
    """Histories of ``users`` and every friend pair touching them or their friends."""
    pick = np.zeros(ds.n_users, dtype=bool)
    pick[users] = True
    rows = pick[split.train_user]
    fr = split.friends_train
    first = pick[fr[:, 0]] | pick[fr[:, 1]]
    hop = pick.copy()
    hop[fr[first].ravel()] = True
    pairs = fr[hop[fr[:, 0]] | hop[fr[:, 1]]]
    u, i, w = split.train_user[rows], split.train_item[rows], split.train_weight[rows]
    ts = row_timestamps(ds, u, i)
    hist = zip(
        ds.user_ids[u].tolist(),
        ds.item_ids[i].tolist(),
        [float(x) for x in np.asarray(w, dtype=np.float32).astype(str)],
        ts.tolist(),
        strict=True,
    )
    friend_pairs = zip(
        ds.user_ids[pairs[:, 0]].tolist(), ds.user_ids[pairs[:, 1]].tolist(), strict=True
    )
    with OfflineStore(StoreConfig(url=url)) as store:
        return store.bulk_load(hist, friend_pairs, progress=False)


def proc_mem_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, MiB."""
    rss = psutil.Process(pid).memory_info().rss
    # psutil has no peak RSS of another process: VmHWM is read from the kernel's status file.
    status = Path(f"/proc/{pid}/status").read_text()
    hwm_kib = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:"))
    return {"VmRSS": round(rss / 2**20, 1), "VmHWM": round(hwm_kib / 1024, 1)}


def worker_pid(server_pid: int, timeout_s: float = 10.0) -> int:
    """The pid of the single worker forked by ``socialrec serve``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        kids = psutil.Process(server_pid).children()
        if kids:
            return kids[0].pid
        time.sleep(0.1)
    raise RuntimeError("no worker process found")


def metrics_diff(before: str, after: str) -> str:
    """Prometheus text ``after`` with histogram bucket counts of ``before`` subtracted."""
    base = {}
    for line in before.splitlines():
        if "_bucket{" in line:
            key, val = line.rsplit(" ", 1)
            base[key] = float(val)
    out = []
    for line in after.splitlines():
        if "_bucket{" in line:
            key, val = line.rsplit(" ", 1)
            line = f"{key} {float(val) - base.get(key, 0.0)}"
        out.append(line)
    return "\n".join(out)


def serve_and_measure(
    bundle: Path, ds: Dataset, split: Split, n: int, warmup: int, k: int, seed: int
) -> dict:
    """Publish a sample, start `socialrec serve --workers 1`, time the calls; RSS and quantiles."""
    picks = zipf_picks(ds.n_users, n + warmup, seed)
    redis = start_redis(appendonly=False)
    server = None
    res: dict = {}
    try:
        t0 = time.perf_counter()
        res["published"] = publish_sample(ds, split, np.unique(picks), redis.url)
        res["publish_s"] = round(time.perf_counter() - t0, 2)
        server = ServerProcess(
            ["--bundle", str(bundle), "--redis-url", redis.url, "--workers", "1"],
            metrics=True,
            env={"SOCIALREC_WRITE_TOKEN": "bench"},
            ready_timeout_s=300,
            stop_timeout_s=30,
        )
        t0 = time.perf_counter()
        server.start()
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.RecommenderStub(channel)
        server.wait_serving()
        res["ready_s"] = round(time.perf_counter() - t0, 2)
        wpid = worker_pid(server.pid)
        res["rss_ready_mib"] = proc_mem_mib(wpid)["VmRSS"]
        users = ds.user_ids
        calls = {
            "RecommendContent": lambda u: stub.RecommendContent(
                pb.RecommendContentRequest(user_id=u, k=k), timeout=5
            ),
            "RecommendFriends": lambda u: stub.RecommendFriends(
                pb.RecommendFriendsRequest(user_id=u, k=k), timeout=5
            ),
        }
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        metrics_url = server.metrics_url
        before = ""
        for i, j in enumerate(picks):
            if i == warmup:
                before = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
                res["rss_after_warmup_mib"] = proc_mem_mib(wpid)["VmRSS"]
            for name, fn in calls.items():
                t = time.perf_counter()
                fn(str(users[j]))
                if i >= warmup:
                    times[name].append(time.perf_counter() - t)
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
        mem = proc_mem_mib(wpid)
        res["rss_after_calls_mib"], res["hwm_mib"] = mem["VmRSS"], mem["VmHWM"]
        diff = metrics_diff(before, text)
        res["server"], res["client"] = {}, {}
        for m in METHODS:
            res["server"][m] = {
                "rpc": histogram_quantiles(diff, "socialrec_rpc_seconds", {"method": m})
            }
            for stage in ("redis", "onnx", "faiss", "rank"):
                res["server"][m][stage] = histogram_quantiles(
                    diff, "socialrec_stage_seconds", {"method": m, "stage": stage}
                )
            ms = 1000 * np.array(times[m])
            res["client"][m] = {
                "p50_ms": round(float(np.median(ms)), 3),
                "p99_ms": round(float(np.percentile(ms, 99)), 3),
            }
        channel.close()
    finally:
        if server is not None:
            server.stop()
        redis.stop()
        redis.cleanup()
    return res


def run_size(n_items: int, a: argparse.Namespace, out: Path) -> dict:
    """One sweep point: data, model, bundle, serving measurements, recall."""
    n_users = min(n_items, a.max_users)
    row: dict = {"items": n_items, "users": n_users}
    t0 = time.perf_counter()
    cfg = SyntheticConfig(
        n_users=n_users, n_items=n_items, n_interactions=a.per_user * n_users, seed=a.seed
    )
    ds = generate(cfg)
    split = split_dataset(ds)
    row["dataset"] = ds.summary()
    row["generate_s"] = round(time.perf_counter() - t0, 2)
    print(f"[{n_items}] data {ds.summary()} in {row['generate_s']} s", flush=True)

    tcfg = TrainConfig(dim=a.dim, refit=False, seed=a.seed)
    model, row["model"] = build_model(split, tcfg, a.train_steps, a.seed)
    print(f"[{n_items}] model: {row['model']}", flush=True)

    bundle = out / f"bundle-{n_items}"
    shutil.rmtree(bundle, ignore_errors=True)
    variant = {"name": "scale-sweep", "techniques": [], "model": row["model"]["kind"]}
    meta = bundle_meta(ds, split, asdict(tcfg), variant, metrics={})
    t0 = time.perf_counter()
    write_bundle(model, split, ds.user_ids, ds.item_ids, bundle, meta)
    row["build_s"] = round(time.perf_counter() - t0, 2)
    manifest = json.loads((bundle / "manifest.json").read_text())
    row["index"] = manifest["index"]
    files = manifest["files"]
    row["index_bytes"] = files["items.faiss"]["bytes"] + files["users.faiss"]["bytes"]
    row["bundle_bytes"] = sum(f["bytes"] for f in files.values())
    row["onnx_bytes"] = files["user_tower.onnx"]["bytes"]
    print(f"[{n_items}] bundle {row['index']} in {row['build_s']} s", flush=True)

    with torch.no_grad():
        item_vec = model.item_vectors().numpy()
        user_vec = model.user_vectors().numpy()
    q = query_vectors(split, item_vec, a.recall_queries, a.seed)
    row["recall@20_vs_exact"] = {
        "items": round(recall_vs_exact(bundle / "items.faiss", item_vec, q, 20), 4),
        "users": round(recall_vs_exact(bundle / "users.faiss", user_vec, q, 20), 4),
    }
    del model, item_vec, user_vec

    row["serving"] = serve_and_measure(bundle, ds, split, a.n, a.warmup, a.k, a.seed)
    s = row["serving"]
    print(
        f"[{n_items}] worker RSS {s['rss_after_calls_mib']} MiB; server "
        + ", ".join(
            f"{m} p50 {s['server'][m]['rpc'].get('p50_ms', float('nan')):.2f} "
            f"p99 {s['server'][m]['rpc'].get('p99_ms', float('nan')):.2f} ms"
            for m in METHODS
        ),  # fmt: skip
        flush=True,
    )
    if not a.keep_bundles:
        shutil.rmtree(bundle, ignore_errors=True)
    return row


def write_table(rows: list[dict], path: Path) -> str:
    """Markdown table of the sweep (server-side quantiles from the worker's histogram)."""
    head = (
        "| items | users | index (items / users) | build s | index MB | bundle MB | "
        "worker RSS MiB (ready / after) | content p50 / p99 ms | friends p50 / p99 ms | "
        "client content p50 / p99 ms | client friends p50 / p99 ms | recall@20 items / users |\n"
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        s = r["serving"]
        sc, sf = s["server"]["RecommendContent"]["rpc"], s["server"]["RecommendFriends"]["rpc"]
        cc, cf = s["client"]["RecommendContent"], s["client"]["RecommendFriends"]
        rc = r["recall@20_vs_exact"]
        lines.append(
            f"| {r['items']:,} | {r['users']:,} | {r['index']['items']} / {r['index']['users']} "
            f"| {r['build_s']:.1f} | {r['index_bytes'] / 1e6:.1f} | {r['bundle_bytes'] / 1e6:.1f} "
            f"| {s['rss_ready_mib']:.0f} / {s['rss_after_calls_mib']:.0f} "
            f"| {sc['p50_ms']:.2f} / {sc['p99_ms']:.2f} | {sf['p50_ms']:.2f} / {sf['p99_ms']:.2f} "
            f"| {cc['p50_ms']:.2f} / {cc['p99_ms']:.2f} | {cf['p50_ms']:.2f} / {cf['p99_ms']:.2f} "
            f"| {rc['items']:.3f} / {rc['users']:.3f} |"
        )
    text = head + "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(rows: list[dict], path: Path) -> None:
    """Latency (server p50/p99 per method) and sizes (index, bundle, worker RSS) vs items."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["items"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, c in zip(METHODS, ("tab:blue", "tab:orange"), strict=True):
        for q, ls in (("p50_ms", "--"), ("p99_ms", "-")):
            y = [r["serving"]["server"][m]["rpc"][q] for r in rows]
            ax1.plot(x, y, ls, marker="o", color=c, label=f"{m} {q[:3]}")
    ax1.axhline(10, color="grey", lw=0.8, ls=":", label="10 ms target")
    for r in rows:
        y = r["serving"]["server"]["RecommendContent"]["rpc"]["p99_ms"]
        ax1.annotate(r["index"]["items"], (r["items"], y), textcoords="offset points",
                     xytext=(4, 6), fontsize=8)  # fmt: skip
    ax1.set(xscale="log", xlabel="items (log)", ylabel="server-side ms", title="RPC latency")
    ax1.legend(fontsize=8)
    series = {
        "index MB": [r["index_bytes"] / 1e6 for r in rows],
        "bundle MB": [r["bundle_bytes"] / 1e6 for r in rows],
        "worker RSS MB": [r["serving"]["rss_after_calls_mib"] * 1.048576 for r in rows],
    }
    for name, y in series.items():
        ax2.plot(x, y, marker="s", label=name)
    for r, y in zip(rows, series["worker RSS MB"], strict=True):
        ax2.annotate(f"{r['index']['items']}/{r['index']['users']}", (r["items"], y),
                     textcoords="offset points", xytext=(4, 6), fontsize=8)  # fmt: skip
    ax2.set(xscale="log", yscale="log", xlabel="items (log)", ylabel="MB", title="Size")
    ax2.legend(fontsize=8)
    fig.suptitle("socialrec scale sweep (1 worker, sequential calls)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="10000,100000,1000000", help="item counts, comma-separated")
    p.add_argument("--out", default="runs/scale")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=0, help="Adam steps after projection (0)")
    p.add_argument("--max-users", type=int, default=200_000, help="users = min(items, this)")
    p.add_argument("--per-user", type=int, default=10, help="mean interactions per user")
    p.add_argument("--n", type=int, default=2000, help="timed calls of each RPC")
    p.add_argument("--warmup", type=int, default=200, help="untimed calls of each RPC first")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--recall-queries", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-bundles", action="store_true", help="keep OUT/bundle-N")
    a = p.parse_args(argv)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for n in (int(s) for s in a.sizes.split(",")):
        rows.append(run_size(n, a, out))
        report = {
            "args": vars(a),
            "machine": f"{platform.machine()} {platform.python_version()} {os.cpu_count()} cpus",
            "faiss": faiss.__version__,
            "model": MODEL_DESC + (f" + {a.train_steps} fit steps" if a.train_steps else ""),
            "published": "sample: histories of the queried users + friend pairs within 2 hops",
            "rows": rows,
        }
        (out / "scale.json").write_text(json.dumps(report, indent=2) + "\n")
    print(write_table(rows, out / "scale.md"))
    plot(rows, out / "scale.png")
    print(f"wrote {out}/scale.json, scale.md, scale.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
