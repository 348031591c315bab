"""Locust side of test_grpc_user.py, run in its own process: importing locust monkey-patches
the whole interpreter with gevent (and grpc_user switches gRPC to gevent mode), which must not
leak into the pytest process. Calls a canned server at argv[1] through LocustInterceptor and
prints, as JSON, the events it fired and what the calls returned."""

from __future__ import annotations

import json
import random
import sys
from types import SimpleNamespace

import grpc
from socialrec.loadtest.grpc_user import LocustInterceptor, RpcStatusError, ZipfIds

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc


def main(address: str, ids_path: str) -> None:
    fired: list[dict] = []
    env = SimpleNamespace(events=SimpleNamespace(request=SimpleNamespace(fire=fired.append)))
    env.events.request.fire = lambda **kw: fired.append(kw)
    channel = grpc.intercept_channel(grpc.insecure_channel(address), LocustInterceptor(env))
    stub = pb_grpc.RecommenderStub(channel)
    out: dict = {}
    reply = stub.RecommendContent(pb.RecommendContentRequest(user_id="u", k=2), timeout=5)
    out["content_reply_size"] = reply.ByteSize()
    out["content_version"] = reply.bundle_version
    try:
        stub.RecommendFriends(pb.RecommendFriendsRequest(user_id="u", k=2), timeout=5)
        out["friends_raised"] = None
    except grpc.RpcError as e:
        out["friends_raised"] = e.code().name
    out["events"] = [
        {
            **{k: v for k, v in ev.items() if k not in ("exception", "response", "context")},
            "exception": str(ev["exception"]) if ev["exception"] is not None else None,
            "exception_is_status": isinstance(ev["exception"], RpcStatusError),
            "exception_code": getattr(ev["exception"], "code", grpc.StatusCode.OK).name,
        }
        for ev in fired
    ]
    pool = ZipfIds(ids_path, 1.1, seed=3)
    rng = random.Random(0)
    draws = [pool.draw(rng) for _ in range(20_000)]
    out["zipf"] = {"ranked": pool.ids, "counts": {u: draws.count(u) for u in pool.ids}}
    channel.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
