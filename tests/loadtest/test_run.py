"""`socialrec loadtest` end to end on a tiny synthetic run: ours + the naive peer, and a fault.

Real processes (redis-server, `socialrec serve`, the naive server, Locust), short durations;
no timing assertions (those live in benchmarks): only completeness and correctness.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from .conftest import socialrec_cli, train_tiny_run

pytestmark = pytest.mark.slow  # the slow tier (make test-slow)

if importlib.util.find_spec("locust") is None:  # found, not imported: importing it would
    pytest.skip("locust not installed", allow_module_level=True)  # gevent-patch pytest


KEYS = {
    "rps", "p50_ms", "p95_ms", "p99_ms", "failures", "requests", "server_cpu_us_per_request",
    "stages", "peer", "ratios", "config",
}  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    out = tmp_path_factory.mktemp("lt") / "run"
    train_tiny_run(out)
    return out


def test_loadtest_with_peer_writes_complete_summary(run_dir, tmp_path) -> None:
    out = tmp_path / "lt"
    r = socialrec_cli(
        "loadtest", "--run", str(run_dir), "--duration", "8", "--users", "4",
        "--out", str(out), timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert set(s) >= KEYS
    assert s["requests"] > 0 and s["failures"] == 0
    # Zipf-skewed users repeat within seconds: some reads are exact result-cache hits.
    assert set(s["stages"]["RecommendContent"]) == {"redis", "onnx", "faiss", "rank", "cache"}
    assert s["stages"]["RecommendContent"]["cache"]["count"] > 0
    assert s["server_cpu_us_per_request"] > 0
    assert s["writes"]["acknowledged"] > 0 and s["writes"]["lost"] == 0
    peer = s["peer"]
    assert peer["name"] == "naive-torch"
    assert {"rps", "p99_ms", "server_cpu_us_per_request"} <= set(peer)
    assert peer["requests"] > 0 and peer["failures"] == 0 and peer["writes"]["lost"] == 0
    assert set(s["ratios"]) >= {"rps_vs_peer", "cpu_per_request_peer_over_ours"}
    for name in ("ours_stats.csv", "ours.html", "peer_stats.csv", "peer.html"):
        assert (out / name).stat().st_size > 0, name


def test_swap_bundle_under_load_loses_nothing(run_dir, tmp_path) -> None:
    out = tmp_path / "swap"
    r = socialrec_cli(
        "loadtest", "--run", str(run_dir), "--duration", "8", "--users", "4",
        "--fault", "swap-bundle", "--no-peer", "--out", str(out), timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["fault"]["kind"] == "swap-bundle"
    assert s["failures"] == 0
    assert all(set(codes) == {"OK"} for codes in s["status"].values()), s["status"]
    assert s["writes"]["acknowledged"] > 0 and s["writes"]["lost"] == 0
    assert s["bundle_info"].get("version=loadtest-b") == 1.0  # the new bundle went live
    assert s["peer"] is None and s["ratios"] is None


def test_steps_shape_with_explicit_steps(run_dir, tmp_path) -> None:
    out = tmp_path / "steps"
    r = socialrec_cli(
        "loadtest", "--run", str(run_dir), "--duration", "8", "--users", "3", "--shape", "steps",
        "--steps", "1,3", "--no-peer", "--out", str(out), timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert [step["users"] for step in s["steps"]] == [1, 3]
    assert all(step["requests"] > 0 for step in s["steps"])
    assert s["capacity"] is None or s["capacity"]["users"] in (1, 3)
    bad = socialrec_cli("loadtest", "--run", str(run_dir), "--duration", "8", "--shape", "steps",
                     "--steps", "4,2", "--no-peer", "--out", str(tmp_path / "bad"), timeout=60)  # fmt: skip
    assert bad.returncode != 0 and "steps must be increasing" in bad.stderr
    bad = socialrec_cli("loadtest", "--run", str(run_dir), "--duration", "8", "--shape", "steps",
                     "--steps", "1,x", "--no-peer", timeout=60)  # fmt: skip
    assert bad.returncode != 0 and "--steps takes integers" in bad.stderr


def test_two_replicas_behind_haproxy_survive_a_killed_replica(run_dir, tmp_path) -> None:
    """--replicas 2: both replicas take calls through HAProxy; one is SIGKILLed mid-run and
    restarted on its port; the balancer routes around it, no acknowledged write is lost."""
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        pytest.fail("haproxy is not installed (.ci/run installs it)")
    out = tmp_path / "replicas"
    r = socialrec_cli(
        "loadtest", "--run", str(run_dir), "--duration", "12", "--users", "4", "--workers", "1",
        "--replicas", "2", "--fault", "kill-server", "--server-down-s", "2", "--no-peer",
        "--out", str(out), timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["replicas"] == 2
    assert set(s["balancer"]) == {"r0", "r1"}
    assert all(b["calls"] > 0 for b in s["balancer"].values()), s["balancer"]
    assert all(b["status"] == "UP" for b in s["balancer"].values()), s["balancer"]
    f = s["fault"]
    assert f["kind"] == "kill-server" and f["replacement_pid"] != f["killed_pid"]
    assert f["marked_down_after_s"] is not None and f["back_in_rotation_after_s"] is not None
    assert f["ok_after_fault"] > 0
    w = s["writes"]
    assert w["acknowledged"] > 0 and w["lost"] == 0 and w["counted_twice"] == 0


def test_cluster_primary_killed_under_load(run_dir, tmp_path) -> None:
    """--redis-cluster: the primary owning the busiest user's slot is SIGKILLed mid-run; its
    replica is promoted, the old primary rejoins as a replica; with --ack-replicas 1 no
    acknowledged write is lost and none is counted twice."""
    out = tmp_path / "cluster"
    r = socialrec_cli(
        "loadtest", "--run", str(run_dir), "--duration", "14", "--users", "4", "--workers", "1",
        "--redis-cluster", "--ack-replicas", "1", "--fault", "kill-primary", "--no-peer",
        "--out", str(out), timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    f = s["fault"]
    assert f["kind"] == "kill-primary"
    assert f["promoted_replica_port"] not in (None, f["killed_primary_port"])
    assert f["old_primary_rejoined_as"] == "slave"
    assert f["ok_after_fault"] > 0
    w = s["writes"]
    assert w["acknowledged"] > 0 and w["lost"] == 0 and w["counted_twice"] == 0
    assert s["config"]["ack_replicas"] == 1 and s["config"]["redis_cluster"] is True


def test_fault_needs_the_right_topology(run_dir, tmp_path) -> None:
    for flags, msg in (
        (["--fault", "kill-primary"], "kill-primary needs redis_cluster"),
        (["--fault", "kill-server"], "kill-server needs replicas >= 2"),
        (["--redis-cluster", "--fault", "restart-redis"], "restart-redis is for one"),
    ):
        bad = socialrec_cli("loadtest", "--run", str(run_dir), "--duration", "5", "--no-peer",
                         "--out", str(tmp_path / "bad"), *flags, timeout=60)  # fmt: skip
        assert bad.returncode != 0 and msg in bad.stderr, (flags, bad.stderr[-500:])
