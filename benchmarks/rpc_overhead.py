"""Server CPU per trivial RPC under grpc.aio: services added as registered methods (what the
generated ``add_*_to_server`` functions do) against generic handlers only (how the server's
``serving.servicer.Dispatcher`` adds the Recommender), measured side by side in alternating
rounds.

Why: grpc.aio keeps one pending request per registered method and ``asyncio.wait``s on all of
them for every call it accepts; with the Recommender, Health and reflection services that is
~9 futures per call. Each round starts a one-process server with the three services and a
handler that returns an empty reply, drives it from an asyncio client process with
``--concurrency`` channels for ``--seconds``, and reads the server's CPU time (psutil).

    python benchmarks/rpc_overhead.py [--rounds 5] [--seconds 6] [--concurrency 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import time

import grpc
import psutil
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from socialrec.serving.redis_local import find_free_port

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc

EMPTY = pb.RecommendContentResponse()
SERVICE = pb.DESCRIPTOR.services_by_name["Recommender"].full_name


class GenericOnly:
    """A server as the generated ``add_*_to_server`` functions see it, keeping only the
    generic handler they add (not the registered-method copy)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        pass  # served through the generic handler added alongside


class _Trivial(pb_grpc.RecommenderServicer):
    async def RecommendContent(self, request, context):  # noqa: N802 (gRPC method name)
        return EMPTY


def _serve(mode: str, port: int, ready) -> None:
    async def main() -> None:
        server = grpc.aio.server(maximum_concurrent_rpcs=256)
        target = GenericOnly(server) if mode == "generic" else server
        pb_grpc.add_RecommenderServicer_to_server(_Trivial(), target)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), target)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), target
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of the (single-process) server."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def _drive(port: int, pid: int, concurrency: int, seconds: float) -> tuple[float, float]:
    """(calls per second, server CPU microseconds per call) over ``seconds`` of closed loop."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(concurrency)]
    stubs = [pb_grpc.RecommenderStub(c) for c in channels]
    req = pb.RecommendContentRequest(user_id="u", k=10)
    for stub in stubs:  # connect and warm up outside the timed window
        for _ in range(20):
            await stub.RecommendContent(req)
    calls = 0
    stop = 0.0

    async def loop(stub) -> None:
        nonlocal calls
        while time.perf_counter() < stop:
            await stub.RecommendContent(req)
            calls += 1

    c0, t0 = _cpu_s(pid), time.perf_counter()
    stop = t0 + seconds
    await asyncio.gather(*(loop(s) for s in stubs))
    dt, cpu = time.perf_counter() - t0, _cpu_s(pid) - c0
    for c in channels:
        await c.close()
    return calls / dt, 1e6 * cpu / max(calls, 1)


def _round(mode: str, concurrency: int, seconds: float) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    port = find_free_port()
    proc = ctx.Process(target=_serve, args=(mode, port, ready), daemon=True)
    proc.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("server did not start")
        return asyncio.run(_drive(port, proc.pid, concurrency, seconds))
    finally:
        proc.kill()
        proc.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {"registered": [], "generic": []}
    for r in range(a.rounds):
        for mode in runs:
            rps, us = _round(mode, a.concurrency, a.seconds)
            runs[mode].append((rps, us))
            print(f"round {r + 1}/{a.rounds} {mode:10s} {rps:7.0f} calls/s  {us:6.1f} us CPU/call")
    med = {m: statistics.median(us for _, us in v) for m, v in runs.items()}
    ratio = med["registered"] / med["generic"]
    print(
        f"median server CPU per call: registered {med['registered']:.1f} us, "
        f"generic {med['generic']:.1f} us, registered / generic = {ratio:.3f}"
    )
    if a.json:
        out = {
            "setup": {
                **vars(a),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "grpc": grpc.__version__,
            },  # fmt: skip
            "rounds": {
                m: [{"rps": round(x, 1), "cpu_us_per_call": round(y, 1)} for x, y in v]
                for m, v in runs.items()
            },  # fmt: skip
            "median_cpu_us_per_call": {m: round(v, 1) for m, v in med.items()},
            "registered_over_generic": round(ratio, 3),
        }
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
