"""The social two-tower teacher: pure torch modules, no I/O.

The user tower reads only what the online store holds for a user: recent history (item
ids + weights) and friend ids. It does all feature math itself (weight transform, input
dropout, L2 normalisation, pooling), so the same graph exports to ONNX over raw ids.

Two heads share the tower's inputs and one output space per task:
- content: u_c = tanh(pool(history; E_c) + pool(friends; F_c) + b_c) -> scored against
  item vectors V with a per-item bias (folded into inner product as [u, 1] . [v, b]);
- friends: u_f = tanh(pool(history; E_f) + pool(friends; F_f) + b_f) -> scored against
  user vectors W with a per-user bias.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TowerConfig:
    n_items: int
    n_users: int
    dim: int = 256
    input_dropout: float = 0.5  # fraction of history/friend entries dropped while training
    weight_transform: str = "binary"  # one of WEIGHT_TRANSFORMS: how a raw weight enters
    weight_threshold: float = 0.0  # "threshold": weights >= this count as 1, the rest as 0
    content_uses_friends: bool = True  # friends' ids feed the content head too (cold start)
    friends_uses_history: bool = True  # the user's history feeds the friend head too

    def __post_init__(self) -> None:
        if self.weight_transform not in WEIGHT_TRANSFORMS:
            raise ValueError(
                f"weight_transform must be one of {WEIGHT_TRANSFORMS}, got {self.weight_transform!r}"
            )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


# How a raw interaction weight (plays, a star rating) enters the user tower. Part of the
# model, so the exported tower applies it to the raw weights the online store holds.
# binary: 1 per entry; log1p: log(1 + w) (play counts); raw: w itself (ratings);
# centered: w minus the mean of the user's (capped) history, so ratings below the user's
# own average push away; threshold: 1 if w >= weight_threshold else 0 (e.g. 4+ stars).
WEIGHT_TRANSFORMS = ("binary", "log1p", "raw", "centered", "threshold")


def pool(table: nn.Module, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted sum of embedding rows.  ids, w: (B, L) -> (B, D)

    A compressed table may pool cheaper than gather-then-sum (low-rank: pool in the factor
    space; quantised: fold the dequantisation into the sum): it then has a ``pool`` method.
    """
    own = getattr(table, "pool", None)
    if own is not None:
        return own(ids, w)
    if type(table) is nn.Embedding:  # subclasses may change what forward returns
        # F.embedding exports as one ONNX Gather; the product as one MatMul (Einsum is slower
        # in onnxruntime and tensor indexing adds GatherND).
        return (w.unsqueeze(1) @ F.embedding(ids, table.weight)).squeeze(1)
    return torch.einsum("bl,bld->bd", w, table(ids))


def normalise(w: torch.Tensor) -> torch.Tensor:
    """Scale each row of weights to unit L2 norm (all-zero rows stay zero).  (B, L)"""
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


class UserTower(nn.Module):
    """Raw ids in, (content vector, friend vector) out."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.item_in_c = nn.Embedding(cfg.n_items, d)
        self.item_in_f = nn.Embedding(cfg.n_items, d)
        self.user_in_c = nn.Embedding(cfg.n_users, d)
        self.user_in_f = nn.Embedding(cfg.n_users, d)
        self.bias_c = nn.Parameter(torch.zeros(d))
        self.bias_f = nn.Parameter(torch.zeros(d))
        for t in (self.item_in_c, self.item_in_f, self.user_in_c, self.user_in_f):
            nn.init.normal_(t.weight, std=0.05)

    def transform(self, w: torch.Tensor) -> torch.Tensor:
        """Raw interaction weights -> input weights; zero stays zero (padding).  (B, L)"""
        how = self.cfg.weight_transform
        present = (w > 0).to(w.dtype)  # (B, L) real entries; padding has weight 0
        if how == "log1p":
            return torch.log1p(w.clamp_min(0))
        if how == "raw":
            return w.clamp_min(0)
        if how == "centered":
            mean = (w * present).sum(1, keepdim=True) / present.sum(1, keepdim=True).clamp_min(1)
            return (w - mean) * present
        if how == "threshold":
            return (w >= self.cfg.weight_threshold).to(w.dtype) * present
        return present

    def _drop(self, w: torch.Tensor) -> torch.Tensor:
        if self.training and self.cfg.input_dropout > 0:
            keep = torch.rand_like(w) >= self.cfg.input_dropout
            return w * keep
        return w

    def forward(
        self,
        hist_ids: torch.Tensor,  # (B, L) int64, padded with any valid id
        hist_w: torch.Tensor,  # (B, L) float, 0 on padding
        friend_ids: torch.Tensor,  # (B, F) int64
        friend_w: torch.Tensor,  # (B, F) float, 1 for a friend, 0 on padding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hw = normalise(self._drop(self.transform(hist_w)))  # (B, L)
        fw = normalise(self._drop((friend_w > 0).to(hist_w.dtype)))  # (B, F)
        h_c = pool(self.item_in_c, hist_ids, hw) + self.bias_c  # (B, D)
        h_f = pool(self.user_in_f, friend_ids, fw) + self.bias_f  # (B, D)
        if self.cfg.content_uses_friends:
            h_c = h_c + pool(self.user_in_c, friend_ids, fw)
        if self.cfg.friends_uses_history:
            h_f = h_f + pool(self.item_in_f, hist_ids, hw)
        return torch.tanh(h_c), torch.tanh(h_f)


class TwoTower(nn.Module):
    """User tower plus the two candidate sides: items (content) and users (friends)."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.user_tower = UserTower(cfg)
        self.item_out = nn.Embedding(cfg.n_items, cfg.dim)
        self.item_bias = nn.Parameter(torch.zeros(cfg.n_items))
        self.user_out = nn.Embedding(cfg.n_users, cfg.dim)
        self.user_bias = nn.Parameter(torch.zeros(cfg.n_users))
        nn.init.normal_(self.item_out.weight, std=0.05)
        nn.init.normal_(self.user_out.weight, std=0.05)

    def forward(self, hist_ids, hist_w, friend_ids, friend_w) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-catalogue logits: (B, I) over items and (B, U) over users."""
        u_c, u_f = self.user_tower(hist_ids, hist_w, friend_ids, friend_w)
        return self.content_logits(u_c), self.friend_logits(u_f)

    def content_logits(self, u_c: torch.Tensor) -> torch.Tensor:
        return u_c @ self.item_out.weight.T + self.item_bias  # (B, I)

    def friend_logits(self, u_f: torch.Tensor) -> torch.Tensor:
        return u_f @ self.user_out.weight.T + self.user_bias  # (B, U)

    def item_vectors(self) -> torch.Tensor:
        """Item side for inner-product search: [v, bias].  (I, D + 1)"""
        return torch.cat([self.item_out.weight, self.item_bias[:, None]], dim=1)

    def user_vectors(self) -> torch.Tensor:
        """User (friend candidate) side for inner-product search: [w, bias].  (U, D + 1)"""
        return torch.cat([self.user_out.weight, self.user_bias[:, None]], dim=1)


def with_bias_slot(u: torch.Tensor) -> torch.Tensor:
    """Append the constant 1 that meets the candidate bias in inner-product search.  (B, D) -> (B, D + 1)"""
    return torch.cat([u, torch.ones_like(u[:, :1])], dim=1)


def multinomial_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j t_j log softmax(logits)_j with t a row-normalised target.  (B, N)"""
    t = targets / targets.sum(dim=1, keepdim=True).clamp_min(1e-12)
    logp = torch.log_softmax(logits, dim=1)
    # Masked logits are -inf: take t * log p only where t > 0 so 0 * -inf never makes a NaN.
    return -torch.where(t > 0, t * logp, torch.zeros_like(logp)).sum(dim=1).mean()


def sampled_nll(
    u: torch.Tensor,  # (B, D)
    table: torch.Tensor,  # (N, D) candidate vectors
    bias: torch.Tensor,  # (N,)
    pos: torch.Tensor,  # (B, P) positive ids
    pos_mask: torch.Tensor,  # (B, P) 1 for a real positive, 0 for padding
    neg: torch.Tensor,  # (S,) sampled negative ids, shared by the batch
    log_q: torch.Tensor,  # (N,) log sampling probability of every candidate
) -> torch.Tensor:
    """Sampled softmax with log-Q correction: each positive against the shared negatives.

    Negatives that are positives of the row (accidental hits) are masked out.
    """
    s_pos = torch.einsum("bd,bpd->bp", u, table[pos]) + bias[pos] - log_q[pos]  # (B, P)
    s_neg = u @ table[neg].T + bias[neg] - log_q[neg]  # (B, S)
    hit = (pos[:, :, None] == neg[None, None, :]) & (pos_mask[:, :, None] > 0)  # (B, P, S)
    s_neg = s_neg.masked_fill(hit.any(dim=1), float("-inf"))
    lse = torch.logaddexp(s_pos, torch.logsumexp(s_neg, dim=1, keepdim=True))  # (B, P)
    per_row = ((lse - s_pos) * pos_mask).sum(1) / pos_mask.sum(1).clamp_min(1)
    return (
        per_row[pos_mask.sum(1) > 0].mean()
        if bool((pos_mask.sum(1) > 0).any())
        else per_row.sum() * 0
    )


class TwoTowerTrainTask(nn.Module):
    """Model + losses in one forward, so DDP sees every parameter through one call.

    ``batch`` holds the tower inputs and, per task, either a dense target (full softmax)
    or positives plus shared sampled negatives (sampled softmax with log-Q correction).
    """

    def __init__(
        self,
        model: TwoTower,
        friend_loss_weight: float,
        item_log_q: torch.Tensor,
        user_log_q: torch.Tensor,
    ) -> None:
        super().__init__()
        self.model = model
        self.friend_loss_weight = friend_loss_weight
        self.register_buffer("item_log_q", item_log_q, persistent=False)
        self.register_buffer("user_log_q", user_log_q, persistent=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        m = self.model
        u_c, u_f = m.user_tower(
            batch["hist_ids"], batch["hist_w"], batch["friend_ids"], batch["friend_w"]
        )
        if "content_target" in batch:
            loss_c = multinomial_nll(m.content_logits(u_c), batch["content_target"])
        else:
            loss_c = sampled_nll(
                u_c,
                m.item_out.weight,
                m.item_bias,
                batch["content_pos"],
                batch["content_mask"],
                batch["item_neg"],
                self.item_log_q,
            )
        rows = batch["friend_rows"]  # (B,) bool: users with at least one friend
        u_f = u_f[rows]
        if "friend_target" in batch:
            logits = m.friend_logits(u_f)  # (Bf, U)
            logits = logits.masked_fill(batch["self_mask"][rows], float("-inf"))  # never yourself
            loss_f = (
                multinomial_nll(logits, batch["friend_target"][rows])
                if bool(rows.any())
                else u_f.sum() * 0
            )
        else:
            loss_f = sampled_nll(
                u_f,
                m.user_out.weight,
                m.user_bias,
                batch["friend_pos"][rows],
                batch["friend_mask"][rows],
                batch["user_neg"],
                self.user_log_q,
            )
        # Keep every parameter in the graph (DDP expects all of them to get gradients).
        return loss_c + self.friend_loss_weight * loss_f
