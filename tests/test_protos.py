"""The gRPC wire contract: committed stubs are fresh, messages round-trip, service shape is fixed."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent

EXPECTED_FIELDS = {
    "Recommendation": {"id", "score", "reason", "mutual_friends"},
    "RecommendContentRequest": {"user_id", "k", "exclude_ids"},
    "RecommendContentResponse": {"items", "bundle_version", "cold_start", "degraded"},
    "RecommendFriendsRequest": {"user_id", "k", "exclude_ids"},
    "RecommendFriendsResponse": {"users", "bundle_version", "cold_start", "degraded"},
    "LogInteractionRequest": {"user_id", "item_id", "weight", "timestamp_ms", "request_id"},
    "LogInteractionResponse": {"event_id"},
    "FriendshipRequest": {"user_id", "friend_id", "request_id"},
    "FriendshipResponse": {"event_id"},
    "DismissRequest": {"user_id", "item_id", "other_user_id", "request_id"},
    "DismissResponse": {"event_id"},
    "BlockRequest": {"user_id", "blocked_id", "request_id"},
    "BlockResponse": {"event_id"},
    "ItemRequest": {"item_id", "request_id"},
    "ItemResponse": {"event_id"},
}

EXPECTED_METHODS = {
    "RecommendContent": ("RecommendContentRequest", "RecommendContentResponse"),
    "RecommendFriends": ("RecommendFriendsRequest", "RecommendFriendsResponse"),
    "LogInteraction": ("LogInteractionRequest", "LogInteractionResponse"),
    "AddFriendship": ("FriendshipRequest", "FriendshipResponse"),
    "RemoveFriendship": ("FriendshipRequest", "FriendshipResponse"),
    "Dismiss": ("DismissRequest", "DismissResponse"),
    "BlockUser": ("BlockRequest", "BlockResponse"),
    "UnblockUser": ("BlockRequest", "BlockResponse"),
    "RemoveItem": ("ItemRequest", "ItemResponse"),
    "RestoreItem": ("ItemRequest", "ItemResponse"),
}


def test_generated_code_is_up_to_date():
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_and_file():
    assert pb.DESCRIPTOR.package == "socialrec.v1"
    assert pb.DESCRIPTOR.name == "socialrec/v1/recommender.proto"


@pytest.mark.parametrize("name", sorted(EXPECTED_FIELDS))
def test_message_fields(name):
    descriptor = pb.DESCRIPTOR.message_types_by_name[name]
    assert {f.name for f in descriptor.fields} == EXPECTED_FIELDS[name]


def test_field_numbers_are_stable():
    # Renumbering a field breaks every deployed client; pin the originals.
    numbers = {
        "Recommendation": {"id": 1, "score": 2, "reason": 3},
        "RecommendContentRequest": {"user_id": 1, "k": 2},
        "RecommendFriendsRequest": {"user_id": 1, "k": 2},
        "LogInteractionRequest": {
            "user_id": 1, "item_id": 2, "weight": 3, "timestamp_ms": 4, "request_id": 5,
        },
        "FriendshipRequest": {"user_id": 1, "friend_id": 2, "request_id": 3},
        "DismissRequest": {"user_id": 1, "item_id": 2, "other_user_id": 3, "request_id": 4},
        "BlockRequest": {"user_id": 1, "blocked_id": 2, "request_id": 3},
        "ItemRequest": {"item_id": 1, "request_id": 2},
    }  # fmt: skip
    for message, fields in numbers.items():
        by_name = pb.DESCRIPTOR.message_types_by_name[message].fields_by_name
        assert {name: by_name[name].number for name in fields} == fields, message


def _roundtrip(msg):
    parsed = type(msg).FromString(msg.SerializeToString())
    assert parsed == msg
    return parsed


def test_recommend_content_roundtrip():
    req = _roundtrip(pb.RecommendContentRequest(user_id="u1", k=10))
    assert (req.user_id, req.k) == ("u1", 10)

    resp = _roundtrip(
        pb.RecommendContentResponse(
            items=[
                pb.Recommendation(id="i1", score=0.75, reason="model"),
                pb.Recommendation(id="i2", score=0.5, reason="popular"),
            ],
            bundle_version="2024-01-01T00:00:00Z-abc123",
            cold_start=True,
            degraded=True,
        )
    )
    assert [r.id for r in resp.items] == ["i1", "i2"]
    assert resp.items[0].score == pytest.approx(0.75)
    assert resp.items[1].reason == "popular"
    assert resp.bundle_version == "2024-01-01T00:00:00Z-abc123"
    assert resp.cold_start is True and resp.degraded is True


def test_recommend_friends_roundtrip():
    req = _roundtrip(pb.RecommendFriendsRequest(user_id="u1", k=5))
    assert (req.user_id, req.k) == ("u1", 5)

    resp = _roundtrip(
        pb.RecommendFriendsResponse(
            users=[
                pb.Recommendation(id="u2", score=1.25, reason="mutual_friends", mutual_friends=3)
            ],
            bundle_version="v7",
            cold_start=False,
            degraded=True,
        )
    )
    assert resp.users[0].id == "u2"
    assert resp.users[0].mutual_friends == 3
    assert resp.users[0].score == pytest.approx(1.25)
    assert resp.bundle_version == "v7"
    assert resp.cold_start is False and resp.degraded is True


def test_log_interaction_roundtrip():
    ts = 1_700_000_000_123  # needs int64, not int32
    req = _roundtrip(
        pb.LogInteractionRequest(user_id="u1", item_id="i9", weight=2.5, timestamp_ms=ts)
    )
    assert (req.user_id, req.item_id, req.timestamp_ms) == ("u1", "i9", ts)
    assert req.weight == pytest.approx(2.5)

    # Non-finite weights survive the wire; rejecting them is the server's job.
    nan = pb.LogInteractionRequest.FromString(
        pb.LogInteractionRequest(user_id="u", item_id="i", weight=math.nan).SerializeToString()
    )
    assert math.isnan(nan.weight)

    resp = _roundtrip(pb.LogInteractionResponse(event_id="1700000000123-0"))
    assert resp.event_id == "1700000000123-0"


def test_friendship_roundtrip():
    req = _roundtrip(pb.FriendshipRequest(user_id="a", friend_id="b"))
    assert (req.user_id, req.friend_id) == ("a", "b")
    assert pb.FriendshipResponse().SerializeToString() == b""
    _roundtrip(pb.FriendshipResponse())


def test_defaults_are_proto3_zero_values():
    req = pb.RecommendContentRequest()
    assert (req.user_id, req.k) == ("", 0)
    assert req.SerializeToString() == b""


def test_service_has_exactly_these_methods():
    service = pb.DESCRIPTOR.services_by_name["Recommender"]
    assert service.full_name == "socialrec.v1.Recommender"
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == EXPECTED_METHODS
    for m in service.methods:
        assert not m.client_streaming and not m.server_streaming, m.name


def test_grpc_stubs_expose_the_methods():
    for name in EXPECTED_METHODS:
        assert callable(getattr(pb_grpc.RecommenderServicer, name))
    assert callable(pb_grpc.add_RecommenderServicer_to_server)

    class _FakeChannel:
        def unary_unary(self, path, *args, **kwargs):
            return path

    stub = pb_grpc.RecommenderStub(_FakeChannel())
    for name in EXPECTED_METHODS:
        assert getattr(stub, name) == f"/socialrec.v1.Recommender/{name}"
