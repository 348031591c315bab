"""Dynamic batching: a batched answer is exactly the answer the request gets alone (engine
over flat, SQ8 and HNSW indexes, feed-control filters, exclusions, fresh items, cold start),
the batcher's policy (a lone request runs at once; full batches; the wait), and a real
server answering concurrent reads through batches exactly as an unbatched one does."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from socialrec.compression.export import build_index
from socialrec.serving.batcher import Batcher
from socialrec.serving.engine import (
    MAX_BATCH,
    ContentQuery,
    Engine,
    FreshIndex,
    FriendQuery,
    Query,
    Result,
)
from socialrec.serving.publish import PublishConfig
from socialrec.serving.publish import run as publish

from socialrec.v1 import recommender_pb2 as pb

TOKEN = "in-process-token"  # tests/serving/conftest.py
ADMIN = "admin-token-for-batching"


@pytest.fixture(scope="module")
def flat(small_bundle: Path) -> Engine:
    return Engine.load(small_bundle)


@pytest.fixture(scope="module", params=["flat", "sq8", "hnsw"])
def engine(request, flat: Engine) -> Engine:
    """The small bundle's engine with its indexes rebuilt as ``kind`` (same vectors)."""
    if request.param == "flat":
        return flat
    items = build_index(flat.items.reconstruct_n(0, flat.items.ntotal), request.param)
    users = build_index(flat.users.reconstruct_n(0, flat.users.ntotal), request.param)
    return Engine(flat.bundle, flat.session, items, users, flat.config)


def _fresh(engine: Engine, rng: np.random.Generator) -> FreshIndex:
    """A side index whose rows compete with the catalogue: noisy copies of item vectors under
    new ids, plus two ids the bundle knows (a retrain took them over: never served)."""
    base = engine.items.reconstruct_n(0, engine.items.ntotal)
    pick = rng.choice(len(base), 30, replace=False)
    rows = {f"fresh-{j}": base[j] + rng.normal(0, 0.05, base.shape[1]).astype(np.float32)
            for j in pick}  # fmt: skip
    rows[engine.item_ids[0]] = base[0] * 2
    rows[engine.item_ids[1]] = base[1] * 2
    return FreshIndex.build(rows, base.shape[1], (1, 0, engine.version), {}, {})


def _queries(engine: Engine, n: int, seed: int) -> list[Query]:
    """Random content and friend reads: histories with unknown ids and zero weights, friends,
    friends-of-friends, feed-control exclusions (seen, dismissed, taken down, blocked, the
    request's own), deep exclusions that force a deeper search, cold-start users, fresh items."""
    rng = np.random.default_rng(seed)
    items, users = engine.item_ids, engine.user_ids
    fresh = _fresh(engine, rng)
    out: list[Query] = []
    for i in range(n):
        n_h = int(rng.choice([0, 1, 3, 17, 60]))
        hist = [(items[j], float(rng.integers(0, 40))) for j in rng.choice(len(items), n_h)]
        if i % 7 == 0:
            hist.append(("not-in-bundle", 3.0))
        if n_h and i % 3 == 0:  # a fresh item in the history: never served back
            hist.append((fresh.ids[i % len(fresh.ids)], 1.0))
        n_f = int(rng.choice([0, 0, 2, 9]))
        fr = [users[j] for j in rng.choice(len(users), n_f, replace=False)]
        k = int(rng.choice([1, 5, 10, 20, 50]))
        n_x = int(rng.choice([0, 4, 30, len(items) - 30 if i % 11 == 0 else 0]))
        if i % 2 == 0:
            excl = {items[j] for j in rng.choice(len(items), n_x, replace=False)}
            excl.update({item for item, _ in hist})  # seen
            if i % 5 == 0:
                excl.add(fresh.ids[0])
            out.append(ContentQuery(hist, fr, k, frozenset(excl), fresh if i % 4 else None))
        else:
            me = users[int(rng.integers(len(users)))]
            fof = {users[j]: int(rng.integers(1, 6)) for j in rng.choice(len(users), 12)}
            if i % 9 == 0:
                fof["someone-new"] = 2
            excl = {users[j] for j in rng.choice(len(users), min(n_x, len(users) - 60))}
            out.append(FriendQuery(me, hist, fr, fof, k, frozenset(excl)))
    return out


def _same(a: Result, b: Result) -> None:
    assert a.items == b.items  # ids, scores (exact float equality), reasons, mutual counts
    assert (a.cold_start, a.unknown, a.fresh_seq) == (b.cold_start, b.unknown, b.fresh_seq)
    assert (a.query is None) == (b.query is None)
    if a.query is not None:
        assert np.array_equal(a.query, b.query)


def test_batched_answers_are_the_answers_alone(engine: Engine) -> None:
    queries = _queries(engine, 400, seed=7)
    alone = [engine.recommend_batch([q])[0] for q in queries]
    assert sum(r.cold_start for r in alone) >= 10  # cold start is in play
    assert any(s.reason == "fresh" for r in alone for s in r.items)  # fresh items too
    assert any(s.mutual_friends for r in alone for s in r.items)
    rng = np.random.default_rng(1)
    for _ in range(2):  # two different batchings of the same requests
        order = rng.permutation(len(queries)).tolist()
        at = 0
        while at < len(order):
            size = int(rng.integers(1, MAX_BATCH + 1))
            batch = order[at : at + size]
            at += size
            for i, res in zip(batch, engine.recommend_batch([queries[i] for i in batch]),
                              strict=True):  # fmt: skip
                _same(res, alone[i])


def test_single_calls_are_one_query_batches(flat: Engine) -> None:
    q = _queries(flat, 12, seed=3)
    for query in q:
        if isinstance(query, ContentQuery):
            res = flat.recommend_content(
                query.history, query.friends, query.k, query.exclude, query.fresh
            )
        else:
            res = flat.recommend_friends(
                query.user_id, query.history, query.friends, query.fof, query.k, query.exclude
            )
        _same(res, flat.recommend_batch([query])[0])
    with pytest.raises(ValueError, match="at most 16"):
        flat.recommend_batch(q[:1] * (MAX_BATCH + 1))


# ---- the batcher's policy ------------------------------------------------------------------


def test_batcher_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="between 1 and 16"):
        Batcher(0, 0.0)
    with pytest.raises(ValueError, match="between 1 and 16"):
        Batcher(MAX_BATCH + 1, 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        Batcher(4, -1.0)


def test_a_lone_request_runs_at_once(flat: Engine) -> None:
    """Nothing else in flight: the answer is ready when the call first steps, with no loop
    turn and no wait, even with a long wait configured."""
    q = _queries(flat, 2, seed=5)[0]
    sizes: list[int] = []

    async def go() -> Result:
        b = Batcher(8, 10.0, sizes.append)
        coro = b.run(flat, q)
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        coro.close()
        raise AssertionError("a lone request waited")

    _same(asyncio.run(go()), flat.recommend_batch([q])[0])
    assert sizes == [1]


def test_requests_ready_together_share_batches(flat: Engine) -> None:
    """Six reads whose features arrive in one loop turn: a full batch of 4 at once, then the
    last two together as soon as nothing else is reading."""
    queries = _queries(flat, 6, seed=11)
    sizes: list[int] = []

    async def go() -> list[Result]:
        b = Batcher(4, 0.0, sizes.append)

        async def read_then_run(q: Query) -> Result:
            with b.arriving():
                await asyncio.sleep(0)  # the feature read
            return await b.run(flat, q)

        return await asyncio.gather(*(read_then_run(q) for q in queries))

    for res, q in zip(asyncio.run(go()), queries, strict=True):
        _same(res, flat.recommend_batch([q])[0])
    assert sizes == [4, 2]


def test_wait_is_bounded_and_ends_when_the_last_reader_leaves(flat: Engine) -> None:
    queries = _queries(flat, 2, seed=13)
    sizes: list[int] = []

    async def go(wait_s: float, read_s: float, submit: bool) -> float:
        b = Batcher(8, wait_s, sizes.append)

        async def other() -> None:
            with b.arriving():
                await asyncio.sleep(read_s)
            if submit:
                await b.run(flat, queries[1])

        task = asyncio.create_task(other())
        await asyncio.sleep(0)  # the other read is in flight
        t0 = time.perf_counter()
        await b.run(flat, queries[0])
        waited = time.perf_counter() - t0
        await task
        return waited

    # the other read arrives within the wait: one batch of two
    asyncio.run(go(wait_s=5.0, read_s=0.01, submit=True))
    assert sizes == [2]
    # it does not: the first runs alone when the wait is over, the other later
    sizes.clear()
    waited = asyncio.run(go(wait_s=0.05, read_s=1.0, submit=True))
    assert sizes == [1, 1] and 0.05 <= waited < 1.0
    # the other read fails (never queues): the queue runs as soon as it leaves, not at 5 s
    sizes.clear()
    waited = asyncio.run(go(wait_s=5.0, read_s=0.01, submit=False))
    assert sizes == [1] and waited < 1.0


def test_batch_max_one_runs_each_request_alone(flat: Engine) -> None:
    queries = _queries(flat, 4, seed=17)
    sizes: list[int] = []

    async def go() -> None:
        b = Batcher(1, 0.0, sizes.append)

        async def read_then_run(q: Query) -> Result:
            with b.arriving():
                await asyncio.sleep(0)
            return await b.run(flat, q)

        await asyncio.gather(*(read_then_run(q) for q in queries))

    asyncio.run(go())
    assert sizes == [1, 1, 1, 1]


# ---- a real server -------------------------------------------------------------------------


def _batches(metrics) -> tuple[float, float]:
    """(batches, requests in them) so far, from socialrec_batch_size."""
    got = {s.name: s.value for m in metrics.batch_size.collect() for s in m.samples}
    return got["socialrec_batch_size_count"], got["socialrec_batch_size_sum"]


def test_server_answers_concurrent_reads_through_batches_exactly(
    server_config, inproc, small_bundle: Path
) -> None:
    """Two servers over one Redis: batching on (a wait long enough that concurrent reads
    share batches, the result cache on) and off (cache off). Every user's content and friend
    answers, with dismissals, blocks, a takedown and per-request exclusions in play, asked
    concurrently of the batching server, equal the unbatched server's, cached or not."""
    cfg = replace(server_config, admin_token=ADMIN, fresh_items=False)
    publish(PublishConfig(run=str(small_bundle.parent), redis_url=cfg.redis_url,
                          namespace=cfg.namespace, train_only=True, progress=False))  # fmt: skip
    batched = inproc(replace(cfg, batch_max=16, batch_wait_us=20_000), metrics=True)
    alone = inproc(replace(cfg, batch_max=1, result_cache_mb=0))
    users = (small_bundle / "user_ids.txt").read_text().split("\n")[:-1]
    items = (small_bundle / "item_ids.txt").read_text().split("\n")[:-1]
    auth = (("authorization", f"Bearer {TOKEN}"),)
    for u in users[:40:3]:
        alone.stub.Dismiss(pb.DismissRequest(user_id=u, item_id=items[0]), metadata=auth)
        alone.stub.BlockUser(pb.BlockRequest(user_id=u, blocked_id=users[-1]), metadata=auth)
    alone.stub.RemoveItem(
        pb.ItemRequest(item_id=items[1]), metadata=(("authorization", f"Bearer {ADMIN}"),)
    )
    reqs = []
    for i, u in enumerate(users):
        excl = [items[i % len(items)]] if i % 4 == 0 else []
        reqs.append(("RecommendContent", pb.RecommendContentRequest(user_id=u, k=10 + i % 3,
                                                                    exclude_ids=excl)))  # fmt: skip
        reqs.append(("RecommendFriends", pb.RecommendFriendsRequest(user_id=u, k=10)))

    def ask(server, method: str, req) -> tuple:
        reply = getattr(server.stub, method)(req, timeout=30)
        rows = reply.items if method == "RecommendContent" else reply.users
        return tuple((r.id, r.score, r.reason, r.mutual_friends) for r in rows), reply.degraded

    want = [ask(alone, m, r) for m, r in reqs]
    assert not any(d for _, d in want)
    n0, sum0 = _batches(batched.metrics)
    with ThreadPoolExecutor(32) as pool:
        for _ in range(2):  # the second round: cache hits and misses side by side
            got = list(pool.map(lambda mr: ask(batched, *mr), reqs))
            assert got == want
    n, total = _batches(batched.metrics)
    cpu = sum(s.value for m in batched.metrics.engine_cpu.collect() for s in m.samples
              if s.name == "socialrec_engine_cpu_seconds_total")  # fmt: skip
    assert 0 < cpu < 60  # the engine's thread CPU is counted (seconds, not microseconds)
    assert total - sum0 >= len(reqs)  # every first-round read went through the batcher
    assert (total - sum0) - (n - n0) >= 20  # ...and at least 20 of them joined another's batch
    with pytest.raises(grpc.RpcError):  # bad input still answered as before
        batched.stub.RecommendContent(pb.RecommendContentRequest(user_id=users[0], k=0))
