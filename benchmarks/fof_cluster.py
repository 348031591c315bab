"""Friend reads on a single Redis (friends-of-friends in one Lua script) vs a Redis Cluster,
two ways: the friends' sets read with a pipeline per node and ranked in Python (the server's
path), and a precomputed per-user friends-of-friends zset (a measurement only, not a server
path), side by side; and what that precompute costs on friendship writes and in memory.

Starts a local redis-server and a local cluster (3 primaries + 3 replicas), loads the same
random friend graph into both, builds in the cluster one zset per user, ``ff:<user>`` in the
user's own slot (``Keys.user("ff", user)``), member a friend-of-friend, score minus the
mutual-friend count (so ``ZRANGE 0 N`` is highest count first, ties by id ascending, the
order of ``schema.rank_fof``; ``ZREVRANGE`` would break ties by id descending and take the
wrong members at the cut), checks that every variant ranks the same friends-of-friends, then
runs friend reads with ``--concurrency`` in flight, alternating the variants ``--rounds``
times:

- ``single-resp`` / ``single-redis-py`` / ``cluster``: ``FeatureStore.aread(user,
  with_fof=True)`` (the server's async path);
- ``cluster-precomputed``: ONE pipeline to the user's node, the cluster friend read's own
  commands (``read_commands(user, with_fof=True)``: history, weights, friends, dismissed,
  blocked both ways) plus ``ZRANGE ff:<user> 0 fof_cap+slack-1 WITHSCORES``, then the user,
  friends, blocked and dismissed dropped and the first ``fof_cap`` kept (a second ``ZRANGE``
  only if filtering left fewer while the zset has more; counted).

Per variant and round: Redis CPU per read (INFO cpu, summed over every node), the calling
process's CPU per read (what a server worker spends on the read), latency p50 and p99.

Then the write side, on the cluster, one write at a time: a sample of random new friendships
{a, b} added then removed, first as today (``FeatureStore.add_friendship`` /
``remove_friendship``: owner step + mirror step), then with the precompute kept up to date
after each (the fan-out: one pipeline ``SMEMBERS f:a, f:b``, then one cluster pipeline of
``ZINCRBY ff:b c`` + ``ZINCRBY ff:c b`` for every other friend c of a and the same for b,
2*(deg a + deg b) commands; a removal also drops members whose count fell to 0 with one
``ZREMRANGEBYSCORE`` per key touched). Per write: Redis CPU, client CPU, commands, p50/p99.
The same again between ``--hubs`` users with ``--hub-degree`` friends each (added to the
cluster after the reads). The zsets are checked against a recount after each write pass.
Memory: ``MEMORY USAGE`` of the zsets (and of the friend sets) on a sample of users.

    python benchmarks/fof_cluster.py --users 4000 --degree 60 --reads 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from itertools import chain
from pathlib import Path

import numpy as np
import redis
from socialrec.serving.offline_store import OfflineStore
from socialrec.serving.redis_local import start_cluster, start_redis
from socialrec.serving.schema import Keys, UserFeatures, check_id
from socialrec.serving.store import (
    FeatureStore,
    StoreConfig,
    _data_errors,
    _join_blocks,
    features,
)

VARIANTS = ("single-resp", "single-redis-py", "cluster", "cluster-precomputed")
FF = "ff"  # the precomputed friends-of-friends zset of a user: Keys.user(FF, user)


def graph(users: int, degree: int, seed: int) -> list[tuple[str, str]]:
    """About ``degree`` friends per user on average, uniformly random pairs."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, users, users * degree // 2)
    b = rng.integers(0, users, users * degree // 2)
    return [
        (f"user-{x}", f"user-{y}") for x, y in zip(a.tolist(), b.tolist(), strict=True) if x != y
    ]


def redis_cpu_s(ports: list[int]) -> float:
    """used_cpu_user + used_cpu_sys summed over the nodes, in seconds."""
    total = 0.0
    for p in ports:
        with redis.Redis(port=p) as r:
            cpu = r.info("cpu")
            total += float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return total


def settle(ports: list[int], timeout_s: float = 300.0) -> None:
    """Wait until no node rewrites its AOF and every replica has its primary's offset (so a
    bulk load's replication and rewrites do not run into the timed windows)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = False
        for p in ports:
            with redis.Redis(port=p) as r:
                pers, repl = r.info("persistence"), r.info("replication")
            busy |= bool(pers.get("aof_rewrite_in_progress") or pers.get("aof_rewrite_scheduled"))
            if repl.get("role") == "master":
                off = repl["master_repl_offset"]
                busy |= any(v["offset"] < off for k, v in repl.items() if k.startswith("slave"))
        if not busy:
            return
        time.sleep(0.5)
    raise TimeoutError("the cluster did not settle")


# ---- the precompute ------------------------------------------------------------------------
def friend_sets(r: redis.cluster.RedisCluster, keys: Keys, users: list[str]) -> dict:
    """user -> set of friends, as the cluster holds them."""
    pipe = r.pipeline(transaction=False)
    for u in users:
        pipe.smembers(keys.user("f", u))
    return {u: set(s) for u, s in zip(users, pipe.execute(), strict=True)}


def fof_counts(adj: dict[str, set[str]], user: str) -> Counter:
    """Friends-of-friends of ``user`` -> mutual friends (all friends counted, the user not)."""
    counts = Counter(chain.from_iterable(adj.get(f, ()) for f in adj.get(user, ())))
    counts.pop(user, None)
    return counts


def by_node(r: redis.cluster.RedisCluster, cmds: list[tuple], batch: int = 20000) -> None:
    """Send commands (first argument a key) straight to their nodes' pipelines, in order per
    node: loading, not timed (redis-py's cluster pipeline costs far more per command)."""
    groups: dict[str, list[tuple]] = defaultdict(list)
    for c in cmds:
        groups[r.get_node_from_key(c[1]).name].append(c)
    for name, cs in groups.items():
        conn = r.get_redis_connection(r.get_node(node_name=name))
        for i in range(0, len(cs), batch):
            pipe = conn.pipeline(transaction=False)
            for c in cs[i : i + batch]:
                pipe.execute_command(*c)
            pipe.execute()


def load_precomputed(r: redis.cluster.RedisCluster, keys: Keys, adj: dict) -> dict:
    """``ff:<user>`` for every user from the friend sets ``adj``; the members loaded."""
    users, loaded, members = list(adj), 0, 0
    for i in range(0, len(users), 200):  # 200 users at a time: bounded client memory
        cmds = []
        for u in users[i : i + 200]:
            counts = fof_counts(adj, u)
            if counts:
                members += len(counts)
                flat = chain.from_iterable((-n, c) for c, n in counts.items())
                cmds.append(("ZADD", keys.user(FF, u), *flat))
        by_node(r, cmds, batch=50)
        loaded += len(cmds)
    return {"users": loaded, "members": members}


def idle_redis_cpu(ports: list[int], seconds: float = 3.0) -> float:
    """The nodes' CPU while nothing is sent (cron, cluster bus, replication pings), us/s."""
    cpu0 = redis_cpu_s(ports)
    time.sleep(seconds)
    return round((redis_cpu_s(ports) - cpu0) / seconds * 1e6, 1)


def stored_fof(r: redis.cluster.RedisCluster, keys: Keys, user: str) -> dict[str, int]:
    return {m: int(-s) for m, s in r.zrange(keys.user(FF, user), 0, -1, withscores=True)}


def check_precomputed(r: redis.cluster.RedisCluster, keys: Keys, users: list[str]) -> bool:
    """The users' zsets hold exactly the counts recounted from the cluster's friend sets."""
    ok = True
    for u in users:
        adj = friend_sets(r, keys, [u])
        adj |= friend_sets(r, keys, sorted(adj[u]))
        ok &= stored_fof(r, keys, u) == dict(fof_counts(adj, u))
    return ok


def _score_pairs(reply: list) -> list:
    """[(member, score), ...] of a ZRANGE WITHSCORES reply (redis-py pairs it up; a raw RESP2
    reply is flat)."""
    if reply and not isinstance(reply[0], (list, tuple)):
        it = iter(reply)
        return [(m, float(sc)) for m, sc in zip(it, it, strict=True)]
    return [(m, float(sc)) for m, sc in reply]


class Precomputed:
    """The ``cluster-precomputed`` friend read: one pipeline to the user's node."""

    def __init__(self, store: FeatureStore, slack: int) -> None:
        self.store, self.window, self.second = store, store.cfg.fof_cap + slack, 0

    async def aread(self, user_id: str) -> UserFeatures:
        store, cap = self.store, self.store.cfg.fof_cap
        user = check_id("user_id", user_id)
        ff = store.keys.user(FF, user)
        client = store._aclient()
        cmds = store.read_commands(user, with_fof=True)  # cluster: no EVALSHA
        replies = await client.pipeline([*cmds, ("ZRANGE", ff, 0, self.window - 1, "WITHSCORES")])
        _data_errors(replies)
        replies, ranked = _join_blocks(replies[:-1]), replies[-1]
        excluded = {user, *replies[2], *replies[3], *replies[4]}
        fof: list = []
        start = 0
        while True:
            pairs = _score_pairs(ranked)
            for c, score in pairs:
                n = -int(score)
                if n > 0 and c not in excluded:
                    fof += (c, n)
                    if len(fof) >= 2 * cap:
                        break
            start += self.window
            if len(fof) >= 2 * cap or len(pairs) < self.window:
                break
            self.second += 1  # filtering left fewer than fof_cap and the zset has more
            (ranked,) = await client.pipeline(
                [("ZRANGE", ff, start, start + self.window - 1, "WITHSCORES")]
            )
            _data_errors([ranked])
        return features([*replies, fof], True)


# ---- reads ---------------------------------------------------------------------------------
async def reads(
    read: Callable[[str], Awaitable[UserFeatures]],
    store: FeatureStore,
    users: list[str],
    concurrency: int,
) -> list[float]:
    """Latency (s) of each read, ``concurrency`` in flight."""
    todo = iter(users)
    lat: list[float] = []

    async def worker() -> None:
        for u in todo:
            t0 = time.perf_counter()
            await read(u)
            lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await store.aclose()
    return lat


def measure(
    cfg: StoreConfig, ports: list[int], users: list[str], concurrency: int, slack: int | None
) -> dict:
    """``slack`` None: ``aread(with_fof=True)``; else the precomputed read with that slack."""
    store = FeatureStore(cfg)
    pre = Precomputed(store, slack) if slack is not None else None
    read = pre.aread if pre else (lambda u: store.aread(u, with_fof=True))
    asyncio.run(reads(read, store, users[:200], concurrency))  # warm up: connections, layout
    cpu0, proc0, t0 = redis_cpu_s(ports), time.process_time(), time.perf_counter()
    second0 = pre.second if pre else 0
    lat = asyncio.run(reads(read, store, users, concurrency))
    wall, proc1, cpu1 = time.perf_counter() - t0, time.process_time(), redis_cpu_s(ports)
    store.close()
    n = len(lat)
    q = np.quantile(np.array(lat), [0.5, 0.99])
    row = {
        "reads": n,
        "redis_cpu_us_per_read": round((cpu1 - cpu0) / n * 1e6, 1),
        "client_cpu_us_per_read": round((proc1 - proc0) / n * 1e6, 1),
        "p50_ms": round(float(q[0]) * 1e3, 3),
        "p99_ms": round(float(q[1]) * 1e3, 3),
        "reads_per_s": round(n / wall, 1),
    }
    if pre:
        row["second_exchanges"] = pre.second - second0
    return row


# ---- writes --------------------------------------------------------------------------------
def fanout_commands(keys: Keys, a: str, b: str, fa: set, fb: set, op: str) -> list[tuple]:
    """The precompute's part of adding (removing) the edge {a, b}: a new (lost) path c-a-b
    for every other friend c of a, and a-b-c for every other friend c of b."""
    delta = -1 if op == "add" else 1  # scores are minus the count
    cmds, touched = [], set()
    for y, fx in ((b, fa), (a, fb)):
        ky = keys.user(FF, y)
        for c in fx:
            if c != y:
                kc = keys.user(FF, c)
                cmds += [("ZINCRBY", ky, delta, c), ("ZINCRBY", kc, delta, y)]
                touched.update((ky, kc))
    if op == "remove":  # a count that fell to 0: no longer a friend-of-friend
        cmds += [("ZREMRANGEBYSCORE", k, 0, "+inf") for k in sorted(touched)]
    return cmds


def fan_out(store: FeatureStore, a: str, b: str, op: str) -> int:
    """Keep the zsets up to date after the edge change: read both friend sets (one exchange,
    after the owner and mirror steps), then one cluster pipeline; the commands sent."""
    r, k = store._r, store.keys
    pipe = r.pipeline(transaction=False)
    pipe.smembers(k.user("f", a))
    pipe.smembers(k.user("f", b))
    fa, fb = pipe.execute()
    cmds = fanout_commands(k, a, b, fa, fb, op)
    pipe = r.pipeline(transaction=False)
    for c in cmds:
        pipe.execute_command(*c)
    pipe.execute()
    return len(cmds) + 2


def write_pass(store: FeatureStore, ports: list[int], pairs: list, precompute: bool) -> dict:
    """Each pair added, then each removed, one write at a time; per op: per-write Redis CPU,
    client CPU, latency (the whole write) and, with the precompute, the fan-out's latency and
    commands."""
    out = {}
    for op in ("add", "remove"):
        write = store.add_friendship if op == "add" else store.remove_friendship
        lat, fan_lat, cmds = [], [], []
        cpu0, proc0 = redis_cpu_s(ports), time.process_time()
        for a, b in pairs:
            t0 = time.perf_counter()
            write(a, b, int(time.time() * 1000))
            t1 = time.perf_counter()
            n = 2  # the owner and mirror scripts
            if precompute:
                n += fan_out(store, a, b, op)
                fan_lat.append(time.perf_counter() - t1)
            lat.append(time.perf_counter() - t0)
            cmds.append(n)
        proc1, cpu1 = time.process_time(), redis_cpu_s(ports)
        w = len(pairs)
        q = np.quantile(np.array(lat), [0.5, 0.99])
        row = {
            "writes": w,
            "commands_per_write": round(statistics.mean(cmds), 1),
            "redis_cpu_us_per_write": round((cpu1 - cpu0) / w * 1e6, 1),
            "client_cpu_us_per_write": round((proc1 - proc0) / w * 1e6, 1),
            "p50_ms": round(float(q[0]) * 1e3, 3),
            "p99_ms": round(float(q[1]) * 1e3, 3),
        }
        if precompute:
            fq = np.quantile(np.array(fan_lat), [0.5, 0.99])
            row["fanout_p50_ms"] = round(float(fq[0]) * 1e3, 3)
            row["fanout_p99_ms"] = round(float(fq[1]) * 1e3, 3)
        out[op] = row
    return out


def writes(
    store: FeatureStore, r: redis.cluster.RedisCluster, ports: list[int], pairs: list
) -> dict:
    """Today's friendship writes vs the same with the fan-out, and the zsets checked."""
    k = store.keys
    today = write_pass(store, ports, pairs, precompute=False)
    with_fof = write_pass(store, ports, pairs, precompute=True)
    ends = sorted({x for p in pairs[:5] for x in p})
    fresh = check_precomputed(r, k, ends)  # after the adds and the removes
    # once more, stopping after the adds: the zsets must count the new edges
    for a, b in pairs[:5]:
        store.add_friendship(a, b, int(time.time() * 1000))
        fan_out(store, a, b, "add")
    fresh &= check_precomputed(r, k, ends)
    for a, b in pairs[:5]:
        store.remove_friendship(a, b, int(time.time() * 1000))
        fan_out(store, a, b, "remove")
    fresh &= check_precomputed(r, k, ends)
    degrees = [len(s) for s in friend_sets(r, k, sorted({x for p in pairs for x in p})).values()]
    return {
        "pairs": len(pairs),
        "endpoint_friends_median": statistics.median(degrees),
        "today": today,
        "precomputed": with_fof,
        "zsets_match_recount": fresh,
    }


def new_pairs(rng: random.Random, users: list[str], adj: dict, n: int) -> list[tuple]:
    """``n`` distinct pairs of users that are not friends."""
    seen: set[frozenset] = set()
    while len(seen) < n:
        a, b = rng.sample(users, 2)
        if b not in adj.get(a, ()):
            seen.add(frozenset((a, b)))
    return [tuple(sorted(p)) for p in seen]


def add_hubs(
    r: redis.cluster.RedisCluster, cfg: StoreConfig, adj: dict, users: list[str], a: argparse.Namespace, rng: random.Random
) -> list[str]:  # fmt: skip
    """``--hubs`` users with ``--hub-degree`` friends each, loaded with their fan-out (edge
    by edge, from ``adj``, which is updated); not timed."""
    hubs = [f"hub-{i}" for i in range(a.hubs)]
    pairs = [(h, u) for h in hubs for u in rng.sample(users, a.hub_degree)]
    with OfflineStore(cfg) as off:
        off.bulk_load([], pairs, progress=False)
    keys, cmds = Keys(cfg.namespace), []
    for h, u in pairs:
        cmds += fanout_commands(keys, h, u, adj.setdefault(h, set()), adj[u], "add")
        adj[h].add(u)
        adj[u].add(h)
    by_node(r, cmds)
    return hubs


def memory(r: redis.cluster.RedisCluster, keys: Keys, users: list[str]) -> dict:
    """MEMORY USAGE (exact: SAMPLES 0) of the users' zsets and friend sets."""
    pipe = r.pipeline(transaction=False)
    for u in users:
        pipe.execute_command("MEMORY USAGE", keys.user(FF, u), "SAMPLES", 0)
        pipe.zcard(keys.user(FF, u))
        pipe.execute_command("MEMORY USAGE", keys.user("f", u), "SAMPLES", 0)
        pipe.scard(keys.user("f", u))
    rep = pipe.execute()
    zb, zn, fb, fn = (rep[i::4] for i in range(4))
    return {
        "users": len(users),
        "fof_zset_bytes_median": statistics.median(zb),
        "fof_zset_members_median": statistics.median(zn),
        "fof_zset_bytes_per_member": round(sum(zb) / max(1, sum(zn)), 1),
        "friend_set_bytes_median": statistics.median(fb),
        "friends_median": statistics.median(fn),
    }


def used_memory(ports: list[int], role: str = "master") -> int:
    total = 0
    for p in ports:
        with redis.Redis(port=p) as r:
            if r.info("replication")["role"] == role:
                total += int(r.info("memory")["used_memory"])
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=4000)
    ap.add_argument("--degree", type=int, default=60, help="average friends per user")
    ap.add_argument("--reads", type=int, default=2000, help="friend reads per variant and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, variants alternating")
    ap.add_argument("--concurrency", type=int, default=8, help="reads in flight")
    ap.add_argument("--slack", type=int, default=100, help="precomputed read: ZRANGE fetches "
                    "fof_cap + slack members (friends and blocked are dropped after)")  # fmt: skip
    ap.add_argument("--writes", type=int, default=300, help="new friendships timed, each "
                    "added then removed, today's way and with the fan-out")  # fmt: skip
    ap.add_argument("--hubs", type=int, default=10, help="users with --hub-degree friends, "
                    "friendships between them timed the same way (0: none)")  # fmt: skip
    ap.add_argument("--hub-degree", type=int, default=300)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/reports/fof-cluster.json")
    a = ap.parse_args()

    pairs = graph(a.users, a.degree, a.seed)
    rng = random.Random(a.seed)
    all_users = [f"user-{i}" for i in range(a.users)]
    with start_redis(appendonly=False) as single, start_cluster() as cluster:
        base = StoreConfig(url=single.url, namespace="fofbench")
        ccfg = replace(base, url=cluster.url, cluster=True)
        cfgs = {
            "single-resp": replace(base, client="resp"),
            "single-redis-py": replace(base, client="redis-py"),
            "cluster": ccfg,
            "cluster-precomputed": ccfg,
        }
        cports = [n.port for n in cluster.nodes]
        ports = {
            "single-resp": [single.port],
            "single-redis-py": [single.port],
            "cluster": cports,
            "cluster-precomputed": cports,
        }
        for cfg in (base, ccfg):
            with OfflineStore(cfg) as off:
                t0 = time.perf_counter()
                counts = off.bulk_load([], pairs, progress=False)
                print(f"loaded {counts['friend_pairs_new']} pairs in "
                      f"{time.perf_counter() - t0:.1f}s ({'cluster' if cfg.cluster else 'single'})")  # fmt: skip
        keys = Keys(ccfg.namespace)
        r = redis.cluster.RedisCluster.from_url(cluster.url, decode_responses=True)
        adj = friend_sets(r, keys, all_users)
        friends_max = max(len(s) for s in adj.values())
        settle(cports)
        idle = idle_redis_cpu(cports)
        mem0 = used_memory(cports)
        t0 = time.perf_counter()
        loaded = load_precomputed(r, keys, adj)
        load_s = time.perf_counter() - t0
        settle(cports)
        mem1 = used_memory(cports)
        print(f"precomputed {loaded['members']} fof members of {loaded['users']} users in "
              f"{load_s:.1f}s (+{(mem1 - mem0) / 2**20:.0f} MiB on the primaries)")  # fmt: skip
        sample = [f"user-{rng.randrange(a.users)}" for _ in range(100)]
        with FeatureStore(base) as s1, FeatureStore(ccfg) as s2:
            pre = Precomputed(s2, a.slack)
            r1 = [s1.read(u, with_fof=True) for u in sample]
            r2 = [s2.read(u, with_fof=True) for u in sample]

            async def precomputed_sample() -> list[UserFeatures]:
                try:
                    return [await pre.aread(u) for u in sample]
                finally:
                    await s2.aclose()

            r3 = asyncio.run(precomputed_sample())
            friends = [len(s1.read(u).friends) for u in sample]

            def ordered(x: UserFeatures) -> tuple:
                return x, list(x.fof.items())

            same = all(ordered(x) == ordered(y) == ordered(z) for x, y, z in zip(r1, r2, r3, strict=True))  # fmt: skip
        assert same, "the variants rank friends-of-friends differently"
        rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for rnd in range(a.rounds):
            order = VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]
            for v in order:
                users = [f"user-{rng.randrange(a.users)}" for _ in range(a.reads)]
                slack = a.slack if v == "cluster-precomputed" else None
                row = measure(cfgs[v], ports[v], users, a.concurrency, slack)
                rows[v].append({"round": rnd, **row})
                print(f"round {rnd + 1}/{a.rounds} {v:20s} {row}", flush=True)

        mem = memory(r, keys, sample[:50])
        with FeatureStore(ccfg) as ws:
            wpairs = new_pairs(rng, all_users, adj, a.writes)
            write_rows = {"degree": writes(ws, r, cports, wpairs)}
            print(f"writes at degree {a.degree}: {json.dumps(write_rows['degree'])}", flush=True)
            if a.hubs:
                hubs = add_hubs(r, ccfg, adj, all_users, a, rng)
                settle(cports)
                hub_pairs = [(x, y) for i, x in enumerate(hubs) for y in hubs[i + 1 :]]
                write_rows["hubs"] = writes(ws, r, cports, hub_pairs)
                mem_hubs = memory(r, keys, hubs)
                print(f"writes between {a.hubs} hubs: {json.dumps(write_rows['hubs'])}", flush=True)  # fmt: skip
        r.close()
    keys_ = ("redis_cpu_us_per_read", "client_cpu_us_per_read", "p50_ms", "p99_ms", "reads_per_s")
    medians = {v: {k: statistics.median(x[k] for x in rows[v]) for k in keys_} for v in VARIANTS}
    for v in VARIANTS:
        m = medians[v]
        m["total_cpu_us_per_read"] = round(
            m["redis_cpu_us_per_read"] + m["client_cpu_us_per_read"], 1
        )
    report = {
        "what": "friend reads (aread with_fof): single Redis + Lua fof vs Redis Cluster + "
        "pipelined per-node friend-set reads ranked in Python vs Redis Cluster + a precomputed "
        "per-user fof zset (one exchange); the precompute's cost on friendship writes and memory",
        "args": vars(a),
        "graph": {
            "users": a.users,
            "pairs": len(pairs),
            "friends_median": statistics.median(friends),
            "friends_max": friends_max,
        },
        "cluster_idle_redis_cpu_us_per_s": idle,
        "same_fof_on_sample": same,
        "sample": len(sample),
        "precompute": {
            **loaded,
            "load_s": round(load_s, 1),
            "primaries_used_memory_mib": round((mem1 - mem0) / 2**20, 1),
            "memory": mem,
            **({"memory_hubs": mem_hubs} if a.hubs else {}),
        },
        "rounds": rows,
        "medians": medians,
        "writes": write_rows,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\n{'variant':20s} {'redis us/read':>14s} {'client us/read':>15s} {'p50 ms':>8s} {'p99 ms':>8s}"
    )
    for v in VARIANTS:
        m = medians[v]
        print(f"{v:20s} {m['redis_cpu_us_per_read']:14.1f} {m['client_cpu_us_per_read']:15.1f} "
              f"{m['p50_ms']:8.3f} {m['p99_ms']:8.3f}")  # fmt: skip
    print(f"report: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
