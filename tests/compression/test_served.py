"""The served path: ONNX parity, FAISS index kinds, served evaluation, bundle round trip."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from socialrec.compression.export import INDEX_KINDS, build_index, choose_index
from socialrec.compression.hashing import to_hashed
from socialrec.compression.lowrank import to_lowrank
from socialrec.compression.quantize import quantize_tables
from socialrec.compression.served_eval import ServedModel, served_evaluate, tower_inputs
from socialrec.serving.bundle import BundleError, load_manifest
from socialrec.training.train import evaluate_model


def _sample_inputs(split, sm: ServedModel, n: int = 64):
    users = np.random.default_rng(0).choice(split.n_users, n, replace=False)
    return tower_inputs(sm.features(split), users)


def _torch_vectors(model, x) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        u_c, u_f = model.eval().user_tower(*(torch.from_numpy(a) for a in x))
    return u_c.numpy(), u_f.numpy()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine.  (B, D), (B, D) -> (B,)"""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def test_served_eval_matches_torch_evaluate_on_fp32_teacher(loaded, bundles) -> None:
    teacher, _, _, split, _ = loaded
    served = served_evaluate(bundles["teacher"], split)
    ref = evaluate_model(teacher, split)
    for task in ("content", "friends"):
        for key, v in ref[task].items():
            # Same protocol, same float32 vectors: only float rounding / tie order can differ.
            assert abs(served[task][key] - v) <= 1e-3, (task, key, served[task][key], v)


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_onnx_fp32_parity(loaded, bundles, student, name: str) -> None:
    model = loaded[0] if name == "teacher" else student
    sm = ServedModel(bundles[name])
    x = _sample_inputs(loaded[3], sm)
    for onnx_u, torch_u in zip(sm.vectors(x), _torch_vectors(model, x), strict=True):
        assert onnx_u.shape[1] == torch_u.shape[1] + 1  # bias slot appended in the graph
        assert np.allclose(onnx_u[:, -1], 1.0)
        # fp32 through a different kernel order: cosine 1 up to float rounding.
        assert _cos(onnx_u[:, :-1], torch_u).min() >= 0.9999


@pytest.mark.parametrize("bits", [8, 4])
def test_onnx_quantized_parity(loaded, bundles, student, bits: int) -> None:
    sm = ServedModel(bundles[f"student-int{bits}"])
    x = _sample_inputs(loaded[3], sm)
    q = quantize_tables(student, bits)
    for onnx_u, q_u, fp_u in zip(
        sm.vectors(x), _torch_vectors(q, x), _torch_vectors(student, x), strict=True
    ):
        # The graph computes exactly the torch dequantisation: float rounding only.
        assert _cos(onnx_u[:, :-1], q_u).min() >= 0.9999
        # Against the fp32 student: per-row error <= half a step of a (2^bits - 1)-level grid
        # over the row's range; summed over a pooled history and through tanh this keeps the
        # direction within ~1% (int8) / ~5% (int4) on these 16-dim vectors.
        floor = 0.999 if bits == 8 else 0.98
        assert np.median(_cos(onnx_u[:, :-1], fp_u)) >= floor
        assert _cos(onnx_u[:, :-1], fp_u).min() >= floor - 0.03


@pytest.mark.parametrize("convert", ["lowrank", "hashed"])
def test_onnx_parity_lowrank_and_hashed(loaded, bundle_factory, tmp_path: Path, convert) -> None:
    teacher = loaded[0]
    model = to_lowrank(teacher, 8) if convert == "lowrank" else to_hashed(teacher, 0.5)
    sm = ServedModel(bundle_factory(model, tmp_path / convert))
    x = _sample_inputs(loaded[3], sm)
    for onnx_u, torch_u in zip(sm.vectors(x), _torch_vectors(model, x), strict=True):
        assert _cos(onnx_u[:, :-1], torch_u).min() >= 0.9999


def test_hashed_tower_accepts_unseen_ids(loaded, bundle_factory, tmp_path: Path) -> None:
    teacher, _, _, split, _ = loaded
    sm = ServedModel(bundle_factory(to_hashed(teacher, 0.5), tmp_path / "h"))
    unseen = np.array([[split.n_items + 17, split.n_items + 99]], dtype=np.int64)  # new items
    x = (
        unseen,
        np.ones((1, 2), np.float32),
        np.zeros((1, 1), np.int64),
        np.zeros((1, 1), np.float32),
    )
    u_c, _ = sm.vectors(x)
    assert np.isfinite(u_c).all() and np.abs(u_c[:, :-1]).sum() > 0


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_faiss_kind_recall_vs_flat(kind: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((50, 33)).astype(np.float32)
    x = centers[rng.integers(0, 50, 6000)] + 0.3 * rng.standard_normal((6000, 33)).astype(
        np.float32
    )
    q = centers[rng.integers(0, 50, 200)] + 0.3 * rng.standard_normal((200, 33)).astype(np.float32)
    _, ref = build_index(x, "flat").search(q, 20)
    faiss.write_index(build_index(x, kind), str(tmp_path / "i.faiss"))  # round trip too
    _, got = faiss.read_index(str(tmp_path / "i.faiss")).search(q, 20)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(ref, got, strict=True)])
    assert recall >= 0.95, (kind, recall)


def test_choose_index_by_catalogue_size() -> None:
    assert choose_index(10_000) == "flat" and choose_index(10_000, compact=True) == "sq8"
    assert choose_index(500_000, compact=True) == "hnsw_sq8"
    assert choose_index(5_000_000, compact=True) == "ivfpq_fs"


def test_bundle_round_trip_same_answers(loaded, bundles, tmp_path: Path) -> None:
    split = loaded[3]
    copy = tmp_path / "copy"
    shutil.copytree(bundles["student-int8"], copy)
    a, b = ServedModel(bundles["student-int8"]), ServedModel(copy)
    x = _sample_inputs(split, a)
    ua, ub = a.vectors(x), b.vectors(x)
    assert np.array_equal(ua[0], ub[0]) and np.array_equal(ua[1], ub[1])
    assert np.array_equal(a.items.search(ua[0], 20)[1], b.items.search(ub[0], 20)[1])
    assert np.array_equal(a.users.search(ua[1], 20)[1], b.users.search(ub[1], 20)[1])
    m = load_manifest(copy)
    assert m["index"] == {"items": "sq8", "users": "sq8"}
    assert m["dims"]["content"] == 17 and "versions" in m
    for name in ("user_tower.onnx", "items.faiss", "users.faiss"):
        assert "pickle" not in (copy / name).read_bytes()[:64].decode("latin-1").lower()


def test_corrupted_or_wrong_checksum_refused(bundles, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(bundles["student"], bad)
    data = bytearray((bad / "items.faiss").read_bytes())
    data[-5] ^= 0xFF  # same size, one byte flipped
    (bad / "items.faiss").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="items.faiss: sha256"):
        load_manifest(bad)
    wrong = tmp_path / "wrong"
    shutil.copytree(bundles["student"], wrong)
    m = json.loads((wrong / "manifest.json").read_text())
    m["files"]["user_tower.onnx"]["sha256"] = "0" * 64
    (wrong / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="user_tower.onnx: sha256"):
        ServedModel(wrong)


def test_factored_serving_scores_equal_full_model(loaded, bundle_factory, tmp_path: Path) -> None:
    """Low-rank candidates served in r-space: (u B^T) . A_i == u . (A_i B), bias included."""
    from socialrec.compression.export import export_onnx
    from socialrec.compression.lowrank import factored_serving

    teacher, _, _, split, _ = loaded
    model = to_lowrank(teacher, 8)
    tower, items, users = factored_serving(model)
    assert items.shape == (split.n_items, 9) and users.shape == (split.n_users, 9)
    onnx = export_onnx(tower, tmp_path / "t.onnx")
    sm = ServedModel(
        bundle_factory(
            None, tmp_path / "b", onnx_file=onnx, items=items.numpy(), users=users.numpy()
        )
    )
    x = _sample_inputs(split, sm)
    u_c, u_f = sm.vectors(x)
    with torch.no_grad():
        ref_c, ref_f = model(*(torch.from_numpy(a) for a in x))  # (B, I), (B, U) logits
    assert np.allclose(u_c @ items.numpy().T, ref_c.numpy(), atol=1e-4)
    assert np.allclose(u_f @ users.numpy().T, ref_f.numpy(), atol=1e-4)


@pytest.mark.parametrize("name", ["student-int8", "student-int4"])
def test_server_engine_loads_compressed_bundles(bundles, name: str) -> None:
    """The gRPC server's engine accepts the compressed bundles (padded SQ8 indexes read back)."""
    from socialrec.serving.bundle import open_bundle
    from socialrec.serving.engine import Engine

    eng = Engine.load(bundles[name])
    b = open_bundle(bundles[name])
    history = [(b.item_ids[3], 1.0), (b.item_ids[10], 2.0)]
    res = eng.recommend_content(history, [b.user_ids[1]], k=5)
    assert len(res.items) == 5 and not res.cold_start
    fr = eng.recommend_friends(b.user_ids[0], history, [b.user_ids[1]], {b.user_ids[2]: 1}, k=5)
    assert len(fr.items) == 5


def test_fp16_factors_stay_fp16_in_the_graph_and_keep_the_scores(
    loaded, bundle_factory, tmp_path: Path
) -> None:
    """Quantised low-rank variants keep B in fp16: the ONNX file stores 2 bytes per number
    of B (no fp32 copy folded in) and the served scores match the fp32-B model closely."""
    import onnx
    from onnx import numpy_helper
    from socialrec.compression.export import export_onnx
    from socialrec.compression.lowrank import factor_tables, factored_serving, half_factors
    from socialrec.compression.tables import INPUT_TABLES

    teacher, _, _, split, _ = loaded
    q = quantize_tables(to_lowrank(teacher, 8), 4, factor_tables(INPUT_TABLES))
    files, scores = {}, {}
    for label, model in (("fp32", q), ("fp16", half_factors(copy.deepcopy(q)))):
        tower, items, users = factored_serving(model)
        onnx_file = export_onnx(tower, tmp_path / f"{label}.onnx")
        files[label] = onnx_file.stat().st_size
        sm = ServedModel(
            bundle_factory(
                None,
                tmp_path / label,
                onnx_file=onnx_file,
                items=items.numpy(),
                users=users.numpy(),
            )
        )
        x = _sample_inputs(split, sm)
        u_c, u_f = sm.vectors(x)
        scores[label] = (u_c @ items.numpy().T, u_f @ users.numpy().T)
        if label == "fp16":
            graph = onnx.load(str(onnx_file)).graph
            halves = [
                numpy_helper.to_array(i).shape
                for i in graph.initializer
                if i.data_type == onnx.TensorProto.FLOAT16
            ]
            d = teacher.cfg.dim
            # 4 input tables' B (8, d) and the two projections (d, 8), all kept in fp16
            assert sum(s in ((8, d), (d, 8)) for s in halves) == 6, halves
            big_fp32 = [
                i.name
                for i in graph.initializer
                if i.data_type == onnx.TensorProto.FLOAT and numpy_helper.to_array(i).size >= 8 * d
            ]
            assert not big_fp32, big_fp32
    assert files["fp32"] - files["fp16"] >= 6 * 8 * teacher.cfg.dim * 2 * 0.95
    for a, b in zip(scores["fp16"], scores["fp32"], strict=True):
        scale = np.abs(b).max()
        assert np.abs(a - b).max() <= 2e-3 * scale
