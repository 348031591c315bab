"""`socialrec export-device`: the .ort tower, the quantised item table, the device runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from socialrec.compression.device import (
    DEVICE_FILES,
    OPS_CONFIG,
    REPORT,
    TOWER_INPUTS,
    DeviceConfig,
    DeviceRecommender,
    ItemTable,
    export_device,
    quantize_vectors,
    run,
    table_from_index,
)
from socialrec.compression.export import INDEX_KINDS, build_index
from socialrec.compression.served_eval import ServedModel, tower_inputs
from socialrec.serving.bundle import open_bundle
from socialrec.serving.engine import Engine

from socialrec.cli import main


@pytest.fixture(scope="module")
def exported(bundles, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Device exports of the int8 (SQ8 items) and int4-table (SQ8 items) students and of the
    fp32 student (flat items: re-quantised per row, 8 and 4 bits)."""
    root = tmp_path_factory.mktemp("device")
    return {
        "student-int8": export_device(bundles["student-int8"], root / "int8"),
        "student-int4": export_device(bundles["student-int4"], root / "int4"),
        "student-row8": export_device(bundles["student"], root / "row8", bits=8),
        "student-row4": export_device(bundles["student"], root / "row4", bits=4),
    }


def _users_history(split, users: np.ndarray, ds) -> list[tuple[list, list]]:
    """External-id (history, friends) of split users, heaviest history first."""
    out = []
    for u in users.tolist():
        sel = split.train_user == u
        items, w = split.train_item[sel], split.train_weight[sel]
        order = np.argsort(-w, kind="stable")
        history = [(str(ds.item_ids[items[j]]), float(w[j])) for j in order]
        fr = split.friends_train
        friends = np.concatenate([fr[fr[:, 0] == u, 1], fr[fr[:, 1] == u, 0]])
        out.append((history, [str(ds.user_ids[f]) for f in friends.tolist()]))
    return out


@pytest.mark.parametrize("name", ["student-int8", "student-int4"])
def test_ort_tower_matches_bundle_onnx(loaded, bundles, exported, name: str) -> None:
    split = loaded[3]
    sm = ServedModel(bundles[name])
    rec = DeviceRecommender(exported[name])
    users = np.random.default_rng(0).choice(split.n_users, 64, replace=False)
    x = tower_inputs(sm.features(split), users)
    dev = rec.vectors(dict(zip(TOWER_INPUTS, x, strict=True)))
    srv, _ = sm.vectors(x)
    assert dev.shape == srv.shape
    # Same graph; the .ort has onnxruntime's fixed optimisations baked in, which may reorder
    # float32 sums: agreement to float rounding of values of size ~1.
    assert np.abs(dev - srv).max() <= 1e-5
    config = (exported[name] / OPS_CONFIG).read_text()
    assert "ai.onnx;" in config and "Gather" in config  # the reduced build's operator list


def test_sq8_table_is_the_servers_vectors(bundles, exported) -> None:
    index = faiss.read_index(str(bundles["student-int8"] / "items.faiss"))
    rec = DeviceRecommender(exported["student-int8"])
    assert rec.table.scheme == "sq8" and rec.table.codes.shape == (index.ntotal, index.d)
    # The server's own codes and ranges: decoding differs only in float32 rounding order.
    assert np.abs(rec.table.dequantize() - index.reconstruct_n(0, index.ntotal)).max() <= 1e-6


@pytest.mark.parametrize("bits", [8, 4])
def test_per_row_table_within_quantisation_error(bundles, exported, bits: int) -> None:
    index = faiss.read_index(str(bundles["student"] / "items.faiss"))
    x = index.reconstruct_n(0, index.ntotal)
    table = DeviceRecommender(exported[f"student-row{bits}"]).table
    assert table.scheme == f"row{bits}"
    err = np.abs(table.dequantize() - x).max(axis=1)  # (N,)
    step = table.scale.astype(np.float32)
    # Round to nearest: half a step per entry, plus the fp16 rounding of the offset (half an
    # fp16 ulp of values below 1: 2^-12) and of the step itself times the code (<= 15 / 255).
    levels = (1 << bits) - 1
    assert (err <= step / 2 + 2**-12 + levels * step * 2**-11 + 1e-6).all()


def test_scores_from_codes_equal_dequantised_product() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1000, 17)).astype(np.float32)
    u = rng.standard_normal((3, 17)).astype(np.float32)
    for table in (quantize_vectors(x, 8), quantize_vectors(x, 4), _sq8(x)):
        ref = u @ table.dequantize().T
        # chunk 64: many chunks and a ragged last one; float32 sums of 17 terms of size ~3.
        assert np.allclose(table.scores(u, chunk=64), ref, atol=1e-4), table.scheme


def _sq8(x: np.ndarray) -> ItemTable:
    return table_from_index(build_index(x, "sq8"), 8)


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_table_of_every_index_kind(kind: str) -> None:
    """SQ8-coded kinds (sq8, hnsw_sq8, ivfpq_fs's re-ranking codes) give their own codes back
    exactly; fp32 kinds are quantised per row to int8."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 33)).astype(np.float32)
    index = build_index(x, kind)
    table = table_from_index(index, 8)
    stored = index.reconstruct_n(0, index.ntotal)  # what the server scores against
    err = np.abs(table.dequantize() - stored).max(axis=1)  # (N,)
    if kind in ("flat", "hnsw"):
        assert table.scheme == "row8"
        # Half an int8 step of each row's range (codes are chosen against the fp16 scale and
        # offset), plus the clamping of values outside the fp16-rounded range: a fraction of
        # an fp16 ulp of the row's extremes (ulp 2^-8 for |x| < 4 with these normals).
        assert (err <= table.scale.astype(np.float32) * 0.51 + 2e-3).all()
    else:
        assert table.scheme == "sq8"
        assert err.max() <= 1e-5  # float32 rounding of the same affine decode


def test_bad_table_shapes_refused() -> None:
    with pytest.raises(ValueError, match="item codes"):
        ItemTable("row8", 4, np.zeros((3, 5), np.uint8), np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="scheme"):
        ItemTable("int3", 4, np.zeros((3, 4), np.uint8), np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="bits"):
        table_from_index(faiss.IndexFlatIP(4), 2)


def test_device_topk_equals_server_on_flat_sq8_index(loaded, bundles, exported) -> None:
    """200 users: the device's top 20 (brute force over the server's SQ8 codes) is the
    server engine's (FAISS flat SQ8 scan), seen items excluded on both sides."""
    _, _, ds, split, _ = loaded
    eng = Engine.load(bundles["student-int8"])
    rec = DeviceRecommender(exported["student-int8"])
    users = np.random.default_rng(2).choice(split.n_users, 200, replace=False)
    compared = 0
    for history, friends in _users_history(split, users, ds):
        got = rec.recommend(history, friends, 20)
        want = eng.recommend_content(history, friends, k=20)
        if want.cold_start:
            assert got == []
            continue
        ws = np.array([r.score for r in want.items])
        gs = np.array([s for _, s in got])
        # Same codes, same query (float rounding apart): the same scores in the same order.
        assert np.allclose(gs, ws, atol=1e-4)
        # Ids agree except inside ties (scores within 1e-4 of the 20th, the cut may differ).
        kth = ws[-1] + 1e-4
        assert {i for i, s in got if s > kth} == {r.id for r in want.items if r.score > kth}
        seen = {i for i, _ in history}
        assert not seen & {i for i, _ in got}
        compared += 1
    assert compared >= 190


def test_per_row_int8_topk_close_to_fp32_server(loaded, bundles, exported) -> None:
    _, _, ds, split, _ = loaded
    eng = Engine.load(bundles["student"])  # exact fp32 flat search
    rec = DeviceRecommender(exported["student-row8"])
    users = np.random.default_rng(3).choice(split.n_users, 100, replace=False)
    overlap = []
    for history, friends in _users_history(split, users, ds):
        got = {i for i, _ in rec.recommend(history, friends, 20)}
        want = {r.id for r in eng.recommend_content(history, friends, k=20).items}
        overlap.append(len(got & want) / 20)
    # int8 per row moves each score by at most ~sum|u| * step / 2: only near-ties swap.
    assert np.mean(overlap) >= 0.95, np.mean(overlap)


def test_recommend_excludes_and_validates(loaded, exported) -> None:
    _, _, ds, split, _ = loaded
    rec = DeviceRecommender(exported["student-int8"])
    [(history, friends)] = _users_history(split, np.array([5]), ds)
    first = rec.recommend(history, friends, 10)
    assert len(first) == 10
    again = rec.recommend(history, friends, 10, exclude=[first[0][0]])
    assert first[0][0] not in {i for i, _ in again}
    assert rec.recommend([("no-such-item", 1.0)], ["no-such-user"], 10) == []
    with pytest.raises(ValueError, match="k must be positive"):
        rec.recommend(history, friends, 0)


def test_runtime_needs_only_numpy_and_onnxruntime(exported, loaded) -> None:
    """The device runtime loads and recommends with torch and FAISS unimportable."""
    _, _, ds, split, _ = loaded
    [(history, friends)] = _users_history(split, np.array([7]), ds)
    code = (
        "import sys, json\n"
        "sys.modules['torch'] = None; sys.modules['faiss'] = None\n"
        "from socialrec.compression.device import DeviceRecommender\n"
        "rec = DeviceRecommender(sys.argv[1])\n"
        "h, f = json.loads(sys.argv[2])\n"
        "print(json.dumps(rec.recommend([tuple(x) for x in h], f, 5)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(exported["student-int8"]), json.dumps([history, friends])],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(out.stdout)
    want = DeviceRecommender(exported["student-int8"]).recommend(history, friends, 5)
    assert [i for i, _ in got] == [i for i, _ in want]


@pytest.fixture
def device_run(run_dir: Path, bundles, tmp_path: Path) -> Path:
    """The tiny run with the int8 student as its selected bundle (a copy: other tests write
    the shared run's own bundle)."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("run.json", "report.json"):
        shutil.copy(run_dir / name, run / name)
    shutil.copytree(bundles["student-int8"], run / "bundle")
    return run


def test_export_device_writes_report(device_run: Path, tmp_path: Path) -> None:
    out = run(DeviceConfig(run_dir=str(device_run), out=str(tmp_path / "dev"), timing_queries=30))
    rep = json.loads((out / REPORT).read_text())
    assert {"bytes", "recall@20", "server_recall@20", "us_per_query"} <= set(rep)
    assert rep["bytes"] == sum((out / n).stat().st_size for n in DEVICE_FILES)
    assert rep["files"].keys() == set(DEVICE_FILES)
    assert 0 < rep["recall@20"] <= 1 and rep["us_per_query"] > 0
    assert 0 < rep["us_tower"] < rep["us_per_query"] and rep["us_rank"] > 0
    # The server's codes and the same tower: the same lists up to float ties.
    assert abs(rep["recall@20"] - rep["server_recall@20"]) <= 0.005
    assert rep["top20_same_as_server"] >= 0.95
    assert rep["evaluated_users"] > 100
    assert open_bundle(device_run / "bundle").version == rep["bundle_version"]


def test_cli_export_device_bad_run(tmp_path: Path, capsys, run_dir: Path) -> None:
    missing = tmp_path / "nope"
    assert main(["export-device", "--run", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such run directory" in err
    half = tmp_path / "half"  # a training run without a compressed bundle
    half.mkdir()
    shutil.copy(run_dir / "run.json", half / "run.json")
    assert main(["export-device", "--run", str(half), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(half / "bundle" / "manifest.json") in err and "socialrec compress" in err
    assert not (tmp_path / "o").exists()


def test_cli_exit_code_is_2_in_a_real_process(tmp_path: Path) -> None:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "socialrec.cli",
            "export-device",
            "--run",
            str(tmp_path / "x"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 2 and str(tmp_path / "x") in p.stderr
