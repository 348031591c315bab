"""The retrieval engine against the torch model it was exported from, on a tiny bundle.

The model is untrained (random weights, biases included so the bias slot matters); the
reference is brute force over the whole catalogue with the torch model, so every ranking,
filter and blend rule is checked against numbers computed a second, independent way.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from socialrec.compression.export import INDEX_KINDS, build_index, write_bundle
from socialrec.serving.bundle import TOWER_OUTPUTS, BundleError, load_manifest, open_bundle
from socialrec.serving.cache import ResultCache, entry_bytes
from socialrec.serving.engine import (
    ContentQuery,
    Engine,
    EngineConfig,
    FriendQuery,
    Result,
    ensure_reconstruct,
    tower_sessions,
)
from socialrec.serving.schema import UserFeatures
from socialrec.serving.servicer import Live, rank
from socialrec.training.model import TowerConfig, TwoTower
from socialrec.training.split import Split

N_ITEMS, N_USERS, DIM = 60, 40, 8
ITEM_IDS = [f"item-{i}" for i in range(N_ITEMS)]
USER_IDS = [f"user {u}" for u in range(N_USERS)]  # a space, as external ids may have
# ONNX Runtime and torch both compute in float32 but reduce in different orders and use
# different tanh kernels: a few ulp per op. On this model (|score| up to ~3.5) the largest
# difference measured over 200 users x 60 items was 4.8e-7; 1e-4 leaves 200x headroom and is
# still 20x below the smallest gap between neighbouring reference scores seen (2e-3).
TOL = 1e-4


def _split(rng: np.random.Generator) -> Split:
    """A hand-made training split: skewed item popularity, a random friend graph."""
    users = rng.integers(0, N_USERS, 400).astype(np.int32)
    items = np.minimum(rng.zipf(1.5, 400) - 1, N_ITEMS - 1).astype(np.int32)
    pairs = rng.integers(0, N_USERS, (120, 2))
    pairs = np.unique(np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1), axis=0).astype(np.int32)
    return Split(
        n_users=N_USERS,
        n_items=N_ITEMS,
        train_user=users,
        train_item=items,
        train_weight=rng.integers(1, 50, 400).astype(np.float32),
        test_user=np.zeros(0, np.int32),
        test_item=np.zeros(0, np.int32),
        friends_train=pairs,
        friends_test=np.zeros((0, 2), np.int32),
        seed=0,
    )


@pytest.fixture(scope="module")
def model_and_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[TwoTower, Path]:
    torch.manual_seed(0)
    # log1p makes the raw weights matter, so the test sees that they reach the graph raw.
    model = TwoTower(
        TowerConfig(n_items=N_ITEMS, n_users=N_USERS, dim=DIM, weight_transform="log1p")
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("engine") / "bundle"
    write_bundle(model, _split(np.random.default_rng(0)), USER_IDS, ITEM_IDS, out, meta={})
    return model.eval(), out


@pytest.fixture(scope="module")
def engine(model_and_bundle: tuple[TwoTower, Path]) -> Engine:
    return Engine.load(model_and_bundle[1])


# ---- reference ----------------------------------------------------------------------------


def _towers(
    model: TwoTower, hist: dict[int, float], friends: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force torch scores of every item and every user.  (I,), (U,)"""
    with torch.no_grad():
        u_c, u_f = model.user_tower(
            torch.tensor([list(hist) or [0]]),
            torch.tensor([list(hist.values()) or [0.0]]),
            torch.tensor([friends or [0]]),
            torch.tensor([[1.0] * len(friends) or [0.0]]),
        )
        return model.content_logits(u_c)[0].numpy(), model.friend_logits(u_f)[0].numpy()


def _ranked(res: Result) -> None:
    """Scores descending, ids unique, Python types on the wire."""
    scores = [s.score for s in res.items]
    assert scores == sorted(scores, reverse=True)
    assert len({s.id for s in res.items}) == len(res.items)
    assert all(type(s.id) is str and type(s.score) is float for s in res.items)
    assert set(res.timings) == {"onnx", "faiss", "rank"}


def _assert_top(res: Result, ref: dict[str, float], k: int) -> None:
    """The result is the reference top-k: same scores in order, each id scored as the reference.

    Comparing scores rather than id lists keeps the test valid if two candidates tie within
    TOL and swap places.
    """
    _ranked(res)
    best = sorted(ref.values(), reverse=True)[:k]
    assert len(res.items) == len(best)
    np.testing.assert_allclose([s.score for s in res.items], best, atol=TOL)
    for s in res.items:
        assert s.score == pytest.approx(ref[s.id], abs=TOL)


def _user(rng: np.random.Generator) -> tuple[int, dict[int, float], list[int]]:
    me = int(rng.integers(N_USERS))
    items = rng.choice(N_ITEMS, 6, replace=False).tolist()
    hist = {i: float(w) for i, w in zip(items, rng.integers(1, 30, 6), strict=True)}
    others = [u for u in range(N_USERS) if u != me]
    friends = rng.choice(others, 3, replace=False).tolist()
    return me, hist, friends


# ---- content ------------------------------------------------------------------------------


def test_content_matches_torch_and_never_returns_seen(
    model_and_bundle: tuple[TwoTower, Path], engine: Engine
) -> None:
    model = model_and_bundle[0]
    rng = np.random.default_rng(1)
    for _ in range(10):
        _, hist, friends = _user(rng)
        history = [(ITEM_IDS[i], w) for i, w in hist.items()]
        res = engine.recommend_content(history, [USER_IDS[u] for u in friends], k=10)
        s_c, _ = _towers(model, hist, friends)
        ref = {ITEM_IDS[i]: float(s_c[i]) for i in range(N_ITEMS) if i not in hist}
        _assert_top(res, ref, 10)
        assert not res.cold_start and res.unknown == 0
        assert all(s.reason == "similar_taste" for s in res.items)


def test_history_cut_repeats_and_friends_only(
    model_and_bundle: tuple[TwoTower, Path],
) -> None:
    """Only the first max_history entries feed the tower; all of them count as seen; a
    repeated item sums its weights; with friends only the reason says so."""
    model, bundle = model_and_bundle
    eng = Engine.load(bundle, config=EngineConfig(max_history=4))
    history = [("item-3", 2.0), ("item-7", 5.0), ("item-3", 1.5), ("item-9", 1.0)]
    history += [(f"item-{i}", 4.0) for i in (20, 21, 22)]  # beyond the cut: seen, not fed
    res = eng.recommend_content(history, ["user 5"], k=8)
    s_c, _ = _towers(model, {3: 3.5, 7: 5.0, 9: 1.0}, [5])
    seen = {3, 7, 9, 20, 21, 22}
    _assert_top(res, {ITEM_IDS[i]: float(s_c[i]) for i in range(N_ITEMS) if i not in seen}, 8)

    res = eng.recommend_content([], ["user 5", "user 6"], k=5)
    s_c, _ = _towers(model, {}, [5, 6])
    _assert_top(res, {ITEM_IDS[i]: float(s_c[i]) for i in range(N_ITEMS)}, 5)
    assert all(s.reason == "friends_like" for s in res.items)


def test_k_larger_than_catalogue(engine: Engine) -> None:
    history = [("item-1", 1.0), ("item-2", 3.0)]
    res = engine.recommend_content(history, [], k=1000)
    _ranked(res)
    assert {s.id for s in res.items} == set(ITEM_IDS) - {"item-1", "item-2"}
    pop = engine.popular_content(k=1000)
    assert len(pop.items) == N_ITEMS and pop.cold_start


# ---- friends ------------------------------------------------------------------------------


@pytest.mark.parametrize("fof_weight", [1.0, 0.7])
def test_friends_match_torch_blend(
    model_and_bundle: tuple[TwoTower, Path], fof_weight: float
) -> None:
    model, bundle = model_and_bundle
    eng = Engine.load(bundle, config=EngineConfig(fof_weight=fof_weight))
    rng = np.random.default_rng(2)
    for _ in range(10):
        me, hist, friends = _user(rng)
        banned = {me, *friends}
        fof_idx = rng.choice([u for u in range(N_USERS) if u not in banned], 5, replace=False)
        fof = {USER_IDS[u]: int(m) for u, m in zip(fof_idx, rng.integers(0, 6, 5), strict=True)}
        fof[USER_IDS[friends[0]]] = 9  # a stale store entry naming a friend: still excluded
        history = [(ITEM_IDS[i], w) for i, w in hist.items()]
        res = eng.recommend_friends(USER_IDS[me], history, [USER_IDS[u] for u in friends], fof, 8)
        _, s_f = _towers(model, hist, friends)
        ref = {
            USER_IDS[u]: float(s_f[u]) + fof_weight * math.log1p(fof.get(USER_IDS[u], 0))
            for u in range(N_USERS)
            if u not in banned
        }
        _assert_top(res, ref, 8)
        for s in res.items:
            m = fof.get(s.id, 0)
            assert s.mutual_friends == m
            assert s.reason == ("mutual_friends" if m else "similar_taste")


def test_self_and_friends_never_returned(engine: Engine) -> None:
    rng = np.random.default_rng(3)
    for _ in range(10):
        me, hist, friends = _user(rng)
        history = [(ITEM_IDS[i], w) for i, w in hist.items()]
        names = [USER_IDS[u] for u in friends]
        res = engine.recommend_friends(USER_IDS[me], history, names, {}, k=1000)
        _ranked(res)
        assert {s.id for s in res.items} == set(USER_IDS) - {USER_IDS[me], *names}
        cold = engine.popular_friends(USER_IDS[me], k=1000, exclude=names)
        assert USER_IDS[me] not in {s.id for s in cold.items}
        assert not {s.id for s in cold.items} & set(names)


def test_fof_only_candidate_is_blended_in(
    model_and_bundle: tuple[TwoTower, Path], engine: Engine
) -> None:
    """A friend-of-friend far outside the ANN candidates still wins on mutual friends."""
    model = model_and_bundle[0]
    me, hist, friends = 0, {1: 3.0, 2: 1.0}, [1, 2]
    _, s_f = _towers(model, hist, friends)
    order = [u for u in np.argsort(-s_f).tolist() if u not in (me, *friends)]
    last = order[-1]  # worst by the tower: far beyond k + excluded + overfetch
    assert order.index(last) > 3 + 3 + engine.config.overfetch
    m = math.ceil(math.expm1(s_f.max() - s_f[last] + 0.5))  # enough mutual friends to win
    history = [(ITEM_IDS[i], w) for i, w in hist.items()]
    fof = {USER_IDS[last]: m}
    res = engine.recommend_friends(USER_IDS[me], history, [USER_IDS[u] for u in friends], fof, 3)
    top = res.items[0]
    assert (top.id, top.mutual_friends, top.reason) == (USER_IDS[last], m, "mutual_friends")
    assert top.score == pytest.approx(float(s_f[last]) + math.log1p(m), abs=TOL)
    # No tower input at all, only friends-of-friends: not cold start, fof first.
    res = engine.recommend_friends("someone new", [], [], fof, 3)
    assert not res.cold_start and res.items[0].id == USER_IDS[last]


# ---- cold start, unknown ids, new users -----------------------------------------------------


def test_cold_start_paths(engine: Engine) -> None:
    pop_items = [ITEM_IDS[j] for j in engine.popular_items.tolist()]
    pop_users = [USER_IDS[j] for j in engine.popular_users.tolist()]
    res = engine.recommend_content([], [], k=5)
    assert res.cold_start and [s.id for s in res.items] == pop_items[:5]
    assert all(s.reason == "popular" for s in res.items)
    _ranked(res)
    # Only unknown ids: cold start too, counted, and an unknown id never breaks exclusion.
    res = engine.recommend_content([("new-item", 2.0), (pop_items[0], 0.0)], ["new-user"], k=5)
    assert res.cold_start and res.unknown == 2
    assert [s.id for s in res.items] == pop_items[1:6]  # the weight-0 item was still seen
    res = engine.recommend_friends(pop_users[0], [], ["ghost"], {"ghost2": 3}, k=5)
    assert res.cold_start and res.unknown == 2
    assert [s.id for s in res.items] == pop_users[1:6]  # never self
    _ranked(res)
    res = engine.popular_friends(pop_users[0], k=5, exclude=[pop_users[1], "ghost"])
    assert res.cold_start and [s.id for s in res.items] == pop_users[2:7]


def test_unknown_ids_are_ignored(engine: Engine) -> None:
    history = [("item-4", 3.0), ("item-8", 1.0)]
    friends = ["user 3"]
    fof = {"user 9": 2}
    base_c = engine.recommend_content(history, friends, k=6)
    base_f = engine.recommend_friends("user 1", history, friends, fof, k=6)
    noisy_h = [("nope", 5.0), *history, ("also-new", 1.0)]
    noisy_fr = ["ghost", *friends]
    res_c = engine.recommend_content(noisy_h, noisy_fr, k=6)
    res_f = engine.recommend_friends("user 1", noisy_h, noisy_fr, {**fof, "ghost-fof": 4}, k=6)
    assert res_c.items == base_c.items and res_c.unknown == 3
    assert res_f.items == base_f.items and res_f.unknown == 4


def test_new_user_with_two_items_gets_personal_results(engine: Engine) -> None:
    """A user unseen at training time: their live history alone personalises the answer."""
    history = [("item-41", 4.0), ("item-17", 1.0)]
    res = engine.recommend_content(history, [], k=10)
    pop = engine.popular_content(k=10, exclude=[i for i, _ in history])
    assert not res.cold_start
    assert [s.id for s in res.items] != [s.id for s in pop.items]
    res = engine.recommend_friends("brand-new-user", history, [], {}, k=5)
    assert not res.cold_start and len(res.items) == 5


# ---- bundle, lifecycle, threads -----------------------------------------------------------


def test_corrupted_bundle_is_refused(
    model_and_bundle: tuple[TwoTower, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bundle"
    shutil.copytree(model_and_bundle[1], bad)
    path = bad / "items.faiss"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="items.faiss"):
        Engine.load(bad)
    # Without checksum verification a structurally broken index is still refused cleanly.
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(BundleError, match="items.faiss"):
        Engine.load(bad, verify=False)


def test_version_warmup_and_threads(
    model_and_bundle: tuple[TwoTower, Path], engine: Engine
) -> None:
    assert engine.version == load_manifest(model_and_bundle[1])["bundle_version"]
    engine.warmup()
    rng = np.random.default_rng(4)
    queries = []
    for _ in range(20):
        me, hist, friends = _user(rng)
        queries.append(
            (
                USER_IDS[me],
                [(ITEM_IDS[i], w) for i, w in hist.items()],
                [USER_IDS[u] for u in friends],
            )
        )

    def answer(q: tuple) -> tuple:
        me, history, friends = q
        c = engine.recommend_content(history, friends, 7).items
        f = engine.recommend_friends(me, history, friends, {USER_IDS[0]: 1}, 7).items
        return c, f

    expected = [answer(q) for q in queries]
    got: dict[int, list] = {}

    def worker(t: int) -> None:
        got[t] = [answer(q) for q in queries]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(got[t] == expected for t in range(4))


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_every_index_kind_the_exporter_writes(
    model_and_bundle: tuple[TwoTower, Path], engine: Engine, kind: str
) -> None:
    """Approximate and compressed indexes (HNSW, SQ8, IVF-PQ + SQ8 refine) serve the same
    contract; each returned score is the exact one up to the 8-bit quantisation error."""
    model, bundle = model_and_bundle
    indexes = []
    bounds = []
    for vecs in (model.item_vectors(), model.user_vectors()):
        x = vecs.detach().numpy()  # (N, D + 1)
        index = faiss.deserialize_index(faiss.serialize_index(build_index(x, kind)))
        indexes.append(index)
        # SQ8 decodes each coordinate to within half a step of (max - min) / 255, and every
        # query coordinate is in [-1, 1] (tanh, bias slot 1): |error| <= sum of half steps.
        exact = kind in ("flat", "hnsw")
        bounds.append(TOL if exact else float((x.max(0) - x.min(0)).sum() / 255 / 2) + TOL)
    eng = Engine(open_bundle(bundle), engine.session, indexes[0], indexes[1])
    no_decode = EngineConfig(decoded_users_max_bytes=0)
    lazy = Engine(open_bundle(bundle), engine.session, indexes[0], indexes[1], no_decode)
    rng = np.random.default_rng(5)
    for _ in range(5):
        me, hist, friends = _user(rng)
        s_c, s_f = _towers(model, hist, friends)
        history = [(ITEM_IDS[i], w) for i, w in hist.items()]
        names = [USER_IDS[u] for u in friends]
        others = [u for u in range(N_USERS) if u not in (me, *friends)]
        fof = {USER_IDS[u]: 2 for u in others[:3]}
        for k in (5, 1000):
            res = eng.recommend_content(history, names, k)
            _ranked(res)
            assert len(res.items) == min(k, N_ITEMS - len(hist))
            for r in res.items:
                i = ITEM_IDS.index(r.id)
                assert i not in hist and abs(r.score - s_c[i]) <= bounds[0]
            res = eng.recommend_friends(USER_IDS[me], history, names, dict(fof), k)
            _ranked(res)
            assert len(res.items) == min(k, N_USERS - 1 - len(friends))
            for r in res.items:
                u = USER_IDS.index(r.id)
                bonus = math.log1p(fof.get(r.id, 0))
                assert u not in (me, *friends) and abs(r.score - bonus - s_f[u]) <= bounds[1]
            if kind in ("flat", "hnsw"):  # exact at this size: the very same answers
                assert (
                    res.items
                    == engine.recommend_friends(USER_IDS[me], history, names, dict(fof), k).items
                )
            # candidate vectors decoded once at load == read back through the index per request
            assert eng.user_vectors is not None and lazy.user_vectors is None
            again = lazy.recommend_friends(USER_IDS[me], history, names, dict(fof), k)
            assert again.items == res.items


def test_bare_ivf_gets_a_direct_map() -> None:
    """An IVF index without a direct map cannot reconstruct by id until the engine builds it."""
    x = np.random.default_rng(6).normal(size=(500, 8)).astype(np.float32)  # (N, D)
    index = faiss.index_factory(8, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    with pytest.raises(RuntimeError):
        index.reconstruct(3)
    ensure_reconstruct(index, "users.faiss")
    np.testing.assert_array_equal(index.reconstruct_batch(np.array([3, 7])), x[[3, 7]])


def test_tower_split_by_output_matches_the_whole_graph(
    model_and_bundle: tuple[TwoTower, Path], engine: Engine
) -> None:
    """The loaded tower runs one session per output; each gives the whole graph's vector bit
    for bit, and the engine's answers are the same as on the whole graph."""
    _, bundle = model_and_bundle
    assert isinstance(engine.session, dict) and set(engine.session) == set(TOWER_OUTPUTS)
    whole = tower_sessions(bundle / "user_tower.onnx", max_bytes=0)  # too big to split
    assert not isinstance(whole, dict)
    rng = np.random.default_rng(11)
    feeds = {"hist_ids": rng.integers(0, N_ITEMS, (3, 16)), "hist_w": rng.random((3, 16), np.float32),
             "friend_ids": rng.integers(0, N_USERS, (3, 16)),
             "friend_w": np.ones((3, 16), np.float32)}  # fmt: skip
    want = whole.run(list(TOWER_OUTPUTS), feeds)
    for out, w in zip(TOWER_OUTPUTS, want, strict=True):
        assert np.array_equal(engine.heads[out].run([out], feeds)[0], w), out
    on_whole = Engine(open_bundle(bundle), whole, engine.items, engine.users)
    for _ in range(10):
        me, hist, friends = _user(rng)
        history = [(ITEM_IDS[i], w) for i, w in hist.items()]
        names = [USER_IDS[u] for u in friends]
        a = engine.recommend_content(history, names, 10)
        b = on_whole.recommend_content(history, names, 10)
        assert [(x.id, x.score) for x in a.items] == [(x.id, x.score) for x in b.items]
        a = engine.recommend_friends(USER_IDS[me], history, names, {}, 10)
        b = on_whole.recommend_friends(USER_IDS[me], history, names, {}, 10)
        assert [(x.id, x.score) for x in a.items] == [(x.id, x.score) for x in b.items]
        # a mixed batch: two head runs on the split tower, one whole-graph run over all rows
        batch = [ContentQuery(history, names, 7), FriendQuery(USER_IDS[me], history, names, {}, 7),
                 ContentQuery(history[:1], [], 5)]  # fmt: skip
        for x, y in zip(
            engine.recommend_batch(batch), on_whole.recommend_batch(batch), strict=True
        ):
            assert [(r.id, r.score) for r in x.items] == [(r.id, r.score) for r in y.items]


def _shared_table_tower(path: Path, shared: bool) -> None:
    """A contract-shaped tower whose two outputs gather from one table (``shared``) or from
    a table each: (B, 4) = sum of weighted rows of a (50, 4) table."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    tables = [numpy_helper.from_array(rng.random((50, 4), np.float32), name=f"t{i}")
              for i in range(1 if shared else 2)]  # fmt: skip
    nodes, outs = [], []
    for k, (ids, w, out) in enumerate((("hist_ids", "hist_w", "content_vector"),
                                       ("friend_ids", "friend_w", "friend_vector"))):  # fmt: skip
        t = tables[0 if shared else k].name
        nodes += [
            helper.make_node("Gather", [t, ids], [f"g{k}"]),
            helper.make_node("Unsqueeze", [w, "axis"], [f"w{k}"]),
            helper.make_node("Mul", [f"g{k}", f"w{k}"], [f"m{k}"]),
            helper.make_node("ReduceSum", [f"m{k}", "axis1"], [out], keepdims=0),
        ]
        outs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", 4]))
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64 if n.endswith("ids") else
                                         TensorProto.FLOAT, ["batch", "n"])
           for n in ("hist_ids", "hist_w", "friend_ids", "friend_w")]  # fmt: skip
    consts = [numpy_helper.from_array(np.array([-1], np.int64), "axis"),
              numpy_helper.from_array(np.array([1], np.int64), "axis1")]  # fmt: skip
    graph = helper.make_graph(nodes, "tower", ins, outs, initializer=tables + consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_tower_with_heads_sharing_a_table_runs_whole(tmp_path: Path) -> None:
    """Split, each head's session would hold its own copy of a shared table: it runs whole;
    heads with their own tables split."""
    _shared_table_tower(tmp_path / "shared.onnx", shared=True)
    _shared_table_tower(tmp_path / "own.onnx", shared=False)
    assert not isinstance(tower_sessions(tmp_path / "shared.onnx"), dict)
    heads = tower_sessions(tmp_path / "own.onnx")
    assert isinstance(heads, dict) and set(heads) == set(TOWER_OUTPUTS)
    ids = np.array([[1, 2, 3]])
    feeds = {"hist_ids": ids, "hist_w": np.ones((1, 3), np.float32), "friend_ids": ids,
             "friend_w": np.ones((1, 3), np.float32)}  # fmt: skip
    whole = tower_sessions(tmp_path / "own.onnx", max_bytes=0)
    for out, want in zip(TOWER_OUTPUTS, whole.run(list(TOWER_OUTPUTS), feeds), strict=True):
        assert np.array_equal(heads[out].run([out], feeds)[0], want)


def test_serving_engine_imports_no_torch() -> None:
    code = (
        "import sys, socialrec.serving.engine; "
        "sys.exit('torch' in sys.modules or 'socialrec.training' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---- exact result cache -------------------------------------------------------------------


def test_result_cache_reuses_only_equal_inputs(model_and_bundle) -> None:
    _, bundle = model_and_bundle
    engine = Engine.load(bundle)
    live = Live(engine, ResultCache(1_000_000))

    def ask(user: str, hist: list, friends: list, fof: dict, k: int, as_friends: bool):
        feats = UserFeatures(list(hist), list(friends), dict(fof))  # fresh, equal by value
        return rank(live, user, k, as_friends, feats)

    hist, friends, fof = [("item-4", 3.0), ("item-8", 1.0)], ["user 3"], {"user 9": 2}
    first = ask("user 1", hist, friends, fof, 6, False)
    assert set(first.timings) == {"onnx", "faiss", "rank"}
    again = ask("user 1", hist, friends, fof, 6, False)
    assert set(again.timings) == {"cache"}
    assert again.items == first.items and again.cold_start == first.cold_start
    assert again.items == engine.recommend_content(hist, friends, 6).items
    # Anything else that could change the answer misses: new history, other k, other call.
    newer = [("item-13", 1.0), *hist]
    changed = ask("user 1", newer, friends, fof, 6, False)
    assert "cache" not in changed.timings
    assert changed.items == engine.recommend_content(newer, friends, 6).items
    assert "cache" not in ask("user 1", newer, friends, fof, 7, False).timings
    f1 = ask("user 1", newer, friends, fof, 6, True)
    assert "cache" not in f1.timings
    assert f1.items == engine.recommend_friends("user 1", newer, friends, fof, 6).items
    f2 = ask("user 1", newer, friends, {"user 9": 3}, 6, True)  # one more mutual friend
    assert "cache" not in f2.timings
    assert f2.items == engine.recommend_friends("user 1", newer, friends, {"user 9": 3}, 6).items
    assert set(ask("user 1", newer, friends, {"user 9": 3}, 6, True).timings) == {"cache"}
    # A slot keeps the newest features only: the first history misses again.
    assert "cache" not in ask("user 1", hist, friends, fof, 6, False).timings


def test_result_cache_budget_evicts_least_recent_and_zero_disables(model_and_bundle) -> None:
    _, bundle = model_and_bundle
    engine = Engine.load(bundle)
    hist = [(ITEM_IDS[i], 1.0) for i in range(3)]

    def feats(h: list = hist) -> UserFeatures:
        return UserFeatures(list(h), [], {})

    one = entry_bytes((False, "user 1", 5), feats(), engine.recommend_content(hist, [], 5))
    cache = ResultCache(3 * one)  # three users of equal-length ids fit
    live = Live(engine, cache)

    def ask(user: str, h: list = hist):
        return rank(live, user, 5, False, feats(h))

    for u in ("user 1", "user 2", "user 3"):
        assert len(ask(u).items) == 5
    assert len(cache) == 3 and cache.size == 3 * one
    assert "cache" in ask("user 1").timings  # now the most recent
    ask("user 4")  # evicts user 2, the least recently used
    assert len(cache) == 3 and cache.size <= 3 * one
    assert "cache" not in ask("user 2").timings
    assert "cache" in ask("user 4").timings
    big = [(ITEM_IDS[i % N_ITEMS], 1.0) for i in range(3 * one // 100)]  # over the whole budget
    ask("user 5", big)
    assert cache.size <= 3 * one and "cache" not in ask("user 5", big).timings
    off = Live(engine, None)
    for _ in range(2):
        r = rank(off, "user 1", 5, False, feats())
        assert "cache" not in r.timings


def test_entry_bytes_bounds_what_an_entry_really_allocates(model_and_bundle) -> None:
    """The budget's estimate against tracemalloc's count of the allocations that entries of
    every shape keep alive (features parsed as the store parses them, results the engine
    made): never below the real bytes, and not wildly above (the budget would be wasted)."""
    import gc
    import tracemalloc

    from socialrec.serving.schema import parse_features

    _, bundle = model_and_bundle
    engine = Engine.load(bundle)
    cache = ResultCache(1 << 40)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    estimate = 0
    for u in range(300):
        n = u % 40
        friends = u % 2 == 1
        items = [f"item-{(u + j) % N_ITEMS}" for j in range(n)]
        replies = [  # a friend read's raw replies: items, [item, weight, ...], friends,
            items,  # dismissed users, blocked users, fof; content: seen, dismissed, version
            [x for j in range(n) for x in (f"item-{(u + j) % N_ITEMS}", f"{j}.5")],
            [f"user {(u + j) % N_USERS}" for j in range(n // 4)],
            [f"user {(u + j) % N_USERS}" for j in range(n // 5)] if friends else list(items),
            [f"user {(u * 3 + j) % N_USERS}" for j in range(n // 6)] if friends else [],
            [x for j in range(n // 3) for x in (f"user {(u * 7 + j) % N_USERS}", str(j + 1))]
            if friends else "3",
        ]  # fmt: skip
        f = parse_features(replies, friends)
        del replies, items
        slot = (friends, f"user-number-{u}", 20)
        if u % 3 == 0:
            res = engine.popular_content(20)
        elif slot[0]:
            res = engine.recommend_friends(slot[1], f.history, f.friends, f.fof, 20)
        else:
            res = engine.recommend_content(f.history, f.friends, 20)
        res.timings = {}
        cache.put(slot, f, res)
        estimate += entry_bytes(slot, f, res)
        del f, res, slot
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    real = sum(d.size_diff for d in after.compare_to(before, "filename"))
    assert len(cache) == 300 and cache.size == estimate
    print(f"entry bytes: real {real}, estimated {estimate} ({estimate / real:.2f}x)")
    assert real <= estimate <= 3 * real, (real, estimate)


def test_bundle_ids_in_another_unicode_form_match_requests_in_nfc(
    model_and_bundle: tuple[TwoTower, Path], tmp_path: Path
) -> None:
    """A bundle whose ids are spelled decomposed (NFD, from data loaded before ids were
    normalised) still knows the NFC spelling every request and the store use: the item counts
    as history and seen, is never recommended back, and answers carry NFC ids."""
    import shutil
    import unicodedata

    src = model_and_bundle[1]
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    ids = (dst / "item_ids.txt").read_text().split("\n")
    nfd = unicodedata.normalize("NFD", "café-4")
    ids[4] = nfd  # was "item-4"
    ids[8] = unicodedata.normalize("NFD", "crème-8")
    (dst / "item_ids.txt").write_text("\n".join(ids))
    eng = Engine.load(dst, verify=False)  # the id file no longer matches its checksum
    nfc = unicodedata.normalize("NFC", nfd)
    assert nfc != nfd
    res = eng.recommend_content([(nfc, 3.0), ("item-5", 1.0)], [], k=N_ITEMS)
    assert res.unknown == 0
    got = [s.id for s in res.items]
    assert nfc not in got and "item-5" not in got
    assert unicodedata.normalize("NFC", "crème-8") in got
    assert all(unicodedata.is_normalized("NFC", i) for i in got)
