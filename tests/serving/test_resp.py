"""serving.resp, the server's hot-path Redis connection, against real redis-servers."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from socialrec.serving.redis_local import start_redis
from socialrec.serving.resp import AsyncRespConnection, RespConnection, RespError, Script


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory):
    """Own server (TCP + Unix socket, a password) so AUTH/SELECT can be checked."""
    server = start_redis(dir=tmp_path_factory.mktemp("resp"), appendonly=False, unixsocket=True)
    yield server
    server.stop()


@pytest.mark.parametrize("spin_us", [0, 200])
def test_commands_replies_and_large_values(redis_server, spin_us: int) -> None:
    c = RespConnection(redis_server.url, spin_us=spin_us)
    assert c.execute("PING") == "PONG"
    big = "x" * 300_000  # several socket reads
    assert c.execute("SET", "resp:big", big) == "OK"
    assert c.execute("GET", "resp:big") == big
    assert c.execute("GET", "resp:missing") is None
    assert c.execute("RPUSH", "resp:list", "a", "b", "ü") == 3
    assert c.execute("LRANGE", "resp:list", 0, -1) == ["a", "b", "ü"]
    c.execute("DEL", "resp:big", "resp:list")
    c.close()


def test_error_reply_raises_and_connection_stays_usable(redis_server) -> None:
    c = RespConnection(redis_server.url)
    with pytest.raises(RespError, match="unknown command"):
        c.execute("NOSUCHCOMMAND", "x")
    with pytest.raises(RespError, match="WRONGTYPE"):
        c.execute("SET", "resp:s", "1") and c.execute("LPUSH", "resp:s", "x")
    assert c.execute("PING") == "PONG"
    c.execute("DEL", "resp:s")


def test_evalsha_loads_the_script_once(redis_server) -> None:
    script = Script(f"return {{ARGV[1], KEYS[1], '{time.time_ns()}'}}")  # new to this server
    c = RespConnection(redis_server.url)
    c.execute("CONFIG", "RESETSTAT")
    assert c.evalsha(script, ["k"], ["a"])[:2] == ["a", "k"]  # NOSCRIPT -> EVAL
    assert c.evalsha(script, ["k"], ["b"])[:2] == ["b", "k"]  # cached now: EVALSHA only
    stats = c.execute("INFO", "commandstats")
    assert "cmdstat_eval:calls=1," in stats and "cmdstat_evalsha:calls=2," in stats


def test_unix_socket_password_and_database(private_redis) -> None:
    admin = RespConnection(private_redis.url)
    admin.execute("CONFIG", "SET", "requirepass", "s3cret")
    try:
        with pytest.raises(RespError, match="NOAUTH"):
            RespConnection(private_redis.url).execute("PING")
        with pytest.raises(RespError, match="WRONGPASS|invalid password"):
            RespConnection(private_redis.url.replace("//", "//:nope@")).execute("PING")
        tcp = RespConnection(private_redis.url.replace("//", "//:s3cret@").replace("/0", "/3"))
        unix = RespConnection(
            private_redis.unix_url.replace("//", "//:s3cret@").replace("db=0", "db=3")
        )
        assert tcp.execute("SET", "resp:db", "three") == "OK"
        assert unix.execute("GET", "resp:db") == "three"  # same database 3, other transport
        db0 = RespConnection(private_redis.unix_url.replace("//", "//default:s3cret@"))
        assert db0.execute("GET", "resp:db") is None
    finally:
        admin.execute("CONFIG", "SET", "requirepass", "")


def test_bad_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="scheme 'rediss'"):
        RespConnection("rediss://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="database 'x'"):
        RespConnection("redis://127.0.0.1:6379/x")


def test_refused_then_timeout_then_recovers(tmp_path) -> None:
    server = start_redis(dir=tmp_path, appendonly=False)
    with server:
        c = RespConnection(server.url, timeout_s=0.2)
        assert c.execute("PING") == "PONG"
        server.pause()  # accepts bytes, never answers
        try:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                c.execute("PING")
            assert time.monotonic() - t0 < 1.0
        finally:
            server.resume()
        assert c.execute("PING") == "PONG"  # reconnected: the late PONG is not read as ours
        server.kill()
        with pytest.raises(ConnectionError):
            c.execute("PING")
        with pytest.raises(ConnectionError):  # nothing listens: refused, not hung
            c.execute("PING")
        server.restart()
        assert c.execute("PING") == "PONG"


def _child_ping(conn: RespConnection, q) -> None:
    q.put((conn.execute("CLIENT", "ID"), conn.execute("PING")))


def test_a_forked_child_opens_its_own_socket(redis_server) -> None:
    c = RespConnection(redis_server.url)
    parent_id = c.execute("CLIENT", "ID")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_ping, args=(c, q))
    p.start()
    child_id, pong = q.get(timeout=10)
    p.join(10)
    assert pong == "PONG" and child_id != parent_id
    assert c.execute("CLIENT", "ID") == parent_id  # the parent's socket was left alone


# ---- the pipelined asyncio connection ---------------------------------------------------------


@pytest.mark.parametrize("spin_us", [0, 200])
def test_async_many_in_flight_each_gets_its_own_reply(redis_server, spin_us: int) -> None:
    async def main() -> None:
        c = AsyncRespConnection(redis_server.url, spin_us=spin_us)
        values = [f"v{i}-" + "x" * (i * 97 % 5000) for i in range(300)]  # replies of mixed sizes
        got = await asyncio.gather(*(c.execute("ECHO", v) for v in values))
        assert got == values
        # A BLPOP that waits 50 ms holds the connection: everything sent meanwhile queues
        # behind it, in flight at once, and still comes back to the right caller.
        blocker = asyncio.ensure_future(c.execute("BLPOP", "resp:async:none", "0.05"))
        await asyncio.sleep(0)
        echoes = [asyncio.ensure_future(c.execute("ECHO", str(i))) for i in range(50)]
        await asyncio.sleep(0)
        assert c.in_flight == 51
        assert await blocker is None
        assert await asyncio.gather(*echoes) == [str(i) for i in range(50)]
        assert c.in_flight == 0
        script = Script(f"return ARGV[1] .. '{time.time_ns()}'")
        reply = await c.evalsha(script.sha, script.source, [], ["a"])  # NOSCRIPT -> EVAL
        assert str(reply).startswith("a")
        with pytest.raises(RespError, match="unknown command"):
            await c.execute("NOSUCHCOMMAND")
        c.close()

    asyncio.run(main())


def test_async_timeout_fails_everything_in_flight_then_recovers(tmp_path) -> None:
    server = start_redis(dir=tmp_path, appendonly=False)

    async def main() -> None:
        c = AsyncRespConnection(server.url, timeout_s=0.2)
        assert await c.execute("PING") == "PONG"
        server.pause()
        try:
            t0 = time.monotonic()
            results = await asyncio.gather(
                *(c.execute("ECHO", str(i)) for i in range(5)), return_exceptions=True
            )
            assert all(isinstance(r, TimeoutError) for r in results), results
            assert time.monotonic() - t0 < 1.0
        finally:
            server.resume()
        assert await c.execute("ECHO", "after") == "after"  # new socket: no stale replies
        server.kill()
        with pytest.raises(ConnectionError):
            await c.execute("PING")
        server.restart()
        assert await c.execute("PING") == "PONG"
        c.close()

    with server:
        asyncio.run(main())


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300),
        min_size=1,
        max_size=8,
    )
)
def test_codec_round_trips_any_text(redis_server, values: list[str]) -> None:
    """Packing (length-prefixed, binary-safe) and hiredis parsing: any UTF-8 text comes back
    exactly, including CR/LF, NUL, '$' and '*' that a naive protocol would trip on."""
    c = _shared_conn(redis_server.url)
    assert [c.execute("ECHO", v) for v in values] == values
    assert c.execute("RPUSH", "resp:prop", *values) >= len(values)
    assert c.execute("LRANGE", "resp:prop", -len(values), -1) == values
    c.execute("DEL", "resp:prop")


_CONNS: dict[str, RespConnection] = {}


def _shared_conn(url: str) -> RespConnection:
    if url not in _CONNS:
        _CONNS[url] = RespConnection(url)
    return _CONNS[url]
