"""Retrieval core of the server: a verified bundle in, ranked items and friends out.

The engine runs the ONNX user tower over what the online store holds now (history, friends),
searches the FAISS inner-product indexes, filters what the user must not see again (seen
items; self and existing friends) and blends friend-of-friend counts into the friend score.
``recommend_batch`` answers several requests with one tower run and one search per index
(the worker's dynamic batching, :mod:`socialrec.serving.batcher`); every answer is the one
the request gets alone (tower inputs padded to a multiple of ``PAD``, each row reading only
its own prefix of the search). It has no I/O after ``load`` and no torch: the gRPC servicer
injects the store's features and turns a :class:`Result` into a reply.

Read-only after ``load``, so one engine serves many threads. ONNX Runtime and FAISS are
pinned to one thread each (docs/design.md "Performance rules"): the server scales by processes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from socialrec.serving.bundle import (
    DEFAULT_FOF_WEIGHT,
    TOWER_INPUTS,
    TOWER_OUTPUTS,
    BundleError,
    BundleFiles,
    bundle_fof_weight,
    open_bundle,
)
from socialrec.serving.fresh import FoldInPrior

log = logging.getLogger("socialrec.server")
FRESH_PRIOR = "fresh_prior.npz"  # optional bundle file: the fold-in prior of fresh items

# Machine-readable reason tags (the proto's Recommendation.reason documents the same set).
REASON_TASTE = "similar_taste"  # the user tower's own history (content) or taste (friends)
REASON_FRIENDS_LIKE = "friends_like"  # content for a user known only through friends
REASON_MUTUAL = "mutual_friends"  # a friend candidate with mutual friends (count in the field)
REASON_POPULAR = "popular"  # cold-start fallback
REASON_FRESH = "fresh"  # an item newer than the bundle, served from the fresh side index


@dataclass(frozen=True, eq=False)
class FreshIndex:
    """A worker's side index of fresh items (docs/design.md "Fresh items: serving").

    An exact inner-product index over the fold-in rows of items the bundle that built it did
    not know, with their own id list (``ids[j]`` is row j). Built whole and swapped in with one
    reference assignment; never mutated once a search may use it. ``version`` identifies what
    it was built from (registry version, takedown version, bundle version). ``updated_ms``:
    each item's registry entry time.

    For the result cache: ``seq`` numbers the builds of one worker (1, 2, ...), ``changed[j]``
    is the build in which row j took its current value (carried over from the previous build
    when the item's entry did not change), and ``dropped_seq`` the last build that dropped an
    item the one before it had. An answer computed at build ``s`` is still exact at this build
    if no row with ``changed > s`` could enter it and none left (:func:`still_exact`).
    """

    ids: list[str]
    index: faiss.Index
    version: tuple
    updated_ms: dict[str, int]
    n_users: dict[str, int]
    rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    seq: int = 1
    changed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dropped_seq: int = 0

    @classmethod
    def build(
        cls,
        rows: Mapping[str, np.ndarray],
        dim: int,
        version: tuple,
        updated_ms: Mapping[str, int],
        n_users: Mapping[str, int],
        previous: FreshIndex | None = None,
    ) -> FreshIndex:
        ids = sorted(rows)
        index = faiss.IndexFlatIP(dim)
        mat = np.zeros((0, dim), np.float32)
        if ids:
            mat = np.stack([np.asarray(rows[i], np.float32) for i in ids])
            index.add(mat)
        seq = previous.seq + 1 if previous is not None else 1
        changed = np.full(len(ids), seq, np.int64)
        dropped = previous.dropped_seq if previous is not None else 0
        if previous is not None and previous.rows.shape[1:] == (dim,):
            at = {item: j for j, item in enumerate(previous.ids)}
            for j, item in enumerate(ids):
                p = at.get(item)
                same = p is not None and previous.updated_ms.get(item) == updated_ms.get(item)
                if same and np.array_equal(previous.rows[p], mat[j]):
                    changed[j] = previous.changed[p]
            if not set(previous.ids) <= set(ids):
                dropped = seq
        elif previous is not None and len(previous):
            dropped = seq
        return cls(ids, index, version, dict(updated_ms), dict(n_users), mat, seq, changed, dropped)

    def __len__(self) -> int:
        return len(self.ids)


def still_exact(result: Result, k: int, fresh: FreshIndex | None) -> bool:
    """Whether a content answer computed with the side index of build ``result.fresh_seq`` is
    still the answer with ``fresh`` (the features being equal). A cold-start answer never
    involves fresh items. Otherwise it is, unless a row that changed since could score at
    least the answer's k-th item (or any row could, if the answer had fewer than k), a fresh
    item in the answer changed, or an item was dropped since: then the caller recomputes.
    Conservative (a row the filters would drop still counts), never wrong."""
    if result.query is None or result.cold_start:
        return True
    if fresh is None or not len(fresh):
        return result.fresh_seq is None or not any(r.reason == REASON_FRESH for r in result.items)
    since = result.fresh_seq if result.fresh_seq is not None else 0
    if fresh.seq == since:
        return True
    if fresh.dropped_seq > since:
        return False
    new = np.flatnonzero(fresh.changed > since)
    if not len(new):
        return True
    if fresh.rows.shape[1] != result.query.shape[-1]:
        return False
    answer = {r.id for r in result.items}
    if any(fresh.ids[j] in answer for j in new):
        return False
    if len(result.items) < k:
        return False
    kth = result.items[-1].score
    scores = fresh.rows[new] @ result.query.reshape(-1)
    return not bool((scores >= kth - 1e-6).any())


@dataclass(frozen=True, slots=True)
class Scored:
    """One recommended item or user: external id, score, why, and mutual friends (friends)."""

    id: str
    score: float
    reason: str
    mutual_friends: int = 0


@dataclass(slots=True)
class Result:
    """Ranked answer (best first) plus what the server reports about it.

    ``timings`` holds seconds per stage: "onnx" (feature lookup + tower), "faiss" (search),
    "rank" (filter, blend, build the answer); cold-start answers spend all of it in "rank".
    ``unknown`` counts the ids the bundle does not know (new since it was built) among the
    history and friends fed to the tower and the friends-of-friends; they are skipped.
    """

    items: list[Scored]
    cold_start: bool
    timings: dict[str, float]
    unknown: int = 0
    # content answers: the tower's query vector (1, D + 1) and the side-index build they were
    # merged with (None: none), for the result cache's check of fresh items (still_exact)
    query: np.ndarray | None = None
    fresh_seq: int | None = None


@dataclass(frozen=True)
class EngineConfig:
    """Per-request limits and blend weights (the bundle fixes everything else)."""

    max_history: int = 256  # most recent history entries fed to the tower
    max_friends: int = 256  # friends fed to the tower
    # friend score = inner product + fof_weight * log1p(mutual); None: the weight the bundle
    # carries (manifest friends.fof_weight, chosen on the run's validation split)
    fof_weight: float | None = None
    overfetch: int = 4  # extra FAISS candidates beyond k + excluded (margin for filtering)
    max_fof: int = 1000  # friend-of-friend candidates kept (most mutual friends first)
    # Friend scoring reads candidate vectors back from the users index. Up to this many bytes
    # they are decoded once at load into an (N, D + 1) float32 matrix (the same values the
    # index returns, ~0.01 us per row to read) instead of per request through the index
    # (~0.8 us per row for a padded SQ8 index); above it the index stays compressed in memory.
    decoded_users_max_bytes: int = 256 << 20


# Tower input rows are zero-padded to a multiple of PAD (one AVX-512 vector of float32), alone
# or in a batch: ONNX Runtime's reductions then see the same vector lanes whatever the batch,
# so a request's vector does not depend on what it is batched with (unpadded lengths differ
# by ~1e-7; measured and tested).
PAD = 16
# Most requests one recommend_batch call takes. Below faiss's distance_compute_blas_threshold
# (20): a flat search of fewer queries scores each query alone (no BLAS), so each row's scores
# are bit-identical to a search of one.
MAX_BATCH = 16


@dataclass(frozen=True, slots=True)
class ContentQuery:
    """One content request, as ``Engine.recommend_batch`` takes it (see recommend_content)."""

    history: Sequence[tuple[str, float]]
    friends: Sequence[str]
    k: int
    exclude: Collection[str] = ()
    fresh: FreshIndex | None = None


@dataclass(frozen=True, slots=True)
class FriendQuery:
    """One friend request, as ``Engine.recommend_batch`` takes it (see recommend_friends)."""

    user_id: str
    history: Sequence[tuple[str, float]]
    friends: Sequence[str]
    fof: Mapping[str, int]
    k: int
    exclude: Collection[str] = ()


Query = ContentQuery | FriendQuery


@dataclass(slots=True)
class _Row:
    """One request's tower inputs and filters between the stages of ``recommend_batch``."""

    query: Query | None
    hist: list[int]  # known history rows, summed weights in hist_w
    hist_w: list[float]
    friends: list[int]  # known friend rows
    unknown: int
    banned: set[int]  # rows the answer must leave out
    kk: int  # first search depth
    cand_fof: dict[int, int] = field(default_factory=dict)  # friends: candidate -> mutual
    at: int = 0  # position in the batch


def _padded(n: int) -> int:
    return max(PAD, -(-n // PAD) * PAD)


def exhaustive(index: faiss.Index) -> bool:
    """Whether a search scores every stored vector (flat, scalar-quantised; also behind a
    pre-transform): its first n results are then a search n deep's, whatever the depth."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexPreTransform):
        idx = faiss.downcast_index(idx.index)
    return isinstance(idx, faiss.IndexFlat | faiss.IndexScalarQuantizer)


_tls = threading.local()


def _pin_thread() -> None:
    """Pin OpenMP to one thread in the calling thread (the OpenMP setting is per thread).

    ``faiss.omp_set_num_threads`` at load only covers the loading thread; gRPC worker
    threads would otherwise start with OMP_NUM_THREADS or all cores.
    """
    if not getattr(_tls, "pinned", False):
        faiss.omp_set_num_threads(1)
        _tls.pinned = True


def session_options() -> ort.SessionOptions:
    """ONNX Runtime options for one request at a time per thread: no pools, no spinning."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


# Towers up to this size are split into one session per output at load (tower_sessions);
# above it the whole graph runs (splitting holds the parsed model and both sessions at once).
SPLIT_TOWER_MAX_BYTES = 256 << 20


def tower_sessions(
    path: Path, max_bytes: int = SPLIT_TOWER_MAX_BYTES
) -> ort.InferenceSession | dict[str, ort.InferenceSession]:
    """The tower's ONNX Runtime sessions: one per output, each holding only the nodes (and
    tables) its output needs, or the whole graph when it cannot be split.

    ONNX Runtime runs every node of a graph whatever outputs are asked for, and a read needs
    one output (content or friends): on the split graph a read runs half the nodes
    (lowrank-r32-int4 at batch 1: 26 us instead of 43 per ``run``, benchmarks/tower_split.py;
    the outputs are bit-identical, tested). Split with ``onnx.utils.Extractor``. Loaded
    whole: a tower over ``max_bytes``, one whose heads share tables (each session would hold
    its own copy), one whose inputs/outputs are not the contract's (``Engine._check`` then
    names them).
    """
    so, providers = session_options(), ["CPUExecutionProvider"]
    if path.stat().st_size <= max_bytes:
        try:
            import onnx
            from onnx.utils import Extractor

            model = onnx.load(str(path))
            ins = [i.name for i in model.graph.input]
            outs = {o.name for o in model.graph.output}
            if set(ins) == set(TOWER_INPUTS) and set(TOWER_OUTPUTS) <= outs:
                extract = Extractor(model)
                heads = {out: extract.extract_model(ins, [out]) for out in TOWER_OUTPUTS}
                held = sum(_initializer_bytes(h) for h in heads.values())
                if held <= 1.1 * _initializer_bytes(model):
                    return {
                        out: ort.InferenceSession(h.SerializeToString(), so, providers=providers)
                        for out, h in heads.items()
                    }
                log.info("tower heads share tables; running it whole (%s)", path)
        except Exception as e:  # not splittable here: the whole graph still serves
            log.warning("tower not split by output (%s: %s); running it whole", path, e)
    return ort.InferenceSession(str(path), so, providers=providers)


def _initializer_bytes(model) -> int:
    """Bytes of an ONNX model's stored tensors (its tables and weights)."""
    return sum(t.ByteSize() for t in model.graph.initializer)


def ensure_reconstruct(index: faiss.Index, what: str) -> None:
    """Make sure stored vectors can be read back by id (friend-of-friend scores need them).

    Flat, SQ, HNSW and refined indexes reconstruct as they are; a bare IVF needs its direct
    map (N x 8 bytes), built here once at load. Reading back per request, instead of keeping
    an (N, D) float32 copy, keeps compressed indexes compressed in memory.
    """
    if index.ntotal == 0:
        return
    try:
        index.reconstruct(0)
        return
    except RuntimeError:
        pass
    try:
        faiss.extract_index_ivf(index).make_direct_map()
        index.reconstruct(0)
    except RuntimeError as e:
        raise BundleError(f"{what}: index cannot return stored vectors ({e})") from None


def _id_map(ids: list[str], what: str, root: Path) -> dict[str, int]:
    index = {s: j for j, s in enumerate(ids)}
    if len(index) != len(ids):
        raise BundleError(f"{root / what}: duplicate ids (after NFC normalisation)")
    return index


def _nfc(ids: list[str]) -> list[str]:
    """``ids`` in NFC form (the same list when every id is ASCII, as most are)."""
    if all(s.isascii() for s in ids):
        return ids
    return [unicodedata.normalize("NFC", s) for s in ids]


def _timings(onnx: float = 0.0, search: float = 0.0, rank: float = 0.0) -> dict[str, float]:
    return {"onnx": onnx, "faiss": search, "rank": rank}


class Engine:
    """ONNX user tower + FAISS indexes of one bundle; ``recommend_*`` are safe across threads."""

    def __init__(
        self,
        bundle: BundleFiles,
        session: ort.InferenceSession | dict[str, ort.InferenceSession],
        items: faiss.Index,
        users: faiss.Index,
        config: EngineConfig = EngineConfig(),
    ) -> None:
        """``session``: the whole tower, or one session per output (:func:`tower_sessions`)."""
        self.bundle = bundle
        self.version = bundle.version
        self.config = config
        self.session = session
        # The session that computes each output (the same one for both with the whole graph).
        self.heads: dict[str, ort.InferenceSession] = (
            dict(session) if isinstance(session, dict) else dict.fromkeys(TOWER_OUTPUTS, session)
        )
        self.items = items
        self.users = users
        # Ids as the store and every request spell them (NFC, schema.check_id): a bundle built
        # from ids in another form would otherwise miss them (seen items served again).
        self.item_ids = _nfc(bundle.item_ids)
        self.user_ids = _nfc(bundle.user_ids)
        self.item_index = _id_map(self.item_ids, "item_ids.txt", bundle.root)
        self.user_index = _id_map(self.user_ids, "user_ids.txt", bundle.root)
        self.popular_items = bundle.popular_items.astype(np.int64)  # (P,)
        self.popular_users = bundle.popular_users.astype(np.int64)  # (P,)
        self._check()
        ensure_reconstruct(users, str(bundle.root / "users.faiss"))
        self.user_vectors: np.ndarray | None = None  # (N, D + 1) when small enough, see config
        if 0 < users.ntotal * users.d * 4 <= config.decoded_users_max_bytes:
            self.user_vectors = users.reconstruct_n(0, users.ntotal)
        self.fresh_prior = self._fresh_prior()
        self.fof_weight, bad = bundle_fof_weight(bundle.manifest)
        if bad:
            log.warning("%s: %s; using the default %s", bundle.root, bad, DEFAULT_FOF_WEIGHT)
        if config.fof_weight is not None:
            self.fof_weight = config.fof_weight
        self._items_exhaustive = exhaustive(items)
        self._users_exhaustive = exhaustive(users)

    def _fresh_prior(self) -> FoldInPrior | None:
        """The bundle's fold-in prior when its manifest lists one (checksummed and signed with
        the rest), else None: fresh items are then off for this bundle (one warning)."""
        root = self.bundle.root
        if FRESH_PRIOR not in self.bundle.manifest.get("files", {}):
            log.warning(
                "bundle has no fresh-item prior; fresh items are off for it",
                extra={"event": "fresh_off", "bundle": str(root), "missing": FRESH_PRIOR},
            )
            return None
        try:
            prior = FoldInPrior.load(root / FRESH_PRIOR)
        except (OSError, ValueError) as e:
            raise BundleError(f"{root / FRESH_PRIOR}: unreadable fold-in prior ({e})") from None
        if prior.dim != self.items.d:
            raise BundleError(
                f"{root / FRESH_PRIOR}: prior width {prior.dim}, items.faiss has {self.items.d}"
            )
        return prior

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        verify: bool = True,
        config: EngineConfig = EngineConfig(),
        public_key: Ed25519PublicKey | None = None,
    ) -> Engine:
        """Verify a bundle's checksums (and signature, given a key) and open its tower and
        indexes; BundleError if bad."""
        faiss.omp_set_num_threads(1)
        _tls.pinned = True
        bundle = open_bundle(bundle_dir, verify=verify, public_key=public_key)
        try:
            session = tower_sessions(bundle.path("user_tower.onnx"))
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf types
            raise BundleError(f"{bundle.path('user_tower.onnx')}: cannot load ({e})") from None
        indexes = []
        for name in ("items.faiss", "users.faiss"):
            try:
                indexes.append(faiss.read_index(str(bundle.path(name))))
            except RuntimeError as e:
                raise BundleError(f"{bundle.path(name)}: cannot read index ({e})") from None
        return cls(bundle, session, indexes[0], indexes[1], config)

    def _check(self) -> None:
        """Refuse a bundle whose parts disagree (ids vs index sizes, tower I/O, dims)."""
        root = self.bundle.root
        outs: dict[str, object] = {}
        for out in TOWER_OUTPUTS:
            head = self.heads.get(out)
            ins = tuple(i.name for i in head.get_inputs()) if head is not None else ()
            got = {o.name: o.shape for o in head.get_outputs()} if head is not None else {}
            if set(ins) != set(TOWER_INPUTS) or out not in got:
                raise BundleError(
                    f"{root / 'user_tower.onnx'}: inputs {ins} / outputs {tuple(got)}, "
                    f"expected {TOWER_INPUTS} / {TOWER_OUTPUTS}"
                )
            outs[out] = got[out]
        for name, index, ids, out in (
            ("items.faiss", self.items, self.item_ids, "content_vector"),
            ("users.faiss", self.users, self.user_ids, "friend_vector"),
        ):
            if index.ntotal != len(ids):
                raise BundleError(f"{root / name}: {index.ntotal} vectors for {len(ids)} ids")
            if index.metric_type != faiss.METRIC_INNER_PRODUCT:
                raise BundleError(f"{root / name}: metric is not inner product")
            dim = outs[out][-1]
            if isinstance(dim, int) and dim != index.d:
                raise BundleError(f"{root / name}: dimension {index.d}, tower {out} gives {dim}")
        for name, pop, n in (
            ("popular_items.npy", self.popular_items, len(self.item_ids)),
            ("popular_users.npy", self.popular_users, len(self.user_ids)),
        ):
            if pop.ndim != 1 or (len(pop) and (pop.min() < 0 or pop.max() >= n)):
                raise BundleError(f"{root / name}: indices outside 0..{n - 1}")

    # ---- tower -------------------------------------------------------------------------

    def _features(
        self, history: Sequence[tuple[str, float]], friends: Sequence[str]
    ) -> tuple[list[int], list[float], list[int], int, set[int]]:
        """Tower inputs from external ids: (history rows, their weights, friend rows, unknown,
        seen).

        History is cut to its first ``max_history`` entries, then unknown ids and entries
        without a positive finite weight are skipped; a repeated item sums its weights (the
        training data has one row per (user, item) with summed weight). Friends likewise
        (cut, unknown skipped, deduplicated). ``seen`` is every known item of the whole
        history (what content results must leave out), collected in the same pass.
        """
        cfg = self.config
        get = self.item_index.get
        rows = [get(item) for item, _ in history]  # None: unknown to the bundle
        head = rows[: cfg.max_history]
        seen = set(rows)
        seen.discard(None)
        unknown = head.count(None)
        acc: dict[int, float] = {}
        for j, (_, w) in zip(head, history, strict=False):  # head: the first rows
            if j is not None and 0 < w < math.inf:  # positive and finite (NaN fails both)
                acc[j] = acc.get(j, 0.0) + w
        fr_rows = [self.user_index.get(user) for user in friends[: cfg.max_friends]]
        unknown += fr_rows.count(None)
        fr = dict.fromkeys(fr_rows)  # deduplicated, in order
        fr.pop(None, None)
        return list(acc), list(acc.values()), list(fr), unknown, seen  # type: ignore[return-value]

    def _towers(
        self, content: list[_Row], friends: list[_Row]
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Content vectors of the content rows and friend vectors of the friend rows (None for
        no rows): one run of each head on a split tower; one run of the whole graph over all
        the rows when it is not split (each run computes both outputs anyway)."""
        heads = self.heads
        if content and friends and heads["content_vector"] is heads["friend_vector"]:
            u_c, u_f = self._tower(content + friends, *TOWER_OUTPUTS)
            return u_c[: len(content)], u_f[len(content) :]
        u_c = self._tower(content, "content_vector")[0] if content else None
        u_f = self._tower(friends, "friend_vector")[0] if friends else None
        return u_c, u_f

    def _tower(self, rows: Sequence[_Row], *outputs: str) -> list[np.ndarray]:
        """One run of the tower over ``rows`` (of the head of ``outputs[0]``; a split tower's
        head has that output only): each output as a (B, D + 1) float32 array.

        Every row is zero-padded (id 0, weight 0: no contribution) to the batch's longest
        history and friend list, rounded up to a multiple of ``PAD``; a lone request is padded
        the same way, so its vector is bit-identical in any batch (the kernels' vector lanes
        see the same values whatever the batch; tested).
        """
        B = len(rows)
        L = _padded(max(len(r.hist) for r in rows))
        F = _padded(max(len(r.friends) for r in rows))
        hist_ids = np.zeros((B, L), np.int64)
        hist_w = np.zeros((B, L), np.float32)
        friend_ids = np.zeros((B, F), np.int64)
        friend_w = np.zeros((B, F), np.float32)
        for b, r in enumerate(rows):
            if n := len(r.hist):
                hist_ids[b, :n] = r.hist
                hist_w[b, :n] = r.hist_w
            if n := len(r.friends):
                friend_ids[b, :n] = r.friends
                friend_w[b, :n] = 1.0
        feeds = {"hist_ids": hist_ids, "hist_w": hist_w, "friend_ids": friend_ids,
                 "friend_w": friend_w}  # fmt: skip
        got = self.heads[outputs[0]].run(list(outputs), feeds)
        return [np.ascontiguousarray(u, np.float32) for u in got]

    def content_vector(
        self, history: Sequence[tuple[str, float]], friends: Sequence[str]
    ) -> np.ndarray | None:
        """The user's (D + 1,) content query vector, as ``recommend_content`` computes it, or
        None when the bundle knows none of the user's history and friends (no tower run)."""
        hist, hist_w, fr, unknown, seen = self._features(history, friends)
        if not hist and not fr:
            return None
        _pin_thread()
        row = _Row(None, hist, hist_w, fr, unknown, seen, 0)
        return self._tower([row], "content_vector")[0][0]

    # ---- batches -----------------------------------------------------------------------

    def recommend_batch(self, queries: Sequence[Query]) -> list[Result]:
        """The answers to up to ``MAX_BATCH`` requests, in order, each exactly the one its
        request gets alone (``recommend_content`` and ``recommend_friends`` are this with one
        query).

        Requests that need the tower go through one ``session.run`` (content and friend rows
        together, each output asked for once), content rows through one items search, friend
        rows through one users search, fresh-item rows through one side-index search. On an
        exhaustive index (flat, SQ) the search runs as deep as the deepest row needs and each
        row reads only its own prefix, which is its own search's answer; an approximate
        index's results depend on the depth, so it runs one search per distinct depth. A row
        that needs to search deeper (too much filtered) does so alone, as it would alone.
        Stage timings of each answer are its batch's tower and search times and its own rank
        time.
        """
        if len(queries) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} queries per batch, got {len(queries)}")
        t0 = time.perf_counter()
        out: list[Result | None] = [None] * len(queries)
        content: list[_Row] = []
        friends: list[_Row] = []
        for at, q in enumerate(queries):
            r = self._content_row(q) if isinstance(q, ContentQuery) else self._friend_row(q)
            if isinstance(r, Result):
                out[at] = r
            else:
                r.at = at
                (content if isinstance(q, ContentQuery) else friends).append(r)
        if content or friends:
            _pin_thread()
            u_c, u_f = self._towers(content, friends)  # (Bc, D + 1), (Bf, D + 1) or None
            t_tower = time.perf_counter() - t0
            if u_c is not None:
                self._content_rows(content, u_c, t_tower, out)
            if u_f is not None:
                self._friend_rows(friends, u_f, t_tower, out)
        return out  # type: ignore[return-value]  (every slot is filled)

    def _search(
        self, index: faiss.Index, exhaustive: bool, U: np.ndarray, depths: list[int]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, scores) rows of each row of U (B, D + 1), at least ``depths[b]`` deep."""
        if exhaustive or len(set(depths)) == 1:
            D, I = index.search(U, max(depths))  # noqa: E741  (B, kk) each
            return list(zip(I, D, strict=True))
        res: list = [None] * len(depths)
        groups: dict[int, list[int]] = {}
        for b, d in enumerate(depths):
            groups.setdefault(d, []).append(b)
        for d, bs in groups.items():
            D, I = index.search(np.ascontiguousarray(U[bs]), d)  # noqa: E741
            for row, b in enumerate(bs):
                res[b] = (I[row], D[row])
        return res

    # ---- content -----------------------------------------------------------------------

    def recommend_content(
        self,
        history: Sequence[tuple[str, float]],
        friends: Sequence[str],
        k: int,
        exclude: Collection[str] = (),
        fresh: FreshIndex | None = None,
    ) -> Result:
        """Top-k items for a user described by history (recent first) and friends, never an
        item of the history nor of ``exclude`` (seen, dismissed, taken down, excluded by the
        request). Searches deeper until k items pass the filter or the catalogue runs out.

        With a ``fresh`` side index, its items compete by the same score (the same query,
        the same inner product) under the same filters, by id: never an item of the
        history or ``exclude``, nor one this bundle knows (a retrain took it over)."""
        return self.recommend_batch([ContentQuery(history, friends, k, exclude, fresh)])[0]

    def _content_row(self, q: ContentQuery) -> _Row | Result:
        """A content request's tower inputs and filters, or its cold-start answer."""
        hist, hist_w, fr, unknown, seen = self._features(q.history, q.friends)
        items = self.item_index
        banned = seen.union(j for item in q.exclude if (j := items.get(item)) is not None)
        if not hist and not fr:
            history = [item for item, _ in q.history]
            res = self.popular_content(q.k, exclude=history, banned=banned)
            res.unknown = unknown
            return res
        kk = min(self.items.ntotal, q.k + len(banned) + self.config.overfetch)
        return _Row(q, hist, hist_w, fr, unknown, banned, kk)

    def _content_rows(
        self, rows: list[_Row], U: np.ndarray, t_tower: float, out: list[Result | None]
    ) -> None:
        s0 = time.perf_counter()
        U = np.ascontiguousarray(U)
        hits = self._search(self.items, self._items_exhaustive, U, [r.kk for r in rows])
        merged = self._fresh_rows(rows, U)
        t_batch = time.perf_counter() - s0
        n = self.items.ntotal
        names = self.item_ids
        for b, r in enumerate(rows):
            r0 = time.perf_counter()
            q, k, kk = r.query, r.query.k, r.kk
            I, D = hits[b]  # noqa: E741  (KK,) each, KK >= kk
            t_alone = 0.0
            while True:
                if kk > len(I):
                    s1 = time.perf_counter()
                    D, I = self.items.search(U[b : b + 1], kk)  # noqa: E741  (1, kk)
                    D, I = D[0], I[0]  # noqa: E741
                    t_alone += time.perf_counter() - s1
                top = [(j, s) for j, s in zip(I[:kk].tolist(), D[:kk].tolist(), strict=True)
                       if j >= 0 and j not in r.banned]  # fmt: skip
                if len(top) >= k or kk >= n:
                    break
                kk = min(n, 2 * kk)  # an approximate index came back short: ask for more
            reason = REASON_TASTE if r.hist else REASON_FRIENDS_LIKE
            items = [Scored(names[j], s, reason) for j, s in top[:k]]
            if merged[b] is not None:
                items = self._merge_fresh(items, merged[b], k)
            fresh = q.fresh
            rank = time.perf_counter() - r0 - t_alone
            out[r.at] = Result(
                items, False, _timings(t_tower, t_batch + t_alone, rank), r.unknown,
                query=U[b : b + 1].copy(), fresh_seq=fresh.seq if fresh is not None else None,
            )  # fmt: skip

    def _fresh_rows(self, rows: list[_Row], U: np.ndarray) -> list[list[Scored] | None]:
        """Each row's admissible side-index items, best first (None: no side index to search):
        exact searches (flat indexes over few rows), one per side index in the batch, each row
        reading its own k + filtered + overfetch first results. Admissible: not in the row's
        history nor its ``exclude``, nor an item this bundle knows (a retrain took it over)."""
        res: list[list[Scored] | None] = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for b, r in enumerate(rows):
            fresh = r.query.fresh
            if fresh is not None and len(fresh) and fresh.index.d == U.shape[1]:
                groups.setdefault(id(fresh), []).append(b)
        overfetch, known = self.config.overfetch, self.item_index
        for bs in groups.values():
            fresh = rows[bs[0]].query.fresh
            n = fresh.index.ntotal
            banned, depth = [], []
            for b in bs:
                q = rows[b].query
                ban = {item for item, _ in q.history}
                ban.update(q.exclude)
                banned.append(ban)
                depth.append(min(n, q.k + len(ban) + overfetch))
            D, I = fresh.index.search(np.ascontiguousarray(U[bs]), max(depth))  # noqa: E741
            ids = fresh.ids
            for row, b in enumerate(bs):
                k, ban, kk = rows[b].query.k, banned[row], depth[row]
                extra = []
                for j, s in zip(I[row, :kk].tolist(), D[row, :kk].tolist(), strict=True):
                    if j < 0:
                        continue
                    item = ids[j]
                    if item in ban or item in known:
                        continue
                    extra.append(Scored(item, s, REASON_FRESH))
                    if len(extra) == k:
                        break
                res[b] = extra
        return res

    @staticmethod
    def _merge_fresh(out: list[Scored], extra: list[Scored], k: int) -> list[Scored]:
        """``out`` merged by score with the side index's best admissible items."""
        if not extra:
            return out
        return sorted(out + extra, key=lambda r: -r.score)[:k]

    def popular_content(
        self, k: int, exclude: Collection[str] = (), banned: Collection[int] = ()
    ) -> Result:
        """Most popular items at training time, minus ``exclude`` (ids) and ``banned``
        (indices); scores are rank-based."""
        t0 = time.perf_counter()
        items = self.item_index
        skip = {j for item in exclude if (j := items.get(item)) is not None}
        skip.update(banned)
        out = _popular(self.popular_items, self.item_ids, skip, k)
        return Result(out, True, _timings(rank=time.perf_counter() - t0))

    # ---- friends -----------------------------------------------------------------------

    def recommend_friends(
        self,
        user_id: str,
        history: Sequence[tuple[str, float]],
        friends: Sequence[str],
        fof: Mapping[str, int],
        k: int,
        exclude: Collection[str] = (),
    ) -> Result:
        """Top-k people to befriend: tower + ANN candidates and friends-of-friends, blended;
        never the user, a friend, nor anyone in ``exclude`` (blocked either way, dismissed,
        excluded by the request).

        score = u_f . [w, b] + fof_weight * log1p(mutual friends) (the bundle's weight unless
        the config sets one). Candidates are the
        k + |excluded| + overfetch nearest users plus every known friend-of-friend (at most
        ``max_fof``, most mutual first); the union holds the exact blended top-k of a flat
        index because the fof bonus is never negative. Every candidate's inner product is
        computed from the vector the index stores (decoded once at load when small enough,
        else ``reconstruct_batch``, C x (D + 1) floats per request): exact for
        flat/HNSW-flat, the same decoded vector the search scores
        for SQ/refined indexes, and fof-only candidates are scored like ANN ones.
        """
        query = FriendQuery(user_id, history, friends, fof, k, exclude)
        return self.recommend_batch([query])[0]

    def _friend_row(self, q: FriendQuery) -> _Row | Result:
        """A friend request's tower inputs, filters and friends-of-friends, or its cold-start
        answer."""
        get = self.user_index.get
        hist, hist_w, fr, unknown, _ = self._features(q.history, q.friends)
        banned = set(map(get, q.friends))  # None for unknown ids, dropped below
        banned.update(map(get, q.exclude))
        banned.add(get(q.user_id))
        banned.discard(None)
        fof_rows = list(map(get, q.fof))
        unknown += fof_rows.count(None)
        cand_fof = {j: int(m) if m > 0 else 0 for j, m in zip(fof_rows, q.fof.values(), strict=True)
                    if j is not None and j not in banned}  # fmt: skip
        if not hist and not fr and not cand_fof:
            res = self.popular_friends(q.user_id, q.k, exclude=[*q.friends, *q.exclude])
            res.unknown = unknown
            return res
        if len(cand_fof) > self.config.max_fof:
            keep = sorted(cand_fof.items(), key=lambda p: -p[1])[: self.config.max_fof]
            cand_fof = dict(keep)
        kk = min(self.users.ntotal, q.k + len(banned) + self.config.overfetch)
        return _Row(q, hist, hist_w, fr, unknown, banned, kk, cand_fof)

    def _friend_rows(
        self, rows: list[_Row], U: np.ndarray, t_tower: float, out: list[Result | None]
    ) -> None:
        s0 = time.perf_counter()
        U = np.ascontiguousarray(U)
        hits = self._search(self.users, self._users_exhaustive, U, [r.kk for r in rows])
        t_batch = time.perf_counter() - s0
        n = self.users.ntotal
        names = self.user_ids
        for b, r in enumerate(rows):
            r0 = time.perf_counter()
            k, kk, banned, cand_fof = r.query.k, r.kk, r.banned, r.cand_fof
            I = hits[b][0]  # noqa: E741  (KK,), KK >= kk
            t_alone = 0.0
            while True:
                if kk > len(I):
                    s1 = time.perf_counter()
                    _, I = self.users.search(U[b : b + 1], kk)  # noqa: E741  (1, kk)
                    I = I[0]  # noqa: E741
                    t_alone += time.perf_counter() - s1
                ids = I[:kk].tolist()
                cand = dict.fromkeys([j for j in ids if j >= 0 and j not in banned])
                cand.update(dict.fromkeys(cand_fof))
                if len(cand) >= k or kk >= n:
                    break
                kk = min(n, 2 * kk)  # an approximate index came back short: ask for more
            idx = np.fromiter(cand, dtype=np.int64, count=len(cand))  # (C,)
            mutual = np.array(list(map(cand_fof.get, cand, repeat(0))), np.float32)  # (C,)
            if self.user_vectors is not None:
                vecs = self.user_vectors[idx]  # (C, D + 1)
            else:
                vecs = self.users.reconstruct_batch(idx)  # (C, D + 1)
            score = vecs @ U[b] + self.fof_weight * np.log1p(mutual)  # (C,)
            order = np.argsort(-score, kind="stable")[:k]
            items = []
            for c, s, m in zip(
                idx[order].tolist(), score[order].tolist(), mutual[order].tolist(), strict=True
            ):
                m = int(m)
                items.append(Scored(names[c], s, REASON_MUTUAL if m > 0 else REASON_TASTE, m))
            rank = time.perf_counter() - r0 - t_alone
            out[r.at] = Result(items, False, _timings(t_tower, t_batch + t_alone, rank), r.unknown)

    def popular_friends(self, user_id: str, k: int, exclude: Collection[str] = ()) -> Result:
        """Best-connected users at training time, minus self and ``exclude``; rank-based scores."""
        t0 = time.perf_counter()
        users = self.user_index
        skip = {j for u in exclude if (j := users.get(u)) is not None}
        me = users.get(user_id)
        if me is not None:
            skip.add(me)
        out = _popular(self.popular_users, self.user_ids, skip, k)
        return Result(out, True, _timings(rank=time.perf_counter() - t0))

    # ---- lifecycle ---------------------------------------------------------------------

    def warmup(self, rounds: int = 3) -> None:
        """Run every path at short and full input lengths so the first request is not slow."""
        items = [self.item_ids[j] for j in self.popular_items.tolist()] or self.item_ids
        users = [self.user_ids[j] for j in self.popular_users.tolist()] or self.user_ids
        if not items or not users:
            return
        cfg = self.config
        for _ in range(rounds):
            for n in (1, 8, cfg.max_history):
                hist = [(items[i % len(items)], 1.0) for i in range(n)]
                fr = [users[i % len(users)] for i in range(min(n, cfg.max_friends))]
                self.recommend_content(hist, fr, 10)
                self.recommend_friends(users[0], hist, fr[1:], {users[-1]: 2}, 10)
            self.popular_content(10)
            self.popular_friends(users[0], 10)
            hist = [(item, 1.0) for item in items[:8]]
            batch = [
                ContentQuery(hist, users[:2], 10),
                FriendQuery(users[0], hist, users[1:3], {}, 10),
            ]
            self.recommend_batch(batch * (MAX_BATCH // 2))


def _popular(pop: np.ndarray, names: list[str], skip: set[int], k: int) -> list[Scored]:
    """First k entries of a cold-start list not in ``skip``; score 1 / (1 + rank) keeps order."""
    out: list[Scored] = []
    for rank, j in enumerate(pop.tolist()):
        if j in skip:
            continue
        out.append(Scored(names[j], 1.0 / (1 + rank), REASON_POPULAR))
        if len(out) == k:
            break
    return out
