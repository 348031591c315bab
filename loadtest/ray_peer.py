"""The Ray Serve peer: the same gRPC API on the same bundle, served through Ray Serve's gRPC proxy.

What a team would pick instead of writing a server: a ``@serve.deployment`` class whose methods
are named after the RPCs of ``socialrec.v1.Recommender`` and take and return its protobuf
messages, behind Ray Serve's gRPC proxy (``serve.start(grpc_options=gRPCOptions(...))``, as
Ray's gRPC guide shows). Each replica holds the bundle's ONNX Runtime user tower and FAISS
indexes (opened with :func:`serving.bundle.open_bundle`, checksums verified) and reads and
writes the same Redis through :class:`serving.store.FeatureStore`, like the naive peer
(loadtest/naive_server.py), with the naive peer's semantics: the same features in, the same
filters, so for an exact (flat) index the same ids out. Used by ``socialrec loadtest --peers
naive,ray`` as the side-by-side peer users would pick (docs/benchmarks.md "Ray Serve peer").

ONNX Runtime and FAISS run on one thread per call, like our workers and the naive peer: the
comparison then measures the serving design, not thread oversubscription on a shared machine.

    python -m socialrec.loadtest.ray_peer --bundle B --redis-url U --port P --replicas 2

starts a local Ray head (``--num-cpus``, default the replica count), deploys, checks one call
through its own proxy, prints ``ray peer serving on 127.0.0.1:P`` and blocks until SIGTERM.
Needs the ``peer`` extra (``pip install -e ".[peer]"``).
"""

from __future__ import annotations

import argparse
import hmac
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import faiss
import grpc
import numpy as np
import onnxruntime as ort
import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions
from ray.serve.grpc_util import RayServegRPCContext
from socialrec.serving.bundle import TOWER_OUTPUTS, open_bundle
from socialrec.serving.engine import session_options
from socialrec.serving.redis_local import find_free_port
from socialrec.serving.store import FeatureStore, StoreConfig, StoreUnavailable

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc

SERVICER = "socialrec.v1.recommender_pb2_grpc.add_RecommenderServicer_to_server"
READY = "ray peer serving on"
MAX_K = 500
APP = "socialrec-ray-peer"

if __name__ == "__main__":
    # `python -m`: run the installed module's main before this copy defines the deployment,
    # so Ray pickles the deployment class by reference (the replicas import the package)
    # instead of by value from __main__.
    from socialrec.loadtest.ray_peer import main

    sys.exit(main())

_tls = threading.local()


def _pin_thread() -> None:
    """FAISS's OpenMP setting is per thread: Serve runs sync methods on a thread pool."""
    if not getattr(_tls, "pinned", False):
        faiss.omp_set_num_threads(1)
        _tls.pinned = True


class BundleModel:
    """A bundle's ONNX user tower and FAISS indexes, scored with the naive peer's semantics."""

    def __init__(self, bundle_dir: str | Path, max_history: int = 256, max_friends: int = 256):
        b = open_bundle(bundle_dir)
        self.version = b.version
        self.session = ort.InferenceSession(
            str(b.path("user_tower.onnx")), session_options(), providers=["CPUExecutionProvider"]
        )
        self.items = faiss.read_index(str(b.path("items.faiss")))
        self.users = faiss.read_index(str(b.path("users.faiss")))
        self.item_ids, self.user_ids = b.item_ids, b.user_ids
        self.item_index = {i: j for j, i in enumerate(self.item_ids)}
        self.user_index = {u: j for j, u in enumerate(self.user_ids)}
        self.max_history, self.max_friends = max_history, max_friends

    def vectors(
        self, history: list[tuple[str, float]], friends: list[str]
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Content and friend query vectors (1, D + 1) and whether it is cold start: the naive
        peer's features (first max_history known items, first max_friends known friends)."""
        h = [
            (self.item_index[i], w) for i, w in history[: self.max_history] if i in self.item_index
        ]
        f = [self.user_index[u] for u in friends[: self.max_friends] if u in self.user_index]
        feeds = {
            "hist_ids": np.array([[j for j, _ in h] or [0]], dtype=np.int64),  # (1, L)
            "hist_w": np.array([[w for _, w in h] or [0.0]], dtype=np.float32),  # (1, L)
            "friend_ids": np.array([f or [0]], dtype=np.int64),  # (1, F)
            "friend_w": np.array([[1.0] * len(f) or [0.0]], dtype=np.float32),  # (1, F)
        }
        _pin_thread()
        u_c, u_f = self.session.run(list(TOWER_OUTPUTS), feeds)  # (1, D + 1) each
        return (
            np.ascontiguousarray(u_c, np.float32),
            np.ascontiguousarray(u_f, np.float32),
            not h and not f,
        )

    def content(self, u_c: np.ndarray, history: list[tuple[str, float]], k: int):
        """Top-k (item index, score) by inner product, never an item of the history."""
        seen = {self.item_index[i] for i, _ in history if i in self.item_index}
        n = self.items.ntotal
        kk = min(n, k + len(seen))
        while True:
            D, I = self.items.search(u_c, kk)  # noqa: E741  (1, kk) each
            top = [(j, s) for j, s in zip(I[0].tolist(), D[0].tolist(), strict=True)
                   if j >= 0 and j not in seen]  # fmt: skip
            if len(top) >= k or kk >= n:
                return top[:k]
            kk = min(n, 2 * kk)

    def friends(
        self, u_f: np.ndarray, user_id: str, friends: list[str], fof: dict[str, int], k: int
    ):
        """Top-k (user index, score, mutual) by inner product + log1p(mutual friends), never
        the user or a friend. Candidates: the nearest users by inner product plus every
        friend-of-friend; the bonus is never negative, so the union holds the exact top-k of
        the naive peer's full scan for an exact index."""
        banned = {self.user_index[u] for u in friends if u in self.user_index}
        banned.add(self.user_index.get(user_id, -1))
        mutual = {self.user_index[u]: n for u, n in fof.items() if u in self.user_index}
        n = self.users.ntotal
        kk = min(n, k + len(banned))
        while True:
            _, I = self.users.search(u_f, kk)  # noqa: E741  (1, kk)
            cand = dict.fromkeys(j for j in I[0].tolist() if j >= 0 and j not in banned)
            cand.update(dict.fromkeys(j for j in mutual if j not in banned))
            if len(cand) >= k or kk >= n:
                break
            kk = min(n, 2 * kk)
        idx = np.fromiter(cand, dtype=np.int64, count=len(cand))  # (C,)
        m = np.array([mutual.get(j, 0) for j in cand], dtype=np.float32)  # (C,)
        scores = self.users.reconstruct_batch(idx) @ u_f[0] + np.log1p(m)  # (C,)
        order = np.argsort(-scores)[:k]
        return [(int(idx[o]), float(scores[o]), int(m[o])) for o in order.tolist()]


class _Abort(Exception):
    """Raised after the gRPC status is set on the context: Serve sends that status."""


def _abort(ctx: RayServegRPCContext, code: grpc.StatusCode, details: str) -> None:
    ctx.set_code(code)
    ctx.set_details(details)
    raise _Abort(details)


@serve.deployment
class RecommenderDeployment:
    """One replica: the bundle's tower and indexes plus a Redis client; sync methods (Serve
    runs them on its thread pool, up to max_ongoing_requests at once)."""

    def __init__(
        self, bundle: str, redis_url: str, namespace: str, cluster: bool, token: str | None
    ) -> None:
        self.m = BundleModel(bundle)
        self.store = FeatureStore(StoreConfig(url=redis_url, namespace=namespace, cluster=cluster))
        self.token = token

    def _check(self, ctx: RayServegRPCContext, user_id: str, k: int) -> None:
        if not user_id:
            _abort(ctx, grpc.StatusCode.INVALID_ARGUMENT, "user_id must be a non-empty string")
        if k <= 0 or k > MAX_K:
            _abort(ctx, grpc.StatusCode.INVALID_ARGUMENT, f"k must be between 1 and {MAX_K}")

    def _auth(self, ctx: RayServegRPCContext) -> None:
        got = dict(ctx.invocation_metadata() or ()).get("authorization", "")
        if not self.token or not hmac.compare_digest(got, f"Bearer {self.token}"):
            _abort(ctx, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    def _read(self, user_id: str, with_fof: bool):
        try:
            return self.store.read(user_id, with_fof=with_fof), False
        except StoreUnavailable:
            return None, True

    def RecommendContent(
        self, request: pb.RecommendContentRequest, grpc_context: RayServegRPCContext
    ) -> pb.RecommendContentResponse:
        self._check(grpc_context, request.user_id, request.k)
        feats, degraded = self._read(request.user_id, False)
        history = feats.history if feats else []
        friends = feats.friends if feats else []
        u_c, _, cold = self.m.vectors(history, friends)
        top = self.m.content(u_c, history, request.k)
        items = [pb.Recommendation(id=self.m.item_ids[j], score=s) for j, s in top]
        return pb.RecommendContentResponse(
            items=items, bundle_version=self.m.version, cold_start=cold, degraded=degraded
        )

    def RecommendFriends(
        self, request: pb.RecommendFriendsRequest, grpc_context: RayServegRPCContext
    ) -> pb.RecommendFriendsResponse:
        self._check(grpc_context, request.user_id, request.k)
        feats, degraded = self._read(request.user_id, True)
        history = feats.history if feats else []
        friends = feats.friends if feats else []
        fof = feats.fof if feats else {}
        _, u_f, cold = self.m.vectors(history, friends)
        top = self.m.friends(u_f, request.user_id, friends, fof, request.k)
        users = [pb.Recommendation(id=self.m.user_ids[j], score=s, mutual_friends=n)
                 for j, s, n in top]  # fmt: skip
        return pb.RecommendFriendsResponse(
            users=users, bundle_version=self.m.version, cold_start=cold, degraded=degraded
        )

    def LogInteraction(
        self, request: pb.LogInteractionRequest, grpc_context: RayServegRPCContext
    ) -> pb.LogInteractionResponse:
        self._auth(grpc_context)
        if not request.user_id or not request.item_id or not math.isfinite(request.weight):
            _abort(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, "bad user_id, item_id or weight")
        ts = request.timestamp_ms or int(time.time() * 1000)
        try:
            eid = self.store.log_interaction(
                request.user_id, request.item_id, float(request.weight), ts, request.request_id
            )
        except StoreUnavailable as e:
            _abort(grpc_context, grpc.StatusCode.UNAVAILABLE, str(e))
        return pb.LogInteractionResponse(event_id=eid)

    def _friend(self, request: pb.FriendshipRequest, ctx: RayServegRPCContext, fn):
        self._auth(ctx)
        if not request.user_id or not request.friend_id or request.user_id == request.friend_id:
            _abort(ctx, grpc.StatusCode.INVALID_ARGUMENT, "bad user_id or friend_id")
        try:
            fn(request.user_id, request.friend_id, int(time.time() * 1000), request.request_id)
        except StoreUnavailable as e:
            _abort(ctx, grpc.StatusCode.UNAVAILABLE, str(e))
        return pb.FriendshipResponse()

    def AddFriendship(
        self, request: pb.FriendshipRequest, grpc_context: RayServegRPCContext
    ) -> pb.FriendshipResponse:
        return self._friend(request, grpc_context, self.store.add_friendship)

    def RemoveFriendship(
        self, request: pb.FriendshipRequest, grpc_context: RayServegRPCContext
    ) -> pb.FriendshipResponse:
        return self._friend(request, grpc_context, self.store.remove_friendship)


def _probe(address: str, user_id: str, timeout_s: float) -> None:
    """One RecommendContent through the proxy; retried until it answers OK (routes reach the
    proxy a moment after the application is RUNNING)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        while True:
            try:
                stub.RecommendContent(pb.RecommendContentRequest(user_id=user_id, k=1), timeout=5)
                return
            except grpc.RpcError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray peer at {address} does not answer: {e}") from e
                time.sleep(0.2)


def serve_peer(
    bundle: str,
    redis_url: str,
    namespace: str,
    port: int,
    replicas: int = 2,
    max_ongoing_requests: int = 8,
    num_cpus: int | None = None,
    cluster: bool = False,
) -> None:
    """Start a local Ray head, deploy, check one call, print the ready line, serve until
    SIGTERM/SIGINT, then shut Serve and Ray down."""
    user = open_bundle(bundle).user_ids[0]  # a clear BundleError before Ray starts
    ray.init(
        num_cpus=num_cpus or replicas,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    stop = threading.Event()  # handlers after ray.init, which installs its own
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        serve.start(
            http_options=HTTPOptions(host="127.0.0.1", port=find_free_port()),
            grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[SERVICER]),
        )
        app = RecommenderDeployment.options(
            num_replicas=replicas,
            max_ongoing_requests=max_ongoing_requests,
            ray_actor_options={"num_cpus": 1},
        ).bind(
            str(Path(bundle).resolve()),
            redis_url,
            namespace,
            cluster,
            os.environ.get("SOCIALREC_WRITE_TOKEN"),
        )
        serve.run(app, name=APP)
        address = f"127.0.0.1:{port}"
        _probe(address, user, 60.0)
        print(f"{READY} {address} (replicas {replicas}, pid {os.getpid()})", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="bundle directory (manifest.json, ...)")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--namespace", default="socialrec")
    p.add_argument("--port", type=int, required=True, help="the gRPC proxy's port")
    p.add_argument("--replicas", type=int, default=2, help="deployment replicas (processes)")
    p.add_argument("--max-ongoing-requests", type=int, default=8, help="per replica")
    p.add_argument("--num-cpus", type=int, default=None, help="Ray's CPUs (default: replicas)")
    p.add_argument("--redis-cluster", action="store_true", help="--redis-url names a cluster node")
    a = p.parse_args(argv)
    if (
        a.replicas <= 0
        or a.max_ongoing_requests <= 0
        or (a.num_cpus is not None and a.num_cpus < a.replicas)
    ):
        p.error("--replicas and --max-ongoing-requests must be positive, --num-cpus >= --replicas")
    serve_peer(a.bundle, a.redis_url, a.namespace, a.port, a.replicas, a.max_ongoing_requests,
               a.num_cpus, a.redis_cluster)  # fmt: skip
