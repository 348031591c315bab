"""Fresh items served (docs/design.md "Fresh items: serving"): an item the bundle does not know
becomes recommendable seconds after its first interactions, under every feed control, through
the registry and each worker's polled side index. Real grpc.aio servers and real Redis; the
cluster and subprocess tests are in the slow tier."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import redis
from socialrec.serving.bundle import MANIFEST, copy_bundle, write_manifest
from socialrec.serving.fresh import FoldInConfig
from socialrec.serving.servicer import RecommenderService
from socialrec.serving.worker import build_server

from socialrec.v1 import recommender_pb2 as pb

from .conftest import InProcessServer

TOKEN = "in-process-token"  # tests/serving/conftest.py
ADMIN = "admin-token-for-tests"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
ADMIN_AUTH = (("authorization", f"Bearer {ADMIN}"),)
DEADLINE_S = 5.0  # the bound: a fresh item is servable within 5 s
N_USERS = 3  # interacting users, >= min_interactions of every config used here
# The small test model's vectors are tiny (|x|^2 ~ 0.04, catalogue scores ~ +-0.03), so the
# default ridge (lam = 1) stays at the mean catalogue row, whose direction this model scores
# below the median item; the "mean" estimator points the row at its users. Serving does not
# depend on the estimator: these tests are about the path from a write to an answer.
RANKABLE = FoldInConfig(method="mean")


class FreshServer(InProcessServer):
    """The in-process server with its fresh-item poller running, as a worker runs it."""

    async def _build(self):
        self.service = RecommenderService(self.cfg, self.holder, self.store, self.metrics)
        server, health, port = build_server(replace(self.cfg, port=0), self.service)
        await server.start()
        self.poller = asyncio.create_task(self.service.fresh.run())
        return server, health, port

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.poller.cancel)
        super().close()


@pytest.fixture
def fresh_server(server_config, small_bundle):
    made: list[FreshServer] = []

    def make(**kw) -> FreshServer:
        kw.setdefault("fresh", RANKABLE)
        cfg = replace(server_config, admin_token=ADMIN, fresh_poll_s=0.05, **kw)
        s = FreshServer(cfg, metrics=True)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _ids(bundle: Path) -> list[str]:
    return (bundle / "item_ids.txt").read_text().split("\n")[:-1]


def _log(stub, user: str, item: str, rid: str = "", ts: int = 0) -> str:
    req = pb.LogInteractionRequest(
        user_id=user, item_id=item, weight=1.0, request_id=rid, timestamp_ms=ts
    )
    return stub.LogInteraction(req, metadata=AUTH).event_id


def _content(stub, user: str, k: int = 50, exclude=()) -> list[pb.Recommendation]:
    req = pb.RecommendContentRequest(user_id=user, k=k, exclude_ids=list(exclude))
    return list(stub.RecommendContent(req).items)


def _history(s: FreshServer, items: list[str], user: str, taste: list[str]) -> None:
    for t, item in enumerate(taste):
        _log(s.stub, user, item, ts=1000 + t)


def _taste(items: list[str]) -> list[str]:
    return items[10:16]  # a few known items: the similar users' shared history


def _fans(s: FreshServer, items: list[str], fresh: str, n: int, tag: str) -> list[str]:
    """n users with one taste, each interacting with ``fresh`` after it; their ids."""
    users = [f"{tag}-fan{j}" for j in range(n)]
    for u in users:
        _history(s, items, u, _taste(items))
        _log(s.stub, u, fresh)
    return users


def _wait_for(cond, timeout_s: float = DEADLINE_S) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout_s} s")


def _registry(s: FreshServer) -> dict[str, dict]:
    _, _, entries, _ = s._call(s.store.afresh_registry())
    return {k: json.loads(v) for k, v in entries.items()}


def test_bundle_carries_a_signed_listed_prior(small_bundle) -> None:
    m = json.loads((small_bundle / MANIFEST).read_text())
    assert "fresh_prior.npz" in m["files"]  # so checksummed (and signed with the manifest)


def test_fresh_item_served_to_a_similar_user_under_every_control(fresh_server, small_bundle):
    s = fresh_server()
    items = _ids(small_bundle)
    fresh = "brand-new-item"
    assert fresh not in items
    fans = _fans(s, items, fresh, N_USERS, "t1")
    _history(s, items, "sim", _taste(items))  # the same history as every fan: the same vector

    waited = _wait_for(lambda: fresh in {r.id for r in _content(s.stub, "sim")})
    assert waited <= DEADLINE_S
    got = {r.id: r for r in _content(s.stub, "sim")}
    assert got[fresh].reason == "fresh"
    assert _registry(s)[fresh]["n"] == N_USERS
    assert s.service.fresh.index is not None and fresh in s.service.fresh.index.ids

    for u in fans:  # seen: never to a user who consumed it
        assert fresh not in {r.id for r in _content(s.stub, u)}
    assert fresh not in {r.id for r in _content(s.stub, "sim", exclude=[fresh])}

    _history(s, items, "sim2", _taste(items))
    assert fresh in {r.id for r in _content(s.stub, "sim2")}
    s.stub.Dismiss(pb.DismissRequest(user_id="sim2", item_id=fresh), metadata=AUTH)
    assert fresh not in {r.id for r in _content(s.stub, "sim2")}

    s.stub.RemoveItem(pb.ItemRequest(item_id=fresh), metadata=ADMIN_AUTH)
    assert fresh not in {r.id for r in _content(s.stub, "sim")}  # at once (the request filter)
    _wait_for(lambda: fresh not in s.service.fresh.index.ids)  # and dropped from the index
    s.stub.RestoreItem(pb.ItemRequest(item_id=fresh), metadata=ADMIN_AUTH)
    _wait_for(lambda: fresh in {r.id for r in _content(s.stub, "sim")})


def test_below_min_interactions_not_served(fresh_server, small_bundle) -> None:
    s = fresh_server(fresh=FoldInConfig(method="mean", min_interactions=N_USERS))
    items = _ids(small_bundle)
    fresh = "almost-fresh"
    _fans(s, items, fresh, N_USERS - 1, "t2")
    _history(s, items, "sim", _taste(items))
    time.sleep(0.5)  # ten polls
    assert fresh not in _registry(s)
    assert fresh not in {r.id for r in _content(s.stub, "sim")}
    _fans(s, items, fresh, 1, "t2-last")
    _wait_for(lambda: fresh in {r.id for r in _content(s.stub, "sim")})


def _with_fresh_block(bundle: Path, out: Path, block) -> Path:
    """A re-manifested copy of ``bundle`` whose manifest carries ``block`` as its fold-in choice."""
    copy = copy_bundle(bundle, out, "fresh-block")
    m = json.loads((copy / MANIFEST).read_text())
    drop = ("format_version", "created", "tower", "files")
    write_manifest(copy, {**{k: v for k, v in m.items() if k not in drop}, "fresh": block})
    return copy


def test_server_uses_the_settings_the_bundle_carries(fresh_server, small_bundle, tmp_path):
    """No --fresh-method: the bundle's manifest block decides (here: eligible from N users)."""
    chosen = {**asdict(RANKABLE), "min_interactions": N_USERS}
    b = _with_fresh_block(small_bundle, tmp_path / "b", {"fold_in": chosen, "source": "test"})
    s = fresh_server(bundle=str(b), fresh=None)
    assert s.service.fresh.settings(s.holder.engine) == FoldInConfig(**chosen)
    items = _ids(small_bundle)
    fresh = "bundle-settings-item"
    _fans(s, items, fresh, N_USERS - 1, "t6")
    _history(s, items, "sim", _taste(items))
    time.sleep(0.3)
    assert fresh not in _registry(s)  # the defaults (min 1) would have published it
    _fans(s, items, fresh, 1, "t6-last")
    _wait_for(lambda: fresh in {r.id for r in _content(s.stub, "sim")})


@pytest.mark.parametrize(
    "block",
    [
        {"fold_in": {"method": "nope"}},
        {"fold_in": {"min_interactions": 0}},
        {"fold_in": {"lam": "100"}},
        {"fold_in": {"unknown_setting": 1}},
        {"fold_in": ["ridge"]},
        "ridge",
    ],
)
def test_malformed_bundle_settings_turn_fresh_items_off(
    fresh_server, small_bundle, tmp_path, block
):
    b = _with_fresh_block(small_bundle, tmp_path / "b", block)
    s = fresh_server(bundle=str(b), fresh=None)
    assert s.service.fresh.settings(s.holder.engine) is None
    items = _ids(small_bundle)
    _history(s, items, "u1", _taste(items))
    assert _log(s.stub, "u1", "some-new-item")  # the write is still acknowledged
    assert _registry(s) == {}
    assert all(r.reason != "fresh" for r in _content(s.stub, "u1"))


def test_replay_and_repeat_do_not_count_a_user_twice(fresh_server, small_bundle) -> None:
    s = fresh_server()
    items = _ids(small_bundle)
    fresh = "replayed-item"
    _history(s, items, "u1", _taste(items))
    first = _log(s.stub, "u1", fresh, rid="req-1")
    assert _registry(s)[fresh]["n"] == 1
    assert _log(s.stub, "u1", fresh, rid="req-1") == first  # a replay: the same event
    _log(s.stub, "u1", fresh)  # a repeat: a second interaction of the same user
    assert _registry(s)[fresh]["n"] == 1
    _history(s, items, "u2", _taste(items))
    _log(s.stub, "u2", fresh)
    assert _registry(s)[fresh]["n"] == 2


def test_cache_never_serves_an_answer_from_before_the_swap(fresh_server, small_bundle) -> None:
    s = fresh_server()
    items = _ids(small_bundle)
    fresh = "cached-item"
    _history(s, items, "sim", _taste(items))
    before = [r.id for r in _content(s.stub, "sim")]
    assert [r.id for r in _content(s.stub, "sim")] == before  # cached (same features)
    assert fresh not in before
    # The fans' writes do not touch sim's features: only the side index version changes.
    _fans(s, items, fresh, N_USERS, "t4")
    _wait_for(lambda: fresh in {r.id for r in _content(s.stub, "sim")})


def test_hot_reload_to_a_bundle_that_knows_the_item(fresh_server, small_bundle, tmp_path) -> None:
    items = _ids(small_bundle)
    fresh = items[-1]  # known to the original bundle: a "retrain" that took the item over
    # The serving bundle before the retrain: the same model without the last item.
    old = tmp_path / "old"
    shutil.copytree(small_bundle, old)
    _drop_last_item(old)
    s = fresh_server(bundle=str(old))
    fans = _fans(s, items[:-1], fresh, N_USERS, "t5")
    assert fans and fresh not in s.holder.engine.item_index
    _wait_for(lambda: s.service.fresh.index is not None and fresh in s.service.fresh.index.ids)
    assert s.holder.load(small_bundle)  # the retrained bundle knows it
    _wait_for(lambda: fresh not in s.service.fresh.index.ids)
    assert s.service.fresh.index.version[2] == s.holder.engine.version


def _tidy(s: FreshServer) -> dict[str, int]:
    """One tidying pass over the registry as it is now, from the test thread."""
    f = s.service.fresh
    _, _, entries, _ = s._call(s.store.afresh_registry())
    return s._call(f.tidy(s.holder.engine, entries))


def _settle(s: FreshServer) -> None:
    f = s.service.fresh
    f.takeover_grace_s = 0.0
    f.lease_s = 1
    time.sleep(1.1)  # any lease an automatic pass took has expired


def test_takeover_retires_the_entry_after_the_grace(fresh_server, small_bundle, tmp_path) -> None:
    items = _ids(small_bundle)
    fresh = items[-1]
    old = tmp_path / "old"
    shutil.copytree(small_bundle, old)
    _drop_last_item(old)
    s = fresh_server(bundle=str(old))
    _fans(s, items[:-1], fresh, N_USERS, "t7")
    assert fresh in _registry(s)
    assert s.holder.load(small_bundle)  # the retrained bundle knows it
    _wait_for(lambda: s.service.fresh.index.version[2] == s.holder.engine.version)
    assert _tidy(s)["taken_over"] == 0  # within the grace: workers may still be on the old one
    assert fresh in _registry(s)
    _settle(s)
    assert _tidy(s)["taken_over"] == 1
    assert fresh not in _registry(s)
    r = redis.Redis.from_url(s.cfg.redis_url)
    ttl = r.ttl(s.store.keys.item("fu", fresh))
    r.close()
    assert 0 < ttl <= s.service.fresh.keep_s  # its users are kept a while, for a rollback


def test_retrain_that_does_not_know_the_item_refolds_it(fresh_server, small_bundle, tmp_path):
    """A new bundle in another vector space that still does not know the item: after the
    grace, one worker recomputes its users' vectors and the item is served again, with no
    new write."""
    s = fresh_server()
    items = _ids(small_bundle)
    fresh = "survives-a-retrain"
    _fans(s, items, fresh, N_USERS, "t8")
    _history(s, items, "sim", _taste(items))
    _wait_for(lambda: fresh in {r.id for r in _content(s.stub, "sim")})
    first = s.holder.engine.version
    assert _registry(s)[fresh]["b"] == first
    retrained = copy_bundle(small_bundle, tmp_path / "retrained", "retrained-without-it")
    assert s.holder.load(retrained)
    _wait_for(lambda: s.service.fresh.index.version[2] == "retrained-without-it")
    assert fresh not in s.service.fresh.index.ids  # a row of the previous bundle's space
    _settle(s)
    assert _tidy(s)["refolded"] == 1
    e = _registry(s)[fresh]
    assert e["b"] == "retrained-without-it" and e["n"] == N_USERS
    _wait_for(lambda: fresh in {r.id for r in _content(s.stub, "sim")})


def test_an_item_with_no_interaction_for_max_age_expires(fresh_server, small_bundle) -> None:
    """The poller's own tidying (no registry change needed) retires an expired entry."""
    s = fresh_server()
    f = s.service.fresh
    items = _ids(small_bundle)
    fresh = "expiring-item"
    _fans(s, items, fresh, N_USERS, "t9")
    _wait_for(lambda: f.index is not None and fresh in f.index.ids)
    assert _tidy(s)["expired"] == 0
    f.tidy_every_s, f.max_age_s = 0.1, 0.0
    _wait_for(lambda: fresh not in _registry(s))
    _wait_for(lambda: fresh not in f.index.ids)


def _drop_last_item(bundle: Path) -> None:
    """Rewrite a bundle copy without its last item (ids, index, counts), re-checksummed."""
    import faiss
    import numpy as np

    ids = _ids(bundle)
    index = faiss.read_index(str(bundle / "items.faiss"))
    rows = index.reconstruct_n(0, index.ntotal)[:-1]
    flat = faiss.IndexFlatIP(index.d)
    flat.add(np.ascontiguousarray(rows))
    faiss.write_index(flat, str(bundle / "items.faiss"))
    (bundle / "item_ids.txt").write_text("".join(i + "\n" for i in ids[:-1]))
    pop = np.load(bundle / "popular_items.npy")
    np.save(bundle / "popular_items.npy", pop[pop < len(ids) - 1].astype(np.int32))
    m = json.loads((bundle / MANIFEST).read_text())
    m["counts"]["items"] = len(ids) - 1
    drop = ("format_version", "created", "tower", "files")
    m = {k: v for k, v in m.items() if k not in drop}
    m["bundle_version"] = "without-last-item"
    write_manifest(bundle, m)


def test_bundle_without_prior_serves_with_fresh_items_off(fresh_server, small_bundle, tmp_path):
    bare = copy_bundle(small_bundle, tmp_path / "bare", "no-prior")
    (bare / "fresh_prior.npz").unlink()
    m = json.loads((bare / MANIFEST).read_text())
    drop = ("format_version", "created", "tower", "files")
    write_manifest(bare, {k: v for k, v in m.items() if k not in drop})
    s = fresh_server(bundle=str(bare))
    assert s.holder.engine.fresh_prior is None
    items = _ids(small_bundle)
    _history(s, items, "u1", _taste(items))
    assert _log(s.stub, "u1", "unknown-item")  # acknowledged with its event id
    assert s.store.read("u1").history[0][0] == "unknown-item"  # and recorded
    assert _registry(s) == {}
    assert all(r.reason != "fresh" for r in _content(s.stub, "u1"))


def test_fresh_step_failure_leaves_the_write_acknowledged(fresh_server, small_bundle) -> None:
    """A real failure of the fresh step: the item's fresh keys hold the wrong type."""
    s = fresh_server()
    items = _ids(small_bundle)
    fresh = "broken-item"
    r = redis.Redis.from_url(s.cfg.redis_url)
    r.set(s.store.keys.item("fu", fresh), "not a zset")
    r.close()
    _history(s, items, "u1", _taste(items))
    before = s.metrics.fresh_errors.labels("write")._value.get()
    assert _log(s.stub, "u1", fresh)
    assert s.store.read("u1").history[0][0] == fresh
    assert s.metrics.fresh_errors.labels("write")._value.get() == before + 1
    assert fresh not in _registry(s)


@pytest.mark.slow
def test_fresh_items_on_a_redis_cluster(server_config, redis_cluster, small_bundle) -> None:
    cfg = replace(
        server_config,
        redis_url=redis_cluster.url,
        redis_cluster=True,
        fresh_poll_s=0.05,
        fresh=RANKABLE,
    )
    s = FreshServer(cfg, metrics=True)
    try:
        items = _ids(small_bundle)
        fresh = "cluster{fresh}item"
        _fans(s, items, fresh, N_USERS, "c{1}")
        _history(s, items, "sim{c}", _taste(items))
        _wait_for(lambda: fresh in {r.id for r in _content(s.stub, "sim{c}")})
        assert _registry(s)[fresh]["n"] == N_USERS
    finally:
        s.close()


@pytest.mark.slow
def test_served_by_a_multi_worker_server_and_off_with_the_flag(
    small_bundle, redis_server, tmp_path
) -> None:
    """The real `socialrec serve` (two workers, each polling): served within the deadline,
    counted in socialrec_fresh_items; with --no-fresh-items the same writes serve nothing."""
    import urllib.request
    import uuid

    from socialrec.serving.harness import ServerProcess

    from socialrec.v1 import recommender_pb2_grpc as pb_grpc

    token = tmp_path / "token"
    token.write_text(TOKEN)
    items = _ids(small_bundle)
    for extra, served in (([], True), (["--no-fresh-items"], False)):
        ns = f"fresh-{uuid.uuid4().hex[:8]}"
        args = ["--bundle", str(small_bundle), "--redis-url", redis_server.url, "--namespace", ns]
        args += ["--token-file", str(token), "--workers", "2", "--fresh-method", "mean", *extra]
        with ServerProcess(args, metrics=True) as server:
            stub = pb_grpc.RecommenderStub(server.channel())
            fresh = "subprocess-fresh"
            for j in range(N_USERS + 1):
                user = f"fan{j}" if j < N_USERS else "sim"
                for t, item in enumerate(_taste(items)):
                    _log(stub, user, item, ts=1000 + t)
                if j < N_USERS:
                    assert _log(stub, user, fresh)  # acknowledged either way
            if served:
                _wait_for(lambda s=stub, f=fresh: f in {r.id for r in _content(s, "sim")})
                text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
                gauge = [ln for ln in text.splitlines() if ln.startswith("socialrec_fresh_items")]
                assert gauge and float(gauge[0].split()[-1]) >= 1
            else:
                time.sleep(1.0)
                assert fresh not in {r.id for r in _content(stub, "sim")}
