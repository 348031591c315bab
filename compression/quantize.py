"""Row-wise int8 / int4 embedding tables (dequantised after the Gather in the ONNX graph).

Each row r of a table is stored as codes q in [0, 2^bits - 1] with a per-row fp16 scale s
and offset o: w ~ q * s + o. Only the rows a query touches are dequantised, so the graph
stays small and the lookup cheap. int4 packs two codes per byte (column j of the first half
in the low nibble, column j of the second half in the high one), so the graph unpacks a row
with one AND, one shift and one concatenation.

Pooling (a weighted sum of rows, what the user tower does with every table) folds the
dequantisation in: sum_l w_l (q_l s_l + o_l) = sum_l (w_l s_l) q_l + sum_l w_l o_l, so the
per-element multiply-add over (L, D) rows becomes one (1, L) x (L, D) product (``pool``).

``ort_dynamic`` is onnxruntime's dynamic int8 quantisation (file in, file out) for any
MatMul/Gather weights of an already exported graph.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from socialrec.compression.tables import INPUT_TABLES, replace_tables
from socialrec.training.model import TwoTower
from torch import nn


def quantize_rows(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-row quantisation.  (N, D) -> codes uint8 (N, D), scale fp16 (N,), offset fp16 (N,)

    Scale and offset are rounded to fp16 first and the codes computed against the rounded
    values, so dequantisation with the stored numbers is what the codes were chosen for.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    levels = (1 << bits) - 1
    w = w.detach().float()
    lo = w.min(dim=1).values  # (N,)
    hi = w.max(dim=1).values  # (N,)
    offset = lo.half()
    scale = ((hi - lo) / levels).clamp_min(1e-8).half()
    q = torch.round((w - offset.float()[:, None]) / scale.float()[:, None])
    return q.clamp(0, levels).to(torch.uint8), scale, offset


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """codes (N, D) uint8 -> (N, D) float32."""
    return codes.float() * scale.float()[:, None] + offset.float()[:, None]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: column j low nibble, column j + ceil(D/2) high nibble.
    (N, D) uint8 -> (N, ceil(D/2)) uint8"""
    if codes.shape[1] % 2:
        codes = torch.cat([codes, torch.zeros_like(codes[:, :1])], dim=1)
    h = codes.shape[1] // 2
    return codes[:, :h] | (codes[:, h:] << 4)


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4` with bit ops (what the ONNX graph does).  (..., ceil(D/2)) -> (..., D) float"""
    # High nibble as (byte - low) / 16 in float: exact, and it exports as two plain ops, where
    # a uint8 right shift exports with sign-extension emulation (five more ops per table).
    lo = torch.bitwise_and(packed, 15).float()
    hi = (packed.float() - lo) * 0.0625
    q = torch.cat([lo, hi], dim=-1)
    return q if q.shape[-1] == dim else q[..., :dim]


class QuantEmbedding(nn.Module):
    """Frozen row-wise quantised table: Gather codes + per-row scale/offset, then dequantise."""

    def __init__(self, w: torch.Tensor, bits: int) -> None:
        super().__init__()
        codes, scale, offset = quantize_rows(w, bits)
        self.bits = bits
        self.n, self.dim = w.shape
        self.register_buffer("codes", pack_int4(codes) if bits == 4 else codes)  # (N, D or D/2)
        self.register_buffer("scale", scale)  # (N,) fp16
        self.register_buffer("offset", offset)  # (N,) fp16

    def _gather(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (..., D) float, scale (..., 1), offset (..., 1) of the rows ``ids``.

        ``F.embedding`` exports as one ONNX Gather (tensor indexing would add GatherND and
        negative-index handling per table).
        """
        c = F.embedding(ids, self.codes)  # (..., D) or (..., ceil(D/2)) uint8
        q = unpack_int4(c, self.dim) if self.bits == 4 else c
        s = F.embedding(ids, self.scale[:, None]).float()  # (..., 1)
        o = F.embedding(ids, self.offset[:, None]).float()  # (..., 1)
        return q.float(), s, o

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q, s, o = self._gather(ids)
        return q * s + o  # (..., D)

    def pool(self, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum_l w_l row(ids_l) with the dequantisation folded in.  ids, w: (B, L) -> (B, D)"""
        q, s, o = self._gather(ids)  # (B, L, D), (B, L, 1), (B, L, 1)
        w3 = w.unsqueeze(1)  # (B, 1, L)
        return ((w3 * s.transpose(1, 2)) @ q + w3 @ o).squeeze(1)

    @property
    def weight(self) -> torch.Tensor:
        return self(torch.arange(self.n))  # (N, D)


def quantize_tables(model: TwoTower, bits: int, names: tuple[str, ...] = INPUT_TABLES) -> TwoTower:
    """Copy of ``model`` with the named tables row-wise quantised to ``bits``."""
    return replace_tables(model, names, lambda t: QuantEmbedding(t.weight, bits))


def ort_dynamic(model_input: str | Path, model_output: str | Path) -> Path:
    """onnxruntime dynamic int8 quantisation of an ONNX file (per-tensor weights of MatMul/Gather)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model_input), str(model_output), weight_type=QuantType.QInt8)
    return Path(model_output)
