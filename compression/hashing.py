"""Hashed ID embeddings: a fixed-size table shared by all ids through several hash functions.

Row of id i = sum_k T[h_k(i)] with h_k(i) = ((a_k * i + b_k) mod P) mod n_buckets. The table
size does not grow with the catalogue, and an id never seen in training (i >= N) still
gets a vector (made of buckets trained by other ids) instead of an out-of-range Gather.
The hash is plain int64 arithmetic, so it runs inside the ONNX graph on raw ids.
"""

from __future__ import annotations

import numpy as np
import torch
from socialrec.compression.tables import INPUT_TABLES, replace_tables
from socialrec.training.model import TwoTower
from torch import nn

PRIME = 2_147_483_647  # 2^31 - 1: ids < 2^31 keep a_k * i + b_k below 2^62 (no int64 overflow)


def hash_params(n_hashes: int, seed: int = 0) -> torch.Tensor:
    """(n_hashes, 2) int64 (a_k, b_k) of a universal hash family, seeded."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, PRIME, size=n_hashes)
    b = rng.integers(0, PRIME, size=n_hashes)
    return torch.from_numpy(np.stack([a, b], axis=1).astype(np.int64))


def hash_ids(ids: torch.Tensor, params: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Bucket of each id under each hash.  (...,) int64 -> (..., K) int64"""
    x = ids[..., None] * params[:, 0] + params[:, 1]  # (..., K)
    return torch.remainder(torch.remainder(x, PRIME), n_buckets)


class HashEmbedding(nn.Module):
    """Sum of ``n_hashes`` rows of one shared (n_buckets, D) table per id; any id >= 0 works."""

    def __init__(self, n: int, table: torch.Tensor, params: torch.Tensor) -> None:
        super().__init__()
        self.n = n  # known ids (for .weight); the lookup itself accepts any id
        self.table = nn.Parameter(table.clone())  # (n_buckets, D)
        self.register_buffer("params", params.clone())  # (K, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = hash_ids(ids, self.params, self.table.shape[0])  # (..., K)
        return nn.functional.embedding(h, self.table).sum(dim=-2)  # (..., D)

    @property
    def weight(self) -> torch.Tensor:
        return self(torch.arange(self.n))  # (N, D)


def hashed_from(w: torch.Tensor, n_buckets: int, n_hashes: int, seed: int = 0) -> HashEmbedding:
    """Hashed table initialised from a dense one: each bucket is the mean of the rows it holds / K.

    A row then starts as the average of its K buckets' members; fine-tuning repairs the rest.
    """
    n, d = w.shape
    params = hash_params(n_hashes, seed)
    h = hash_ids(torch.arange(n), params, n_buckets)  # (N, K)
    sums = torch.zeros(n_buckets, d).index_add_(
        0, h.reshape(-1), w.detach().repeat_interleave(n_hashes, 0)
    )
    counts = torch.bincount(h.reshape(-1), minlength=n_buckets).clamp_min(1)
    return HashEmbedding(n, sums / counts[:, None] / n_hashes, params)


def to_hashed(
    model: TwoTower,
    bucket_fraction: float,
    n_hashes: int = 2,
    names: tuple[str, ...] = INPUT_TABLES,
    seed: int = 0,
) -> TwoTower:
    """Copy of ``model`` whose named tables are hashed into ``bucket_fraction * N`` buckets."""

    def convert(t: nn.Module) -> HashEmbedding:
        n = t.weight.shape[0]
        return hashed_from(t.weight, max(int(n * bucket_fraction), 1), n_hashes, seed)

    return replace_tables(model, names, convert)
