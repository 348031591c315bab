"""`socialrec compress --quick` end to end on the tiny run: report, plot, selected bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from socialrec.compression.run import CompressConfig, run
from socialrec.serving.bundle import open_bundle

from socialrec.cli import build_parser

pytestmark = pytest.mark.slow  # the slow tier (make test-slow)


def test_compress_quick_writes_report_and_bundle(run_dir: Path, capsys) -> None:
    bundle = run(
        CompressConfig(
            run_dir=str(run_dir), quick=True, threads=1, progress=True, timing_queries=20
        )
    )
    rep = json.loads((run_dir / "compression.json").read_text())
    out = capsys.readouterr().out
    n = len(rep["variants"])
    for k, v in enumerate(rep["variants"], start=1):  # where a long job is, variant by variant
        assert f"[compress] variant {k} of {n}: {v['name']}" in out
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


def _report(selected: str) -> dict:
    """A compression.json-shaped dict: teacher, two variants at different sizes."""
    rows = [
        {"name": "teacher-fp32", "bytes": 60e6, "recall@20": 0.28, "friends_recall@20": 0.30},
        {"name": "teacher-int8", "bytes": 15e6, "recall@20": 0.28, "friends_recall@20": 0.30},
        {"name": "distill-d64", "bytes": 3e6, "recall@20": 0.22, "friends_recall@20": 0.23},
    ]
    return {"variants": rows, "teacher": rows[0], "selected": selected, "min_retention": 0.97}


def test_plot_has_one_panel_per_task_in_mb_and_names_the_selected_variant(
    tmp_path: Path, monkeypatch
) -> None:
    import matplotlib.pyplot as plt
    from socialrec.compression import run as run_mod

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look inside
    for selected in ("teacher-int8", "teacher-fp32"):  # the teacher itself may be selected
        path = run_mod.plot(_report(selected), tmp_path / f"{selected}.png")
        assert path.stat().st_size > 0
        fig = figures[-1]
        axes = fig.get_axes()
        assert [ax.get_title() for ax in axes] == ["content recall@20", "friends recall@20"]
        for ax in axes:
            assert "MB" in ax.get_xaxis().get_label().get_text()
            lo, hi = ax.get_xlim()
            assert lo < 3 and hi > 60 and hi < 1000  # megabytes, not bytes
            assert not ax.texts  # no point labels to collide: names live in the legend
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert f"selected: {selected}" in legend
        assert {"teacher-fp32", "teacher-int8", "distill-d64"} <= set(legend)
