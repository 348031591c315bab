"""Sizing from measurements: Redis bytes per user, FAISS index bytes and search latency,
requests per core, and the arithmetic that turns them into a deployment (docs/operations.md,
"Sizing").

Parts (``--parts``, default all; each writes its own section of the report, with its own
command and date, so a part can be re-run alone and the others are kept):

``redis``
    For each ``--scales`` N: a synthetic dataset of N users at the generator's default shape
    (``SyntheticConfig`` ratios: 2 items per 3 users, 20 interactions and 10 friends per user
    on average, heavy-tailed both), bulk-loaded into a local Redis Cluster (``start_cluster``:
    3 primaries + 3 replicas) with ``OfflineStore.bulk_load``, the path ``socialrec publish``
    takes, so the keys are the ones the server reads. Memory = ``INFO memory`` used_memory
    summed over the primaries (and over the replicas) after the load, minus the same sum
    before it, per user; ``MEMORY USAGE ... SAMPLES 0`` and ``OBJECT ENCODING`` of each key type
    (history zset, weights hash, seen set, friend set) on a sample of users; then a linear fit
    over the scales (is it linear?).
``profile``
    The app's users: cohorts loaded the same way, every user with a full history (256 items,
    the cap) and many friends; ids as wide as at 100M users and a 10M-item catalogue.
    Cohort A: 256 interactions, 100 friends; cohort B: 1,024 interactions (the seen set keeps
    all, history and weights keep the newest 256), 500 friends. Bytes per key type per user,
    and per added seen item / friend. Then live writes through ``FeatureStore`` (interactions,
    friendships, dismissals and blocks, each with a request id): bytes per write (event-stream
    entry, request-id key, filter sets, cluster edge versions). Then reads of full-profile
    users through ``FeatureStore.read``: Redis CPU per content and per friend read, summed over
    every node (``INFO cpu``).
``faiss``
    Item (and user) indexes as the exporter builds them (``compression.export.build_index``,
    kind from ``choose_index``) over random vectors of the dimensions of the bundles in
    ``runs/`` (the selected compressed Last.fm bundle, and the fp32 teacher of the synthetic
    run): serialized bytes, resident memory added by loading it, build time, and batch-1
    search latency (k = 20, one thread, ``--queries`` queries) at 100k and 1M items; 10M
    only extrapolated (see the report's notes), and the Python id maps a worker builds
    (``bundle.read_ids`` + ``engine._id_map``) at 1M ids.
``bulkload``
    How fast ``OfflineStore.bulk_load`` (``socialrec publish``) writes into the cluster with
    redis-py as installed and with EVALSHA's keys found locally (what the other parts use),
    alternating ``--bulkload-rounds`` times.
``serving``
    No new run: server CPU per request, Redis CPU per request and capacity from the load-test
    reports in ``benchmarks/reports/loadtest/`` (``--loadtest-reports``).

The ``plan`` section is recomputed from whatever parts the report holds: Redis memory and
primaries for 10M / 100M users, serving cores and replicas for peak rates, index bytes per
worker. Every figure in it is arithmetic on a measured one and says so.

    python benchmarks/sizing.py                                   # every part
    python benchmarks/sizing.py --parts redis --scales 30000,100000
    python benchmarks/sizing.py --parts faiss
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "reports" / "sizing.json"
PARTS = ("redis", "profile", "faiss", "serving", "bulkload")
KEY_TYPES = {"h": "history (zset)", "w": "weights (hash)", "s": "seen (set)", "f": "friends (set)"}
DEFAULT_LOADTESTS = (
    "benchmarks/reports/loadtest/loadtest-steps-2026-12-02-v2-r1.json",
    "benchmarks/reports/loadtest/loadtest-steps-2026-12-02-v2-r2.json",
    "benchmarks/reports/loadtest/loadtest-steps-2026-12-02-nocache.json",
)
GB = 1e9
MIB = 2**20


# ---- pure helpers (tested in tests/test_sizing.py) -----------------------------------------


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (xs, ys); two points or more."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("need two or more (x, y) points")
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if np.ptp(x) == 0:
        raise ValueError("the xs are all equal")
    slope = float(np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2))
    return float(y.mean() - slope * x.mean()), slope


def max_relative_residual(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Largest |y - fit(x)| / y over the points: how far from linear the measurements are."""
    a, b = linear_fit(xs, ys)
    return max(abs(y - (a + b * x)) / abs(y) for x, y in zip(xs, ys, strict=True))


def per_member(size_a: float, bytes_a: float, size_b: float, bytes_b: float) -> float:
    """Bytes per added member between two measured sizes of one key type."""
    if size_a == size_b:
        raise ValueError("the two sizes must differ")
    return (bytes_b - bytes_a) / (size_b - size_a)


def user_bytes(base: float, base_seen: int, base_friends: int, per_seen: float,
               per_friend: float, seen: int, friends: int) -> float:  # fmt: skip
    """A full-history user's bytes with ``seen`` seen items and ``friends`` friends, from a
    measured user (``base`` bytes at ``base_seen`` / ``base_friends``) and the per-member costs.
    Only meaningful above the encodings' listpack limits (128), where the costs are linear."""
    return base + per_seen * (seen - base_seen) + per_friend * (friends - base_friends)


def nodes_for(total_bytes: float, per_node_bytes: float) -> int:
    """Primaries needed to hold ``total_bytes`` at ``per_node_bytes`` usable each (at least 1)."""
    if per_node_bytes <= 0:
        raise ValueError("per_node_bytes must be > 0")
    return max(1, math.ceil(total_bytes / per_node_bytes))


def primaries_for_shards(total_bytes: float, per_node_bytes: float, shards: int) -> int | None:
    """Primaries when data moves in whole user shards (one cluster slot each, equal sizes): a
    node holds floor(budget / shard bytes) of them. None when one shard exceeds a node."""
    per_node = math.floor(per_node_bytes / (total_bytes / shards))
    if per_node == 0:
        return None
    return math.ceil(shards / min(per_node, shards))


def cores_for(rps: float, cpu_us_per_request: float, utilization: float) -> float:
    """Cores busy ``utilization`` of the time that serve ``rps`` at ``cpu_us_per_request``."""
    if not 0 < utilization <= 1:
        raise ValueError("utilization must be in (0, 1]")
    return rps * cpu_us_per_request / 1e6 / utilization


def replicas_for(cores: float, cores_per_replica: int, minimum: int = 2) -> int:
    """Serving replicas of ``cores_per_replica`` cores for ``cores`` (at least ``minimum``)."""
    return max(minimum, math.ceil(cores / cores_per_replica))


# ---- environment ---------------------------------------------------------------------------


def progress(it: Iterable, **kw) -> Iterable:
    """tqdm when installed, else the iterable as is."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, **kw)


def machine() -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(mem / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip()
    except OSError:
        return ""


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def part_header() -> dict:
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git_commit(),
        "machine": machine(),
    }


# ---- Redis ---------------------------------------------------------------------------------


def _fast_eval_keys() -> None:
    """redis-py 8's cluster pipeline asks a node ``COMMAND GETKEYS`` for every EVALSHA it
    routes (a round trip per queued script call: bulk_load measured ~3k rows/s with it). The
    keys of EVAL/EVALSHA are args[3 : 3 + numkeys], so answer that locally in this process;
    the commands sent, and so what Redis stores, are unchanged."""
    import redis.cluster

    orig = redis.cluster.RedisCluster._get_command_keys
    if getattr(orig, "_sizing_orig", None):
        return

    def keys(self, *args):
        if str(args[0]).upper() in ("EVAL", "EVALSHA") and len(args) > 2:
            return list(args[3 : 3 + int(args[2])])
        return orig(self, *args)

    keys._sizing_orig = orig  # type: ignore[attr-defined]
    redis.cluster.RedisCluster._get_command_keys = keys


def _stock_eval_keys() -> None:
    """Undo :func:`_fast_eval_keys` (redis-py as installed)."""
    import redis.cluster

    orig = getattr(redis.cluster.RedisCluster._get_command_keys, "_sizing_orig", None)
    if orig is not None:
        redis.cluster.RedisCluster._get_command_keys = orig


def measure_bulkload(args) -> dict:
    """bulk_load into the local cluster with redis-py as installed, then with EVALSHA's keys
    found locally, alternating, on the same synthetic rows (flushed in between)."""
    from socialrec.serving.offline_store import OfflineStore
    from socialrec.serving.store import StoreConfig
    from socialrec.training.synthetic import SyntheticConfig, generate

    out = part_header()
    n = args.bulkload_users
    ds = generate(SyntheticConfig(n_users=n, n_items=max(4, n * 2 // 3),
                                  n_interactions=20 * n, seed=args.seed))  # fmt: skip
    rows = Rows(ds.user_ids[ds.inter_user], ds.item_ids[ds.inter_item], ds.inter_weight,
                ds.inter_ts)  # fmt: skip
    out["method"] = (
        f"OfflineStore.bulk_load of {len(rows):,} interaction rows of {n:,} synthetic users "
        "(no friend pairs) into start_cluster(), flushed between runs; 'stock' = redis-py as "
        "installed (its cluster pipeline sends COMMAND GETKEYS to a node for every queued "
        "EVALSHA), 'local_keys' = those keys taken from EVALSHA's own arguments"
    )
    import redis

    out["redis_py"] = redis.__version__
    cluster = open_cluster(out)
    runs: dict[str, list[float]] = {"stock": [], "local_keys": []}
    try:
        cfg = StoreConfig(url=cluster.url, cluster=True)
        for _ in progress(range(args.bulkload_rounds), desc="bulk load rounds", unit="round"):
            for variant in runs:
                (_stock_eval_keys if variant == "stock" else _fast_eval_keys)()
                flush(cluster)
                t0 = time.perf_counter()
                with OfflineStore(cfg) as store:
                    store.bulk_load(rows, [], progress=False)
                runs[variant].append(round(len(rows) / (time.perf_counter() - t0)))
    finally:
        _fast_eval_keys()
        cluster.cleanup()
    out["rows"] = len(rows)
    out["rows_per_s"] = runs
    out["rows_per_s_median"] = {k: float(np.median(v)) for k, v in runs.items()}
    return out


class Rows:
    """(user, item, weight, ts) rows as ``publish`` builds them (float32 weights via str), made
    lazily in chunks so a large dataset is not held as Python tuples all at once."""

    def __init__(self, users: np.ndarray, items: np.ndarray, w: np.ndarray, ts: np.ndarray):
        self.users, self.items, self.w, self.ts = users, items, w, ts

    def __len__(self) -> int:
        return len(self.users)

    def __iter__(self) -> Iterator[tuple[str, str, float, int]]:
        step = 100_000
        for lo in range(0, len(self.users), step):
            sl = slice(lo, lo + step)
            w = [float(x) for x in np.asarray(self.w[sl], dtype=np.float32).astype(str)]
            yield from zip(
                self.users[sl].tolist(), self.items[sl].tolist(), w, self.ts[sl].tolist(),
                strict=True,
            )  # fmt: skip


def _node(port: int):
    import redis

    return redis.Redis(port=port, decode_responses=True, socket_timeout=60)


MEM_FIELDS = ("used_memory", "data", "used_memory_dataset", "used_memory_rss", "keys")


def memory_snapshot(cluster) -> dict:
    """Memory summed over primaries and over replicas, plus per node. ``data`` = used_memory
    minus the replication buffers (the backlog, a fixed 1 MiB per node once full) and normal
    clients' buffers (our own connections): what the data set itself holds."""
    out = {"primaries": {}, "replicas": {}, "nodes": []}
    for n in cluster.nodes:
        with _node(n.port) as c:
            mem, repl, ks = c.info("memory"), c.info("replication"), c.info("keyspace")
        role = "primaries" if repl["role"] == "master" else "replicas"
        used = int(mem["used_memory"])
        buffers = int(mem.get("mem_total_replication_buffers", 0))
        buffers += int(mem.get("mem_clients_normal", 0)) + int(mem.get("mem_aof_buffer", 0))
        row = {
            "port": n.port,
            "role": repl["role"],
            "used_memory": used,
            "data": used - buffers,
            "used_memory_dataset": int(mem["used_memory_dataset"]),
            "used_memory_rss": int(mem["used_memory_rss"]),
            "keys": int(ks.get("db0", {}).get("keys", 0)),
        }
        out["nodes"].append(row)
        for k in MEM_FIELDS:
            out[role][k] = out[role].get(k, 0) + row[k]
    return out


def fill_backlogs(cluster, url: str) -> None:
    """Fill every node's replication backlog (1 MiB, then fixed) before any baseline, so that
    its growth is not counted as data: write ~1.5 MiB per primary, then delete it."""
    import redis.cluster

    rc = redis.cluster.RedisCluster.from_url(url)
    try:
        n = 5000
        pipe = rc.pipeline(transaction=False)
        for i in range(n):
            pipe.set(f"sizing-fill:{i}", b"x" * 1000)
        pipe.execute()
        pipe = rc.pipeline(transaction=False)
        for i in range(n):
            pipe.delete(f"sizing-fill:{i}")
        pipe.execute()
    finally:
        rc.close()
    settle(cluster)


def open_cluster(out: dict):
    """start_cluster() with appendonly off (speed), its version noted, backlogs filled."""
    from socialrec.serving.redis_local import start_cluster

    cluster = start_cluster()
    try:
        for n in cluster.nodes:
            with _node(n.port) as c:
                c.config_set("appendonly", "no")
                out.setdefault("redis_version", c.info("server")["redis_version"])
                out.setdefault(
                    "encoding_limits", c.config_get("*-max-*-entries") | {"note": "defaults"}
                )
        fill_backlogs(cluster, cluster.url)
    except BaseException:
        cluster.cleanup()
        raise
    return cluster


def config_all(cluster, name: str, value: str) -> str:
    """CONFIG SET on every node; the previous value."""
    prev = ""
    for n in cluster.nodes:
        with _node(n.port) as c:
            prev = c.config_get(name)[name]
            c.config_set(name, value)
    return prev


def settle(cluster) -> None:
    """Replicas have every write, and replication buffers have drained."""
    cluster.wait_replicated(timeout_ms=60_000)
    time.sleep(2.0)


def flush(cluster) -> None:
    for n in cluster.nodes:
        with _node(n.port) as c:
            if c.info("replication")["role"] == "master":
                c.execute_command("FLUSHALL", "SYNC")
    settle(cluster)


def delta(after: dict, before: dict, role: str, field: str = "data") -> int:
    return after[role].get(field, 0) - before[role].get(field, 0)


def key_usage(r, keys: list[str]) -> list[tuple[int, str, int]]:
    """(MEMORY USAGE bytes, encoding, cardinality) per key; (0, "", 0) for a missing key."""
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.execute_command("MEMORY USAGE", k, "SAMPLES", 0)
        pipe.execute_command("OBJECT ENCODING", k)
        pipe.execute_command("TYPE", k)
    raw = pipe.execute(raise_on_error=False)
    types = {"zset": "ZCARD", "hash": "HLEN", "set": "SCARD", "stream": "XLEN"}
    pipe = r.pipeline(transaction=False)
    for k, t in zip(keys, raw[2::3], strict=True):
        pipe.execute_command(types.get(t, "EXISTS"), k)
    cards = pipe.execute(raise_on_error=False)
    out = []
    for mem, enc, card in zip(raw[0::3], raw[1::3], cards, strict=True):
        ok = isinstance(mem, int)
        out.append((mem if ok else 0, enc if ok and isinstance(enc, str) else "", int(card or 0)))
    return out


def per_type_usage(r, keys_obj, users: list[str], kinds: dict | None = None) -> dict:
    """Per key type: mean MEMORY USAGE per user (a missing key counts 0), mean members,
    encodings seen, and bytes per member on the keys in a hashtable/skiplist encoding."""
    out = {}
    for kind, what in (kinds or KEY_TYPES).items():
        rows = key_usage(r, [keys_obj.user(kind, u) for u in users])
        enc: dict[str, int] = {}
        for _, e, _ in rows:
            if e:
                enc[e] = enc.get(e, 0) + 1
        big = [(m, c) for m, e, c in rows if e in ("skiplist", "hashtable") and c > 0]
        out[kind] = {
            "what": what,
            "bytes_per_user": round(sum(m for m, _, _ in rows) / len(users), 1),
            "members_per_user": round(sum(c for _, _, c in rows) / len(users), 2),
            "encodings": enc,
            "bytes_per_member_large_keys": (
                round(sum(m for m, _ in big) / sum(c for _, c in big), 1) if big else None
            ),
        }
    return out


def measure_scales(args) -> dict:
    from socialrec.serving.offline_store import OfflineStore
    from socialrec.serving.schema import Keys
    from socialrec.serving.store import StoreConfig
    from socialrec.training.synthetic import SyntheticConfig, generate

    _fast_eval_keys()
    out = part_header()
    out["method"] = (
        "SyntheticConfig defaults scaled to N users (items = 2N/3, 20 unique interactions "
        "per user on average, mean_friends 10), bulk-loaded with OfflineStore.bulk_load "
        "(the publish path) into start_cluster() (3 primaries + 3 replicas, appendonly "
        "turned off with CONFIG SET for speed), FLUSHALL SYNC between scales; memory = "
        "used_memory summed over primaries (replicas) after minus before the load, less "
        "replication and client buffers (the 1 MiB backlogs are filled before any baseline)"
    )
    out["bulk_load_note"] = (
        "redis-py's cluster pipeline sends COMMAND GETKEYS for every queued EVALSHA; this "
        "script answers it locally (same commands sent)"
    )
    cluster = open_cluster(out)
    try:
        cfg = StoreConfig(url=cluster.url, cluster=True)
        keys = Keys(cfg.namespace)
        empty = memory_snapshot(cluster)
        out["empty_cluster"] = {r: empty[r] for r in ("primaries", "replicas")}
        scales = []
        for i, n_users in enumerate(progress(args.scales, desc="redis scales", unit="scale")):
            if i:
                flush(cluster)
            syn = SyntheticConfig(
                n_users=n_users,
                n_items=max(4, round(n_users * 2 / 3)),
                n_interactions=20 * n_users,
                seed=args.seed,
            )
            t0 = time.perf_counter()
            ds = generate(syn)
            gen_s = time.perf_counter() - t0
            rows = Rows(
                ds.user_ids[ds.inter_user], ds.item_ids[ds.inter_item], ds.inter_weight,
                ds.inter_ts,
            )  # fmt: skip
            pairs = list(
                zip(
                    ds.user_ids[ds.friends[:, 0]].tolist(),
                    ds.user_ids[ds.friends[:, 1]].tolist(),
                    strict=True,
                )
            )
            hist = np.bincount(ds.inter_user, minlength=ds.n_users)
            deg = np.bincount(ds.friends.ravel(), minlength=ds.n_users)
            before = memory_snapshot(cluster)
            t0 = time.perf_counter()
            with OfflineStore(cfg) as store:
                counts = store.bulk_load(rows, pairs, progress=True)
            load_s = time.perf_counter() - t0
            settle(cluster)
            after = memory_snapshot(cluster)
            rng = random.Random(args.seed)
            sample = [str(u) for u in rng.sample(list(ds.user_ids), min(args.sample, n_users))]
            with OfflineStore(cfg) as store:
                usage = per_type_usage(store._r, keys, sample)
            prim, repl = delta(after, before, "primaries"), delta(after, before, "replicas")
            scales.append(
                {
                    "users": n_users,
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "command": out["command"],
                    "items": syn.n_items,
                    "interactions": int(len(ds.inter_user)),
                    "friend_pairs": int(len(ds.friends)),
                    "history_per_user": {
                        "mean": round(float(hist.mean()), 2),
                        "median": float(np.median(hist)),
                        "p99": float(np.percentile(hist, 99)),
                        "max": int(hist.max()),
                        "share_over_128": round(float((hist > 128).mean()), 4),
                        "share_at_cap_256": round(float((hist >= 256).mean()), 4),
                    },
                    "friends_per_user": {
                        "mean": round(float(deg.mean()), 2),
                        "median": float(np.median(deg)),
                        "p99": float(np.percentile(deg, 99)),
                        "max": int(deg.max()),
                        "share_without": round(float((deg == 0).mean()), 4),
                    },
                    "bulk_load": {**counts, "seconds": round(load_s, 1)},
                    "generate_s": round(gen_s, 1),
                    "keys_on_primaries": after["primaries"]["keys"] - before["primaries"]["keys"],
                    "data_bytes_primaries_delta": prim,
                    "data_bytes_replicas_delta": repl,
                    "used_memory_primaries_delta": delta(after, before, "primaries", "used_memory"),
                    "used_memory_rss_primaries_after": after["primaries"]["used_memory_rss"],
                    "bytes_per_user_primaries": round(prim / n_users, 1),
                    "bytes_per_user_replicas": round(repl / n_users, 1),
                    "memory_usage_sample": {"users": len(sample), "by_key_type": usage},
                    "memory_usage_sample_bytes_per_user": round(
                        sum(v["bytes_per_user"] for v in usage.values()), 1
                    ),
                    "nodes_after": after["nodes"],
                }
            )
            del ds, rows, pairs
            gc.collect()
        if args.keep_scales and args.previous.get("scales"):
            mine = {s["users"] for s in scales}
            kept = [s for s in args.previous["scales"] if s["users"] not in mine]
            scales = sorted(kept + scales, key=lambda s: s["users"])
            out["scales_kept_from"] = args.previous.get("command")
        out["scales"] = scales
        if len(scales) >= 2:
            xs = [s["users"] for s in scales]
            ys = [s["data_bytes_primaries_delta"] for s in scales]
            a, b = linear_fit(xs, ys)
            out["linear_fit_primaries"] = {
                "intercept_bytes": round(a),
                "bytes_per_user": round(b, 1),
                "max_relative_residual": round(max_relative_residual(xs, ys), 4),
                "bytes_per_user_by_scale": [s["bytes_per_user_primaries"] for s in scales],
            }
    finally:
        cluster.cleanup()
    return out


def cohort(n_users: int, n_items: int, n_friends: int, prefix: int, seed: int):
    """Users with exactly ``n_items`` interactions and ``n_friends`` friends (a circulant graph
    among them), ids as wide as at 100M users ('u' + 8 digits) and a 10M-item catalogue."""
    if not 0 <= n_friends < n_users:
        raise ValueError(f"a circulant graph of {n_users} users has < {n_users} friends each")
    rng = np.random.default_rng(seed)
    lo = 10_000_000 + prefix * 20_000_000  # 8-digit ids, disjoint ranges per cohort
    users = np.char.add("u", (rng.choice(20_000_000, n_users, replace=False) + lo).astype(str))
    items = np.char.add("i", rng.integers(0, 10_000_000, (n_users, n_items)).astype(str))
    ts = rng.integers(1_700_000_000_000, 1_730_000_000_000, (n_users, n_items))
    w = np.maximum(1.0, np.rint(rng.lognormal(1.0, 1.0, (n_users, n_items)))).astype(np.float32)
    rows = Rows(np.repeat(users, n_items), items.ravel(), w.ravel(), ts.ravel())
    half = n_friends // 2
    idx = np.arange(n_users)
    a = np.repeat(idx, half)
    b = (a + np.tile(np.arange(1, half + 1), n_users)) % n_users
    pairs = list(zip(users[a].tolist(), users[b].tolist(), strict=True))
    return [str(u) for u in users], rows, pairs


def redis_cpu(cluster) -> dict[int, float]:
    out = {}
    for n in cluster.nodes:
        with _node(n.port) as c:
            cpu = c.info("cpu")
            out[n.port] = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return out


def load_cohort(cluster, cfg, keys, users: list[str], rows: Rows, pairs: list) -> dict:
    """Bulk-load one cohort; its bytes per user (memory delta, MEMORY USAGE by key type)."""
    from socialrec.serving.offline_store import OfflineStore

    n = len(users)
    settle(cluster)
    before = memory_snapshot(cluster)
    t0 = time.perf_counter()
    with OfflineStore(cfg) as store:
        counts = store.bulk_load(rows, pairs, progress=True)
    load_s = time.perf_counter() - t0
    settle(cluster)
    after = memory_snapshot(cluster)
    with OfflineStore(cfg) as store:
        usage = per_type_usage(store._r, keys, users)
    prim, repl = delta(after, before, "primaries"), delta(after, before, "replicas")
    return {
        "users": n,
        "bulk_load": {**counts, "seconds": round(load_s, 1)},
        "bytes_per_user_primaries": round(prim / n, 1),
        "bytes_per_user_replicas": round(repl / n, 1),
        "used_memory_bytes_per_user_primaries": round(
            delta(after, before, "primaries", "used_memory") / n, 1
        ),
        "keys_on_primaries": after["primaries"]["keys"] - before["primaries"]["keys"],
        "by_key_type": usage,
        "memory_usage_bytes_per_user": round(sum(v["bytes_per_user"] for v in usage.values()), 1),
    }


WRITE_KEYS = {
    "d": "dismissed items (set)",
    "b": "blocks (set)",
    "bb": "blocked by (set)",
    "bv": "block versions (hash, cluster)",
    "bbv": "blocked-by versions (hash, cluster)",
    "ev": "friendship versions (hash, cluster)",
    "f": "friends (set)",
}


def measure_profile(args) -> dict:
    from socialrec.serving import schema
    from socialrec.serving.schema import Keys
    from socialrec.serving.store import FeatureStore, StoreConfig

    _fast_eval_keys()
    out = part_header()
    n = args.cohort_users
    (ia, fa), (ib, fb) = args.cohort_a, args.cohort_b
    specs = [
        ("A", ia, fa, {}),
        ("C", ia, fb, {}),
        ("B", ib, fb, {}),
        ("A_zset_listpack", ia, fa, {"zset-max-listpack-entries": "512"}),
    ]
    out["method"] = (
        f"cohorts of {n:,} users each, bulk-loaded with OfflineStore.bulk_load into "
        f"start_cluster() (3 + 3, appendonly off): A = {ia} interactions + {fa} friends, C = "
        f"{ia} + {fb}, B = {ib} interactions (history and weights keep the newest 256, seen "
        f"keeps all) + {fb} friends, A_zset_listpack = A with zset-max-listpack-entries 512 (Redis default 128); "
        "user ids 'u' + 8 digits, item ids 'i' + up to 7 digits; friends a circulant graph "
        "inside the cohort; bytes = data memory delta (used_memory less replication and "
        "client buffers) over primaries / replicas per user, and MEMORY USAGE SAMPLES 0 of "
        "every key of every cohort user"
    )
    cluster = open_cluster(out)
    try:
        cfg = StoreConfig(url=cluster.url, cluster=True)
        keys = Keys(cfg.namespace)
        cohorts: dict = {}
        users_of: dict[str, list[str]] = {}
        for i, (name, items, friends, conf) in enumerate(
            progress(specs, desc="cohorts", unit="cohort")
        ):
            users, rows, pairs = cohort(n, items, friends, i, args.seed + i)
            users_of[name] = users
            prev = {k: config_all(cluster, k, v) for k, v in conf.items()}
            res = load_cohort(cluster, cfg, keys, users, rows, pairs)
            for k, v in prev.items():
                config_all(cluster, k, v)
            cohorts[name] = {
                "interactions_per_user": items,
                "friends_per_user": friends,
                "config": conf,
                **res,
            }
        a, b, c = (cohorts[x]["by_key_type"] for x in ("A", "B", "C"))
        mem = {x: cohorts[x]["bytes_per_user_primaries"] for x in ("A", "B", "C")}
        # per-member costs from the memory deltas: A -> C adds friends only, C -> B seen only
        per_friend = per_member(
            a["f"]["members_per_user"], mem["A"], c["f"]["members_per_user"], mem["C"]
        )
        per_seen = per_member(
            c["s"]["members_per_user"], mem["C"], b["s"]["members_per_user"], mem["B"]
        )
        sa, fa_ = a["s"]["members_per_user"], a["f"]["members_per_user"]
        out["cohorts"] = cohorts
        out["model"] = {
            "base_user": f"cohort A: {a['h']['members_per_user']:g} history, {sa:g} seen, "
            f"{fa_:g} friends",
            "base_seen": sa,
            "base_friends": fa_,
            "base_bytes_primaries": mem["A"],
            "bytes_per_extra_friend": round(per_friend, 1),
            "bytes_per_extra_seen_item": round(per_seen, 1),
            "from": "data memory deltas: friends from cohort A to C, seen items from C to B",
            "memory_usage_bytes_per_extra_friend": round(
                per_member(
                    a["f"]["members_per_user"],
                    a["f"]["bytes_per_user"],
                    c["f"]["members_per_user"],
                    c["f"]["bytes_per_user"],
                ),
                1,
            ),  # fmt: skip
            "memory_usage_bytes_per_extra_seen_item": round(
                per_member(
                    c["s"]["members_per_user"],
                    c["s"]["bytes_per_user"],
                    b["s"]["members_per_user"],
                    b["s"]["bytes_per_user"],
                ),
                1,
            ),  # fmt: skip
            "zset_listpack_base_bytes_primaries": cohorts["A_zset_listpack"][
                "bytes_per_user_primaries"
            ],
        }

        # ---- live writes: what a write leaves behind -------------------------------------
        users, others = users_of["A"], users_of["B"]  # A users write; B users are the others
        rng = random.Random(args.seed)
        ts = int(time.time() * 1000)
        store = FeatureStore(cfg)
        r = store._r

        def batch(name: str, calls: list) -> dict:
            settle(cluster)
            before = memory_snapshot(cluster)
            t0 = time.perf_counter()
            for call in progress(calls, desc=name, unit="write", leave=False):
                call()
            dt = time.perf_counter() - t0
            settle(cluster)
            after = memory_snapshot(cluster)
            k = len(calls)
            return {
                "writes": k,
                "seconds": round(dt, 1),
                "bytes_per_write_primaries": round(delta(after, before, "primaries") / k, 1),
            }

        def item() -> str:
            return f"i{rng.randrange(10_000_000)}"

        def log_calls(tag: str, k: int) -> list:
            return [
                partial(store.log_interaction, rng.choice(users), item(), 1.0, ts + j, f"{tag}-{j}")
                for j in range(k)
            ]

        writes: dict = {}
        w = args.writes
        batch("log_interaction (warm-up: every stream shard gets entries)", log_calls("w", w))
        writes["log_interaction"] = batch("log_interaction", log_calls("log", w))
        u0 = users[0]
        store.log_interaction(u0, "i1", 1.0, ts, "probe")
        writes["log_interaction"]["request_id_key_bytes"] = key_usage(
            r, [keys.request(u0, "probe", "log")]
        )[0][0]
        # steady state of one stream shard: many interaction events into one shard
        shard = schema.shard_of(u0)
        in_shard = [u for u in (f"u{j}" for j in range(90_000_000, 99_000_000))
                    if schema.shard_of(u) == shard][:50]  # fmt: skip
        s_key = keys.stream(shard)
        s0 = key_usage(r, [s_key])[0][0]
        k = args.stream_events
        for j in progress(range(k), desc="one stream shard", unit="event", leave=False):
            store.log_interaction(in_shard[j % 50], item(), 1.0, ts + j, f"st-{j}")
        s1, enc, entries = key_usage(r, [s_key])[0]
        writes["event_stream_one_shard"] = {
            "events": k,
            "stream_entries_after": entries,
            "bytes_per_event": round((s1 - s0) / k, 1),
            "what": "LogInteraction events (with request ids) into one shard's stream; "
            "MEMORY USAGE SAMPLES 0 of that stream before and after",
        }
        writes["dismiss_item"] = batch(
            "dismiss_item",
            [
                partial(store.dismiss, rng.choice(users), item(), "", ts + j, f"dis-{j}")
                for j in range(w // 2)
            ],
        )
        dense = users[-args.dense_users :]
        friend_calls = [
            partial(store.add_friendship, u, o, ts + i, f"fr-{j}-{i}")
            for j, u in enumerate(dense)
            for i, o in enumerate(rng.sample(others, args.dense_friends))
        ]
        writes["add_friendship"] = batch("add_friendship", friend_calls)
        writes["add_friendship"]["what"] = (
            f"{args.dense_users} cohort-A users each befriend {args.dense_friends} cohort-B "
            "users live (AddFriendship's cluster path: owner step + mirror step)"
        )
        writes["block_user"] = batch(
            "block_user",
            [
                partial(
                    store.block, "block", rng.choice(users), rng.choice(others), ts + j, f"blk-{j}"
                )  # fmt: skip
                for j in range(w // 4)
            ],
        )
        out["writes"] = writes
        touched = sorted(set(users) | set(others))
        out["write_keys"] = per_type_usage(r, keys, touched, WRITE_KEYS)
        out["dense_friend_users_keys"] = per_type_usage(r, keys, dense, {"ev": WRITE_KEYS["ev"]})
        out["writes_note"] = (
            "bytes per write = data memory delta over primaries / writes: the event-stream "
            "entry (kept until trimmed: nothing trims it unless stream_maxlen is set), the "
            "request-id key (expires after request_id_ttl_s, 1 h), and the feature change "
            "(at the cap a new history item replaces the oldest, the seen set grows; "
            "dismissed, blocked and friend set members; the cluster's edge and block version "
            "hashes, one entry per user pair ever written, on both sides)"
        )
        store.close()

        # ---- reads of full-profile users: Redis CPU per read ------------------------------
        reads: dict = {}
        with FeatureStore(cfg) as store:
            for name, who_from, fof, k in (
                ("content", "A", False, args.reads),
                ("friends", "A", True, max(1, args.reads // 4)),
                ("content_zset_listpack", "A_zset_listpack", False, args.reads),
            ):
                who = [rng.choice(users_of[who_from]) for _ in range(k)]
                store.read(who[0], with_fof=fof)
                c0, t0 = redis_cpu(cluster), time.perf_counter()
                for u in progress(who, desc=f"{name} reads", unit="read", leave=False):
                    store.read(u, with_fof=fof)
                dt, c1 = time.perf_counter() - t0, redis_cpu(cluster)
                per_node = {str(p): round((c1[p] - c0[p]) / k * 1e6, 1) for p in c0}
                reads[name] = {
                    "reads": k,
                    "users": f"cohort {who_from}",
                    "seconds": round(dt, 1),
                    "redis_cpu_us_per_read_all_nodes": round(sum(per_node.values()), 1),
                    "redis_cpu_us_per_read_by_node": per_node,
                }
        gslot = cluster.primary_for_key(keys.removed_version).port
        out["reads"] = reads
        out["reads_note"] = (
            "sequential blocking reads (FeatureStore.read, redis-py cluster client) of users "
            f"with {ia} history / {ia} seen / {fa} friends; Redis CPU = INFO cpu used_cpu_user "
            "+ used_cpu_sys summed over all 6 nodes (replicas and cluster-bus pings "
            f"included); the takedown version key ({schema.GLOBAL_SHARD} tag) is on port "
            f"{gslot}, read by every content read"
        )
    finally:
        cluster.cleanup()
    return out


# ---- FAISS ---------------------------------------------------------------------------------


def bundle_dims() -> list[dict]:
    """The dims and index kinds of the bundles under runs/ (selected compressed + fp32)."""
    found = []
    for run, compact in (("runs/lastfm/bundle", True), ("runs/synthetic/bundle", False)):
        p = ROOT / run / "manifest.json"
        if p.is_file():
            m = json.loads(p.read_text())
            found.append(
                {
                    "bundle": run,
                    "variant": m.get("variant", {}).get("name"),
                    "dim": int(m["dims"]["content"]),
                    "index": m.get("index"),
                    "compact": compact,
                }
            )
    return found


def measure_index(kind: str, d: int, n: int, queries: int, seed: int) -> dict:
    """Build ``kind`` over n random unit vectors of dim d; bytes, load RSS, search latency."""
    import faiss
    from socialrec.compression.export import build_index

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    index = build_index(x, kind)
    build_s = time.perf_counter() - t0
    del x
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.faiss"
        faiss.write_index(index, str(path))
        del index
        gc.collect()
        size = path.stat().st_size
        rss0 = rss_bytes()
        index = faiss.read_index(str(path))  # as Engine.load does
        load_rss = rss_bytes() - rss0
    faiss.omp_set_num_threads(1)  # as a worker runs it
    q = rng.standard_normal((queries, d), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for i in range(min(20, queries)):
        index.search(q[i : i + 1], 20)
    lat = []
    for i in range(queries):
        t0 = time.perf_counter()
        index.search(q[i : i + 1], 20)
        lat.append(time.perf_counter() - t0)
    del index
    gc.collect()
    return {
        "kind": kind,
        "dim": d,
        "vectors": n,
        "build_s": round(build_s, 1),
        "bytes": size,
        "bytes_per_vector": round(size / n, 1),
        "rss_added_by_read_index": load_rss,
        "search_us_p50": round(float(np.percentile(lat, 50)) * 1e6, 1),
        "search_us_p99": round(float(np.percentile(lat, 99)) * 1e6, 1),
        "queries": queries,
    }


def measure_id_maps(n: int) -> dict:
    """Python memory of a worker's id list + id -> row dict for n ids (as Engine builds them)."""
    from socialrec.serving.bundle import read_ids, write_ids
    from socialrec.serving.engine import _id_map

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "user_ids.txt"
        write_ids(path, [f"u{j}" for j in range(n)])
        gc.collect()
        tracemalloc.start()
        ids = read_ids(path)
        index = _id_map(ids, "user_ids.txt", Path(tmp))
        held, _peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        file_bytes = path.stat().st_size
    del ids, index
    return {
        "ids": n,
        "id_format": "'u' + decimal (7 chars at 1M)",
        "file_bytes": file_bytes,
        "python_bytes": held,
        "python_bytes_per_id": round(held / n, 1),
    }


def measure_faiss(args) -> dict:
    from socialrec.compression.export import choose_index

    out = part_header()
    out["method"] = (
        "compression.export.build_index over random unit vectors (a worst case for HNSW and "
        "IVF, whose graphs and lists are built for clustered data), kind = choose_index(n, "
        "compact) as the exporter picks it, plus the kinds needed to extrapolate; bytes = "
        "the written .faiss file; rss_added_by_read_index = this process's RSS grown by "
        "faiss.read_index (what each worker pays, Engine.load); search = batch 1, k = 20, one "
        f"thread, {args.queries} queries after 20 warm-up"
    )
    out["bundles"] = bundle_dims()
    runs = []
    plan = []
    for b in out["bundles"]:
        d, compact = b["dim"], b["compact"]
        for n in args.faiss_sizes:
            kind = choose_index(n, compact=compact)
            plan.append((b["bundle"], kind, d, n, "exporter's choice"))
        if compact:  # 10M picks ivfpq_fs: measure it at the smaller sizes to extrapolate
            for n in args.faiss_sizes:
                if choose_index(n, compact=True) != "ivfpq_fs":
                    plan.append((b["bundle"], "ivfpq_fs", d, n, "to extrapolate 10M"))
        else:  # 1M and 10M pick hnsw: measure hnsw at sizes that build in time
            for n in args.hnsw_fp32_sizes:
                plan.append((b["bundle"], "hnsw", d, n, "to extrapolate 1M / 10M"))
    seen = set()
    for bundle, kind, d, n, why in progress(plan, desc="faiss", unit="index"):
        if (kind, d, n) in seen or n > args.faiss_max_build.get(kind, 10**12):
            continue
        seen.add((kind, d, n))
        res = measure_index(kind, d, n, args.queries, args.seed)
        runs.append({"bundle": bundle, "why": why, **res})
        print(json.dumps(runs[-1]), flush=True)
    out["indexes"] = runs
    out["extrapolated"] = extrapolate_indexes(runs, [1_000_000, 10_000_000, 100_000_000])
    out["id_maps"] = measure_id_maps(args.id_map_size)
    return out


def extrapolate_indexes(runs: list[dict], targets: list[int]) -> list[dict]:
    """Bytes at ``targets`` from a linear fit per (kind, dim) over the measured sizes."""
    by: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        by.setdefault((r["kind"], r["dim"]), []).append(r)
    out = []
    for (kind, d), rs in sorted(by.items()):
        if len({r["vectors"] for r in rs}) < 2:
            continue
        xs, ys = [r["vectors"] for r in rs], [r["bytes"] for r in rs]
        a, b = linear_fit(xs, ys)
        for t in targets:
            if t in xs:
                continue
            out.append(
                {
                    "kind": kind,
                    "dim": d,
                    "vectors": t,
                    "bytes_extrapolated": round(a + b * t),
                    "from_sizes": sorted(xs),
                    "bytes_per_vector_slope": round(b, 2),
                }
            )
    return out


# ---- serving (no run: the load-test reports) -------------------------------------------------


def measure_serving(args) -> dict:
    out = {
        "command": part_header()["command"],
        "date": part_header()["date"],
        "method": (
            "copied from load-test reports: requests per core-second = 1e6 / server CPU per "
            "request (whole run, both workers); Redis requests per core-second = 1e6 / Redis "
            "CPU per request (single redis-server, Lua friends-of-friends)"
        ),
    }
    reports = []
    for p in args.loadtest_reports:
        path = ROOT / p
        d = json.loads(path.read_text())
        cfg = d.get("config", {})
        cpu, rcpu = d["server_cpu_us_per_request"], d.get("redis_cpu_us_per_request")
        cache = d.get("stages", {}).get("RecommendContent", {})
        hits, misses = cache.get("cache", {}).get("count", 0), cache.get("onnx", {}).get("count")
        reports.append(
            {
                "report": p,
                "bundle_variant": cfg.get("bundle_variant"),
                "workers": cfg.get("workers"),
                "serve_args": cfg.get("serve_args"),
                "requests": d["requests"],
                "server_cpu_us_per_request": cpu,
                "requests_per_core_second": round(1e6 / cpu, 1),
                "redis_cpu_us_per_request": rcpu,
                "redis_requests_per_core_second": round(1e6 / rcpu, 1) if rcpu else None,
                "capacity_rps": d["capacity"]["rps"],
                "capacity_users": d["capacity"]["users"],
                "capacity_p99_ms": d["capacity"]["p99_ms"],
                "friend_read_share": round(
                    d["methods"]["RecommendFriends"]["requests"] / d["requests"], 3
                ),
                "content_cache_hit_share": (
                    round(hits / (hits + misses), 3) if hits and misses is not None else 0.0
                ),
                "mix_rps": {m: round(v["rps"], 1) for m, v in d.get("methods", {}).items()},
            }
        )
    out["reports"] = reports
    fof = ROOT / "benchmarks" / "reports" / "fof-cluster.json"
    if fof.is_file():
        med = json.loads(fof.read_text())["medians"]
        single, cluster = med["single-resp"], med["cluster"]
        out["fof_cluster"] = {
            "report": "benchmarks/reports/fof-cluster.json",
            "single_resp_client_cpu_us": single["client_cpu_us_per_read"],
            "cluster_client_cpu_us": cluster["client_cpu_us_per_read"],
            "cluster_minus_single_resp_client_cpu_us": round(
                cluster["client_cpu_us_per_read"] - single["client_cpu_us_per_read"], 1
            ),
            "note": "worker CPU of one friend read (~60 friends): the load tests ran on a "
            "single Redis; on a cluster each friend read costs the worker this much more",
        }
    return out


# ---- plan ----------------------------------------------------------------------------------


def make_plan(report: dict, args) -> dict:
    """Deployment arithmetic on the measured parts present in ``report``."""
    from socialrec.serving.schema import SHARDS

    parts = report.get("parts", {})
    budget = args.node_budget_gb * GB
    plan: dict = {
        "assumptions": {
            "redis_node_budget_gb": args.node_budget_gb,
            "replicas_per_primary": 1,
            "target_utilization": args.utilization,
            "cores_per_serving_replica": args.cores_per_replica,
            "workers_per_serving_replica": args.cores_per_replica,
            "peak_rps": args.peak_rps,
            "users": args.plan_users,
            "user_shards": SHARDS,
        },
        "note": "arithmetic on measured numbers; every total below is extrapolated",
    }
    prof = parts.get("profile")
    if prof:
        m = prof["model"]
        lp_saving = m["base_bytes_primaries"] - m["zset_listpack_base_bytes_primaries"]
        profiles = [(256, f, "") for f in (100, 300, 500)] + [(1024, 300, "")]
        profiles += [(256, 300, "zset-max-listpack-entries 512")]
        rows = []
        for seen, friends, conf in profiles:
            b = user_bytes(
                m["base_bytes_primaries"], m["base_seen"], m["base_friends"],
                m["bytes_per_extra_seen_item"], m["bytes_per_extra_friend"], seen, friends,
            ) - (lp_saving if conf else 0)  # fmt: skip
            for users in args.plan_users:
                total = b * users
                rows.append(
                    {
                        "users": users,
                        "history": 256,
                        "seen": seen,
                        "friends": friends,
                        "redis_config": conf or "defaults",
                        "bytes_per_user": round(b),
                        "primary_gb": round(total / GB, 1),
                        "with_replicas_gb": round(2 * total / GB, 1),
                        "primaries_by_memory": nodes_for(total, budget),
                        "shard_gb": round(total / SHARDS / GB, 2),
                        "primaries_whole_shards": primaries_for_shards(total, budget, SHARDS),
                    }
                )
        plan["redis_memory"] = rows
    serving = parts.get("serving")
    if serving:
        fof = serving.get("fof_cluster", {})
        extra = fof.get("cluster_minus_single_resp_client_cpu_us")
        rows = []
        for r in serving["reports"]:
            share = r["friend_read_share"]
            for backend, cpu in (
                ("single Redis (as measured)", r["server_cpu_us_per_request"]),
                (
                    "Redis Cluster (friend reads + fof_cluster client CPU)",
                    r["server_cpu_us_per_request"] + share * extra if extra else None,
                ),
            ):
                if cpu is None:
                    continue
                for rps in args.peak_rps:
                    cores = cores_for(rps, cpu, args.utilization)
                    rows.append(
                        {
                            "from": Path(r["report"]).name,
                            "backend": backend,
                            "server_cpu_us_per_request": round(cpu, 1),
                            "peak_rps": rps,
                            "cores": round(cores, 1),
                            "replicas": replicas_for(cores, args.cores_per_replica),
                        }
                    )
        plan["serving_cores"] = rows
    if prof and "reads" in prof:
        rows = []
        content = prof["reads"]["content"]["redis_cpu_us_per_read_all_nodes"]
        friends = prof["reads"]["friends"]["redis_cpu_us_per_read_all_nodes"]
        for rps in args.peak_rps:
            # the load test's mix: 70% content, 20% friends, 10% writes (writes not counted)
            busy = rps * (0.7 * content + 0.2 * friends) / 1e6
            rows.append(
                {
                    "peak_rps": rps,
                    "mix": "70% content + 20% friend reads of full-profile users (100 friends)",
                    "redis_cores_busy": round(busy, 1),
                    "primaries_at_target_utilization": math.ceil(busy / args.utilization),
                    "takedown_version_gets_per_s_on_one_node": round(0.7 * rps),
                }
            )
        plan["redis_cpu"] = rows
    fa = parts.get("faiss")
    if fa:
        idx = {(r["kind"], r["dim"], r["vectors"]): r["bytes"] for r in fa["indexes"]}
        idx.update(
            {
                (r["kind"], r["dim"], r["vectors"]): r["bytes_extrapolated"]
                for r in fa["extrapolated"]
            }
        )
        per_id = fa["id_maps"]["python_bytes_per_id"]
        compact = next((b for b in fa["bundles"] if b["compact"]), None)
        tower_per_entity = None
        if compact and (ROOT / compact["bundle"] / "manifest.json").is_file():
            m = json.loads((ROOT / compact["bundle"] / "manifest.json").read_text())
            n = m["counts"]["items"] + m["counts"]["users"]
            tower_per_entity = m["files"]["user_tower.onnx"]["bytes"] / n
            plan["tower_bytes_per_item_or_user"] = {
                "bundle": compact["bundle"],
                "bytes": round(tower_per_entity, 1),
                "from": f"user_tower.onnx {m['files']['user_tower.onnx']['bytes']:,} bytes "
                f"/ ({m['counts']['items']:,} items + {m['counts']['users']:,} users): the "
                "tower embeds item and user ids, so it grows with both (low-rank int4 tables)",
            }
        rows = []
        if compact:
            from socialrec.compression.export import choose_index

            d = compact["dim"]
            for items, users in ((1_000_000, 10_000_000), (10_000_000, 100_000_000)):
                ki, ku = choose_index(items, True), choose_index(users, True)
                bi, bu = idx.get((ki, d, items)), idx.get((ku, d, users))
                ids = per_id * (items + users)
                if bi is None or bu is None:
                    continue
                tower = tower_per_entity * (items + users) if tower_per_entity else 0.0
                worker = bi + bu + ids + tower
                rows.append(
                    {
                        "bundle": compact["bundle"],
                        "items": items,
                        "users": users,
                        "items_index": f"{ki} {bi / GB:.2f} GB",
                        "users_index": f"{ku} {bu / GB:.2f} GB",
                        "id_maps_gb": round(ids / GB, 2),
                        "tower_file_gb": round(tower / GB, 2),
                        "per_worker_gb": round(worker / GB, 2),
                        "per_replica_gb": round(args.cores_per_replica * worker / GB, 1),
                        "per_replica_gb_during_reload": round(
                            2 * args.cores_per_replica * worker / GB, 1
                        ),
                    }
                )
        plan["worker_memory"] = rows
    return plan


# ---- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--scales", type=ints, default=[30_000, 100_000], help="users per scale")
    p.add_argument(
        "--keep-scales",
        action="store_true",
        help="keep the report's other scales (each keeps its own date and command)",
    )
    p.add_argument("--bulkload-users", type=int, default=5000)
    p.add_argument("--bulkload-rounds", type=int, default=2)
    p.add_argument("--sample", type=int, default=2000, help="users sampled for MEMORY USAGE")
    p.add_argument("--cohort-users", type=int, default=1000)
    p.add_argument("--cohort-a", type=ints, default=[256, 100], help="interactions,friends")
    p.add_argument("--cohort-b", type=ints, default=[1024, 500], help="interactions,friends")
    p.add_argument("--writes", type=int, default=2000, help="live interaction writes")
    p.add_argument("--stream-events", type=int, default=5000, help="events into one shard")
    p.add_argument("--dense-users", type=int, default=10, help="users befriending many live")
    p.add_argument("--dense-friends", type=int, default=300, help="live friends each")
    p.add_argument("--reads", type=int, default=2000, help="content reads (friend reads: 1/4)")
    p.add_argument("--faiss-sizes", type=ints, default=[100_000, 1_000_000])
    p.add_argument("--hnsw-fp32-sizes", type=ints, default=[30_000, 100_000])
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--id-map-size", type=int, default=1_000_000)
    p.add_argument("--loadtest-reports", type=lambda s: s.split(","), default=DEFAULT_LOADTESTS)
    p.add_argument("--node-budget-gb", type=float, default=25.0)
    p.add_argument("--utilization", type=float, default=0.6)
    p.add_argument("--cores-per-replica", type=int, default=8)
    p.add_argument("--peak-rps", type=ints, default=[10_000, 100_000])
    p.add_argument("--plan-users", type=ints, default=[10_000_000, 100_000_000])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(",") if x]
    bad = set(args.parts) - set(PARTS)
    if bad:
        p.error(f"unknown parts {sorted(bad)}; choose from {PARTS}")
    # fp32 HNSW at 1M (dim 257) takes ~8 min to build on 2 cores: not built, extrapolated
    args.faiss_max_build = {"hnsw": 300_000}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    report.setdefault("parts", {})
    measure = {
        "redis": measure_scales,
        "profile": measure_profile,
        "faiss": measure_faiss,
        "serving": measure_serving,
        "bulkload": measure_bulkload,
    }
    for part in progress(args.parts, desc="sizing", unit="part"):
        args.previous = report["parts"].get(part, {})
        t0 = time.perf_counter()
        res = measure[part](args)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        res["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        report["parts"][part] = res
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")  # after each part
    head = part_header()
    report.update(
        {
            "what": __doc__.splitlines()[0],
            "command": head["command"],
            "date": head["date"],
            "commit": head["commit"],
            "machine": head["machine"],
            "redis_server": _redis_version(),
        }
    )
    report["plan"] = make_plan(report, args)
    report = {k: report[k] for k in [*(k for k in report if k != "parts"), "parts"]}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["plan"], indent=2))
    print(f"wrote {args.out}")
    return 0


def _redis_version() -> str:
    try:
        from socialrec.serving.redis_local import find_redis_server

        return find_redis_server().describe()
    except Exception as e:  # noqa: BLE001 - informational only
        return f"unknown ({e})"


if __name__ == "__main__":
    raise SystemExit(main())
