"""The `socialrec` command: one CLI, one subcommand per stage; each parses and calls a run()."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    from training.split import DEFAULT_SEED

    g.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"split seed (train and split share it; default {DEFAULT_SEED})",
    )


def _data_config(a: argparse.Namespace):
    from training.data import DataConfig

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
    from training.data import load_dataset
    from training.split import SplitConfig, export_split, split_dataset

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
    from training.baselines import BaselineConfig
    from training.run import RunConfig, run
    from training.split import SplitConfig
    from training.train import TrainConfig

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


def cmd_export(a: argparse.Namespace) -> int:
    from compression.export import _summary, export_run

    path = export_run(a.run, a.out)
    print(_summary(path))
    return 0


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
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser(
        "export", help="bundle the run's fp32 teacher (ONNX user tower + FAISS) without compression"
    )
    e.add_argument("--run", required=True, help="run directory written by `socialrec train`")
    e.add_argument("--out", help="bundle directory (default RUN_DIR/bundle)")
    e.set_defaults(fn=cmd_export)
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
