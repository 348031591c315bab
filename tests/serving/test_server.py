"""The gRPC server as a real process (2 workers) against a real redis-server on a free port."""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import signal
import subprocess
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from socialrec.serving.bundle import copy_bundle
from socialrec.serving.harness import NOT_SERVING, SERVING, ServerProcess
from socialrec.serving.redis_local import find_free_port, start_redis

from socialrec.v1 import recommender_pb2 as pb
from socialrec.v1 import recommender_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow  # the slow tier (make test-slow)

TOKEN = "test-token-123"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A small trained run with an exported fp32 bundle at RUN/bundle."""
    from socialrec.compression.export import export_run
    from socialrec.training.data import DataConfig
    from socialrec.training.run import RunConfig, run
    from socialrec.training.train import TrainConfig

    out = tmp_path_factory.mktemp("run")
    data = DataConfig(synthetic_users=400, synthetic_items=250, synthetic_interactions=8000, seed=5)
    cfg = RunConfig(
        out=str(out),
        data=data,
        train=TrainConfig(dim=16, epochs=6, threads=1, refit=False),
        progress=False,
    )
    run(cfg)
    export_run(out)
    return out


@pytest.fixture(scope="module")
def published(run_dir, redis_server) -> str:
    from socialrec.serving.publish import PublishConfig
    from socialrec.serving.publish import run as publish

    ns = f"srv-{uuid.uuid4().hex[:8]}"
    publish(
        PublishConfig(run=str(run_dir), redis_url=redis_server.url, namespace=ns, progress=False)
    )
    return ns


def start_server(
    bundle: Path, redis_url: str, namespace: str, workers: int = 2, *extra: str
) -> ServerProcess:
    """`socialrec serve` in a subprocess on free ports, started (not waited for)."""
    port = find_free_port()
    args = [
        "--bundle", str(bundle), "--redis-url", redis_url, "--namespace", namespace,
        "--workers", str(workers), "--max-k", "100", "--watch-interval", "0.3", *extra,
    ]  # fmt: skip
    return ServerProcess(
        args,
        port=port,
        metrics=True,
        env={"SOCIALREC_WRITE_TOKEN": TOKEN},
        log=Path(bundle).parent / f"server-{port}.log",
        ready_timeout_s=60.0,
    ).start()


@pytest.fixture(scope="module")
def server(run_dir, redis_server, published):
    s = start_server(run_dir / "bundle", redis_server.url, published, 2)
    try:
        s.wait_serving()
        yield s
    finally:
        s.stop()


def _user_ids(run_dir: Path) -> list[str]:
    return (run_dir / "bundle" / "user_ids.txt").read_text().split("\n")[:-1]


def _item_ids(run_dir: Path) -> list[str]:
    return (run_dir / "bundle" / "item_ids.txt").read_text().split("\n")[:-1]


def test_reads_every_rpc(server, run_dir) -> None:
    manifest = json.loads((run_dir / "bundle" / "manifest.json").read_text())
    user = _user_ids(run_dir)[3]
    with server.channel() as ch:
        stub = pb_grpc.RecommenderStub(ch)
        r = stub.RecommendContent(pb.RecommendContentRequest(user_id=user, k=10), timeout=5)
        assert len(r.items) == 10 and not r.cold_start and not r.degraded
        assert r.bundle_version == manifest["bundle_version"]
        scores = [x.score for x in r.items]
        assert scores == sorted(scores, reverse=True) and len({x.id for x in r.items}) == 10
        f = stub.RecommendFriends(pb.RecommendFriendsRequest(user_id=user, k=5), timeout=5)
        assert 0 < len(f.users) <= 5 and all(x.id != user for x in f.users)
        assert all(x.reason for x in f.users)


def test_writes_and_realtime_visibility_across_workers(server, run_dir) -> None:
    """A write is visible to the next read on any worker; cold start turns personal."""
    items = _item_ids(run_dir)
    users = _user_ids(run_dir)
    newbie = f"newbie-{uuid.uuid4().hex[:8]}"
    with server.channel() as ch:
        stub = pb_grpc.RecommenderStub(ch)
        cold = stub.RecommendContent(pb.RecommendContentRequest(user_id=newbie, k=10), timeout=5)
        assert cold.cold_start and len(cold.items) == 10
        logged = [cold.items[0].id, items[7], items[11]]
        for item in logged:
            r = stub.LogInteraction(
                pb.LogInteractionRequest(user_id=newbie, item_id=item, weight=3.0),
                metadata=AUTH,
                timeout=5,
            )
            assert r.event_id
        stub.AddFriendship(
            pb.FriendshipRequest(user_id=newbie, friend_id=users[0]), metadata=AUTH, timeout=5
        )
    workers = set()
    for _ in range(12):  # fresh connections land on both workers
        with server.channel() as ch:
            stub = pb_grpc.RecommenderStub(ch)
            r, call = stub.RecommendContent.with_call(
                pb.RecommendContentRequest(user_id=newbie, k=10), timeout=5
            )
            workers.add(dict(call.trailing_metadata())["x-socialrec-worker"])
            assert not r.cold_start
            assert not {x.id for x in r.items} & set(logged)  # seen items are excluded at once
            assert [x.id for x in r.items] != [x.id for x in cold.items]
            f = stub.RecommendFriends(pb.RecommendFriendsRequest(user_id=newbie, k=20), timeout=5)
            assert users[0] not in {x.id for x in f.users} and newbie not in {x.id for x in f.users}
    assert len(workers) == 2, workers
    with server.channel() as ch:
        stub = pb_grpc.RecommenderStub(ch)
        stub.RemoveFriendship(
            pb.FriendshipRequest(user_id=newbie, friend_id=users[0]), metadata=AUTH, timeout=5
        )


def _stage_count(server, method: str, stage: str) -> float:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    want = f'socialrec_stage_seconds_count{{method="{method}",stage="{stage}"}} '
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(want))


def test_result_cache_answers_repeats_and_never_hides_a_write(server, run_dir) -> None:
    """Repeated reads with unchanged features are cache hits with the same answer; a write
    changes the features, so the very next read is computed afresh and shows it."""
    items = _item_ids(run_dir)
    user = f"cached-{uuid.uuid4().hex[:8]}"
    hits0 = _stage_count(server, "RecommendContent", "cache")
    with server.channel() as ch:  # one connection: one worker, one cache
        stub = pb_grpc.RecommenderStub(ch)
        stub.LogInteraction(
            pb.LogInteractionRequest(user_id=user, item_id=items[3], weight=2.0),
            metadata=AUTH,
            timeout=5,
        )
        req = pb.RecommendContentRequest(user_id=user, k=10)
        answers = [stub.RecommendContent(req, timeout=5) for _ in range(3)]
        assert answers[0] == answers[1] == answers[2] and not answers[0].cold_start
        assert _stage_count(server, "RecommendContent", "cache") - hits0 == 2
        top = answers[0].items[0].id
        stub.LogInteraction(
            pb.LogInteractionRequest(user_id=user, item_id=top, weight=1.0),
            metadata=AUTH,
            timeout=5,
        )
        after = stub.RecommendContent(req, timeout=5)
        assert top not in {x.id for x in after.items}  # seen at once, not served from cache
        assert _stage_count(server, "RecommendContent", "cache") - hits0 == 2


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("RecommendContent", pb.RecommendContentRequest(user_id="u1", k=0), "k"),
        ("RecommendContent", pb.RecommendContentRequest(user_id="u1", k=101), "k"),
        ("RecommendContent", pb.RecommendContentRequest(user_id="", k=5), "user_id"),
        ("RecommendFriends", pb.RecommendFriendsRequest(user_id="u1", k=-3), "k"),
        (
            "LogInteraction",
            pb.LogInteractionRequest(user_id="u1", item_id="i1", weight=math.nan),
            "weight",
        ),
        (
            "LogInteraction",
            pb.LogInteractionRequest(user_id="u1", item_id="i1", weight=math.inf),
            "weight",
        ),
        (
            "LogInteraction",
            pb.LogInteractionRequest(user_id="u1", item_id="", weight=1.0),
            "item_id",
        ),
        ("AddFriendship", pb.FriendshipRequest(user_id="u1", friend_id="u1"), "friend_id"),
    ],
)
def test_invalid_argument_names_the_field(server, method, request_, field) -> None:
    with server.channel() as ch, pytest.raises(grpc.RpcError) as e:
        getattr(pb_grpc.RecommenderStub(ch), method)(request_, metadata=AUTH, timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


@pytest.mark.parametrize(
    "metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]
)
def test_writes_need_the_token(server, metadata) -> None:
    with server.channel() as ch, pytest.raises(grpc.RpcError) as e:
        pb_grpc.RecommenderStub(ch).LogInteraction(
            pb.LogInteractionRequest(user_id="u1", item_id="i1", weight=1.0),
            metadata=metadata,
            timeout=5,
        )
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_deadline_exceeded(server, redis_server, run_dir) -> None:
    """A request stuck behind a hung Redis (SIGSTOP) ends with DEADLINE_EXCEEDED at the client's
    deadline, and the server keeps serving once Redis answers again."""
    user = _user_ids(run_dir)[1]
    req = pb.RecommendContentRequest(user_id=user, k=5)
    redis_server.pause()
    try:
        with server.channel() as ch, pytest.raises(grpc.RpcError) as e:
            # The store's socket timeout is 0.25 s, so the read outlives this 0.1 s deadline.
            pb_grpc.RecommenderStub(ch).RecommendContent(req, timeout=0.1)
    finally:
        redis_server.resume()
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    with server.channel() as ch:
        stub = pb_grpc.RecommenderStub(ch)
        # Reads skip Redis briefly after a failure (circuit breaker), then come back.
        while stub.RecommendContent(req, timeout=5).degraded:
            assert time.monotonic() < deadline, "reads stayed degraded after Redis resumed"
            time.sleep(0.05)
    assert server.health() == SERVING


def test_reflection_lists_the_service(server) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with server.channel() as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        resp = next(iter(stub.ServerReflectionInfo(iter([req]), timeout=5)))
    names = {s.name for s in resp.list_services_response.service}
    assert {"socialrec.v1.Recommender", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint(server, run_dir) -> None:
    with server.channel() as ch:
        pb_grpc.RecommenderStub(ch).RecommendContent(
            pb.RecommendContentRequest(user_id=_user_ids(run_dir)[1], k=5), timeout=5
        )
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    assert (
        'socialrec_rpc_seconds_bucket{le="0.005",method="RecommendContent"}' in text
        or "socialrec_rpc_seconds_bucket" in text
    )
    for stage in ("redis", "onnx", "faiss"):
        assert f'stage="{stage}"' in text, stage
    assert 'socialrec_requests_total{code="OK",method="RecommendContent"}' in text
    assert "socialrec_bundle_info" in text


def test_resource_exhausted_when_overloaded(run_dir, redis_server, published) -> None:
    s = start_server(
        run_dir / "bundle", redis_server.url, published, 1, "--max-concurrent-rpcs", "1"
    )
    try:
        s.wait_serving()
        user = _user_ids(run_dir)[2]
        codes = []
        with s.channel() as ch:
            stub = pb_grpc.RecommenderStub(ch)
            futures = [
                stub.RecommendFriends.future(
                    pb.RecommendFriendsRequest(user_id=user, k=100), timeout=10
                )
                for _ in range(64)
            ]
            for f in futures:
                try:
                    f.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert s.health() == SERVING
    finally:
        s.stop()


def test_unavailable_before_bundle_then_hot_reload(
    run_dir, redis_server, published, tmp_path
) -> None:
    """No bundle yet -> UNAVAILABLE; pointer set -> serving; swap under load -> no failures;
    corrupted bundle -> refused, the old one keeps serving."""
    root = tmp_path / "bundles"
    root.mkdir()
    s = start_server(root, redis_server.url, published, 2)
    try:
        s.wait_health(NOT_SERVING)
        with s.channel() as ch, pytest.raises(grpc.RpcError) as e:
            pb_grpc.RecommenderStub(ch).RecommendContent(
                pb.RecommendContentRequest(user_id="u1", k=5), timeout=5
            )
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE

        copy_bundle(run_dir / "bundle", root / "v1", "v1")
        copy_bundle(run_dir / "bundle", root / "v2", "v2")
        bad = copy_bundle(run_dir / "bundle", root / "v3-bad", "v3-bad")
        data = bytearray((bad / "items.faiss").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bad / "items.faiss").write_bytes(bytes(data))
        (root / "CURRENT").write_text("v1\n")
        s.wait_serving()

        user = _user_ids(run_dir)[4]

        def hammer(seconds: float) -> tuple[int, set[str], list[str]]:
            ok, versions, errors = 0, set(), []
            end = time.monotonic() + seconds
            with s.channel() as ch:
                stub = pb_grpc.RecommenderStub(ch)
                while time.monotonic() < end:
                    try:
                        versions.add(
                            stub.RecommendContent(
                                pb.RecommendContentRequest(user_id=user, k=10), timeout=5
                            ).bundle_version
                        )
                        ok += 1
                    except grpc.RpcError as err:
                        errors.append(err.code().name)
            return ok, versions, errors

        with cf.ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(hammer, 4.0) for _ in range(2)]
            time.sleep(1.0)  # let the load run before the swap (timing only, not synchronisation)
            (root / "CURRENT").write_text("v2\n")
            results = [f.result() for f in futs]
        assert all(not errors for _, _, errors in results), results
        assert sum(ok for ok, _, _ in results) > 20
        seen = set().union(*(v for _, v, _ in results))
        assert "v2" in seen and seen <= {"v1", "v2"}

        def refusals() -> list[str]:
            return [
                line
                for line in s.log_text().splitlines()
                if "bundle_refused" in line and "v3-bad" in line
            ]

        (root / "CURRENT").write_text("v3-bad\n")
        deadline = time.monotonic() + 15
        while len(refusals()) < 2 and time.monotonic() < deadline:  # both workers refuse it
            time.sleep(0.1)
        assert len(refusals()) == 2 and all("sha256" in line for line in refusals()), s.log_text()
        ok, versions, errors = hammer(1.0)
        assert versions == {"v2"} and not errors and ok > 0
        assert s.health() == SERVING

        # SIGHUP forces a reload of the current pointer (here back to v1).
        (root / "CURRENT").write_text("v1\n")
        s.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and hammer(0.2)[1] != {"v1"}:
            pass
        assert hammer(0.5)[1] == {"v1"}
    finally:
        s.stop()


def test_redis_down_degrades_reads_fails_writes_and_recovers(run_dir, tmp_path) -> None:
    from socialrec.serving.publish import PublishConfig
    from socialrec.serving.publish import run as publish

    redis = start_redis(dir=tmp_path / "redis")
    s = None
    try:
        publish(replace(PublishConfig(run=str(run_dir), redis_url=redis.url), progress=False))
        s = start_server(run_dir / "bundle", redis.url, "socialrec", 1)
        s.wait_serving()
        user = _user_ids(run_dir)[5]
        with s.channel() as ch:
            stub = pb_grpc.RecommenderStub(ch)
            assert not stub.RecommendContent(
                pb.RecommendContentRequest(user_id=user, k=5), timeout=5
            ).degraded
            redis.kill()
            r = stub.RecommendContent(pb.RecommendContentRequest(user_id=user, k=5), timeout=5)
            assert r.degraded and len(r.items) == 5
            assert stub.RecommendFriends(
                pb.RecommendFriendsRequest(user_id=user, k=5), timeout=5
            ).degraded
            with pytest.raises(grpc.RpcError) as e:
                stub.LogInteraction(
                    pb.LogInteractionRequest(user_id=user, item_id="x", weight=1.0),
                    metadata=AUTH,
                    timeout=5,
                )
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            redis.restart()
            deadline = time.monotonic() + 10
            while stub.RecommendContent(
                pb.RecommendContentRequest(user_id=user, k=5), timeout=5
            ).degraded:
                assert time.monotonic() < deadline, "server did not recover after Redis came back"
                time.sleep(0.1)
            stub.LogInteraction(
                pb.LogInteractionRequest(user_id=user, item_id="x", weight=1.0),
                metadata=AUTH,
                timeout=5,
            )
        assert s.proc.poll() is None
    finally:
        if s is not None:
            s.stop()
        redis.stop()


def test_tls_and_token_file(run_dir, redis_server, published, tmp_path) -> None:
    """Optional TLS: a client trusting the self-signed cert gets answers; the token can come
    from a file instead of the environment."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    s = start_server(
        run_dir / "bundle",
        redis_server.url,
        published,
        1,
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--token-file",
        str(token_file),
    )
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        deadline = time.monotonic() + 60
        while True:
            try:
                with grpc.secure_channel(s.address, creds) as ch:
                    stub = pb_grpc.RecommenderStub(ch)
                    r = stub.RecommendContent(
                        pb.RecommendContentRequest(user_id=_user_ids(run_dir)[0], k=3), timeout=2
                    )
                    break
            except grpc.RpcError as e:
                assert time.monotonic() < deadline, f"{e.code()}: {s.log_text()}"
                time.sleep(0.2)
        assert len(r.items) == 3
        with grpc.secure_channel(s.address, creds) as ch:
            stub = pb_grpc.RecommenderStub(ch)
            req = pb.LogInteractionRequest(
                user_id="tls-user", item_id=_item_ids(run_dir)[0], weight=1.0
            )
            assert stub.LogInteraction(
                req, metadata=(("authorization", "Bearer file-token"),), timeout=5
            ).event_id
            with pytest.raises(grpc.RpcError) as e:
                stub.LogInteraction(
                    req, metadata=AUTH, timeout=5
                )  # the env token is not the file's
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(s.address) as ch, pytest.raises(grpc.RpcError):
            pb_grpc.RecommenderStub(ch).RecommendContent(
                pb.RecommendContentRequest(user_id="u", k=3), timeout=2
            )
    finally:
        s.stop()
