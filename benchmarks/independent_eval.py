"""Independent cross-check of the project's content-recommendation baselines.

This script re-implements, from a written specification only (it imports nothing from the
project), the evaluation of two classical item-based baselines on an exported train/test split
and compares its numbers with the ones the project wrote into ``report.json``:

* **EASE** (Steck 2019): ``B = -P / diag(P)`` with ``P = (X^T X + lambda I)^-1``, ``diag(B) = 0``,
  scores ``X B``. ``lambda`` is read from ``report["baseline_params"]["EASE"]["lambda"]``
  (500.0 when absent).
* **ItemKNN**: cosine item-item similarity over the binary training matrix, no neighbour pruning,
  scores ``X S``; computed batch-wise as ``((X_b D^-1/2) X^T) (X D^-1/2)`` without materialising
  ``S``.

Protocol: the item universe is every item of ``content_train.tsv`` or ``content_test.tsv``; ``X``
is the binary user x item matrix of the training rows (weights ignored); every user with at least
one test item is evaluated; a user's training items are never recommended; Recall@K and NDCG@K
(binary gains) for K = 10 and 20 are averaged over the evaluated users.

The script prints a table ``metric | ours | report | |diff|`` and exits with status 0 when every
difference is within ``--tolerance``, 1 when one is not, and 2 when the report lacks a model or a
metric (or the inputs are unusable).

Usage::

    python benchmarks/independent_eval.py --run RUN_DIR [--tolerance 0.01] [--max-users N]
    python benchmarks/independent_eval.py --split RUN_DIR/split --report RUN_DIR/report.json \\
        [--out results.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

KS: tuple[int, ...] = (10, 20)
METRICS: tuple[str, ...] = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
MODELS: tuple[str, ...] = ("EASE", "ItemKNN")
DEFAULT_EASE_LAMBDA = 500.0

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_MISSING = 2

# A scorer maps a list of user row indices to a dense (len(rows), n_items) score matrix.
Scorer = Callable[[np.ndarray], np.ndarray]


@dataclass
class Split:
    """The content part of an exported split, indexed."""

    users: list[str]  # row index -> user id
    items: list[str]  # column index -> item id
    X: sp.csr_matrix  # binary training matrix, float64, (n_users, n_items)
    test: list[np.ndarray]  # per user row: sorted unique test item columns

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """Read the ``(user, item)`` columns of a content TSV (header ``user item weight``)."""
    pairs: list[tuple[str, str]] = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            return pairs
        cols = [c.strip() for c in header]
        try:
            iu, ii = cols.index("user"), cols.index("item")
        except ValueError as exc:
            raise ValueError(
                f"{path}: header must contain 'user' and 'item', got {header}"
            ) from exc
        for lineno, row in enumerate(reader, start=2):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) <= max(iu, ii):
                raise ValueError(f"{path}:{lineno}: expected >= {max(iu, ii) + 1} columns: {row}")
            pairs.append((row[iu], row[ii]))
    return pairs


def build_split(train: Sequence[tuple[str, str]], test: Sequence[tuple[str, str]]) -> Split:
    """Index users/items (sorted ids, for determinism) and build ``X`` and the test sets."""
    users = sorted({u for u, _ in train} | {u for u, _ in test})
    items = sorted({i for _, i in train} | {i for _, i in test})
    uidx = {u: k for k, u in enumerate(users)}
    iidx = {i: k for k, i in enumerate(items)}

    if train:
        rows = np.fromiter((uidx[u] for u, _ in train), dtype=np.int64, count=len(train))
        cols = np.fromiter((iidx[i] for _, i in train), dtype=np.int64, count=len(train))
    else:
        rows = cols = np.zeros(0, dtype=np.int64)
    X = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float64), (rows, cols)), shape=(len(users), len(items))
    )
    X.sum_duplicates()
    X.data[:] = 1.0  # binary, whatever the duplicates / weights
    X.eliminate_zeros()

    per_user: list[set[int]] = [set() for _ in users]
    for u, i in test:
        per_user[uidx[u]].add(iidx[i])
    test_sets = [np.array(sorted(s), dtype=np.int64) for s in per_user]
    return Split(users=users, items=items, X=X, test=test_sets)


def load_split(split_dir: Path) -> Split:
    return build_split(
        read_pairs(split_dir / "content_train.tsv"), read_pairs(split_dir / "content_test.tsv")
    )


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def ease_weights(X: sp.spmatrix, lam: float) -> np.ndarray:
    """Dense float64 EASE item-item weights ``B`` (``B_ij = -P_ij / P_jj``, zero diagonal)."""
    G = (X.T @ X).toarray().astype(np.float64, copy=False)
    G[np.diag_indices_from(G)] += lam
    # numpy's inverse, not scipy.linalg.inv: with scipy 1.17 / its bundled OpenBLAS both
    # scipy.linalg.inv and scipy.linalg.lapack.dpotrf segfault on a 17,600 x 17,600 matrix here.
    P = np.linalg.inv(G)
    del G
    d = np.diag(P).copy()
    P /= -d[np.newaxis, :]  # column-wise, in place: P becomes B
    P[np.diag_indices_from(P)] = 0.0
    return P


def ease_scorer(X: sp.csr_matrix, lam: float) -> Scorer:
    B = ease_weights(X, lam)
    Xd = sp.csr_matrix(X, dtype=np.float64)  # same dtype as B: no upcast copy of B per batch

    def score(rows: np.ndarray) -> np.ndarray:
        return np.asarray(Xd[rows] @ B)

    return score


def itemknn_scorer(X: sp.csr_matrix) -> Scorer:
    """Cosine ItemKNN scores ``X S`` with ``S = D^-1/2 X^T X D^-1/2``, never materialising S."""
    counts = np.asarray(X.sum(axis=0)).ravel()
    inv_sqrt = np.zeros_like(counts, dtype=np.float64)
    nz = counts > 0
    inv_sqrt[nz] = 1.0 / np.sqrt(counts[nz])
    Xn = sp.csr_matrix(X @ sp.diags(inv_sqrt))  # X D^-1/2, (n_users, n_items)
    XnT = sp.csr_matrix(Xn.T)  # (n_items, n_users)
    XT = sp.csr_matrix(X.T)  # (n_items, n_users)

    def score(rows: np.ndarray) -> np.ndarray:
        # U = (X_b D^-1/2) X^T : (batch, n_users); scores = U (X D^-1/2) : (batch, n_items)
        U = (Xn[rows] @ XT).toarray()
        return np.asarray((XnT @ U.T).T)

    return score


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` highest scores per row, best first (ties arbitrary)."""
    n = scores.shape[1]
    k = min(k, n)
    if k == n:
        part = np.tile(np.arange(n), (scores.shape[0], 1))
    else:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def batch_metrics(
    scores: np.ndarray,
    train_rows: sp.csr_matrix,
    test_sets: Sequence[np.ndarray],
    ks: Sequence[int] = KS,
) -> dict[str, np.ndarray]:
    """Per-user Recall@K / NDCG@K for one batch. ``scores`` is modified (training items masked)."""
    b, n_items = scores.shape
    coo = train_rows.tocoo()
    scores[coo.row, coo.col] = -np.inf

    kmax = max(ks)
    top = top_k(scores, kmax)  # (b, min(kmax, n_items))
    is_test = np.zeros((b, n_items), dtype=bool)
    for r, t in enumerate(test_sets):
        is_test[r, t] = True
    # A -inf item is a masked training item: it is never a recommendation.
    hits = np.take_along_axis(is_test, top, axis=1) & np.isfinite(
        np.take_along_axis(scores, top, axis=1)
    )
    n_test = np.array([len(t) for t in test_sets], dtype=np.float64)

    disc = 1.0 / np.log2(np.arange(kmax) + 2.0)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        h = hits[:, :k]
        out[f"recall@{k}"] = h.sum(axis=1) / n_test
        dcg = h.astype(np.float64) @ disc[: h.shape[1]]
        idcg_table = np.concatenate([[0.0], np.cumsum(disc[:k])])
        idcg = idcg_table[np.minimum(n_test.astype(np.int64), k)]
        out[f"ndcg@{k}"] = dcg / idcg
    return out


def evaluate(
    split: Split, scorer: Scorer, eval_rows: np.ndarray, batch_size: int = 256
) -> dict[str, float]:
    """Mean Recall@K / NDCG@K of ``scorer`` over the users ``eval_rows`` (each has test items)."""
    sums = {m: 0.0 for m in METRICS}
    for start in range(0, len(eval_rows), batch_size):
        rows = eval_rows[start : start + batch_size]
        scores = np.array(scorer(rows), dtype=np.float64)  # own copy: masked in place
        per_user = batch_metrics(scores, split.X[rows], [split.test[r] for r in rows])
        for m in METRICS:
            sums[m] += float(per_user[m].sum())
    n = len(eval_rows)
    return {m: (sums[m] / n if n else float("nan")) for m in METRICS}


def select_eval_users(split: Split, max_users: int | None, seed: int = 0) -> np.ndarray:
    """Row indices of the users with >= 1 test item; a seeded random subset if ``max_users``."""
    rows = np.array([r for r, t in enumerate(split.test) if len(t) > 0], dtype=np.int64)
    if max_users is not None and 0 <= max_users < len(rows):
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(rows, size=max_users, replace=False))
    return rows


# --------------------------------------------------------------------------------------------
# Report comparison
# --------------------------------------------------------------------------------------------


def ease_lambda(report: dict[str, Any]) -> float:
    try:
        return float(report["baseline_params"]["EASE"]["lambda"])
    except (KeyError, TypeError, ValueError):
        return DEFAULT_EASE_LAMBDA


def report_missing(report: dict[str, Any]) -> list[str]:
    """What the comparison needs but the report lacks (``[]`` when complete)."""
    content = report.get("content") if isinstance(report, dict) else None
    if not isinstance(content, dict):
        return ['report["content"]']
    missing: list[str] = []
    for model in MODELS:
        entry = content.get(model)
        if not isinstance(entry, dict):
            missing.append(f'report["content"]["{model}"]')
            continue
        for m in METRICS:
            v = entry.get(m)
            if isinstance(v, bool) or not isinstance(v, int | float):
                missing.append(f'report["content"]["{model}"]["{m}"]')
    return missing


def compare(
    ours: dict[str, dict[str, float]], report: dict[str, Any], tolerance: float
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for model in MODELS:
        for m in METRICS:
            a = float(ours[model][m])
            r = float(report["content"][model][m])
            diff = abs(a - r)
            ok = math.isfinite(diff) and diff <= tolerance
            rows.append(
                {"model": model, "metric": m, "ours": a, "report": r, "abs_diff": diff, "ok": ok}
            )
    return rows


def format_table(rows: Sequence[dict[str, Any]], tolerance: float) -> str:
    head = f"{'metric':<20} {'ours':>10} {'report':>10} {'|diff|':>10}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        status = "ok" if r["ok"] else f"FAIL (> {tolerance:g})"
        lines.append(
            f"{r['model'] + ' ' + r['metric']:<20} {r['ours']:>10.4f} {r['report']:>10.4f} "
            f"{r['abs_diff']:>10.4f}  {status}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Independently score EASE and ItemKNN on an exported split and compare "
        "with the project's report.json.",
    )
    p.add_argument("--run", type=Path, help="run directory (uses RUN/split and RUN/report.json)")
    p.add_argument("--split", type=Path, help="split directory with content_{train,test}.tsv")
    p.add_argument("--report", type=Path, help="report.json to compare with")
    p.add_argument("--tolerance", type=float, default=0.01, help="max |diff| (default 0.01)")
    p.add_argument(
        "--max-users",
        type=int,
        default=None,
        help="evaluate a seeded random subset of N test users (default: all)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --max-users sampling")
    p.add_argument("--batch-size", type=int, default=256, help="users per scoring batch")
    p.add_argument("--out", type=Path, help="write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.run is not None:
        args.split = args.split or args.run / "split"
        args.report = args.report or args.run / "report.json"
    if args.split is None or args.report is None:
        p.error("give --run RUN_DIR, or both --split DIR and --report FILE")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.max_users is not None and args.max_users < 1:
        p.error("--max-users must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = json.loads(Path(args.report).read_text(encoding="utf-8"))
        split = load_split(Path(args.split))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_MISSING

    missing = report_missing(report)
    if missing:
        print("warning: the report lacks " + ", ".join(missing), file=sys.stderr)

    lam = ease_lambda(report)
    eval_rows = select_eval_users(split, args.max_users, args.seed)
    n_with_test = sum(1 for t in split.test if len(t) > 0)
    print(
        f"split: {split.n_users} users, {split.n_items} items, {int(split.X.nnz)} train pairs, "
        f"{n_with_test} users with test items, evaluating {len(eval_rows)}"
    )
    if len(eval_rows) < n_with_test:
        print("note: --max-users evaluates a subset; the report used all test users")

    ours: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    for model in MODELS:
        t0 = time.perf_counter()
        scorer = ease_scorer(split.X, lam) if model == "EASE" else itemknn_scorer(split.X)
        ours[model] = evaluate(split, scorer, eval_rows, args.batch_size)
        del scorer
        timings[model] = time.perf_counter() - t0
        params = f" (lambda={lam:g})" if model == "EASE" else ""
        print(f"{model}{params}: done in {timings[model]:.1f}s")

    result: dict[str, Any] = {
        "split": str(args.split),
        "report": str(args.report),
        "n_users": split.n_users,
        "n_items": split.n_items,
        "n_train_pairs": int(split.X.nnz),
        "n_eval_users": len(eval_rows),
        "ease_lambda": lam,
        "tolerance": args.tolerance,
        "ours": ours,
        "seconds": timings,
    }

    if missing:
        for model in MODELS:
            print(f"{model}: " + ", ".join(f"{m}={ours[model][m]:.4f}" for m in METRICS))
        print("report lacks " + ", ".join(missing) + "; cannot compare")
        result.update(comparison=None, missing=missing, passed=None, exit_code=EXIT_MISSING)
        code = EXIT_MISSING
    else:
        rows = compare(ours, report, args.tolerance)
        print(format_table(rows, args.tolerance))
        failed = [r for r in rows if not r["ok"]]
        code = EXIT_MISMATCH if failed else EXIT_OK
        print(
            f"{len(failed)} of {len(rows)} metrics differ by more than {args.tolerance:g}"
            if failed
            else f"all {len(rows)} metrics within {args.tolerance:g}"
        )
        result.update(comparison=rows, missing=[], passed=not failed, exit_code=code)

    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main())
