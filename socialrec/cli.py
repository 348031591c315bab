"""The `socialrec` command: one CLI, one subcommand per stage; each parses and calls a run()."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULT_CACHE_DEFAULT = 1_000_000  # `serve --result-cache-budget`: serving.engine.ResultCache


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=("synthetic", "lastfm", "tsv"),
        default="synthetic",
        help="default: synthetic (embedded, no download)",
    )
    g.add_argument("--data-dir", help="lastfm: the HetRec Last.fm-2k directory")
    g.add_argument(
        "--interactions", help="tsv: interactions file (user, item, weight[, timestamp])"
    )
    g.add_argument("--friends", help="tsv: optional friends file (user, friend)")
    g.add_argument("--item-names", help="tsv: optional item names file (item, name)")
    g.add_argument("--synthetic-users", type=int, default=3000)
    g.add_argument("--synthetic-items", type=int, default=2000)
    g.add_argument("--synthetic-interactions", type=int, default=60000)
    g.add_argument("--data-seed", type=int, default=0, help="synthetic generator seed")
    from socialrec.training.split import DEFAULT_SEED

    g.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"split seed (train and split share it; default {DEFAULT_SEED})",
    )


def _data_config(a: argparse.Namespace):
    from socialrec.training.data import DataConfig

    def absolute(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p else None  # run.json must still find the data later

    return DataConfig(
        dataset=a.dataset,
        data_dir=absolute(a.data_dir),
        interactions=absolute(a.interactions),
        friends=absolute(a.friends),
        item_names=absolute(a.item_names),
        synthetic_users=a.synthetic_users,
        synthetic_items=a.synthetic_items,
        synthetic_interactions=a.synthetic_interactions,
        seed=a.data_seed,
    )


def cmd_split(a: argparse.Namespace) -> int:
    from socialrec.training.data import load_dataset
    from socialrec.training.split import SplitConfig, export_split, split_dataset

    ds = load_dataset(_data_config(a))
    split = split_dataset(ds, SplitConfig(seed=a.seed))
    out = export_split(ds, split, a.export)
    for line in ds.report.lines():
        print(f"[data] {line}")
    print(f"split seed {split.seed} sha256 {split.sha256()}")
    print(
        f"content: {len(split.train_user)} train / {len(split.test_user)} test rows; friends: {len(split.friends_train)} train / {len(split.friends_test)} test pairs"
    )
    print(f"wrote {out}/content_train.tsv, content_test.tsv, friends_train.tsv, friends_test.tsv")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from socialrec.training.baselines import BaselineConfig
    from socialrec.training.run import RunConfig, run
    from socialrec.training.split import SplitConfig
    from socialrec.training.train import TrainConfig

    tc = TrainConfig()
    overrides = {
        k: getattr(a, k)
        for k in ("epochs", "dim", "batch_size", "lr", "threads", "patience")
        if getattr(a, k) is not None
    }
    tc = TrainConfig(**{**tc.__dict__, **overrides})
    out = a.out or f"runs/{a.dataset}"
    cfg = RunConfig(
        out=out,
        data=_data_config(a),
        split=SplitConfig(seed=a.seed),
        train=tc,
        baselines=BaselineConfig(ease_lambda=a.ease_lambda),
        max_eval_users=a.max_eval_users,
        progress=not a.no_progress,
    )
    path = run(cfg)
    print(f"wrote {Path(path) / 'report.json'}")
    return 0


def cmd_compress(a: argparse.Namespace) -> int:
    from socialrec.compression.run import CompressConfig, run

    cfg = CompressConfig(
        run_dir=a.run,
        min_retention=a.min_retention,
        quick=a.quick,
        threads=a.compress_threads or 0,
        progress=not a.no_progress,
    )
    path = run(cfg)
    print(f"wrote {path} and {Path(a.run) / 'compression.json'}")
    return 0


def cmd_pipeline(a: argparse.Namespace) -> int:
    """Train, then compress the run just written."""
    if a.out is None:
        a.out = f"runs/{a.dataset}"
    if cmd_train(a) != 0:
        return 1
    a.run = a.out
    return cmd_compress(a)


def cmd_export(a: argparse.Namespace) -> int:
    from socialrec.compression.export import describe_bundle, export_run

    path = export_run(a.run, a.out)
    print(describe_bundle(path))
    return 0


def cmd_publish(a: argparse.Namespace) -> int:
    from socialrec.serving.publish import PublishConfig, run
    from socialrec.serving.store import StoreUnavailable

    cfg = PublishConfig(
        run=a.run,
        redis_url=a.redis_url,
        namespace=a.namespace,
        train_only=a.train_only,
        flush=a.flush,
        progress=not a.no_progress,
    )
    try:
        run(cfg)
    except StoreUnavailable as e:
        print(f"socialrec publish: error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from socialrec.serving.supervisor import pin_threads

    pin_threads()  # before onnxruntime / faiss / numpy start their thread pools
    from socialrec.serving.config import ServerConfig
    from socialrec.serving.supervisor import serve

    local = None
    redis_url = a.redis_url
    if redis_url == "local":
        # A first run on a laptop: a throwaway redis-server, never an in-memory fake.
        from socialrec.serving.redis_local import RedisNotInstalled, start_redis

        try:
            local = start_redis()
        except RedisNotInstalled as e:
            print(f"socialrec serve: error: {e}", file=sys.stderr)
            return 2
        redis_url = local.url
        print(f"started a local redis-server at {redis_url} (data is thrown away on exit)")
    if a.publish:
        from socialrec.serving.publish import PublishConfig
        from socialrec.serving.publish import run as publish

        publish(PublishConfig(run=a.publish, redis_url=redis_url, namespace=a.namespace))
    cfg = ServerConfig(
        bundle=a.bundle,
        redis_url=redis_url,
        namespace=a.namespace,
        host=a.host,
        port=a.port,
        workers=a.workers,
        metrics_port=a.metrics_port,
        max_k=a.max_k,
        max_concurrent_rpcs=a.max_concurrent_rpcs,
        token_file=a.token_file,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        watch_interval_s=a.watch_interval,
        redis_client=a.redis_client,
        result_cache_budget=a.result_cache_budget,
    )
    try:
        return serve(cfg)
    finally:
        if local is not None:
            local.stop()


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); a clear error naming the flag otherwise."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        msg = f"socialrec: error: {flag} takes integers separated by commas, got {text!r}"
        raise SystemExit(msg) from None


def cmd_loadtest(a: argparse.Namespace) -> int:
    from socialrec.loadtest.run import LoadTestConfig, print_summary, run

    cfg = LoadTestConfig(
        run=a.run,
        duration=a.duration,
        out=a.out,
        users=a.users,
        spawn_rate=a.spawn_rate if a.spawn_rate is not None else float(a.users),
        workers=a.workers,
        shape=a.shape,
        fault=a.fault,
        peer=not a.no_peer,
        serve_args=tuple(a.serve_args.split()),
        steps=_int_list("--steps", a.steps),
        unix_socket=a.unix_socket,
    )
    print_summary(run(cfg))
    return 0


def cmd_retrain(a: argparse.Namespace) -> int:
    from socialrec.compression.retrain import RetrainConfig, run
    from socialrec.serving.store import StoreUnavailable

    cfg = RetrainConfig(
        run_dir=a.run,
        redis_url=a.redis_url,
        bundles=a.bundles,
        namespace=a.namespace,
        gate_margin=a.gate_margin,
        epochs=a.epochs,
        compress=a.compress,
        work_dir=a.work_dir,
        max_eval_users=a.max_eval_users,
        threads=a.threads or 0,
        progress=not a.no_progress,
    )
    try:
        out = run(cfg)
    except StoreUnavailable as e:
        print(f"socialrec retrain: error: {e}", file=sys.stderr)
        return 1
    if out is not None:  # rank 0 under torchrun
        import json

        r = json.loads(out.read_text())
        verdict = "published" if r["published"] else "refused (CURRENT unchanged)"
        print(f"bundle {r['version']}: {verdict}: {r['gate']['reason']}; wrote {out}")
    return 0


def cmd_rollout(a: argparse.Namespace) -> int:
    from socialrec.serving.bundle import BundleError
    from socialrec.serving.rollout import rollout

    try:
        e = rollout(a.bundles, a.to)
    except BundleError as err:  # a corrupted version is never made live
        print(f"socialrec rollout: error: {err}", file=sys.stderr)
        return 1
    print(f"CURRENT: {e['from']} -> {e['to']}")
    return 0


def cmd_rollback(a: argparse.Namespace) -> int:
    from socialrec.serving.bundle import BundleError
    from socialrec.serving.rollout import rollback

    try:
        e = rollback(a.bundles)
    except BundleError as err:
        print(f"socialrec rollback: error: {err}", file=sys.stderr)
        return 1
    print(f"CURRENT: {e['from']} -> {e['to']} (rollback)")
    return 0


def cmd_publish_bundle(a: argparse.Namespace) -> int:
    from socialrec.serving.bundle import BundleError
    from socialrec.serving.rollout import publish_bundle

    try:
        e = publish_bundle(a.bundles, getattr(a, "from"))
    except BundleError as err:
        print(f"socialrec publish-bundle: error: {err}", file=sys.stderr)
        return 1
    print(f"CURRENT: {e['from']} -> {e['to']}")
    return 0


def _add_rollout_parsers(sub) -> None:
    """retrain, rollout, rollback, publish-bundle: the versioned bundle root (ROOT/CURRENT)."""
    r = sub.add_parser(
        "retrain",
        help="events since the last run + base data -> retrain, compress, gate, publish to ROOT",
    )
    r.add_argument(
        "--run",
        "--base-run",
        dest="run",
        required=True,
        help="base run directory (its run.json and settings); under torchrun spell it --base-run",
    )
    r.add_argument("--redis-url", required=True, help="the store whose event stream is consumed")
    r.add_argument("--bundles", required=True, help="bundle root watched by the servers")
    r.add_argument("--namespace", default="socialrec", help="Redis key namespace")
    r.add_argument(
        "--gate-margin",
        type=float,
        default=0.02,
        help="publish only if content and friends recall@20 >= live - this (absolute)",
    )
    r.add_argument("--epochs", type=int, help="override the base run's epochs")
    r.add_argument(
        "--compress",
        choices=("auto", "quick", "export"),
        default="auto",
        help="auto: as the base run (compression.json settings, else fp32 export)",
    )
    r.add_argument("--work-dir", help="retraining run directories (default ROOT/retrain-runs)")
    r.add_argument("--max-eval-users", type=int, help="gate on a seeded sample of users")
    r.add_argument("--threads", type=int, help="torch threads")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(fn=cmd_retrain)

    ro = sub.add_parser("rollout", help="point ROOT/CURRENT at a bundle version")
    ro.add_argument("--bundles", required=True, help="bundle root")
    ro.add_argument("--to", required=True, help="bundle version (a directory under ROOT)")
    ro.set_defaults(fn=cmd_rollout)

    rb = sub.add_parser("rollback", help="point ROOT/CURRENT back at the previous version")
    rb.add_argument("--bundles", required=True, help="bundle root")
    rb.set_defaults(fn=cmd_rollback)

    pb = sub.add_parser(
        "publish-bundle", help="copy a bundle into ROOT/VERSION (checksums verified), make it live"
    )
    pb.add_argument("--bundles", required=True, help="bundle root")
    pb.add_argument("--from", required=True, help="bundle directory (e.g. RUN_DIR/bundle)")
    pb.set_defaults(fn=cmd_publish_bundle)


def _add_train_args(t: argparse.ArgumentParser) -> None:
    _add_data_args(t)
    t.add_argument("--out", help="run directory (default runs/DATASET)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--dim", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--patience", type=int)
    t.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    t.add_argument("--ease-lambda", type=float, default=100.0)
    t.add_argument(
        "--max-eval-users", type=int, help="evaluate a seeded sample of users (large data)"
    )
    t.add_argument("--no-progress", action="store_true")


def _add_compress_args(c: argparse.ArgumentParser) -> None:
    g = c.add_argument_group("compress")
    g.add_argument(
        "--min-retention",
        type=float,
        default=0.97,
        help="keep the smallest bundle with content and friends recall@20 >= this x teacher's",
    )
    g.add_argument("--quick", action="store_true", help="few variants and epochs (smoke test)")
    g.add_argument("--compress-threads", type=int, help="torch threads while fine-tuning")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="socialrec", description="Train, compress and serve social recommendations."
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("split", help="export the evaluation split as TSV (original ids)")
    _add_data_args(s)
    s.add_argument("--export", required=True, help="output directory for the four TSV files")
    s.set_defaults(fn=cmd_split)

    t = sub.add_parser(
        "train", help="train + evaluate the teacher and the baselines; write RUN_DIR/report.json"
    )
    _add_train_args(t)
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser(
        "compress",
        help="compress a run's teacher (distill, low-rank, hash, prune, quantize); write RUN_DIR/bundle",
    )
    c.add_argument("--run", required=True, help="run directory written by `socialrec train`")
    _add_compress_args(c)
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(fn=cmd_compress)

    pl = sub.add_parser("pipeline", help="train, then compress (same data options as train)")
    _add_train_args(pl)
    _add_compress_args(pl)
    pl.set_defaults(fn=cmd_pipeline)

    e = sub.add_parser(
        "export", help="bundle the run's fp32 teacher (ONNX user tower + FAISS) without compression"
    )
    e.add_argument("--run", required=True, help="run directory written by `socialrec train`")
    e.add_argument("--out", help="bundle directory (default RUN_DIR/bundle)")
    e.set_defaults(fn=cmd_export)

    pb = sub.add_parser("publish", help="bulk-load a run's interactions and friendships into Redis")
    pb.add_argument("--run", required=True, help="run directory written by `socialrec train`")
    pb.add_argument("--redis-url", required=True, help="e.g. redis://127.0.0.1:6379/0")
    pb.add_argument("--namespace", default="socialrec", help="key prefix (default socialrec)")
    pb.add_argument(
        "--train-only",
        action="store_true",
        help="only the train split, so evaluation through the server matches report.json",
    )
    pb.add_argument(
        "--flush",
        action="store_true",
        help="delete the namespace's features first (the event stream is kept)",
    )
    pb.add_argument("--no-progress", action="store_true")
    pb.set_defaults(fn=cmd_publish)

    v = sub.add_parser("serve", help="serve a bundle over gRPC with live features from Redis")
    v.add_argument(
        "--bundle",
        required=True,
        help="bundle directory, or a directory whose CURRENT file names the live bundle (watched)",
    )
    v.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="'local' starts a throwaway redis-server on a free port",
    )
    v.add_argument(
        "--publish", metavar="RUN_DIR", help="bulk-load this run's data into Redis before serving"
    )
    v.add_argument("--namespace", default="socialrec", help="Redis key namespace")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=50051)
    v.add_argument(
        "--workers", type=int, default=1, help="worker processes sharing the port (SO_REUSEPORT)"
    )
    v.add_argument("--metrics-port", type=int, help="Prometheus metrics HTTP port")
    v.add_argument("--max-k", type=int, default=500)
    v.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=256,
        help="per worker; beyond it RESOURCE_EXHAUSTED",
    )
    v.add_argument(
        "--redis-client",
        choices=("resp", "redis-py"),
        default="resp",
        help="the request path's Redis client: resp (socialrec.serving.resp; redis:// and "
        "unix:// URLs) or redis-py (redis.asyncio with hiredis)",
    )
    v.add_argument(
        "--result-cache-budget",
        type=int,
        default=RESULT_CACHE_DEFAULT,
        help="exact result cache per worker: feature entries it may hold (0: off); an answer is "
        "reused only when the features just read equal the ones it was computed from",
    )
    v.add_argument("--token-file", help="write token file (default: $SOCIALREC_WRITE_TOKEN)")
    v.add_argument("--tls-cert")
    v.add_argument("--tls-key")
    v.add_argument(
        "--watch-interval",
        type=float,
        default=2.0,
        help="seconds between checks of the bundle pointer",
    )
    v.set_defaults(fn=cmd_serve)

    lt = sub.add_parser(
        "loadtest",
        help="Locust load test of the server vs a naive peer, side by side; write OUT/summary.json",
    )
    lt.add_argument("--run", required=True, help="run directory (RUN/bundle exported if missing)")
    lt.add_argument("--duration", type=float, required=True, help="seconds of load per server")
    lt.add_argument("--out", help="output directory (default RUN/loadtest)")
    lt.add_argument("--users", type=int, default=8, help="simulated users, one channel each")
    lt.add_argument("--spawn-rate", type=float, help="users started per second (default --users)")
    lt.add_argument("--workers", type=int, default=2, help="server worker processes")
    lt.add_argument("--shape", choices=("constant", "steps"), default="constant")
    lt.add_argument(
        "--steps",
        default="",
        help="with --shape steps: user counts to step through, e.g. 1,2,4,6,8,12 "
        "(default: 1, 2, 4, ... up to --users)",
    )
    lt.add_argument(
        "--fault",
        choices=("none", "kill-worker", "restart-redis", "swap-bundle"),
        default="none",
        help="inject one fault into our server's run, halfway through",
    )
    lt.add_argument(
        "--serve-args", default="", help="extra `socialrec serve` flags, e.g. '--redis-client redis-py'"
    )
    lt.add_argument(
        "--unix-socket",
        action="store_true",
        help="both servers reach the private redis-server over its Unix socket, not loopback TCP",
    )
    lt.add_argument("--no-peer", action="store_true", help="skip the naive peer run")
    lt.set_defaults(fn=cmd_loadtest)
    _add_rollout_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"socialrec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
