"""`socialrec publish`: a run's data (all of it, or only the train split) lands in Redis."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import redis

pytest.importorskip("torch")  # publish re-reads the run through training/ (offline command)

from socialrec.serving.offline_store import OfflineStore  # noqa: E402
from socialrec.serving.publish import PublishConfig, run  # noqa: E402
from socialrec.serving.store import FeatureStore, StoreConfig  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """A run directory with just what load_run needs (run.json, report.json), no training."""
    from socialrec.training.data import DataConfig
    from socialrec.training.run import RunConfig, prepare

    cfg = RunConfig(
        data=DataConfig(synthetic_users=120, synthetic_items=80, synthetic_interactions=1500)
    )
    ds, split = prepare(cfg)
    out = tmp_path_factory.mktemp("run")
    (out / "run.json").write_text(json.dumps(asdict(cfg)))
    (out / "report.json").write_text(json.dumps({"split": {"sha256": split.sha256()}}))
    return out, ds, split


def _history_of(ds, users, items, weights, user: int) -> dict[str, float]:
    sel = users == user
    return {
        ds.item_ids[i]: float(np.float32(w)) for i, w in zip(items[sel], weights[sel], strict=True)
    }


def test_publish_all_then_train_only(tiny_run, redis_server, redis_namespace: str) -> None:
    out, ds, split = tiny_run
    cfg = PublishConfig(run=str(out), redis_url=redis_server.url, namespace=redis_namespace)
    counts = run(PublishConfig(**{**asdict(cfg), "progress": False}))
    assert counts["interactions"] == ds.n_interactions
    assert counts["friend_pairs"] == counts["friend_pairs_new"] == ds.n_friend_pairs

    u = int(np.bincount(ds.inter_user).argmax())  # the most active user
    user = ds.user_ids[u]
    with FeatureStore(StoreConfig(url=redis_server.url, namespace=redis_namespace)) as s:
        feats = s.read(user)
        expect = _history_of(ds, ds.inter_user, ds.inter_item, ds.inter_weight, u)
        assert len(feats.history) == min(len(expect), 256)
        for item, w in feats.history:
            assert w == pytest.approx(expect[item], rel=1e-6)  # float32 weights via str
        ts = [int(t) for t in ds.inter_ts[ds.inter_user == u]]
        assert len(ts) <= 256  # so the history order below is the full ts order
        raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
        got_ts = [raw.zscore(s.keys.user("h", user), i) for i, _ in feats.history]
        assert got_ts == sorted(got_ts, reverse=True) and max(got_ts) == max(ts)
        n_friends = int((ds.friends == u).sum())
        assert len(feats.friends) == n_friends

    counts = run(
        PublishConfig(
            run=str(out),
            redis_url=redis_server.url,
            namespace=redis_namespace,
            train_only=True,
            flush=True,
            progress=False,
        )
    )
    assert counts["flushed_keys"] > 0
    assert counts["interactions"] == len(split.train_user)
    assert counts["friend_pairs"] == len(split.friends_train)
    with FeatureStore(StoreConfig(url=redis_server.url, namespace=redis_namespace)) as s:
        expect = _history_of(ds, split.train_user, split.train_item, split.train_weight, u)
        assert {i for i, _ in s.read(user).history} == set(expect)
    with OfflineStore(StoreConfig(url=redis_server.url, namespace=redis_namespace)) as off:
        assert off.events() == []


def test_publish_missing_run_is_a_clear_error(redis_server, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a training run directory"):
        run(PublishConfig(run=str(tmp_path), redis_url=redis_server.url, progress=False))


def test_rows_without_a_time_publish_at_time_zero() -> None:
    """A tsv row with an empty timestamp field (time -1 in the dataset, as retraining's merged
    files hold for base rows without times) publishes at 0, which the store accepts, like a
    dataset without times; the other rows keep theirs."""
    from types import SimpleNamespace

    from socialrec.serving.publish import row_timestamps

    ds = SimpleNamespace(
        name="t",
        n_items=3,
        inter_user=np.array([0, 0, 1]),
        inter_item=np.array([0, 2, 1]),
        inter_ts=np.array([1_700_000_000_000, -1, 5]),
    )
    ts = row_timestamps(ds, np.array([1, 0, 0]), np.array([1, 2, 0]))
    assert ts.tolist() == [5, 0, 1_700_000_000_000]
