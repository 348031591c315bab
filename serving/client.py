"""Client-side helpers shared by load tests and benchmarks (no torch)."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "socialrec.v1.Recommender"


def wait_serving(
    address: str,
    timeout_s: float = 120.0,
    alive: Callable[[], bool] | None = None,
    describe: Callable[[], str] = str,
) -> None:
    """Poll gRPC health until the Recommender service is SERVING; raise RuntimeError if the
    server exits first (``alive`` says False) or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    req = health_pb2.HealthCheckRequest(service=SERVICE)
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError(f"server at {address} exited before serving:\n{describe()}")
            try:
                if stub.Check(req, timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)  # poll interval
    raise RuntimeError(f"server at {address} not SERVING after {timeout_s}s:\n{describe()}")
