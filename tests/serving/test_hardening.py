"""The server under bad input and faults, in-process over real Redis: idempotent writes across
a paused Redis, contract statuses only (malformed bytes, wrong Redis types, bounds on ids,
weights and timestamps), every status counted, memory bounded against a stream of distinct
unknown users."""

from __future__ import annotations

import time
import unicodedata
import uuid
from dataclasses import replace

import grpc
import psutil
import pytest
import redis
from socialrec.serving.offline_store import OfflineStore
from socialrec.serving.redis_local import start_redis
from socialrec.serving.schema import MAX_ID_LEN, MAX_TOTAL_WEIGHT, Keys
from socialrec.serving.store import StoreConfig

from socialrec.v1 import recommender_pb2 as pb

TOKEN = "in-process-token"  # tests/serving/conftest.py
AUTH = (("authorization", f"Bearer {TOKEN}"),)
METHOD = "/socialrec.v1.Recommender/"


def _events(url: str, ns: str) -> list[dict]:
    with OfflineStore(StoreConfig(url=url, namespace=ns)) as off:
        return [f for _, f in off.events()]


@pytest.mark.parametrize("client", ["resp", "redis-py"])
def test_retry_with_the_same_request_id_after_a_paused_redis_counts_once(
    server_config, inproc, tmp_path, client: str
) -> None:
    """Redis paused mid-write: the write times out (UNAVAILABLE) but is applied once Redis
    resumes; the client's retry with the same request_id gets the first event id back and
    applies nothing: one event, one weight."""
    with start_redis(dir=tmp_path, appendonly=False) as r:
        cfg = replace(server_config, redis_url=r.url, redis_client=client)
        s = inproc(cfg)
        rid = str(uuid.uuid4())
        req = pb.LogInteractionRequest(user_id="u", item_id="i", weight=2.5, request_id=rid)
        r.pause()
        try:
            with pytest.raises(grpc.RpcError) as e:
                s.stub.LogInteraction(req, metadata=AUTH, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "request_id" in e.value.details()
        finally:
            r.resume()
        time.sleep(0.6)  # past the read breaker; the paused write has been applied by now
        first = s.stub.LogInteraction(req, metadata=AUTH, timeout=10).event_id
        again = s.stub.LogInteraction(req, metadata=AUTH, timeout=10).event_id
        assert first == again
        events = _events(r.url, cfg.namespace)
        assert [(e["item"], e["weight"]) for e in events] == [("i", "2.5")]
        raw = redis.Redis.from_url(r.url, decode_responses=True)
        assert float(raw.hget(Keys(cfg.namespace).user("w", "u"), "i")) == 2.5
        raw.close()
        other = pb.LogInteractionRequest(user_id="u", item_id="i", weight=2.5, request_id="x")
        assert (
            s.stub.LogInteraction(other, metadata=AUTH).event_id != first
        )  # a new id: a new write
        assert len(_events(r.url, cfg.namespace)) == 2


def test_friendship_request_ids_and_event_ids(server_config, inproc) -> None:
    s = inproc(server_config)
    req = pb.FriendshipRequest(user_id="a", friend_id="b", request_id="add-a-b-1")
    first = s.stub.AddFriendship(req, metadata=AUTH).event_id
    assert first and s.stub.AddFriendship(req, metadata=AUTH).event_id == first
    rm = pb.FriendshipRequest(user_id="a", friend_id="b", request_id="rm-a-b-1")
    assert s.stub.RemoveFriendship(rm, metadata=AUTH).event_id != first
    kinds = [e["type"] for e in _events(server_config.redis_url, server_config.namespace)]
    assert kinds == ["friend_add", "friend_remove"]


@pytest.mark.parametrize(
    "request_",
    [
        pb.LogInteractionRequest(user_id="u", item_id="i", weight=3.4e38),
        pb.LogInteractionRequest(user_id="u", item_id="i", weight=-1.0),
        pb.LogInteractionRequest(user_id="u", item_id="i", weight=1.0, timestamp_ms=2**62),
        pb.LogInteractionRequest(user_id="u\x00x", item_id="i", weight=1.0),
        pb.LogInteractionRequest(user_id="u", item_id="line\nbreak", weight=1.0),
        pb.LogInteractionRequest(user_id="zero\u200bwidth", item_id="i", weight=1.0),
        pb.LogInteractionRequest(user_id="u", item_id="i", weight=1.0, request_id="r" * 129),
        pb.LogInteractionRequest(user_id="   ", item_id="i", weight=1.0),
        pb.LogInteractionRequest(user_id="\u3164", item_id="i", weight=1.0),
        pb.LogInteractionRequest(user_id="u", item_id="\ufe0f\u034f", weight=1.0),
        pb.LogInteractionRequest(user_id="u ", item_id="i", weight=1.0),
        pb.LogInteractionRequest(user_id="u", item_id="\u3000i", weight=1.0),
    ],
    ids=[
        "huge-weight",
        "negative",
        "far-future",
        "nul",
        "newline",
        "zero-width",
        "long-rid",
        "blank",
        "filler-only",
        "marks-only",
        "trailing-space",
        "leading-wide-space",
    ],
)
def test_out_of_bounds_writes_are_invalid_argument_and_write_nothing(
    server_config, inproc, request_
) -> None:
    s = inproc(server_config)
    with pytest.raises(grpc.RpcError) as e:
        s.stub.LogInteraction(request_, metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _events(server_config.redis_url, server_config.namespace) == []


def test_nfc_and_nfd_spellings_are_one_user(server_config, inproc) -> None:
    s = inproc(server_config)
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    with pytest.raises(grpc.RpcError) as e:
        s.stub.AddFriendship(pb.FriendshipRequest(user_id=nfc, friend_id=nfd), metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    s.stub.LogInteraction(
        pb.LogInteractionRequest(user_id=nfd, item_id="x", weight=1.0), metadata=AUTH
    )
    events = _events(server_config.redis_url, server_config.namespace)
    assert [e["user"] for e in events] == [nfc]  # stored in NFC


def test_summed_weight_is_capped(server_config, inproc) -> None:
    s = inproc(server_config)
    key = Keys(server_config.namespace).user("w", "u")
    raw = redis.Redis.from_url(server_config.redis_url, decode_responses=True)
    s.stub.LogInteraction(
        pb.LogInteractionRequest(user_id="u", item_id="i", weight=1.0), metadata=AUTH
    )
    raw.hset(key, "i", repr(MAX_TOTAL_WEIGHT - 10))
    s.stub.LogInteraction(
        pb.LogInteractionRequest(user_id="u", item_id="i", weight=1e6), metadata=AUTH
    )
    assert float(raw.hget(key, "i")) == MAX_TOTAL_WEIGHT
    raw.close()


def test_malformed_bytes_are_invalid_argument_naming_no_internals(server_config, inproc) -> None:
    s = inproc(server_config, metrics=True)
    before = s.count("RecommendContent", "INVALID_ARGUMENT")
    call = s.channel.unary_unary(METHOD + "RecommendContent")  # raw bytes in and out
    for junk in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x12" + b"\x80" * 11):
        with pytest.raises(grpc.RpcError) as e:
            call(junk)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "class" not in e.value.details() and "Error" not in e.value.details()
    assert s.count("RecommendContent", "INVALID_ARGUMENT") - before == 3


def test_every_status_is_counted(server_config, inproc) -> None:
    s = inproc(server_config, metrics=True)
    ok0 = s.count("RecommendFriends", "OK")
    bad0 = s.count("RecommendFriends", "INVALID_ARGUMENT")
    auth0 = s.count("AddFriendship", "UNAUTHENTICATED")
    s.stub.RecommendFriends(pb.RecommendFriendsRequest(user_id="u", k=3))
    with pytest.raises(grpc.RpcError):
        s.stub.RecommendFriends(pb.RecommendFriendsRequest(user_id="u", k=0))
    with pytest.raises(grpc.RpcError):
        s.stub.AddFriendship(pb.FriendshipRequest(user_id="a", friend_id="b"))
    assert s.count("RecommendFriends", "OK") - ok0 == 1
    assert s.count("RecommendFriends", "INVALID_ARGUMENT") - bad0 == 1
    assert s.count("AddFriendship", "UNAUTHENTICATED") - auth0 == 1


def test_shed_load_is_resource_exhausted_and_counted(server_config, inproc, tmp_path) -> None:
    """With Redis paused, calls pile up in flight; beyond the limit they are shed at once."""
    with start_redis(dir=tmp_path, appendonly=False) as r:
        s = inproc(replace(server_config, redis_url=r.url, max_concurrent_rpcs=4), metrics=True)
        shed0 = s.count("LogInteraction", "RESOURCE_EXHAUSTED")
        r.pause()
        try:
            futures = [
                s.stub.LogInteraction.future(
                    pb.LogInteractionRequest(user_id="u", item_id=f"i{j}", weight=1.0),
                    metadata=AUTH,
                    timeout=10,
                )
                for j in range(12)
            ]
            codes = []
            for f in futures:
                try:
                    f.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
        finally:
            r.resume()
        shed = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert shed >= 12 - 4 - 1  # at most the limit (give or take one racing) got in
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
        assert s.count("LogInteraction", "RESOURCE_EXHAUSTED") - shed0 == shed


def test_wrong_redis_types_degrade_reads_and_refuse_writes(server_config, inproc) -> None:
    s = inproc(server_config, metrics=True)
    k = Keys(server_config.namespace)
    raw = redis.Redis.from_url(server_config.redis_url, decode_responses=True)
    raw.set(k.user("h", "bad"), "a string where a sorted set belongs")
    raw.hset(k.user("f", "bad2"), "x", "1")  # a hash where a set belongs
    raw.close()
    for user in ("bad", "bad2"):
        res = s.stub.RecommendContent(pb.RecommendContentRequest(user_id=user, k=5))
        assert res.degraded and len(res.items) == 5
        fr = s.stub.RecommendFriends(pb.RecommendFriendsRequest(user_id=user, k=5))
        assert fr.degraded and len(fr.users) == 0
    degraded = s.metrics.degraded.labels("RecommendContent", "bad_data")._value.get()
    assert degraded >= 2
    # One user's bad keys do not trip the breaker for everyone else.
    assert not s.stub.RecommendContent(pb.RecommendContentRequest(user_id="fine", k=5)).degraded
    with pytest.raises(grpc.RpcError) as e:
        s.stub.LogInteraction(
            pb.LogInteractionRequest(user_id="bad", item_id="i", weight=1.0), metadata=AUTH
        )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_memory_stays_bounded_under_distinct_unknown_users(server_config, inproc) -> None:
    """Thousands of anonymous reads at the largest k, each for a new user (a cold-start answer
    of k items each): the worker grows by about the cache budget, not by the request count.
    Unbounded, 4,000 answers of 50 results would hold ~24 MB."""
    budget_mb = 2
    s = inproc(replace(server_config, result_cache_mb=budget_mb))
    proc = psutil.Process()

    def burst(tag: str, n: int) -> None:
        for j in range(n):
            req = pb.RecommendContentRequest(user_id=f"{tag}-{j}", k=server_config.max_k)
            s.stub.RecommendContent(req)

    burst("warm", 500)
    rss0 = proc.memory_info().rss
    burst("anon", 4000)
    cache = s.holder.live.cache
    assert cache is not None and cache.size <= budget_mb << 20
    grown = proc.memory_info().rss - rss0
    assert grown < (budget_mb << 20) + (8 << 20), f"grew {grown / 2**20:.1f} MiB"


def test_bad_requests_are_logged_at_a_bounded_rate(server_config, inproc, caplog) -> None:
    """A flood of malformed requests costs a few log lines, each saying how many it stands
    for, not one line per request."""
    s = inproc(server_config)
    call = s.channel.unary_unary(METHOD + "LogInteraction")
    with caplog.at_level("WARNING", logger="socialrec.server"):
        for _ in range(300):
            with pytest.raises(grpc.RpcError):
                call(b"\xff\xff")
    lines = [r for r in caplog.records if getattr(r, "event", None) == "bad_request"]
    assert 1 <= len(lines) <= 5, len(lines)


def test_a_burst_over_one_connection_is_served_or_shed_never_cancelled(
    server_config, inproc, tmp_path
) -> None:
    """2,000 concurrent calls on one HTTP/2 connection while Redis hangs: the ones beyond the
    in-flight limit are shed with RESOURCE_EXHAUSTED (counted), the rest answered (degraded);
    none is CANCELLED by gRPC core's pending-call limit."""
    import asyncio
    import collections

    from socialrec.v1 import recommender_pb2_grpc as pb_grpc

    with start_redis(dir=tmp_path, appendonly=False) as r:
        s = inproc(replace(server_config, redis_url=r.url), metrics=True)
        shed0 = s.count("RecommendContent", "RESOURCE_EXHAUSTED")

        async def main() -> collections.Counter:
            async with grpc.aio.insecure_channel(s.address) as ch:
                stub = pb_grpc.RecommenderStub(ch)
                await stub.RecommendContent(pb.RecommendContentRequest(user_id="warm", k=5))
                r.pause()

                async def one(i: int) -> str:
                    try:
                        req = pb.RecommendContentRequest(user_id=f"u{i}", k=50)
                        await stub.RecommendContent(req, timeout=30)
                        return "OK"
                    except grpc.aio.AioRpcError as e:
                        return e.code().name

                try:
                    return collections.Counter(await asyncio.gather(*(one(i) for i in range(2000))))
                finally:
                    r.resume()

        codes = asyncio.run(main())
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert codes["RESOURCE_EXHAUSTED"] > 0
        assert (
            s.count("RecommendContent", "RESOURCE_EXHAUSTED") - shed0 == codes["RESOURCE_EXHAUSTED"]
        )


def test_one_request_id_on_two_kinds_of_write_is_two_requests(server_config, inproc) -> None:
    """A request id names one request: the same id on a Dismiss after a LogInteraction (or an
    Unblock after a Block) is a new request and is applied; each repeat of one of them is
    still answered with its own first event id and applies nothing."""
    s = inproc(server_config)
    rid = "shared-1"
    log = pb.LogInteractionRequest(user_id="u", item_id="i", weight=1.0, request_id=rid)
    dismiss = pb.DismissRequest(user_id="u", item_id="j", request_id=rid)
    block = pb.BlockRequest(user_id="u", blocked_id="v", request_id=rid)
    logged = s.stub.LogInteraction(log, metadata=AUTH).event_id
    dismissed = s.stub.Dismiss(dismiss, metadata=AUTH).event_id
    blocked = s.stub.BlockUser(block, metadata=AUTH).event_id
    unblocked = s.stub.UnblockUser(block, metadata=AUTH).event_id
    assert len({logged, dismissed, blocked, unblocked}) == 4
    assert s.stub.Dismiss(dismiss, metadata=AUTH).event_id == dismissed
    assert s.stub.UnblockUser(block, metadata=AUTH).event_id == unblocked
    kinds = [e["type"] for e in _events(server_config.redis_url, server_config.namespace)]
    assert kinds == ["interaction", "dismiss_item", "block", "unblock"]
    raw = redis.Redis.from_url(server_config.redis_url, decode_responses=True)
    keys = Keys(server_config.namespace)
    assert raw.sismember(keys.user("d", "u"), "j")
    assert not raw.sismember(keys.user("b", "u"), "v")
    raw.close()


@pytest.mark.parametrize(
    "value",
    [" " * 200_000, "\u3000" * 60_000, "x" * 5_000, "é" * 300],
    ids=["spaces", "wide-spaces", "ascii", "accented"],
)
def test_huge_ids_are_refused_naming_the_length_not_echoing_the_value(
    server_config, inproc, value: str
) -> None:
    """An over-long id (blank, wide-space or plain) is INVALID_ARGUMENT with a short message
    that names the field and the length; the value is never echoed back whole."""
    s = inproc(server_config)
    for call in (
        lambda: s.stub.RecommendContent(pb.RecommendContentRequest(user_id=value, k=5)),
        lambda: s.stub.Dismiss(pb.DismissRequest(user_id=value, item_id="i"), metadata=AUTH),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "user_id" in e.value.details() and str(len(value)) in e.value.details()
        assert len(e.value.details()) < 200


def test_a_blank_id_is_quoted_cut_short(server_config, inproc) -> None:
    s = inproc(server_config)
    with pytest.raises(grpc.RpcError) as e:
        s.stub.RecommendFriends(pb.RecommendFriendsRequest(user_id=" " * 900, k=5))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "900 characters" in e.value.details() and len(e.value.details()) < 200


def test_writes_check_ids_against_the_servers_limit(server_config, inproc) -> None:
    """Every write checks its ids against the server's own max_id_len, not only reads."""
    s = inproc(replace(server_config, max_id_len=8, admin_token="admin-for-tests"))
    long_id = "x" * 9
    admin = (("authorization", "Bearer admin-for-tests"),)
    calls = [
        lambda: s.stub.Dismiss(pb.DismissRequest(user_id=long_id, item_id="i"), metadata=AUTH),
        lambda: s.stub.Dismiss(pb.DismissRequest(user_id="u", item_id=long_id), metadata=AUTH),
        lambda: s.stub.BlockUser(pb.BlockRequest(user_id="u", blocked_id=long_id), metadata=AUTH),
        lambda: s.stub.RemoveItem(pb.ItemRequest(item_id=long_id), metadata=admin),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "longer than 8" in e.value.details()
    with pytest.raises(ValueError, match="max_id_len"):
        replace(server_config, max_id_len=MAX_ID_LEN + 1)


def test_the_bearer_scheme_is_case_insensitive(server_config, inproc) -> None:
    s = inproc(server_config)
    req = pb.LogInteractionRequest(user_id="u", item_id="i", weight=1.0)
    for scheme in ("bearer", "BEARER"):
        s.stub.LogInteraction(req, metadata=(("authorization", f"{scheme} {TOKEN}"),))
    with pytest.raises(grpc.RpcError) as e:
        s.stub.LogInteraction(req, metadata=(("authorization", f"bearer {TOKEN.upper()}"),))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_deadline_that_ran_out_is_counted_as_such_not_as_internal(
    server_config, inproc, tmp_path, caplog
) -> None:
    """Redis hangs and the client's 50 ms deadline runs out while the server waits for it.
    The call is counted as what the client saw, DEADLINE_EXCEEDED (it used to be counted as
    CANCELLED), and never as an internal error: whether gRPC cancels the handler first or
    the handler's own abort finds the call already answered (that abort used to fail inside
    gRPC and be counted and logged as an internal error, a few times in a thousand calls
    with tight deadlines)."""
    with start_redis(dir=tmp_path, appendonly=False) as r:
        s = inproc(replace(server_config, redis_url=r.url), metrics=True)
        req = pb.RecommendFriendsRequest(user_id="u", k=5)
        s.stub.RecommendFriends(req)
        internal0 = s.count("RecommendFriends", "INTERNAL")
        late0 = s.count("RecommendFriends", "DEADLINE_EXCEEDED")
        with caplog.at_level("WARNING", logger="socialrec.server"):
            r.pause()
            try:
                with pytest.raises(grpc.RpcError) as e:
                    s.stub.RecommendFriends(req, timeout=0.05)
                assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # the handler finishes after the client
                    done = s.count("RecommendFriends", "DEADLINE_EXCEEDED") > late0
                    if done or s.count("RecommendFriends", "INTERNAL") > internal0:
                        break
                    time.sleep(0.02)
            finally:
                r.resume()
        assert s.count("RecommendFriends", "INTERNAL") == internal0
        assert s.count("RecommendFriends", "DEADLINE_EXCEEDED") == late0 + 1
        assert not [r for r in caplog.records if getattr(r, "event", None) == "internal_error"]


def test_a_request_over_the_size_limit_is_refused_before_parsing(server_config, inproc) -> None:
    s = inproc(replace(server_config, max_request_bytes=4096))
    big = pb.RecommendContentRequest(
        user_id="u", k=5, exclude_ids=[f"item-{i}" for i in range(800)]
    )
    assert big.ByteSize() > 4096
    with pytest.raises(grpc.RpcError) as e:
        s.stub.RecommendContent(big)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert s.stub.RecommendContent(pb.RecommendContentRequest(user_id="u", k=5)) is not None
    for bad in (-1, 0, 1 << 30):  # -1 would mean "no limit" to gRPC
        with pytest.raises(ValueError, match="max_request_bytes"):
            replace(server_config, max_request_bytes=bad)


def test_idle_streams_cannot_lock_the_recommender_out(server_config, inproc) -> None:
    """Health Watch and reflection streams share a per-worker cap: past it a new stream is
    RESOURCE_EXHAUSTED at once, and recommendation calls are still served while the capped
    streams stay open."""
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from socialrec.v1 import recommender_pb2_grpc as pb_grpc

    s = inproc(replace(server_config, max_open_streams=3))

    async def main() -> tuple[list[str], str, bool]:
        async with grpc.aio.insecure_channel(s.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(2)]
            for w in watches:
                await w.read()  # each stream is open and has answered its first status
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            listing = reflection_pb2.ServerReflectionRequest(list_services="")
            one = refl.ServerReflectionInfo()  # kept open: no request iterator to run out
            await one.write(listing)
            names = [s.name for s in (await one.read()).list_services_response.service]
            extra = health.Watch(health_pb2.HealthCheckRequest())
            try:
                await extra.read()
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            stub = pb_grpc.RecommenderStub(ch)
            ok = bool(await stub.RecommendContent(pb.RecommendContentRequest(user_id="u", k=3)))
            for call in (*watches, one):
                call.cancel()
            return names, code, ok

    names, code, ok = asyncio.run(main())
    assert "socialrec.v1.Recommender" in names
    assert code == "RESOURCE_EXHAUSTED"
    assert ok
