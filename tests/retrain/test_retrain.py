"""The retraining job: events consumed exactly once, crash + rerun, and the quality gate."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from socialrec.serving.rollout import current, history
from socialrec.serving.store import FeatureStore
from socialrec.training.run import load_run

from socialrec import retrain
from socialrec.retrain import EVENTS, STATE, RetrainConfig, read_events


def _cfg(base_run: Path, root: Path, store_config, **kw) -> RetrainConfig:
    return RetrainConfig(
        run_dir=str(base_run),
        redis_url=store_config.url,
        bundles=str(root),
        namespace=store_config.namespace,
        threads=1,
        **kw,
    )


def _weights(run_dir: Path) -> dict[tuple[str, str], float]:
    ds, _, _ = load_run(run_dir)
    return {
        (ds.user_ids[u], ds.item_ids[i]): float(w)
        for u, i, w in zip(ds.inter_user, ds.inter_item, ds.inter_weight, strict=True)
    }


def test_events_consumed_once_across_runs(base_run, root, store_config) -> None:
    cfg = _cfg(base_run, root, store_config, gate_margin=1.0)  # this test is about events
    with FeatureStore(store_config) as store:
        store.log_interaction("brand-new", "0", 2.0, 1_000)
        store.log_interaction("brand-new", "0", 3.0, 2_000)
        store.add_friendship("brand-new", "1", 3_000)
    r1 = json.loads(retrain.run(cfg).read_text())
    assert r1["events"]["new"] == 3 and r1["events"]["total_used"] == 3
    assert _weights(Path(r1["run_dir"]))[("brand-new", "0")] == 5.0
    with FeatureStore(store_config) as store:
        last = store.log_interaction("brand-new", "0", 1.0, 4_000)
    r2 = json.loads(retrain.run(cfg).read_text())
    # only the new event is read from the stream; all four feed the from-scratch retrain
    assert r2["events"]["new"] == 1 and r2["events"]["total_used"] == 4
    assert r2["events"]["cursor_before"] == r1["events"]["cursor_after"]
    assert _weights(Path(r2["run_dir"]))[("brand-new", "0")] == 6.0
    sid, shard = last.split("@")
    assert json.loads((root / STATE).read_text())["cursor"][shard] == sid
    assert r1["published"] and r2["published"] and current(root) == r2["version"]
    assert [e["action"] for e in history(root)] == ["publish", "retrain", "retrain"]


@pytest.mark.parametrize("backend", ["single", pytest.param("cluster", marks=pytest.mark.slow)])
def test_consume_reads_every_shard_once(request, tmp_path, store_config, backend: str) -> None:
    """The per-shard cursor: entries of many shards, in pages smaller than a shard holds, are
    each consumed once; a shard written after others were read is read from where it was."""
    if backend == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        store_config = replace(store_config, url=cluster.url, cluster=True)
    cfg = replace(  # consuming needs no base run
        _cfg(tmp_path / "unused", tmp_path, store_config),
        page=2,
        redis_cluster=store_config.cluster,
    )
    users = [f"user-{i}" for i in range(20)]
    with FeatureStore(store_config) as store:
        ids = [store.log_interaction(u, "0", 1.0, t) for t in range(3) for u in users]
        ids.append(store.item("remove", "0", 5))
        assert len({e.split("@")[1] for e in ids}) > 10  # many shards
        n, cursor = retrain.consume(cfg, tmp_path, {})
        assert n == len(ids)
        assert sorted(e for e, _ in retrain.read_events(tmp_path)) == sorted(ids)
        late = store.log_interaction(users[0], "1", 1.0, 9)  # an already-read shard moves on
        # twice from the same cursor (a crash before the checkpoint): read again, deduplicated
        assert retrain.consume(cfg, tmp_path, cursor)[0] == 1
        n, cursor = retrain.consume(cfg, tmp_path, cursor)
        assert n == 1 and retrain.consume(cfg, tmp_path, cursor)[0] == 0
    assert sorted(e for e, _ in retrain.read_events(tmp_path)) == sorted([*ids, late])


def test_crash_after_append_then_rerun(base_run, root, store_config, monkeypatch) -> None:
    cfg = _cfg(base_run, root, store_config, gate_margin=1.0)
    with FeatureStore(store_config) as store:
        store.log_interaction("crash-user", "0", 2.0, 1_000)
        store.add_friendship("crash-user", "1", 2_000)

    def crash() -> None:
        raise RuntimeError("simulated crash after events.jsonl append, before state.json")

    monkeypatch.setattr(retrain, "after_consume", crash)
    live = current(root)
    with pytest.raises(RuntimeError, match="simulated crash"):
        retrain.run(cfg)
    assert not (root / STATE).exists() and current(root) == live
    assert len((root / EVENTS).read_text().splitlines()) == 2
    with (root / EVENTS).open("a") as f:
        f.write('{"id": "9-9", "fields": {"type": "interac')  # killed mid-write: no newline
    with FeatureStore(store_config) as store:
        store.log_interaction("crash-user", "0", 1.0, 3_000)  # arrives while it is down
    monkeypatch.setattr(retrain, "after_consume", None)
    report = json.loads(retrain.run(cfg).read_text())
    # the rerun re-read the first two entries (file now holds them twice) and the third
    assert len((root / EVENTS).read_text().splitlines()) == 5
    assert len(read_events(root)) == 3
    assert report["events"]["total_used"] == 3
    assert _weights(Path(report["run_dir"]))[("crash-user", "0")] == 3.0  # 2 + 1, not 2 + 2 + 1
    ds, _, _ = load_run(Path(report["run_dir"]))
    assert "crash-user" in ds.user_ids.tolist()


def test_worse_model_is_refused_and_current_stays(base_run, root, store_config) -> None:
    """An untrained model (epochs=0) must fail the gate against the live trained bundle."""
    cfg = replace(_cfg(base_run, root, store_config), epochs=0, gate_margin=0.02)
    live = current(root)
    report_path = retrain.run(cfg)
    report = json.loads(report_path.read_text())
    assert not report["published"], report["gate"]
    assert current(root) == live and report["live_before"] == live
    assert not (root / report["version"]).exists()  # refused candidates never enter ROOT
    checks = report["gate"]["recall@20"]
    assert any(c["candidate"] < c["live"] - 0.02 for c in checks.values()), checks
    assert report_path.name == f"retrain-{report['version']}.json"
    assert (root / STATE).exists()  # the events were consumed; the next run uses them too


def test_compress_config_rebuilt_from_the_base_runs_json(tmp_path: Path) -> None:
    from socialrec.training.distill import DistillConfig

    from socialrec.retrain import compress_config

    saved = {
        "run_dir": "/elsewhere",
        "quick": False,
        "min_retention": 0.9,
        "student_dims": [32],
        "distill": {"temperature": 3.0, "kd_weight": 0.5, "top_m": None},
        "a_field_from_an_older_version": 1,
        "progress": True,
    }
    cc = compress_config(saved, tmp_path, "same", threads=1)
    assert cc.run_dir == str(tmp_path) and cc.min_retention == 0.9 and not cc.quick
    assert cc.student_dims == (32,) and cc.distill == DistillConfig(3.0, 0.5, None)
    assert compress_config(saved, tmp_path, "quick").quick
