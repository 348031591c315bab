"""`socialrec coldstart-eval`: the item cold-start protocol for fresh-item fold-in.

``run(ColdStartConfig) -> report path``; the CLI only parses arguments. The estimator under
test is :func:`socialrec.serving.fresh.fold_in` (docs/design.md "Fresh items: fold-in").

The protocol, on a training run's dataset and protocol split (training/split.py):

1. **Hold out items.** Eligible: items with at least ``max(replays) + min_remaining``
   interactions in the whole dataset (enough to replay the largest N and still score
   ``min_remaining`` other users). ``holdout_share`` of the eligible items are drawn with
   ``seed`` and halved into *validation* and *test* items. Every interaction of a held-out
   item leaves training.
2. **Train** a model on the run's training part minus the held-out items (the held-out items
   are not in its catalogue at all: ids are remapped), with the run's train config and a
   fixed epoch count (the run's selected content epoch; no re-selection).
3. **Replay** each held-out item's first N interactions (timestamp order when the data has
   timestamps, else a seeded order): the "live writes". The rest of the item's interactions
   are its *remaining* interactions.
4. **Score** recall / NDCG at 10 and 20 on the held-out items' remaining interactions, for
   each user who has one (the replaying users of an item are not its targets; their replayed
   items are masked), ranking either over the stage's fresh items only (``fresh``) or over
   the whole known catalogue plus the stage's fresh items (``catalogue``: fresh items must
   compete with the catalogue; the user's training items are masked). The same catalogue
   ranking is also scored on ``known`` targets, a seeded half of the protocol split's test
   rows of known items (the other half belongs to the other stage), and on ``overall`` (both
   target sets), so a method that pushes fresh items everywhere shows what it displaces.
5. **Compare** fold-in (the estimator on the replaying users' tower outputs), most popular
   among the fresh items (by summed replayed weight: every fresh item has exactly N replayed
   interactions, so the count alone ties), no fresh items at all (today), and a full retrain
   that saw the replayed interactions (all held-out items' first N added to training, same
   settings and epochs: the upper bound).

Every choice (estimator, lam, negatives, calibration, weight transform, whether fresh items
enter the user tower's input, min_interactions) is made on the validation items, under a
budget on the known-item recall fresh items may cost (``known_drop_budget``; the rule is
written into the report); the test items are scored once, with the chosen settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from socialrec.serving.fresh import RUN_CHOICE, FoldInConfig, FoldInPrior, fold_in
from socialrec.training.dataset import Dataset
from socialrec.training.features import Features
from socialrec.training.metrics import Graph, recall_ndcg, topk
from socialrec.training.model import TwoTower, with_bias_slot
from socialrec.training.split import Split
from socialrec.training.train import TrainConfig, fit, load_checkpoint, save_checkpoint

STAGES = ("validation", "test")
KS = (10, 20)
_EMPTY_PAIRS = np.zeros((0, 2), np.int32)


@dataclass(frozen=True)
class ColdStartConfig:
    run: str = "runs/synthetic"
    out: str = "benchmarks/reports/coldstart-synthetic.json"
    holdout_share: float = 0.2  # share of the eligible items held out (half validation, half test)
    replays: tuple[int, ...] = (1, 2, 5, 10, 20)  # N: interactions replayed per held-out item
    retrain_replays: tuple[int, ...] | None = None  # N with a full retrain (None: every N)
    min_remaining: int = 5  # eligible items keep at least this many interactions to score
    seed: int = 0
    epochs: int | None = None  # None: the run's selected content epoch
    threads: int = 1  # torch threads while training
    cache_dir: str | None = (
        None  # trained models, reused when the protocol matches (None: RUN/coldstart)
    )
    plot: bool = True
    progress: bool = True
    validation_only: bool = False  # stop after the validation choices (test items untouched)
    known_drop_budget: float = 0.05  # most relative known-item recall@20 fresh items may cost
    command: str = ""  # the command line, for the report


# --------------------------------------------------------------------------- the holdout


@dataclass
class Stage:
    """One stage's fresh items at one N: replayed rows (the live writes) and remaining rows."""

    items: np.ndarray  # (S,) held-out item indices of the stage, sorted
    n: int
    replay_user: np.ndarray
    replay_item: np.ndarray
    replay_weight: np.ndarray
    replay_rank: np.ndarray  # position in the item's replay order (0 = earliest)
    remaining_user: np.ndarray
    remaining_item: np.ndarray


@dataclass
class ItemHoldout:
    """Held-out items, every interaction's replay rank, and what training keeps."""

    n_users: int
    n_items: int
    items: dict[str, np.ndarray]  # stage -> sorted held-out item indices
    user: np.ndarray  # (N,) every interaction of the dataset
    item: np.ndarray
    weight: np.ndarray
    rank: np.ndarray  # (N,) position of the row in its item's replay order
    train_user: np.ndarray  # the protocol split's training rows of known items
    train_item: np.ndarray
    train_weight: np.ndarray
    known_targets: dict[str, tuple[np.ndarray, np.ndarray]]  # stage -> (user, item)
    friends_train: np.ndarray
    order: str  # "timestamp" or "seeded"
    eligible: int  # number of eligible items
    rule: str = ""

    @property
    def held(self) -> np.ndarray:
        """(I,) True for every held-out item (both stages)."""
        h = np.zeros(self.n_items, bool)
        for items in self.items.values():
            h[items] = True
        return h

    @property
    def known_items(self) -> np.ndarray:
        return np.flatnonzero(~self.held)

    def stage(self, name: str, n: int) -> Stage:
        items = self.items[name]
        mine = np.isin(self.item, items)
        rep = mine & (self.rank < n)
        rem = mine & (self.rank >= n)
        return Stage(
            items=items,
            n=n,
            replay_user=self.user[rep],
            replay_item=self.item[rep],
            replay_weight=self.weight[rep],
            replay_rank=self.rank[rep],
            remaining_user=self.user[rem],
            remaining_item=self.item[rem],
        )

    def mask(self, st: Stage) -> Graph:
        """What a user is never recommended: training items and the fresh items they replayed."""
        return Graph(
            self.n_users,
            np.concatenate([self.train_user, st.replay_user]),
            np.concatenate([self.train_item, st.replay_item]),
        )

    def fresh_targets(self, st: Stage) -> Graph:
        """The fresh items' remaining interactions: only these count as hits."""
        return Graph(self.n_users, st.remaining_user, st.remaining_item)

    def known_graph(self, name: str) -> Graph:
        """The stage's half of the protocol split's test rows of known items."""
        ku, ki = self.known_targets[name]
        return Graph(self.n_users, ku, ki)

    def overall_targets(self, name: str, st: Stage) -> Graph:
        """The fresh items' remaining interactions plus the stage's half of known test rows."""
        ku, ki = self.known_targets[name]
        return Graph(
            self.n_users,
            np.concatenate([ku, st.remaining_user]),
            np.concatenate([ki, st.remaining_item]),
        )

    def training_split(self, replay_n: int | None) -> tuple[Split, np.ndarray]:
        """The training data and, per model item, its dataset item index.

        ``replay_n=None``: the base model, known items only (held-out items are not in its
        catalogue: compact ids). ``replay_n=N``: the full retrain, every item, the training
        rows plus the first N interactions of every held-out item (both stages).
        """
        if replay_n is None:
            items = self.known_items
            remap = np.full(self.n_items, -1, np.int64)
            remap[items] = np.arange(len(items))
            u, i, w = self.train_user, remap[self.train_item].astype(np.int32), self.train_weight
            n_items = len(items)
        else:
            rep = self.held[self.item] & (self.rank < replay_n)
            u = np.concatenate([self.train_user, self.user[rep]])
            i = np.concatenate([self.train_item, self.item[rep]])
            w = np.concatenate([self.train_weight, self.weight[rep]])
            items = np.arange(self.n_items)
            n_items = self.n_items
        empty = np.zeros(0, np.int32)
        split = Split(
            n_users=self.n_users,
            n_items=n_items,
            train_user=u.astype(np.int32),
            train_item=i.astype(np.int32),
            train_weight=w.astype(np.float32),
            test_user=empty,
            test_item=empty,
            friends_train=self.friends_train,
            friends_test=_EMPTY_PAIRS,
            seed=0,
        )
        return split, items

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (self.items["validation"], self.items["test"], self.rank, self.train_item):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def replay_order(ds: Dataset, seed: int) -> tuple[np.ndarray, str]:
    """(rank of every row within its item, "timestamp" | "seeded"): timestamps ascending when
    the data has them (ties in a seeded order), else a seeded random order."""
    rng = np.random.default_rng(seed)
    tie = rng.random(ds.n_interactions)
    if ds.inter_ts is not None:
        order = np.lexsort((tie, ds.inter_ts, ds.inter_item))
        how = "timestamp"
    else:
        order = np.lexsort((tie, ds.inter_item))
        how = "seeded"
    counts = np.bincount(ds.inter_item, minlength=ds.n_items)
    starts = np.zeros(ds.n_items + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    rank = np.empty(ds.n_interactions, np.int64)
    rank[order] = np.arange(ds.n_interactions) - starts[ds.inter_item[order]]
    return rank, how


def make_holdout(
    ds: Dataset,
    split: Split,
    share: float,
    max_replay: int,
    min_remaining: int,
    seed: int,
) -> ItemHoldout:
    """Draw the held-out items (see the module docstring for the rule) and the replay order."""
    if not 0 < share <= 1:
        raise ValueError(f"holdout share must be in (0, 1], got {share}")
    if max_replay < 1 or min_remaining < 1:
        raise ValueError("the largest replay count and min_remaining must be >= 1")
    need = max_replay + min_remaining
    counts = np.bincount(ds.inter_item, minlength=ds.n_items)
    eligible = np.flatnonzero(counts >= need)
    n_hold = int(np.floor(share * len(eligible) + 0.5))
    if n_hold < 2:
        raise ValueError(
            f"{len(eligible)} items have >= {need} interactions; holding out {share:.0%} of them "
            "leaves fewer than 2 (one validation and one test item): lower --replay or raise "
            "--holdout-share"
        )
    rng = np.random.default_rng(seed)
    chosen = rng.choice(eligible, n_hold, replace=False)
    items = {"validation": np.sort(chosen[: n_hold // 2]), "test": np.sort(chosen[n_hold // 2 :])}
    held = np.zeros(ds.n_items, bool)
    held[chosen] = True
    rank, how = replay_order(ds, seed + 1)
    keep = ~held[split.train_item]
    tk = ~held[split.test_item]
    tu, ti = split.test_user[tk], split.test_item[tk]
    half = np.random.default_rng(seed + 2).random(len(tu)) < 0.5
    return ItemHoldout(
        n_users=ds.n_users,
        n_items=ds.n_items,
        items=items,
        user=ds.inter_user,
        item=ds.inter_item,
        weight=ds.inter_weight,
        rank=rank,
        train_user=split.train_user[keep],
        train_item=split.train_item[keep],
        train_weight=split.train_weight[keep],
        known_targets={"validation": (tu[half], ti[half]), "test": (tu[~half], ti[~half])},
        friends_train=split.friends_train,
        order=how,
        eligible=len(eligible),
        rule=(
            f"items with >= {need} interactions (max replay {max_replay} + {min_remaining} to "
            f"score) are eligible; {share:g} of them ({n_hold} of {len(eligible)}) drawn with "
            f"seed {seed}, the first half validation, the second test"
        ),
    )


# --------------------------------------------------------------------------- vectors, scoring


@torch.no_grad()
def user_vectors(model: TwoTower, split: Split, cfg: TrainConfig) -> np.ndarray:
    """(U, D + 1) content_vector of every user (the served tower output, bias slot included)
    from the split's training rows and friends, as the online store would hold them."""
    model.eval()
    feats = Features.from_split(split, cfg.max_history, cfg.max_friends)
    out = []
    for s in range(0, split.n_users, 512):
        b = np.arange(s, min(s + 512, split.n_users))
        hi, hw = feats.history(b)
        fi, fw = feats.friends(b)
        u_c, _ = model.user_tower(*(torch.from_numpy(a) for a in (hi, hw, fi, fw)))
        out.append(with_bias_slot(u_c).numpy())
    return np.concatenate(out).astype(np.float32)


@torch.no_grad()
def item_rows(model: TwoTower, items: np.ndarray, n_items: int) -> np.ndarray:
    """(I, D + 1) item rows [v, b] in dataset item indices (NaN for items the model lacks)."""
    v = model.item_vectors().numpy()
    out = np.full((n_items, v.shape[1]), np.nan, np.float32)
    out[items] = v
    return out


class Ranker:
    """Scores of one model's users: the known catalogue precomputed, fresh columns per call."""

    def __init__(self, users: np.ndarray, rows: np.ndarray, known: np.ndarray) -> None:
        self.users = users  # (U, D1)
        self.n_items = rows.shape[0]
        self.known = known
        s = np.full((users.shape[0], self.n_items), -np.inf, np.float32)
        s[:, known] = users @ rows[known].T
        self.known_scores = s

    def with_users(self, changed: np.ndarray, users: np.ndarray, rows: np.ndarray) -> Ranker:
        """The same ranker with some users' vectors replaced (``users`` is the full new table)."""
        r = object.__new__(Ranker)
        r.users, r.n_items, r.known = users, self.n_items, self.known
        r.known_scores = self.known_scores.copy()
        if len(changed):
            r.known_scores[np.ix_(changed, self.known)] = users[changed] @ rows[self.known].T
        return r

    def score_fn(
        self, items: np.ndarray, rows: np.ndarray | None, catalogue: bool, const=None
    ) -> Callable[[np.ndarray], np.ndarray]:
        """Scores (B, I) over the catalogue (known + ``items``), or (B, len(items)) over
        ``items`` only (rank those with ``columns=items``); ``items`` are scored by ``rows``
        (inner product) or by a per-item constant ``const`` (popularity)."""

        def fn(b: np.ndarray) -> np.ndarray:
            if not len(items):
                fresh = np.zeros((len(b), 0), np.float32)
            elif const is None:
                fresh = self.users[b] @ rows.T
            else:
                fresh = np.tile(const, (len(b), 1))
            if not catalogue:
                return fresh.astype(np.float32)
            s = self.known_scores[b].copy()
            s[:, items] = fresh
            return s

        return fn


def rank_metrics(
    score_fn: Callable[[np.ndarray], np.ndarray],
    mask: Graph,
    targets: dict[str, Graph],
    n_items: int,
    columns: np.ndarray | None = None,
    ks: Sequence[int] = KS,
    batch_size: int = 256,
) -> dict[str, dict]:
    """Recall@K / NDCG@K of one ranking per user against several target sets at once.

    The protocol of training/metrics.py (masked entries -inf, ties by lower index, binary
    gains, mean over the users with >= 1 target in each set). ``columns``: the score
    function ranks only these items (mask entries elsewhere are irrelevant; targets
    elsewhere are misses).
    """
    if columns is None:
        colmap = np.arange(n_items)
    else:
        colmap = np.full(n_items, -1, np.int64)
        colmap[columns] = np.arange(len(columns))
    has = {name: g.counts() > 0 for name, g in targets.items()}
    users = np.flatnonzero(np.logical_or.reduce(list(has.values())))
    kmax = max(ks)
    sums = {
        name: {f"{m}@{k}": 0.0 for m in ("recall", "ndcg", "hits") for k in ks} for name in targets
    }
    for start in range(0, len(users), batch_size):
        b = users[start : start + batch_size]
        s = np.array(score_fn(b), dtype=np.float32, copy=True)
        rows, cols = mask.batch(b)
        c = colmap[cols]
        s[rows[c >= 0], c[c >= 0]] = -np.inf
        top = topk(s, kmax)
        for name, g in targets.items():
            sel = has[name][b]
            if not sel.any():
                continue
            rel = np.zeros(s.shape, bool)
            rows, cols = g.batch(b)
            c = colmap[cols]
            rel[rows[c >= 0], c[c >= 0]] = True
            hits = np.take_along_axis(rel, top, axis=1)[sel]
            n_rel = g.counts()[b][sel]
            for k in ks:
                r, n = recall_ndcg(hits, n_rel, k)
                sums[name][f"recall@{k}"] += float(r.sum())
                sums[name][f"ndcg@{k}"] += float(n.sum())
                sums[name][f"hits@{k}"] += float(hits[:, :k].sum())
    out = {}
    for name in targets:
        n_users = int(has[name].sum())
        out[name] = {
            key: int(v) if key.startswith("hits") else round(v / max(n_users, 1), 6)
            for key, v in sums[name].items()
        }
        out[name]["users"] = n_users
        out[name]["targets"] = int(targets[name].counts().sum())
    return out


def fold_in_stage(
    st: Stage, users: np.ndarray, prior: FoldInPrior, cfg: FoldInConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(items that got a vector, their rows) for the stage's fresh items from their replays."""
    order = np.lexsort((st.replay_rank, st.replay_item))
    ri, ru, rw, rr = (
        a[order] for a in (st.replay_item, st.replay_user, st.replay_weight, st.replay_rank)
    )
    starts = np.searchsorted(ri, st.items, side="left")
    ends = np.searchsorted(ri, st.items, side="right")
    got, rows = [], []
    for item, s, e in zip(st.items, starts, ends, strict=True):
        if e <= s:
            continue
        theta = fold_in(users[ru[s:e]], rw[s:e], prior, cfg, timestamps=rr[s:e])
        if theta is not None:
            got.append(item)
            rows.append(theta)
    if not got:
        return np.zeros(0, np.int64), np.zeros((0, prior.dim), np.float32)
    return np.asarray(got, np.int64), np.stack(rows)


def popularity(st: Stage) -> np.ndarray:
    """(S,) summed replayed weight of each stage item (the fresh-items popularity baseline)."""
    pos = np.searchsorted(st.items, st.replay_item)
    return np.bincount(pos, weights=st.replay_weight, minlength=len(st.items)).astype(np.float32)


def make_prior(users: np.ndarray, rows: np.ndarray, h: ItemHoldout, seed: int) -> FoldInPrior:
    """The base model's catalogue statistics: every user's tower output, every known item's
    row, and up to 200,000 training pairs for the mean positive score."""
    known = h.known_items
    rng = np.random.default_rng(seed)
    n = len(h.train_user)
    pick = rng.choice(n, min(n, 200_000), replace=False) if n else np.zeros(0, np.int64)
    remap = np.full(h.n_items, -1, np.int64)
    remap[known] = np.arange(len(known))
    return FoldInPrior.from_catalogue(
        users, rows[known], h.train_user[pick], remap[h.train_item[pick]]
    )


def substituted_users(
    model: TwoTower,
    split: Split,
    known: np.ndarray,
    cfg: TrainConfig,
    st: Stage,
    items: np.ndarray,
    rows: np.ndarray,
    base_rows: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(changed users, all users' vectors) when each replayed fresh item enters its user's
    tower input as the known item nearest (cosine of v) to the fresh item's folded-in row."""
    if not len(items):
        return np.zeros(0, np.int64), user_vectors(model, split, cfg)
    kv = base_rows[known, :-1]
    kv = kv / np.linalg.norm(kv, axis=1, keepdims=True).clip(1e-12)
    fv = rows[:, :-1] / np.linalg.norm(rows[:, :-1], axis=1, keepdims=True).clip(1e-12)
    nearest = np.argmax(fv @ kv.T, axis=1)  # compact (model) ids of the nearest known items
    sub = np.full(int(st.items.max()) + 1, -1, np.int64)  # fresh item -> its stand-in
    sub[items] = nearest
    has = np.isin(st.replay_item, items)
    u = st.replay_user[has]
    i = sub[st.replay_item[has]]
    w = st.replay_weight[has]
    have = set(zip(split.train_user.tolist(), split.train_item.tolist(), strict=True))
    new = np.array([(a, b) not in have for a, b in zip(u.tolist(), i.tolist(), strict=True)], bool)
    u, i, w = u[new], i[new], w[new]
    aug = replace(
        split,
        train_user=np.concatenate([split.train_user, u.astype(np.int32)]),
        train_item=np.concatenate([split.train_item, i.astype(np.int32)]),
        train_weight=np.concatenate([split.train_weight, w.astype(np.float32)]),
    )
    return np.unique(u).astype(np.int64), user_vectors(model, aug, cfg)


# --------------------------------------------------------------------------- training


def content_epochs(report: dict) -> int:
    """The run's selected content epoch (its refit's, else its selection's)."""
    log = report["teacher"]["train_log"]
    e = (log.get("refit") or {}).get("epochs", {}).get("content")
    if e is None:
        e = log["best"]["content"]["epoch"]
    if not e:
        raise ValueError("the run's report names no selected content epoch; pass --epochs")
    return int(e)


def train_or_load(
    split: Split, tc: TrainConfig, epochs: int, path: Path, key: str, progress: bool, desc: str
) -> tuple[TwoTower, float, bool]:
    """Train (fixed epochs, no selection) or reuse the checkpoint trained for the same key."""
    if path.exists():
        model, ck = load_checkpoint(path)
        if ck["extra"].get("coldstart_key") == key:
            return model, float(ck["extra"].get("seconds", 0.0)), True
    t0 = time.time()
    model, _ = fit(split, tc, epochs, progress=progress, desc=desc)
    secs = time.time() - t0
    save_checkpoint(model, tc, path, extra={"coldstart_key": key, "seconds": secs})
    return model, secs, False


def _key(h: ItemHoldout, tc: TrainConfig, epochs: int, what: str) -> str:
    blob = json.dumps([h.fingerprint(), asdict(tc), epochs, what], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------- the grid


def candidate_configs() -> list[FoldInConfig]:
    """The estimators compared on the validation items (binary weights, every user used)."""
    out = []
    for scale in (0.5, 0.6, 0.7, 0.8, 1.0, 1.5):
        for q in (0.5, 0.9):
            out.append(FoldInConfig(method="mean", scale=scale, bias_quantile=q))
    for scale in (0.5, 1.0, 2.0):
        out.append(FoldInConfig(method="mean_centered", scale=scale))
    for neg in (0.0, 3.0, 30.0, 300.0):
        for lam in (0.1, 1.0, 10.0, 100.0):
            out.append(FoldInConfig(method="ridge", lam=lam, negatives=neg, calibration="none"))
    for lam, neg in ((10.0, 0.0), (100.0, 0.0), (1000.0, 0.0), (100.0, 30.0)):
        for scale in (0.7, 1.0):
            out.append(FoldInConfig(method="ridge", lam=lam, negatives=neg, scale=scale))
    return out


def config_name(c: FoldInConfig) -> str:
    base = f"ridge(lam={c.lam:g},neg={c.negatives:g})" if c.method == "ridge" else c.method
    if c.calibration == "catalogue":
        base += f"|scale={c.scale:g},bias=q{c.bias_quantile:g}"
    return base if c.weight_transform == "binary" else f"{base},w={c.weight_transform}"


def _mean_over(results: dict, key: str, metric: str = "recall@20") -> float:
    return float(np.mean([results[n][key][metric] for n in results]))


Graphs = tuple[Graph, Graph, Graph, Graph]  # mask, fresh targets, known targets, overall


def stage_metrics(
    h: ItemHoldout, ranker: Ranker, graphs: Graphs, items: np.ndarray, rows: np.ndarray | None
) -> dict:
    """One method on one stage: ``fresh`` (fresh items only), and over the catalogue the
    fresh items' remaining interactions (``catalogue``), the known-item targets (``known``)
    and both (``overall``)."""
    mask, fresh, known, overall = graphs
    out = {}
    if len(items):
        out["fresh"] = rank_metrics(
            ranker.score_fn(items, rows, False), mask, {"fresh": fresh}, h.n_items, columns=items
        )["fresh"]
    targets = {"catalogue": fresh, "known": known, "overall": overall}
    out.update(rank_metrics(ranker.score_fn(items, rows, True), mask, targets, h.n_items))
    return out


@dataclass
class Evaluation:
    """Everything the stages need from the base model."""

    h: ItemHoldout
    ranker: Ranker
    users: np.ndarray
    prior: FoldInPrior
    model: TwoTower
    split: Split
    rows: np.ndarray
    tc: TrainConfig
    stages: dict = field(default_factory=dict)

    def stage(self, name: str, n: int) -> tuple[Stage, Graphs]:
        key = (name, n)
        if key not in self.stages:
            self.stages[key] = stage_graphs(self.h, name, n)
        return self.stages[key]

    def foldin(self, name: str, n: int, cfg: FoldInConfig, substitute: bool = False) -> dict:
        st, graphs = self.stage(name, n)
        items, rows = fold_in_stage(st, self.users, self.prior, cfg)
        ranker = self.ranker
        if substitute:
            changed, users = substituted_users(
                self.model, self.split, self.h.known_items, self.tc, st, items, rows, self.rows
            )
            ranker = ranker.with_users(changed, users, self.rows)
        out = stage_metrics(self.h, ranker, graphs, items, rows)
        out.update({"items_with_vector": len(items), "items": len(st.items)})
        return out

    def popular(self, name: str, n: int) -> dict:
        st, (mask, fresh, _, _) = self.stage(name, n)
        fn = self.ranker.score_fn(st.items, None, False, const=popularity(st))
        return rank_metrics(fn, mask, {"fresh": fresh}, self.h.n_items, columns=st.items)

    def none(self, name: str, n: int) -> dict:
        _, graphs = self.stage(name, n)
        return stage_metrics(self.h, self.ranker, graphs, np.zeros(0, np.int64), None)


def stage_graphs(h: ItemHoldout, name: str, n: int) -> tuple[Stage, Graphs]:
    st = h.stage(name, n)
    return st, (h.mask(st), h.fresh_targets(st), h.known_graph(name), h.overall_targets(name, st))


def retrain_ranker(h: ItemHoldout, model: TwoTower, split: Split, tc: TrainConfig):
    """(ranker, item rows) of a full retrain: its own user vectors (the replayed interactions
    in their history) and item rows."""
    users = user_vectors(model, split, tc)
    rows = item_rows(model, np.arange(h.n_items), h.n_items)
    return Ranker(users, rows, h.known_items), rows


def retrain_metrics(h: ItemHoldout, ranker: Ranker, rows: np.ndarray, name: str, n: int) -> dict:
    """The full retrain's metrics on one stage: the same candidates, masks and targets as
    fold-in, the retrain's own vectors for every item."""
    st, graphs = stage_graphs(h, name, n)
    return stage_metrics(h, ranker, graphs, st.items, rows[st.items])


# --------------------------------------------------------------------------- timing


_TIMING = """
import json, sys, time
from socialrec.serving.threads import pin_threads
pin_threads()
import numpy as np
from socialrec.serving.fresh import FoldInConfig, FoldInPrior, fold_in
prior = FoldInPrior.load(sys.argv[1])
cfg = FoldInConfig(**json.loads(sys.argv[2]))
rng = np.random.default_rng(0)
out = {}
for n in (1, 5, 20, 100):
    x = rng.uniform(-1, 1, (n, prior.dim)).astype(np.float32)
    x[:, -1] = 1
    w = np.ones(n, np.float32)
    c = FoldInConfig(**{**cfg.__dict__, "min_interactions": 1, "max_users": max(n, cfg.max_users)})
    fold_in(x, w, prior, c)  # caches the item-independent inverse, as a worker does once
    reps = max(50, 20000 // n)
    best = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fold_in(x, w, prior, c)
        best.append((time.perf_counter() - t) / reps)
    out[str(n)] = round(min(best) * 1e6, 1)
print(json.dumps(out))
"""


def estimator_timing(prior: FoldInPrior, cfg: FoldInConfig, tmp: Path) -> dict[str, float]:
    """Microseconds per fold_in call at 1, 5, 20 and 100 users (best of 5 loops), measured
    in a fresh interpreter pinned to one BLAS thread, as a server worker runs it."""
    path = prior.save(tmp / "prior.npz")
    r = subprocess.run(
        [sys.executable, "-c", _TIMING, str(path), json.dumps(asdict(cfg))],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    )
    if r.returncode != 0:
        raise RuntimeError(f"timing subprocess failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the run


def _log(cfg: ColdStartConfig, msg: str) -> None:
    if cfg.progress:
        print(f"[coldstart] {msg}", flush=True)


def known_drop(res: dict, none: dict) -> float:
    """Relative loss of known-item recall@20 when fresh items are served (0: none displaced)."""
    base = none["known"]["recall@20"]
    return (base - res["known"]["recall@20"]) / base if base > 0 else 0.0


def select(candidates: dict[str, dict], none: dict, allowed: dict) -> tuple[str, dict]:
    """The candidate with the highest mean catalogue recall@20 on fresh items among those whose
    mean known-recall loss is at most the allowed mean loss; if none qualifies, the one that
    loses least. ``candidates``: name -> {N: metrics}; returns (name, per-candidate summary)."""
    ns = sorted(allowed)
    limit = float(np.mean([allowed[n] for n in ns]))
    summary = {}
    for name, res in candidates.items():
        drop = float(np.mean([known_drop(res[n], none[n]) for n in ns]))
        summary[name] = {
            "mean_catalogue_recall@20": round(_mean_over(res, "catalogue"), 6),
            "mean_known_drop": round(drop, 6),
            "within_limit": drop <= limit,
        }
    ok = [k for k, v in summary.items() if v["within_limit"]]
    if ok:
        best = max(ok, key=lambda k: summary[k]["mean_catalogue_recall@20"])
    else:
        best = min(summary, key=lambda k: summary[k]["mean_known_drop"])
    return best, {"limit_mean_known_drop": round(limit, 6), "candidates": summary}


OPTION_MARGIN = 0.02  # a non-default option must beat the default by this much (relative)


def select_option(
    candidates: dict[str, dict], default_name: str, none: dict, allowed: dict
) -> tuple[str, dict]:
    """``default_name`` unless another candidate is within the budget and has a mean catalogue
    recall@20 at least OPTION_MARGIN (relative) higher."""
    _, summary = select(candidates, none, allowed)
    base = summary["candidates"][default_name]["mean_catalogue_recall@20"]
    best = default_name
    for name, c in summary["candidates"].items():
        if (
            name != default_name
            and c["within_limit"]
            and c["mean_catalogue_recall@20"] >= (1 + OPTION_MARGIN) * base
            and c["mean_catalogue_recall@20"]
            > summary["candidates"][best]["mean_catalogue_recall@20"]
        ):
            best = name
    return best, summary


def run(cfg: ColdStartConfig) -> Path:
    """Run the protocol (module docstring) on ``cfg.run``; write the report (and plot)."""
    from socialrec.training.run import load_run

    t_start = time.time()
    run_dir = Path(cfg.run)
    replays = tuple(sorted(set(cfg.replays)))
    if not replays or replays[0] < 1:
        raise ValueError("--replay needs one or more counts >= 1")
    retrain_ns = replays if cfg.retrain_replays is None else tuple(sorted(set(cfg.retrain_replays)))
    if not set(retrain_ns) <= set(replays):
        raise ValueError("every --retrain-replay count must also be a --replay count")
    ds, split, report = load_run(run_dir)
    run_cfg = json.loads((run_dir / "run.json").read_text())
    tc = replace(TrainConfig(**run_cfg["train"]), threads=cfg.threads)
    epochs = cfg.epochs or content_epochs(report)
    h = make_holdout(ds, split, cfg.holdout_share, max(replays), cfg.min_remaining, cfg.seed)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else run_dir / "coldstart"
    cache.mkdir(parents=True, exist_ok=True)
    _log(cfg, f"{ds.name}: {h.rule}; replay order {h.order}; {epochs} epochs per training")

    # Base model: no held-out item anywhere in its training data or catalogue.
    base_split, base_items = h.training_split(None)
    model, secs, cached = train_or_load(
        base_split, tc, epochs, cache / "base.pt", _key(h, tc, epochs, "base"), cfg.progress, "base"
    )
    trainings = {"base": {"seconds": round(secs, 1), "reused": cached}}
    users = user_vectors(model, base_split, tc)
    rows = item_rows(model, base_items, h.n_items)
    prior = make_prior(users, rows, h, cfg.seed)
    ev = Evaluation(
        h, Ranker(users, rows, h.known_items), users, prior, model, base_split, rows, tc
    )

    # ---- full retrains (the upper bound), one per N; scored on both stages. Nothing about
    # the test stage is looked at before the test stage's fold-in is scored below.
    retrain = {"validation": {}, "test": {}}
    retrain_none_val = {}
    for n in retrain_ns:
        rsplit, _ = h.training_split(n)
        rmodel, secs, cached = train_or_load(
            rsplit,
            tc,
            epochs,
            cache / f"retrain-{n}.pt",
            _key(h, tc, epochs, f"retrain-{n}"),
            cfg.progress,
            f"retrain N={n}",
        )
        trainings[f"retrain-{n}"] = {"seconds": round(secs, 1), "reused": cached}
        ranker, rrows = retrain_ranker(h, rmodel, rsplit, tc)
        for name in ("validation",) if cfg.validation_only else STAGES:
            retrain[name][n] = retrain_metrics(h, ranker, rrows, name, n)
        _, graphs = stage_graphs(h, "validation", n)
        retrain_none_val[n] = stage_metrics(h, ranker, graphs, np.zeros(0, np.int64), None)
        del ranker, rmodel
    if not 0 <= cfg.known_drop_budget < 1:
        raise ValueError(f"known-drop budget must be in [0, 1), got {cfg.known_drop_budget}")
    allowed = {n: cfg.known_drop_budget for n in replays}

    # ---- validation: every choice
    _log(cfg, "validation: estimator grid")
    val_none = {n: ev.none("validation", n) for n in replays}
    val_pop = {n: ev.popular("validation", n) for n in replays}
    grid = {}
    configs = {}
    for c in candidate_configs():
        grid[config_name(c)] = {n: ev.foldin("validation", n, c) for n in replays}
        configs[config_name(c)] = c
    best, grid_summary = select(grid, val_none, allowed)
    chosen = configs[best]
    _log(cfg, f"validation: best estimator {best}")

    # weight transform and tower input, on the chosen estimator: the model's own binary
    # weights and no change to the tower's input unless the alternative wins by OPTION_MARGIN
    wt = {"binary": grid[best]}
    wt["log1p"] = {
        n: ev.foldin("validation", n, replace(chosen, weight_transform="log1p")) for n in replays
    }
    best_wt, wt_summary = select_option(wt, "binary", val_none, allowed)
    chosen = replace(chosen, weight_transform=best_wt)
    tower = {"skip": wt[best_wt]}
    tower["nearest_known"] = {
        n: ev.foldin("validation", n, chosen, substitute=True) for n in replays
    }
    tower_choice, tower_summary = select_option(tower, "skip", val_none, allowed)
    substitute = tower_choice == "nearest_known"

    # min_interactions: from the smallest N on which, at every larger N too, folding in gains
    # at least as many fresh-item hits@20 as it costs known-item hits@20
    chosen_val = tower[tower_choice]
    exchange = {
        n: {
            "fresh_hits_gained": chosen_val[n]["catalogue"]["hits@20"],
            "known_hits_lost": val_none[n]["known"]["hits@20"] - chosen_val[n]["known"]["hits@20"],
        }
        for n in replays
    }
    fits = {n: e["fresh_hits_gained"] >= e["known_hits_lost"] for n, e in exchange.items()}
    ok = [n for i, n in enumerate(replays) if all(fits[m] for m in replays[i:])]
    min_n = ok[0] if ok else max(replays) + 1  # never pays off in the tested range
    chosen = replace(chosen, min_interactions=min_n, max_users=max(chosen.max_users, min_n))
    selection = {
        "rule": (
            "serving fresh items may cost known-item recall@20 (the stage's known-item test "
            f"rows, catalogue ranking) at most {cfg.known_drop_budget:.0%} relative to serving "
            "none (the budget). Estimator (method, lam, negatives, calibration, scale, bias "
            "quantile): among the configurations whose known-recall loss averaged over N is "
            "within the budget, the highest catalogue recall@20 on the fresh items averaged "
            "over N (none within: the one that loses least). Weight transform (log1p instead "
            "of the model's binary) and tower input (fresh items as their nearest known item "
            f"instead of skipped): only if within the budget and >= {OPTION_MARGIN:.0%} higher "
            "mean catalogue recall@20. min_interactions: the smallest N from which on, at "
            "every larger N too, fold-in gains at least as many fresh hits@20 as it loses "
            "known hits@20"
        ),
        "known_drop_budget": cfg.known_drop_budget,
        "retrain_known_drop": {
            n: round(known_drop(retrain["validation"][n], retrain_none_val[n]), 6)
            for n in retrain["validation"]
        },
        "estimator": grid_summary,
        "weight_transform": wt_summary,
        "tower_input": tower_summary,
        "hits_exchange_by_replay": exchange,
        "chosen": asdict(chosen),
        "chosen_name": config_name(chosen),
        "fresh_items_in_tower_input": tower_choice,
    }
    _log(
        cfg,
        f"chosen: {selection['chosen_name']}, min_interactions {min_n}, tower input {tower_choice}",
    )
    validation = {
        "grid": {name: _slim(res) for name, res in grid.items()},
        "grid_note": "recall@20, ndcg@20 and hits@20 per replay count and setting; users and "
        "targets per setting are those of `none` (catalogue, known, overall) and `popular` "
        "(fresh)",
        "none": val_none,
        "popular": val_pop,
        "weight_transform": wt,
        "tower_input": tower,
        "retrain": retrain["validation"],
        "retrain_without_fresh_items": retrain_none_val,
        "selection": selection,
    }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_choice(run_dir, chosen, out, tower_choice)
    if cfg.validation_only:
        rep = {"command": cfg.command, "validation_only": True, "validation": validation}
        out.write_text(json.dumps(_jsonable(rep), indent=2) + "\n")
        return out

    # ---- test: scored once with the chosen settings
    _log(cfg, "test: fold-in, popular, none")
    test = {}
    for n in replays:
        test[n] = {
            "fold_in": ev.foldin("test", n, chosen, substitute=substitute),
            "popular": ev.popular("test", n),
            "none": ev.none("test", n),
        }
        if n in retrain["test"]:
            test[n]["retrain"] = retrain["test"][n]
            ratio = {}
            for setting in ("fresh", "catalogue"):
                r = test[n]["retrain"][setting]["recall@20"]
                f = test[n]["fold_in"].get(setting, {}).get("recall@20", 0.0)
                ratio[setting] = round(f / r, 4) if r > 0 else None
            test[n]["ratio_fold_in_to_retrain_recall@20"] = ratio

    timing = {config_name(chosen): estimator_timing(prior, chosen, cache)}
    for c in (
        FoldInConfig(method="mean"),
        FoldInConfig(method="ridge", negatives=30.0),
        FoldInConfig(method="ridge", negatives=30.0, calibration="none"),
    ):
        if config_name(c) not in timing:
            timing[config_name(c)] = estimator_timing(prior, c, cache)
    rep = {
        "command": cfg.command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "run": str(run_dir),
        "dataset": ds.summary(),
        "settings": {
            **{k: v for k, v in asdict(cfg).items() if k not in ("command", "progress")},
            "epochs": epochs,
            "train_config": asdict(tc),
            "dim": int(users.shape[1] - 1),
        },
        "protocol": {
            "holdout_rule": h.rule,
            "eligible_items": h.eligible,
            "items": {s: len(h.items[s]) for s in STAGES},
            "replay_order": h.order,
            "base_training_interactions": len(base_split.train_user),
            "known_target_rows": {s: len(h.known_targets[s][0]) for s in STAGES},
            "candidates": {
                "fresh": "the stage's held-out items only (replayed ones masked per user)",
                "catalogue": "every known item plus the stage's held-out items with a vector "
                "(user's training items and replayed fresh items masked)",
                "overall": "as catalogue; targets = fresh remaining + the stage's half of the "
                "split's known-item test rows",
            },
            "popular": "fresh items by summed replayed weight (counts all equal N)",
            "retrain": f"from scratch on training + first N of every held-out item, {epochs} "
            "epochs, same train config",
            "trainings": trainings,
        },
        "validation": validation,
        "test": test,
        "estimator_us_per_call": {"chosen": timing[config_name(chosen)], **timing},
        "seconds": round(time.time() - t_start, 1),
    }
    rep = _jsonable(rep)
    out.write_text(json.dumps(rep, indent=2) + "\n")
    if cfg.plot:
        plot(rep, out.with_suffix(".png"))
    print(format_table(rep))
    return out


def write_choice(run_dir: Path, chosen: FoldInConfig, report: Path, tower_input: str) -> Path:
    """RUN_DIR/fresh_config.json: the validation choice, which every bundle exported or
    compressed from the run afterwards carries in its manifest (serving.fresh.manifest_block).
    Made on validation items only, so writing it before the test stage peeks at nothing."""
    path = run_dir / RUN_CHOICE
    doc = {
        "fold_in": asdict(chosen),
        "source": f"socialrec coldstart-eval validation choice ({report}, "
        f"{datetime.now(UTC).strftime('%Y-%m-%d')})",
        "fresh_items_in_tower_input": tower_input,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def _slim(res: dict) -> dict:
    """A grid entry without the @10 metrics and the per-setting counts (same for every entry)."""
    keep = ("recall@20", "ndcg@20", "hits@20")
    return {
        n: {k: {m: v[m] for m in keep} if isinstance(v, dict) else v for k, v in by_setting.items()}
        for n, by_setting in res.items()
    }


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def format_table(rep: dict) -> str:
    """The test results as a fixed-width table (what the command prints)."""
    lines = [
        f"{rep['dataset']['name']}: test items {rep['protocol']['items']['test']}, chosen "
        f"{rep['validation']['selection']['chosen_name']} "
        f"(min_interactions {rep['validation']['selection']['chosen']['min_interactions']}, "
        f"tower input {rep['validation']['selection']['fresh_items_in_tower_input']})",
        f"{'N':>3s} {'setting':9s} {'fold-in':>8s} {'popular':>8s} {'retrain':>8s} {'none':>8s} {'ratio':>6s}   (recall@20)",
    ]
    for n, t in rep["test"].items():
        for setting in ("fresh", "catalogue", "known", "overall"):
            cells = " ".join(
                _cell(t, m, setting) for m in ("fold_in", "popular", "retrain", "none")
            )
            ratio = (t.get("ratio_fold_in_to_retrain_recall@20") or {}).get(setting)
            rs = f"{ratio:6.2f}" if ratio is not None else f"{'-':>6s}"
            lines.append(f"{n:>3s} {setting:9s} {cells} {rs}")
    us = rep["estimator_us_per_call"]["chosen"]
    lines.append("fold_in us/call (users: us): " + ", ".join(f"{k}: {v}" for k, v in us.items()))
    return "\n".join(lines)


def _cell(t: dict, method: str, setting: str) -> str:
    e = t.get(method, {}).get(setting)
    return f"{e['recall@20']:8.4f}" if e else f"{'-':>8s}"


def plot(rep: dict, path: Path) -> Path | None:
    """Recall@20 vs replayed interactions per item: fold-in, popular, retrain (test items)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    t = rep["test"]
    ns = sorted(int(n) for n in t)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, setting in zip(axes, ("fresh", "catalogue"), strict=True):
        for m, style in (("fold_in", "o-"), ("retrain", "s--"), ("popular", "^:")):
            pts = [
                (n, t[str(n)][m][setting]["recall@20"])
                for n in ns
                if setting in t[str(n)].get(m, {})
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=m.replace("_", "-"))
        ax.set_xscale("log")
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("replayed interactions per fresh item (N)")
        ax.set_ylabel("recall@20 on fresh items' remaining interactions")
        ax.set_title(f"{rep['dataset']['name']}: candidates = {setting}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_counts(text: str) -> tuple[int, ...]:
    """ "1,2,5" -> (1, 2, 5)."""
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from e
    if not out or min(out) < 1:
        raise ValueError(f"expected counts >= 1, got {text!r}")
    return out


__all__: Sequence[str] = (
    "ColdStartConfig",
    "ItemHoldout",
    "Stage",
    "make_holdout",
    "replay_order",
    "run",
)
