"""Time the synthetic generator at scale: wall seconds, peak RSS and the dataset summary.

Why: ``generate`` must reach 1M users x 200k items x 10M interactions in about two minutes
and a few GB; this script measures it (``python benchmarks/synthetic_scale.py``).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
from socialrec.training.synthetic import SyntheticConfig, generate_with_truth


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--interactions", type=int, default=10_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="show the stage progress bar")
    args = p.parse_args(argv)

    cfg = SyntheticConfig(
        n_users=args.users, n_items=args.items, n_interactions=args.interactions, seed=args.seed
    )
    rss_before = peak_rss_mib()
    t0 = time.perf_counter()
    ds, truth = generate_with_truth(cfg, progress=args.progress)
    wall = time.perf_counter() - t0

    user_counts = np.bincount(ds.inter_user, minlength=ds.n_users)  # (U,)
    item_counts = np.sort(np.bincount(ds.inter_item, minlength=ds.n_items))[::-1]  # (I,)
    degree = np.bincount(ds.friends.ravel(), minlength=ds.n_users)  # (U,)
    result = {
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_rss_mib_before_generate": round(rss_before, 1),
        "summary": ds.summary(),
        "draws": truth.draws,
        "rounds": truth.rounds,
        "user_interactions_min_median_max": [
            int(user_counts.min()),
            float(np.median(user_counts)),
            int(user_counts.max()),
        ],
        "top10pct_items_share": round(
            float(item_counts[: max(1, ds.n_items // 10)].sum() / item_counts.sum()), 3
        ),
        "friend_degree_mean_max": [round(float(degree.mean()), 2), int(degree.max())],
        "users_without_friends": int((degree == 0).sum()),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
