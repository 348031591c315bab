"""The HAProxy configuration (validated by haproxy itself) and the load test's fault
arithmetic: per-replica metrics merged over a window, recovery read off the call timeline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from socialrec.loadtest.balancer import check_config, haproxy_config
from socialrec.loadtest.run import fleet_window, histogram_diff, recovery

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def _haproxy_installed() -> bool:
    return shutil.which("haproxy") is not None or Path("/usr/sbin/haproxy").exists()


def test_config_balances_per_call_over_h2_with_checks_and_retries() -> None:
    text = haproxy_config([("r0", "127.0.0.1:5001"), ("r1", "127.0.0.1:5002")], "127.0.0.1:5000")
    assert "mode http" in text and "bind 127.0.0.1:5000 proto h2" in text
    for name, port in (("r0", 5001), ("r1", 5002)):
        assert f"server {name} 127.0.0.1:{port} proto h2 check" in text
    assert "retry-on conn-failure\n" in text and "option redispatch" in text
    with pytest.raises(ValueError, match="at least one backend"):
        haproxy_config([], "127.0.0.1:5000")


def test_haproxy_accepts_the_config(tmp_path) -> None:
    if not _haproxy_installed():
        pytest.fail("haproxy is not installed (.ci/run installs it)")
    text = haproxy_config([("r0", "127.0.0.1:5001")], "127.0.0.1:5000", "127.0.0.1:5003")
    check_config(text, tmp_path / "ok.cfg")
    with pytest.raises(ValueError, match="haproxy rejects"):
        check_config(text.replace("proto h2 check", "proto h2 chekc"), tmp_path / "bad.cfg")


def test_compose_balancer_config_is_the_generated_one() -> None:
    """docker/haproxy.cfg is haproxy_config for the compose services: the load-tested
    topology is the deployed one."""
    expected = haproxy_config([("serve-a", "serve-a:50051"), ("serve-b", "serve-b:50051")],
                              "0.0.0.0:50051", "0.0.0.0:8404")  # fmt: skip
    assert (DOCKER / "haproxy.cfg").read_text() == expected


def _hist(count: float, le_counts: dict[float, float]) -> dict:
    return {"buckets": le_counts, "sum": 0.001 * count, "count": count, "value": 0.0}


def test_fleet_window_drops_a_killed_replica_and_counts_a_new_one_from_zero() -> None:
    key = ("socialrec_rpc_seconds", "method=RecommendContent")
    before = {9001: {key: _hist(10, {0.01: 10, float("inf"): 10})},
              9002: {key: _hist(5, {0.01: 5, float("inf"): 5})}}  # fmt: skip
    # 9002 was killed (gone at the end); 9003 replaced it
    after = {9001: {key: _hist(30, {0.01: 30, float("inf"): 30})},
             9003: {key: _hist(7, {0.01: 7, float("inf"): 7})}}  # fmt: skip
    b, a = fleet_window(before, after)
    d = histogram_diff(b, a, "socialrec_rpc_seconds")
    assert d["RecommendContent"]["rpc"]["count"] == (30 - 10) + 7


def test_recovery_reads_the_timeline() -> None:
    t0 = 1000.4
    timeline = {999: {"ok": 50, "failed": 0}, 1000: {"ok": 20, "failed": 3},
                1001: {"ok": 10, "failed": 2}, 1002: {"ok": 60, "failed": 0}}  # fmt: skip
    r = recovery(timeline, t0)
    assert r["failed_after_fault"] == 5 and r["ok_after_fault"] == 90
    assert r["seconds_with_failures"] == 2
    assert r["recovered_after_s"] == pytest.approx(1002 - t0, abs=0.05)
    assert recovery({1000: {"ok": 5, "failed": 0}}, t0)["recovered_after_s"] == 0.0
