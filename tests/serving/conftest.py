"""Fixtures of the server's in-process tier: a small trained bundle and the servicer behind a
real grpc.aio server on an OS-assigned port, in the test process, over a real redis-server."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from socialrec.serving.config import ServerConfig
from socialrec.serving.observability import Metrics
from socialrec.serving.servicer import RecommenderService
from socialrec.serving.store import FeatureStore
from socialrec.serving.worker import EngineHolder, build_server, store_config

from socialrec.v1 import recommender_pb2_grpc as pb_grpc

TOKEN = "in-process-token"
_metrics: Metrics | None = None


def shared_metrics() -> Metrics:
    """One Metrics per test process (Prometheus registers each name once per process)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


class InProcessServer:
    """The servicer behind a started grpc.aio server, on an event loop in a thread of its own."""

    def __init__(self, cfg: ServerConfig, load: bool = True, metrics: bool = False) -> None:
        self.cfg = cfg
        self.metrics = shared_metrics() if metrics else None
        self.holder = EngineHolder(cfg, metrics=self.metrics)
        if load:
            assert self.holder.load(Path(cfg.bundle))
        self.store = FeatureStore(store_config(cfg))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server, self.health, self.port = self._call(self._build())
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.RecommenderStub(self.channel)

    async def _build(self):
        service = RecommenderService(self.cfg, self.holder, self.store, self.metrics)
        server, health, port = build_server(replace(self.cfg, port=0), service)
        await server.start()
        return server, health, port

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def count(self, method: str, code: str) -> float:
        """socialrec_requests_total{method, code} so far (needs metrics=True)."""
        assert self.metrics is not None
        return self.metrics.requests.labels(method, code)._value.get()

    def close(self) -> None:
        self.channel.close()
        self._call(self.server.stop(grace=None))
        self._call(self.store.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.store.close()


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory) -> Path:
    """A small trained run's fp32 bundle (synthetic data, a few seconds to train)."""
    from socialrec.compression.export import export_run
    from socialrec.training.data import DataConfig
    from socialrec.training.run import RunConfig, run
    from socialrec.training.train import TrainConfig

    out = tmp_path_factory.mktemp("run")
    data = DataConfig(synthetic_users=300, synthetic_items=200, synthetic_interactions=6000, seed=3)
    cfg = RunConfig(
        out=str(out), data=data, train=TrainConfig(dim=16, epochs=4, threads=1, refit=False),
        progress=False,
    )  # fmt: skip
    run(cfg)
    export_run(out)
    return out / "bundle"


@pytest.fixture
def server_config(small_bundle: Path, redis_server) -> ServerConfig:
    """A server config over the small bundle, the session Redis and a namespace of its own."""
    return ServerConfig(
        bundle=str(small_bundle),
        redis_url=redis_server.url,
        namespace=f"svc-{uuid.uuid4().hex[:8]}",
        max_k=50,
        write_token=TOKEN,
    )


@pytest.fixture
def inproc() -> Iterator[Callable[..., InProcessServer]]:
    """A factory of in-process servers, all closed at teardown."""
    made: list[InProcessServer] = []

    def make(cfg: ServerConfig, **kw) -> InProcessServer:
        s = InProcessServer(cfg, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture(scope="module")
def module_server(small_bundle: Path, redis_server) -> Iterator[InProcessServer]:
    """One in-process server (with metrics) for a whole module, e.g. for Hypothesis tests."""
    cfg = ServerConfig(
        bundle=str(small_bundle),
        redis_url=redis_server.url,
        namespace=f"svc-{uuid.uuid4().hex[:8]}",
        max_k=50,
        write_token=TOKEN,
    )
    s = InProcessServer(cfg, metrics=True)
    yield s
    s.close()
