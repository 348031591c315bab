"""Feed controls against a real server and Redis: seen is everything, dismissals, blocks in both
directions, takedowns for everyone (two servers, a restart), per-request exclusions, and still k
answers after filtering."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from socialrec.serving.harness import ServerProcess
from socialrec.serving.redis_local import start_redis

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc

TOKEN = "in-process-token"  # tests/serving/conftest.py
ADMIN = "admin-token-for-tests"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
ADMIN_AUTH = (("authorization", f"Bearer {ADMIN}"),)


def _ids(bundle: Path, name: str) -> list[str]:
    return (bundle / name).read_text().split("\n")[:-1]


@pytest.fixture
def cfg(server_config):
    return replace(server_config, admin_token=ADMIN)


def _content(stub, user: str, k: int = 20, exclude=()) -> list[str]:
    req = pb.RecommendContentRequest(user_id=user, k=k, exclude_ids=list(exclude))
    return [r.id for r in stub.RecommendContent(req).items]


def _friends(stub, user: str, k: int = 20, exclude=()) -> list[str]:
    req = pb.RecommendFriendsRequest(user_id=user, k=k, exclude_ids=list(exclude))
    return [r.id for r in stub.RecommendFriends(req).users]


def test_seen_is_everything_not_the_capped_history(cfg, inproc, small_bundle) -> None:
    s = inproc(replace(cfg, history_cap=8))
    items = _ids(small_bundle, "item_ids.txt")
    # The most popular items first: exactly what a recommender would like to show again.
    popular = _content(s.stub, "fresh-user", k=40)
    for t, item in enumerate(popular[:30]):
        s.stub.LogInteraction(
            pb.LogInteractionRequest(user_id="heavy", item_id=item, weight=1.0, timestamp_ms=1 + t),
            metadata=AUTH,
        )
    got = _content(s.stub, "heavy", k=20)
    assert len(got) == 20
    assert not set(got) & set(popular[:30])  # none of the 30, though only 8 are in history
    assert len(items) >= 50


def test_exclusions_still_give_k_answers_and_are_bounded(cfg, inproc, small_bundle) -> None:
    s = inproc(cfg)
    items = _ids(small_bundle, "item_ids.txt")
    s.stub.LogInteraction(
        pb.LogInteractionRequest(user_id="pager", item_id=items[0], weight=1.0), metadata=AUTH
    )
    first = _content(s.stub, "pager", k=10)
    excluded = [i for i in items if i != items[0]][: len(items) - 40]  # leave ~40 candidates
    got = _content(s.stub, "pager", k=20, exclude=excluded)
    assert len(got) == 20 and not set(got) & set(excluded) and items[0] not in got
    page2 = _content(s.stub, "pager", k=10, exclude=first)
    assert len(page2) == 10 and not set(page2) & set(first)
    users = _ids(small_bundle, "user_ids.txt")
    fr = _friends(s.stub, users[0], k=10, exclude=users[1:150])
    assert len(fr) == 10 and not set(fr) & set(users[1:150])
    with pytest.raises(grpc.RpcError) as e:
        _content(s.stub, "pager", exclude=[f"x{i}" for i in range(1001)])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_dismissed_items_and_people_never_come_back(cfg, inproc, small_bundle) -> None:
    s = inproc(cfg)
    users = _ids(small_bundle, "user_ids.txt")
    me = users[3]
    top = _content(s.stub, me, k=5)
    s.stub.Dismiss(pb.DismissRequest(user_id=me, item_id=top[0]), metadata=AUTH)
    after = _content(s.stub, me, k=20)
    assert top[0] not in after and len(after) == 20
    people = _friends(s.stub, me, k=5)
    s.stub.Dismiss(pb.DismissRequest(user_id=me, other_user_id=people[0]), metadata=AUTH)
    assert people[0] not in _friends(s.stub, me, k=20)
    for bad in (
        pb.DismissRequest(user_id=me),
        pb.DismissRequest(user_id=me, item_id="a", other_user_id="b"),
        pb.DismissRequest(user_id=me, other_user_id=me),
    ):
        with pytest.raises(grpc.RpcError) as e:
            s.stub.Dismiss(bad, metadata=AUTH)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        s.stub.Dismiss(pb.DismissRequest(user_id=me, item_id="a"))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_blocks_hold_in_both_directions(cfg, inproc, small_bundle) -> None:
    s = inproc(cfg)
    users = _ids(small_bundle, "user_ids.txt")
    a, b, c = users[10], users[11], users[12]
    for x, y in ((a, b), (a, c), (c, b)):
        s.stub.AddFriendship(pb.FriendshipRequest(user_id=x, friend_id=y), metadata=AUTH)
    # b blocks a: their friendship goes, and neither is suggested to the other, even though
    # they still share the mutual friend c.
    s.stub.BlockUser(pb.BlockRequest(user_id=b, blocked_id=a), metadata=AUTH)
    for me, other in ((a, b), (b, a)):
        res = s.stub.RecommendFriends(pb.RecommendFriendsRequest(user_id=me, k=50))
        assert other not in {r.id for r in res.users}
    for x, y in ((a, b), (b, a)):
        with pytest.raises(grpc.RpcError) as e:
            s.stub.AddFriendship(pb.FriendshipRequest(user_id=x, friend_id=y), metadata=AUTH)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # A friend-of-friend reached only through the blocked user: not suggested through them.
    d = users[13]
    s.stub.AddFriendship(pb.FriendshipRequest(user_id=b, friend_id=d), metadata=AUTH)
    mutual = {r.id: r.mutual_friends for r in s.stub.RecommendFriends(
        pb.RecommendFriendsRequest(user_id=a, k=50)).users}  # fmt: skip
    assert mutual.get(d, 0) == 0
    s.stub.UnblockUser(pb.BlockRequest(user_id=b, blocked_id=a), metadata=AUTH)
    s.stub.AddFriendship(pb.FriendshipRequest(user_id=a, friend_id=b), metadata=AUTH)


def test_takedown_needs_admin_and_applies_to_everyone(cfg, inproc, small_bundle) -> None:
    one, two = inproc(cfg), inproc(cfg)  # two servers over one Redis, like two workers
    users = _ids(small_bundle, "user_ids.txt")
    popular = _content(one.stub, "cold-start-user", k=10)
    target = popular[0]
    holders = [u for u in users[:40] if target in _content(one.stub, u, k=20)]
    req = pb.ItemRequest(item_id=target)
    for md, code in (
        (AUTH, grpc.StatusCode.PERMISSION_DENIED),
        ((), grpc.StatusCode.UNAUTHENTICATED),
    ):
        with pytest.raises(grpc.RpcError) as e:
            one.stub.RemoveItem(req, metadata=md)
        assert e.value.code() == code
    one.stub.RemoveItem(req, metadata=ADMIN_AUTH)
    for s in (one, two):  # the very next read of any server, cached answers included
        assert target not in _content(s.stub, "cold-start-user", k=10)
        for u in holders:
            got = _content(s.stub, u, k=20)
            assert target not in got and len(got) == 20
    two.stub.RestoreItem(req, metadata=ADMIN_AUTH)
    assert target in _content(one.stub, "cold-start-user", k=10)


def test_degraded_answers_keep_takedowns(cfg, inproc, tmp_path) -> None:
    with start_redis(dir=tmp_path, appendonly=False) as r:
        s = inproc(replace(cfg, redis_url=r.url))
        target = _content(s.stub, "nobody", k=5)[0]
        s.stub.RemoveItem(pb.ItemRequest(item_id=target), metadata=ADMIN_AUTH)
        assert target not in _content(s.stub, "nobody", k=5)  # the worker now knows the set
        r.kill()  # Redis gone: answers degrade, the known takedowns still apply
        res = s.stub.RecommendContent(pb.RecommendContentRequest(user_id="nobody", k=5))
        assert res.degraded and len(res.items) == 5 and target not in {x.id for x in res.items}


def test_a_degraded_friend_answer_never_suggests_a_blocked_user(cfg, inproc, tmp_path) -> None:
    """The user blocks the best-connected user, then Redis goes away: the friend answer is
    degraded and empty (the server cannot see blocks without the store; the popular list it
    used to fall back on held the blocked user)."""
    with start_redis(dir=tmp_path, appendonly=False) as r:
        s = inproc(replace(cfg, redis_url=r.url))
        top = _friends(s.stub, "new-user", k=5)[0]  # cold start: the popular list
        s.stub.BlockUser(pb.BlockRequest(user_id="new-user", blocked_id=top), metadata=AUTH)
        assert top not in _friends(s.stub, "new-user", k=5)
        r.kill()
        res = s.stub.RecommendFriends(pb.RecommendFriendsRequest(user_id="new-user", k=5))
        assert res.degraded and top not in {u.id for u in res.users}
        assert len(res.users) == 0


@pytest.mark.slow
def test_takedown_reaches_both_workers_within_a_second_and_survives_restart(
    small_bundle, redis_server, server_config
) -> None:
    ns = server_config.namespace
    args = ["--bundle", str(small_bundle), "--redis-url", redis_server.url, "--namespace", ns,
            "--workers", "2", "--max-k", "50"]  # fmt: skip
    env = {"SOCIALREC_WRITE_TOKEN": TOKEN, "SOCIALREC_ADMIN_TOKEN": ADMIN}
    with ServerProcess(args, env=env) as s:
        with s.channel() as ch:
            stub = pb_grpc.RecommenderStub(ch)
            target = _content(stub, "anyone", k=5)[0]
            stub.RemoveItem(pb.ItemRequest(item_id=target), metadata=ADMIN_AUTH)
            acked = time.monotonic()
        seen_workers = set()
        while len(seen_workers) < 2 and time.monotonic() - acked < 20:
            with s.channel() as ch:  # new connections spread over the workers
                stub = pb_grpc.RecommenderStub(ch)
                res, call = stub.RecommendContent.with_call(
                    pb.RecommendContentRequest(user_id="anyone", k=5)
                )
                worker = dict(call.trailing_metadata())["x-socialrec-worker"]
                assert target not in {r.id for r in res.items}
                assert time.monotonic() - acked < 1.0 or worker in seen_workers
                seen_workers.add(worker)
        assert len(seen_workers) == 2
    with ServerProcess(args, env=env) as s, s.channel() as ch:  # a restart: still down
        assert target not in _content(pb_grpc.RecommenderStub(ch), "anyone", k=5)
