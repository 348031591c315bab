"""The retraining gate compares only the tasks the gate split can score."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from socialrec.serving.rollout import current
from socialrec.serving.store import FeatureStore
from socialrec.training.data import DataConfig
from socialrec.training.train import TrainConfig

from socialrec import retrain
from socialrec.retrain import RetrainConfig, gate

NO_FRIENDS = "no friend pairs in the dataset"
FAST = TrainConfig(dim=16, epochs=6, batch_size=128, lr=5e-3, patience=4, eval_every=2, threads=1)


def _m(r20: float) -> dict:
    return {"recall@10": r20 / 2, "recall@20": r20, "ndcg@10": r20 / 3, "ndcg@20": r20 / 2}


ABSENT = {"absent": True, "reason": NO_FRIENDS}


def test_gate_compares_content_only_when_friends_are_absent() -> None:
    live = {"content": _m(0.30), "friends": ABSENT}
    ok = gate({"content": _m(0.29), "friends": ABSENT}, live, 0.02)
    assert ok["passed"] and set(ok["recall@20"]) == {"content"}
    assert ok["absent"] == {"friends": NO_FRIENDS}
    assert "compared ['content'] only" in ok["reason"]
    bad = gate({"content": _m(0.27), "friends": ABSENT}, live, 0.02)
    assert not bad["passed"] and bad["reason"].startswith("worse on ['content']")
    assert bad["recall@20"]["content"] == {"candidate": 0.27, "live": 0.30, "passed": False}


def test_gate_with_both_tasks_present_is_unchanged() -> None:
    live = {"content": _m(0.30), "friends": _m(0.30)}
    v = gate({"content": _m(0.30), "friends": _m(0.25)}, live, 0.02)
    assert not v["passed"] and v["reason"] == "worse on ['friends']"
    assert set(v["recall@20"]) == {"content", "friends"} and v["absent"] == {}
    v = gate({"content": _m(0.29), "friends": _m(0.29)}, live, 0.02)
    assert v["passed"] and v["reason"] == "not worse than live by more than the margin"


def test_gate_without_any_task_to_compare_fails_and_first_publish_passes() -> None:
    nothing = {"content": {"absent": True, "reason": "none held out"}, "friends": ABSENT}
    v = gate(nothing, nothing, 0.02)
    assert not v["passed"] and v["recall@20"] == {}
    assert v["reason"].startswith("no task to compare")
    first = gate({"content": _m(0.3), "friends": ABSENT}, None, 0.02)
    assert first["passed"] and first["absent"] == {"friends": NO_FRIENDS}


@pytest.fixture(scope="module")
def no_friends_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base run on interactions only (tsv, no friends file) and its fp32 bundle (~5 s)."""
    from socialrec.compression.export import export_run
    from socialrec.training.run import RunConfig, run
    from socialrec.training.synthetic import SyntheticConfig, generate

    d = tmp_path_factory.mktemp("nofriends")
    ds = generate(SyntheticConfig(n_users=200, n_items=150, n_interactions=3000, seed=3))
    rows = zip(
        ds.inter_user.tolist(), ds.inter_item.tolist(), ds.inter_weight.tolist(), strict=True
    )
    inter = d / "interactions.tsv"
    inter.write_text("user\titem\tweight\n" + "".join(f"u{u}\ti{i}\t{w!r}\n" for u, i, w in rows))
    data = DataConfig(dataset="tsv", interactions=str(inter))
    out = run(RunConfig(out=str(d / "run"), data=data, train=FAST, progress=False))
    export_run(out)
    return out


def _cfg(base: Path, root: Path, store_config, **kw) -> RetrainConfig:
    from socialrec.serving.rollout import publish_bundle

    publish_bundle(root, base / "bundle")
    return RetrainConfig(
        run_dir=str(base),
        redis_url=store_config.url,
        bundles=str(root),
        namespace=store_config.namespace,
        threads=1,
        **kw,
    )


def test_retrain_without_friends_gates_on_content(
    no_friends_base: Path, tmp_path: Path, store_config
) -> None:
    """Through `retrain.run`: friends are absent in both bundles' served metrics and in the
    verdict; a candidate within the margin on content is published."""
    cfg = _cfg(no_friends_base, tmp_path / "bundles", store_config, gate_margin=1.0)
    with FeatureStore(store_config) as store:
        store.log_interaction("u1", "i3", 2.0, 1_000)
    report = json.loads(retrain.run(cfg).read_text())
    for side in ("candidate", "live"):
        assert report["metrics"][side]["friends"] == ABSENT
        assert report["metrics"][side]["content"]["recall@20"] > 0.0
    assert report["gate"]["absent"] == {"friends": NO_FRIENDS}
    assert set(report["gate"]["recall@20"]) == {"content"}
    assert report["published"] and current(Path(cfg.bundles)) == report["version"]


def test_retrain_without_friends_refuses_a_worse_content_model(
    no_friends_base: Path, tmp_path: Path, store_config
) -> None:
    """An untrained candidate (epochs=0) fails on content; friends do not count as a pass."""
    root = tmp_path / "bundles"
    cfg = replace(_cfg(no_friends_base, root, store_config), epochs=0, gate_margin=0.02)
    live = current(root)
    report = json.loads(retrain.run(cfg).read_text())
    assert not report["published"], report["gate"]
    assert report["gate"]["reason"].startswith("worse on ['content']")
    assert set(report["gate"]["recall@20"]) == {"content"}
    assert current(root) == live
