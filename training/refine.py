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

import time
from dataclasses import dataclass, field, replace

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
) -> tuple[TwoTower, dict]:
    """(the model to keep, the log). ``teacher_v`` is the teacher's selection-phase model
    (fitted on ``val``'s train part), ``teacher_log`` its :func:`train_teacher` log, whose
    ``best`` holds each head's validation recall@20; ``ease_lambda`` None: no EASE candidate."""
    t0 = time.time()
    log: dict = {"config": {"epochs": cfg.epochs, "kd": cfg.kd.__dict__}}
    if not cfg.enabled:
        return teacher, {**log, "kept": {t: "teacher" for t in HEADS}, "note": "disabled"}
    ease_v = None
    if ease_lambda is not None and not absent_reason(val, "content"):
        ease_v = EaseScorer(val, ease_lambda)
        plan = kd_target(
            teacher_v, ease_v, val, tc, cfg.ensemble_weights, max_users=tc.max_eval_users
        )
        w = {"teacher": 0.0, "EASE": float("inf")}.get(plan["chosen"], plan["w"])
    else:
        plan = {"chosen": "teacher", "note": "no EASE on this run: the teacher alone teaches"}
        w = 0.0
    log["kd_target"] = plan
    student_cfg = replace(tc, seed=tc.seed + 1)  # a different initialisation from the teacher
    student_v = TwoTower(tower_config(tc, val.n_users, val.n_items))
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
    )
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
    ease_t = EaseScorer(split, ease_lambda) if w != 0 else None
    student = TwoTower(tower_config(tc, split.n_users, split.n_items))
    student, flog = distill(
        _kd_teacher(teacher, ease_t, w, split, tc, cfg),
        student,
        split,
        student_cfg,
        keep,
        cfg.kd,
        progress=progress,
        desc="teacher (distil, refit)",
    )
    state = teacher.state_dict()
    for name, value in student.state_dict().items():
        if ("content" if is_content_param(name) else "friends") in keep:
            state[name] = value
    final = TwoTower(teacher.cfg)
    final.load_state_dict(state)
    final.eval()
    if "friends" in keep:
        # The served friend blend's weight, chosen again for the head now served.
        scorer = Scorer(student_v, Features.from_split(val, tc.max_history, tc.max_friends))
        log["fof_weight"] = choose_fof_weight(scorer.friends, val, max_users=tc.max_eval_users)
    log["refit_epochs"] = keep
    log["seconds"] = round(time.time() - t0, 1)
    return final, log


def _fmt(x: float | None) -> str:
    return "absent" if x is None else f"{x:.4f}"
