"""Knowledge distillation: a student tower trained from the teacher's scores plus ground truth.

The loss is list-aware: the teacher's soft distribution is taken over exactly the list the
server ranks (train positives, and self for friends, removed), at temperature T, optionally
truncated to the teacher's top-M candidates, so the student learns to reproduce the top of
the *served* list rather than to re-score items the user already has. The ground-truth term
is the teacher's own full-softmax loss. Both heads are distilled.

The KD teacher is any module that maps the tower inputs to (content logits, friend logits):
the trained two-tower, or :class:`BlendedTeacher`, whose content scores mix the two-tower's
with EASE's (a linear function of the history row, :class:`EaseScorer`) when that scores
better on validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from socialrec.training.baselines import ease_weights
from socialrec.training.features import Features
from socialrec.training.metrics import Graph, evaluate
from socialrec.training.model import TwoTower, multinomial_nll
from socialrec.training.split import Split
from socialrec.training.train import Scorer, TrainConfig, fit
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


class EaseScorer:
    """EASE (Steck 2019) fitted on a split's train part, scoring tower inputs.

    The closed form is :func:`training.baselines.ease`'s (binary input, diag(B) = 0, solved on
    the items with a training user), kept as the item-item matrix B so it can score any
    history row the tower sees -- the distillation batch's own inputs -- not only the split's
    users.
    """

    def __init__(self, split: Split, lam: float) -> None:
        self.n_items = split.n_items
        self.active, self.b = ease_weights(split, lam)  # (A,), (A, A)
        self.pos = np.full(split.n_items, -1, np.int64)  # item -> column of B, -1 if inactive
        self.pos[self.active] = np.arange(len(self.active))
        self.lam = lam

    def __call__(self, hist_ids: torch.Tensor, hist_w: torch.Tensor) -> torch.Tensor:
        """Scores of every item for each history row (binary: an entry counts when w > 0).  (B, I)"""
        ids = hist_ids.numpy()
        col = self.pos[ids]  # (B, L)
        keep = (hist_w.numpy() > 0) & (col >= 0)
        rows = np.nonzero(keep)[0]
        x = sp.csr_matrix(
            (np.ones(len(rows), np.float32), (rows, col[keep])),
            shape=(ids.shape[0], len(self.active)),
        )
        x.sum_duplicates()
        x.data[:] = 1.0
        out = np.zeros((ids.shape[0], self.n_items), dtype=np.float32)
        out[:, self.active] = np.asarray(x @ self.b, dtype=np.float32)
        return torch.from_numpy(out)


def standardise(s: torch.Tensor) -> torch.Tensor:
    """Each row to mean 0, std 1 over the candidates (constant rows become 0).  (B, N)"""
    return (s - s.mean(dim=1, keepdim=True)) / s.std(dim=1, keepdim=True).clamp_min(1e-12)


def blend(teacher: torch.Tensor, ease: torch.Tensor, w: float) -> torch.Tensor:
    """Content KD target: z(teacher) + w z(EASE), rescaled to the teacher's row mean and std.

    ``w = 0`` is the teacher, ``w = inf`` EASE alone. Matching the teacher's spread keeps the
    temperature meaning the same whatever the mix.  (B, I), (B, I) -> (B, I)
    """
    if w == 0:
        return teacher
    mix = standardise(ease) if math.isinf(w) else standardise(teacher) + w * standardise(ease)
    mu, sd = teacher.mean(dim=1, keepdim=True), teacher.std(dim=1, keepdim=True)
    return mu + sd * standardise(mix)


class BlendedTeacher(nn.Module):
    """KD teacher: content logits = :func:`blend` of the two-tower's and EASE's; friends = the
    two-tower's."""

    def __init__(self, teacher: TwoTower, ease: EaseScorer, w: float) -> None:
        super().__init__()
        self.teacher = teacher
        self.ease = ease
        self.w = w

    def forward(self, hist_ids, hist_w, friend_ids, friend_w) -> tuple[torch.Tensor, torch.Tensor]:
        t_c, t_f = self.teacher(hist_ids, hist_w, friend_ids, friend_w)
        return blend(t_c, self.ease(hist_ids, hist_w), self.w), t_f


class CachedTeacher(nn.Module):
    """A KD teacher's outputs for every user of a split, computed once.

    The teacher scores each user's clean, fixed tower inputs (no input dropout), so its
    targets are the same every epoch; :class:`DistillTask` reads a batch's rows from here
    (by the batch's ``users``) instead of running the teacher, and for EASE its sparse-dense
    product, again. ``feats`` must be the features ``fit`` builds for the split.
    """

    def __init__(self, teacher: nn.Module, feats: Features, batch_size: int = 256) -> None:
        super().__init__()
        content, friends = [], []
        teacher.eval()
        with torch.no_grad():
            for start in range(0, feats.n_users, batch_size):
                users = np.arange(start, min(feats.n_users, start + batch_size))
                hi, hw = feats.history(users)
                fi, fw = feats.friends(users)
                x = (torch.from_numpy(a) for a in (hi, hw, fi, fw))
                c, f = teacher(*x)  # (B, I), (B, U)
                content.append(c)
                friends.append(f)
        self.content = torch.cat(content)  # (U, I)
        self.friends = torch.cat(friends)  # (U, U)

    @staticmethod
    def fits(n_users: int, n_items: int, max_bytes: int) -> bool:
        """Whether the cache of a split this size stays within ``max_bytes`` (float32)."""
        return 4 * n_users * (n_items + n_users) <= max_bytes

    def rows(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.content[users], self.friends[users]


class DistillTask(nn.Module):
    """Ground truth + list-aware KD for both heads; ``forward(batch) -> loss`` like the teacher's task.

    Needs dense (full-softmax) targets in the batch, i.e. catalogues up to
    ``training.train.FULL_SOFTMAX_MAX``.
    """

    def __init__(
        self,
        model: TwoTower,
        friend_loss_weight: float,
        teacher: nn.Module,  # tower inputs -> (content logits (B, I), friend logits (B, U))
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
            if isinstance(self.teacher, CachedTeacher):
                t_c, t_f = self.teacher.rows(batch["users"])  # (B, I), (B, U)
            else:
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
    teacher: nn.Module,
    student: TwoTower,
    split: Split,
    train_cfg: TrainConfig,
    epochs: dict[str, int],
    cfg: DistillConfig = DistillConfig(),
    progress: bool = False,
    desc: str = "student",
    val: Split | None = None,
    on_eval: Callable[[int, dict[str, float]], bool | None] | None = None,
) -> tuple[TwoTower, dict]:
    """Fine-tune ``student`` (a fresh small tower or a compressed copy of the teacher) by KD.

    Without ``val`` each head is kept at its own epoch count from ``epochs``. With ``val`` (a
    validation split carved from ``split``'s train part; ``split`` is then that split too)
    each head is kept at its best validation epoch up to ``max(epochs)``, with the teacher's
    early stopping; the log's ``best`` holds the counts for a later run on the whole train
    part. The test part is never used.
    """

    def make_task(model, friend_loss_weight, _item_log_q, _user_log_q) -> DistillTask:
        return DistillTask(model, friend_loss_weight, teacher, cfg)

    return fit(
        split,
        train_cfg,
        max(epochs.values()),
        val=val,
        snapshot_at=None if val is not None else epochs,
        progress=progress,
        desc=desc,
        init=student,
        make_task=make_task,
        on_eval=on_eval,
    )


ENSEMBLE_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)  # teacher + w EASE candidates of kd_target


def content_scores(model: TwoTower, ease: EaseScorer | None, split: Split, tc: TrainConfig, w):
    """``score_fn(users) -> (B, I)`` of :func:`blend` (teacher, EASE, w) on the split's tower
    inputs; w = 0: the teacher alone."""
    sc = Scorer(model, Features.from_split(split, tc.max_history, tc.max_friends))

    @torch.no_grad()
    def score(users):
        x = sc.inputs(users)
        model.eval()
        t_c, _ = model(*x)
        return (t_c if w == 0 else blend(t_c, ease(x[0], x[1]), w)).numpy()

    return score


def content_recall(score_fn, split: Split, max_users: int | None = None) -> float:
    """Content recall@20 of ``score_fn`` on the split's held-out part."""
    tr = Graph(split.n_users, split.train_user, split.train_item)
    te = Graph(split.n_users, split.test_user, split.test_item)
    return evaluate(score_fn, tr, te, max_users=max_users)["recall@20"]


def kd_target(
    teacher: TwoTower,
    ease: EaseScorer,
    val: Split,
    tc: TrainConfig,
    weights: tuple[float, ...] = ENSEMBLE_WEIGHTS,
    max_users: int | None = None,
) -> dict:
    """The content head's KD target chosen on validation (torch scores, full ranking).

    Candidates: the teacher (w = 0), teacher + w EASE for each of ``weights``, and
    EASE alone (w = inf), all fitted on ``val``'s train part. The best validation recall@20
    wins; a tie keeps the simpler target (the teacher first, EASE alone last).
    """
    grid = [0.0, *weights, math.inf]
    scores = [
        content_recall(content_scores(teacher, ease, val, tc, w), val, max_users) for w in grid
    ]
    best = max(range(len(grid)), key=lambda k: (scores[k], -k))
    w = grid[best]
    chosen = "teacher" if w == 0 else ("EASE" if math.isinf(w) else "ensemble")
    finite = [k for k in range(1, len(grid) - 1)]
    best_mix = max(finite, key=lambda k: (scores[k], -k)) if finite else None
    return {
        "lambda": ease.lam,
        "grid": [
            {"w": _w(g), "val_recall@20": round(sc, 4)} for g, sc in zip(grid, scores, strict=True)
        ],
        "chosen": chosen,
        "w": w if chosen == "ensemble" else None,
        "best_mix_w": grid[best_mix] if best_mix is not None else None,
        "val_recall@20": {
            "teacher": round(scores[0], 4),
            "EASE": round(scores[-1], 4),
            "ensemble": round(scores[best_mix], 4) if best_mix is not None else None,
        },
        "protocol": "torch scores, full ranking, validation split carved from train; teacher "
        "refit on its train part, EASE fitted there; EASE scores the tower's input history",
    }


def _w(w: float) -> float | str:
    return "inf" if math.isinf(w) else w
