"""`socialrec publish`: bulk-load a training run's interactions and friendships into Redis.

An offline command, not part of the server: it is the one place in ``serving/`` that imports
``training`` (lazily, inside :func:`run`), because only it needs to re-read a run's dataset.
The server and everything it imports stay free of ``training`` and torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from socialrec.serving.offline_store import OfflineStore
from socialrec.serving.store import StoreConfig


@dataclass(frozen=True)
class PublishConfig:
    run: str  # run directory written by `socialrec train`
    redis_url: str
    namespace: str = "socialrec"
    train_only: bool = False  # only the training part, so served evaluation matches the report
    flush: bool = False  # delete the namespace's features first (the event stream is kept)
    progress: bool = True
    cluster: bool = False  # redis_url names a node of a Redis Cluster


def run(cfg: PublishConfig) -> dict:
    """Load the run's data into the store and return (and print) the counts."""
    from socialrec.training.run import load_run  # offline only; see the module docstring

    ds, split, _report = load_run(cfg.run)
    if cfg.train_only:
        users, items, weights = split.train_user, split.train_item, split.train_weight
        pairs = split.friends_train
    else:
        users, items, weights = ds.inter_user, ds.inter_item, ds.inter_weight
        pairs = ds.friends
    ts = row_timestamps(ds, users, items)
    rows = _History(ds.user_ids[users], ds.item_ids[items], weights, ts)
    friend_pairs = list(
        zip(ds.user_ids[pairs[:, 0]].tolist(), ds.user_ids[pairs[:, 1]].tolist(), strict=True)
    )

    store_cfg = StoreConfig(url=cfg.redis_url, namespace=cfg.namespace, cluster=cfg.cluster)
    with OfflineStore(store_cfg) as store:
        flushed = store.flush() if cfg.flush else 0
        counts = store.bulk_load(rows, friend_pairs, progress=cfg.progress)
    counts = {"flushed_keys": flushed, **counts}
    part = "train split" if cfg.train_only else "all data"
    print(
        f"published {cfg.run} ({part}) to namespace {cfg.namespace!r}: "
        f"{counts['interactions']} interactions of {counts['history_users']} users "
        f"({counts['history_dropped']} dropped by the history cap), "
        f"{counts['friend_pairs']} friend pairs over {counts['friend_users']} users"
        + (f"; flushed {flushed} keys first" if cfg.flush else "")
    )
    return counts


def row_timestamps(ds, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Each (user, item) row's time from the dataset, or 0 when the dataset has none or the
    row has none (-1: a tsv row with an empty timestamp field, as retraining's merged files
    write for base rows without times)."""
    if ds.inter_ts is None:
        return np.zeros(len(users), dtype=np.int64)
    key_all = ds.inter_user.astype(np.int64) * ds.n_items + ds.inter_item
    order = np.argsort(key_all, kind="stable")
    key = users.astype(np.int64) * ds.n_items + items
    pos = np.minimum(np.searchsorted(key_all[order], key), len(order) - 1)
    if not np.array_equal(key_all[order][pos], key):
        raise ValueError(f"{ds.name}: split rows not found in the dataset's interactions")
    return np.maximum(ds.inter_ts[order[pos]].astype(np.int64), 0)


class _History:
    """(user, item, weight, ts) rows as plain Python values, with a length for the progress bar."""

    def __init__(self, users: np.ndarray, items: np.ndarray, w: np.ndarray, ts: np.ndarray):
        self.users, self.items, self.ts = users.tolist(), items.tolist(), ts.tolist()
        # via str: float32 0.3 is stored as "0.3", not "0.30000001192092896"
        self.w = [float(x) for x in np.asarray(w, dtype=np.float32).astype(str)]

    def __len__(self) -> int:
        return len(self.users)

    def __iter__(self) -> Iterator[tuple[str, str, float, int]]:
        return zip(self.users, self.items, self.w, self.ts, strict=True)
