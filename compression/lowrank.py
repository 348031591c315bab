"""Low-rank embeddings: E (N, D) ~ A (N, r) @ B (r, D), initialised by truncated SVD.

Input tables: the ONNX graph keeps A and B (a Gather then a MatMul), so they shrink from
N*D to (N + D)*r numbers. Candidate tables: u . (A_i B) = (u B^T) . A_i, so the served tower
ends with the small projection B^T and FAISS holds the r-dim rows of A (plus the bias
slot): the index shrinks by D/r too, with exactly the same scores.
"""

from __future__ import annotations

import torch
from socialrec.compression.tables import INPUT_TABLES, OUTPUT_TABLES, replace_tables
from socialrec.training.model import TwoTower, pool
from torch import nn


def svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of w (Eckart-Young), singular values split evenly.  (N, D) -> (N, r), (r, D)"""
    u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)  # (N, K), (K,), (K, D)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


class LowRankEmbedding(nn.Module):
    """Embedding rows computed as a(ids) @ b; ``a`` is itself a table (so it can be quantised)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Embedding(*a.shape)  # (N, r)
        self.a.weight.data.copy_(a)
        self.b = nn.Parameter(b.clone())  # (r, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.a(ids) @ self.b.float()  # (..., D); b may be stored in fp16

    def pool(self, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Pool in the rank-r space, then expand once: (w A[ids]) B, not w (A[ids] B).
        ids, w: (B, L) -> (B, D); L x r x D fewer multiply-adds per query."""
        return pool(self.a, ids, w) @ self.b.float()

    @property
    def weight(self) -> torch.Tensor:
        return self.a.weight @ self.b.float()  # (N, D)


def to_lowrank(
    model: TwoTower, rank: int, names: tuple[str, ...] = INPUT_TABLES + OUTPUT_TABLES
) -> TwoTower:
    """Copy of ``model`` whose named tables are rank-``rank`` SVD factorisations of the originals."""
    return replace_tables(model, names, lambda t: LowRankEmbedding(*svd_factors(t.weight, rank)))


def half_factors(model: TwoTower) -> TwoTower:
    """``model`` (changed in place, returned) with every low-rank table's small factor B
    stored in fp16: the ONNX graph keeps it as an fp16 initializer and casts it once per run.
    Meant for the quantised variants, where A is int8/int4 and the fp32 B factors would
    otherwise be a large part of the tower (4 r D bytes per table). Not for training."""
    for m in model.modules():
        if isinstance(m, LowRankEmbedding):
            m.b.requires_grad_(False)
            m.b.data = m.b.data.half()
    return model


def factor_tables(names: tuple[str, ...]) -> tuple[str, ...]:
    """The ``A`` factor of each named low-rank table (the big part: quantise these)."""
    return tuple(f"{n}.a" for n in names)


class ProjectedTower(nn.Module):
    """User tower followed by the candidate tables' B^T: queries live in the r-dim A space."""

    def __init__(self, tower: nn.Module, b_c: torch.Tensor, b_f: torch.Tensor) -> None:
        super().__init__()
        self.tower = tower
        self.b_c = nn.Parameter(b_c.detach().clone(), requires_grad=False)  # (r, D)
        self.b_f = nn.Parameter(b_f.detach().clone(), requires_grad=False)  # (r, D)

    def forward(self, hist_ids, hist_w, friend_ids, friend_w) -> tuple[torch.Tensor, torch.Tensor]:
        u_c, u_f = self.tower(hist_ids, hist_w, friend_ids, friend_w)  # (B, D) each
        return u_c @ self.b_c.float().T, u_f @ self.b_f.float().T  # (B, r) each


def factored_serving(model: TwoTower) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(tower to export, item vectors (I, r + 1), user vectors (U, r + 1)) of a model whose
    candidate tables are low-rank; inner products equal the full model's logits."""
    item, user = model.item_out, model.user_out
    if not (isinstance(item, LowRankEmbedding) and isinstance(user, LowRankEmbedding)):
        raise ValueError("factored_serving needs low-rank item_out and user_out")
    with torch.no_grad():
        items = torch.cat([item.a.weight, model.item_bias[:, None]], dim=1)
        users = torch.cat([user.a.weight, model.user_bias[:, None]], dim=1)
    return ProjectedTower(model.user_tower, item.b, user.b).eval(), items, users
