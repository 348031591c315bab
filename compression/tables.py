"""Swappable embedding tables: the one interface every compression technique keeps.

A table is an ``nn.Module`` with ``forward(ids) -> (..., D)`` and a ``weight`` property
(the full (N, D) matrix of the known ids), so a compressed table drops into
:class:`training.model.TwoTower` in place of ``nn.Embedding`` and the teacher's training
task, losses and ONNX export work unchanged.
"""

from __future__ import annotations

import copy

from socialrec.training.model import TwoTower
from torch import nn

# The user tower's input tables (they live in the ONNX graph) and the candidate tables
# (they become FAISS vectors at bundle time).
INPUT_TABLES = (
    "user_tower.item_in_c",
    "user_tower.item_in_f",
    "user_tower.user_in_c",
    "user_tower.user_in_f",
)
OUTPUT_TABLES = ("item_out", "user_out")


def get_table(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_table(model: nn.Module, name: str, table: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, table)


def replace_tables(model: TwoTower, names: tuple[str, ...], convert) -> TwoTower:
    """A deep copy of ``model`` with each named table replaced by ``convert(old_table)``."""
    out = copy.deepcopy(model)
    for name in names:
        set_table(out, name, convert(get_table(out, name)))
    return out


def table_weight(table: nn.Module):
    """The (N, D) matrix of a table, whatever its kind."""
    return table.weight
