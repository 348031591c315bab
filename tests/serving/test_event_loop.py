"""`serve --event-loop`: each worker runs uvloop (the default) or the standard asyncio loop."""

from __future__ import annotations

import asyncio
import json

import pytest
import uvloop
from socialrec.serving.harness import ServerProcess
from socialrec.serving.worker import event_loop_factory

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc

from ..conftest import socialrec_cli


def test_event_loop_factory_names_the_loop() -> None:
    assert event_loop_factory("uvloop") is uvloop.new_event_loop
    assert event_loop_factory("asyncio") is None  # asyncio.Runner's default loop
    with pytest.raises(ValueError, match="'uvloop' or 'asyncio'"):
        event_loop_factory("trio")
    loop = event_loop_factory("uvloop")()
    try:
        assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
    finally:
        loop.close()


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_a_worker_serves_on_the_loop_it_was_given(kind, small_bundle, redis_server) -> None:
    args = ["--bundle", str(small_bundle), "--redis-url", redis_server.url, "--workers", "1",
            "--event-loop", kind]  # fmt: skip
    with ServerProcess(args) as s, s.channel() as ch:
        user = (small_bundle / "user_ids.txt").read_text().split("\n")[0]
        reply = pb_grpc.RecommenderStub(ch).RecommendContent(
            pb.RecommendContentRequest(user_id=user, k=5), timeout=10
        )
        assert len(reply.items) == 5
        lines = [json.loads(x) for x in s.log_text().splitlines() if x.startswith("{")]
        listening = [x for x in lines if x.get("event") == "listening"]
        assert listening and all(x["loop"] == kind for x in listening), listening


def test_serve_rejects_an_unknown_loop() -> None:
    r = socialrec_cli("serve", "--event-loop", "trio", "--bundle", "x", timeout=60)
    assert r.returncode == 2 and "invalid choice: 'trio'" in r.stderr
