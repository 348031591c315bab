"""Server CPU per request by stage under load, next to an empty gRPC call's, side by side.

Starts a private redis-server, publishes the run's training data, starts one `socialrec
serve` per ``--config`` with one worker and the result cache off (``--result-cache-mb 0``;
every read runs the tower and the search), then alternates, for ``--rounds`` rounds, phases of
closed-loop load from a client process with ``--concurrency`` channels: reads on each server (RecommendContent and RecommendFriends
alternating, uniformly random users, k = 20), then empty calls (gRPC health Check on the
first server: the transport and grpc.aio's machinery, no work). The worker's CPU time (psutil)
over each phase divided by its calls is the CPU per request; the ratio reads / empty is the
issue's target (<= 2x, goal 1.5x).

With ``--py-spy``, an extra round after the measured ones samples each worker during a read
phase (py-spy pauses the process it samples, so that round is left out of the CPU figures;
needs the py-spy binary and ptrace rights). Each sample of the event-loop thread is assigned
to one stage by its innermost frame that names one (rules in STAGES), and each server's
median CPU per read is split in those proportions.

    python benchmarks/stage_profile.py --run RUN [--bundle DIR] [--seconds 15] [--rounds 3]
        [--concurrency 4] [--config 'LABEL=SERVE ARGS[@PYTHONPATH]' ...] [--py-spy] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing as mp
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from socialrec.loadtest.run import scrape  # noqa: E402
from socialrec.serving.harness import ServerProcess  # noqa: E402
from socialrec.serving.redis_local import start_redis  # noqa: E402

from socialrec.v1 import recommender_pb2 as pb  # noqa: E402
from socialrec.v1 import recommender_pb2_grpc as pb_grpc  # noqa: E402

# (stage, file pattern, function pattern): a sample belongs to the first stage, scanning its
# frames from the innermost outwards, whose rule matches a frame (regexes, search()).
STAGES: list[tuple[str, str, str]] = [
    ("metrics", r"prometheus_client", r""),
    ("metrics", r"serving/servicer\.py", r"\b(_observe|_count|_degraded)$"),
    (
        "validate",
        r"serving/(servicer|schema)\.py",
        r"\b(_id|_k|_exclude|_live|_deadline|check_id)$",
    ),
    ("protobuf build", r"", r"SerializeToString|\b_serialize"),
    ("protobuf build", r"serving/servicer\.py", r"\b(RecommendContent|RecommendFriends)\b"),
    ("tower", r"serving/engine\.py", r"\b_tower$"),
    ("search", r"serving/engine\.py", r"\b_search$"),
    ("search", r"faiss", r""),
    ("filter/rank/id map", r"serving/(engine|cache)\.py", r""),
    ("filter/rank/id map", r"serving/servicer\.py", r"\b(make_query|cached|rank)$"),
    ("batcher", r"serving/batcher\.py", r""),
    ("feature read + reply parsing", r"serving/(resp|store|schema|fresh_serving)\.py", r""),
    ("servicer glue", r"serving/servicer\.py", r""),
]
FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def classify(stack: str) -> str:
    """The stage of one collapsed py-spy stack (frames root;...;leaf)."""
    for frame in reversed(stack.split(";")):
        m = FRAME.match(frame.strip())
        fn, file = (m["fn"], m["file"]) if m else (frame, "")
        for stage, fpat, npat in STAGES:
            if (not fpat or re.search(fpat, file)) and (not npat or re.search(npat, fn)):
                return stage
    return "grpc + event loop"


def _client(address: str, mode: str, users: list[str], conc: int, seconds: float, q) -> None:
    async def main() -> int:
        channels = [grpc.aio.insecure_channel(address) for _ in range(conc)]
        rng = np.random.default_rng(os.getpid())
        calls = 0
        stop = time.perf_counter() + seconds

        async def loop(ch: grpc.aio.Channel, i: int) -> None:
            nonlocal calls
            stub, health = pb_grpc.RecommenderStub(ch), health_pb2_grpc.HealthStub(ch)
            n = i
            while time.perf_counter() < stop:
                if mode == "empty":
                    await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                else:
                    u = users[int(rng.integers(len(users)))]
                    if n % 2:
                        await stub.RecommendFriends(
                            pb.RecommendFriendsRequest(user_id=u, k=20), timeout=10
                        )
                    else:
                        await stub.RecommendContent(
                            pb.RecommendContentRequest(user_id=u, k=20), timeout=10
                        )
                n += 1
                calls += 1

        await asyncio.gather(*(loop(c, i) for i, c in enumerate(channels)))
        for c in channels:
            await c.close()
        return calls

    q.put(asyncio.run(main()))


def _engine_counters(metrics_port: int) -> tuple[float, float] | None:
    """(engine thread CPU seconds, reads through the engine) so far, from the server's
    /metrics (None: a server without socialrec_engine_cpu_seconds, e.g. older code)."""
    got = scrape(metrics_port)
    cpu, reads = got.get(("socialrec_engine_cpu_seconds",)), got.get(("socialrec_batch_size",))
    if cpu is None or reads is None:
        return None
    return cpu["value"], reads["sum"]


def phase(address, mode, users, conc, seconds, worker: psutil.Process, spy: Path | None):
    """(calls per second, worker CPU us per call, its event-loop thread's) over one phase;
    py-spy into ``spy``."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    warm = ctx.Process(target=_client, args=(address, mode, users, conc, 1.0, q))
    warm.start()
    q.get()
    warm.join()
    proc = ctx.Process(target=_client, args=(address, mode, users, conc, seconds, q))
    t = worker.cpu_times()
    th0 = _thread_cpu(worker)
    c0, t0 = t.user + t.system, time.perf_counter()
    proc.start()
    sampler = None
    if spy is not None:
        sampler = subprocess.Popen(
            ["py-spy", "record", "--pid", str(worker.pid), "--duration", str(int(seconds) - 1),
             "--rate", "200", "--format", "raw", "--threads", "-o", str(spy)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
    calls = q.get()
    proc.join()
    t = worker.cpu_times()
    cpu, dt = t.user + t.system - c0, time.perf_counter() - t0
    th1 = _thread_cpu(worker)
    main = th1.get(worker.pid, 0.0) - th0.get(worker.pid, 0.0)
    if sampler is not None:
        _, err = sampler.communicate(timeout=60)
        if sampler.returncode:
            print(f"py-spy failed: {err.decode()[-300:]}", file=sys.stderr)
    return calls / dt, 1e6 * cpu / max(calls, 1), 1e6 * main / max(calls, 1)


def _thread_cpu(proc: psutil.Process) -> dict[int, float]:
    """CPU seconds of each of the process's threads (the main thread's id is the pid; it runs
    the event loop, the others are gRPC's and ONNX Runtime's)."""
    return {t.id: t.user_time + t.system_time for t in proc.threads()}


def stage_split(raw: Path) -> dict[str, float]:
    """Each stage's share of the event-loop thread's busy samples (``py-spy --threads``: the
    worker's main thread, which runs the event loop, asyncio's or uvloop's; other threads,
    e.g. idle executor threads, and samples blocked in the selector, waiting for I/O, are
    left out)."""
    by_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    loop: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        thread, _, frames = stack.partition(";")
        if "worker_main" in frames:  # the worker's main thread runs its event loop
            loop[thread] += int(n)
        leaf = frames.rsplit(";", 1)[-1]
        if re.match(r"(\w+\.)?select \(.*selectors\.py", leaf):
            continue  # waiting for I/O
        if re.match(r"Runner\.run \(", leaf):
            continue  # in uvloop's C code: epoll waits (idle) and its own dispatch, not told apart
        by_thread[thread][classify(frames)] += int(n)
    if not loop:
        return {}
    counts = by_thread[loop.most_common(1)[0][0]]
    total = sum(counts.values())
    return {s: c / total for s, c in counts.most_common()} if total else {}


def parse_config(text: str) -> tuple[str, str, str | None]:
    """``LABEL=SERVE ARGS[@PYTHONPATH]``: one server under test (PYTHONPATH: another checkout's
    package, e.g. the code before a change; run the benchmark outside the repository root so
    the server's ``python -m`` does not import the checkout from its working directory)."""
    label, _, rest = text.partition("=")
    args, _, path = rest.partition("@")
    return label, args, path or None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run directory (socialrec train)")
    ap.add_argument("--bundle", help="bundle directory (default RUN/bundle)")
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds per phase")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4, help="client channels in flight")
    ap.add_argument(
        "--config",
        action="append",
        type=parse_config,
        help="LABEL=SERVE ARGS[@PYTHONPATH], repeatable: servers measured in alternation "
        "(default: one, 'server=' with the defaults); the empty call runs on the first",
    )
    ap.add_argument("--py-spy", action="store_true", help="split the read CPU by stage")
    ap.add_argument("--out", help="write the report as JSON here")
    ap.add_argument("--raw", help="keep py-spy's collapsed stacks in this directory")
    a = ap.parse_args()
    if a.py_spy and shutil.which("py-spy") is None:
        ap.error("--py-spy needs the py-spy binary (pip install py-spy)")
    configs = a.config or [("server", "", None)]

    run = Path(a.run)
    bundle = Path(a.bundle) if a.bundle else run / "bundle"
    if not (bundle / "manifest.json").exists():
        ap.error(f"{bundle} holds no bundle (export one, or pass --bundle)")
    users = (bundle / "user_ids.txt").read_text().split("\n")[:-1]
    redis = start_redis()
    servers: dict[str, ServerProcess] = {}
    tmp = Path(tempfile.mkdtemp(prefix="stage-profile-"))
    runs: dict[str, list[tuple[float, float]]] = {c[0]: [] for c in configs}
    runs["empty"] = []
    engine_us: dict[str, list[float]] = {c[0]: [] for c in configs}  # engine CPU per read
    split: dict[str, dict[str, float]] = {}
    try:
        from socialrec.serving.publish import PublishConfig
        from socialrec.serving.publish import run as publish

        publish(PublishConfig(run=str(run), redis_url=redis.url, train_only=True, progress=False))
        for label, extra, path in configs:
            args = ["--bundle", str(bundle), "--redis-url", redis.url, "--workers", "1",
                    "--result-cache-mb", "0", *extra.split()]  # fmt: skip
            env = {"SOCIALREC_WRITE_TOKEN": "bench", **({"PYTHONPATH": path} if path else {})}
            servers[label] = ServerProcess(args, metrics=True, env=env, ready_timeout_s=120)
            servers[label].start().wait_serving()
        workers = {label: psutil.Process(s.pid).children()[0] for label, s in servers.items()}
        first = configs[0][0]
        for r in range(a.rounds + a.py_spy):
            profiling = r == a.rounds  # an extra round: py-spy pauses the worker it samples
            for mode in [c[0] for c in configs] + ([] if profiling else ["empty"]):
                label = first if mode == "empty" else mode
                spy = tmp / f"{mode}.txt" if profiling else None
                e0 = _engine_counters(servers[label].metrics_port)
                rps, us, main = phase(servers[label].address, "empty" if mode == "empty" else "reads",
                                users, a.concurrency, a.seconds, workers[label], spy)  # fmt: skip
                e1 = _engine_counters(servers[label].metrics_port)
                if spy is not None:
                    if spy.exists():
                        split[mode] = stage_split(spy)
                        if a.raw:
                            Path(a.raw).mkdir(parents=True, exist_ok=True)
                            shutil.copy(spy, Path(a.raw) / spy.name)
                    continue
                runs[mode].append((rps, us, main))
                eng = ""
                if mode != "empty" and e0 is not None and e1 is not None and e1[1] > e0[1]:
                    engine_us[mode].append(1e6 * (e1[0] - e0[0]) / (e1[1] - e0[1]))
                    eng = f", engine {engine_us[mode][-1]:6.1f}"
                print(f"round {r + 1}/{a.rounds} {mode:14s} {rps:7.0f} calls/s  {us:7.1f} us "
                      f"worker CPU/call ({main:6.1f} on the event-loop thread{eng})", flush=True)  # fmt: skip
    finally:
        for s in servers.values():
            s.stop()
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    med = {m: statistics.median(us for _, us, _ in v) for m, v in runs.items()}
    rps = {m: statistics.median(x for x, _, _ in v) for m, v in runs.items()}
    loop_us = {m: statistics.median(y for _, _, y in v) for m, v in runs.items()}
    eng = {m: statistics.median(v) if v else None for m, v in engine_us.items()}
    print(f"\nbundle {bundle}; --result-cache-mb 0, 1 worker; {a.concurrency} channels; "
          f"medians of {a.rounds} alternating rounds of {a.seconds:g} s; load {os.getloadavg()}")  # fmt: skip
    print(f"{'server':14s} {'us CPU/call':>11s} {'loop thread':>11s} {'engine':>8s} "
          f"{'calls/s':>8s} {'/ empty':>8s}")  # fmt: skip
    for m in runs:
        e = f"{eng[m]:8.1f}" if eng.get(m) is not None else f"{'-':>8s}"
        print(f"{m:14s} {med[m]:11.1f} {loop_us[m]:11.1f} {e} {rps[m]:8.0f} "
              f"{med[m] / med['empty']:8.2f}")  # fmt: skip
    stages = sorted({st for v in split.values() for st in v}, key=lambda st: -max(
        v.get(st, 0.0) for v in split.values()))  # fmt: skip
    if split:
        print(f"\n{'us per read by stage (py-spy)':30s}" + "".join(f"{m:>14s}" for m in split))
        for st in stages:
            print(
                f"{st:30s}" + "".join(f"{v.get(st, 0.0) * med[m]:14.1f}" for m, v in split.items())
            )
    if a.out:
        report = {
            "command": "python benchmarks/stage_profile.py " + " ".join(sys.argv[1:]),
            "bundle": str(bundle),
            "setup": {
                **{k: v for k, v in vars(a).items() if k != "config"},
                "configs": configs,
                "cpus": os.cpu_count(),
                "load": os.getloadavg(),
            },
            "rounds": {
                m: [
                    {"rps": round(x, 1), "cpu_us": round(y, 1), "loop_thread_us": round(z, 1)}
                    for x, y, z in v
                ]
                for m, v in runs.items()
            },  # fmt: skip
            "median_cpu_us": {m: round(v, 1) for m, v in med.items()},
            "median_loop_thread_us": {m: round(v, 1) for m, v in loop_us.items()},
            # thread CPU of Engine.recommend_batch per read, from socialrec_engine_cpu_seconds
            "median_engine_us": {m: None if v is None else round(v, 1) for m, v in eng.items()},
            "median_rps": {m: round(v, 1) for m, v in rps.items()},
            "over_empty": {m: round(v / med["empty"], 3) for m, v in med.items()},
            "stage_us": {
                m: {st: round(x * med[m], 1) for st, x in v.items()} for m, v in split.items()
            },  # fmt: skip
        }
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
