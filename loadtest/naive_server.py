"""The naive peer: the same gRPC API served the way a newcomer would write it.

A synchronous ``grpc.server`` on a thread pool, the fp32 torch teacher in eager mode, and
brute-force numpy scoring over every item / user (``u @ V.T``, then a full argsort). It reads
and writes the same Redis through :class:`serving.store.FeatureStore`, so both servers see
the same features; what differs is only how the answer is computed and served. No ONNX, no
FAISS, one process. Used by ``socialrec loadtest`` as the side-by-side baseline (docs/design.md, Performance rules).

Torch runs on one thread, like our workers: the comparison then measures the serving design,
not thread oversubscription on a shared machine (it can only make the peer look better).
"""

from __future__ import annotations

import argparse
import hmac
import math
import os
import signal
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from socialrec.serving.store import FeatureStore, StoreConfig, StoreUnavailable

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc

VERSION = "naive-torch"
MAX_K = 500


class NaiveModel:
    """Teacher in eager mode plus every candidate vector as a dense numpy matrix."""

    def __init__(self, run_dir: str | Path, max_history: int = 256, max_friends: int = 256):
        from socialrec.training.train import load_checkpoint

        run = Path(run_dir)
        self.model, _ = load_checkpoint(run / "teacher.pt")
        self.user_ids = np.load(run / "user_ids.npy", allow_pickle=False).tolist()
        self.item_ids = np.load(run / "item_ids.npy", allow_pickle=False).tolist()
        self.user_index = {u: j for j, u in enumerate(self.user_ids)}
        self.item_index = {i: j for j, i in enumerate(self.item_ids)}
        with torch.no_grad():
            self.V = self.model.item_vectors().numpy()  # (I, D + 1)
            self.U = self.model.user_vectors().numpy()  # (U, D + 1)
        self.max_history, self.max_friends = max_history, max_friends

    def vectors(
        self, history: list[tuple[str, float]], friends: list[str]
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Content and friend query vectors (with the bias slot) and whether it's cold start."""
        h = [
            (self.item_index[i], w) for i, w in history[: self.max_history] if i in self.item_index
        ]
        f = [self.user_index[u] for u in friends[: self.max_friends] if u in self.user_index]
        hist_ids = torch.tensor([[j for j, _ in h] or [0]], dtype=torch.long)  # (1, L)
        hist_w = torch.tensor([[w for _, w in h] or [0.0]], dtype=torch.float32)  # (1, L)
        friend_ids = torch.tensor([f or [0]], dtype=torch.long)  # (1, F)
        friend_w = torch.tensor([[1.0] * len(f) or [0.0]], dtype=torch.float32)  # (1, F)
        with torch.no_grad():
            u_c, u_f = self.model.user_tower(hist_ids, hist_w, friend_ids, friend_w)  # (1, D)
        one = np.ones(1, np.float32)
        return (
            np.concatenate([u_c[0].numpy(), one]),
            np.concatenate([u_f[0].numpy(), one]),
            not h and not f,
        )


class NaiveService(pb_grpc.RecommenderServicer):
    """Validation and auth as the contract asks; scoring by brute force."""

    def __init__(self, model: NaiveModel, store: FeatureStore, token: str | None) -> None:
        self.m = model
        self.store = store
        self.token = token

    def _check(self, context, user_id: str, k: int) -> None:
        if not user_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id must be a non-empty string")
        if k <= 0 or k > MAX_K:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k must be between 1 and {MAX_K}")

    def _auth(self, context) -> None:
        got = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not self.token or not hmac.compare_digest(got, f"Bearer {self.token}"):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    def _read(self, user_id: str, with_fof: bool):
        try:
            return self.store.read(user_id, with_fof=with_fof), False
        except StoreUnavailable:
            return None, True

    def RecommendContent(self, request, context):
        self._check(context, request.user_id, request.k)
        feats, degraded = self._read(request.user_id, False)
        history = feats.history if feats else []
        friends = feats.friends if feats else []
        u_c, _, cold = self.m.vectors(history, friends)
        scores = self.m.V @ u_c  # (I,)
        seen = {self.m.item_index[i] for i, _ in history if i in self.m.item_index}
        out = []
        for j in np.argsort(-scores).tolist():
            if j not in seen:
                out.append(pb.Recommendation(id=self.m.item_ids[j], score=float(scores[j])))
                if len(out) == request.k:
                    break
        return pb.RecommendContentResponse(
            items=out, bundle_version=VERSION, cold_start=cold, degraded=degraded
        )

    def RecommendFriends(self, request, context):
        self._check(context, request.user_id, request.k)
        feats, degraded = self._read(request.user_id, True)
        history = feats.history if feats else []
        friends = feats.friends if feats else []
        fof = feats.fof if feats else {}
        _, u_f, cold = self.m.vectors(history, friends)
        mutual = np.zeros(len(self.m.user_ids), np.float32)  # (U,)
        for u, n in fof.items():
            if u in self.m.user_index:
                mutual[self.m.user_index[u]] = n
        scores = self.m.U @ u_f + np.log1p(mutual)  # (U,)
        banned = {self.m.user_index[u] for u in friends if u in self.m.user_index}
        banned.add(self.m.user_index.get(request.user_id, -1))
        out = []
        for j in np.argsort(-scores).tolist():
            if j not in banned:
                m = int(mutual[j])
                out.append(
                    pb.Recommendation(
                        id=self.m.user_ids[j], score=float(scores[j]), mutual_friends=m
                    )
                )
                if len(out) == request.k:
                    break
        return pb.RecommendFriendsResponse(
            users=out, bundle_version=VERSION, cold_start=cold, degraded=degraded
        )

    def LogInteraction(self, request, context):
        self._auth(context)
        if not request.user_id or not request.item_id or not math.isfinite(request.weight):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad user_id, item_id or weight")
        ts = request.timestamp_ms or int(time.time() * 1000)
        try:
            eid = self.store.log_interaction(
                request.user_id, request.item_id, float(request.weight), ts, request.request_id
            )
        except StoreUnavailable as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return pb.LogInteractionResponse(event_id=eid)

    def _friend(self, request, context, fn):
        self._auth(context)
        if not request.user_id or not request.friend_id or request.user_id == request.friend_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad user_id or friend_id")
        try:
            fn(request.user_id, request.friend_id, int(time.time() * 1000), request.request_id)
        except StoreUnavailable as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return pb.FriendshipResponse()

    def AddFriendship(self, request, context):
        return self._friend(request, context, self.store.add_friendship)

    def RemoveFriendship(self, request, context):
        return self._friend(request, context, self.store.remove_friendship)


def serve(
    run_dir: str,
    redis_url: str,
    namespace: str,
    port: int,
    threads: int = 8,
    cluster: bool = False,
) -> None:
    """Serve until SIGTERM/SIGINT."""
    torch.set_num_threads(1)
    model = NaiveModel(run_dir)
    # plain redis-py, as a newcomer would write it (socialrec's server has its own async client)
    store = FeatureStore(StoreConfig(url=redis_url, namespace=namespace, cluster=cluster))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads))
    pb_grpc.add_RecommenderServicer_to_server(
        NaiveService(model, store, os.environ.get("SOCIALREC_WRITE_TOKEN")), server
    )
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    for name in ("", "socialrec.v1.Recommender"):
        hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2.0).wait()
    store.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run directory with teacher.pt")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--namespace", default="socialrec")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--redis-cluster", action="store_true", help="--redis-url names a cluster node")
    a = p.parse_args(argv)
    serve(a.run, a.redis_url, a.namespace, a.port, a.threads, a.redis_cluster)


if __name__ == "__main__":
    main()  # run.py sets OMP/BLAS threads to 1 in the environment (numpy reads it at import)
