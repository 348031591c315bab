"""The server's Redis client for single-node Redis: one pipelined socket per event loop, RESP2,
hiredis parsing, nothing blocking on the loop.

Why it exists (docs/design.md, "Redis client"): in the same load test, alternating, the server
spent less CPU per request on this client than on ``redis.asyncio`` (with hiredis), well
past the 10% bar below which redis-py would be used everywhere (measured by
``benchmarks/redis_client_ab.py``). redis.asyncio checks a connection out of a pool, wraps
every call in its retry and callback machinery and awaits each reply through a stream reader;
here a request writes its commands to one socket shared by every request of the worker and
awaits one future, resolved from the socket's read callback in arrival order.

Scope: single-node Redis (or a primary) over ``redis://[[user]:password@]host[:port][/db]``
or ``unix://[[user]:password@]/path?db=N``. Anything else (TLS, Redis Cluster) goes through
redis-py, which the store picks automatically.

A timeout or a lost connection fails every command in flight (their replies could no longer
be matched to callers) and the next command reconnects. Errors: ``ConnectionError`` (refused,
reset, closed), ``TimeoutError`` (no reply within ``timeout_s``) and :class:`RespError` (an
error reply; the connection stays usable).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import deque
from urllib.parse import parse_qs, unquote, urlparse

import hiredis

SUPPORTED_SCHEMES = ("redis", "unix")


class RespError(Exception):
    """Redis answered with an error reply (the connection itself is fine)."""


def pack(args: tuple) -> bytes:
    """One command in RESP2: hiredis's encoder (C; the same bytes as :func:`pack_py`, which
    packs the argument types it does not take)."""
    try:
        return hiredis.pack_command(args if type(args) is tuple else tuple(args))
    except TypeError:
        return pack_py(args)


def pack_py(args: tuple) -> bytes:
    """One command in RESP2, in Python (``str()`` of anything not bytes)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _address(url: str) -> tuple[object, int, str | None, str | None]:
    """(socket address, db, user, password) of a redis:// or unix:// URL."""
    u = urlparse(url)
    if u.scheme not in SUPPORTED_SCHEMES:
        raise ValueError(f"unsupported redis url scheme {u.scheme!r} (use redis:// or unix://)")
    if u.scheme == "unix":
        address: object = unquote(u.path)
        db = parse_qs(u.query).get("db", ["0"])[0]
    else:
        address = (u.hostname or "127.0.0.1", u.port or 6379)
        db = u.path.lstrip("/") or "0"
    try:
        n = int(db)
    except ValueError:
        raise ValueError(f"redis url {url!r}: database {db!r} is not an integer") from None
    user = unquote(u.username) if u.username else None
    password = unquote(u.password) if u.password else None
    return address, n, user, password


class AsyncRespConnection:
    """A pipelined connection for one asyncio event loop: many commands in flight at once.

    Bookkeeping per call is one future; deadlines are checked by a single timer armed for the
    oldest call in flight (replies come in order, so it has the earliest deadline). Writes go
    straight to the socket and, when the kernel buffer is full, into a buffer flushed by a
    writer callback, so a call never waits on the socket.
    """

    def __init__(self, url: str, timeout_s: float = 0.25) -> None:
        self.url = url
        self.timeout_s = float(timeout_s)
        self._address, self._db, self._user, self._password = _address(url)
        self._unix = isinstance(self._address, str)
        self._sock: socket.socket | None = None
        self._reader: hiredis.Reader | None = None
        self._pid = os.getpid()  # the process this state belongs to (a fork starts afresh)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future | None = None
        self._out = bytearray()  # bytes the kernel did not take yet
        self._flushing: asyncio.Handle | None = None  # the send of _out at the next loop turn
        # In flight, oldest first: [future, replies still expected, replies so far, deadline]
        self._pending: deque[list] = deque()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def execute(self, *args: object) -> object:
        """Send one command and return its reply (strings decoded as UTF-8)."""
        (reply,) = await self._submit(pack(args), 1)
        return _check(reply)

    async def transaction(self, commands: list[tuple]) -> list:
        """MULTI, the commands, EXEC, written at once: one round trip, applied atomically.

        Returns the commands' replies; an error reply of one command comes back in its place
        (a hiredis.ReplyError instance); an error of the transaction itself raises RespError.
        """
        packed = b"".join([pack(("MULTI",)), *(pack(c) for c in commands), pack(("EXEC",))])
        return _exec_result(await self._submit(packed, len(commands) + 2))

    async def pipeline(self, commands: list[tuple]) -> list:
        """The commands written at once (one round trip, not a transaction): each one's reply
        (an error reply as a hiredis.ReplyError) or the exception that failed it. Replies come in
        order, so when the connection fails midway the commands answered before keep their
        replies (the acknowledged writes need to know whether the script's reply arrived
        before its WAIT failed)."""
        await self._ensure()
        futures = [self._expect(1) for _ in commands]
        self._write(b"".join(pack(c) for c in commands))
        out: list = []
        for f in futures:
            try:
                out.append((await f)[0])
            except (ConnectionError, TimeoutError, OSError) as e:
                out.append(e)
        return out

    async def evalsha(self, sha: str, source: str, keys: list[str], args: list[object]) -> object:
        """Run a script by SHA1; sends ``source`` instead when Redis has not cached it."""
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except RespError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        return await self.execute("EVAL", source, len(keys), *keys, *args)

    def close(self) -> None:
        self._reset(ConnectionError("connection closed"))

    # ---- connection --------------------------------------------------------------------------
    async def _ensure(self) -> None:
        """Connect (once, shared by every caller waiting meanwhile) if there is no socket, or
        if this process is a fork of the one that opened it."""
        if self._pid != os.getpid():  # a forked child: nothing of the parent's is ours
            self._pid = os.getpid()
            self._sock, self._reader, self._loop, self._connecting = None, None, None, None
            self._pending, self._out, self._timer = deque(), bytearray(), None
            self._flushing = None
        if self._sock is not None:
            return
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_UNIX if self._unix else socket.AF_INET
        if not self._unix and ":" in self._address[0]:
            family = socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, self._address), self.timeout_s)
            if not self._unix:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (TimeoutError, OSError) as e:
            sock.close()
            if isinstance(e, TimeoutError):
                raise TimeoutError(f"connect to {self._address}: timed out") from None
            raise ConnectionError(f"connect to {self._address}: {e}") from None
        self._sock, self._loop = sock, loop
        self._reader = hiredis.Reader(encoding="utf-8")
        self._out.clear()
        loop.add_reader(sock, self._on_readable)
        try:
            if self._password is not None:
                auth = (self._user, self._password) if self._user else (self._password,)
                _check((await self._send_now(pack(("AUTH", *auth)), 1))[0])
            if self._db:
                _check((await self._send_now(pack(("SELECT", self._db)), 1))[0])
        except BaseException as e:
            self._reset(e if isinstance(e, Exception) else None)
            raise

    # ---- calls -------------------------------------------------------------------------------
    async def _submit(self, packed: bytes, n: int) -> list:
        """Write ``packed`` (``n`` commands) and return their ``n`` replies, in order."""
        await self._ensure()
        return await self._send_now(packed, n)

    def _send_now(self, packed: bytes, n: int) -> asyncio.Future:
        fut = self._expect(n)
        self._write(packed)
        return fut

    def _expect(self, n: int) -> asyncio.Future:
        """A future for the next ``n`` replies (the bytes asking for them are written next)."""
        loop = self._loop
        if loop is None or self._sock is None:  # reset by another call since _ensure
            raise ConnectionError(f"redis {self._address}: connection lost")
        fut = loop.create_future()
        deadline = loop.time() + self.timeout_s
        self._pending.append([fut, n, [], deadline])
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._on_timer)
        return fut

    def _write(self, data: bytes) -> None:
        """Queue ``data``; the queue goes out in one ``send`` at the next turn of the event
        loop, so the commands of every request handled in this turn share one system call
        (under load a worker starts several reads per turn; docs/design.md "Redis client")."""
        queued = bool(self._out)  # a send is already scheduled, or the socket is full
        self._out += data
        if not queued:
            self._flushing = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = None
        sock = self._sock
        if sock is None or not self._out:
            return
        try:
            sent = sock.send(self._out)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self._reset(ConnectionError(f"redis {self._address}: {e}"))
            return
        del self._out[:sent]
        if self._out:
            self._loop.add_writer(sock, self._on_writable)

    def _on_writable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sent = sock.send(self._out)
        except BlockingIOError:
            return
        except OSError as e:
            self._reset(ConnectionError(f"redis {self._address}: {e}"))
            return
        del self._out[:sent]
        if not self._out:
            self._loop.remove_writer(sock)

    def _on_readable(self) -> None:
        sock, reader = self._sock, self._reader
        if sock is None:
            return
        pending = self._pending
        try:
            while True:
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    break
                if not data:
                    raise ConnectionError(f"redis {self._address}: connection closed")
                reader.feed(data)
                if len(data) < (1 << 16):
                    break
            while pending:
                reply = reader.gets()
                if reply is False:
                    break
                call = pending[0]
                call[2].append(reply)
                call[1] -= 1
                if call[1] == 0:
                    pending.popleft()
                    if not call[0].done():
                        call[0].set_result(call[2])
        except (OSError, hiredis.ProtocolError) as e:
            err = e if isinstance(e, ConnectionError) else ConnectionError(f"redis: {e}")
            self._reset(err)

    def _on_timer(self) -> None:
        """Fail everything if the oldest call is past its deadline, else re-arm for it."""
        self._timer = None
        if not self._pending or self._loop is None:
            return
        deadline = self._pending[0][3]
        if self._loop.time() >= deadline:
            self._reset(TimeoutError(f"redis {self._address}: no reply within {self.timeout_s}s"))
        else:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _reset(self, err: BaseException | None) -> None:
        """Close the socket and fail everything in flight with ``err``."""
        if self._pid != os.getpid():  # a fork's copy: the socket and loop are the parent's
            self._sock = None
            return
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(sock)
                with contextlib.suppress(Exception):
                    self._loop.remove_writer(sock)
            sock.close()
        self._reader = None
        self._out.clear()
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, deque()
        for call in pending:
            if not call[0].done():
                call[0].set_exception(err or ConnectionError("connection reset"))


def _exec_result(replies: list) -> list:
    """The EXEC reply of MULTI + commands + EXEC, after checking the queueing replies."""
    for r in replies[:-1]:
        if isinstance(r, hiredis.ReplyError):
            raise RespError(str(r))  # a command refused while queueing (EXEC then aborts)
    result = replies[-1]
    if isinstance(result, hiredis.ReplyError):
        raise RespError(str(result))
    if result is None:
        raise RespError("transaction aborted")
    return result


def _check(reply: object) -> object:
    if isinstance(reply, hiredis.ReplyError):
        raise RespError(str(reply))
    return reply
