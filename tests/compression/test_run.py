"""`socialrec compress --quick` end to end on the tiny run: report, plot, selected bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from socialrec.compression.run import CompressConfig, run
from socialrec.serving.bundle import open_bundle
from socialrec.training.run import load_run
from socialrec.training.split import Split, validation_split

from socialrec.cli import build_parser

pytestmark = pytest.mark.slow  # the slow tier (make test-slow)


def _pairs(u: np.ndarray, i: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(u.tolist(), i.tolist(), strict=True))


def test_compress_quick_writes_report_and_bundle(run_dir: Path, capsys, monkeypatch) -> None:
    from socialrec.compression import run as run_mod

    trained_on: list[tuple[str, Split]] = []  # every split a model learns from, in order
    real_fit, real_distill = run_mod.fit, run_mod.distill
    monkeypatch.setattr(
        run_mod, "fit", lambda s, *a, **k: trained_on.append(("fit", s)) or real_fit(s, *a, **k)
    )
    monkeypatch.setattr(
        run_mod,
        "distill",
        lambda t, st, s, *a, **k: trained_on.append(("kd", s)) or real_distill(t, st, s, *a, **k),
    )
    bundle = run(
        CompressConfig(
            run_dir=str(run_dir),
            quick=True,
            threads=1,
            progress=True,
            timing_queries=20,
            grid="full",
            test_all=True,
        )
    )
    # Nothing learns from a pair it is scored on: the validation pass (each KD run; the
    # teacher there is the run's saved validation twin) trains on the validation split's train
    # part, the test pass on train only.
    _, split, _ = load_run(run_dir)
    val = validation_split(split)
    held_val = _pairs(val.test_user, val.test_item)
    held_test = _pairs(split.test_user, split.test_item)
    n_kd = sum(kind == "kd" for kind, _ in trained_on) // 2
    assert n_kd >= 2 and all(kind == "kd" for kind, _ in trained_on)  # the twin: no refit
    for k, (_, s) in enumerate(trained_on):
        pairs = _pairs(s.train_user, s.train_item)
        assert not pairs & held_test
        if k < n_kd:  # validation pass
            assert not pairs & held_val
            assert not _pairs(s.friends_train[:, 0], s.friends_train[:, 1]) & _pairs(
                val.friends_test[:, 0], val.friends_test[:, 1]
            )
        else:
            assert pairs == _pairs(split.train_user, split.train_item)
    rep = json.loads((run_dir / "compression.json").read_text())
    out = capsys.readouterr().out
    n = len(rep["variants"])
    for k, v in enumerate(rep["variants"], start=1):  # where a long job is, variant by variant
        for label in ("validation", "test"):
            assert f"[compress] {label}: variant {k} of {n}: {v['name']}" in out
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
            "test_retention",
            "val_recall@20",
            "val_friends_recall@20",
            "us_per_query",
        }
    # Selected on validation: the smallest validation bundle that keeps 97% there.
    assert rep["selected_on"] == "validation"
    sel = next(v for v in rep["variants"] if v["name"] == rep["selected"])
    assert sel["retention"] >= 0.97 or rep["selected"] == "teacher-fp32"
    ok = [v for v in rep["variants"] if v["retention"] >= 0.97]
    assert sel["val_bytes"] == min(v["val_bytes"] for v in ok)
    for v in rep["variants"]:  # retention is validation's, test_retention the test's
        t = rep["variants"][0]
        assert v["retention_content"] == round(v["val_recall@20"] / t["val_recall@20"], 4)
        assert v["test_retention_content"] == round(v["recall@20"] / t["recall@20"], 4)
    assert not (run_dir / "compress" / "validation").exists()  # scored, then removed
    assert open_bundle(bundle).manifest["variant"]["name"] == rep["selected"]
    assert (
        open_bundle(bundle).manifest["metrics"]["served"]["content"]["recall@20"]
        == sel["recall@20"]
    )
    selection = open_bundle(bundle).manifest["metrics"]["selection"]
    assert (
        selection["split"].startswith("validation") and selection["retention"] == sel["retention"]
    )
    assert selection["served"]["content"]["recall@20"] == sel["val_recall@20"]
    # The KD target of the content head was chosen on validation among teacher, mixes and EASE.
    kd = rep["kd_target"]
    assert kd["chosen"] in ("teacher", "ensemble", "EASE")
    assert [g["w"] for g in kd["grid"]][0] == 0.0 and kd["grid"][-1]["w"] == "inf"
    best = max(g["val_recall@20"] for g in kd["grid"])
    assert kd["val_recall@20"][kd["chosen"]] == best
    assert set(kd["test_recall@20"]) == {"teacher", "EASE", "ensemble"}
    assert any(n.startswith("distill-d64-kd-") for n in names)  # a student taught by EASE (+ mix)
    assert (run_dir / "compression.png").stat().st_size > 0
    md = (run_dir / "compression.md").read_text()
    assert "| val R@20 |" in md and "| test R@20 |" in md and "chosen on validation" in md


def test_the_saved_validation_twin_is_the_refit_teacher(run_dir: Path) -> None:
    """Without refinement the twin `train` saves is its selection-phase teacher: the same
    weights compress's fallback refit on the validation train part gives."""
    from socialrec.compression.run import teacher_on_validation
    from socialrec.training.train import TrainConfig, load_checkpoint

    _, split, report = load_run(run_dir)
    val = validation_split(split)
    _, ck = load_checkpoint(run_dir / "teacher.pt")
    tc = TrainConfig(**{**ck["train_config"], "threads": 1})
    run_cfg = json.loads((run_dir / "run.json").read_text())
    saved = teacher_on_validation(val, tc, report, run_cfg, False, run_dir)
    refit = teacher_on_validation(val, tc, report, run_cfg, False)
    for name, value in refit.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name], value, msg=name)


def test_default_scores_only_the_teacher_and_the_selected_variant_on_test(
    run_dir: Path, capsys
) -> None:
    """By default the study variants are not built and the test pass rebuilds only the
    reference and the one served; the others keep their validation numbers, marked."""
    stale = run_dir / "compress" / "lowrank-r64"  # as an earlier --test-all run leaves it
    stale.mkdir(parents=True, exist_ok=True)
    run(CompressConfig(run_dir=str(run_dir), quick=True, threads=1, timing_queries=20))
    rep = json.loads((run_dir / "compression.json").read_text())
    out = capsys.readouterr().out
    names = [v["name"] for v in rep["variants"]]
    assert "teacher-torch-dynamic-int8" not in names  # a study variant (grid "full")
    assert len(names) >= 4 and names[0] == "teacher-fp32"
    tested = [v["name"] for v in rep["variants"] if v["tested"]]
    assert tested == list(dict.fromkeys(["teacher-fp32", rep["selected"]]))
    assert "[compress] test: variant 2 of" in out or rep["selected"] == "teacher-fp32"
    assert f"[compress] test: variant 1 of {len(tested)}: teacher-fp32" in out
    for v in rep["variants"]:
        assert v["val_recall@20"] is not None and v["retention"] is not None
        if v["tested"]:
            assert v["recall@20"] is not None and v["us_per_query"] > 0
            assert (run_dir / "compress" / v["name"]).is_dir()
        else:
            assert v["recall@20"] is None and v["test_retention"] is None
            assert v["us_per_query"] is None and not (run_dir / "compress" / v["name"]).exists()
            assert v["x_smaller"] == round(rep["variants"][0]["val_bytes"] / v["bytes"], 2)
    md = (run_dir / "compression.md").read_text()
    assert "not scored on test" in md and "--test-all" in md
    assert (run_dir / "compression.png").stat().st_size > 0


def test_cli_parses_compress_and_pipeline() -> None:
    a = build_parser().parse_args(["compress", "--run", "r", "--min-retention", "0.9", "--quick"])
    assert a.run == "r" and a.min_retention == 0.9 and a.quick
    a = build_parser().parse_args(["compress", "--run", "r", "--variants", "x,y"])
    assert a.variants == "x,y" and a.grid == "standard" and not a.test_all
    a = build_parser().parse_args(["compress", "--run", "r", "--grid", "full", "--test-all"])
    assert a.grid == "full" and a.test_all
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


def test_the_finetune_lr_is_chosen_on_validation_and_replayed_on_test(
    run_dir: Path, capsys, monkeypatch
) -> None:
    """The first KD fine-tune of the validation pass tries every candidate lr; the best
    validation score wins, later fine-tunes and the test pass use it."""
    from socialrec.compression import run as run_mod

    lrs_used: list[float] = []
    real = run_mod.distill

    def spy(t, st, s, tc, *a, **k):
        lrs_used.append(tc.lr)
        return real(t, st, s, tc, *a, **k)

    cfg = CompressConfig(
        run_dir=str(run_dir),
        threads=1,
        timing_queries=20,
        only=("lowrank-r32-kd", "lowrank-r32-kd-ease"),
        finetune_epochs=3,
        finetune_lrs=(1e-4, 3e-3),
        test_all=True,
    )
    monkeypatch.setattr(run_mod, "distill", spy)
    run(cfg)
    rep = json.loads((run_dir / "compression.json").read_text())
    ft = rep["finetune_lr_chosen_on_validation"]
    assert ft["chosen_by"] == "lowrank-r32-kd" and set(ft["val_score"]) == {"0.0001", "0.003"}
    best = max(ft["val_score"].items(), key=lambda kv: kv[1])
    assert ft["lr"] == float(best[0]) or ft["val_score"]["0.0001"] == ft["val_score"]["0.003"]
    # validation: both candidates, then the EASE-taught fine-tune at the chosen lr; test: two
    # fine-tunes at the chosen lr
    assert lrs_used == [1e-4, 3e-3, ft["lr"], ft["lr"], ft["lr"]]
    assert "[compress] fine-tune lr on validation (0.0001: " in capsys.readouterr().out
