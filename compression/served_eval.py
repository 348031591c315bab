"""Score a bundle through the served path: ONNX Runtime user tower + FAISS search.

Same protocol as :func:`training.metrics.evaluate`: tower inputs from the split's train
part, candidates ranked by inner product, train positives (and self for friends) removed,
Recall/NDCG@10/20 over users with a test positive. FAISS returns a top-k list rather than
all scores, so k = 20 + the user's train positives (+1 for self) is searched: after the
removal at least 20 candidates remain, as in a full ranking.

One function scores every bundle: a bundle of the split's own dataset (compression), or one
built on another dataset (the live bundle in the retraining gate), through an external-id
mapping; see :func:`served_evaluate`.
"""

from __future__ import annotations

import time
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
from socialrec.serving.bundle import TOWER_INPUTS, load_manifest, read_ids
from socialrec.training.dataset import csr_grouped, csr_rows
from socialrec.training.features import Features
from socialrec.training.metrics import KS, Graph, absent, absent_reason, recall_ndcg
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
    to_split: np.ndarray | None = None,
) -> np.ndarray:
    """Top-k candidate ids of the served list: search, drop train positives (+ self).  (B, k), -1 pads

    ``to_split`` maps the index's ids to the split's (-1: not in the split, dropped) when the
    bundle was built on another dataset; None: the index's ids are the split's.
    """
    extra = min(int(train.counts()[users].max(initial=0)), K_EXTRA_CAP) + int(exclude_self)
    _, ids = index.search(u, min(index.ntotal, k + extra))  # (B, k')
    if to_split is not None:
        ids = np.where(ids >= 0, to_split[np.maximum(ids, 0)], -1)
    drop = ids < 0  # (B, k') missing results (approximate indexes) or unknown to the split
    width = max(int(ids.max(initial=-1)), int(train.indices.max(initial=-1)))
    if exclude_self:
        width = max(width, int(users.max(initial=-1)))
    seen = np.zeros((len(users), width + 1), dtype=bool)
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
    to_split: np.ndarray | None = None,
) -> np.ndarray:
    """(B, k) hit matrix of the served list against the test positives."""
    top = served_topk(index, u, users, train, exclude_self, k, to_split)  # (B, k)
    width = max(int(top.max(initial=-1)), int(test.indices.max(initial=-1))) + 1
    rel = np.zeros((len(users), width), dtype=bool)
    rows, cols = test.batch(users)
    rel[rows, cols] = True
    return np.take_along_axis(rel, np.maximum(top, 0), axis=1) & (top >= 0)


def bundle_index_of(
    bundle_dir: str | Path, user_ids: np.ndarray, item_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(U,), (I,) int64: each external user and item id's index in the bundle, -1 if unknown."""
    d = Path(bundle_dir)
    b_users = {s: k for k, s in enumerate(read_ids(d / "user_ids.txt"))}
    b_items = {s: k for k, s in enumerate(read_ids(d / "item_ids.txt"))}
    u_to_b = np.array([b_users.get(s, -1) for s in user_ids.tolist()], np.int64)
    i_to_b = np.array([b_items.get(s, -1) for s in item_ids.tolist()], np.int64)
    return u_to_b, i_to_b


def _inverse(to_b: np.ndarray, n_b: int) -> np.ndarray:
    """(n_b,) split index of each bundle index, -1 where the split has none."""
    back = np.full(n_b, -1, np.int64)
    known = np.flatnonzero(to_b >= 0)
    back[to_b[known]] = known
    return back


def mapped_features(
    split: Split,
    u_to_b: np.ndarray,
    i_to_b: np.ndarray,
    n_items_b: int,
    max_history: int,
    max_friends: int,
) -> Features:
    """Tower inputs of the split's users in the bundle's id space (unknown ids left out).

    Rows are split users, columns bundle indices: history items and friends the bundle does
    not know are dropped, as the server drops what its bundle cannot embed.
    """
    order = np.lexsort((-split.train_weight, split.train_user))  # heaviest first, as training
    u, i, w = split.train_user[order], i_to_b[split.train_item[order]], split.train_weight[order]
    keep = i >= 0
    indptr, items, weight = csr_grouped(split.n_users, u[keep], i[keep], w[keep])
    a, b = split.friends_train[:, 0], split.friends_train[:, 1]
    fu, fv = np.concatenate([a, b]), u_to_b[np.concatenate([b, a])]  # both directions
    keep = fv >= 0
    f_indptr, f_users, _ = csr_rows(split.n_users, fu[keep], fv[keep])
    return Features(
        split.n_users,
        n_items_b,
        indptr,
        items,
        weight,
        f_indptr,
        f_users,
        max_history,
        max_friends,
    )


def served_evaluate(
    bundle_dir: str | Path,
    split: Split,
    max_users: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    user_ids: np.ndarray | None = None,
    item_ids: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Content and friend Recall/NDCG@10/20 of a bundle, scored through ONNX Runtime + FAISS.

    Without ids the bundle is one of the split's own dataset (its indices are the split's).
    With ``user_ids``/``item_ids`` (the split's external ids) it may come from another dataset
    (the live bundle in the retraining gate): split indices are translated to the bundle's by
    external id, history and friends it does not know are left out of the tower input (as the
    server does), candidates map back, and test positives it cannot rank count as misses.
    A task without test positives on ``split`` is :func:`~training.metrics.absent`.
    """
    sm = ServedModel(bundle_dir)
    n_items_b, n_users_b = sm.items.ntotal, sm.users.ntotal
    if user_ids is None or item_ids is None:
        u_to_b = np.where(np.arange(split.n_users) < n_users_b, np.arange(split.n_users), -1)
        i_to_b = np.where(np.arange(split.n_items) < n_items_b, np.arange(split.n_items), -1)
    else:
        u_to_b, i_to_b = bundle_index_of(bundle_dir, user_ids, item_ids)
    f = sm.manifest.get("features", {})
    feats = mapped_features(
        split, u_to_b, i_to_b, n_items_b, f.get("max_history", 256), f.get("max_friends", 256)
    )
    tasks = {
        "content": (
            Graph(split.n_users, split.train_user, split.train_item),
            Graph(split.n_users, split.test_user, split.test_item),
            sm.items,
            _inverse(i_to_b, n_items_b),
        ),
        "friends": (
            Graph.undirected(split.n_users, split.friends_train),
            Graph.undirected(split.n_users, split.friends_test),
            sm.users,
            _inverse(u_to_b, n_users_b),
        ),
    }
    out = {}
    for task, (train, test, index, to_split) in tasks.items():
        why = absent_reason(split, task)
        if why:
            out[task] = absent(why)
            continue
        users = np.flatnonzero(test.counts() > 0)
        if max_users is not None and len(users) > max_users:
            rng = np.random.default_rng(seed)
            users = np.sort(rng.choice(users, max_users, replace=False))
        sums = {f"{m}@{k}": 0.0 for m in ("recall", "ndcg") for k in KS}
        for start in range(0, len(users), batch_size):
            b = users[start : start + batch_size]
            u_c, u_f = sm.vectors(tower_inputs(feats, b))
            u = u_c if task == "content" else u_f
            hits = served_hits(index, u, b, train, test, task == "friends", max(KS), to_split)
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
