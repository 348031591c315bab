"""The `socialrec` command: one CLI, one subcommand per stage; each parses and calls a run().

Every option default is read from the stage's config dataclass with :func:`default`, so a
default has one source. A subcommand's options are only added when that subcommand runs
(:func:`build_parser` with its name): reading the defaults imports the stage's modules, and
`socialrec serve` must neither need torch nor wait for it, nor `--help` and `--version`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any


def default(cls: type, name: str) -> Any:
    """The default value of dataclass field ``name`` of ``cls`` (default_factory called)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default")
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def version() -> str:
    """The installed package's version (pyproject.toml), or 'unknown' outside an install."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("socialrec")
    except PackageNotFoundError:
        return "unknown"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless it has none worth showing.

    None, False and "" mean "not set"; such options say in their help what happens then.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        d = action.default
        if action.required or d is None or d is False or (isinstance(d, str) and not d):
            return action.help
        return super()._get_help_string(action)


# --------------------------------------------------------------------------- commands


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
        weight_kind=a.weight_kind,
        duplicates=a.duplicates,
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
    for line in ds.describe():
        print(f"[data] {line}")
    print(f"split seed {split.seed} sha256 {split.sha256()}")
    print(
        f"content: {len(split.train_user)} train / {len(split.test_user)} test rows; friends: {len(split.friends_train)} train / {len(split.friends_test)} test pairs"
    )
    print(f"wrote {out}/content_train.tsv, content_test.tsv, friends_train.tsv, friends_test.tsv")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from socialrec.training.baselines import BaselineConfig
    from socialrec.training.refine import RefineConfig
    from socialrec.training.run import RunConfig, run
    from socialrec.training.split import SplitConfig
    from socialrec.training.train import TrainConfig
    from socialrec.training.tune import TuneConfig

    tc = TrainConfig(
        epochs=a.epochs,
        dim=a.dim,
        batch_size=a.batch_size,
        lr=a.lr,
        patience=a.patience,
        threads=a.threads,
    )
    cfg = RunConfig(
        out=a.out or f"runs/{a.dataset}",
        data=_data_config(a),
        split=SplitConfig(seed=a.seed),
        train=tc,
        baselines=BaselineConfig(ease_lambda=a.ease_lambda),
        tune=TuneConfig(budget_min=a.tune_budget, trials=a.tune_trials),
        refine=RefineConfig(
            enabled=not a.no_refine, epochs=a.refine_epochs, budget_min=a.refine_budget
        ),
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
        threads=a.compress_threads,
        only=tuple(v for v in (a.variants or "").split(",") if v),
        grid=a.grid,
        test_all=a.test_all,
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
        cluster=a.redis_cluster,
    )
    try:
        run(cfg)
    except StoreUnavailable as e:
        print(f"socialrec publish: error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    # Before anything starts (a local redis-server, worker processes): a typo in the path
    # should cost one line, not a supervisor restarting workers that cannot load.
    bundle = Path(a.bundle)
    if not bundle.is_dir():
        why = "is not a directory" if bundle.exists() else "does not exist"
        print(
            f"socialrec serve: error: --bundle {a.bundle} {why} (expected a bundle directory, "
            "or a bundle root holding a CURRENT file)",
            file=sys.stderr,
        )
        return 2
    from socialrec.serving.threads import pin_threads

    pin_threads()  # before onnxruntime / faiss / numpy start their thread pools
    from dataclasses import replace

    from socialrec.serving.config import ServerConfig
    from socialrec.serving.engine import EngineConfig
    from socialrec.serving.fresh import FoldInConfig
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
        print(
            f"started a local {local.info.describe()} at {redis_url} (data is thrown away on exit)"
        )
    if a.publish:
        from socialrec.serving.publish import PublishConfig
        from socialrec.serving.publish import run as publish

        publish(
            PublishConfig(
                run=a.publish, redis_url=redis_url, namespace=a.namespace, cluster=a.redis_cluster
            )
        )
    cfg = ServerConfig(
        bundle=a.bundle,
        redis_url=redis_url,
        redis_cluster=a.redis_cluster,
        ack_replicas=a.ack_replicas,
        ack_timeout_ms=a.ack_timeout_ms,
        namespace=a.namespace,
        host=a.host,
        port=a.port,
        workers=a.workers,
        metrics_port=a.metrics_port,
        max_k=a.max_k,
        max_concurrent_rpcs=a.max_concurrent_rpcs,
        max_request_bytes=a.max_request_bytes,
        token_file=a.token_file,
        admin_token_file=a.admin_token_file,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        watch_interval_s=a.watch_interval,
        redis_client=a.redis_client,
        result_cache_mb=a.result_cache_mb,
        batch_max=a.batch_max,
        batch_wait_us=a.batch_wait_us,
        event_loop=a.event_loop,
        bundle_key=a.bundle_key,
        fresh_items=not a.no_fresh_items,
        fresh_poll_s=a.fresh_poll_s,
        fresh=None if a.fresh_method is None else replace(FoldInConfig(), method=a.fresh_method),
        engine=EngineConfig(fof_weight=a.fof_weight),
    )
    try:
        return serve(cfg)
    finally:
        if local is not None:
            local.stop()


def _non_negative(text: str) -> float:
    """A finite number >= 0 (argparse type)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); a clear error naming the flag otherwise."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        msg = f"socialrec: error: {flag} takes integers separated by commas, got {text!r}"
        raise SystemExit(msg) from None


def _peer_list(text: str) -> tuple[str, ...]:
    """--peers: names separated by commas (checked by the load test's config)."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


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
        peers=_peer_list(a.peers),
        serve_args=tuple(a.serve_args.split()),
        steps=_int_list("--steps", a.steps),
        unix_socket=a.unix_socket,
        zipf=a.zipf if a.users_dist == "zipf" else 0.0,
        replicas=a.replicas,
        redis_cluster=a.redis_cluster,
        ack_replicas=a.ack_replicas,
        server_down_s=a.server_down_s,
        new_items=a.new_items,
    )
    print_summary(run(cfg))
    return 0


def cmd_retrain(a: argparse.Namespace) -> int:
    from socialrec.retrain import RetrainConfig, run
    from socialrec.serving.store import StoreUnavailable

    cfg = RetrainConfig(
        run_dir=a.run,
        redis_url=a.redis_url,
        redis_cluster=a.redis_cluster,
        bundles=a.bundles,
        namespace=a.namespace,
        gate_margin=a.gate_margin,
        epochs=a.epochs,
        compress=a.compress,
        work_dir=a.work_dir,
        max_eval_users=a.max_eval_users,
        threads=a.threads,
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


def cmd_keygen(a: argparse.Namespace) -> int:
    from socialrec.serving.signing import generate_keypair

    priv, pub = generate_keypair(a.out)
    print(f"wrote {priv} (keep it with the pipeline: SOCIALREC_BUNDLE_SIGNING_KEY={priv})")
    print(f"wrote {pub} (give it to servers: serve --bundle-key {pub})")
    return 0


def _keygen_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory for the key pair (created if missing)")
    p.set_defaults(fn=cmd_keygen)


# --------------------------------------------------------------------------- options


def _no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars or per-step progress lines"
    )


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from socialrec.training.data import DUPLICATE_RULES, WEIGHT_KINDS, DataConfig
    from socialrec.training.split import SplitConfig

    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=("synthetic", "lastfm", "tsv"),
        default=default(DataConfig, "dataset"),
        help="synthetic: generated, no download; lastfm: HetRec Last.fm-2k; tsv: your own files",
    )
    g.add_argument("--data-dir", help="lastfm: the HetRec Last.fm-2k directory")
    g.add_argument(
        "--interactions", help="tsv: interactions file (user, item, weight[, timestamp])"
    )
    g.add_argument("--friends", help="tsv: optional friends file (user, friend)")
    g.add_argument("--item-names", help="tsv: optional item names file (item, name)")
    g.add_argument(
        "--weight-kind",
        choices=WEIGHT_KINDS,
        default=default(DataConfig, "weight_kind"),
        help="tsv: what the weight column is: counts (plays, clicks) or ratings (stars)",
    )
    g.add_argument(
        "--duplicates",
        choices=DUPLICATE_RULES,
        default=default(DataConfig, "duplicates"),
        help="tsv: how duplicate (user, item) rows merge (default: sum for counts, last for "
        "ratings: the latest timestamp, else the later row)",
    )
    g.add_argument(
        "--synthetic-users",
        type=int,
        default=default(DataConfig, "synthetic_users"),
        help="synthetic: number of users",
    )
    g.add_argument(
        "--synthetic-items",
        type=int,
        default=default(DataConfig, "synthetic_items"),
        help="synthetic: number of items",
    )
    g.add_argument(
        "--synthetic-interactions",
        type=int,
        default=default(DataConfig, "synthetic_interactions"),
        help="synthetic: target number of distinct (user, item) pairs",
    )
    g.add_argument(
        "--data-seed",
        type=int,
        default=default(DataConfig, "seed"),
        help="synthetic: generator seed",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=default(SplitConfig, "seed"),
        help="evaluation split seed (`split` and `train` with the same seed see the same split)",
    )


def _add_train_args(t: argparse.ArgumentParser) -> None:
    from socialrec.training.baselines import BaselineConfig
    from socialrec.training.refine import RefineConfig
    from socialrec.training.run import RunConfig
    from socialrec.training.train import TrainConfig
    from socialrec.training.tune import TuneConfig

    _add_data_args(t)
    t.add_argument("--out", help="run directory (default: runs/DATASET)")
    g = t.add_argument_group("training")
    g.add_argument(
        "--epochs",
        type=int,
        default=default(TrainConfig, "epochs"),
        help="most epochs of the selection phase (early stopping usually ends it sooner)",
    )
    g.add_argument(
        "--dim", type=int, default=default(TrainConfig, "dim"), help="embedding dimension"
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=default(TrainConfig, "batch_size"),
        help="users per training batch",
    )
    g.add_argument(
        "--lr", type=float, default=default(TrainConfig, "lr"), help="Adam learning rate"
    )
    g.add_argument(
        "--patience",
        type=int,
        default=default(TrainConfig, "patience"),
        help="stop when neither head's validation recall@20 improved for this many epochs",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=default(TrainConfig, "threads"),
        help="torch threads (0: torch's choice)",
    )
    g.add_argument(
        "--ease-lambda",
        type=float,
        default=default(BaselineConfig, "ease_lambda"),
        help="L2 regularisation of the EASE baseline (default: chosen on the validation split "
        f"from {', '.join(f'{x:g}' for x in default(BaselineConfig, 'ease_lambdas'))})",
    )
    g.add_argument(
        "--tune-budget",
        type=float,
        default=default(TuneConfig, "budget_min"),
        metavar="MINUTES",
        help="minutes of hyperparameter search (Optuna, on the validation split) before the "
        "final teacher trains; 0: no search, the options as given",
    )
    g.add_argument(
        "--no-refine",
        action="store_true",
        help="keep the teacher as trained: no distillation of a same-size two-tower from the best "
        "validation scorer (the teacher, or teacher + w EASE) after training",
    )
    g.add_argument(
        "--refine-budget",
        type=_non_negative,
        default=default(RefineConfig, "budget_min"),
        metavar="MINUTES",
        help="wall-clock minutes for that distillation on the validation split (it stops at its "
        "next evaluation after them, keeping its best; the refit on train takes about as long)",
    )
    g.add_argument(
        "--refine-epochs",
        type=int,
        default=default(RefineConfig, "epochs"),
        help="most epochs of that distillation (early stopping per head on validation)",
    )
    g.add_argument(
        "--tune-trials",
        type=int,
        default=default(TuneConfig, "trials"),
        help="most trials of the hyperparameter search",
    )
    g.add_argument(
        "--max-eval-users",
        type=int,
        default=default(RunConfig, "max_eval_users"),
        help="evaluate a seeded sample of this many users (large data; default: every user)",
    )
    _no_progress(t)


def _add_compress_args(c: argparse.ArgumentParser) -> None:
    from socialrec.compression.run import GRIDS, CompressConfig

    g = c.add_argument_group("compress")
    g.add_argument(
        "--min-retention",
        type=float,
        default=default(CompressConfig, "min_retention"),
        help="keep the smallest bundle whose content and friends recall@20 are both at least "
        "this fraction of the teacher's, on the validation split carved from train",
    )
    g.add_argument("--quick", action="store_true", help="few variants and epochs (smoke test)")
    g.add_argument(
        "--variants",
        help="comma-separated variant names to build (the teacher always; any of the full "
        "grid; default: the --grid's), e.g. lowrank-r32-int4,distill-d64-kd-ease",
    )
    g.add_argument(
        "--grid",
        choices=GRIDS,
        default=default(CompressConfig, "grid"),
        help="standard: the candidate variants; full: also the study variants (hashed ids, "
        "magnitude pruning, torch.ao dynamic int8, students from scratch on EASE)",
    )
    g.add_argument(
        "--test-all",
        action="store_true",
        help="score every variant on test, not only the teacher and the selected one "
        "(selection stays on validation; about twice the time)",
    )
    g.add_argument(
        "--compress-threads",
        type=int,
        default=default(CompressConfig, "threads"),
        help="torch threads while fine-tuning (0: torch's choice)",
    )


def _split_parser(s: argparse.ArgumentParser) -> None:
    _add_data_args(s)
    s.add_argument("--export", required=True, help="output directory for the four TSV files")
    s.set_defaults(fn=cmd_split)


def _train_parser(t: argparse.ArgumentParser) -> None:
    _add_train_args(t)
    t.set_defaults(fn=cmd_train)


def _compress_parser(c: argparse.ArgumentParser) -> None:
    c.add_argument("--run", required=True, help="run directory written by `socialrec train`")
    _add_compress_args(c)
    _no_progress(c)
    c.set_defaults(fn=cmd_compress)


def _pipeline_parser(p: argparse.ArgumentParser) -> None:
    _add_train_args(p)
    _add_compress_args(p)
    p.set_defaults(fn=cmd_pipeline)


def _export_parser(e: argparse.ArgumentParser) -> None:
    e.add_argument("--run", required=True, help="run directory written by `socialrec train`")
    e.add_argument("--out", help="bundle directory (default: RUN_DIR/bundle)")
    e.set_defaults(fn=cmd_export)


def cmd_export_device(a: argparse.Namespace) -> int:
    from socialrec.compression.device import REPORT, DeviceConfig, run

    cfg = DeviceConfig(
        run_dir=a.run,
        out=a.out,
        bits=a.bits,
        max_eval_users=a.max_eval_users,
        timing_queries=a.timing_queries,
    )
    path = run(cfg)
    rep = (Path(path) / REPORT).read_text()
    print(rep, end="")
    print(f"wrote {path} ({REPORT}, the .ort tower, the item table)")
    return 0


def _export_device_parser(e: argparse.ArgumentParser) -> None:
    from socialrec.compression.device import DeviceConfig

    e.add_argument(
        "--run", required=True, help="run directory with a selected bundle (`socialrec compress`)"
    )
    e.add_argument("--out", required=True, help="output directory for the device files")
    e.add_argument(
        "--bits",
        type=int,
        choices=(8, 4),
        default=default(DeviceConfig, "bits"),
        help="item table: 8 keeps the bundle's SQ8 codes (per-row int8 for other indexes); "
        "4 quantises per row to int4",
    )
    e.add_argument(
        "--max-eval-users",
        type=int,
        help="score a seeded sample of this many users (default: every user with a test item)",
    )
    e.add_argument(
        "--timing-queries",
        type=int,
        default=default(DeviceConfig, "timing_queries"),
        help="batch-1 queries timed for us_per_query",
    )
    e.set_defaults(fn=cmd_export_device)


def _publish_parser(p: argparse.ArgumentParser) -> None:
    from socialrec.serving.publish import PublishConfig

    p.add_argument("--run", required=True, help="run directory written by `socialrec train`")
    p.add_argument("--redis-url", required=True, help="e.g. redis://127.0.0.1:6379/0")
    p.add_argument(
        "--redis-cluster",
        action="store_true",
        help="--redis-url names a node of a Redis Cluster (redis-py's cluster client)",
    )
    p.add_argument(
        "--namespace", default=default(PublishConfig, "namespace"), help="Redis key prefix"
    )
    p.add_argument(
        "--train-only",
        action="store_true",
        help="only the train split, so evaluation through the server matches report.json",
    )
    p.add_argument(
        "--flush",
        action="store_true",
        help="delete the namespace's features first (the event stream is kept)",
    )
    _no_progress(p)
    p.set_defaults(fn=cmd_publish)


def _serve_parser(v: argparse.ArgumentParser) -> None:
    from socialrec.serving.config import ServerConfig

    def d(name: str) -> Any:
        return default(ServerConfig, name)

    v.add_argument(
        "--bundle",
        required=True,
        help="bundle directory, or a directory whose CURRENT file names the live bundle (watched)",
    )
    v.add_argument(
        "--redis-url",
        default=d("redis_url"),
        help="the feature store; 'local' starts a throwaway redis-server on a free port",
    )
    v.add_argument(
        "--redis-cluster",
        action="store_true",
        help="--redis-url names a node of a Redis Cluster (redis-py's cluster client)",
    )
    v.add_argument(
        "--ack-replicas",
        type=int,
        default=d("ack_replicas"),
        metavar="N",
        help="acknowledge a write only after WAIT confirms N replicas have it (Redis "
        "replication is asynchronous otherwise); on timeout the write answers UNAVAILABLE",
    )
    v.add_argument(
        "--ack-timeout-ms",
        type=int,
        default=d("ack_timeout_ms"),
        help="with --ack-replicas: how long a write waits for its replicas",
    )
    v.add_argument(
        "--publish", metavar="RUN_DIR", help="bulk-load this run's data into Redis before serving"
    )
    v.add_argument("--namespace", default=d("namespace"), help="Redis key prefix")
    v.add_argument("--host", default=d("host"), help="address to listen on")
    v.add_argument("--port", type=int, default=d("port"), help="gRPC port")
    v.add_argument(
        "--workers",
        type=int,
        default=d("workers"),
        help="worker processes sharing the port (SO_REUSEPORT)",
    )
    v.add_argument(
        "--metrics-port", type=int, help="Prometheus metrics HTTP port (default: no metrics)"
    )
    v.add_argument("--max-k", type=int, default=d("max_k"), help="largest k a request may ask")
    v.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=d("max_concurrent_rpcs"),
        help="per worker; beyond it calls get RESOURCE_EXHAUSTED",
    )
    v.add_argument(
        "--max-request-bytes",
        type=int,
        default=d("max_request_bytes"),
        help="largest request message; beyond it gRPC answers RESOURCE_EXHAUSTED",
    )
    v.add_argument(
        "--redis-client",
        choices=("resp", "redis-py"),
        default=d("redis_client"),
        help="the request path's Redis client: resp (socialrec.serving.resp; redis:// and "
        "unix:// URLs) or redis-py (redis.asyncio with hiredis)",
    )
    v.add_argument(
        "--result-cache-mb",
        type=int,
        default=d("result_cache_mb"),
        help="exact result cache per worker, in MiB (0: off); an answer is reused only when "
        "the features just read equal the ones it was computed from",
    )
    from socialrec.serving.engine import MAX_BATCH

    def batch_size(text: str) -> int:
        n = int(text)
        if not 1 <= n <= MAX_BATCH:
            raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_BATCH}, got {n}")
        return n

    def wait_us(text: str) -> int:
        n = int(text)
        if n < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
        return n

    v.add_argument(
        "--batch-max",
        type=batch_size,
        default=d("batch_max"),
        metavar="N",
        help="dynamic batching: most reads per engine batch (one tower run per head, one search per "
        "index) in a worker, 1 to 16 (1: off); a read with nothing to wait for runs at once",
    )
    v.add_argument(
        "--batch-wait-us",
        type=wait_us,
        default=d("batch_wait_us"),
        metavar="U",
        help="dynamic batching: longest a queued read waits for reads still fetching their "
        "features (0: only for those already fetched)",
    )
    v.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default=d("event_loop"),
        help="each worker's event loop: uvloop (libuv) or the standard library's asyncio",
    )
    v.add_argument(
        "--bundle-key",
        help="Ed25519 public key (PEM) every bundle must be signed with (default: "
        "$SOCIALREC_BUNDLE_PUBLIC_KEY; none: signatures are not checked)",
    )
    v.add_argument(
        "--token-file",
        help="file holding the write token (default: $SOCIALREC_WRITE_TOKEN; none: writes refused)",
    )
    v.add_argument(
        "--admin-token-file",
        help="file holding the admin token for RemoveItem/RestoreItem (default: "
        "$SOCIALREC_ADMIN_TOKEN; none: takedowns refused)",
    )
    v.add_argument("--tls-cert", help="TLS certificate (PEM); with --tls-key serves TLS")
    v.add_argument("--tls-key", help="TLS private key (PEM)")
    v.add_argument(
        "--watch-interval",
        type=float,
        default=d("watch_interval_s"),
        help="seconds between checks of the bundle pointer",
    )
    from socialrec.serving.fresh import METHODS

    v.add_argument(
        "--no-fresh-items",
        action="store_true",
        help="do not serve items the bundle does not know (fresh items are on when the bundle "
        "has a fresh_prior.npz)",
    )
    v.add_argument(
        "--fresh-poll-s",
        type=float,
        default=d("fresh_poll_s"),
        help="seconds between a worker's polls of the fresh-item registry",
    )
    v.add_argument(
        "--fresh-method",
        choices=METHODS,
        default=None,
        help="fold-in estimator of fresh items' vectors, at its default settings (default: the "
        "settings the bundle carries: its run's `coldstart-eval` choice, else the defaults)",
    )
    v.add_argument(
        "--fof-weight",
        type=_non_negative,
        default=None,
        help="friend score = inner product + W * log1p(mutual friends) (default: the weight the "
        "bundle carries, chosen on its run's validation split; 1.0 for older bundles)",
    )
    v.set_defaults(fn=cmd_serve)


def _loadtest_parser(lt: argparse.ArgumentParser) -> None:
    from socialrec.loadtest.run import FAULTS, LoadTestConfig

    def d(name: str) -> Any:
        return default(LoadTestConfig, name)

    lt.add_argument("--run", required=True, help="run directory (RUN/bundle exported if missing)")
    lt.add_argument("--duration", type=float, required=True, help="seconds of load per server")
    lt.add_argument("--out", help="output directory (default: RUN/loadtest)")
    lt.add_argument(
        "--users", type=int, default=d("users"), help="simulated users, one channel each"
    )
    lt.add_argument("--spawn-rate", type=float, help="users started per second (default: --users)")
    lt.add_argument("--workers", type=int, default=d("workers"), help="server worker processes")
    lt.add_argument(
        "--shape",
        choices=("constant", "steps"),
        default=d("shape"),
        help="constant load, or steps of growing user counts",
    )
    lt.add_argument(
        "--steps",
        default=",".join(str(n) for n in d("steps")),
        help="with --shape steps: user counts to step through, e.g. 1,2,4,6,8,12 "
        "(default: 1, 2, 4, ... up to --users)",
    )
    lt.add_argument(
        "--fault",
        choices=FAULTS,
        default=d("fault"),
        help="inject one fault into our server's run, halfway through: kill-worker, "
        "restart-redis (one redis-server), swap-bundle, kill-primary (--redis-cluster: the "
        "primary of the busiest user's slot), kill-server (--replicas >= 2: one replica, "
        "restarted after --server-down-s)",
    )
    lt.add_argument(
        "--replicas",
        type=int,
        default=d("replicas"),
        help="`socialrec serve` instances for each server under test; more than one run "
        "behind HAProxy (h2c, balanced per call)",
    )
    lt.add_argument(
        "--redis-cluster",
        action="store_true",
        help="a local Redis Cluster (3 primaries + 3 replicas) instead of one redis-server",
    )
    lt.add_argument(
        "--ack-replicas",
        type=int,
        default=d("ack_replicas"),
        metavar="N",
        help="our server acknowledges a write after WAIT confirms N replicas have it",
    )
    lt.add_argument(
        "--server-down-s",
        type=float,
        default=d("server_down_s"),
        help="--fault kill-server: seconds before the killed replica is restarted",
    )
    lt.add_argument(
        "--new-items",
        type=float,
        default=d("new_items"),
        help="share of logged interactions with items the bundle does not know (fresh content; "
        "the server folds them in and serves them unless --serve-args --no-fresh-items)",
    )
    lt.add_argument(
        "--serve-args",
        default=" ".join(d("serve_args")),
        help="extra `socialrec serve` flags, e.g. '--redis-client redis-py'",
    )
    lt.add_argument(
        "--unix-socket",
        action="store_true",
        help="both servers reach the private redis-server over its Unix socket, not loopback TCP",
    )
    lt.add_argument("--no-peer", action="store_true", help="skip the peer runs")
    lt.add_argument(
        "--peers",
        default=",".join(d("peers")),
        help="peers run after ours with the same load, in order: naive (eager torch, "
        "brute force) and/or ray (Ray Serve gRPC proxy over the same bundle; needs the "
        "'peer' extra), e.g. naive,ray",
    )
    lt.add_argument(
        "--users-dist",
        choices=("zipf", "uniform"),
        default="zipf",
        help="how the simulated app backends pick user ids: zipf (a few heavy users, as in "
        "real traffic; repeats help the result cache) or uniform (every id alike)",
    )
    lt.add_argument("--zipf", type=float, default=d("zipf"), help="exponent of --users-dist zipf")
    lt.set_defaults(fn=cmd_loadtest)


def _retrain_parser(r: argparse.ArgumentParser) -> None:
    from socialrec.retrain import RetrainConfig

    def d(name: str) -> Any:
        return default(RetrainConfig, name)

    r.add_argument(
        "--run",
        "--base-run",
        dest="run",
        required=True,
        help="base run directory (its run.json and settings); under torchrun spell it --base-run",
    )
    r.add_argument("--redis-url", required=True, help="the store whose event stream is consumed")
    r.add_argument(
        "--redis-cluster",
        action="store_true",
        help="--redis-url names a node of a Redis Cluster (redis-py's cluster client)",
    )
    r.add_argument("--bundles", required=True, help="bundle root watched by the servers")
    r.add_argument("--namespace", default=d("namespace"), help="Redis key prefix")
    r.add_argument(
        "--gate-margin",
        type=float,
        default=d("gate_margin"),
        help="publish only if content and friends recall@20 >= live - this (absolute)",
    )
    r.add_argument(
        "--epochs", type=int, default=d("epochs"), help="epochs (default: the base run's)"
    )
    r.add_argument(
        "--compress",
        choices=("auto", "quick", "export"),
        default=d("compress"),
        help="auto: as the base run (its compression.json settings, else an fp32 export); "
        "quick: few variants and epochs; export: the fp32 teacher, uncompressed",
    )
    r.add_argument("--work-dir", help="retraining run directories (default: BUNDLES/retrain-runs)")
    r.add_argument(
        "--max-eval-users",
        type=int,
        default=d("max_eval_users"),
        help="gate on a seeded sample of this many users (default: every user)",
    )
    r.add_argument(
        "--threads", type=int, default=d("threads"), help="torch threads (0: torch's choice)"
    )
    _no_progress(r)
    r.set_defaults(fn=cmd_retrain)


def _rollout_parser(ro: argparse.ArgumentParser) -> None:
    ro.add_argument("--bundles", required=True, help="bundle root")
    ro.add_argument("--to", required=True, help="bundle version (a directory under the root)")
    ro.set_defaults(fn=cmd_rollout)


def _rollback_parser(rb: argparse.ArgumentParser) -> None:
    rb.add_argument("--bundles", required=True, help="bundle root")
    rb.set_defaults(fn=cmd_rollback)


def _publish_bundle_parser(pb: argparse.ArgumentParser) -> None:
    pb.add_argument("--bundles", required=True, help="bundle root")
    pb.add_argument("--from", required=True, help="bundle directory (e.g. RUN_DIR/bundle)")
    pb.set_defaults(fn=cmd_publish_bundle)


def cmd_coldstart_eval(a: argparse.Namespace) -> int:
    import shlex

    from socialrec.training.coldstart import ColdStartConfig, parse_counts, run

    cfg = ColdStartConfig(
        run=a.run,
        out=a.out or f"benchmarks/reports/coldstart-{Path(a.run).name}.json",
        holdout_share=a.holdout_share,
        replays=parse_counts(a.replay),
        retrain_replays=parse_counts(a.retrain_replay) if a.retrain_replay else None,
        min_remaining=a.min_remaining,
        seed=a.holdout_seed,
        epochs=a.epochs,
        threads=a.threads,
        cache_dir=a.cache_dir,
        plot=not a.no_plot,
        progress=not a.no_progress,
        validation_only=a.validation_only,
        known_drop_budget=a.known_drop_budget,
        command=shlex.join(["socialrec", *sys.argv[1:]]),
    )
    print(f"wrote {run(cfg)}")
    return 0


def _coldstart_eval_parser(c: argparse.ArgumentParser) -> None:
    from socialrec.training.coldstart import ColdStartConfig

    def d(name: str) -> Any:
        return default(ColdStartConfig, name)

    c.add_argument("--run", required=True, help="run directory written by `socialrec train`")
    c.add_argument(
        "--out",
        help="report JSON (default: benchmarks/reports/coldstart-RUNNAME.json; plot beside)",
    )
    c.add_argument(
        "--holdout-share",
        type=float,
        default=d("holdout_share"),
        help="share of the eligible items held out of training (half validation, half test)",
    )
    c.add_argument(
        "--replay",
        default=",".join(map(str, d("replays"))),
        help="comma-separated N: each held-out item's first N interactions are replayed",
    )
    c.add_argument(
        "--retrain-replay",
        help="comma-separated N that also get a full retrain (the upper bound; default: every N)",
    )
    c.add_argument(
        "--min-remaining",
        type=int,
        default=d("min_remaining"),
        help="eligible items keep at least this many interactions beyond the largest N to score",
    )
    c.add_argument(
        "--holdout-seed", type=int, default=d("seed"), help="seed of the held-out items and orders"
    )
    c.add_argument(
        "--known-drop-budget",
        type=float,
        default=d("known_drop_budget"),
        help="validation choice: serving fresh items may cost known-item recall@20 at most this "
        "fraction (relative)",
    )
    c.add_argument(
        "--epochs",
        type=int,
        help="epochs per training (default: the run's selected content epoch)",
    )
    c.add_argument("--threads", type=int, default=d("threads"), help="torch threads")
    c.add_argument("--cache-dir", help="trained models, reused on a rerun (default: RUN/coldstart)")
    c.add_argument("--no-plot", action="store_true", help="no PNG beside the report")
    c.add_argument(
        "--validation-only",
        action="store_true",
        help="stop after the validation choices; the test items are not scored",
    )
    _no_progress(c)
    c.set_defaults(fn=cmd_coldstart_eval)


# name -> (one-line help, adds the options and sets fn)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "split": ("export the evaluation split as TSV (original ids)", _split_parser),
    "train": (
        "train + evaluate the teacher and the baselines; write RUN_DIR/report.json",
        _train_parser,
    ),
    "compress": (
        "compress a run's teacher (distill, low-rank, hash, prune, quantize); write RUN_DIR/bundle",
        _compress_parser,
    ),
    "pipeline": ("train, then compress (same data options as train)", _pipeline_parser),
    "export": (
        "bundle the run's fp32 teacher (ONNX user tower + FAISS) without compression",
        _export_parser,
    ),
    "export-device": (
        "the selected bundle's user tower as .ort + quantised item table for on-device "
        "recommendation; write DIR/device.json",
        _export_device_parser,
    ),
    "publish": (
        "bulk-load a run's interactions and friendships into Redis",
        _publish_parser,
    ),
    "serve": ("serve a bundle over gRPC with live features from Redis", _serve_parser),
    "loadtest": (
        "Locust load test of the server vs a naive peer, side by side; write OUT/summary.json",
        _loadtest_parser,
    ),
    "retrain": (
        "events since the last run + base data -> retrain, compress, gate, publish to BUNDLES",
        _retrain_parser,
    ),
    "rollout": ("point BUNDLES/CURRENT at a bundle version", _rollout_parser),
    "rollback": ("point BUNDLES/CURRENT back at the previous version", _rollback_parser),
    "publish-bundle": (
        "copy a bundle into BUNDLES/VERSION (checksums verified), make it live",
        _publish_bundle_parser,
    ),
    "keygen": ("write an Ed25519 key pair for signing bundles", _keygen_parser),
    "coldstart-eval": (
        "item cold start: hold out items, replay their first interactions, score fresh-item "
        "fold-in vs popular vs a full retrain; write a JSON report",
        _coldstart_eval_parser,
    ),
}


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The CLI parser with the options of ``commands`` (None: of every subcommand).

    Every subcommand is listed either way, so `socialrec --help` and errors name them all;
    :func:`main` adds only the options of the subcommand it runs.
    """
    p = argparse.ArgumentParser(
        prog="socialrec",
        description="Train, compress and serve social recommendations.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {version()}",
        help="print the package version and exit",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, add) in COMMANDS.items():
        s = sub.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)
        if commands is None or name in commands:
            add(s)
    return p


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), if any."""
    word = next((w for w in argv if not w.startswith("-")), None)
    return word if word in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _command_in(argv)
    args = build_parser([command] if command else []).parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"socialrec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
