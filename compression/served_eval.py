"""Score a bundle through the served path: ONNX Runtime user tower + FAISS search.

Same protocol as :func:`training.metrics.evaluate`: tower inputs from the split's train
part, candidates ranked by inner product, train positives (and self for friends) removed,
Recall/NDCG@10/20 over users with a test positive. FAISS returns a top-k list rather than
all scores, so k = 20 + the user's train positives (+1 for self) is searched: after the
removal at least 20 candidates remain, as in a full ranking.
"""

from __future__ import annotations

import time
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
from socialrec.serving.bundle import TOWER_INPUTS, load_manifest
from socialrec.training.features import Features
from socialrec.training.metrics import KS, Graph, recall_ndcg
from socialrec.training.split import Split

K_EXTRA_CAP = 4096  # at most this many train positives are searched past (none in practice)


class ServedModel:
    """A bundle's ONNX session and FAISS indexes, single-threaded like the server."""

    def __init__(self, bundle_dir: str | Path, threads: int = 1) -> None:
        d = Path(bundle_dir)
        self.manifest = load_manifest(d)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(d / "user_tower.onnx"), so, providers=["CPUExecutionProvider"]
        )
        self.items = faiss.read_index(str(d / "items.faiss"))
        self.users = faiss.read_index(str(d / "users.faiss"))
        self.bytes = sum((d / n).stat().st_size for n in SERVED_FILES)

    def vectors(self, inputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(hist_ids, hist_w, friend_ids, friend_w) -> content and friend query vectors.  (B, D + 1)"""
        feeds = dict(zip(TOWER_INPUTS, inputs, strict=True))
        u_c, u_f = self.session.run(None, feeds)
        return np.ascontiguousarray(u_c, np.float32), np.ascontiguousarray(u_f, np.float32)

    def features(self, split: Split) -> Features:
        f = self.manifest.get("features", {})
        return Features.from_split(split, f.get("max_history", 256), f.get("max_friends", 256))


SERVED_FILES = ("user_tower.onnx", "items.faiss", "users.faiss")


def bundle_bytes(bundle_dir: str | Path) -> int:
    """Everything the server holds for a variant: ONNX tower + items index + users index."""
    return sum((Path(bundle_dir) / n).stat().st_size for n in SERVED_FILES)


def tower_inputs(feats: Features, users: np.ndarray) -> tuple[np.ndarray, ...]:
    hi, hw = feats.history(users)
    fi, fw = feats.friends(users)
    return hi, hw, fi, fw


def served_topk(
    index: faiss.Index,
    u: np.ndarray,  # (B, D + 1) queries
    users: np.ndarray,  # (B,)
    train: Graph,
    exclude_self: bool,
    k: int,
) -> np.ndarray:
    """Top-k candidate ids of the served list: search, drop train positives (+ self).  (B, k), -1 pads"""
    n = index.ntotal
    extra = min(int(train.counts()[users].max(initial=0)), K_EXTRA_CAP) + int(exclude_self)
    _, ids = index.search(u, min(n, k + extra))  # (B, k')
    drop = ids < 0  # (B, k') missing results (approximate indexes)
    seen = np.zeros((len(users), n), dtype=bool)
    rows, cols = train.batch(users)
    seen[rows, cols] = True
    if exclude_self:
        seen[np.arange(len(users)), users] = True
    safe = np.where(drop, 0, ids)
    drop |= np.take_along_axis(seen, safe, axis=1)
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept candidates first, in rank order
    kept = ~np.take_along_axis(drop, order, axis=1)  # (B, k)
    top = np.where(kept, np.take_along_axis(safe, order, axis=1), -1)
    if top.shape[1] < k:
        top = np.pad(top, ((0, 0), (0, k - top.shape[1])), constant_values=-1)
    return top


def served_hits(
    index: faiss.Index,
    u: np.ndarray,
    users: np.ndarray,
    train: Graph,
    test: Graph,
    exclude_self: bool,
    k: int,
) -> np.ndarray:
    """(B, k) hit matrix of the served list against the test positives."""
    top = served_topk(index, u, users, train, exclude_self, k)  # (B, k)
    rel = np.zeros((len(users), index.ntotal), dtype=bool)
    rows, cols = test.batch(users)
    rel[rows, cols] = True
    return np.take_along_axis(rel, np.maximum(top, 0), axis=1) & (top >= 0)


def served_evaluate(
    bundle_dir: str | Path,
    split: Split,
    max_users: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Content and friend Recall/NDCG@10/20 of a bundle, scored through ONNX Runtime + FAISS."""
    sm = ServedModel(bundle_dir)
    feats = sm.features(split)
    graphs = {
        "content": (
            Graph(split.n_users, split.train_user, split.train_item),
            Graph(split.n_users, split.test_user, split.test_item),
        ),
        "friends": (
            Graph.undirected(split.n_users, split.friends_train),
            Graph.undirected(split.n_users, split.friends_test),
        ),
    }
    out = {}
    for task, (train, test) in graphs.items():
        users = np.flatnonzero(test.counts() > 0)
        if max_users is not None and len(users) > max_users:
            rng = np.random.default_rng(seed)
            users = np.sort(rng.choice(users, max_users, replace=False))
        index = sm.items if task == "content" else sm.users
        sums = {f"{m}@{k}": 0.0 for m in ("recall", "ndcg") for k in KS}
        for start in range(0, len(users), batch_size):
            b = users[start : start + batch_size]
            u_c, u_f = sm.vectors(tower_inputs(feats, b))
            u = u_c if task == "content" else u_f
            hits = served_hits(index, u, b, train, test, task == "friends", max(KS))
            for k in KS:
                r, nd = recall_ndcg(hits, test.counts()[b], k)
                sums[f"recall@{k}"] += float(r.sum())
                sums[f"ndcg@{k}"] += float(nd.sum())
        out[task] = {key: v / max(len(users), 1) for key, v in sums.items()}
    return out


def us_per_query(
    bundle_dirs: list[str | Path],
    split: Split,
    n_queries: int = 200,
    k: int = 20,
    seed: int = 0,
) -> list[float]:
    """Median microseconds of one batch-1 tower run + one k=20 content search, single thread.

    Bundles are timed side by side, query by query in turn, so the noise of a shared machine
    falls on every bundle alike and the ratios between them hold.
    """
    faiss.omp_set_num_threads(1)
    models = [ServedModel(d, threads=1) for d in bundle_dirs]
    users = np.random.default_rng(seed).choice(split.n_users, n_queries, replace=True)
    inputs = []
    for sm in models:
        feats = sm.features(split)
        inputs.append([tower_inputs(feats, users[i : i + 1]) for i in range(n_queries)])
    times = np.zeros((len(models), n_queries))
    for i in range(-10, n_queries):  # 10 warm-up rounds
        for j, sm in enumerate(models):
            x = inputs[j][max(i, 0)]
            t0 = time.perf_counter()
            u_c, _ = sm.vectors(x)
            sm.items.search(u_c, k)
            if i >= 0:
                times[j, i] = time.perf_counter() - t0
    return [float(t) for t in np.median(times, axis=1) * 1e6]
