"""Fold-in: a vector for an item the bundle does not know, from its first interactions.

Pure numpy (no torch, no Redis, no I/O but :meth:`FoldInPrior.save`/``load``): it runs inside
server workers, once per write to a fresh item. docs/design.md "Fresh items: fold-in".

The space. The bundle scores a user against an item by the inner product of the user
tower's ``content_vector`` ``x = [u, 1]`` (D + 1 wide, the last slot a constant 1) with the
item's row in ``items.faiss``, ``theta = [v, b]`` (item vector and per-item bias). A fresh
item's vector must be such a row, so that the same query finds it with the same metric: the
estimator takes the ``content_vector`` rows of the users who interacted with the item and
returns a (D + 1,) row ready for an inner-product index beside ``items.faiss``.

The estimators (``FoldInConfig.method``):

* ``"ridge"`` (default): regularised least squares in the score space,
  ``min_theta  sum_j w_j (x_j . theta - s_pos)^2 + alpha * E_u[(x_u . theta - s_neg)^2]
  + lam * |theta - theta_0|^2``: the interacting users should score the item like the
  catalogue's positive pairs score (``s_pos``), the user population (every user as an
  implicit negative, through its second moment ``E[x x^T]``, as in implicit ALS) like a
  random pair (``s_neg``), and with few users the row stays near the mean catalogue row
  ``theta_0``. Closed form: ``(S^T S + alpha G + lam I) theta = s_pos S^T sqrt(w) + alpha s_neg
  g + lam theta_0`` with ``S = sqrt(w) X``; the (D + 1)^2 part does not depend on the item,
  so its inverse is cached per (alpha, lam) and each call is a k x k solve (Woodbury), k the
  number of users. ``negatives = 0`` is plain ridge toward the mean item.
* ``"mean"``: the weighted mean of the users' vectors (the bias slot dropped), rescaled to
  ``scale`` x the catalogue's median item norm, with the catalogue's ``bias_quantile``
  quantile of item biases as bias. ``"mean_centered"``: the same after subtracting the
  population's mean user vector.

``calibration = "catalogue"`` puts every estimate on the catalogue's scale that way (the
mean estimators have no scale of their own, so they always use it); with ``"none"`` the ridge
row is used as solved.

:class:`FoldInPrior` holds the catalogue statistics every estimator needs (mean item row,
median norm and bias, the users' mean and second moment, mean positive and random scores);
it is computed once per bundle from the item rows and a sample of users' tower outputs
(:meth:`FoldInPrior.from_catalogue`) and kept as an ``.npz`` (no pickle).
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

METHODS = ("ridge", "mean", "mean_centered")
WEIGHT_TRANSFORMS = ("binary", "log1p", "raw")
CALIBRATIONS = ("catalogue", "none")
QUANTILES = np.linspace(0.0, 1.0, 21)  # the catalogue's bias quantiles a prior keeps
RUN_CHOICE = "fresh_config.json"  # a run's fold-in choice, written by `socialrec coldstart-eval`
DEFAULT_SOURCE = (
    "defaults (chosen on Last.fm's validation items); `socialrec coldstart-eval --run RUN` "
    "chooses for a run"
)


@dataclass(frozen=True)
class FoldInConfig:
    """How a fresh item's vector is estimated, and when it is eligible to be served at all."""

    # Defaults: the values `socialrec coldstart-eval` chose on Last.fm's validation items
    # (docs/design.md "Fresh items: fold-in"); choose again for another model with it.
    method: str = "ridge"  # one of METHODS
    lam: float = 100.0  # ridge: pull toward the mean catalogue row, in units of one user
    negatives: float = 0.0  # ridge: total weight of the user population as implicit negatives
    calibration: str = "catalogue"  # catalogue: |v| and b from the catalogue; none: ridge as solved
    scale: float = 0.7  # catalogue calibration: |v| = scale x the median item norm
    bias_quantile: float = 0.5  # catalogue calibration: b = this quantile of the item biases
    min_interactions: int = 1  # fewer interacting users (weight > 0): no vector (None)
    max_users: int = 100  # only the most recent this many users are used
    weight_transform: str = "binary"  # binary | log1p | raw: how an interaction weight counts

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.weight_transform not in WEIGHT_TRANSFORMS:
            raise ValueError(
                f"weight_transform must be one of {WEIGHT_TRANSFORMS}, got {self.weight_transform!r}"
            )
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if self.method != "ridge" and self.calibration != "catalogue":
            raise ValueError(
                f"method {self.method!r} has no scale of its own: use calibration 'catalogue'"
            )
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale!r}")
        if not 0 <= self.bias_quantile <= 1:
            raise ValueError(f"bias_quantile must be in [0, 1], got {self.bias_quantile!r}")
        if not (np.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"lam must be a finite number > 0, got {self.lam!r}")
        if not (np.isfinite(self.negatives) and self.negatives >= 0):
            raise ValueError(f"negatives must be a finite number >= 0, got {self.negatives!r}")
        if self.min_interactions < 1:
            raise ValueError(f"min_interactions must be >= 1, got {self.min_interactions}")
        if self.max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {self.max_users}")
        if self.max_users < self.min_interactions:
            raise ValueError(
                f"max_users ({self.max_users}) < min_interactions ({self.min_interactions}): "
                "no item could ever be eligible"
            )


def config_from_dict(d: object, where: str) -> FoldInConfig:
    """A :class:`FoldInConfig` from a JSON object; ValueError naming ``where`` and the field
    for anything else (unknown or missing-typed fields, out-of-range values)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object of fold-in settings, got {d!r}")
    known = {f.name for f in fields(FoldInConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown fold-in setting(s) {', '.join(unknown)}")
    for f in fields(FoldInConfig):
        if f.name in d:
            v, want = d[f.name], type(getattr(FoldInConfig(), f.name))
            ok = isinstance(v, str) if want is str else (
                isinstance(v, int | float) and not isinstance(v, bool)
                and (want is float or float(v).is_integer())
            )  # fmt: skip
            if not ok:
                kind = {"str": "a string", "float": "a number"}.get(want.__name__, "an integer")
                raise ValueError(f"{where}: {f.name} must be {kind}, got {v!r}")
    d = {k: (int(v) if isinstance(getattr(FoldInConfig(), k), int) else v) for k, v in d.items()}
    try:
        return FoldInConfig(**d)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def manifest_block(run_dir: str | Path | None) -> dict:
    """The manifest's ``fresh`` block of a bundle built from ``run_dir``: the run's own choice
    (``RUN_DIR/fresh_config.json``, written by ``socialrec coldstart-eval``) when it has one,
    else the defaults. A malformed choice file is an error naming it, not a silent default."""
    p = Path(run_dir) / RUN_CHOICE if run_dir is not None else None
    if p is None or not p.is_file():
        return {"fold_in": asdict(FoldInConfig()), "source": DEFAULT_SOURCE}
    try:
        d = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or "fold_in" not in d:
        raise ValueError(f"{p}: expected an object with a 'fold_in' field")
    cfg = config_from_dict(d["fold_in"], f"{p}: fold_in")
    return {"fold_in": asdict(cfg), "source": str(d.get("source") or p)}


def bundle_config(manifest: dict) -> tuple[FoldInConfig, str]:
    """(the fold-in settings a bundle carries, where they came from). A bundle exported
    before bundles carried them: the defaults. A malformed block: ValueError."""
    block = manifest.get("fresh")
    if block is None:
        return FoldInConfig(), "defaults (the bundle carries no fold-in choice)"
    if not isinstance(block, dict):
        raise ValueError(f"manifest.json: fresh must be an object, got {block!r}")
    cfg = config_from_dict(block.get("fold_in"), "manifest.json: fresh.fold_in")
    return cfg, str(block.get("source", ""))


_PRIOR_FIELDS = (
    "item_mean",
    "item_norm",
    "bias_quantiles",
    "user_mean",
    "user_gram",
    "pos_score",
    "neg_score",
)


class FoldInPrior:
    """Catalogue statistics of one bundle (all float64; D1 = D + 1, the bias slot included).

    item_mean (D1,) mean item row; item_norm: median |v| over items; bias_quantiles: the item
    biases' quantiles at :data:`QUANTILES`;
    user_mean (D1,) and user_gram (D1, D1): E[x] and E[x x^T] over users' tower outputs;
    pos_score: mean x . theta over training (user, item) pairs; neg_score: over all pairs.
    """

    def __init__(
        self,
        item_mean: np.ndarray,
        item_norm: float,
        bias_quantiles: np.ndarray,
        user_mean: np.ndarray,
        user_gram: np.ndarray,
        pos_score: float,
        neg_score: float,
    ) -> None:
        self.item_mean = np.asarray(item_mean, np.float64)
        d1 = self.item_mean.shape[0] if self.item_mean.ndim == 1 else -1
        self.user_mean = np.asarray(user_mean, np.float64)
        self.user_gram = np.asarray(user_gram, np.float64)
        if d1 < 2 or self.user_mean.shape != (d1,) or self.user_gram.shape != (d1, d1):
            raise ValueError(
                "prior shapes disagree: item_mean (D1,), user_mean (D1,), user_gram (D1, D1) "
                f"with D1 >= 2; got {self.item_mean.shape}, {self.user_mean.shape}, "
                f"{self.user_gram.shape}"
            )
        self.item_norm = float(item_norm)
        self.bias_quantiles = np.asarray(bias_quantiles, np.float64)
        if self.bias_quantiles.shape != QUANTILES.shape:
            raise ValueError(f"bias_quantiles must be ({len(QUANTILES)},)")
        self.pos_score = float(pos_score)
        self.neg_score = float(neg_score)
        arrays = (self.item_mean, self.user_mean, self.user_gram, self.bias_quantiles)
        scalars = (self.item_norm, self.pos_score, self.neg_score)
        if not (all(np.isfinite(a).all() for a in arrays) and np.isfinite(scalars).all()):
            raise ValueError("prior holds NaN or infinite values")
        self._cache: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def bias_at(self, q: float) -> float:
        """The catalogue's q-quantile of item biases (interpolated between the kept ones)."""
        return float(np.interp(q, QUANTILES, self.bias_quantiles))

    @property
    def dim(self) -> int:
        """D + 1: the width of a tower output and of an item row."""
        return int(self.item_mean.shape[0])

    @classmethod
    def from_catalogue(
        cls,
        user_vecs: np.ndarray,  # (U, D1) content_vector rows of (a sample of) users
        item_vecs: np.ndarray,  # (I, D1) item rows [v, b] of the bundle
        pos_users: np.ndarray,  # (P,) row indices into user_vecs of training pairs
        pos_items: np.ndarray,  # (P,) row indices into item_vecs of the same pairs
    ) -> FoldInPrior:
        x = np.asarray(user_vecs, np.float64)
        t = np.asarray(item_vecs, np.float64)
        if x.ndim != 2 or t.ndim != 2 or x.shape[1] != t.shape[1] or not len(x) or not len(t):
            raise ValueError(
                f"user_vecs and item_vecs must be non-empty (n, D1) arrays of one width, got "
                f"{x.shape} and {t.shape}"
            )
        pu, pi = np.asarray(pos_users), np.asarray(pos_items)
        if pu.shape != pi.shape or not len(pu):
            raise ValueError("pos_users and pos_items must be equally long and non-empty")
        pos = np.einsum("nd,nd->n", x[pu], t[pi])
        user_mean = x.mean(0)
        item_mean = t.mean(0)
        return cls(
            item_mean=item_mean,
            item_norm=float(np.median(np.linalg.norm(t[:, :-1], axis=1))),
            bias_quantiles=np.quantile(t[:, -1], QUANTILES),
            user_mean=user_mean,
            user_gram=x.T @ x / len(x),
            pos_score=float(pos.mean()),
            neg_score=float(user_mean @ item_mean),  # mean over every (user, item) pair
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        np.savez(path, **{k: np.asarray(getattr(self, k)) for k in _PRIOR_FIELDS})
        return path

    @classmethod
    def load(cls, path: str | Path) -> FoldInPrior:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _PRIOR_FIELDS if k not in z.files]
            if missing:
                raise ValueError(f"{path}: not a fold-in prior (missing {', '.join(missing)})")
            return cls(**{k: z[k] for k in _PRIOR_FIELDS})

    def ridge_base(self, negatives: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """(A0^-1, A0^-1 r0) for A0 = negatives G + lam I, r0 = negatives s_neg g + lam theta_0,
        cached per (negatives, lam): the part of every ridge solve that no item changes."""
        key = (float(negatives), float(lam))
        got = self._cache.get(key)
        if got is None:
            a0 = negatives * self.user_gram + lam * np.eye(self.dim)
            r0 = negatives * self.neg_score * self.user_mean + lam * self.item_mean
            inv = np.linalg.inv(a0)
            inv = (inv + inv.T) / 2  # exactly symmetric
            got = (inv, inv @ r0)
            with self._lock:
                self._cache[key] = got
        return got


def eligible_count(weights: np.ndarray, cfg: FoldInConfig) -> int:
    """How many of the interactions count toward eligibility (weight > 0, at most max_users)."""
    w = np.asarray(weights)
    return int(min(np.count_nonzero(w > 0), cfg.max_users))


def fold_in(
    user_vecs: np.ndarray,
    weights: np.ndarray,
    prior: FoldInPrior,
    cfg: FoldInConfig = FoldInConfig(),
    timestamps: np.ndarray | None = None,
) -> np.ndarray | None:
    """The (D + 1,) float32 item row for a fresh item, or None while it is not eligible.

    ``user_vecs`` (n, D + 1): the ``content_vector`` tower outputs of the users who
    interacted with the item (bias slot included); ``weights`` (n,): their interaction
    weights (>= 0; 0 rows are ignored). Only the ``max_users`` most recent users are used:
    by ``timestamps`` (n,) when given, else the last rows (callers pass them oldest first).
    Fewer than ``min_interactions`` users with weight > 0: None (not yet eligible). NaN or
    infinite inputs, negative weights, all-zero weights or a width other than the prior's:
    ValueError. Invariant to the order of the users as long as n <= max_users.
    """
    x = np.asarray(user_vecs)
    w = np.asarray(weights)
    if x.ndim != 2 or x.shape[1] != prior.dim:
        raise ValueError(
            f"user_vecs must be (n, {prior.dim}) tower outputs (bias slot included), got {x.shape}"
        )
    if w.shape != (x.shape[0],):
        raise ValueError(f"weights must be ({x.shape[0]},), one per user vector, got {w.shape}")
    if x.shape[0] == 0:
        raise ValueError("no interactions: user_vecs is empty")
    if not np.isfinite(x).all():
        raise ValueError("user_vecs holds NaN or infinite values")
    if not np.isfinite(w).all():
        raise ValueError("weights hold NaN or infinite values")
    if (w < 0).any():
        raise ValueError("weights must be >= 0")
    if not (w > 0).any():
        raise ValueError("all weights are zero: no interaction to fold in")
    keep = np.flatnonzero(w > 0)
    if timestamps is not None:
        ts = np.asarray(timestamps)
        if ts.shape != w.shape:
            raise ValueError(f"timestamps must be ({w.shape[0]},), got {ts.shape}")
        keep = keep[np.argsort(ts[keep], kind="stable")]
    keep = keep[-cfg.max_users :]
    if len(keep) < cfg.min_interactions:
        return None
    xs = x[keep].astype(np.float64)
    ws = _transform(w[keep].astype(np.float64), cfg.weight_transform)
    if cfg.method == "ridge":
        theta = _ridge(xs, ws, prior, cfg)
        v = theta[:-1]
        if cfg.calibration == "none":
            return theta.astype(np.float32)
    else:
        v = (ws @ xs[:, :-1]) / ws.sum()  # (D,)
        if cfg.method == "mean_centered":
            v = v - prior.user_mean[:-1]
    n = np.linalg.norm(v)
    v = v * (cfg.scale * prior.item_norm / n) if n > 0 else prior.item_mean[:-1].copy()
    return np.concatenate([v, [prior.bias_at(cfg.bias_quantile)]]).astype(np.float32)


def _transform(w: np.ndarray, how: str) -> np.ndarray:
    """Interaction weights -> regression weights with mean 1 (so lam counts in users)."""
    if how == "binary":
        return np.ones_like(w)
    if how == "log1p":
        w = np.log1p(w)
    w = np.maximum(w, 0.0)
    m = w.mean()
    return w / m if m > 0 else np.ones_like(w)


def _ridge(x: np.ndarray, w: np.ndarray, prior: FoldInPrior, cfg: FoldInConfig) -> np.ndarray:
    """(A0 + S^T S)^-1 (r0 + s_pos S^T sqrt(w)) by Woodbury: a k x k solve, k = len(x)."""
    inv, z0 = prior.ridge_base(cfg.negatives, cfg.lam)
    sw = np.sqrt(w)
    s = x * sw[:, None]  # (k, D1)
    p = s @ inv  # (k, D1) = S A0^-1
    z = z0 + prior.pos_score * (p.T @ sw)  # A0^-1 r
    k = np.eye(len(x)) + p @ s.T  # (k, k) I + S A0^-1 S^T, symmetric positive definite
    return z - p.T @ np.linalg.solve(k, s @ z)
