"""Converters between teacher and compressed tables: pure functions on literal tensors."""

from __future__ import annotations

import torch
from socialrec.compression.hashing import HashEmbedding, hash_ids, hashed_from
from socialrec.compression.lowrank import LowRankEmbedding, svd_factors, to_lowrank
from socialrec.compression.prune import MaskedEmbedding, magnitude_mask, prune_dims
from socialrec.compression.quantize import (
    QuantEmbedding,
    dequantize_rows,
    pack_int4,
    quantize_rows,
    unpack_int4,
)
from socialrec.compression.tables import INPUT_TABLES, get_table
from socialrec.training.distill import distill_loss
from socialrec.training.model import TowerConfig, TwoTower


def test_svd_factors_rank1_exact() -> None:
    w = torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])  # rank 1
    a, b = svd_factors(w, 1)
    assert a.shape == (3, 1) and b.shape == (1, 2)
    assert torch.allclose(a @ b, w, atol=1e-5)
    a, b = svd_factors(w, 5)  # rank capped by min(N, D)
    assert a.shape == (3, 2)


def test_lowrank_embedding_matches_its_weight() -> None:
    e = LowRankEmbedding(torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0, 4.0]]))
    assert torch.equal(e.weight, torch.tensor([[3.0, 4.0], [6.0, 8.0]]))
    assert torch.equal(e(torch.tensor([[1, 0]])), torch.tensor([[[6.0, 8.0], [3.0, 4.0]]]))
    # pooled in the factor space: (0.5 * 2 + 1 * 1) * [3, 4]
    pooled = e.pool(torch.tensor([[1, 0]]), torch.tensor([[0.5, 1.0]]))
    assert torch.equal(pooled, torch.tensor([[6.0, 8.0]]))


def test_to_lowrank_full_rank_reproduces_teacher() -> None:
    torch.manual_seed(0)
    m = TwoTower(TowerConfig(n_items=6, n_users=5, dim=4))
    lr = to_lowrank(m, rank=4)
    for name in INPUT_TABLES:
        assert torch.allclose(get_table(lr, name).weight, get_table(m, name).weight, atol=1e-5)
    assert isinstance(get_table(m, INPUT_TABLES[0]), torch.nn.Embedding)  # original untouched


def test_quantize_rows_int4_exact_grid_and_int8_bound() -> None:
    w = torch.tensor([[0.0, 1.0, 15.0], [-1.0, -1.0, -1.0]])
    codes, scale, offset = quantize_rows(w, 4)
    assert codes[0].tolist() == [0, 1, 15] and float(scale[0]) == 1.0 and float(offset[0]) == 0.0
    assert torch.allclose(dequantize_rows(codes, scale, offset), w)  # constant row survives
    torch.manual_seed(0)
    w = torch.randn(50, 33)
    codes, scale, offset = quantize_rows(w, 8)
    err = (dequantize_rows(codes, scale, offset) - w).abs().max(dim=1).values  # (N,)
    # Half a step of rounding, plus fp16 rounding of the offset (relative 2^-11 of |min|).
    bound = scale.float() / 2 + offset.float().abs() * 2**-10 + 1e-6
    assert bool((err <= bound).all())


def test_int4_pack_unpack_literal() -> None:
    codes = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    packed = pack_int4(codes)
    # padded to [1, 2, 3, 0]; column j low nibble, column j + 2 high nibble
    assert packed.tolist() == [[0x31, 0x02]]
    assert unpack_int4(packed, 3).tolist() == [[1.0, 2.0, 3.0]]


def test_quant_embedding_gathers_dequantised_rows() -> None:
    w = torch.tensor([[0.0, 1.0, 15.0], [2.0, 4.0, 6.0]])
    for bits in (4, 8):
        e = QuantEmbedding(w, bits)
        # Row [2, 4, 6] has range 4: half a quantisation step is 4 / (2 * (2^bits - 1)).
        half_step = 4.0 / (2 * ((1 << bits) - 1)) + 1e-3
        assert torch.allclose(e(torch.tensor([[1, 0]]))[0], w[[1, 0]], atol=half_step)
        assert e.weight.shape == (2, 3)
        # pool (dequantisation folded into the weighted sum) == weighted sum of the rows
        ids, wts = torch.tensor([[1, 0, 1]]), torch.tensor([[0.5, 2.0, 0.25]])
        assert torch.allclose(e.pool(ids, wts), (wts[..., None] * e(ids)).sum(1), atol=1e-5)
    assert QuantEmbedding(w, 4).codes.shape == (2, 2)  # two codes per byte


def test_hash_ids_literal_and_unseen_ids() -> None:
    params = torch.tensor([[1, 0], [1, 1]])  # h0(i) = i mod 5, h1(i) = (i + 1) mod 5
    assert hash_ids(torch.tensor([0, 4, 7]), params, 5).tolist() == [[0, 1], [4, 0], [2, 3]]
    e = HashEmbedding(3, torch.eye(5), params)
    assert e(torch.tensor([123456])).tolist() == [[0, 1, 1, 0, 0]]  # id never seen: still a vector
    assert e.weight.shape == (3, 5)


def test_hashed_from_identity_hash_is_exact() -> None:
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    e = hashed_from(w, n_buckets=3, n_hashes=1)
    # One hash into as many buckets as ids: exact when the hash is a permutation of the ids.
    h = hash_ids(torch.arange(3), e.params, 3)[:, 0]
    if len(set(h.tolist())) == 3:
        assert torch.allclose(e.weight, w)
    # Two hashes: each row is the sum of two bucket means; shape and finiteness hold.
    assert torch.isfinite(hashed_from(w, 2, 2).weight).all()


def test_magnitude_mask_literal() -> None:
    w = torch.tensor([[0.1, -3.0, 0.5, 2.0]])
    assert magnitude_mask(w, 0.5).tolist() == [[0.0, 1.0, 0.0, 1.0]]
    assert magnitude_mask(w, 0.0).tolist() == [[1.0, 1.0, 1.0, 1.0]]
    e = MaskedEmbedding(w, magnitude_mask(w, 0.5))
    assert e.weight.tolist() == [[0.0, -3.0, 0.0, 2.0]]


def test_prune_dims_keeps_the_dimension_both_sides_use() -> None:
    m = TwoTower(TowerConfig(n_items=2, n_users=2, dim=2))
    with torch.no_grad():
        for name in ("user_tower.item_in_c", "user_tower.user_in_c", "item_out"):
            get_table(m, name).weight.copy_(torch.tensor([[0.1, 1.0], [0.1, 1.0]]))
        for name in ("user_tower.item_in_f", "user_tower.user_in_f", "user_out"):
            get_table(m, name).weight.copy_(torch.tensor([[2.0, 0.1], [2.0, 0.1]]))
        m.user_tower.bias_c.copy_(torch.tensor([7.0, 8.0]))
    p = prune_dims(m, 1)
    assert p.cfg.dim == 1
    assert p.item_out.weight.tolist() == [[1.0], [1.0]]  # content keeps dim 1
    assert p.user_out.weight.tolist() == [[2.0], [2.0]]  # friends keep dim 0
    assert p.user_tower.bias_c.tolist() == [8.0]


def test_distill_loss_zero_at_teacher_and_ignores_excluded() -> None:
    t = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    none = torch.zeros_like(t, dtype=torch.bool)
    assert float(distill_loss(t.clone(), t, none, 2.0)) < 1e-6
    s = torch.tensor([[0.0, 1.0, 0.0, 3.0]])
    ex = torch.tensor([[True, False, False, False]])
    s2 = s.clone()
    s2[0, 0] = 100.0  # an excluded (train-positive) candidate's score does not matter
    assert torch.allclose(distill_loss(s, t, ex, 1.0), distill_loss(s2, t, ex, 1.0))
    # top-M: only the teacher's best candidate counts -> matching its rank 1 is enough.
    s3 = torch.tensor([[9.0, 0.0, 0.0, 0.0]])
    assert float(distill_loss(s3, t, none, 1.0, top_m=1)) < 1e-3
    assert float(distill_loss(s, t, none, 1.0)) > 0.1
