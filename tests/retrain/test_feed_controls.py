"""Feed controls through the real write path: dismissals, blocks, takedowns, stream bounds.

Events are written with FeatureStore's blocking methods (the server's scripts) into the real
Redis fixture, folded by `retrain.run`, and checked in the retraining run's reloaded data and
in the bundle it published. Writes that bypass the server go straight into the stream.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import redis
from socialrec.serving.rollout import current
from socialrec.serving.schema import GLOBAL_SHARD, Keys, event_id, shard_of
from socialrec.serving.store import FeatureStore
from socialrec.training.dataset import Dataset
from socialrec.training.run import load_run

from socialrec import retrain
from socialrec.retrain import RetrainConfig


def _cfg(base_run: Path, root: Path, store_config) -> RetrainConfig:
    # gate_margin 1.0: these tests are about the data, every candidate is published
    return RetrainConfig(
        run_dir=str(base_run),
        redis_url=store_config.url,
        bundles=str(root),
        namespace=store_config.namespace,
        gate_margin=1.0,
        threads=1,
    )


def _data(report: dict) -> tuple[Dataset, dict[tuple[str, str], float], set[frozenset[str]]]:
    """The retraining run's dataset reloaded from its TSV files, as weights and pairs."""
    ds, _, _ = load_run(Path(report["run_dir"]))
    u, i = ds.user_ids, ds.item_ids
    weights = {
        (u[a], i[b]): float(w)
        for a, b, w in zip(ds.inter_user, ds.inter_item, ds.inter_weight, strict=True)
    }
    return ds, weights, {frozenset((u[a], u[b])) for a, b in ds.friends}


def _bundle_items(root: Path, report: dict) -> tuple[list[str], list[str]]:
    """(catalogue, popular list) of the bundle a retrain published, as ids."""
    d = root / report["version"]
    ids = (d / "item_ids.txt").read_text().split("\n")[:-1]
    return ids, [ids[j] for j in np.load(d / "popular_items.npy").tolist()]


def _xadd(store_config, fields: dict[str, str]) -> str:
    """Append an entry straight to the event stream (the shard of its user, else the takedown
    shard), bypassing the server's checks; returns its event id."""
    shard = shard_of(fields["user"]) if "user" in fields else GLOBAL_SHARD
    r = redis.Redis.from_url(store_config.url, decode_responses=True)
    try:
        return event_id(r.xadd(Keys(store_config.namespace).stream(shard), fields), shard)
    finally:
        r.close()


def test_feed_controls_fold_and_a_takedown_persists_until_restored(
    base_run, root, store_config
) -> None:
    cfg = _cfg(base_run, root, store_config)
    base, _, _ = load_run(base_run)
    users = base.user_ids.tolist()
    (a0, b0), (a1, b1) = [(users[x], users[y]) for x, y in base.friends[:2].tolist()]
    base_i1 = int((base.item_ids[base.inter_item] == "i1").sum())
    assert base_i1 > 0 and "i1" in _bundle_items(root, {"version": current(root)})[1]
    with FeatureStore(store_config) as store:
        store.log_interaction("fc-user", "i5", 2.0, 1_000)
        store.log_interaction("fc-user", "i6", 1.0, 1_100)
        store.dismiss("fc-user", "i6", "", 1_200)  # drops the pair
        store.log_interaction("fc-user", "i1", 1.0, 1_300)
        store.item("remove", "i1", 1_400)  # takedown: i1 and its interactions leave
        store.add_friendship("fc-user", "u3", 1_500)
        store.block("block", "fc-user", "u3", 1_600)  # logs friend_remove, then block
        store.block("block", a0, b0, 1_700)  # a base pair Redis never held: no friend_remove
        store.dismiss(b1, "", a1, 1_800)  # a base pair: dropped from friend positives
    _xadd(store_config, {"type": "future_kind", "user": "fc-user", "ts": "1900"})

    r1 = json.loads(retrain.run(cfg).read_text())
    assert r1["published"] and r1["events"]["new"] == 11  # 10 written + the block's unfriend
    applied = r1["events"]["applied"]
    assert applied["removed_items"] == 1 and applied["item_removes"] == 1
    assert applied["interactions_dropped_by_takedowns"] == base_i1 + 1
    assert applied["interactions_dropped_by_dismissals"] == 1
    assert applied["friend_pairs_dropped_by_blocks"] == 1  # a0-b0 (fc-user-u3 went first)
    assert applied["friend_pairs_dropped_by_dismissals"] == 1
    assert applied["unknown_types"] == {"future_kind": 1} and applied["skipped"] == 1
    assert r1["events"]["removed_items"]["ids"] == ["i1"]
    assert Path(r1["events"]["removed_items"]["file"]).read_text() == "i1\n"
    assert any("taken down" in line for line in r1["events"]["summary"])
    assert any("future_kind" in line for line in r1["events"]["summary"])
    ds1, w1, p1 = _data(r1)
    assert "i1" not in ds1.item_ids.tolist() and not any(i == "i1" for _, i in w1)
    assert w1[("fc-user", "i5")] == 2.0 and ("fc-user", "i6") not in w1
    for pair in ((a0, b0), (a1, b1), ("fc-user", "u3")):
        assert frozenset(pair) not in p1
    catalogue, popular = _bundle_items(root, r1)
    with_rows = len(np.unique(base.inter_item))  # items with no row don't survive the TSV
    assert "i1" not in catalogue and "i1" not in popular and len(catalogue) == with_rows - 1

    # no new events: the takedown (and everything else) is applied again, nothing doubles
    r2 = json.loads(retrain.run(cfg).read_text())
    assert r2["events"]["new"] == 0 and r2["events"]["total_used"] == r1["events"]["total_used"]
    assert r2["events"]["applied"] == applied
    _, w2, p2 = _data(r2)
    assert w2 == w1 and p2 == p1
    assert "i1" not in _bundle_items(root, r2)[0]

    with FeatureStore(store_config) as store:
        store.item("restore", "i1", 2_000)
        store.log_interaction("fc-user", "i5", 1.0, 2_100)
    r3 = json.loads(retrain.run(cfg).read_text())
    assert r3["events"]["new"] == 2 and r3["events"]["applied"]["removed_items"] == 0
    assert r3["events"]["removed_items"]["ids"] == []
    ds3, w3, p3 = _data(r3)
    assert "i1" in ds3.item_ids.tolist() and "i1" in _bundle_items(root, r3)[0]
    assert w3[("fc-user", "i1")] == 1.0  # the restore brings back what the takedown dropped
    assert sum(1 for _, i in w3 if i == "i1") == base_i1 + 1
    assert w3[("fc-user", "i5")] == 3.0 and ("fc-user", "i6") not in w3  # 2 + 1, once
    for pair in ((a0, b0), (a1, b1), ("fc-user", "u3")):  # blocks and the dismissal hold
        assert frozenset(pair) not in p3


def test_weights_beyond_the_servers_bounds_merge_finite_and_reload(
    base_run, root, store_config
) -> None:
    """Two 3.4e38 weights written straight into the stream: float32 would sum them to inf."""
    for ts in ("1000", "2000"):
        _xadd(
            store_config,
            {"type": "interaction", "user": "big-user", "item": "i2", "weight": "3.4e38", "ts": ts},
        )
    report = json.loads(retrain.run(_cfg(base_run, root, store_config)).read_text())
    assert report["events"]["applied"]["clamped_weights"] == 1
    assert report["events"]["applied"]["interactions"] == 2
    ds, weights, _ = _data(report)  # the merged TSV reloads (load_run would raise otherwise)
    assert weights[("big-user", "i2")] == 1e9 and np.isfinite(ds.inter_weight).all()
