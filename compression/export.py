"""Export a trained two-tower model as a served bundle: ONNX user tower + FAISS indexes.

File in, file out: ``export_run(run_dir, out_dir)`` reads RUN_DIR/teacher.pt and the run's
split, writes a bundle (see serving/bundle.py for the contract) and returns its path.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import nn

from serving.bundle import TOWER_INPUTS, TOWER_OUTPUTS, write_ids, write_manifest
from training.model import TwoTower, UserTower, with_bias_slot
from training.split import Split

COLD_START_LIST = 1000  # popular items / well-connected users kept for cold start


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
    with warnings.catch_warnings():
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
    return path


def choose_index(n: int) -> str:
    """Exact search while it is cheap; HNSW beyond (a graph over the vectors, no training)."""
    return "flat" if n <= 200_000 else "hnsw"


def build_index(vectors: np.ndarray, kind: str = "flat") -> faiss.Index:
    """Inner-product FAISS index over (N, D) float32 vectors."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    d = x.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    index.add(x)
    return index


def cold_start_lists(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Item indices by training popularity and user indices by training degree, best first."""
    pop = np.bincount(split.train_item, minlength=split.n_items)
    deg = np.bincount(split.friends_train.ravel(), minlength=split.n_users)
    items = np.argsort(-pop, kind="stable")[: min(COLD_START_LIST, split.n_items)]
    users = np.argsort(-deg, kind="stable")[: min(COLD_START_LIST, split.n_users)]
    return items.astype(np.int32), users.astype(np.int32)


def write_bundle(
    model: TwoTower,
    split: Split,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    out_dir: str | Path,
    meta: dict,
    index_kind: str | None = None,
) -> Path:
    """Write every bundle file, then the manifest with checksums (written last)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    export_onnx(model.user_tower, out / "user_tower.onnx")
    with torch.no_grad():
        items = model.item_vectors().numpy()  # (I, D + 1)
        users = model.user_vectors().numpy()  # (U, D + 1)
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
    meta = {
        **meta,
        "dims": {"content": int(items.shape[1]), "friends": int(users.shape[1])},
        "counts": {"items": len(item_ids), "users": len(user_ids)},
        "index": kinds,
    }
    write_manifest(out, meta)
    return out


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Bundle of the run's fp32 teacher (what `socialrec export` does)."""
    from training.run import load_run
    from training.train import load_checkpoint

    run = Path(run_dir)
    model, ck = load_checkpoint(run / "teacher.pt")
    ds, split, report = load_run(run)
    meta = {
        "variant": {"name": "teacher-fp32", "techniques": []},
        "dataset": {**ds.summary(), "fingerprint": ds.fingerprint()},
        "split": {"seed": split.seed, "sha256": split.sha256()},
        "features": {
            "max_history": ck["train_config"]["max_history"],
            "max_friends": ck["train_config"]["max_friends"],
        },
        "metrics": {
            "teacher_torch": {
                "content": report["content"].get("teacher"),
                "friends": report["friends"].get("teacher"),
            }
        },
    }
    return write_bundle(model, split, ds.user_ids, ds.item_ids, out_dir or run / "bundle", meta)


def _summary(path: Path) -> str:
    m = json.loads((path / "manifest.json").read_text())
    size = sum(f["bytes"] for f in m["files"].values())
    return f"bundle {m['bundle_version']} at {path}: {size / 1e6:.1f} MB, index {m['index']}"
