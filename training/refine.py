"""The teacher refined by distillation: a fresh two-tower of the same shape taught by the best
scorer on validation.

After the teacher is trained (selection on validation, refit on train), the best content
scorer on validation is chosen among the teacher alone and teacher + w EASE
(:func:`~training.distill.kd_target`; EASE with the run's λ, fitted on validation's train
part). A fresh two-tower of the teacher's shape is then trained on validation by knowledge
distillation from that scorer plus the ground truth (:class:`~training.distill.DistillTask`),
with early stopping per head. A student of its teacher's size often ends better than the
teacher ("born-again" networks), and one taught by teacher + EASE can carry part of EASE's
item-item signal into a model the server can serve. Each head keeps the student only if the
student beats the teacher's head on validation; then the same distillation runs on the
whole train part (teacher and EASE refit there) for the head's selected epoch count, and the
heads are combined (they share no parameters). The test split is never used here: the run
scores the result on test once.

The teacher's targets are fixed per user (clean inputs), so they are computed once per split
(:class:`~training.distill.CachedTeacher`) when that fits in ``cache_max_bytes``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
from socialrec.training.distill import (
    ENSEMBLE_WEIGHTS,
    BlendedTeacher,
    CachedTeacher,
    DistillConfig,
    EaseScorer,
    distill,
    kd_target,
)
from socialrec.training.features import Features
from socialrec.training.fof_blend import choose_fof_weight
from socialrec.training.metrics import absent_reason
from socialrec.training.model import TwoTower
from socialrec.training.split import Split
from socialrec.training.train import (
    FULL_SOFTMAX_MAX,
    Scorer,
    TrainConfig,
    is_content_param,
    tower_config,
)

HEADS = ("content", "friends")


@dataclass(frozen=True)
class RefineConfig:
    enabled: bool = True
    epochs: int = 150  # most distillation epochs (early stopping per head on validation)
    # Wall-clock minutes for the distillation on validation: it stops at its next evaluation
    # after this, each head at its best so far (the refit on train then takes about as long).
    # 10: Last.fm's student still improves at the 150-epoch cap (about 5 minutes there); a
    # 3-minute cap stopped it near epoch 90, below the teacher. Early stopping ends smaller
    # runs sooner (synthetic default: 46 epochs, under 2 minutes), so they do not pay for it.
    budget_min: float = 10.0
    ensemble_weights: tuple[float, ...] = ENSEMBLE_WEIGHTS  # teacher + w EASE candidates
    kd: DistillConfig = field(default_factory=DistillConfig)
    cache_max_bytes: int = 1 << 30  # teacher targets cached per user up to this size


def config_from_dict(d: dict | None) -> RefineConfig:
    """A run.json ``refine`` block as a RefineConfig; a run without one (trained before
    runs refined their teacher) did not refine."""
    if d is None:
        return RefineConfig(enabled=False)
    d = dict(d)
    kd = DistillConfig(**d.pop("kd", {}))
    if "ensemble_weights" in d:
        d["ensemble_weights"] = tuple(d["ensemble_weights"])
    return RefineConfig(**d, kd=kd)


def _kd_teacher(teacher: TwoTower, ease: EaseScorer | None, w: float, split: Split, tc, cfg):
    """The KD teacher module for ``split``: teacher (+ w EASE), cached per user if it fits."""
    module = teacher if ease is None or w == 0 else BlendedTeacher(teacher, ease, w)
    if CachedTeacher.fits(split.n_users, split.n_items, cfg.cache_max_bytes):
        return CachedTeacher(module, Features.from_split(split, tc.max_history, tc.max_friends))
    return module


def refine_teacher(
    split: Split,
    val: Split,
    teacher: TwoTower,
    teacher_v: TwoTower,
    teacher_log: dict,
    tc: TrainConfig,
    ease_lambda: float | None,
    cfg: RefineConfig = RefineConfig(),
    progress: bool = True,
    keep_twin: dict | None = None,
) -> tuple[TwoTower, dict]:
    """(the model to keep, the log). ``teacher_v`` is the teacher's selection-phase model
    (fitted on ``val``'s train part), ``teacher_log`` its :func:`train_teacher` log, whose
    ``best`` holds each head's validation recall@20; ``ease_lambda`` None: no EASE candidate.

    ``keep_twin["validation"]`` receives the kept model's validation twin: what the same
    recipe gives on ``val``'s train part (``teacher_v``, its heads replaced where the student
    won), the model compression's validation pass starts from (:func:`replay` rebuilds it).
    """
    t0 = time.time()
    twin = keep_twin if keep_twin is not None else {}
    twin["validation"] = teacher_v
    log: dict = {
        "config": {"epochs": cfg.epochs, "budget_min": cfg.budget_min, "kd": cfg.kd.__dict__}
    }
    if not cfg.enabled:
        return teacher, {**log, "kept": {t: "teacher" for t in HEADS}, "note": "disabled"}
    if max(split.n_items, split.n_users) > FULL_SOFTMAX_MAX:
        # Distillation compares full softmaxes (DistillTask); sampled-softmax catalogues skip it.
        note = f"skipped: more than {FULL_SOFTMAX_MAX} items or users (no full softmax)"
        return teacher, {**log, "kept": {t: "teacher" for t in HEADS}, "note": note}
    ease_v = None
    if ease_lambda is not None and not absent_reason(val, "content"):
        ease_v = EaseScorer(val, ease_lambda)
        plan = kd_target(
            teacher_v, ease_v, val, tc, cfg.ensemble_weights, max_users=tc.max_eval_users
        )
        w = target_w(plan)
    else:
        plan = {"chosen": "teacher", "note": "no EASE on this run: the teacher alone teaches"}
        w = 0.0
    log["kd_target"] = plan
    if progress:
        what = {0.0: "the teacher alone", math.inf: "EASE alone"}.get(w, f"teacher + {w:g} EASE")
        print(f"teacher (distil): target {what}, the best content scorer on validation")
    student_cfg = _student_cfg(tc)
    student_v = _student(student_cfg, val)
    deadline = time.time() + 60 * cfg.budget_min
    student_v, slog = distill(
        _kd_teacher(teacher_v, ease_v, w, val, tc, cfg),
        student_v,
        val,
        student_cfg,
        {t: cfg.epochs for t in HEADS},
        cfg.kd,
        progress=progress,
        desc="teacher (distil, select)",
        val=val,
        on_eval=lambda _epoch, _scores: time.time() > deadline,
    )
    if "stopped_by_caller" in slog:
        log["cut_by_budget"] = {"epoch": slog["stopped_by_caller"], "budget_min": cfg.budget_min}
    del ease_v
    heads: dict = {}
    for t in HEADS:
        before = teacher_log["best"][t].get("val_recall@20")
        after = slog["best"][t].get("val_recall@20")
        better = before is not None and after is not None and after > before
        heads[t] = {
            "teacher_val_recall@20": before,
            "student_val_recall@20": after,
            "student_epoch": slog["best"][t].get("epoch"),
            "kept": "student" if better else "teacher",
        }
    log["heads"] = heads
    keep = {t: heads[t]["student_epoch"] for t in HEADS if heads[t]["kept"] == "student"}
    if progress:  # the run calls this on one process (rank 0 under torchrun)
        print(
            "teacher (distil): "
            + "; ".join(
                f"{t} {h['kept']} (validation recall@20 student "
                f"{_fmt(h['student_val_recall@20'])} vs teacher {_fmt(h['teacher_val_recall@20'])})"
                for t, h in heads.items()
            )
        )
    if not keep:
        log["seconds"] = round(time.time() - t0, 1)
        return teacher, log
    twin["validation"] = combine(teacher_v, student_v, keep)
    final = distil_heads(split, teacher, w, keep, tc, ease_lambda, cfg, progress)
    if "friends" in keep:
        # The served friend blend's weight, chosen again for the head now served.
        scorer = Scorer(student_v, Features.from_split(val, tc.max_history, tc.max_friends))
        log["fof_weight"] = choose_fof_weight(scorer.friends, val, max_users=tc.max_eval_users)
    log["refit_epochs"] = keep
    log["seconds"] = round(time.time() - t0, 1)
    return final, log


def distil_heads(
    split: Split,
    teacher: TwoTower,
    w: float,
    epochs: dict[str, int],
    tc: TrainConfig,
    ease_lambda: float | None,
    cfg: RefineConfig,
    progress: bool = False,
    desc: str = "teacher (distil, refit)",
) -> TwoTower:
    """``teacher`` with the heads in ``epochs`` replaced by a fresh student's, distilled on
    ``split``'s train part from teacher + w EASE (EASE fitted there) for that many epochs."""
    ease = EaseScorer(split, ease_lambda) if w != 0 and ease_lambda is not None else None
    student_cfg = _student_cfg(tc)
    student = _student(student_cfg, split)
    student, _ = distill(
        _kd_teacher(teacher, ease, w, split, tc, cfg),
        student,
        split,
        student_cfg,
        epochs,
        cfg.kd,
        progress=progress,
        desc=desc,
    )
    return combine(teacher, student, epochs)


def combine(teacher: TwoTower, student: TwoTower, heads) -> TwoTower:
    """A copy of ``teacher`` whose ``heads`` (names; they share no parameters) are the
    student's."""
    state = teacher.state_dict()
    for name, value in student.state_dict().items():
        if ("content" if is_content_param(name) else "friends") in heads:
            state[name] = value
    final = TwoTower(teacher.cfg)
    final.load_state_dict(state)
    return final.eval()


def replay(split: Split, teacher: TwoTower, refine_log: dict | None, tc, ease_lambda, cfg):
    """The refinement a run recorded (its target and epoch counts) replayed on another split's
    train part, e.g. compression's validation pass; the teacher as is if it kept no student."""
    keep = (refine_log or {}).get("refit_epochs")
    if not keep:
        return teacher
    w = target_w(refine_log.get("kd_target") or {})
    return distil_heads(split, teacher, w, keep, tc, ease_lambda, cfg, desc="teacher (distil)")


def _student_cfg(tc: TrainConfig) -> TrainConfig:
    """The student's training config: the teacher's, another seed (a different initialisation;
    the validation run and the refit or a replay use the same one)."""
    return replace(tc, seed=tc.seed + 1)


def _student(cfg: TrainConfig, split: Split) -> TwoTower:
    """A fresh two-tower of the teacher's shape, initialised from ``cfg.seed`` alone (so a
    replay builds the same student)."""
    torch.manual_seed(cfg.seed)
    return TwoTower(tower_config(cfg, split.n_users, split.n_items))


def target_w(plan: dict) -> float:
    """The w of the KD target teacher + w EASE that a kd_target plan chose (0: the teacher
    alone, inf: EASE alone)."""
    return {"teacher": 0.0, "EASE": math.inf}.get(plan.get("chosen"), plan.get("w") or 0.0)


def _fmt(x: float | None) -> str:
    return "absent" if x is None else f"{x:.4f}"
