"""serving.resp, the server's pipelined asyncio Redis connection, against real redis-servers."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing as mp
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from socialrec.serving.redis_local import start_redis
from socialrec.serving.resp import AsyncRespConnection, RespError, pack, pack_py


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory):
    """Own server (TCP + Unix socket, a password) so AUTH/SELECT can be checked."""
    server = start_redis(dir=tmp_path_factory.mktemp("resp"), appendonly=False, unixsocket=True)
    yield server
    server.stop()


def run(coro):
    return asyncio.run(coro)


def test_commands_replies_and_large_values(redis_server) -> None:
    async def main() -> None:
        c = AsyncRespConnection(redis_server.url)
        assert await c.execute("PING") == "PONG"
        big = "x" * 300_000  # several socket reads
        assert await c.execute("SET", "resp:big", big) == "OK"
        assert await c.execute("GET", "resp:big") == big
        assert await c.execute("GET", "resp:missing") is None
        assert await c.execute("RPUSH", "resp:list", "a", "b", "ü") == 3
        assert await c.execute("LRANGE", "resp:list", 0, -1) == ["a", "b", "ü"]
        got = await c.transaction([("GET", "resp:missing"), ("LLEN", "resp:list")])
        assert got == [None, 3]
        await c.execute("DEL", "resp:big", "resp:list")
        c.close()

    run(main())


def test_error_reply_raises_and_connection_stays_usable(redis_server) -> None:
    async def main() -> None:
        c = AsyncRespConnection(redis_server.url)
        with pytest.raises(RespError, match="unknown command"):
            await c.execute("NOSUCHCOMMAND", "x")
        await c.execute("SET", "resp:s", "1")
        with pytest.raises(RespError, match="WRONGTYPE"):
            await c.execute("LPUSH", "resp:s", "x")
        # In a transaction an error reply comes back in the command's place.
        replies = await c.transaction([("LPUSH", "resp:s", "x"), ("GET", "resp:s")])
        assert "WRONGTYPE" in str(replies[0]) and replies[1] == "1"
        assert await c.execute("PING") == "PONG"
        await c.execute("DEL", "resp:s")
        c.close()

    run(main())


def test_evalsha_loads_the_script_once(redis_server) -> None:
    source = f"return {{ARGV[1], KEYS[1], '{time.time_ns()}'}}"  # new to this server
    sha = hashlib.sha1(source.encode()).hexdigest()

    async def main() -> None:
        c = AsyncRespConnection(redis_server.url)
        await c.execute("CONFIG", "RESETSTAT")
        assert (await c.evalsha(sha, source, ["k"], ["a"]))[:2] == ["a", "k"]  # NOSCRIPT -> EVAL
        assert (await c.evalsha(sha, source, ["k"], ["b"]))[:2] == ["b", "k"]  # cached now
        stats = await c.execute("INFO", "commandstats")
        assert "cmdstat_eval:calls=1," in stats and "cmdstat_evalsha:calls=2," in stats
        c.close()

    run(main())


def test_unix_socket_password_and_database(private_redis) -> None:
    async def main() -> None:
        admin = AsyncRespConnection(private_redis.url)
        await admin.execute("CONFIG", "SET", "requirepass", "s3cret")
        try:
            with pytest.raises(RespError, match="NOAUTH"):
                await AsyncRespConnection(private_redis.url).execute("PING")
            with pytest.raises(RespError, match="WRONGPASS|invalid password"):
                await AsyncRespConnection(private_redis.url.replace("//", "//:nope@")).execute(
                    "PING"
                )
            url = private_redis.url.replace("//", "//:s3cret@").replace("/0", "/3")
            unix_url = private_redis.unix_url.replace("//", "//:s3cret@").replace("db=0", "db=3")
            tcp, unix = AsyncRespConnection(url), AsyncRespConnection(unix_url)
            assert await tcp.execute("SET", "resp:db", "three") == "OK"
            assert await unix.execute("GET", "resp:db") == "three"  # same db 3, other transport
            db0 = AsyncRespConnection(private_redis.unix_url.replace("//", "//default:s3cret@"))
            assert await db0.execute("GET", "resp:db") is None
        finally:
            await admin.execute("CONFIG", "SET", "requirepass", "")

    run(main())


def test_bad_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="scheme 'rediss'"):
        AsyncRespConnection("rediss://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="database 'x'"):
        AsyncRespConnection("redis://127.0.0.1:6379/x")


def test_many_in_flight_each_gets_its_own_reply(redis_server) -> None:
    async def main() -> None:
        c = AsyncRespConnection(redis_server.url)
        values = [f"v{i}-" + "x" * (i * 97 % 5000) for i in range(300)]  # replies of mixed sizes
        got = await asyncio.gather(*(c.execute("ECHO", v) for v in values))
        assert got == values
        # A BLPOP that waits 50 ms holds the connection: everything sent meanwhile queues
        # behind it, in flight at once, and still comes back to the right caller.
        blocker = asyncio.ensure_future(c.execute("BLPOP", "resp:async:none", "0.05"))
        await asyncio.sleep(0)
        echoes = [asyncio.ensure_future(c.execute("ECHO", str(i))) for i in range(50)]
        await asyncio.sleep(0.01)
        assert c.in_flight == 51
        assert await blocker is None
        assert await asyncio.gather(*echoes) == [str(i) for i in range(50)]
        assert c.in_flight == 0
        c.close()

    run(main())


def test_a_write_larger_than_the_socket_buffer_does_not_block_the_loop(redis_server) -> None:
    """32 MB in one command: the kernel takes it in pieces through the writer callback while
    other coroutines keep running; replies stay in order."""

    async def main() -> None:
        c = AsyncRespConnection(redis_server.url, timeout_s=10)
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.ensure_future(ticker())
        await c.execute("PING")
        big = "y" * (32 << 20)
        set_, echo = await asyncio.gather(
            c.execute("SET", "resp:huge", big), c.execute("ECHO", "z")
        )
        done.set()
        await t
        assert (set_, echo) == ("OK", "z") and ticks > 1
        assert await c.execute("STRLEN", "resp:huge") == len(big)
        await c.execute("DEL", "resp:huge")
        c.close()

    run(main())


def test_timeout_fails_everything_in_flight_then_recovers(tmp_path) -> None:
    server = start_redis(dir=tmp_path, appendonly=False)

    async def main() -> None:
        c = AsyncRespConnection(server.url, timeout_s=0.2)
        assert await c.execute("PING") == "PONG"
        server.pause()  # accepts bytes, never answers
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
        with pytest.raises(ConnectionError):  # nothing listens: refused, not hung
            await c.execute("PING")
        server.restart()
        assert await c.execute("PING") == "PONG"
        c.close()

    with server:
        run(main())


def _child_ping(conn: AsyncRespConnection, q) -> None:
    async def main():
        return await conn.execute("CLIENT", "ID"), await conn.execute("PING")

    q.put(asyncio.run(main()))


def test_a_forked_child_opens_its_own_socket(redis_server) -> None:
    c = AsyncRespConnection(redis_server.url)
    loop = asyncio.new_event_loop()
    parent_id = loop.run_until_complete(c.execute("CLIENT", "ID"))
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_ping, args=(c, q))
    p.start()
    child_id, pong = q.get(timeout=10)
    p.join(10)
    assert pong == "PONG" and child_id != parent_id
    assert loop.run_until_complete(c.execute("CLIENT", "ID")) == parent_id  # parent's socket
    c.close()
    loop.close()


_LOOP = asyncio.new_event_loop()
_CONNS: dict[str, AsyncRespConnection] = {}


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
    c = _CONNS.setdefault(redis_server.url, AsyncRespConnection(redis_server.url))

    async def main() -> None:
        assert [await c.execute("ECHO", v) for v in values] == values
        assert await c.execute("RPUSH", "resp:prop", *values) >= len(values)
        assert await c.execute("LRANGE", "resp:prop", -len(values), -1) == values
        await c.execute("DEL", "resp:prop")

    _LOOP.run_until_complete(main())


class _SlowConnect(AsyncRespConnection):
    """Connects only after a pause (a loaded machine, a distant Redis); a second connect
    attempt would finish first, the way that mixes up sockets."""

    attempts = 0

    async def _connect(self) -> None:
        type(self).attempts += 1
        await asyncio.sleep(0.1 / type(self).attempts)
        await super()._connect()


def test_calls_during_the_first_connect_share_one_socket(redis_server) -> None:
    """Everything sent while the first connect is under way waits for that one connection
    (not one connection each, which would mix up replies) and gets its own reply."""

    async def main() -> None:
        c = _SlowConnect(redis_server.url, timeout_s=2)
        ids = await asyncio.gather(*(c.execute("CLIENT", "ID") for _ in range(20)))
        values = [f"v{i}" for i in range(200)]
        assert await asyncio.gather(*(c.execute("ECHO", v) for v in values)) == values
        assert len(set(ids)) == 1 and _SlowConnect.attempts == 1
        c.close()

    run(main())


class _CountingSocket:
    """The connection's socket, counting ``send`` calls (everything else passes through)."""

    def __init__(self, sock) -> None:
        self.sock, self.sends = sock, 0

    def send(self, data) -> int:
        self.sends += 1
        return self.sock.send(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_commands_of_one_loop_turn_share_one_send(redis_server) -> None:
    """Requests started in the same turn of the event loop go out in one system call, and
    each still gets its own replies, in order; a command alone is sent at the next turn."""

    async def main() -> None:
        c = AsyncRespConnection(redis_server.url)
        assert await c.execute("PING") == "PONG"  # connected
        counting = c._sock = _CountingSocket(c._sock)
        calls = [c.execute("SET", f"resp:turn:{i}", str(i)) for i in range(30)]
        calls += [c.transaction([("GET", f"resp:turn:{i}"), ("STRLEN", f"resp:turn:{i}")])
                  for i in range(30)]  # fmt: skip
        got = await asyncio.gather(*calls)
        assert got[:30] == ["OK"] * 30
        assert got[30:] == [[str(i), len(str(i))] for i in range(30)]
        # gather starts every coroutine in one turn; their commands wait for one flush
        assert counting.sends == 1, counting.sends
        assert await c.execute("GET", "resp:turn:7") == "7"
        assert counting.sends == 2
        await c.execute("DEL", *[f"resp:turn:{i}" for i in range(30)])
        c.close()

    run(main())


_ARG = st.one_of(st.text(), st.binary(), st.integers(), st.floats(allow_nan=False))


@settings(max_examples=300, deadline=None)
@given(st.lists(_ARG, min_size=1, max_size=8))
def test_pack_is_the_python_encoding(args) -> None:
    """hiredis's encoder gives the same bytes as the Python one for every type it takes."""
    assert pack(tuple(args)) == pack_py(tuple(args))
    assert pack(args) == pack_py(tuple(args))  # a list is packed as its tuple


def test_pack_falls_back_for_types_hiredis_does_not_take() -> None:
    for odd in (None, True, bytearray(b"xy")):
        assert pack(("SET", "k", odd)) == pack_py(("SET", "k", odd))
