"""Mixed socialrec traffic: 70% content, 20% friends, 10% writes; users drawn Zipf-like.

Writes carry a request_id and are retried with it after a retryable status (GrpcUser.write).

Tasks only; channels, timing, id pools, write logs and the steps shape live in grpc_user.py.
"""

from __future__ import annotations

import time

from locust import task
from socialrec.loadtest.grpc_user import GrpcUser, StepsShape  # noqa: F401  (shape: SOCIALREC_SHAPE=steps)

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc


class RecommenderUser(GrpcUser):
    """One app backend calling the Recommender back to back (closed loop, no think time)."""

    stub_class = pb_grpc.RecommenderStub

    @task(70)
    def recommend_content(self) -> None:
        self.call(
            "RecommendContent", pb.RecommendContentRequest(user_id=self.user(), k=self.settings.k)
        )

    @task(20)
    def recommend_friends(self) -> None:
        self.call(
            "RecommendFriends", pb.RecommendFriendsRequest(user_id=self.user(), k=self.settings.k)
        )

    @task(7)
    def log_interaction(self) -> None:
        user, item, ts = self.user(), self.written_item(), int(time.time() * 1000)
        weight = float(self.rng.randint(1, 5))
        req = pb.LogInteractionRequest(user_id=user, item_id=item, weight=weight, timestamp_ms=ts)
        reply, attempts = self.write("LogInteraction", req)
        if reply is not None:
            self.log_write(
                {"type": "interaction", "event_id": reply.event_id, "user": user, "item": item,
                 "weight": weight, "ts": ts, "request_id": req.request_id, "attempts": attempts}
            )  # fmt: skip

    @task(3)
    def add_friendship(self) -> None:
        user, friend = self.user(), self.user()
        if user == friend:
            return
        req = pb.FriendshipRequest(user_id=user, friend_id=friend)
        reply, attempts = self.write("AddFriendship", req)
        if reply is not None:
            self.log_write(
                {"type": "friend_add", "user": user, "friend": friend,
                 "request_id": req.request_id, "attempts": attempts}
            )  # fmt: skip
