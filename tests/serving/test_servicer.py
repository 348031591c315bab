"""The servicer in-process: a real grpc.aio server on an OS-assigned port, in this test process,
over a real redis-server and a small trained bundle. The fast tier of the server's tests; the
subprocess tier (workers, signals, hot reload, metrics) is tests/serving/test_server.py."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from socialrec.serving.config import ServerConfig
from socialrec.serving.redis_local import find_free_port
from socialrec.serving.servicer import RecommenderService
from socialrec.serving.store import FeatureStore
from socialrec.serving.worker import EngineHolder, build_server, store_config

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc

TOKEN = "in-process-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


class InProcessServer:
    """The servicer behind a started grpc.aio server, on an event loop in a thread of its own."""

    def __init__(self, cfg: ServerConfig, load: bool = True) -> None:
        self.cfg = cfg
        self.holder = EngineHolder(cfg, metrics=None)
        if load:
            assert self.holder.load(Path(cfg.bundle))
        self.store = FeatureStore(store_config(cfg))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server, _, self.port = self._call(self._build())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.RecommenderStub(self.channel)

    async def _build(self):
        service = RecommenderService(self.cfg, self.holder, self.store, None)
        server, health, port = build_server(replace(self.cfg, port=0), service)
        await server.start()
        return server, health, port

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        self.channel.close()
        self._call(self.server.stop(grace=None))
        self._call(self.store.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.store.close()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A small trained run's fp32 bundle."""
    from socialrec.compression.export import export_run
    from socialrec.training.data import DataConfig
    from socialrec.training.run import RunConfig, run
    from socialrec.training.train import TrainConfig

    out = tmp_path_factory.mktemp("run")
    data = DataConfig(synthetic_users=300, synthetic_items=200, synthetic_interactions=6000, seed=3)
    cfg = RunConfig(
        out=str(out), data=data, train=TrainConfig(dim=16, epochs=4, threads=1, refit=False),
        progress=False,
    )  # fmt: skip
    run(cfg)
    export_run(out)
    return out / "bundle"


@pytest.fixture
def cfg(bundle: Path, redis_server) -> ServerConfig:
    ns = f"svc-{uuid.uuid4().hex[:8]}"
    return ServerConfig(
        bundle=str(bundle), redis_url=redis_server.url, namespace=ns, max_k=50, write_token=TOKEN
    )


@pytest.fixture(params=["resp", "redis-py"])
def server(request, cfg: ServerConfig) -> Iterator[InProcessServer]:
    s = InProcessServer(replace(cfg, redis_client=request.param))
    yield s
    s.close()


def _users(bundle: Path) -> list[str]:
    return (bundle / "user_ids.txt").read_text().split("\n")[:50]


def _items(bundle: Path) -> list[str]:
    return (bundle / "item_ids.txt").read_text().split("\n")[:50]


def test_content_for_a_new_user_follows_their_writes(server: InProcessServer, bundle) -> None:
    stub, items = server.stub, _items(bundle)
    cold = stub.RecommendContent(pb.RecommendContentRequest(user_id="newcomer", k=10))
    assert cold.cold_start and len(cold.items) == 10
    assert all(r.reason == "popular" for r in cold.items)
    for item in items[:5]:
        stub.LogInteraction(
            pb.LogInteractionRequest(user_id="newcomer", item_id=item, weight=1.0), metadata=AUTH
        )
    warm = stub.RecommendContent(pb.RecommendContentRequest(user_id="newcomer", k=10))
    assert not warm.cold_start and not warm.degraded and len(warm.items) == 10
    assert not {r.id for r in warm.items} & set(items[:5])  # seen items are left out
    assert all(r.reason == "similar_taste" for r in warm.items)
    scores = [r.score for r in warm.items]
    assert scores == sorted(scores, reverse=True)


def test_friends_never_self_or_current_friends(server: InProcessServer, bundle) -> None:
    stub, users = server.stub, _users(bundle)
    me, friends = users[0], users[1:4]
    for f in friends:
        stub.AddFriendship(pb.FriendshipRequest(user_id=me, friend_id=f), metadata=AUTH)
    stub.AddFriendship(pb.FriendshipRequest(user_id=friends[0], friend_id=users[9]), metadata=AUTH)
    res = stub.RecommendFriends(pb.RecommendFriendsRequest(user_id=me, k=20))
    got = [r.id for r in res.users]
    assert len(got) == 20 and me not in got and not set(friends) & set(got)
    mutual = {r.id: r for r in res.users if r.mutual_friends > 0}
    assert users[9] in mutual and mutual[users[9]].reason == "mutual_friends"


def test_a_repeat_is_answered_the_same_and_a_write_is_seen_at_once(
    server: InProcessServer, bundle
) -> None:
    stub, items = server.stub, _items(bundle)
    req = pb.RecommendContentRequest(user_id="u-cache", k=8)
    stub.LogInteraction(
        pb.LogInteractionRequest(user_id="u-cache", item_id=items[0], weight=2.0), metadata=AUTH
    )
    first = stub.RecommendContent(req)
    assert stub.RecommendContent(req) == first  # a cache hit gives the same answer
    live = server.holder.live
    assert live is not None and live.cache is not None and len(live.cache) >= 1
    shown = first.items[0].id
    stub.LogInteraction(
        pb.LogInteractionRequest(user_id="u-cache", item_id=shown, weight=1.0), metadata=AUTH
    )
    after = stub.RecommendContent(req)
    assert shown not in {r.id for r in after.items}  # the very next read sees the write


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.RecommendContent(pb.RecommendContentRequest(user_id="u", k=0)),
        lambda s: s.RecommendContent(pb.RecommendContentRequest(user_id="u", k=51)),
        lambda s: s.RecommendFriends(pb.RecommendFriendsRequest(user_id="", k=5)),
        lambda s: s.RecommendContent(pb.RecommendContentRequest(user_id="x" * 257, k=5)),
        lambda s: s.LogInteraction(
            pb.LogInteractionRequest(user_id="u", item_id="i", weight=float("nan")), metadata=AUTH
        ),
        lambda s: s.LogInteraction(
            pb.LogInteractionRequest(user_id="u", item_id="i", weight=1.0, timestamp_ms=-1),
            metadata=AUTH,
        ),
        lambda s: s.AddFriendship(pb.FriendshipRequest(user_id="a", friend_id="a"), metadata=AUTH),
    ],
)
def test_bad_requests_are_invalid_argument(server: InProcessServer, call) -> None:
    with pytest.raises(grpc.RpcError) as e:
        call(server.stub)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_writes_need_the_token(server: InProcessServer) -> None:
    req = pb.LogInteractionRequest(user_id="u", item_id="i", weight=1.0)
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
        with pytest.raises(grpc.RpcError) as e:
            server.stub.LogInteraction(req, metadata=metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_no_token_means_writes_disabled(cfg: ServerConfig, monkeypatch) -> None:
    monkeypatch.delenv("SOCIALREC_WRITE_TOKEN", raising=False)
    s = InProcessServer(replace(cfg, write_token=None))
    try:
        with pytest.raises(grpc.RpcError) as e:
            s.stub.AddFriendship(pb.FriendshipRequest(user_id="a", friend_id="b"), metadata=AUTH)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "writes are disabled" in e.value.details()
    finally:
        s.close()


def test_no_bundle_yet_is_unavailable(cfg: ServerConfig) -> None:
    s = InProcessServer(cfg, load=False)
    try:
        with pytest.raises(grpc.RpcError) as e:
            s.stub.RecommendContent(pb.RecommendContentRequest(user_id="u", k=5))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.close()


def test_redis_down_reads_degrade_and_writes_fail_loudly(cfg: ServerConfig) -> None:
    dead = f"redis://127.0.0.1:{find_free_port()}/0"  # nothing listens there
    s = InProcessServer(replace(cfg, redis_url=dead))
    try:
        res = s.stub.RecommendContent(pb.RecommendContentRequest(user_id="u", k=5))
        assert res.degraded and res.cold_start and len(res.items) == 5
        fr = s.stub.RecommendFriends(pb.RecommendFriendsRequest(user_id="u", k=5))
        assert fr.degraded and len(fr.users) == 5
        with pytest.raises(grpc.RpcError) as e:
            s.stub.LogInteraction(
                pb.LogInteractionRequest(user_id="u", item_id="i", weight=1.0), metadata=AUTH
            )
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.close()
