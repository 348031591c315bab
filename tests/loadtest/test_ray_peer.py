"""The Ray Serve peer (loadtest/ray_peer.py): real subprocesses on a real Redis.

It must answer like the naive peer for the same user and features (the comparison in
`socialrec loadtest --peers naive,ray` is then about serving, not about different answers),
keep the API's error semantics, and run under the load test with every one of its processes
counted.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from .conftest import socialrec_cli, train_tiny_run

pytestmark = pytest.mark.slow  # the slow tier (make test-slow)

# found, not imported: importing locust would gevent-patch pytest; -ra reports the skip
for _mod in ("locust", "ray"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"{_mod} not installed: pip install -e '.[dev,peer]' (.ci/run does)",
                    allow_module_level=True)  # fmt: skip

TOKEN = "test-token"
# The bundle of an uncompressed run is the teacher's tower in fp32 ONNX over flat (exact)
# indexes; the naive peer runs the same tower in eager torch. The two float paths differ by
# rounding only (~1e-6 on these scores), so 1e-4 is a wide margin that still catches a wrong
# vector, a missing bias slot or a missing log1p(mutual) bonus (each moves scores by >= 1e-2).
SCORE_TOL = 1e-4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The same tiny synthetic run as test_run.py's, with its bundle exported."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    out = tmp_path_factory.mktemp("ray") / "run"
    train_tiny_run(out)
    from socialrec.loadtest.run import ensure_bundle

    ensure_bundle(out)
    return out


def _ids(reply, field: str) -> list[str]:
    return [r.id for r in getattr(reply, field)]


def _scores(reply, field: str) -> list[float]:
    return [r.score for r in getattr(reply, field)]


def test_ray_peer_answers_like_the_naive_peer(run_dir, redis_server, redis_namespace, tmp_path):
    import grpc
    from socialrec.loadtest.run import RayPeerProcess
    from socialrec.serving.harness import ServerProcess
    from socialrec.serving.publish import PublishConfig
    from socialrec.serving.publish import run as publish

    from socialrec.v1 import recommender_pb2 as pb
    from socialrec.v1 import recommender_pb2_grpc as pb_grpc

    publish(PublishConfig(run=str(run_dir), redis_url=redis_server.url, namespace=redis_namespace,
                          train_only=True, progress=False))  # fmt: skip
    env = {"SOCIALREC_WRITE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    common = ["--redis-url", redis_server.url, "--namespace", redis_namespace]
    naive = ServerProcess(["--run", str(run_dir), *common], env=env, log=tmp_path / "naive.log",
                          program=("socialrec.loadtest.naive_server",))  # fmt: skip
    ray = RayPeerProcess(["--bundle", str(run_dir / "bundle"), *common, "--replicas", "1"],
                         env=env, log=tmp_path / "ray.log")  # fmt: skip
    users = (run_dir / "bundle" / "user_ids.txt").read_text().split()
    try:
        naive.start()
        ray.start()
        naive.wait_serving()
        ray.wait_serving()
        stubs = [pb_grpc.RecommenderStub(s.channel()) for s in (naive, ray)]

        def both(method: str, req) -> list:
            return [getattr(st, method)(req, timeout=10) for st in stubs]

        # known users with history and friends, and one the bundle and Redis do not know
        mutual = 0
        for user in [*users[:25:3], "nobody-at-all"]:
            for method, req, field in (
                ("RecommendContent", pb.RecommendContentRequest(user_id=user, k=10), "items"),
                ("RecommendFriends", pb.RecommendFriendsRequest(user_id=user, k=10), "users"),
            ):
                a, b = both(method, req)
                assert len(_ids(a, field)) == 10, (method, user)
                assert _ids(b, field) == _ids(a, field), (method, user)
                assert _scores(b, field) == pytest.approx(_scores(a, field), abs=SCORE_TOL)
                assert b.cold_start == a.cold_start == (user == "nobody-at-all")
                assert not b.degraded
            a, b = both("RecommendFriends", pb.RecommendFriendsRequest(user_id=user, k=10))
            assert [r.mutual_friends for r in b.users] == [r.mutual_friends for r in a.users]
            mutual += sum(r.mutual_friends > 0 for r in b.users)
        assert mutual > 0  # the friend-of-friend blend was exercised, not only the tower

        # a write through the Ray proxy lands in Redis: the item is then seen, so left out
        user = users[0]
        first = stubs[1].RecommendContent(pb.RecommendContentRequest(user_id=user, k=10)).items[0]
        auth = (("authorization", f"Bearer {TOKEN}"),)
        req = pb.LogInteractionRequest(user_id=user, item_id=first.id, weight=3.0)
        assert stubs[1].LogInteraction(req, metadata=auth, timeout=10).event_id
        a, b = both("RecommendContent", pb.RecommendContentRequest(user_id=user, k=10))
        assert first.id not in _ids(b, "items") and _ids(b, "items") == _ids(a, "items")

        # the API's errors, status for status
        for stub in stubs:
            with pytest.raises(grpc.RpcError) as e:
                stub.RecommendContent(pb.RecommendContentRequest(user_id="", k=10), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as e:
                stub.RecommendFriends(pb.RecommendFriendsRequest(user_id=user, k=0), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as e:
                stub.LogInteraction(req, timeout=10)  # no token
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        for s in (naive, ray):
            s.stop()
    assert ray.proc.returncode == 0, ray.tail()  # SIGTERM shuts Serve and Ray down cleanly


def test_ray_peer_that_cannot_start_is_a_clear_error(tmp_path, redis_server) -> None:
    from socialrec.loadtest.run import RayPeerProcess

    peer = RayPeerProcess(["--bundle", str(tmp_path / "missing"), "--redis-url", redis_server.url],
                          log=tmp_path / "ray.log")  # fmt: skip
    peer.start()
    try:
        with pytest.raises(RuntimeError, match="Ray peer exited") as e:
            peer.wait_serving(timeout_s=60)
        assert "no manifest" in str(e.value)  # the tail of its log says why
    finally:
        peer.stop()


def test_loadtest_with_naive_and_ray_peers(run_dir, tmp_path) -> None:
    out = tmp_path / "lt"
    r = socialrec_cli(
        "loadtest", "--run", str(run_dir), "--duration", "10", "--users", "4",
        "--peers", "naive,ray", "--out", str(out), timeout=400,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert set(s["ratios_by_peer"]) == set(s["peers"]) == {"naive", "ray"}
    assert s["peer"] == s["peers"]["naive"] and s["ratios"] == s["ratios_by_peer"]["naive"]
    ray = s["peers"]["ray"]
    assert ray["name"] == "ray-serve"
    assert ray["requests"] > 0 and ray["failures"] == 0 and ray["writes"]["lost"] == 0
    assert ray["writes"]["acknowledged"] > 0
    assert all(set(codes) == {"OK"} for codes in ray["status"].values()), ray["status"]
    # Ray's GCS, raylet, agents, controller, proxy and replicas: all counted, none outside
    assert ray["processes"]["in_tree"] >= 6 and ray["processes"]["marked_outside_tree"] == 0
    assert ray["server_cpu_us_per_request"] > 0
    assert ray["ray"]["replicas"] == 2 and ray["ray"]["idle_cpu_cores"] >= 0
    for name in ("rps_vs_peer", "cpu_per_request_peer_over_ours", "p99_peer_over_ours"):
        assert s["ratios_by_peer"]["ray"][name] is not None, name
    assert (out / "ray_stats.csv").stat().st_size > 0
    bad = socialrec_cli("loadtest", "--run", str(run_dir), "--duration", "5", "--peers",
                     "naive,bogus", "--out", str(tmp_path / "bad"), timeout=60)  # fmt: skip
    assert bad.returncode != 0 and "unknown peer 'bogus'" in bad.stderr
