"""The servicer in-process (tests/serving/conftest.py): a real grpc.aio server on an OS-assigned
port, in this test process, over a real redis-server and a small trained bundle. The fast tier
of the server's tests; the subprocess tier (workers, signals, hot reload, metrics) is
tests/serving/test_server.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from socialrec.serving.config import ServerConfig
from socialrec.serving.redis_local import find_free_port

from socialrec.v1 import recommender_pb2 as pb

TOKEN = "in-process-token"  # the write token of tests/serving/conftest.py's server_config
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture
def bundle(small_bundle: Path) -> Path:
    return small_bundle


@pytest.fixture
def cfg(server_config: ServerConfig) -> ServerConfig:
    return server_config


@pytest.fixture(params=["resp", "redis-py"])
def server(request, cfg: ServerConfig, inproc):
    return inproc(replace(cfg, redis_client=request.param))


def _users(bundle: Path) -> list[str]:
    return (bundle / "user_ids.txt").read_text().split("\n")[:50]


def _items(bundle: Path) -> list[str]:
    return (bundle / "item_ids.txt").read_text().split("\n")[:50]


def test_content_for_a_new_user_follows_their_writes(server, bundle) -> None:
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


def test_friends_never_self_or_current_friends(server, bundle) -> None:
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


def test_a_repeat_is_answered_the_same_and_a_write_is_seen_at_once(server, bundle) -> None:
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
def test_bad_requests_are_invalid_argument(server, call) -> None:
    with pytest.raises(grpc.RpcError) as e:
        call(server.stub)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_writes_need_the_token(server) -> None:
    req = pb.LogInteractionRequest(user_id="u", item_id="i", weight=1.0)
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
        with pytest.raises(grpc.RpcError) as e:
            server.stub.LogInteraction(req, metadata=metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_no_token_means_writes_disabled(cfg: ServerConfig, inproc, monkeypatch) -> None:
    monkeypatch.delenv("SOCIALREC_WRITE_TOKEN", raising=False)
    s = inproc(replace(cfg, write_token=None))
    with pytest.raises(grpc.RpcError) as e:
        s.stub.AddFriendship(pb.FriendshipRequest(user_id="a", friend_id="b"), metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "writes are disabled" in e.value.details()


def test_no_bundle_yet_is_unavailable(cfg: ServerConfig, inproc) -> None:
    s = inproc(cfg, load=False)
    with pytest.raises(grpc.RpcError) as e:
        s.stub.RecommendContent(pb.RecommendContentRequest(user_id="u", k=5))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_redis_down_reads_degrade_and_writes_fail_loudly(cfg: ServerConfig, inproc) -> None:
    dead = f"redis://127.0.0.1:{find_free_port()}/0"  # nothing listens there
    s = inproc(replace(cfg, redis_url=dead))
    res = s.stub.RecommendContent(pb.RecommendContentRequest(user_id="u", k=5))
    assert res.degraded and res.cold_start and len(res.items) == 5
    fr = s.stub.RecommendFriends(pb.RecommendFriendsRequest(user_id="u", k=5))
    assert fr.degraded and len(fr.users) == 0  # blocks unknown: no suggestion is safe
    with pytest.raises(grpc.RpcError) as e:
        s.stub.LogInteraction(
            pb.LogInteractionRequest(user_id="u", item_id="i", weight=1.0), metadata=AUTH
        )
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
