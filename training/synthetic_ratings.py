"""A seeded explicit-ratings dataset: content only, 1-5 stars, no friend graph.

Shaped like the small movie-ratings sets recommenders are often checked on (about 1k users,
1.7k items, 100k ratings, at least 20 per user): it exercises the tsv loader's ratings path
and the rating-aware weight transforms without a download.

The model: users and items have latent taste vectors; a user rates ``n_u`` items (20 plus a
lognormal count) drawn without replacement with probability ~ popularity x exp(affinity),
so what a user rates already says what they like; the star rating is
``round(mu + user bias + item bias + affinity + noise)`` clipped to 1..5, so ratings carry
taste beyond the binary "rated" signal. A small share of pairs is rated again later (a new
row with a later timestamp and a redrawn rating): the loader's duplicate rule decides which
one counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class RatingsConfig:
    n_users: int = 1000
    n_items: int = 1700
    min_per_user: int = 20
    mean_extra_per_user: float = 80.0  # mean of the lognormal count added to min_per_user
    factors: int = 8
    item_zipf: float = 0.9  # popularity of the k-th item ~ k^-item_zipf
    taste: float = 1.5  # weight of affinity in which items a user rates
    mu: float = 2.7  # with the bias terms: about 3%, 13%, 30%, 32%, 22% of 1..5 stars
    user_bias_sd: float = 0.5
    item_bias_sd: float = 0.4
    affinity_scale: float = 0.8  # weight of affinity in the star rating
    noise_sd: float = 0.6
    rerated_fraction: float = 0.01  # pairs rated again later (duplicate rows)
    seed: int = 0


def generate_ratings(cfg: RatingsConfig) -> list[tuple[str, str, int, int]]:
    """Rows (user, item, stars, timestamp), in timestamp order."""
    rng = np.random.default_rng(cfg.seed)
    p = rng.normal(size=(cfg.n_users, cfg.factors)) / np.sqrt(cfg.factors)  # (U, K)
    q = rng.normal(size=(cfg.n_items, cfg.factors)) / np.sqrt(cfg.factors)  # (I, K)
    aff = p @ q.T  # (U, I)
    aff = aff / aff.std()
    rank = rng.permutation(cfg.n_items) + 1
    log_pop = -cfg.item_zipf * np.log(rank)  # (I,)
    b_u = rng.normal(0, cfg.user_bias_sd, cfg.n_users)
    # Popular items are rated a little higher.
    b_i = rng.normal(0, cfg.item_bias_sd, cfg.n_items) + 0.1 * (log_pop - log_pop.mean())
    sigma = 1.0
    extra = rng.lognormal(np.log(cfg.mean_extra_per_user) - sigma**2 / 2, sigma, cfg.n_users)
    n_u = np.minimum(cfg.min_per_user + extra.astype(int), cfg.n_items // 2)
    rows: list[tuple[int, int, int, int]] = []
    for u in range(cfg.n_users):
        # Gumbel top-k: n_u items without replacement, probability ~ exp(log_pop + taste * aff).
        key = log_pop + cfg.taste * aff[u] + rng.gumbel(size=cfg.n_items)
        items = np.argpartition(-key, n_u[u])[: n_u[u]]
        score = cfg.mu + b_u[u] + b_i[items] + cfg.affinity_scale * aff[u, items]
        stars = np.clip(np.rint(score + rng.normal(0, cfg.noise_sd, len(items))), 1, 5)
        ts = rng.integers(0, 10**8, len(items))
        rows.extend(
            zip(
                [u] * len(items),
                items.tolist(),
                stars.astype(int).tolist(),
                ts.tolist(),
                strict=True,
            )
        )
    n_again = int(round(cfg.rerated_fraction * len(rows)))
    for k in rng.choice(len(rows), n_again, replace=False):
        u, i, s, t = rows[k]
        again = int(np.clip(s + rng.choice([-1, 1]), 1, 5))
        rows.append((u, i, again, t + int(rng.integers(1, 10**7))))
    rows.sort(key=lambda r: r[3])
    return [(f"u{u}", f"m{i}", s, t) for u, i, s, t in rows]


def write_ratings_tsv(path: str | Path, cfg: RatingsConfig = RatingsConfig()) -> Path:
    """The dataset as a tsv file ``user, item, rating, timestamp`` with a header line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["user\titem\trating\ttimestamp"]
    lines += [f"{u}\t{i}\t{s}\t{t}" for u, i, s, t in generate_ratings(cfg)]
    path.write_text("\n".join(lines) + "\n")
    return path
