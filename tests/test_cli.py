"""The `socialrec` command itself: version, help of every subcommand, defaults, fast failures."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from socialrec.cli import COMMANDS, build_parser, default

from .conftest import socialrec_cli

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return socialrec_cli(*args, timeout=timeout)


def _subparser(name: str) -> argparse.ArgumentParser:
    """The subcommand's parser with its options (as `socialrec NAME` builds it)."""
    p = build_parser([name])
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_version_prints_the_package_version() -> None:
    r = _cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"socialrec {version('socialrec')}"


def test_top_level_help_lists_every_subcommand() -> None:
    r = _cli("--help")
    assert r.returncode == 0, r.stderr
    for name in COMMANDS:
        assert name in r.stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_help_exits_0_and_documents_every_option(name, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser([name]).parse_args([name, "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the help formatter's line wrapping
    for action in _subparser(name)._actions:
        assert action.help, f"{name} {action.option_strings}: no help text"
        d = action.default
        shown = d is not None and d is not False and d != "" and d is not argparse.SUPPRESS
        if shown and not action.required:
            assert f"(default: {d})" in out, f"{name} {action.option_strings}: default not shown"


def test_train_help_shows_the_dataclass_defaults_in_a_subprocess() -> None:
    from socialrec.training.train import TrainConfig

    r = _cli("train", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert f"embedding dimension (default: {TrainConfig().dim})" in text


# (subcommand, option dest, config class path, field): every default the CLI shows.
DEFAULTS = [
    ("split", "dataset", "socialrec.training.data:DataConfig", "dataset"),
    ("split", "synthetic_users", "socialrec.training.synthetic:SyntheticConfig", "n_users"),
    ("split", "synthetic_items", "socialrec.training.synthetic:SyntheticConfig", "n_items"),
    (
        "split",
        "synthetic_interactions",
        "socialrec.training.synthetic:SyntheticConfig",
        "n_interactions",
    ),
    ("split", "data_seed", "socialrec.training.synthetic:SyntheticConfig", "seed"),
    ("split", "seed", "socialrec.training.split:SplitConfig", "seed"),
    ("train", "epochs", "socialrec.training.train:TrainConfig", "epochs"),
    ("train", "dim", "socialrec.training.train:TrainConfig", "dim"),
    ("train", "batch_size", "socialrec.training.train:TrainConfig", "batch_size"),
    ("train", "lr", "socialrec.training.train:TrainConfig", "lr"),
    ("train", "patience", "socialrec.training.train:TrainConfig", "patience"),
    ("train", "threads", "socialrec.training.train:TrainConfig", "threads"),
    ("train", "ease_lambda", "socialrec.training.baselines:BaselineConfig", "ease_lambda"),
    ("train", "max_eval_users", "socialrec.training.run:RunConfig", "max_eval_users"),
    ("train", "refine_epochs", "socialrec.training.refine:RefineConfig", "epochs"),
    ("compress", "min_retention", "socialrec.compression.run:CompressConfig", "min_retention"),
    ("compress", "quick", "socialrec.compression.run:CompressConfig", "quick"),
    ("compress", "compress_threads", "socialrec.compression.run:CompressConfig", "threads"),
    ("pipeline", "epochs", "socialrec.training.train:TrainConfig", "epochs"),
    ("pipeline", "min_retention", "socialrec.compression.run:CompressConfig", "min_retention"),
    ("publish", "namespace", "socialrec.serving.publish:PublishConfig", "namespace"),
    ("publish", "train_only", "socialrec.serving.publish:PublishConfig", "train_only"),
    ("publish", "flush", "socialrec.serving.publish:PublishConfig", "flush"),
    ("serve", "redis_url", "socialrec.serving.config:ServerConfig", "redis_url"),
    ("serve", "namespace", "socialrec.serving.config:ServerConfig", "namespace"),
    ("serve", "host", "socialrec.serving.config:ServerConfig", "host"),
    ("serve", "port", "socialrec.serving.config:ServerConfig", "port"),
    ("serve", "workers", "socialrec.serving.config:ServerConfig", "workers"),
    ("serve", "metrics_port", "socialrec.serving.config:ServerConfig", "metrics_port"),
    ("serve", "max_k", "socialrec.serving.config:ServerConfig", "max_k"),
    (
        "serve",
        "max_concurrent_rpcs",
        "socialrec.serving.config:ServerConfig",
        "max_concurrent_rpcs",
    ),
    (
        "serve",
        "max_request_bytes",
        "socialrec.serving.config:ServerConfig",
        "max_request_bytes",
    ),
    ("serve", "redis_client", "socialrec.serving.config:ServerConfig", "redis_client"),
    ("serve", "result_cache_mb", "socialrec.serving.config:ServerConfig", "result_cache_mb"),
    ("serve", "event_loop", "socialrec.serving.config:ServerConfig", "event_loop"),
    ("serve", "bundle_key", "socialrec.serving.config:ServerConfig", "bundle_key"),
    ("serve", "token_file", "socialrec.serving.config:ServerConfig", "token_file"),
    ("serve", "watch_interval", "socialrec.serving.config:ServerConfig", "watch_interval_s"),
    ("loadtest", "users", "socialrec.loadtest.run:LoadTestConfig", "users"),
    ("loadtest", "workers", "socialrec.loadtest.run:LoadTestConfig", "workers"),
    ("loadtest", "shape", "socialrec.loadtest.run:LoadTestConfig", "shape"),
    ("loadtest", "fault", "socialrec.loadtest.run:LoadTestConfig", "fault"),
    ("loadtest", "unix_socket", "socialrec.loadtest.run:LoadTestConfig", "unix_socket"),
    ("retrain", "namespace", "socialrec.retrain:RetrainConfig", "namespace"),
    ("retrain", "gate_margin", "socialrec.retrain:RetrainConfig", "gate_margin"),
    ("retrain", "epochs", "socialrec.retrain:RetrainConfig", "epochs"),
    ("retrain", "compress", "socialrec.retrain:RetrainConfig", "compress"),
    ("retrain", "work_dir", "socialrec.retrain:RetrainConfig", "work_dir"),
    ("retrain", "max_eval_users", "socialrec.retrain:RetrainConfig", "max_eval_users"),
    ("retrain", "threads", "socialrec.retrain:RetrainConfig", "threads"),
]


@pytest.mark.parametrize(("command", "dest", "where", "field"), DEFAULTS)
def test_cli_defaults_equal_the_config_dataclass_defaults(command, dest, where, field) -> None:
    import importlib

    module, name = where.split(":")
    cls = getattr(importlib.import_module(module), name)
    action = next(a for a in _subparser(command)._actions if a.dest == dest)
    assert action.default == default(cls, field)


def test_loadtest_tuple_defaults_round_trip() -> None:
    from socialrec.loadtest.run import LoadTestConfig

    opts = {a.dest: a.default for a in _subparser("loadtest")._actions}
    assert tuple(opts["serve_args"].split()) == LoadTestConfig(run="r").serve_args
    assert opts["steps"] == ",".join(map(str, LoadTestConfig(run="r").steps))


def test_default_reads_plain_and_factory_defaults_and_names_a_bad_field() -> None:
    from socialrec.compression.run import CompressConfig
    from socialrec.training.distill import DistillConfig

    assert default(CompressConfig, "min_retention") == CompressConfig(run_dir="r").min_retention
    assert default(CompressConfig, "distill") == DistillConfig()
    with pytest.raises(ValueError, match="run_dir"):
        default(CompressConfig, "run_dir")  # required: no default
    with pytest.raises(AttributeError, match="nope"):
        default(CompressConfig, "nope")


def test_serve_with_a_missing_bundle_fails_fast_with_one_line(tmp_path: Path) -> None:
    """Before a local redis-server or any worker is started: one line on stderr, exit 2."""
    missing = tmp_path / "runs" / "nope"
    t0 = time.monotonic()
    r = _cli("serve", "--bundle", str(missing), "--redis-url", "local", "--workers", "2")
    elapsed = time.monotonic() - t0
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(missing) in lines[0] and "does not exist" in lines[0]
    assert "redis-server" not in r.stdout  # nothing was started
    assert elapsed < 60


def test_serve_with_a_file_as_bundle_says_it_is_not_a_directory(tmp_path: Path) -> None:
    f = tmp_path / "bundle.tar"
    f.write_bytes(b"")
    r = _cli("serve", "--bundle", str(f))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "not a directory" in r.stderr


def test_only_the_running_subcommand_imports_its_stage() -> None:
    """`--version`, `--help` and `serve` never import torch (the serving install has none)."""
    code = (
        "import sys\n"
        "from socialrec.cli import main\n"
        "for argv in (['--version'], ['--help'], ['serve', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr


def test_pipeline_trains_then_compresses_in_one_command(tmp_path) -> None:
    """`socialrec pipeline` takes every train and compress option and runs both stages (it
    once crashed at the compress step on an option only `compress` declared)."""
    out = tmp_path / "run"
    r = _cli(
        "pipeline", "--synthetic-users", "300", "--synthetic-items", "200",
        "--synthetic-interactions", "6000", "--epochs", "4", "--dim", "16", "--threads", "1",
        "--tune-budget", "0", "--refine-epochs", "4", "--quick", "--variants", "teacher-int8",
        "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert "refine" in report["teacher"]
    built = [v["name"] for v in json.loads((out / "compression.json").read_text())["variants"]]
    assert built == ["teacher-fp32", "teacher-int8"]
    assert (out / "bundle" / "manifest.json").is_file()
