"""Export a trained two-tower model as a served bundle: ONNX user tower + FAISS indexes.

File in, file out: ``export_run(run_dir, out_dir)`` reads RUN_DIR/teacher.pt and the run's
split, writes a bundle (see serving/bundle.py for the contract) and returns its path.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path

import faiss
import numpy as np
import torch
from socialrec.serving.bundle import TOWER_INPUTS, TOWER_OUTPUTS, write_ids, write_manifest
from socialrec.serving.engine import FRESH_PRIOR
from socialrec.serving.fresh import FoldInPrior, manifest_block
from socialrec.training.fof_blend import manifest_block as fof_manifest_block
from socialrec.training.model import TwoTower, UserTower, with_bias_slot
from socialrec.training.split import Split
from torch import nn

COLD_START_LIST = 1000  # popular items / well-connected users kept for cold start
PRIOR_USERS = 2000  # users whose tower outputs the fresh-item prior is computed from (a sample)
PRIOR_HISTORY = 256  # history entries fed to the tower per sampled user (the server's default)


class TowerForExport(nn.Module):
    """User tower whose outputs already carry the bias slot: ready for inner-product search."""

    def __init__(self, tower: UserTower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, hist_ids, hist_w, friend_ids, friend_w) -> tuple[torch.Tensor, torch.Tensor]:
        u_c, u_f = self.tower(hist_ids, hist_w, friend_ids, friend_w)
        return with_bias_slot(u_c), with_bias_slot(u_f)  # (B, D + 1) each


def export_onnx(tower: UserTower, path: str | Path, opset: int = 18) -> Path:
    """Write the tower as ONNX with dynamic batch, history and friend lengths."""
    path = Path(path)
    module = TowerForExport(tower).eval()
    args = (
        torch.zeros(2, 3, dtype=torch.long),
        torch.ones(2, 3),
        torch.zeros(2, 2, dtype=torch.long),
        torch.ones(2, 2),
    )
    dyn = (
        {0: "batch", 1: "history"},
        {0: "batch", 1: "history"},
        {0: "batch", 1: "friends"},
        {0: "batch", 1: "friends"},
    )
    # The exporter logs a line per missing optional torchvision op and prints its progress:
    # noise for our users, so both are muted here (errors still raise).
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(TOWER_INPUTS),
            output_names=list(TOWER_OUTPUTS),
            dynamic_shapes=dyn,
            opset_version=opset,
            dynamo=True,
            verbose=False,
            external_data=False,
        )
    onnx_log.setLevel(level)
    store_fp16_exact(path)
    return path


FP16_MIN_SIZE = 256  # numbers: smaller initializers are not worth a Cast node


def store_fp16_exact(path: str | Path, min_size: int = FP16_MIN_SIZE) -> int:
    """Rewrite ``path`` storing each fp32 initializer whose every value is exactly an fp16
    number in fp16, followed by a Cast back to fp32 (lossless: the graph computes the same).

    The exporter folds a ``.float()`` of an fp16 weight into an fp32 constant; this undoes
    that for weights kept in fp16 on purpose (``lowrank.half_factors``). An ordinary fp32
    weight is almost never fp16-exact in every value, so it stays as is. Returns the bytes
    saved. ONNX Runtime folds the Casts once when it loads the session.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    casts, saved = [], 0
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        a = numpy_helper.to_array(init)
        if a.size < min_size or not np.array_equal(a.astype(np.float16).astype(np.float32), a):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(a.astype(np.float16), f"{name}__fp16"))
        casts.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=onnx.TensorProto.FLOAT))
        saved += 2 * a.size
    if casts:
        nodes = casts + list(graph.node)  # the Casts first: the graph stays topologically sorted
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.save(model, str(path))
    return saved


INDEX_KINDS = ("flat", "sq8", "hnsw", "hnsw_sq8", "ivfpq_fs")


def choose_index(n: int, compact: bool = False) -> str:
    """Index kind for n candidates.

    Uncompressed: exact search while it is cheap, HNSW beyond. Compact (compressed bundles):
    an 8-bit scalar-quantised flat scan for small catalogues (4x smaller, scan still cheap),
    HNSW over SQ8 codes for medium ones, IVF-PQ fast-scan with SQ8 refinement for large ones.
    """
    if not compact:
        return "flat" if n <= 200_000 else "hnsw"
    if n <= 100_000:
        return "sq8"
    return "hnsw_sq8" if n <= 2_000_000 else "ivfpq_fs"


SQ8 = faiss.ScalarQuantizer.QT_8bit
SIMD_WIDTH = 16  # FAISS's SIMD scan of SQ / PQ codes only runs when D is a multiple of this


def _pad(d: int) -> int:
    return -(-d // SIMD_WIDTH) * SIMD_WIDTH


def _padded(d: int, make) -> faiss.Index:
    """``make(dp)`` over zero-padded vectors, queries padded inside the index.

    With D = dim + 1 (the bias slot) the SQ scan otherwise falls back to scalar code that
    is ~9x slower than a flat fp32 scan (measured: 4.5 ms vs 0.5 ms for 17.6k x 257).
    """
    dp = _pad(d)
    if dp == d:
        return make(d)
    return faiss.IndexPreTransform(faiss.RemapDimensionsTransform(d, dp, False), make(dp))


def build_index(vectors: np.ndarray, kind: str = "flat") -> faiss.Index:
    """Inner-product FAISS index over (N, D) float32 vectors; search parameters are stored in it."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "sq8":
        index = _padded(d, lambda dp: faiss.IndexScalarQuantizer(dp, SQ8, ip))
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, ip)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
    elif kind == "hnsw_sq8":
        inner = faiss.IndexHNSWSQ(_pad(d), SQ8, 32, ip)
        inner.hnsw.efConstruction = 80
        inner.hnsw.efSearch = 128
        index = _padded(d, lambda _dp: inner)
    elif kind == "ivfpq_fs":
        # 4-bit PQ fast-scan, 2 dims per sub-quantizer, re-ranked with SQ8 codes (Refine).
        dp = _pad(d)
        nlist = int(max(1, min(4 * np.sqrt(n), n // 39)))
        inner = faiss.index_factory(dp, f"IVF{nlist},PQ{dp // 2}x4fs,Refine(SQ8)", ip)
        faiss.extract_index_ivf(inner).nprobe = max(1, min(nlist, 32))
        inner.k_factor = 8
        index = _padded(d, lambda _dp: inner)
    else:
        raise ValueError(f"unknown index kind {kind!r} (one of {INDEX_KINDS})")
    if not index.is_trained:
        index.train(x)
    index.add(x)
    return index


def cold_start_lists(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Item indices by training popularity and user indices by training degree, best first."""
    pop = np.bincount(split.train_item, minlength=split.n_items)
    deg = np.bincount(split.friends_train.ravel(), minlength=split.n_users)
    items = np.argsort(-pop, kind="stable")[: min(COLD_START_LIST, split.n_items)]
    users = np.argsort(-deg, kind="stable")[: min(COLD_START_LIST, split.n_users)]
    return items.astype(np.int32), users.astype(np.int32)


def fresh_prior(
    onnx_path: str | Path,
    items: np.ndarray,
    split: Split,
    sample: int = PRIOR_USERS,
    seed: int = 0,
) -> FoldInPrior | None:
    """The fold-in prior of fresh items (socialrec.serving.fresh) for a bundle: the item rows
    and the ``content_vector`` of a sample of training users, computed by the exported ONNX
    tower itself (so the prior sees exactly what the server's tower gives) from their
    training history and friends, one user at a time as the server feeds it (summed weight
    per item, at most PRIOR_HISTORY items, the heaviest). Positive pairs: the sampled users'
    training pairs. None when no user has training history."""
    import onnxruntime as ort
    from socialrec.serving.engine import session_options

    users = np.unique(split.train_user)
    if not len(users):
        return None
    rng = np.random.default_rng(seed)
    if len(users) > sample:
        users = np.sort(rng.choice(users, sample, replace=False))
    order = np.argsort(split.train_user, kind="stable")
    tu, ti, tw = split.train_user[order], split.train_item[order], split.train_weight[order]
    starts = np.searchsorted(tu, users)
    ends = np.searchsorted(tu, users, side="right")
    fr = split.friends_train
    friends: dict[int, list[int]] = {}
    for a, b in fr.tolist() if len(fr) else []:
        friends.setdefault(a, []).append(b)
        friends.setdefault(b, []).append(a)
    sess = ort.InferenceSession(
        str(onnx_path), session_options(), providers=["CPUExecutionProvider"]
    )
    vecs, pos_u, pos_i = [], [], []
    for row, (u, a, b) in enumerate(
        zip(users.tolist(), starts.tolist(), ends.tolist(), strict=True)
    ):
        acc: dict[int, float] = {}
        for i, w in zip(ti[a:b].tolist(), tw[a:b].tolist(), strict=True):
            acc[i] = acc.get(i, 0.0) + float(w)
        hist = sorted(acc.items(), key=lambda p: -p[1])[:PRIOR_HISTORY]
        fl = friends.get(u, [])[:PRIOR_HISTORY]
        feeds = {
            "hist_ids": np.array([[i for i, _ in hist]], dtype=np.int64),
            "hist_w": np.array([[w for _, w in hist]], dtype=np.float32),
            "friend_ids": np.array([fl or [0]], dtype=np.int64),
            "friend_w": np.full((1, max(len(fl), 1)), 1.0 if fl else 0.0, dtype=np.float32),
        }
        (x,) = sess.run(["content_vector"], feeds)
        vecs.append(np.asarray(x[0], np.float32))
        pos_u += [row] * len(acc)
        pos_i += list(acc)
    return FoldInPrior.from_catalogue(np.stack(vecs), items, np.array(pos_u), np.array(pos_i))


def write_bundle(
    model: TwoTower | None,
    split: Split,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    out_dir: str | Path,
    meta: dict,
    index_kind: str | dict[str, str] | None = None,
    *,
    onnx_file: str | Path | None = None,
    items: np.ndarray | None = None,
    users: np.ndarray | None = None,
    fresh: dict | None = None,
) -> Path:
    """Write every bundle file, then the manifest with checksums (written last).

    The tower comes from ``model`` (exported here) or from a prepared ``onnx_file`` (e.g. a
    quantised graph); candidate vectors from ``model`` or precomputed ``items`` (I, D + 1)
    and ``users`` (U, D + 1). ``index_kind`` is one kind for both indexes, a per-side dict
    {"items": ..., "users": ...}, or None for :func:`choose_index`'s default. ``fresh``: the
    manifest's fold-in block (:func:`socialrec.serving.fresh.manifest_block` of the run; None:
    the defaults).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is not None:
        model = model.eval()
    if onnx_file is not None:
        shutil.copyfile(onnx_file, out / "user_tower.onnx")
    elif model is not None:
        export_onnx(model.user_tower, out / "user_tower.onnx")
    else:
        raise ValueError("write_bundle needs a model or an onnx_file")
    if items is None or users is None:
        if model is None:
            raise ValueError("write_bundle needs a model or precomputed item and user vectors")
        with torch.no_grad():
            items = model.item_vectors().numpy() if items is None else items  # (I, D + 1)
            users = model.user_vectors().numpy() if users is None else users  # (U, D + 1)
    if isinstance(index_kind, dict):
        kinds = dict(index_kind)
    else:
        kinds = {
            "items": index_kind or choose_index(len(items)),
            "users": index_kind or choose_index(len(users)),
        }
    faiss.write_index(build_index(items, kinds["items"]), str(out / "items.faiss"))
    faiss.write_index(build_index(users, kinds["users"]), str(out / "users.faiss"))
    write_ids(out / "item_ids.txt", item_ids)
    write_ids(out / "user_ids.txt", user_ids)
    pop_items, pop_users = cold_start_lists(split)
    np.save(out / "popular_items.npy", pop_items, allow_pickle=False)
    np.save(out / "popular_users.npy", pop_users, allow_pickle=False)
    prior = fresh_prior(out / "user_tower.onnx", items, split)
    (out / FRESH_PRIOR).unlink(missing_ok=True)
    if prior is not None:  # listed in the manifest (bundle.OPTIONAL_FILES) when written
        prior.save(out / FRESH_PRIOR)
    meta = {
        **meta,
        "dims": {"content": int(items.shape[1]), "friends": int(users.shape[1])},
        "counts": {"items": len(item_ids), "users": len(user_ids)},
        "index": kinds,
        "fresh": fresh if fresh is not None else manifest_block(None),
    }
    write_manifest(out, meta)
    return out


def bundle_meta(
    ds, split: Split, train_config: dict, variant: dict, metrics: dict, report: dict | None = None
) -> dict:
    """The manifest fields every bundle of a run shares (provenance, feature caps, metrics,
    the friend blend weight chosen on the run's validation split, from its ``report``)."""
    return {
        "friends": fof_manifest_block(report),
        "variant": variant,
        "dataset": {**ds.summary(), "fingerprint": ds.fingerprint()},
        "split": {"seed": split.seed, "sha256": split.sha256()},
        "features": {
            "max_history": train_config["max_history"],
            "max_friends": train_config["max_friends"],
        },
        "versions": versions(),
        "metrics": metrics,
    }


def versions() -> dict[str, str]:
    """Library versions the bundle was built with (the server checks what it can read)."""
    import onnx
    import onnxruntime

    return {
        "faiss": faiss.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
    }


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Bundle of the run's fp32 teacher (what `socialrec export` does)."""
    from socialrec.training.run import load_run
    from socialrec.training.train import load_checkpoint

    run = Path(run_dir)
    model, ck = load_checkpoint(run / "teacher.pt")
    ds, split, report = load_run(run)
    metrics = {
        "teacher_torch": {
            "content": report["content"].get("teacher"),
            "friends": report["friends"].get("teacher"),
        }
    }
    variant = {"name": "teacher-fp32", "techniques": []}
    meta = bundle_meta(ds, split, ck["train_config"], variant, metrics, report)
    return write_bundle(
        model,
        split,
        ds.user_ids,
        ds.item_ids,
        out_dir or run / "bundle",
        meta,
        fresh=manifest_block(run),
    )


def describe_bundle(path: Path) -> str:
    m = json.loads((path / "manifest.json").read_text())
    size = sum(f["bytes"] for f in m["files"].values())
    return f"bundle {m['bundle_version']} at {path}: {size / 1e6:.1f} MB, index {m['index']}"
