"""The Locust interceptor against a tiny in-process gRPC server with canned answers.

The server runs here; the Locust side runs in a child process (interceptor_probe.py),
because importing locust gevent-patches the interpreter it is imported into.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest

if importlib.util.find_spec("locust") is None:  # found, not imported: importing it would
    pytest.skip("locust not installed", allow_module_level=True)  # gevent-patch pytest

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
CANNED = pb.RecommendContentResponse(
    items=[pb.Recommendation(id="i1", score=2.0), pb.Recommendation(id="i2", score=1.0)],
    bundle_version="canned",
)


class Canned(pb_grpc.RecommenderServicer):
    """Content: a fixed reply; friends: always INVALID_ARGUMENT."""

    def RecommendContent(self, request, context):
        return CANNED

    def RecommendFriends(self, request, context):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "canned refusal")


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_RecommenderServicer_to_server(Canned(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ids = tmp_path_factory.mktemp("ids") / "ids.txt"
    ids.write_text("".join(f"u{j}\n" for j in range(100)))
    try:
        r = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("interceptor_probe.py")),
             f"127.0.0.1:{port}", str(ids)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        server.stop(None)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_ok_call_fires_one_success_event(probe) -> None:
    assert probe["content_version"] == "canned"
    ok = [ev for ev in probe["events"] if ev["name"] == "RecommendContent"]
    assert len(ok) == 1
    (ev,) = ok
    assert ev["request_type"] == "grpc"
    assert ev["exception"] is None
    assert ev["response_length"] == CANNED.ByteSize() == probe["content_reply_size"]
    assert 0 < ev["response_time"] < 5000  # milliseconds, under the call's 5 s deadline


def test_error_status_fires_failure_and_still_raises(probe) -> None:
    assert probe["friends_raised"] == "INVALID_ARGUMENT"  # the caller still sees the error
    bad = [ev for ev in probe["events"] if ev["name"] == "RecommendFriends"]
    assert len(bad) == 1
    (ev,) = bad
    assert ev["request_type"] == "grpc"
    assert ev["response_length"] == 0
    assert ev["exception_is_status"] and ev["exception_code"] == "INVALID_ARGUMENT"
    assert ev["exception"] == "INVALID_ARGUMENT: canned refusal"
    assert len(probe["events"]) == 2


def test_zipf_ids_favour_low_ranks(probe) -> None:
    ranked, counts = probe["zipf"]["ranked"], probe["zipf"]["counts"]
    assert sorted(ranked) == sorted(f"u{j}" for j in range(100))
    # P(rank 1) / P(rank 100) = 100^1.1 ~ 158; a wide margin for sampling noise
    assert counts[ranked[0]] > 50 * max(counts[ranked[-1]], 1)
    assert counts[ranked[0]] > counts[ranked[9]] > counts[ranked[99]]
