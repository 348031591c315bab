"""`socialrec compress --quick` end to end on the tiny run: report, plot, selected bundle."""

from __future__ import annotations

import json
from pathlib import Path

from socialrec.compression.run import CompressConfig, run
from socialrec.serving.bundle import open_bundle

from socialrec.cli import build_parser


def test_compress_quick_writes_report_and_bundle(run_dir: Path) -> None:
    bundle = run(
        CompressConfig(
            run_dir=str(run_dir), quick=True, threads=1, progress=False, timing_queries=20
        )
    )
    rep = json.loads((run_dir / "compression.json").read_text())
    assert set(rep["teacher"]) >= {"bytes", "recall@20", "ndcg@20", "friends_recall@20"}
    names = [v["name"] for v in rep["variants"]]
    assert names[0] == "teacher-fp32" and "teacher-torch-dynamic-int8" in names
    for v in rep["variants"]:
        assert set(v) >= {
            "name",
            "techniques",
            "bytes",
            "recall@20",
            "ndcg@20",
            "friends_recall@20",
            "retention",
            "us_per_query",
        }
    sel = next(v for v in rep["variants"] if v["name"] == rep["selected"])
    assert sel["retention"] >= 0.97 or rep["selected"] == "teacher-fp32"
    ok = [v for v in rep["variants"] if v["retention"] >= 0.97]
    assert sel["bytes"] == min(v["bytes"] for v in ok)  # the smallest that keeps quality
    assert open_bundle(bundle).manifest["variant"]["name"] == rep["selected"]
    assert (
        open_bundle(bundle).manifest["metrics"]["served"]["content"]["recall@20"]
        == sel["recall@20"]
    )
    assert (run_dir / "compression.png").stat().st_size > 0
    assert "| variant |" in (run_dir / "compression.md").read_text()


def test_cli_parses_compress_and_pipeline() -> None:
    a = build_parser().parse_args(["compress", "--run", "r", "--min-retention", "0.9", "--quick"])
    assert a.run == "r" and a.min_retention == 0.9 and a.quick
    a = build_parser().parse_args(
        ["pipeline", "--dataset", "synthetic", "--epochs", "3", "--quick"]
    )
    assert a.epochs == 3 and a.min_retention == 0.97
