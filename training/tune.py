"""Choosing the teacher's hyperparameters per dataset on the validation split (Optuna).

Each trial is the selection phase of :func:`~training.train.train_teacher` (fit on the
validation split's train part, early stopping on its held-out part) with sampled
hyperparameters; its value is the mean over the scored heads of their best validation
recall@20. The first trial is always the given config, so the study can only match or beat
it on validation. Trials report every evaluation to a median pruner. The test part is
never seen: the chosen config then trains the final teacher, which scores the test once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np
from socialrec.training.model import WEIGHT_TRANSFORMS
from socialrec.training.split import Split
from socialrec.training.train import TrainConfig, fit


@dataclass(frozen=True)
class TuneConfig:
    budget_min: float = 2.0  # wall-clock minutes for the study; 0: no search, the config as given
    trials: int = 20  # most trials (the budget usually ends the study first)
    seed: int = 0  # sampler seed
    warmup_epochs: int = 10  # no trial is pruned before this epoch
    startup_trials: int = 3  # completed trials before the pruner starts pruning

    def __post_init__(self) -> None:
        if self.budget_min < 0:
            raise ValueError(f"tune budget must be >= 0 minutes, got {self.budget_min}")
        if self.trials < 1:
            raise ValueError(f"tune trials must be >= 1, got {self.trials}")


DIMS = (64, 128, 256)
LR_RANGE = (3e-4, 1e-2)
DROPOUT_RANGE = (0.0, 0.8)
FRIEND_LOSS_RANGE = (0.25, 4.0)


def search_space(val: Split, base: TrainConfig) -> dict[str, object]:
    """What the study samples, given the data: weight transforms only where weights vary,
    the social mix only where there is a friend graph. Ranges always hold ``base``."""
    w = val.train_weight
    space: dict[str, object] = {
        "dim": sorted({*DIMS, base.dim}),
        "input_dropout": [
            min(DROPOUT_RANGE[0], base.input_dropout),
            max(DROPOUT_RANGE[1], base.input_dropout),
        ],
        "lr": [min(LR_RANGE[0], base.lr), max(LR_RANGE[1], base.lr)],
    }
    if len(w) and float(w.min()) != float(w.max()):
        space["weight_transform"] = list(WEIGHT_TRANSFORMS)
        # Thresholds at the weights' median and upper quartile (e.g. 4 and 5 stars).
        thresholds = {float(np.quantile(w, q)) for q in (0.5, 0.75)}
        if base.weight_transform == "threshold":
            thresholds.add(base.weight_threshold)
        space["weight_threshold"] = sorted(thresholds)
    if len(val.friends_train):
        space["content_uses_friends"] = [True, False]
        space["friends_uses_history"] = [True, False]
        space["friend_loss_weight"] = [
            min(FRIEND_LOSS_RANGE[0], base.friend_loss_weight),
            max(FRIEND_LOSS_RANGE[1], base.friend_loss_weight),
        ]
    return space


def _suggest(trial, space: dict[str, object], base: TrainConfig) -> TrainConfig:
    """A TrainConfig with the trial's sampled values on top of ``base``."""
    p: dict[str, object] = {
        "dim": trial.suggest_categorical("dim", space["dim"]),
        "input_dropout": trial.suggest_float("input_dropout", *space["input_dropout"]),
        "lr": trial.suggest_float("lr", *space["lr"], log=True),
    }
    if "weight_transform" in space:
        wt = trial.suggest_categorical("weight_transform", space["weight_transform"])
        p["weight_transform"] = wt
        if wt == "threshold":
            p["weight_threshold"] = trial.suggest_categorical(
                "weight_threshold", space["weight_threshold"]
            )
    if "content_uses_friends" in space:
        for k in ("content_uses_friends", "friends_uses_history"):
            p[k] = trial.suggest_categorical(k, space[k])
        p["friend_loss_weight"] = trial.suggest_float(
            "friend_loss_weight", *space["friend_loss_weight"], log=True
        )
    return replace(base, **p)


def _base_params(space: dict[str, object], base: TrainConfig) -> dict[str, object]:
    """The given config as trial parameters (enqueued as trial 0)."""
    p: dict[str, object] = {"dim": base.dim, "input_dropout": base.input_dropout, "lr": base.lr}
    if "weight_transform" in space:
        p["weight_transform"] = base.weight_transform
        if base.weight_transform == "threshold":
            p["weight_threshold"] = base.weight_threshold
    if "content_uses_friends" in space:
        p.update(
            content_uses_friends=base.content_uses_friends,
            friends_uses_history=base.friends_uses_history,
            friend_loss_weight=base.friend_loss_weight,
        )
    return p


class _OutOfTime(Exception):
    """The study's budget ran out inside a trial."""


def tune(
    val: Split, base: TrainConfig, cfg: TuneConfig, progress: bool = True, keep: dict | None = None
) -> tuple[TrainConfig, dict]:
    """Run the study on ``val``; returns (the best trial's config, the study's record).

    With ``keep``, ``keep["selection"]`` receives ``(model, log)`` of the best trial that ran
    to its end (neither pruned nor cut by the budget) when that trial is the chosen one: it is
    exactly the selection phase ``train_teacher`` would run again for the chosen config.

    With ``budget_min == 0`` nothing runs and ``base`` comes back unchanged. A trial still
    running when the budget ends stops at its next validation evaluation (the study can run
    past the budget by one ``eval_every`` interval) and counts with its best validation score
    so far (a lower bound of what it would have reached).
    """
    if cfg.budget_min == 0:
        return base, {"budget_min": 0, "note": "no search: the given config trains as is"}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_space(val, base)
    t0 = time.time()
    deadline = t0 + 60 * cfg.budget_min
    records: list[dict] = []
    finished: dict = {}  # the best trial that ran to its end: value, number, (model, log)

    def objective(trial) -> float:
        tc = _suggest(trial, space, base)
        best: dict[str, float] = {}
        cut = False

        def on_eval(epoch: int, scores: dict[str, float]) -> None:
            for t, s in scores.items():
                best[t] = max(best.get(t, 0.0), s)
            if best:
                trial.report(float(np.mean(list(best.values()))), epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            if time.time() > deadline:
                raise _OutOfTime()

        t1 = time.time()
        rec = {"number": trial.number, "params": dict(trial.params)}
        try:
            model, log = fit(val, tc, tc.epochs, val=val, progress=False, on_eval=on_eval)
            best = {
                t: b["val_recall@20"]
                for t, b in log["best"].items()
                if b.get("val_recall@20") is not None
            }
            rec["epochs_run"] = len(log["epochs"])
        except optuna.TrialPruned:
            rec.update(state="pruned", val_recall20=dict(best), seconds=round(time.time() - t1, 1))
            records.append(rec)
            raise
        except _OutOfTime:
            cut = True
        value = float(np.mean(list(best.values()))) if best else 0.0
        rec.update(
            state="complete",
            value=value,
            val_recall20=dict(best),
            seconds=round(time.time() - t1, 1),
        )
        if cut:
            rec["cut_by_budget"] = True
        elif keep is not None and value > finished.get("value", -1.0):
            finished.update(value=value, number=trial.number, selection=(model, log))
        records.append(rec)
        if progress:
            print(f"[tune] trial {trial.number}: {value:.4f} {dict(trial.params)}")
        return value

    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_epochs
        ),
    )
    study.enqueue_trial(_base_params(space, base))
    remaining = max(deadline - time.time(), 1.0)
    study.optimize(objective, n_trials=cfg.trials, timeout=remaining)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best_trial = max(done, key=lambda t: t.value)  # trial 0 always completes or is cut
    chosen = _suggest(optuna.trial.FixedTrial(best_trial.params), space, base)
    reused = keep is not None and finished.get("number") == best_trial.number
    if reused:
        keep["selection"] = finished["selection"]
    record = {
        "budget_min": cfg.budget_min,
        "max_trials": cfg.trials,
        "seconds": round(time.time() - t0, 1),
        "objective": "mean over scored heads of the best validation recall@20 (selection phase)",
        "space": space,
        "pruner": f"median (startup {cfg.startup_trials} trials, warmup {cfg.warmup_epochs} epochs)",
        "trials": records,
        "best": {
            "number": best_trial.number,
            "value": best_trial.value,
            "params": best_trial.params,
            "default_value": records[0].get("value") if records else None,
        },
        "chosen_config": asdict(chosen),
        # the chosen trial's model and log serve as the teacher's selection phase (not rerun)
        "selection_reused": reused,
    }
    if progress:
        print(
            f"[tune] {len(records)} trials in {record['seconds']:.0f}s; best trial "
            f"{best_trial.number}: {best_trial.value:.4f} (the given config: "
            f"{record['best']['default_value']})"
        )
    return chosen, record
