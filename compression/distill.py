"""Knowledge distillation: a student tower trained from the teacher's scores plus ground truth.

The loss is list-aware: the teacher's soft distribution is taken over exactly the list the
server ranks (train positives, and self for friends, removed), at temperature T, optionally
truncated to the teacher's top-M candidates, so the student learns to reproduce the top of
the *served* list rather than to re-score items the user already has. The ground-truth term
is the teacher's own full-softmax loss. Both heads are distilled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from socialrec.training.model import TwoTower, multinomial_nll
from socialrec.training.split import Split
from socialrec.training.train import TrainConfig, fit
from torch import nn


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 2.0
    kd_weight: float = 0.7  # loss = (1 - kd_weight) * ground truth + kd_weight * KD
    top_m: int | None = None  # None: KL over the whole served list (cheap on small catalogues)


def distill_loss(
    student: torch.Tensor,  # (B, N) logits
    teacher: torch.Tensor,  # (B, N) logits
    exclude: torch.Tensor,  # (B, N) bool: candidates the server never shows (train positives, self)
    temperature: float,
    top_m: int | None = None,
) -> torch.Tensor:
    """T^2 * KL(p_teacher || p_student) at temperature T over the served candidates.  -> ()

    With ``top_m`` the teacher's distribution keeps only its top-M candidates (renormalised):
    the student is pushed to rank those first and not penalised on the long tail.
    """
    t = (teacher / temperature).masked_fill(exclude, float("-inf"))  # (B, N)
    if top_m is not None and top_m < t.shape[1]:
        kth = torch.topk(t, top_m, dim=1).values[:, -1:]  # (B, 1)
        t = t.masked_fill(t < kth, float("-inf"))
    p = torch.softmax(t, dim=1)  # (B, N)
    logq = torch.log_softmax((student / temperature).masked_fill(exclude, float("-inf")), dim=1)
    logp = torch.log_softmax(t, dim=1)
    kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(dim=1)  # (B,)
    return kl.mean() * temperature**2


class DistillTask(nn.Module):
    """Ground truth + list-aware KD for both heads; ``forward(batch) -> loss`` like the teacher's task.

    Needs dense (full-softmax) targets in the batch, i.e. catalogues up to
    ``training.train.FULL_SOFTMAX_MAX``.
    """

    def __init__(
        self,
        model: TwoTower,
        friend_loss_weight: float,
        teacher: TwoTower,
        cfg: DistillConfig,
    ) -> None:
        super().__init__()
        self.model = model
        self.friend_loss_weight = friend_loss_weight
        self.cfg = cfg
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> DistillTask:
        super().train(mode)
        self.teacher.eval()  # the teacher scores clean inputs (no input dropout)
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "content_target" not in batch or "friend_target" not in batch:
            raise ValueError("distillation needs full-softmax batches (catalogue too large)")
        x = (batch["hist_ids"], batch["hist_w"], batch["friend_ids"], batch["friend_w"])
        m, c = self.model, self.cfg
        u_c, u_f = m.user_tower(*x)  # (B, D) each
        with torch.no_grad():
            t_c, t_f = self.teacher(*x)  # (B, I), (B, U)
        s_c = m.content_logits(u_c)  # (B, I)
        loss_c = (1 - c.kd_weight) * multinomial_nll(s_c, batch["content_target"])
        loss_c = loss_c + c.kd_weight * distill_loss(
            s_c, t_c, batch["content_target"] > 0, c.temperature, c.top_m
        )
        rows = batch["friend_rows"]  # (B,) users with a friend
        if not bool(rows.any()):
            return loss_c + u_f.sum() * 0
        s_f = m.friend_logits(u_f[rows]).masked_fill(batch["self_mask"][rows], float("-inf"))
        target = batch["friend_target"][rows]  # (Bf, U)
        loss_f = (1 - c.kd_weight) * multinomial_nll(s_f, target)
        exclude = (target > 0) | batch["self_mask"][rows]
        loss_f = loss_f + c.kd_weight * distill_loss(
            s_f, t_f[rows], exclude, c.temperature, c.top_m
        )
        return loss_c + self.friend_loss_weight * loss_f


def distill(
    teacher: TwoTower,
    student: TwoTower,
    split: Split,
    train_cfg: TrainConfig,
    epochs: dict[str, int],
    cfg: DistillConfig = DistillConfig(),
    progress: bool = False,
    desc: str = "student",
) -> tuple[TwoTower, dict]:
    """Fine-tune ``student`` (a fresh small tower or a compressed copy of the teacher) by KD.

    Each head is kept at its own epoch count from ``epochs`` (the teacher's selected counts:
    there is no validation-free way to pick them, and the test part is never used).
    """

    def make_task(model, friend_loss_weight, _item_log_q, _user_log_q) -> DistillTask:
        return DistillTask(model, friend_loss_weight, teacher, cfg)

    return fit(
        split,
        train_cfg,
        max(epochs.values()),
        snapshot_at=epochs,
        progress=progress,
        desc=desc,
        init=student,
        make_task=make_task,
    )
