"""The teacher refined by distillation: chosen per head on validation, recorded, reproducible."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from socialrec.training.data import DataConfig
from socialrec.training.distill import BlendedTeacher, CachedTeacher, EaseScorer
from socialrec.training.features import Features
from socialrec.training.model import TwoTower
from socialrec.training.refine import RefineConfig, config_from_dict
from socialrec.training.run import PRE_KD, RunConfig, prepare, run
from socialrec.training.split import validation_split
from socialrec.training.train import TrainConfig, load_checkpoint, tower_config

DATA = DataConfig(synthetic_users=300, synthetic_items=200, synthetic_interactions=6000, seed=3)
# A short teacher: on this data EASE scores far above it on validation, so the distilled
# student (taught by the blend) wins the content head.
TEACHER = TrainConfig(dim=16, epochs=12, eval_every=2, threads=1)


def _run(tmp: Path, refine: RefineConfig) -> dict:
    run(RunConfig(out=str(tmp), data=DATA, train=TEACHER, refine=refine, progress=False))
    return json.loads((tmp / "report.json").read_text())


@pytest.fixture(scope="module")
def refined(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("refined")
    return out, _run(out, RefineConfig(epochs=30))


def test_a_head_keeps_the_student_only_where_it_wins_on_validation(refined) -> None:
    out, report = refined
    log = report["teacher"]["refine"]
    heads = log["heads"]
    for h in heads.values():
        won = h["student_val_recall@20"] > h["teacher_val_recall@20"]
        assert h["kept"] == ("student" if won else "teacher")
    assert heads["content"]["kept"] == "student", heads  # this data is built so it does
    assert log["refit_epochs"]["content"] == heads["content"]["student_epoch"]
    assert log["kd_target"]["chosen"] in {"teacher", "ensemble", "EASE"}
    # The report shows the model before distillation next to the one kept.
    assert PRE_KD in report["content"] and "teacher" in report["content"]
    assert report["content"][PRE_KD] != report["content"]["teacher"]
    if heads["friends"]["kept"] == "teacher":
        assert report["friends"][PRE_KD] == report["friends"]["teacher"]
    assert report["timings_s"]["refine"] > 0


def test_the_checkpoint_is_the_refined_model(refined) -> None:
    """teacher.pt scores what the report calls the teacher (it is what compression and export
    read)."""
    from socialrec.training.train import evaluate_model

    out, report = refined
    model, _ = load_checkpoint(out / "teacher.pt")
    _, split = prepare(RunConfig(out=str(out), data=DATA))
    got = evaluate_model(model, split)
    assert got["content"]["recall@20"] == pytest.approx(report["content"]["teacher"]["recall@20"])


def test_a_student_that_does_not_win_leaves_the_teacher_as_it_was(tmp_path: Path) -> None:
    plain = _run(tmp_path / "plain", RefineConfig(enabled=False))
    one = _run(tmp_path / "one", RefineConfig(epochs=1))  # one epoch cannot beat the teacher
    assert all(h["kept"] == "teacher" for h in one["teacher"]["refine"]["heads"].values())
    assert PRE_KD not in one["content"]
    assert one["content"]["teacher"] == plain["content"]["teacher"]
    a, _ = load_checkpoint(tmp_path / "plain" / "teacher.pt")
    b, _ = load_checkpoint(tmp_path / "one" / "teacher.pt")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert plain["teacher"]["refine"]["note"] == "disabled"


def test_cached_targets_equal_the_teacher_run_on_the_batch() -> None:
    _, split = prepare(RunConfig(data=DATA))
    val = validation_split(split)
    torch.manual_seed(0)
    teacher = TwoTower(tower_config(TEACHER, val.n_users, val.n_items)).eval()
    kd = BlendedTeacher(teacher, EaseScorer(val, 100.0), 0.5)
    feats = Features.from_split(val, TEACHER.max_history, TEACHER.max_friends)
    cached = CachedTeacher(kd, feats)
    users = np.array([3, 0, 17, 42])
    hi, hw = feats.history(users)
    fi, fw = feats.friends(users)
    with torch.no_grad():
        want = kd(*(torch.from_numpy(a) for a in (hi, hw, fi, fw)))
    got = cached.rows(torch.from_numpy(users))
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-5)
    assert CachedTeacher.fits(1000, 1000, 8_000_000) and not CachedTeacher.fits(1000, 1000, 10)


def test_config_round_trips_through_run_json_and_old_runs_did_not_refine() -> None:
    cfg = RefineConfig(epochs=7, ensemble_weights=(0.5, 1.0))
    assert config_from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg
    assert config_from_dict(None).enabled is False


def test_compression_replays_the_refinement_on_its_validation_pass(refined) -> None:
    """compress's validation-pass teacher is the run's refined teacher rebuilt on the
    validation split's train part: its content head scores exactly what the student scored
    there when the run chose it."""
    from socialrec.compression.run import teacher_on_validation
    from socialrec.training.train import evaluate_model

    out, report = refined
    _, split = prepare(RunConfig(out=str(out), data=DATA))
    val = validation_split(split)
    _, ck = load_checkpoint(out / "teacher.pt")
    tc = TrainConfig(**ck["train_config"])
    run_cfg = json.loads((out / "run.json").read_text())
    teacher_v = teacher_on_validation(val, tc, report, run_cfg, progress=False)
    got = evaluate_model(teacher_v, val)["content"]["recall@20"]
    want = report["teacher"]["refine"]["heads"]["content"]["student_val_recall@20"]
    assert got == pytest.approx(want, abs=1e-9)
    # The run saved that model (its validation twin), so compress loads it instead of
    # refitting: the same weights as the replay.
    saved = teacher_on_validation(val, tc, report, run_cfg, progress=False, run_dir=out)
    assert saved is not teacher_v
    for name, value in teacher_v.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name], value, msg=name)


def test_the_budget_stops_the_distillation_at_its_next_evaluation(tmp_path: Path) -> None:
    report = _run(tmp_path, RefineConfig(epochs=30, budget_min=0.0))
    log = report["teacher"]["refine"]
    assert log["cut_by_budget"] == {"epoch": TEACHER.eval_every, "budget_min": 0.0}
    for h in log["heads"].values():
        assert h["student_epoch"] in (None, TEACHER.eval_every)


def test_catalogues_too_large_for_a_full_softmax_skip_the_distillation(monkeypatch) -> None:
    import socialrec.training.refine as refine_mod

    _, split = prepare(RunConfig(data=DATA))
    monkeypatch.setattr(refine_mod, "FULL_SOFTMAX_MAX", 100)  # the small data counts as large
    teacher = TwoTower(tower_config(TEACHER, split.n_users, split.n_items))
    model, log = refine_mod.refine_teacher(
        split, validation_split(split), teacher, teacher, {}, TEACHER, 100.0, progress=False
    )
    assert model is teacher
    assert log["note"].startswith("skipped: more than 100 items or users")
