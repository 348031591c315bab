"""`socialrec train`: load, split, score the baselines, train and score the teacher, report.

``run(config) -> RUN_DIR``; the CLI only parses arguments into a :class:`RunConfig`.

In report.json each task ("content", "friends") maps model names to metrics, or, when the
split has no test positive for it (e.g. a dataset without a friend graph), is
``{"absent": true, "reason": "..."}``: no model is scored on it and no 0.0 is written.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from socialrec.training.baselines import (
    BaselineConfig,
    choose_ease_lambda,
    content_baselines,
    friend_baselines,
)
from socialrec.training.data import DataConfig, load_dataset
from socialrec.training.dataset import Dataset
from socialrec.training.features import Features
from socialrec.training.fof_blend import blended
from socialrec.training.metrics import TASKS, Graph, absent, absent_reason, evaluate, is_absent
from socialrec.training.refine import RefineConfig, refine_teacher
from socialrec.training.split import (
    Split,
    SplitConfig,
    export_split,
    split_dataset,
    validation_split,
)
from socialrec.training.train import (
    Scorer,
    TrainConfig,
    evaluate_model,
    init_distributed,
    save_checkpoint,
    train_teacher,
)
from socialrec.training.tune import TuneConfig, tune


@dataclass(frozen=True)
class RunConfig:
    out: str = "runs/synthetic"
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    tune: TuneConfig | None = None  # None: no search (the `train` CLI passes its default budget)
    # Distil the teacher (refine.py); off here, on in the `train` CLI (like the search).
    refine: RefineConfig = field(default_factory=lambda: RefineConfig(enabled=False))
    max_eval_users: int | None = None  # None: every user with a test positive
    progress: bool = True


def prepare(cfg: RunConfig) -> tuple[Dataset, Split]:
    """The dataset and its protocol split, exactly as `split` and `train` see them."""
    ds = load_dataset(cfg.data)
    return ds, split_dataset(ds, cfg.split)


def score_baselines(split: Split, cfg: RunConfig) -> tuple[dict, dict, dict]:
    """Content and friend baselines on the split; returns (content, friends, notes).

    A task without test positives is returned as :func:`~training.metrics.absent` instead.
    """
    tr = Graph(split.n_users, split.train_user, split.train_item)
    te = Graph(split.n_users, split.test_user, split.test_item)
    ftr = Graph.undirected(split.n_users, split.friends_train)
    fte = Graph.undirected(split.n_users, split.friends_test)
    why = {t: absent_reason(split, t) for t in TASKS}
    content: dict = absent(why["content"]) if why["content"] else {}
    friends: dict = absent(why["friends"]) if why["friends"] else {}
    notes: dict = {}
    # An absent task scores no baseline (and reports no skip notes for one).
    content_builders = {} if why["content"] else content_baselines(split, cfg.baselines)
    friend_builders = {} if why["friends"] else friend_baselines(split)
    for name, build in content_builders.items():
        if isinstance(build, str):
            notes[name] = build
            continue
        content[name] = evaluate(
            build(), tr, te, max_users=cfg.max_eval_users, desc=name if cfg.progress else None
        )
    for name, build in friend_builders.items():
        if isinstance(build, str):
            notes[name] = build
            continue
        friends[name] = evaluate(
            build(),
            ftr,
            fte,
            exclude_self=True,
            max_users=cfg.max_eval_users,
            desc=name if cfg.progress else None,
        )
    return content, friends, notes


EASE_FALLBACK_LAMBDA = 100.0  # when validation has no content pairs to choose on


def select_ease(split: Split, val: Split, cfg: RunConfig) -> dict:
    """EASE's lambda for this run: fixed by the config, or chosen on ``val`` from the grid."""
    b = cfg.baselines
    params: dict = {"input": "binary"}
    if b.ease_lambda is not None:
        return {**params, "lambda": b.ease_lambda, "selection": "fixed by the config"}
    if split.n_items > b.ease_max_items or absent_reason(split, "content"):
        return {**params, "lambda": None, "selection": "EASE not scored on this run"}
    why = absent_reason(val, "content")
    if why:
        return {
            **params,
            "lambda": EASE_FALLBACK_LAMBDA,
            "selection": f"validation has no content pairs ({why}): fallback lambda",
        }
    sel = choose_ease_lambda(
        val, b.ease_lambdas, max_users=cfg.max_eval_users, progress=cfg.progress
    )
    return {**params, "lambda": sel["chosen"], "selection": "validation recall@20", **sel}


def run(cfg: RunConfig) -> Path:
    """Train and evaluate the teacher and all baselines; write report.json, teacher.pt, split/."""
    distributed = init_distributed()
    rank = 0
    if distributed:
        import torch.distributed as dist

        rank = dist.get_rank()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ds, split = prepare(cfg)
    if cfg.progress and rank == 0:
        for line in ds.describe():
            print(f"[data] {line}")
    val = validation_split(split)
    t0 = time.time()
    tc, study = cfg.train, None
    searched: dict = {}  # the search's chosen trial: the teacher's selection phase, not rerun
    if cfg.tune is not None and cfg.tune.budget_min > 0:
        if distributed:
            study = {"note": "no search under torchrun: the given config trains as is"}
        else:
            tc, study = tune(
                val, cfg.train, cfg.tune, progress=cfg.progress and rank == 0, keep=searched
            )
    t_tune = time.time() - t0
    t0 = time.time()
    kept: dict = {}
    model, log = train_teacher(
        split, val, tc, progress=cfg.progress, keep=kept, selection=searched.get("selection")
    )
    searched.clear()  # the selection model lives on in ``kept``
    t_train = time.time() - t0
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    if rank != 0:
        return out
    export_split(ds, split, out / "split")
    t0 = time.time()
    ease_params = select_ease(split, val, cfg)
    t_ease = time.time() - t0
    t0 = time.time()
    base = model
    model, refined = refine_teacher(
        split, val, model, kept.pop("selection"), log, tc, ease_params["lambda"], cfg.refine,
        progress=cfg.progress, keep_twin=kept,
    )  # fmt: skip
    if "fof_weight" in refined:  # the friend head changed: its weight was chosen again
        log["fof_weight_before_refine"] = log["fof_weight"]
        log["fof_weight"] = refined["fof_weight"]
    t_refine = time.time() - t0
    t0 = time.time()
    content, friends, notes = score_baselines(
        split, replace(cfg, baselines=replace(cfg.baselines, ease_lambda=ease_params["lambda"]))
    )
    teacher = evaluate_model(
        model, split, max_users=cfg.max_eval_users, desc="teacher" if cfg.progress else None
    )
    before = None
    if model is not base:
        before = evaluate_model(
            base, split, max_users=cfg.max_eval_users, desc=PRE_KD if cfg.progress else None
        )
    for table, task in ((content, "content"), (friends, "friends")):
        if not is_absent(table):
            if before is not None:
                table[PRE_KD] = before[task]
            table["teacher"] = teacher[task]
    fof_w = log["fof_weight"].get("chosen")
    if not is_absent(friends) and fof_w is not None:
        friends[SERVED_FRIENDS] = served_friends(model, split, fof_w, cfg.max_eval_users)
    t_eval = time.time() - t0
    report = {
        "dataset": ds.summary(),
        "split": {
            "seed": split.seed,
            "sha256": split.sha256(),
            "test_fraction": cfg.split.test_fraction,
        },
        "content": content,
        "friends": friends,
        "timings_s": {
            "tune": round(t_tune, 2),
            "train": round(t_train, 2),
            "ease_selection": round(t_ease, 2),
            "refine": round(t_refine, 2),
            "evaluate": round(t_eval, 2),
        },
        "baseline_params": {
            "EASE": ease_params,
            "ItemKNN": {"similarity": "cosine", "input": "binary", "neighbours": "all"},
        },
        "notes": notes,
        "teacher": {
            "train_log": log,
            "train_config": asdict(tc),
            "tuning": study,
            "refine": refined,
        },
        "data_report": ds.report.as_dict(),
        "data_fingerprint": ds.fingerprint(),
        "evaluated_users": "all"
        if cfg.max_eval_users is None
        else f"sample of {cfg.max_eval_users}",
    }
    save_checkpoint(
        model,
        tc,
        out / "teacher.pt",
        extra={"dataset": ds.summary(), "split_sha256": split.sha256()},
    )
    save_checkpoint(  # compression's validation pass starts from it (no refit there)
        kept.pop("validation"),
        tc,
        out / VALIDATION_TWIN,
        extra={
            "dataset": ds.summary(),
            "split_sha256": split.sha256(),
            "fitted_on": "the validation split's train part (training.split.validation_split)",
        },
    )
    np.save(out / "user_ids.npy", ds.user_ids.astype(str), allow_pickle=False)
    np.save(out / "item_ids.npy", ds.item_ids.astype(str), allow_pickle=False)
    # run.json names the config that trained the teacher (the study's choice, if any), so a
    # retrain from it trains the same recipe without searching again.
    (out / "run.json").write_text(
        json.dumps(_jsonable(asdict(replace(cfg, train=tc))), indent=2) + "\n"
    )
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    return out


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


# The served teacher's recipe on the validation split's train part: the selection-phase
# teacher, refined as the served one was (training.refine), never shown validation pairs.
VALIDATION_TWIN = "teacher.validation.pt"
PRE_KD = "teacher pre-KD"  # the two-tower before refine.py distilled it (when that won)
SERVED_FRIENDS = "teacher+fof"  # the friend ranking the server serves (training.fof_blend)


def served_friends(model, split: Split, weight: float, max_users: int | None) -> dict[str, float]:
    """Test metrics of the teacher's friend scores plus the served mutual-friends bonus."""
    sc = Scorer(model, Features.from_split(split))
    return evaluate(
        blended(sc.friends, split, weight),
        Graph.undirected(split.n_users, split.friends_train),
        Graph.undirected(split.n_users, split.friends_test),
        exclude_self=True,
        max_users=max_users,
    )


def format_table(report: dict) -> str:
    """The report's metrics as a fixed-width table (what `train` prints)."""
    d = report["dataset"]
    lines = [
        f"dataset {d['name']}: {d['users']} users, {d['items']} items, {d['interactions']} interactions, {d['friend_pairs']} friend pairs; split sha256 {report['split']['sha256'][:12]}",
        f"{'task':8s} {'model':16s} {'R@10':>7s} {'R@20':>7s} {'N@10':>7s} {'N@20':>7s}",
    ]
    for task in TASKS:
        if is_absent(report.get(task)):
            why = (report.get(task) or {}).get("reason", "not in the report")
            lines.append(f"{task:8s} absent: {why}; no model is scored on this task")
            continue
        for name, m in report[task].items():
            lines.append(
                f"{task:8s} {name:16s} {m['recall@10']:7.4f} {m['recall@20']:7.4f} {m['ndcg@10']:7.4f} {m['ndcg@20']:7.4f}"
            )
    for name, why in report.get("notes", {}).items():
        lines.append(f"  {name}: {why}")
    t = report["timings_s"]
    lines.append(f"train {t['train']:.1f}s, evaluate {t['evaluate']:.1f}s")
    return "\n".join(lines)


def load_run(run_dir: str | Path) -> tuple[Dataset, Split, dict]:
    """Reload a run's dataset and split from run.json; checks the split is the one reported."""
    run_dir = Path(run_dir)
    for name in ("run.json", "report.json"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(
                f"{run_dir / name}: not a training run directory (run `socialrec train --out {run_dir}` first)"
            )
    cfg = json.loads((run_dir / "run.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    ds = load_dataset(DataConfig(**cfg["data"]))
    split = split_dataset(ds, SplitConfig(**cfg["split"]))
    if split.sha256() != report["split"]["sha256"]:
        raise ValueError(
            f"{run_dir}: the data no longer gives the split the report scored (sha256 {split.sha256()[:12]} vs {report['split']['sha256'][:12]}); was the dataset changed?"
        )
    return ds, split, report
