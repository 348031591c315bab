"""One recommender contract, three backends: torch teacher, ONNX student, quantized student.

Each backend answers ``content(users, k)`` and ``friends(users, k)`` with (B, k) ids, -1
padded; the suite checks what any served model must do, whatever its compression.
"""

from __future__ import annotations

import numpy as np
import pytest
from socialrec.compression.served_eval import ServedModel, served_topk, tower_inputs
from socialrec.training.features import Features
from socialrec.training.metrics import Graph, topk
from socialrec.training.train import Scorer


class TorchBackend:
    """The torch teacher: full scores, train positives (and self) masked, top k."""

    def __init__(self, model, split) -> None:
        self.sc = Scorer(model, Features.from_split(split))
        self.train = Graph(split.n_users, split.train_user, split.train_item)
        self.ftrain = Graph.undirected(split.n_users, split.friends_train)

    def _top(self, s: np.ndarray, g: Graph, users: np.ndarray, k: int, self_: bool) -> np.ndarray:
        rows, cols = g.batch(users)
        s[rows, cols] = -np.inf
        if self_:
            s[np.arange(len(users)), users] = -np.inf
        return topk(s, k)

    def content(self, users: np.ndarray, k: int) -> np.ndarray:
        return self._top(self.sc.content(users), self.train, users, k, False)

    def friends(self, users: np.ndarray, k: int) -> np.ndarray:
        return self._top(self.sc.friends(users), self.ftrain, users, k, True)


class ServedBackend:
    """A bundle: ONNX Runtime tower + FAISS, filtered like the server."""

    def __init__(self, bundle_dir, split) -> None:
        self.sm = ServedModel(bundle_dir)
        self.feats = self.sm.features(split)
        self.train = Graph(split.n_users, split.train_user, split.train_item)
        self.ftrain = Graph.undirected(split.n_users, split.friends_train)

    def content(self, users: np.ndarray, k: int) -> np.ndarray:
        u, _ = self.sm.vectors(tower_inputs(self.feats, users))
        return served_topk(self.sm.items, u, users, self.train, False, k)

    def friends(self, users: np.ndarray, k: int) -> np.ndarray:
        _, u = self.sm.vectors(tower_inputs(self.feats, users))
        return served_topk(self.sm.users, u, users, self.ftrain, True, k)


class RecommenderContract:
    """Subclasses provide ``_make_model()``; the tests are the contract."""

    K = 10

    @pytest.fixture(autouse=True)
    def _setup(self, loaded, bundles, student) -> None:
        self.loaded, self.bundles, self.student = loaded, bundles, student
        self.split = loaded[3]
        self.model = self._make_model()
        self.users = np.arange(0, self.split.n_users, 7)

    def _make_model(self):
        raise NotImplementedError

    def test_returns_k_distinct_valid_ids(self) -> None:
        for ids, n in (
            (self.model.content(self.users, self.K), self.split.n_items),
            (self.model.friends(self.users, self.K), self.split.n_users),
        ):
            assert ids.shape == (len(self.users), self.K)
            for row in ids:
                real = row[row >= 0]
                assert len(set(real.tolist())) == len(real) and (real < n).all()
            assert (ids >= 0).mean() > 0.99  # catalogues here are far larger than k + history

    def test_never_recommends_what_the_user_has(self) -> None:
        tr = Graph(self.split.n_users, self.split.train_user, self.split.train_item)
        ftr = Graph.undirected(self.split.n_users, self.split.friends_train)
        c, f = self.model.content(self.users, self.K), self.model.friends(self.users, self.K)
        for i, u in enumerate(self.users):
            assert not set(c[i].tolist()) & set(tr.row(u).tolist())
            assert u not in f[i] and not set(f[i].tolist()) & set(ftr.row(u).tolist())

    def test_deterministic(self) -> None:
        assert np.array_equal(
            self.model.content(self.users, self.K), self.model.content(self.users, self.K)
        )

    def test_better_than_chance(self) -> None:
        """Recall@10 well above what a random list of 10 would get (10 / catalogue)."""
        te = Graph(self.split.n_users, self.split.test_user, self.split.test_item)
        users = np.flatnonzero(te.counts() > 0)
        ids = self.model.content(users, self.K)
        hits = [
            len(set(ids[i].tolist()) & set(te.row(u).tolist())) / len(te.row(u))
            for i, u in enumerate(users)
        ]
        assert np.mean(hits) > 3 * self.K / self.split.n_items


class TestTorchTeacher(RecommenderContract):
    def _make_model(self):
        return TorchBackend(self.loaded[0], self.split)


class TestOnnxStudent(RecommenderContract):
    def _make_model(self):
        return ServedBackend(self.bundles["student"], self.split)


class TestQuantizedStudent(RecommenderContract):
    def _make_model(self):
        return ServedBackend(self.bundles["student-int8"], self.split)


def test_onnx_student_agrees_with_its_torch_model(loaded, bundles, student) -> None:
    """The exported student ranks like its torch self: top-10 overlap near 1."""
    split = loaded[3]
    users = np.arange(0, split.n_users, 5)
    a = TorchBackend(student, split).content(users, 10)
    b = ServedBackend(bundles["student"], split).content(users, 10)
    overlap = np.mean(
        [len(set(x) & set(y)) / 10 for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    )
    assert overlap >= 0.98  # only exact score ties may order differently
