"""Magnitude pruning of the tower's tables, unstructured (single weights) and structured (dims).

Unstructured pruning zeroes the smallest |w| of each table; a dense ONNX initializer stores
the zeros anyway, so the served bytes do not shrink (only a sparse format or compression of
the file would see them). Structured pruning drops whole embedding dimensions of a head
(a column of every table of that head): the model really gets smaller.
"""

from __future__ import annotations

import torch
from socialrec.compression.tables import INPUT_TABLES, get_table, replace_tables
from socialrec.training.model import TowerConfig, TwoTower
from torch import nn


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """1 where |w| is above the ``sparsity`` quantile of |w|, 0 elsewhere (ties pruned).  same shape"""
    k = int(round(sparsity * w.numel()))
    if k <= 0:
        return torch.ones_like(w)
    threshold = w.detach().abs().flatten().kthvalue(k).values
    return (w.detach().abs() > threshold).to(w.dtype)


class MaskedEmbedding(nn.Module):
    """Embedding whose pruned weights stay zero while fine-tuning (the mask is a buffer)."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        self.weight_orig = nn.Parameter(weight.detach().clone())  # (N, D)
        self.register_buffer("mask", mask.clone())  # (N, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_orig * self.mask


def prune_unstructured(
    model: TwoTower, sparsity: float, names: tuple[str, ...] = INPUT_TABLES
) -> TwoTower:
    """Copy of ``model`` with each named table magnitude-pruned to ``sparsity`` (trainable, masked)."""
    return replace_tables(
        model, names, lambda t: MaskedEmbedding(t.weight, magnitude_mask(t.weight, sparsity))
    )


def finalize_masked(model: TwoTower) -> TwoTower:
    """Masked tables back to plain ``nn.Embedding`` (zeros stored densely) for export."""

    def convert(t: nn.Module) -> nn.Module:
        if not isinstance(t, MaskedEmbedding):
            return t
        e = nn.Embedding(*t.weight.shape)
        e.weight.data.copy_(t.weight.detach())
        return e

    return replace_tables(model, INPUT_TABLES, convert)


def sparsity(model: TwoTower, names: tuple[str, ...] = INPUT_TABLES) -> float:
    """Fraction of exactly-zero weights over the named tables."""
    ws = [get_table(model, n).weight.detach() for n in names]
    return float(sum((w == 0).sum() for w in ws) / sum(w.numel() for w in ws))


HEADS = {
    "content": ("user_tower.item_in_c", "user_tower.user_in_c", "item_out"),
    "friends": ("user_tower.item_in_f", "user_tower.user_in_f", "user_out"),
}
BIAS = {"content": "user_tower.bias_c", "friends": "user_tower.bias_f"}


def dim_scores(model: TwoTower, head: str) -> torch.Tensor:
    """Importance of each dimension of a head: product of the column norms of its tables.  (D,)

    A dimension matters only if the inputs write into it *and* the candidates read it.
    """
    with torch.no_grad():
        norms = [get_table(model, n).weight.norm(dim=0) for n in HEADS[head]]  # 3 x (D,)
        return (norms[0] + norms[1]) * norms[2]


def prune_dims(model: TwoTower, keep: int) -> TwoTower:
    """A new TwoTower with ``keep`` dimensions per head: each head keeps its highest-scoring ones.

    Heads share no parameters, so each picks its own columns; the output is a plain TwoTower.
    """
    cfg = TowerConfig(**{**model.cfg.as_dict(), "dim": keep})
    out = TwoTower(cfg)
    src = dict(model.state_dict())
    dst = out.state_dict()
    for head, tables in HEADS.items():
        cols = torch.sort(torch.topk(dim_scores(model, head), keep).indices).values  # (keep,)
        for name in tables:
            dst[f"{name}.weight"] = get_table(model, name).weight.detach()[:, cols].clone()
        dst[BIAS[head]] = src[BIAS[head]][cols].clone()
    dst["item_bias"] = src["item_bias"].clone()
    dst["user_bias"] = src["user_bias"].clone()
    out.load_state_dict(dst)
    return out.eval()
