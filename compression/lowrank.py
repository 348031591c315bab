"""Low-rank embeddings: E (N, D) ~ A (N, r) @ B (r, D), initialised by truncated SVD.

The ONNX graph keeps A and B (a Gather then a MatMul), so the tower's input tables shrink
from N*D to (N + D)*r numbers. Candidate tables are materialised into FAISS vectors at
bundle time, so factorising them would not change served bytes; only inputs are factorised.
"""

from __future__ import annotations

import torch
from torch import nn

from compression.tables import INPUT_TABLES, replace_tables
from training.model import TwoTower


def svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of w (Eckart-Young), singular values split evenly.  (N, D) -> (N, r), (r, D)"""
    u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)  # (N, K), (K,), (K, D)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


class LowRankEmbedding(nn.Module):
    """Embedding rows computed as a[ids] @ b."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())  # (N, r)
        self.b = nn.Parameter(b.clone())  # (r, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.a) @ self.b  # (..., D)

    @property
    def weight(self) -> torch.Tensor:
        return self.a @ self.b  # (N, D)


def to_lowrank(model: TwoTower, rank: int, names: tuple[str, ...] = INPUT_TABLES) -> TwoTower:
    """Copy of ``model`` whose named tables are rank-``rank`` SVD factorisations of the originals."""
    return replace_tables(model, names, lambda t: LowRankEmbedding(*svd_factors(t.weight, rank)))
