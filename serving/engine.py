"""Retrieval core of the server: a verified bundle in, ranked items and friends out.

The engine runs the ONNX user tower once per request (batch 1) over what the online store
holds now (history, friends), searches the FAISS inner-product indexes, filters what the
user must not see again (seen items; self and existing friends) and blends friend-of-friend
counts into the friend score. It has no I/O after ``load`` and no torch: the gRPC servicer
injects the store's features and turns a :class:`Result` into a reply.

Read-only after ``load``, so one engine serves many threads. ONNX Runtime and FAISS are
pinned to one thread each (docs/design.md "Performance rules"): the server scales by processes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from socialrec.serving.bundle import (
    TOWER_INPUTS,
    TOWER_OUTPUTS,
    BundleError,
    BundleFiles,
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
    fof_weight: float = 1.0  # friend score = inner product + fof_weight * log1p(mutual)
    overfetch: int = 4  # extra FAISS candidates beyond k + excluded (margin for filtering)
    max_fof: int = 1000  # friend-of-friend candidates kept (most mutual friends first)
    # Friend scoring reads candidate vectors back from the users index. Up to this many bytes
    # they are decoded once at load into an (N, D + 1) float32 matrix (the same values the
    # index returns, ~0.01 us per row to read) instead of per request through the index
    # (~0.8 us per row for a padded SQ8 index); above it the index stays compressed in memory.
    decoded_users_max_bytes: int = 256 << 20


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
        raise BundleError(f"{root / what}: duplicate ids")
    return index


def _timings(onnx: float = 0.0, search: float = 0.0, rank: float = 0.0) -> dict[str, float]:
    return {"onnx": onnx, "faiss": search, "rank": rank}


class Engine:
    """ONNX user tower + FAISS indexes of one bundle; ``recommend_*`` are safe across threads."""

    def __init__(
        self,
        bundle: BundleFiles,
        session: ort.InferenceSession,
        items: faiss.Index,
        users: faiss.Index,
        config: EngineConfig = EngineConfig(),
    ) -> None:
        self.bundle = bundle
        self.version = bundle.version
        self.config = config
        self.session = session
        self.items = items
        self.users = users
        self.item_ids = bundle.item_ids
        self.user_ids = bundle.user_ids
        self.item_index = _id_map(bundle.item_ids, "item_ids.txt", bundle.root)
        self.user_index = _id_map(bundle.user_ids, "user_ids.txt", bundle.root)
        self.popular_items = bundle.popular_items.astype(np.int64)  # (P,)
        self.popular_users = bundle.popular_users.astype(np.int64)  # (P,)
        self._check()
        ensure_reconstruct(users, str(bundle.root / "users.faiss"))
        self.user_vectors: np.ndarray | None = None  # (N, D + 1) when small enough, see config
        if 0 < users.ntotal * users.d * 4 <= config.decoded_users_max_bytes:
            self.user_vectors = users.reconstruct_n(0, users.ntotal)
        self.fresh_prior = self._fresh_prior()

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
            session = ort.InferenceSession(
                str(bundle.path("user_tower.onnx")),
                session_options(),
                providers=["CPUExecutionProvider"],
            )
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
        ins = tuple(i.name for i in self.session.get_inputs())
        outs = {o.name: o.shape for o in self.session.get_outputs()}
        if set(ins) != set(TOWER_INPUTS) or not set(TOWER_OUTPUTS) <= set(outs):
            raise BundleError(
                f"{root / 'user_tower.onnx'}: inputs {ins} / outputs {tuple(outs)}, "
                f"expected {TOWER_INPUTS} / {TOWER_OUTPUTS}"
            )
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
    ) -> tuple[dict[str, np.ndarray], int, int, int, set[int]]:
        """Tower feeds from external ids: (feeds, known history, known friends, unknown, seen).

        History is cut to its first ``max_history`` entries, then unknown ids and entries
        without a positive finite weight are skipped; a repeated item sums its weights (the
        training data has one row per (user, item) with summed weight). Friends likewise
        (cut, unknown skipped, deduplicated). Empty lists become one padding entry. ``seen``
        is every known item of the whole history (what content results must leave out),
        collected in the same pass.
        """
        cfg = self.config
        items = self.item_index
        acc: dict[int, float] = {}
        seen: set[int] = set()
        unknown = 0
        for n, (item, w) in enumerate(history):
            j = items.get(item)
            if j is None:
                if n < cfg.max_history:
                    unknown += 1
                continue
            seen.add(j)
            if n < cfg.max_history and w > 0 and math.isfinite(w):
                acc[j] = acc.get(j, 0.0) + w
        users = self.user_index
        fr: dict[int, None] = {}
        for user in friends[: cfg.max_friends]:
            j = users.get(user)
            if j is None:
                unknown += 1
            else:
                fr[j] = None
        n_h, n_f = len(acc), len(fr)
        feeds = {
            "hist_ids": np.array([list(acc) or [0]], dtype=np.int64),  # (1, L)
            "hist_w": np.array([list(acc.values()) or [0.0]], dtype=np.float32),  # (1, L)
            "friend_ids": np.array([list(fr) or [0]], dtype=np.int64),  # (1, F)
            "friend_w": np.full((1, max(n_f, 1)), 1.0 if n_f else 0.0, dtype=np.float32),  # (1, F)
        }
        return feeds, n_h, n_f, unknown, seen

    def _tower(self, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
        (u,) = self.session.run([output], feeds)
        return np.ascontiguousarray(u, dtype=np.float32)  # (1, D + 1)

    def content_vector(
        self, history: Sequence[tuple[str, float]], friends: Sequence[str]
    ) -> np.ndarray | None:
        """The user's (D + 1,) content query vector, as ``recommend_content`` computes it, or
        None when the bundle knows none of the user's history and friends (no tower run)."""
        feeds, n_h, n_f, _, _ = self._features(history, friends)
        if n_h == 0 and n_f == 0:
            return None
        _pin_thread()
        return self._tower(feeds, "content_vector")[0]

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
        t0 = time.perf_counter()
        feeds, n_h, n_f, unknown, seen = self._features(history, friends)
        items = self.item_index
        banned = seen.union(j for item in exclude if (j := items.get(item)) is not None)
        if n_h == 0 and n_f == 0:
            res = self.popular_content(k, exclude=[item for item, _ in history], banned=banned)
            res.unknown = unknown
            return res
        _pin_thread()
        u = self._tower(feeds, "content_vector")  # (1, D + 1)
        t1 = time.perf_counter()
        n = self.items.ntotal
        kk = min(n, k + len(banned) + self.config.overfetch)
        t_search = 0.0
        while True:
            s0 = time.perf_counter()
            D, I = self.items.search(u, kk)  # noqa: E741  (1, kk) each; STYLE names D, I
            t_search += time.perf_counter() - s0
            ids, scores = I[0].tolist(), D[0].tolist()
            top = [(j, s) for j, s in zip(ids, scores, strict=True) if j >= 0 and j not in banned]
            if len(top) >= k or kk >= n:
                break
            kk = min(n, 2 * kk)  # an approximate index came back short: ask for more
        reason = REASON_TASTE if n_h else REASON_FRIENDS_LIKE
        names = self.item_ids
        out = [Scored(names[j], s, reason) for j, s in top[:k]]
        if fresh is not None and len(fresh) and fresh.index.d == u.shape[1]:
            s0 = time.perf_counter()
            out = self._merge_fresh(u, out, history, exclude, fresh, k)
            t_search += time.perf_counter() - s0
        t2 = time.perf_counter()
        return Result(
            out, False, _timings(t1 - t0, t_search, t2 - t1 - t_search), unknown, query=u,
            fresh_seq=fresh.seq if fresh is not None else None,
        )  # fmt: skip

    def _merge_fresh(
        self,
        u: np.ndarray,
        out: list[Scored],
        history: Sequence[tuple[str, float]],
        exclude: Collection[str],
        fresh: FreshIndex,
        k: int,
    ) -> list[Scored]:
        """``out`` merged by score with the side index's best admissible items (exact search:
        a flat index over few rows, so one search of k + filtered + overfetch suffices)."""
        banned = {item for item, _ in history}
        banned.update(exclude)
        n = fresh.index.ntotal
        kk = min(n, k + len(banned) + self.config.overfetch)
        D, I = fresh.index.search(u, kk)  # noqa: E741
        ids, known = fresh.ids, self.item_index
        extra = []
        for j, s in zip(I[0].tolist(), D[0].tolist(), strict=True):
            if j < 0:
                continue
            item = ids[j]
            if item in banned or item in known:
                continue
            extra.append(Scored(item, s, REASON_FRESH))
            if len(extra) == k:
                break
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

        score = u_f . [w, b] + fof_weight * log1p(mutual friends). Candidates are the
        k + |excluded| + overfetch nearest users plus every known friend-of-friend (at most
        ``max_fof``, most mutual first); the union holds the exact blended top-k of a flat
        index because the fof bonus is never negative. Every candidate's inner product is
        computed from the vector the index stores (decoded once at load when small enough,
        else ``reconstruct_batch``, C x (D + 1) floats per request): exact for
        flat/HNSW-flat, the same decoded vector the search scores
        for SQ/refined indexes, and fof-only candidates are scored like ANN ones.
        """
        t0 = time.perf_counter()
        users = self.user_index
        feeds, n_h, n_f, unknown, _ = self._features(history, friends)
        banned = {j for u in friends if (j := users.get(u)) is not None}
        banned.update(j for u in exclude if (j := users.get(u)) is not None)
        me = users.get(user_id)
        if me is not None:
            banned.add(me)
        cand_fof: dict[int, int] = {}
        for u, m in fof.items():
            j = users.get(u)
            if j is None:
                unknown += 1
            elif j not in banned:
                cand_fof[j] = max(int(m), 0)
        if n_h == 0 and n_f == 0 and not cand_fof:
            res = self.popular_friends(user_id, k, exclude=[*friends, *exclude])
            res.unknown = unknown
            return res
        if len(cand_fof) > self.config.max_fof:
            keep = sorted(cand_fof.items(), key=lambda p: -p[1])[: self.config.max_fof]
            cand_fof = dict(keep)
        _pin_thread()
        u = self._tower(feeds, "friend_vector")  # (1, D + 1)
        t1 = time.perf_counter()
        n = self.users.ntotal
        kk = min(n, k + len(banned) + self.config.overfetch)
        while True:
            _, I = self.users.search(u, kk)  # noqa: E741  (1, kk)
            cand = dict.fromkeys(j for j in I[0].tolist() if j >= 0 and j not in banned)
            cand.update(dict.fromkeys(cand_fof))
            if len(cand) >= k or kk >= n:
                break
            kk = min(n, 2 * kk)  # an approximate index came back short: ask for more
        t2 = time.perf_counter()
        idx = np.fromiter(cand, dtype=np.int64, count=len(cand))  # (C,)
        mutual = np.fromiter((cand_fof.get(j, 0) for j in cand), dtype=np.float32, count=len(cand))
        if self.user_vectors is not None:
            vecs = self.user_vectors[idx]  # (C, D + 1)
        else:
            vecs = self.users.reconstruct_batch(idx)  # (C, D + 1)
        score = vecs @ u[0] + self.config.fof_weight * np.log1p(mutual)  # (C,)
        order = np.argsort(-score, kind="stable")[:k]
        names = self.user_ids
        out = []
        for c, s, m in zip(
            idx[order].tolist(), score[order].tolist(), mutual[order].tolist(), strict=True
        ):
            m = int(m)
            out.append(Scored(names[c], s, REASON_MUTUAL if m > 0 else REASON_TASTE, m))
        t3 = time.perf_counter()
        return Result(out, False, _timings(t1 - t0, t2 - t1, t3 - t2), unknown)

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
