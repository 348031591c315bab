"""Synthetic social-recommendation data with known structure, at any size, without downloads.

Why: tests, demos and scale benchmarks need data whose signal is known: a taste model and a
friend-graph model should both beat popularity, and the generator must reach 1M users x
10M interactions in about a minute. Everything is vectorized numpy and seeded.

The model, in short:

* Users belong to communities (sizes vary); items belong to topics; inside a topic, item
  popularity is Zipf over a random ranking, so item popularity is heavy-tailed.
* Each community prefers a few "home" topics; each user also has one personal topic.
* User activity (number of draws) is Pareto (power law), capped, and at least 1.
* A draw is, with probability ``friend_copy``, a copy of a random friend's item; otherwise a
  taste draw: a home topic of the user's community (``community_taste``), the user's personal
  topic (``personal_taste``) or any item by popularity (the rest); the item inside a topic
  follows popularity. Each draw adds a lognormal integer play count. A user drawing an item
  again is a repeat listen, by design (taste and friends keep pointing at the same popular
  items): its play count is added to the pair's, and the load report counts these as
  ``repeat_interactions_summed``. Extra rounds of draws top up the unique pair count until it is
  within ``count_tolerance`` of ``n_interactions``; an overshoot is trimmed by dropping random
  surplus pairs (never a user's only pair).
* Friendships follow a Chung-Lu model on Pareto "sociability" weights (heavy-tailed degree),
  with a ``friends_in_community`` share of edges drawn inside the first endpoint's community.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from socialrec.training.dataset import Dataset, LoadReport
from tqdm.auto import tqdm

_T0_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z in ms: start of the synthetic timeline
_SPAN_MS = 365 * 24 * 3600 * 1000  # one year
_MAX_ROUNDS = 12  # top-up rounds for interactions and friendships


@dataclass(frozen=True)
class SyntheticConfig:
    """Size, seed and structure knobs of the generator; defaults give Last.fm-like data."""

    n_users: int = 3000
    n_items: int = 2000
    n_interactions: int = 60000  # target unique (user, item) pairs, met within count_tolerance
    seed: int = 0
    n_communities: int | None = None  # None: max(2, round(sqrt(n_users) / 2))
    n_topics: int | None = None  # None: 2 * communities, at most n_items // 4 (>= 1)
    topics_per_community: int = 3  # "home" topics each community draws most items from
    community_size_shape: float = 1.0  # gamma shape of community size weights (1: exponential)
    activity_exponent: float = 2.0  # user activity pdf ~ x^-a (Pareto); lower = heavier tail
    max_activity_ratio: float = 200.0  # cap on a user's expected draws, x the mean
    item_zipf: float = 1.0  # popularity of the k-th item of a topic ~ k^-item_zipf
    mean_friends: float = 10.0  # target mean friend degree
    friend_degree_exponent: float = 2.5  # sociability pdf ~ x^-a (Pareto): heavy-tailed degree
    max_friends_ratio: float = 100.0  # cap on a user's expected degree, x mean_friends
    friends_in_community: float = 0.8  # share of friendships drawn inside a community
    community_taste: float = 0.7  # share of taste draws from the community's home topics
    personal_taste: float = 0.15  # share of taste draws from the user's personal topic
    friend_copy: float = 0.2  # share of draws copying a random friend's item
    play_mu: float = 1.0  # per-draw play count = max(1, round(lognormal(mu, sigma)))
    play_sigma: float = 1.0
    timestamps: bool = True  # fill inter_ts (int64 ms over one year from 2020-01-01)
    count_tolerance: float = 0.002  # relative tolerance on the unique interaction count

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.n_items < 1:
            raise ValueError(f"need n_users, n_items >= 1, got {self.n_users}, {self.n_items}")
        if not 0 < self.n_interactions <= self.n_users * self.n_items:
            raise ValueError(
                f"n_interactions must be in 1..n_users*n_items={self.n_users * self.n_items}, "
                f"got {self.n_interactions}"
            )
        if self.activity_exponent <= 1 or self.friend_degree_exponent <= 1:
            raise ValueError("activity_exponent and friend_degree_exponent must be > 1")
        for name in ("friends_in_community", "community_taste", "personal_taste", "friend_copy"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.community_taste + self.personal_taste > 1.0:
            raise ValueError("community_taste + personal_taste must be <= 1")
        if self.mean_friends < 0 or self.topics_per_community < 1:
            raise ValueError("mean_friends must be >= 0 and topics_per_community >= 1")

    @property
    def communities(self) -> int:
        """Number of communities actually used (resolves the ``None`` default)."""
        if self.n_communities is not None:
            return max(1, self.n_communities)
        return max(2, round(math.sqrt(self.n_users) / 2))

    @property
    def topics(self) -> int:
        """Number of topics actually used (resolves the ``None`` default)."""
        k = self.n_topics
        if k is None:
            k = min(2 * self.communities, self.n_items // 4)
        return int(min(max(1, k), self.n_items))


@dataclass
class SyntheticTruth:
    """The hidden structure behind a generated dataset (for tests and diagnostics)."""

    user_community: np.ndarray  # (U,) int32
    user_topic: np.ndarray  # (U,) int32: personal topic
    item_topic: np.ndarray  # (I,) int32
    community_topics: np.ndarray  # (C, H) int32: home topics of each community
    draws: int  # interaction draws before merging duplicates
    rounds: int  # interaction rounds (1 + top-ups)
    trimmed: int  # unique pairs dropped because the last round overshot the target


def _pareto(rng: np.random.Generator, exponent: float, n: int) -> np.ndarray:
    """(n,) float64 samples with pdf ~ x^-exponent on [1, inf)."""
    return (1.0 - rng.random(n)) ** (-1.0 / (exponent - 1.0))


def _stochastic_round(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """(n,) int64: floor(x) or ceil(x), unbiased, so small expected counts are kept on average."""
    return np.floor(x + rng.random(len(x))).astype(np.int64)


def _segment_sample(
    cum0: np.ndarray, lo: np.ndarray | int, hi: np.ndarray | int, r: np.ndarray
) -> np.ndarray:
    """Index j in [lo, hi) drawn with P(j) ~ w[j], where cum0 = [0, cumsum(w)] and r ~ U[0, 1).

    One searchsorted samples many categorical distributions at once, each a contiguous
    segment of the same weight array (items of a topic, users of a community).
    """
    base = cum0[lo]
    x = base + r * (cum0[hi] - base)
    j = np.searchsorted(cum0, x, side="right") - 1
    return np.clip(j, lo, np.asarray(hi) - 1)


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """Sorted unique values of a 1-D array by sort + mask (faster than numpy 2's hash unique here)."""
    x = np.sort(x)
    keep = np.ones(len(x), bool)
    np.not_equal(x[1:], x[:-1], out=keep[1:])
    return x[keep]


def _merge(
    keys: np.ndarray, weights: np.ndarray, new_keys: np.ndarray, new_weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique int64 keys with summed float64 weights of the old and new draws."""
    all_keys = np.concatenate([keys, new_keys])
    uniq, inv = np.unique(all_keys, return_inverse=True)
    summed = np.bincount(inv, weights=np.concatenate([weights, new_weights]), minlength=len(uniq))
    return uniq, summed


def _activity_weights(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """(U,) expected draws per user: Pareto, scaled so they sum to n_interactions, in [1, cap]."""
    a = _pareto(rng, cfg.activity_exponent, cfg.n_users)
    target = float(cfg.n_interactions)
    mean = target / cfg.n_users
    cap = max(1.0, min(cfg.max_activity_ratio * mean, cfg.n_items / 2))
    if target <= cfg.n_users:
        return np.ones(cfg.n_users)
    if target >= cfg.n_users * cap:
        return np.full(cfg.n_users, cap)
    lo, hi = 0.0, cap  # bisection on the scale s: sum(clip(s * a, 1, cap)) = target
    for _ in range(60):
        s = 0.5 * (lo + hi)
        if np.clip(s * a, 1.0, cap).sum() < target:
            lo = s
        else:
            hi = s
    return np.clip(hi * a, 1.0, cap)


def _trim_surplus(
    keys: np.ndarray, plays: np.ndarray, target: int, n_items: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Drop random pairs above ``target`` (a top-up round can overshoot), never a user's last."""
    excess = len(keys) - target
    if excess <= 0:
        return keys, plays
    user = keys // n_items
    not_first = np.flatnonzero(user[1:] == user[:-1]) + 1  # (M,) pairs after a user's first
    drop = rng.choice(not_first, size=min(excess, len(not_first)), replace=False)
    keep = np.ones(len(keys), bool)
    keep[drop] = False
    return keys[keep], plays[keep]


def _prefixed_ids(prefix: str, n: int) -> np.ndarray:
    """(n,) str ids prefix + "0".."n-1", vectorized, with the narrowest unicode width."""
    digits = np.arange(n).astype(f"<U{len(str(max(n - 1, 0)))}")
    return np.char.add(prefix, digits)


def _friend_graph(
    cfg: SyntheticConfig, rng: np.random.Generator, community: np.ndarray, n_comm: int
) -> np.ndarray:
    """(P, 2) int32 pairs a < b (Chung-Lu, community-biased), self loops and duplicates dropped."""
    n = cfg.n_users
    max_pairs = n * (n - 1) // 2
    target = min(round(n * cfg.mean_friends / 2), max_pairs // 2)
    if target <= 0:
        return np.zeros((0, 2), np.int32)
    lam = _pareto(rng, cfg.friend_degree_exponent, n)  # (U,) sociability ~ expected degree
    lam *= cfg.mean_friends / lam.mean()
    lam = np.minimum(lam, max(1.0, min(n - 1, cfg.max_friends_ratio * cfg.mean_friends)))
    order = np.argsort(community, kind="stable")  # (U,) users grouped by community
    cum0 = np.concatenate([[0.0], np.cumsum(lam[order])])  # (U+1,)
    sizes = np.bincount(community, minlength=n_comm)
    comm_end = np.cumsum(sizes)  # (C,) segment [start, end) of each community in `order`
    comm_start = comm_end - sizes
    keys = np.zeros(0, np.int64)
    n_draw = target
    for _ in range(_MAX_ROUNDS):
        a = order[_segment_sample(cum0, 0, n, rng.random(n_draw))]
        inside = rng.random(n_draw) < cfg.friends_in_community
        b_pos = _segment_sample(cum0, 0, n, rng.random(n_draw))
        ca = community[a[inside]]
        b_pos[inside] = _segment_sample(cum0, comm_start[ca], comm_end[ca], rng.random(len(ca)))
        b = order[b_pos]
        self_loop = a == b
        lo = np.minimum(a, b)[~self_loop].astype(np.int64)
        hi = np.maximum(a, b)[~self_loop].astype(np.int64)
        prev = len(keys)
        keys = _sorted_unique(np.concatenate([keys, lo * n + hi]))
        short = target - len(keys)
        if short <= max(1, cfg.count_tolerance * target):
            break
        rate = max((len(keys) - prev) / n_draw, 0.02)
        n_draw = math.ceil(short / rate)
    return np.stack([keys // n, keys % n], axis=1).astype(np.int32)


def generate_with_truth(
    cfg: SyntheticConfig, progress: bool = False
) -> tuple[Dataset, SyntheticTruth]:
    """Generate a dataset and return it with its hidden structure (communities, topics)."""
    n_users, n_items = cfg.n_users, cfg.n_items
    n_comm, n_topics, n_home = cfg.communities, cfg.topics, cfg.topics_per_community
    # Independent streams per stage: changing one stage's draws does not shift the others.
    rng_users, rng_items, rng_friends, rng_inter, rng_final = (
        np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(5)
    )
    bar = tqdm(total=6, desc="synthetic", unit="stage", disable=not progress)

    bar.set_postfix_str("users")
    size_w = rng_users.gamma(cfg.community_size_shape, size=n_comm)
    community = rng_users.choice(n_comm, size=n_users, p=size_w / size_w.sum()).astype(np.int32)
    user_topic = rng_users.integers(0, n_topics, size=n_users, dtype=np.int32)  # (U,)
    home = rng_users.integers(0, n_topics, size=(n_comm, n_home), dtype=np.int32)  # (C, H)
    home_w = rng_users.dirichlet(np.ones(n_home), size=n_comm)  # (C, H)
    home_cum0 = np.concatenate([[0.0], np.cumsum(home_w.ravel())])  # (C*H+1,)
    activity = _activity_weights(cfg, rng_users)  # (U,) expected draws
    bar.update()

    bar.set_postfix_str("items")
    item_topic = (rng_items.permutation(n_items) % n_topics).astype(np.int32)  # (I,)
    by_topic = np.argsort(item_topic, kind="stable").astype(np.int32)  # (I,) items by topic
    t_size = np.bincount(item_topic, minlength=n_topics)
    t_end = np.cumsum(t_size)  # (T,) segment [start, end) of each topic in `by_topic`
    t_start = t_end - t_size
    rank = np.arange(n_items) - np.repeat(t_start, t_size)  # (I,) rank inside the topic
    pop = (rank + 1.0) ** -cfg.item_zipf  # (I,) popularity in `by_topic` order
    item_cum0 = np.concatenate([[0.0], np.cumsum(pop)])  # (I+1,)
    bar.update()

    bar.set_postfix_str("friends")
    friends = _friend_graph(cfg, rng_friends, community, n_comm)
    src = np.concatenate([friends[:, 0], friends[:, 1]])  # (2P,) both directions
    dst = np.concatenate([friends[:, 1], friends[:, 0]])
    nbr = dst[np.argsort(src, kind="stable")]  # (2P,) neighbours grouped by user
    deg = np.bincount(src, minlength=n_users)  # (U,)
    nbr_start = np.cumsum(deg) - deg  # (U,)
    bar.update()

    def taste(owners: np.ndarray) -> np.ndarray:
        """(n,) int32 items of taste draws for the (n,) owners."""
        r = rng_inter.random(len(owners))
        items = np.empty(len(owners), np.int32)
        comm = r < cfg.community_taste
        pers = (r >= cfg.community_taste) & (r < cfg.community_taste + cfg.personal_taste)
        glob = ~(comm | pers)
        c = community[owners[comm]].astype(np.int64)
        slot = _segment_sample(home_cum0, c * n_home, (c + 1) * n_home, rng_inter.random(len(c)))
        topic = np.empty(len(owners), np.int32)
        topic[comm] = home.ravel()[slot]
        topic[pers] = user_topic[owners[pers]]
        in_topic = comm | pers
        t = topic[in_topic]
        pos = _segment_sample(item_cum0, t_start[t], t_end[t], rng_inter.random(len(t)))
        items[in_topic] = by_topic[pos]
        r_glob = rng_inter.random(int(glob.sum()))
        items[glob] = by_topic[_segment_sample(item_cum0, 0, n_items, r_glob)]
        return items

    bar.set_postfix_str("interactions")
    keys = np.zeros(0, np.int64)  # sorted unique user * n_items + item
    plays = np.zeros(0, np.float64)  # summed play counts per key
    target = cfg.n_interactions
    scale, draws, rounds = 1.0, 0, 0
    pool_items = pool_start = pool_count = np.zeros(0, np.int64)  # set in round 1
    for rounds in range(1, _MAX_ROUNDS + 1):
        counts = _stochastic_round(rng_inter, activity * scale)
        if rounds == 1:
            counts = np.maximum(counts, 1)  # every user interacts at least once
        owners = np.repeat(np.arange(n_users, dtype=np.int32), counts)  # (n,) sorted
        items = taste(owners)
        if rounds == 1:  # the first round's taste draws are what friends copy from
            pool_items, pool_count = items.copy(), counts
            pool_start = np.cumsum(counts) - counts
        social = (rng_inter.random(len(owners)) < cfg.friend_copy) & (deg[owners] > 0)
        o = owners[social]
        f = nbr[nbr_start[o] + (rng_inter.random(len(o)) * deg[o]).astype(np.int64)]
        pick = (rng_inter.random(len(f)) * pool_count[f]).astype(np.int64)
        items[social] = pool_items[pool_start[f] + pick]  # a random round-1 item of the friend
        w = np.maximum(1.0, np.rint(rng_inter.lognormal(cfg.play_mu, cfg.play_sigma, len(owners))))
        prev = len(keys)
        keys, plays = _merge(keys, plays, owners.astype(np.int64) * n_items + items, w)
        draws += len(owners)
        bar.set_postfix_str(f"interactions round {rounds}: {len(keys):,}/{target:,}")
        short = target - len(keys)
        if short <= max(1, cfg.count_tolerance * target):
            break
        rate = max((len(keys) - prev) / max(1, len(owners)), 0.02)  # new pairs per draw
        scale = short / rate / activity.sum()
    bar.update()

    bar.set_postfix_str("finalize")
    n_unique = len(keys)
    keys, plays = _trim_surplus(keys, plays, target, n_items, rng_final)
    trimmed = n_unique - len(keys)
    inter_user = (keys // n_items).astype(np.int32)  # (N,) sorted by user, then item
    inter_item = (keys % n_items).astype(np.int32)  # (N,)
    inter_weight = plays.astype(np.float32)  # (N,)
    inter_ts = None
    if cfg.timestamps:
        inter_ts = rng_final.integers(_T0_MS, _T0_MS + _SPAN_MS, size=len(keys), dtype=np.int64)
    del keys, plays
    bar.update()

    bar.set_postfix_str("ids")
    user_ids = _prefixed_ids("u", n_users)  # (U,) "u0".."u{U-1}"
    item_ids = _prefixed_ids("i", n_items)  # (I,) "i0".."i{I-1}"
    bar.update()
    bar.close()

    # Repeat draws of a pair are repeat listens (play counts add up), not bad rows; duplicate
    # and self-loop friend draws are how the Chung-Lu sampler works: neither is a data problem.
    report = LoadReport(
        rows_read=draws,
        repeat_interactions_summed=draws - n_unique,
        notes=[
            f"synthetic generator (seed {cfg.seed}): {n_comm} communities, {n_topics} topics; "
            f"{draws:,} draws in {rounds} round(s)"
            + (f"; {trimmed:,} surplus pairs trimmed to the target" if trimmed else "")
        ],
    )
    ds = Dataset(
        name="synthetic",
        user_ids=user_ids,
        item_ids=item_ids,
        inter_user=inter_user,
        inter_item=inter_item,
        inter_weight=inter_weight,
        friends=friends,
        inter_ts=inter_ts,
        report=report,
    )
    truth = SyntheticTruth(
        user_community=community,
        user_topic=user_topic,
        item_topic=item_topic,
        community_topics=home,
        draws=draws,
        rounds=rounds,
        trimmed=trimmed,
    )
    return ds, truth


def generate(cfg: SyntheticConfig, progress: bool = False) -> Dataset:
    """Seeded synthetic dataset (same config => bit-identical arrays); see the module docstring."""
    return generate_with_truth(cfg, progress=progress)[0]
