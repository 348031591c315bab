"""Compression on a dataset without a friend graph: retention and selection use content only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from socialrec.compression import run as run_mod
from socialrec.compression.run import CompressConfig, add_retention, format_table, select
from socialrec.serving.bundle import open_bundle
from socialrec.training.data import DataConfig
from socialrec.training.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
NO_FRIENDS = "no friend pairs in the dataset"
FAST = TrainConfig(dim=16, epochs=6, batch_size=128, lr=5e-3, patience=4, eval_every=2, threads=1)


def _interactions_only_tsv(path: Path) -> Path:
    """A tsv dataset with no friends file: the synthetic generator's interactions only."""
    from socialrec.training.synthetic import SyntheticConfig, generate

    ds = generate(SyntheticConfig(n_users=300, n_items=200, n_interactions=6000, seed=7))
    rows = zip(
        ds.inter_user.tolist(), ds.inter_item.tolist(), ds.inter_weight.tolist(), strict=True
    )
    path.write_text("user\titem\tweight\n" + "".join(f"u{u}\ti{i}\t{w!r}\n" for u, i, w in rows))
    return path


@pytest.fixture(scope="module")
def no_friends_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `socialrec train` run on interactions only (~5 s)."""
    from socialrec.training.run import RunConfig, run

    d = tmp_path_factory.mktemp("nofriends")
    data = DataConfig(dataset="tsv", interactions=str(_interactions_only_tsv(d / "inter.tsv")))
    return run(RunConfig(out=str(d / "run"), data=data, train=FAST, progress=False))


def _rows(friends: bool) -> list[dict]:
    """compression.json-shaped rows: teacher, a same-quality int8 copy, a weak small student."""
    f = (lambda x: x) if friends else (lambda _x: None)
    return [
        {"name": "teacher-fp32", "bytes": 60e6, "recall@20": 0.30, "friends_recall@20": f(0.30)},
        {"name": "teacher-int8", "bytes": 15e6, "recall@20": 0.295, "friends_recall@20": f(0.20)},
        {"name": "distill-d64", "bytes": 3e6, "recall@20": 0.20, "friends_recall@20": f(0.30)},
    ]


def test_retention_over_the_tasks_present() -> None:
    rows = _rows(friends=False)
    add_retention(rows, ["content"])
    assert [r["retention_friends"] for r in rows] == [None, None, None]
    assert [r["retention"] for r in rows] == [r["retention_content"] for r in rows]
    assert rows[1]["retention"] == pytest.approx(0.9833, abs=1e-4)
    assert select(rows, 0.97)["name"] == "teacher-int8"  # keeps >= 97% of content
    # With friends present the int8 copy loses a third of friends recall: the teacher stays.
    both = _rows(friends=True)
    add_retention(both, ["content", "friends"])
    assert both[1]["retention"] == pytest.approx(0.6667, abs=1e-4)
    assert select(both, 0.97)["name"] == "teacher-fp32"
    # No task present: nothing qualifies, the teacher is kept.
    none = _rows(friends=False)
    add_retention(none, [])
    assert (
        all(r["retention"] is None for r in none) and select(none, 0.97)["name"] == "teacher-fp32"
    )


def test_table_and_plot_say_the_friends_task_is_absent(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    rows = _rows(friends=False)
    add_retention(rows, ["content"])
    for r in rows:
        r["ndcg@20"], r["techniques"], r["us_per_query"] = 0.1, [], 50.0
        r["x_smaller"] = rows[0]["bytes"] / r["bytes"]
    out = {
        "variants": rows,
        "teacher": rows[0],
        "selected": "teacher-int8",
        "min_retention": 0.97,
        "absent_tasks": {"friends": NO_FRIENDS},
    }
    table = format_table(out)
    assert "| absent |" in table and "0.0000" not in table
    assert "(of the served teacher's content recall@20); selected: teacher-int8" in table
    assert f"The friends task is absent ({NO_FRIENDS})" in table
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    run_mod.plot(out, tmp_path / "p.png")
    axes = figures[-1].get_axes()
    assert [ax.get_title() for ax in axes] == ["content recall@20", "friends recall@20: absent"]
    assert [t.get_text() for t in axes[1].texts] == [NO_FRIENDS]
    assert "of the teacher on content, on validation)" in figures[-1].get_suptitle()


def test_compress_selects_a_compressed_variant_on_content_alone(
    no_friends_run: Path, monkeypatch
) -> None:
    """The real compression run (training-free variants only, for speed): the friends task is
    absent everywhere, retention is content's, and a smaller bundle that keeps it is chosen."""
    keep = {"teacher-fp32", "teacher-int8", "teacher-int4"}
    every = run_mod.variants
    monkeypatch.setattr(run_mod, "variants", lambda *a: [v for v in every(*a) if v.name in keep])
    bundle = run_mod.run(
        CompressConfig(run_dir=str(no_friends_run), threads=1, progress=False, timing_queries=20)
    )
    rep = json.loads((no_friends_run / "compression.json").read_text())
    assert rep["absent_tasks"] == {"friends": NO_FRIENDS}
    assert (
        rep["teacher"]["friends_recall@20"] is None and rep["teacher"]["torch"]["friends"] is None
    )
    assert rep["absent_tasks_validation"] == {"friends": NO_FRIENDS}
    for v in rep["variants"]:
        assert v["friends_recall@20"] is None and v["retention_friends"] is None
        assert v["val_friends_recall@20"] is None and v["test_retention_friends"] is None
        assert v["retention"] == v["retention_content"]
        assert v["val_metrics"]["friends"] == {"absent": True, "reason": NO_FRIENDS}
        if v["tested"]:  # the teacher and the selected variant (no --test-all here)
            assert v["metrics"]["friends"] == {"absent": True, "reason": NO_FRIENDS}
        else:
            assert v["metrics"] is None
    sel = next(v for v in rep["variants"] if v["name"] == rep["selected"])
    assert rep["selected"] != "teacher-fp32" and sel["retention_content"] >= 0.97
    ok = [v for v in rep["variants"] if v["retention"] >= 0.97]
    assert sel["bytes"] == min(v["bytes"] for v in ok)
    manifest = open_bundle(bundle).manifest
    assert manifest["variant"]["name"] == rep["selected"]
    assert manifest["metrics"]["served"]["friends"] == {"absent": True, "reason": NO_FRIENDS}
    assert "The friends task is absent" in (no_friends_run / "compression.md").read_text()


def test_export_of_a_run_without_friends(no_friends_run: Path, tmp_path: Path) -> None:
    """`socialrec export` reads report.json's absent friends task without a teacher row."""
    from socialrec.compression.export import export_run

    manifest = open_bundle(export_run(no_friends_run, tmp_path / "b")).manifest
    assert manifest["metrics"]["teacher_torch"]["friends"] is None
    assert manifest["metrics"]["teacher_torch"]["content"]["recall@20"] > 0.0


@pytest.mark.slow
@pytest.mark.timeout(1500)  # two passes (validation, then test): ~2 min idle, far more when shared
def test_cli_compress_quick_without_friends(no_friends_run: Path) -> None:
    """`socialrec compress --min-retention 0.97 --quick` through the CLI: selection on the
    validation pass with friends absent there too."""
    r = subprocess.run(
        [sys.executable, "-m", "socialrec.cli", "compress", "--run", str(no_friends_run)]
        + ["--min-retention", "0.97", "--quick", "--compress-threads", "1", "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1400,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((no_friends_run / "compression.json").read_text())
    assert rep["absent_tasks"] == {"friends": NO_FRIENDS}
    assert rep["absent_tasks_validation"] == {"friends": NO_FRIENDS}
    sel = next(v for v in rep["variants"] if v["name"] == rep["selected"])
    assert rep["selected"] != "teacher-fp32", [(v["name"], v["retention"]) for v in rep["variants"]]
    assert sel["retention_content"] >= 0.97 and sel["retention_friends"] is None
