"""The servicer over a Redis Cluster (3 primaries + 3 replicas on loopback), in-process: the
same answers and controls as on a single Redis. Slow tier (the cluster fixture)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from socialrec.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.slow

TOKEN = "in-process-token"  # tests/serving/conftest.py
ADMIN = "admin-token-for-tests"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
ADMIN_AUTH = (("authorization", f"Bearer {ADMIN}"),)


def _ids(bundle: Path, name: str) -> list[str]:
    return (bundle / name).read_text().split("\n")[:-1]


@pytest.fixture
def cluster_server(server_config, redis_cluster, inproc):
    cfg = replace(server_config, redis_url=redis_cluster.url, redis_cluster=True, admin_token=ADMIN)
    return inproc(cfg)


def test_reads_writes_and_controls_on_a_cluster(cluster_server, small_bundle) -> None:
    s = cluster_server
    items, users = _ids(small_bundle, "item_ids.txt"), _ids(small_bundle, "user_ids.txt")
    cold = s.stub.RecommendContent(pb.RecommendContentRequest(user_id="new{user}", k=10))
    assert cold.cold_start and not cold.degraded and len(cold.items) == 10
    req = pb.LogInteractionRequest(
        user_id="new{user}", item_id=items[0], weight=1.0, request_id="r1"
    )
    first = s.stub.LogInteraction(req, metadata=AUTH).event_id
    assert s.stub.LogInteraction(req, metadata=AUTH).event_id == first  # applied once
    warm = s.stub.RecommendContent(pb.RecommendContentRequest(user_id="new{user}", k=10))
    assert not warm.cold_start and not warm.degraded and items[0] not in {r.id for r in warm.items}

    a, b, c, d = users[20], users[21], users[22], users[23]
    for x, y in ((a, b), (b, c), (b, d)):
        s.stub.AddFriendship(pb.FriendshipRequest(user_id=x, friend_id=y), metadata=AUTH)
    fr = s.stub.RecommendFriends(pb.RecommendFriendsRequest(user_id=a, k=20))
    mutual = {r.id: r.mutual_friends for r in fr.users}
    assert not fr.degraded and mutual.get(c) == 1 and mutual.get(d) == 1 and b not in mutual

    s.stub.BlockUser(pb.BlockRequest(user_id=c, blocked_id=a), metadata=AUTH)
    fr = s.stub.RecommendFriends(pb.RecommendFriendsRequest(user_id=a, k=20))
    assert c not in {r.id for r in fr.users}
    with pytest.raises(grpc.RpcError) as e:
        s.stub.AddFriendship(pb.FriendshipRequest(user_id=a, friend_id=c), metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    target = cold.items[0].id
    s.stub.RemoveItem(pb.ItemRequest(item_id=target), metadata=ADMIN_AUTH)
    again = s.stub.RecommendContent(pb.RecommendContentRequest(user_id="other", k=10))
    assert target not in {r.id for r in again.items} and len(again.items) == 10
