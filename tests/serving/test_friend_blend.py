"""The friend blend as served: the run's report row, the bundle's weight, and the engine's
ranking equal to the blend training scored (on the session's small trained run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from socialrec.training.baselines import friend_matrix
from socialrec.training.fof_blend import FOF_WEIGHTS, blended


@pytest.fixture(scope="module")
def friend_run(small_bundle: Path) -> Path:
    """The run directory behind the session's small bundle (RUN/bundle)."""
    return small_bundle.parent


def test_run_reports_the_served_blend_and_the_bundle_carries_its_weight(friend_run) -> None:
    from socialrec.serving.engine import Engine, EngineConfig
    from socialrec.training.run import SERVED_FRIENDS, format_table

    report = json.loads((friend_run / "report.json").read_text())
    choice = report["teacher"]["train_log"]["fof_weight"]
    assert choice["chosen"] in FOF_WEIGHTS
    assert choice["val_recall@20"][str(choice["chosen"])] == max(choice["val_recall@20"].values())
    served = report["friends"][SERVED_FRIENDS]
    assert 0.0 <= served["recall@20"] <= 1.0
    assert SERVED_FRIENDS in format_table(report)

    manifest = json.loads((friend_run / "bundle" / "manifest.json").read_text())
    assert manifest["friends"]["fof_weight"] == choice["chosen"]
    engine = Engine.load(friend_run / "bundle")
    assert engine.fof_weight == choice["chosen"]
    assert Engine.load(friend_run / "bundle", config=EngineConfig(fof_weight=3.5)).fof_weight == 3.5


def test_engine_ranks_friends_as_training_scored_the_blend(friend_run) -> None:
    """The served top 10 (tower + ANN + friends-of-friends, flat index) is the top 10 of the
    blend training scored, for users with friends: the report's row is what the server does."""
    from socialrec.serving.engine import Engine, EngineConfig
    from socialrec.training.features import Features
    from socialrec.training.run import load_run
    from socialrec.training.train import Scorer, load_checkpoint

    ds, split, _ = load_run(friend_run)
    model, _ = load_checkpoint(friend_run / "teacher.pt")
    w = 1.5
    engine = Engine.load(friend_run / "bundle", config=EngineConfig(fof_weight=w))
    score = blended(Scorer(model, Features.from_split(split)).friends, split, w)
    a = friend_matrix(split).tocsr()
    names = [str(x) for x in ds.user_ids]
    items = [str(x) for x in ds.item_ids]
    users = [u for u in range(split.n_users) if a[u].nnz][:25]
    agree = []
    for u in users:
        s = score(np.array([u]))[0]
        friends = a[u].indices.tolist()
        s[[u, *friends]] = -np.inf
        want = [names[j] for j in np.argsort(-s, kind="stable")[:10]]
        mutual = np.asarray((a[u] @ a).todense()).ravel()
        fof = {
            names[j]: int(m) for j, m in enumerate(mutual) if m > 0 and j != u and j not in friends
        }
        mine = split.train_user == u
        history = [
            (items[i], float(x))
            for i, x in zip(split.train_item[mine], split.train_weight[mine], strict=True)
        ]
        got = engine.recommend_friends(names[u], history, [names[f] for f in friends], fof, 10)
        agree.append(len(set(want) & {r.id for r in got.items}) / 10)
    # ONNX Runtime and torch differ in the last bits: a near-tie may swap at the 10th place.
    assert np.mean(agree) >= 0.97, agree
