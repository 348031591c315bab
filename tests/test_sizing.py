"""The arithmetic of benchmarks/sizing.py (fits, per-member costs, nodes, cores)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "sizing.py"
_spec = importlib.util.spec_from_file_location("sizing", _PATH)
sizing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sizing)


def test_linear_fit_recovers_a_line_and_reports_no_residual():
    xs = [30_000, 100_000, 300_000]
    ys = [5e6 + 2500.0 * x for x in xs]
    a, b = sizing.linear_fit(xs, ys)
    assert a == pytest.approx(5e6)
    assert b == pytest.approx(2500.0)
    assert sizing.max_relative_residual(xs, ys) == pytest.approx(0.0, abs=1e-12)


def test_max_relative_residual_sees_a_bend():
    # 10% above the line through the outer points at the middle one
    xs, ys = [1.0, 2.0, 3.0], [10.0, 22.0, 30.0]
    assert sizing.max_relative_residual(xs, ys) > 0.03


def test_linear_fit_refuses_degenerate_input():
    with pytest.raises(ValueError):
        sizing.linear_fit([1.0], [2.0])
    with pytest.raises(ValueError):
        sizing.linear_fit([5.0, 5.0], [1.0, 2.0])


def test_per_member_and_user_bytes():
    per = sizing.per_member(256, 12_400, 1024, 49_200)  # seen set at two sizes
    assert per == pytest.approx(47.916, rel=1e-3)
    with pytest.raises(ValueError):
        sizing.per_member(10, 1, 10, 2)
    # the base user itself, then 200 more friends at 60 B and 768 more seen items
    assert sizing.user_bytes(56_000, 256, 100, 48.0, 60.0, 256, 100) == 56_000
    assert sizing.user_bytes(56_000, 256, 100, 48.0, 60.0, 1024, 300) == pytest.approx(
        56_000 + 768 * 48 + 200 * 60
    )


def test_nodes_cores_and_replicas():
    assert sizing.nodes_for(100e9, 25e9) == 4
    assert sizing.nodes_for(100.1e9, 25e9) == 5
    assert sizing.nodes_for(1.0, 25e9) == 1
    with pytest.raises(ValueError):
        sizing.nodes_for(1.0, 0)
    # 10k rps at 1,000 us of CPU each = 10 busy cores; at 50% utilisation 20 cores
    assert sizing.cores_for(10_000, 1_000, 0.5) == pytest.approx(20.0)
    with pytest.raises(ValueError):
        sizing.cores_for(1, 1, 0)
    assert sizing.replicas_for(20.0, 8) == 3
    assert sizing.replicas_for(0.5, 8) == 2  # never fewer than two for availability
    assert sizing.replicas_for(16.0, 8, minimum=1) == 2


def test_extrapolate_indexes_fits_per_kind_and_skips_measured_sizes():
    runs = [
        {"kind": "ivfpq_fs", "dim": 33, "vectors": 100_000, "bytes": 7_300_000},
        {"kind": "ivfpq_fs", "dim": 33, "vectors": 1_000_000, "bytes": 69_600_000},
        {"kind": "sq8", "dim": 33, "vectors": 100_000, "bytes": 4_800_000},  # one size: none
    ]
    out = sizing.extrapolate_indexes(runs, [1_000_000, 10_000_000])
    assert [(r["kind"], r["vectors"]) for r in out] == [("ivfpq_fs", 10_000_000)]
    slope = (69_600_000 - 7_300_000) / 900_000
    assert out[0]["bytes_per_vector_slope"] == pytest.approx(slope, abs=0.01)
    assert math.isclose(out[0]["bytes_extrapolated"], 69_600_000 + slope * 9_000_000, rel_tol=1e-6)


def test_primaries_for_whole_shards():
    # 1,024 shards of 6.36 GB: a 25 GB node holds 3, so 342 primaries (not 261 by bytes)
    total = 6.5147e12
    assert sizing.nodes_for(total, 25e9) == 261
    assert sizing.primaries_for_shards(total, 25e9, 1024) == 342
    assert sizing.primaries_for_shards(1e9, 25e9, 1024) == 1  # everything fits one node
    assert sizing.primaries_for_shards(30e12, 25e9, 1024) is None  # a shard exceeds a node
