"""Fuzz tier: Hypothesis drives every request field, and raw bytes, at the in-process server.
Whatever arrives, the answer is OK or one of the documented statuses (never UNKNOWN), and the
server stays healthy and correct afterwards."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socialrec.v1 import recommender_pb2 as pb

TOKEN = "in-process-token"  # tests/serving/conftest.py
CONTRACT = {
    grpc.StatusCode.OK,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
METHODS = ["RecommendContent", "RecommendFriends", "LogInteraction", "AddFriendship",
           "RemoveFriendship", "Dismiss", "BlockUser", "UnblockUser", "RemoveItem",
           "RestoreItem"]  # fmt: skip

ids = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["u1", "i1", "", " ", "\x00", "a\u200bb", "e\u0301", "é", "x" * 257]),
)
ints = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, 50, 51, -1]))
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
times = st.one_of(st.integers(-(2**63), 2**63 - 1), st.just(0))
auth = st.sampled_from([(), (("authorization", f"Bearer {TOKEN}"),), (("authorization", "x"),)])
id_lists = st.lists(ids, max_size=5) | st.just([f"i{j}" for j in range(1001)])

requests = st.one_of(
    st.builds(
        lambda u, k, x: ("RecommendContent",
                         pb.RecommendContentRequest(user_id=u, k=k, exclude_ids=x)),
        ids, ints, id_lists,
    ),
    st.builds(
        lambda u, k, x: ("RecommendFriends",
                         pb.RecommendFriendsRequest(user_id=u, k=k, exclude_ids=x)),
        ids, ints, id_lists,
    ),
    st.builds(
        lambda u, i, o, r: ("Dismiss",
                            pb.DismissRequest(user_id=u, item_id=i, other_user_id=o, request_id=r)),
        ids, ids, ids, ids,
    ),
    st.builds(
        lambda m, u, b, r: (m, pb.BlockRequest(user_id=u, blocked_id=b, request_id=r)),
        st.sampled_from(["BlockUser", "UnblockUser"]), ids, ids, ids,
    ),
    st.builds(
        lambda m, i, r: (m, pb.ItemRequest(item_id=i, request_id=r)),
        st.sampled_from(["RemoveItem", "RestoreItem"]), ids, ids,
    ),
    st.builds(
        lambda u, i, w, t, r: (
            "LogInteraction",
            pb.LogInteractionRequest(user_id=u, item_id=i, weight=w, timestamp_ms=t, request_id=r),
        ),
        ids, ids, floats, times, ids,
    ),
    st.builds(
        lambda m, u, f, r: (m, pb.FriendshipRequest(user_id=u, friend_id=f, request_id=r)),
        st.sampled_from(["AddFriendship", "RemoveFriendship"]), ids, ids, ids,
    ),
)  # fmt: skip


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() in CONTRACT, (e.code(), e.details())
        assert "Traceback" not in (e.details() or "") and "<class" not in (e.details() or "")
        return e.code()
    return grpc.StatusCode.OK


def _healthy(server) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="")).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    res = server.stub.RecommendContent(pb.RecommendContentRequest(user_id="u1", k=5))
    assert len(res.items) == 5


@SETTINGS
@given(req=requests, metadata=auth)
def test_any_field_values_get_a_contract_status(module_server, req, metadata) -> None:
    method, message = req
    code = _code(
        lambda: getattr(module_server.stub, method)(message, metadata=metadata, timeout=10)
    )
    if code == grpc.StatusCode.OK and method.startswith("Recommend"):
        assert 1 <= message.k <= 50


@SETTINGS
@given(method=st.sampled_from(METHODS), data=st.binary(max_size=2000), metadata=auth)
def test_any_bytes_get_a_contract_status(module_server, method, data, metadata) -> None:
    call = module_server.channel.unary_unary(f"/socialrec.v1.Recommender/{method}")
    _code(lambda: call(data, metadata=metadata, timeout=10))


def test_still_healthy_and_nothing_answered_unknown(module_server) -> None:
    """Runs after the fuzzing above in the same module server."""
    _healthy(module_server)
    for method in METHODS:
        for code in ("UNKNOWN", "INTERNAL"):
            assert module_server.count(method, code) == 0, (method, code)
