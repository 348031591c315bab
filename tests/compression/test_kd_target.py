"""The EASE / teacher-mix KD target: EASE on tower inputs, the blend, the choice on validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from socialrec.compression.run import CompressConfig, ease_lambda_for
from socialrec.training.baselines import ease
from socialrec.training.distill import (
    BlendedTeacher,
    EaseScorer,
    blend,
    content_scores,
    kd_target,
    standardise,
)
from socialrec.training.features import Features
from socialrec.training.split import validation_split
from socialrec.training.train import TrainConfig


def test_ease_scorer_on_tower_inputs_equals_the_baseline(loaded) -> None:
    """EaseScorer scores the tower's history input; for users whose whole train row fits the
    input it must give training.baselines.ease's scores (float32 solves, summed in another
    order: 1e-4 relative)."""
    _, ck, _, split, _ = loaded
    tc = TrainConfig(**ck["train_config"])
    feats = Features.from_split(split, tc.max_history, tc.max_friends)
    users = np.flatnonzero(np.bincount(split.train_user, minlength=split.n_users) > 0)[:64]
    hi, hw = feats.history(users)
    assert (hw > 0).sum(axis=1).max() < tc.max_history  # whole rows, no truncation
    got = EaseScorer(split, 50.0)(torch.from_numpy(hi), torch.from_numpy(hw)).numpy()
    want = ease(split, 50.0)(users)
    assert got.shape == want.shape == (len(users), split.n_items)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0)


def test_blend_keeps_the_teacher_scale_and_mixes_ranks() -> None:
    t = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.5, 0.1, 0.2, 0.9]])
    e = torch.tensor([[0.0, 4.0, 1.0, 2.0], [1.0, 3.0, 2.0, 0.0]])
    assert torch.equal(blend(t, e, 0.0), t)  # w = 0: the teacher itself
    for w in (0.5, 1.0, math.inf):
        b = blend(t, e, w)
        # Same row mean and spread as the teacher: the KD temperature keeps its meaning.
        torch.testing.assert_close(b.mean(dim=1), t.mean(dim=1))
        torch.testing.assert_close(b.std(dim=1), t.std(dim=1))
    # w = inf ranks as EASE; a finite w ranks as z(teacher) + w z(EASE).
    assert torch.equal(blend(t, e, math.inf).argsort(dim=1), e.argsort(dim=1))
    mix = standardise(t) + 1.0 * standardise(e)
    assert torch.equal(blend(t, e, 1.0).argsort(dim=1), mix.argsort(dim=1))
    # Row 0, w = 1: z(t) = z([3, 1, 2, 0]), z(e) = z([0, 4, 1, 2]); the sums are [1.5, 2.5, 1.5,
    # 1.0] times the same factor: item 1 first, item 3 last.
    order = blend(t, e, 1.0)[0].argsort(descending=True).tolist()
    assert order[0] == 1 and order[-1] == 3


def test_blended_teacher_changes_content_only(loaded) -> None:
    teacher, ck, _, split, _ = loaded
    tc = TrainConfig(**ck["train_config"])
    feats = Features.from_split(split, tc.max_history, tc.max_friends)
    users = np.arange(16)
    hi, hw = feats.history(users)
    fi, fw = feats.friends(users)
    x = tuple(torch.from_numpy(a) for a in (hi, hw, fi, fw))
    es = EaseScorer(split, 100.0)
    with torch.no_grad():
        t_c, t_f = teacher(*x)
        b_c, b_f = BlendedTeacher(teacher, es, 2.0)(*x)
    assert torch.equal(b_f, t_f)
    torch.testing.assert_close(b_c, blend(t_c, es(x[0], x[1]), 2.0))


def test_kd_target_is_chosen_on_validation_and_recorded(loaded) -> None:
    """The grid's scores are the validation recall@20 of each candidate's own score function,
    and the winner is the best of them."""
    teacher, ck, _, split, _ = loaded
    tc = TrainConfig(**ck["train_config"])
    val = validation_split(split)
    cfg = CompressConfig(run_dir="unused", ensemble_weights=(1.0,))
    es = EaseScorer(val, 100.0)
    kd = kd_target(teacher, es, val, tc, cfg.ensemble_weights, cfg.max_eval_users)
    assert [g["w"] for g in kd["grid"]] == [0.0, 1.0, "inf"]
    scores = [g["val_recall@20"] for g in kd["grid"]]
    best = int(np.argmax(scores))
    assert kd["chosen"] == ("teacher", "ensemble", "EASE")[best]
    assert kd["w"] == (1.0 if kd["chosen"] == "ensemble" else None)
    from socialrec.training.distill import content_recall

    ref = content_recall(content_scores(teacher, es, val, tc, math.inf), val, cfg.max_eval_users)
    assert kd["val_recall@20"]["EASE"] == pytest.approx(ref, abs=5e-5)


def test_ease_lambda_comes_from_config_then_run_then_default() -> None:
    cfg = CompressConfig(run_dir="r")
    assert ease_lambda_for({}, cfg) == 100.0
    assert ease_lambda_for({"config": {"baselines": {"ease_lambda": 250.0}}}, cfg) == 250.0
    assert ease_lambda_for({"baseline_params": {"EASE": {"lambda": 400.0}}}, cfg) == 400.0
    assert (
        ease_lambda_for(
            {"baseline_params": {"EASE": {"lambda": 400.0}}}, CompressConfig("r", ease_lambda=30.0)
        )
        == 30.0
    )
