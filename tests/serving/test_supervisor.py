"""The supervisor and hot reload as real processes (slow tier): start-up failures exit at once
and leave nothing behind, workers die with the supervisor and are replaced when they die, a bad
pointer or bundle never stops hot reload, and signed bundles are enforced."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest
from socialrec.serving.bundle import copy_bundle
from socialrec.serving.harness import NOT_SERVING, ServerProcess
from socialrec.serving.redis_local import find_free_port
from socialrec.serving.signing import SIGNING_KEY_ENV, generate_keypair

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


def _serve_args(bundle: Path, redis_url: str, *extra: str) -> list[str]:
    return [
        "--bundle", str(bundle), "--redis-url", redis_url, "--workers", "2",
        "--watch-interval", "0.2", *extra,
    ]  # fmt: skip


def _run_to_exit(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "socialrec.cli", "serve", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _left_behind(port: int) -> list[psutil.Process]:
    """Processes still running with ``--port <port>`` on their command line."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "--port" in cmd and str(port) in cmd and "serve" in cmd:
            out.append(p)
    return out


def _versions(address: str, n: int = 12) -> set[str]:
    """bundle_version seen over ``n`` fresh connections (spread over the workers)."""
    seen = set()
    for _ in range(n):
        with grpc.insecure_channel(address) as ch:
            res = pb_grpc.RecommenderStub(ch).RecommendContent(
                pb.RecommendContentRequest(user_id="u1", k=3), timeout=10
            )
            seen.add(res.bundle_version)
    return seen


def _wait_versions(address: str, want: set[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    got: set[str] = set()
    while time.monotonic() < deadline:
        got = _versions(address)
        if got == want:
            return
        time.sleep(0.3)
    raise AssertionError(f"versions {got}, wanted {want}")


@pytest.mark.parametrize("what", ["grpc-port", "metrics-port", "missing-bundle", "corrupt-bundle"])
def test_startup_failures_exit_nonzero_with_one_line_and_leave_nothing(
    what: str, small_bundle: Path, redis_server, tmp_path
) -> None:
    port, mport = find_free_port(), find_free_port()
    bundle = small_bundle
    blocker = None
    if what in ("grpc-port", "metrics-port"):
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", port if what == "grpc-port" else mport))
        blocker.listen()
    elif what == "missing-bundle":
        bundle = tmp_path / "nope"
    else:
        bundle = copy_bundle(small_bundle, tmp_path / "b", "corrupt")
        (bundle / "items.faiss").write_bytes(b"not an index")
    try:
        args = _serve_args(bundle, redis_server.url, "--port", str(port))
        t0 = time.monotonic()
        done = _run_to_exit([*args, "--metrics-port", str(mport)])
    finally:
        if blocker is not None:
            blocker.close()
    assert done.returncode != 0
    assert time.monotonic() - t0 < 30
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, done.stderr
    assert {"grpc-port": "gRPC port", "metrics-port": "metrics port"}.get(what, "bundle") in errors[
        0
    ]
    time.sleep(0.5)
    assert _left_behind(port) == []


def test_workers_die_with_the_supervisor_and_are_replaced(small_bundle: Path, redis_server) -> None:
    with ServerProcess(_serve_args(small_bundle, redis_server.url)) as s:
        sup = psutil.Process(s.pid)
        workers = sup.children()
        assert len(workers) == 2
        workers[0].kill()  # a dead worker is replaced
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = {p.pid for p in sup.children()}
            if len(now) == 2 and workers[0].pid not in now:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"worker not replaced: {sup.children()}")
        s.wait_serving()
        survivors = sup.children()
        os.kill(s.pid, signal.SIGKILL)  # the supervisor dies without a word to its workers
        gone, alive = psutil.wait_procs(survivors, timeout=15)
        assert alive == [], f"orphaned workers: {alive}"


def test_hot_reload_survives_bad_pointers_and_bundles(small_bundle: Path, redis_server, tmp_path):
    root = tmp_path / "bundles"
    root.mkdir()
    copy_bundle(small_bundle, root / "v1", "v1")
    copy_bundle(small_bundle, root / "v2", "v2")
    nofield = copy_bundle(small_bundle, root / "v3-nofield", "v3-nofield")
    m = json.loads((nofield / "manifest.json").read_text())
    del m["files"]["items.faiss"]["sha256"]
    (nofield / "manifest.json").write_text(json.dumps(m))
    outside = copy_bundle(small_bundle, tmp_path / "outside", "outside")
    (root / "CURRENT").write_text("v1\n")
    with ServerProcess(_serve_args(root, redis_server.url)) as s:
        assert _versions(s.address) == {"v1"}
        for bad in (b"\xff\xfe\n", b"v2\x00\n", b"../outside\n", str(outside).encode(), b"\n",
                    b"v3-nofield\n", b"no-such-dir\n"):  # fmt: skip
            (root / "CURRENT").write_bytes(bad)
            time.sleep(0.6)  # three watch intervals
            assert _versions(s.address) == {"v1"}, bad
        refused = s.log_text().count('"bundle_refused"')
        assert refused >= 2 * 7 - 2, s.tail()  # every bad pointer, in both workers
        # A worker started while the pointer is bad: no crash loop, the others keep serving.
        sup = psutil.Process(s.pid)
        sup.children()[0].kill()
        time.sleep(3)
        assert s.log_text().count('"worker_restart"') == 1, s.tail()
        assert len(sup.children()) == 2
        (root / "CURRENT").write_text("v2\n")  # all workers converge on the good one
        _wait_versions(s.address, {"v2"})
        os.kill(s.pid, signal.SIGHUP)  # SIGHUP still reloads
        time.sleep(1)
        assert _versions(s.address) == {"v2"}


def test_signed_bundles_only(small_bundle: Path, redis_server, tmp_path, monkeypatch) -> None:
    priv, pub = generate_keypair(tmp_path / "keys")
    other_priv, _ = generate_keypair(tmp_path / "other")
    root = tmp_path / "bundles"
    root.mkdir()
    monkeypatch.setenv(SIGNING_KEY_ENV, str(priv))
    copy_bundle(small_bundle, root / "signed", "signed")
    monkeypatch.setenv(SIGNING_KEY_ENV, str(other_priv))
    copy_bundle(small_bundle, root / "other-key", "other-key")
    monkeypatch.delenv(SIGNING_KEY_ENV)
    copy_bundle(small_bundle, root / "unsigned", "unsigned")
    assert (root / "signed" / "manifest.sig").exists()
    assert not (root / "unsigned" / "manifest.sig").exists()

    (root / "CURRENT").write_text("unsigned\n")
    port = find_free_port()
    done = _run_to_exit([*_serve_args(root, redis_server.url, "--bundle-key", str(pub)),
                         "--port", str(port)])  # fmt: skip
    assert done.returncode != 0 and "not signed" in done.stderr

    (root / "CURRENT").write_text("signed\n")
    with ServerProcess(_serve_args(root, redis_server.url, "--bundle-key", str(pub))) as s:
        assert _versions(s.address) == {"signed"}
        for name in ("unsigned", "other-key"):
            (root / "CURRENT").write_text(name + "\n")
            time.sleep(0.8)
            assert _versions(s.address) == {"signed"}
        assert "does not match" in s.log_text() and "not signed" in s.log_text()
    # Without a key the server warns and serves any intact bundle.
    (root / "CURRENT").write_text("unsigned\n")
    with ServerProcess(_serve_args(root, redis_server.url)) as s:
        assert _versions(s.address) == {"unsigned"}
        assert "bundle_key_missing" in s.log_text()


def test_empty_root_waits_not_serving(small_bundle: Path, redis_server, tmp_path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    s = ServerProcess(_serve_args(root, redis_server.url)).start()
    try:
        s.wait_health(NOT_SERVING)
        copy_bundle(small_bundle, root / "v1", "v1")
        (root / "CURRENT").write_text("v1\n")
        s.wait_serving(timeout_s=60)
    finally:
        s.stop()
