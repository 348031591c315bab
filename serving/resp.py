"""A small Redis client for the server's hot path: one socket, RESP2, hiredis parsing.

Why not redis-py here: the server sends one small transaction per request and waits for it.
redis-py spends about as long in Python around such a call (pool checkout, retry wrapper,
command packing, response callbacks) as the loopback round trip itself, always sleeps in the
kernel while it waits, and blocks the event loop meanwhile. This connection packs the command, writes it, and reads the reply
with a non-blocking socket; it can busy-poll for a short, bounded time before it sleeps
(``spin_us``), which on an idle machine saves the wake-up of a sleeping thread. Offline work
(bulk loads, scans, the event stream) stays on redis-py.

Supported URLs: ``redis://[[user]:password@]host[:port][/db]`` and
``unix://[[user]:password@]/path/to/socket[?db=N]``. Anything else (``rediss://`` TLS, for
one) raises :class:`ValueError` so the caller can fall back to redis-py.

Not thread-safe: one connection per thread (the store keeps one per thread and process).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import select
import socket
import time
from collections import deque
from urllib.parse import parse_qs, unquote, urlparse

import hiredis

SUPPORTED_SCHEMES = ("redis", "unix")


class RespError(Exception):
    """Redis answered with an error reply (the connection itself is fine)."""


class Script:
    """A Lua script run by SHA1 (``EVALSHA``), loaded on first use or after a Redis restart."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


def _pack(args: tuple) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class RespConnection:
    """One Redis connection: ``execute(*args)`` sends a command and returns its reply.

    Raises ``ConnectionError`` (refused, reset, closed), ``TimeoutError`` (no reply within
    ``timeout_s``; the connection is then closed, since a late reply would be read by the
    next command) or :class:`RespError` (an error reply). The socket is (re)opened lazily, so
    a failed call leaves a connection that reconnects on the next one.
    """

    def __init__(self, url: str, timeout_s: float = 0.25, spin_us: int = 0) -> None:
        u = urlparse(url)
        if u.scheme not in SUPPORTED_SCHEMES:
            raise ValueError(f"unsupported redis url scheme {u.scheme!r} (use redis:// or unix://)")
        self.url = url
        self.timeout_s = float(timeout_s)
        self.spin_s = max(0, int(spin_us)) / 1e6
        self._unix = u.scheme == "unix"
        if self._unix:
            self._address: object = unquote(u.path)
            db = parse_qs(u.query).get("db", ["0"])[0]
        else:
            self._address = (u.hostname or "127.0.0.1", u.port or 6379)
            db = u.path.lstrip("/") or "0"
        try:
            self._db = int(db)
        except ValueError:
            raise ValueError(f"redis url {url!r}: database {db!r} is not an integer") from None
        self._user = unquote(u.username) if u.username else None
        self._password = unquote(u.password) if u.password else None
        self._sock: socket.socket | None = None
        self._poll: select.poll | None = None
        self._reader: hiredis.Reader | None = None
        self._pid = 0

    # ---- connection --------------------------------------------------------------------------
    def _connect(self) -> None:
        family = socket.AF_UNIX if self._unix else socket.AF_INET
        if not self._unix and ":" in self._address[0]:
            family = socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout_s)
            sock.connect(self._address)
            if not self._unix:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            if isinstance(e, TimeoutError):  # socket.timeout is TimeoutError
                raise TimeoutError(f"connect to {self._address}: timed out") from None
            raise ConnectionError(f"connect to {self._address}: {e}") from None
        self._sock, self._pid = sock, os.getpid()
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._reader = hiredis.Reader(encoding="utf-8")
        try:
            if self._password is not None:
                auth = (self._user, self._password) if self._user else (self._password,)
                _check(self._roundtrip(_pack(("AUTH", *auth)), 1)[0])
            if self._db:
                _check(self._roundtrip(_pack(("SELECT", self._db)), 1)[0])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = self._poll = self._reader = None

    # ---- commands ----------------------------------------------------------------------------
    def execute(self, *args: object) -> object:
        """Send one command and return its reply (strings decoded as UTF-8)."""
        self._ensure()
        return _check(self._roundtrip(_pack(args), 1)[0])

    def evalsha(self, script: Script, keys: list[str], args: list[object]) -> object:
        """Run ``script`` by SHA1; on NOSCRIPT (fresh or restarted Redis) send the source once."""
        try:
            return self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except RespError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        return self.execute("EVAL", script.source, len(keys), *keys, *args)

    def transaction(self, commands: list[tuple]) -> list:
        """MULTI, the commands, EXEC, written at once: one round trip, applied atomically.

        Returns the commands' replies; an error reply of one command is returned in its place
        (a :class:`RespError` instance), an error of the transaction itself raises.
        """
        self._ensure()
        return _exec_result(self._roundtrip(_pack_transaction(commands), len(commands) + 2))

    def _ensure(self) -> None:
        """Open the socket if there is none, or if this process is a fork of its opener."""
        if self._sock is None or self._pid != os.getpid():  # never share a socket across fork
            self._sock = None
            self._connect()

    def _roundtrip(self, packed: bytes, n: int) -> list:
        """Write ``packed`` (``n`` commands) and read their ``n`` raw replies."""
        sock, reader = self._sock, self._reader
        try:
            self._send(sock, packed)
            return [self._read(sock, reader) for _ in range(n)]
        except (TimeoutError, ConnectionError):
            self.close()
            raise
        except OSError as e:
            self.close()
            raise ConnectionError(f"redis {self._address}: {e}") from None

    def _send(self, sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + self.timeout_s
        while view:
            try:
                n = sock.send(view)
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"redis {self._address}: send timed out") from None
                select.select([], [sock], [], remaining)
                continue
            view = view[n:]

    def _read(self, sock: socket.socket, reader: hiredis.Reader) -> object:
        start = time.perf_counter()
        deadline = start + self.timeout_s
        # busy-poll first (spin_us): the reply is usually a few microseconds away
        reply = _try_read(sock, reader, start + self.spin_s, self._address)
        while reply is _NOTHING:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError(f"redis {self._address}: no reply within {self.timeout_s}s")
            self._poll.poll(remaining * 1000)
            reply = _try_read(sock, reader, 0.0, self._address)
        return reply


_NOTHING = object()


def _try_read(sock: socket.socket, reader: hiredis.Reader, until: float, address: object) -> object:
    """The next reply if it is complete before ``time.perf_counter()`` passes ``until``
    (busy-polling the non-blocking socket meanwhile; one attempt if already past), else
    _NOTHING."""
    while True:
        reply = reader.gets()
        if reply is not False:
            return reply
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            if time.perf_counter() >= until:
                return _NOTHING
            continue
        if not data:
            raise ConnectionError(f"redis {address}: connection closed")
        reader.feed(data)


class AsyncRespConnection:
    """A pipelined connection for one asyncio event loop: many commands in flight at once.

    The server's handlers run on the event loop; a blocking round trip would stall every
    other request of the worker while Redis answers. Here a handler writes its command and
    awaits a future; replies come back in order and resolve the futures first in, first out.
    When nothing else is in flight the reply is awaited by a bounded busy-poll first
    (``spin_us``), so a lone request does not pay a trip through the event loop.

    A timeout or a lost connection fails every command in flight (their replies could no
    longer be matched) and the next command reconnects. Errors as :class:`RespConnection`.

    Bookkeeping per call is one future; deadlines are checked by a single timer armed for
    the oldest call in flight (calls are answered in order, so it has the earliest deadline)
    instead of a timer per call.
    """

    def __init__(self, url: str, timeout_s: float = 0.25, spin_us: int = 0) -> None:
        self._c = RespConnection(url, timeout_s=timeout_s, spin_us=spin_us)
        # In flight, oldest first: [future, replies still expected, replies so far, deadline]
        self._pending: deque[list] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: socket.socket | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def execute(self, *args: object) -> object:
        (reply,) = await self._submit(_pack(args), 1)
        return _check(reply)

    async def transaction(self, commands: list[tuple]) -> list:
        """As :meth:`RespConnection.transaction`."""
        return _exec_result(await self._submit(_pack_transaction(commands), len(commands) + 2))

    async def _submit(self, packed: bytes, n: int) -> list:
        """Write ``packed`` (``n`` commands) and return their ``n`` replies, in order."""
        c = self._c
        if c._sock is None or c._pid != os.getpid():
            self._reset(None)
            c._ensure()  # blocking connect, bounded by timeout_s (loopback or LAN)
        sock, reader = c._sock, c._reader
        replies: list = []
        try:
            c._send(sock, packed)
            if not self._pending:
                while len(replies) < n:
                    reply = self._spin(sock, reader)
                    if reply is _NOTHING:
                        break
                    replies.append(reply)
                if len(replies) == n:
                    return replies
        except (TimeoutError, ConnectionError) as e:
            self._reset(e)
            raise
        except OSError as e:
            err = ConnectionError(f"redis {c._address}: {e}")
            self._reset(err)
            raise err from None
        loop = asyncio.get_running_loop()
        if self._watched is not sock:
            loop.add_reader(sock, self._on_readable)
            self._watched, self._loop = sock, loop
        fut = loop.create_future()
        deadline = loop.time() + c.timeout_s
        self._pending.append([fut, n - len(replies), replies, deadline])
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._on_timer)
        return await fut

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

    # ---- internals ---------------------------------------------------------------------------
    def _spin(self, sock: socket.socket, reader: hiredis.Reader) -> object:
        """The reply if it arrives within spin_us, else _NOTHING (it will come via the loop)."""
        return _try_read(sock, reader, time.perf_counter() + self._c.spin_s, self._c._address)

    def _on_readable(self) -> None:
        c = self._c
        sock, reader = c._sock, c._reader
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
                    raise ConnectionError(f"redis {c._address}: connection closed")
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
            self._reset(
                TimeoutError(f"redis {self._c._address}: no reply within {self._c.timeout_s}s")
            )
        else:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _reset(self, err: BaseException | None) -> None:
        """Close the socket and fail everything in flight with ``err``."""
        if self._watched is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._watched)
        self._watched = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, deque()
        for call in pending:
            if not call[0].done():
                call[0].set_exception(err or ConnectionError("connection reset"))
        self._c.close()


def _pack_transaction(commands: list[tuple]) -> bytes:
    return b"".join([_pack(("MULTI",)), *(_pack(c) for c in commands), _pack(("EXEC",))])


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
