"""Training task for the teacher: batches, losses, early stopping, checkpoints, DDP.

Model selection uses a validation split carved out of the training part; each head keeps
the parameters of its own best validation epoch (the heads share no parameters, so the
best content head and the best friend head combine exactly). A head whose task has no
validation pairs (e.g. friends on a dataset without a friend graph) has nothing to select
on: it trains along and is kept at the last epoch, and early stopping follows the others.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from socialrec.training.features import Features
from socialrec.training.fof_blend import choose_fof_weight
from socialrec.training.metrics import Graph, absent, absent_reason, evaluate, is_absent
from socialrec.training.model import TowerConfig, TwoTower, TwoTowerTrainTask
from socialrec.training.split import Split
from tqdm import tqdm

FULL_SOFTMAX_MAX = 60_000  # catalogues up to this size train with a full softmax


@dataclass(frozen=True)
class TrainConfig:
    dim: int = 256
    input_dropout: float = 0.5
    weight_transform: str = "binary"  # see training.model.WEIGHT_TRANSFORMS
    weight_threshold: float = 0.0  # weight_transform "threshold": weights >= this count
    content_uses_friends: bool = True
    friends_uses_history: bool = True
    epochs: int = 150
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    friend_loss_weight: float = 1.0
    patience: int = 15  # epochs without a validation gain (per head) before stopping
    eval_every: int = 2
    max_history: int = 256
    max_friends: int = 256
    negatives: int = 4096  # sampled-softmax negatives per batch (large catalogues only)
    max_eval_users: int = 5000  # validation users sampled per evaluation
    refit: bool = True  # after selection, retrain on the whole train part for the chosen epochs
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch default


def tower_config(cfg: TrainConfig, n_users: int, n_items: int) -> TowerConfig:
    return TowerConfig(
        n_items=n_items,
        n_users=n_users,
        dim=cfg.dim,
        input_dropout=cfg.input_dropout,
        weight_transform=cfg.weight_transform,
        weight_threshold=cfg.weight_threshold,
        content_uses_friends=cfg.content_uses_friends,
        friends_uses_history=cfg.friends_uses_history,
    )


CONTENT_PARAMS = (
    "user_tower.item_in_c",
    "user_tower.user_in_c",
    "user_tower.bias_c",
    "item_out",
    "item_bias",
)


def is_content_param(name: str) -> bool:
    return name.startswith(CONTENT_PARAMS)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Join a torchrun process group (gloo on CPU) when launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        return True
    return False


class Scorer:
    """Full-catalogue scores of a model for batches of users, fed from a split's features."""

    def __init__(self, model: TwoTower, feats: Features) -> None:
        self.model = model
        self.feats = feats

    def inputs(self, users: np.ndarray) -> tuple[torch.Tensor, ...]:
        hi, hw = self.feats.history(users)
        fi, fw = self.feats.friends(users)
        return (
            torch.from_numpy(hi),
            torch.from_numpy(hw),
            torch.from_numpy(fi),
            torch.from_numpy(fw),
        )

    @torch.no_grad()
    def content(self, users: np.ndarray) -> np.ndarray:
        self.model.eval()
        u_c, _ = self.model.user_tower(*self.inputs(users))
        return self.model.content_logits(u_c).numpy()

    @torch.no_grad()
    def friends(self, users: np.ndarray) -> np.ndarray:
        self.model.eval()
        _, u_f = self.model.user_tower(*self.inputs(users))
        return self.model.friend_logits(u_f).numpy()


def evaluate_model(
    model: TwoTower, split: Split, max_users: int | None = None, desc: str | None = None
) -> dict[str, dict[str, float]]:
    """Content and friend metrics of a model on a split (inputs = the split's train part);
    a task without test positives is :func:`~training.metrics.absent`."""
    sc = Scorer(model, Features.from_split(split))
    tr = Graph(split.n_users, split.train_user, split.train_item)
    te = Graph(split.n_users, split.test_user, split.test_item)
    ftr = Graph.undirected(split.n_users, split.friends_train)
    fte = Graph.undirected(split.n_users, split.friends_test)
    why = {t: absent_reason(split, t) for t in ("content", "friends")}
    return {
        "content": absent(why["content"])
        if why["content"]
        else evaluate(sc.content, tr, te, max_users=max_users, desc=desc and f"{desc} content"),
        "friends": absent(why["friends"])
        if why["friends"]
        else evaluate(
            sc.friends,
            ftr,
            fte,
            exclude_self=True,
            max_users=max_users,
            desc=desc and f"{desc} friends",
        ),
    }


def _targets(indptr: np.ndarray, cols: np.ndarray, users: np.ndarray, n: int) -> torch.Tensor:
    """Dense binary target rows.  (B, n)"""
    t = np.zeros((len(users), n), dtype=np.float32)
    lens = indptr[users + 1] - indptr[users]
    rows = np.repeat(np.arange(len(users)), lens)
    idx = (
        np.concatenate([np.arange(indptr[u], indptr[u + 1]) for u in users])
        if len(users)
        else np.zeros(0, np.int64)
    )
    t[rows, cols[idx]] = 1.0
    return torch.from_numpy(t)


def _log_q(counts: np.ndarray, power: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling distribution ~ count^power (+1 smoothing) and its log, for sampled softmax."""
    p = (counts.astype(np.float64) + 1.0) ** power
    p /= p.sum()
    return torch.from_numpy(p.astype(np.float32)), torch.from_numpy(np.log(p).astype(np.float32))


def train_teacher(
    split: Split,
    val: Split,
    cfg: TrainConfig,
    progress: bool = True,
    keep: dict | None = None,
    selection: tuple[TwoTower, dict] | None = None,
) -> tuple[TwoTower, dict]:
    """Select each head's epoch count on ``val`` (carved from train), then refit on all of train.

    Phase 1 fits on ``val``'s train part and scores ``val``'s held-out part every
    ``eval_every`` epochs (early stopping per head). With ``cfg.refit`` phase 2 trains a
    fresh model on ``split``'s whole train part and keeps each head at its selected epoch.
    Under torchrun every rank trains its shard of users with DDP; all ranks evaluate
    identically so the early-stopping decision agrees. ``keep["selection"]`` receives the
    phase-1 model (it never saw validation's held-out pairs) when ``keep`` is given.
    ``selection``: phase 1's (model, log) already run for ``cfg`` (the search's chosen trial,
    ``training.tune``); phase 1 is then not run again.
    """
    t0 = time.time()
    if selection is not None:
        model, log = selection
        if progress and _dist()[0] == 0:
            print("teacher (select): the search's chosen trial (same config and seed), not rerun")
    else:
        model, log = fit(val, cfg, cfg.epochs, val=val, progress=progress, desc="teacher (select)")
    if keep is not None:
        keep["selection"] = model
    # The server's mutual-friends bonus, weighted on validation by the model that never saw
    # validation's held-out pairs (training.fof_blend).
    selected = Scorer(model, Features.from_split(val, cfg.max_history, cfg.max_friends))
    log["fof_weight"] = choice = choose_fof_weight(
        selected.friends, val, max_users=cfg.max_eval_users
    )
    if progress and _dist()[0] == 0 and choice["chosen"] is not None:
        grid = choice["val_recall@20"]
        alone = f"; tower alone {grid['0.0']:.4f}" if "0.0" in grid else ""
        print(
            f"friend blend: fof_weight {choice['chosen']:g} chosen on validation (recall@20 "
            f"{grid[str(choice['chosen'])]:.4f}{alone})"
        )
    if cfg.refit:
        # Heads without validation pairs have no selected epoch: they train along to the end.
        epochs = {
            t: log["best"][t]["epoch"]
            for t in ("content", "friends")
            if log["best"][t]["epoch"] is not None
        }
        model, refit_log = fit(
            split,
            cfg,
            max(epochs.values(), default=len(log["epochs"])),
            snapshot_at=epochs,
            progress=progress,
            desc="teacher (refit)",
        )
        log["refit"] = {"epochs": epochs, "losses": [e["loss"] for e in refit_log["epochs"]]}
    log["seconds"] = time.time() - t0
    return model, log


TaskFactory = Callable[[TwoTower, float, torch.Tensor, torch.Tensor], torch.nn.Module]


def fit(
    split: Split,
    cfg: TrainConfig,
    epochs: int,
    val: Split | None = None,
    snapshot_at: dict[str, int] | None = None,
    progress: bool = True,
    desc: str = "teacher",
    init: TwoTower | None = None,
    make_task: TaskFactory = TwoTowerTrainTask,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[TwoTower, dict]:
    """Train on ``split``'s train part; keep each head at its best ``val`` epoch or at ``snapshot_at``.

    ``on_eval(epoch, {task: val recall@20})`` is called after every validation evaluation
    (a hyperparameter search prunes a trial from it by raising); a true return stops the fit
    there, each head kept at its best epoch so far (a wall-clock budget).

    ``init`` starts from a given model (a compressed student) instead of a fresh teacher;
    ``make_task(model, friend_loss_weight, item_log_q, user_log_q)`` builds the module whose
    ``forward(batch)`` is the loss (the teacher's task, or a distillation task).
    """
    rank, world = _dist()
    torch.manual_seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = init if init is not None else TwoTower(tower_config(cfg, split.n_users, split.n_items))
    feats = Features.from_split(split, cfg.max_history, cfg.max_friends)
    users = feats.active_users()
    full_items = split.n_items <= FULL_SOFTMAX_MAX
    full_users = split.n_users <= FULL_SOFTMAX_MAX
    item_p, item_logq = _log_q(np.bincount(split.train_item, minlength=split.n_items))
    user_p, user_logq = _log_q(np.diff(feats.fr_indptr))
    task = make_task(model, cfg.friend_loss_weight, item_logq, user_logq)
    net: torch.nn.Module = task
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(task, find_unused_parameters=True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    best = {"content": (-1.0, None, 0), "friends": (-1.0, None, 0)}  # (score, state, epoch)
    absent_why: dict[str, str] = {}  # heads whose task has no validation pairs
    log: dict = {
        "epochs": [],
        "softmax": {
            "content": "full" if full_items else "sampled",
            "friends": "full" if full_users else "sampled",
        },
        "world_size": world,
    }
    bar = tqdm(range(1, epochs + 1), desc=desc, disable=not progress or rank != 0)
    for epoch in bar:
        net.train()
        perm = np_rng.permutation(users)
        # Every rank walks the same number of batches (DDP all-reduces at every step).
        per_rank = int(np.ceil(len(perm) / world))
        mine = perm[rank * per_rank : (rank + 1) * per_rank]
        losses = []
        for start in range(0, per_rank, cfg.batch_size):
            b = mine[start : start + cfg.batch_size]
            if len(b) == 0:  # the last rank's shard can run short
                b = perm[: min(cfg.batch_size, len(perm))]
            loss = net(_batch(b, feats, full_items, full_users, item_p, user_p, cfg))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        entry = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else 0.0}
        log["epochs"].append(entry)
        if snapshot_at is not None:
            for t, e in snapshot_at.items():
                if e == epoch:
                    best[t] = (0.0, _head_state(model, t), epoch)
            bar.set_postfix(loss=f"{entry['loss']:.3f}")
        elif val is not None and (epoch % cfg.eval_every == 0 or epoch == epochs):
            m = evaluate_model(model, val, max_users=cfg.max_eval_users)
            scored = [t for t in best if not is_absent(m[t])]
            absent_why.update({t: m[t]["reason"] for t in best if t not in scored})
            entry.update({f"val_{t}_recall@20": m[t]["recall@20"] for t in scored})
            for t in scored:
                if m[t]["recall@20"] > best[t][0]:
                    best[t] = (m[t]["recall@20"], _head_state(model, t), epoch)
            if on_eval is not None and on_eval(epoch, {t: m[t]["recall@20"] for t in scored}):
                log["stopped_by_caller"] = epoch  # e.g. a wall-clock budget ran out
                break
            bar.set_postfix(
                loss=f"{entry['loss']:.3f}", **{t[0]: f"{m[t]['recall@20']:.4f}" for t in scored}
            )
            if all(epoch - best[t][2] >= cfg.patience for t in scored):
                log["stopped_early"] = epoch
                break
    bar.close()
    if val is not None and progress and rank == 0:
        print(
            f"{desc}: {_selection_summary(log.get('stopped_early'), epochs, best, cfg, absent_why)}"
        )
    state = copy.deepcopy(model.state_dict())
    for t in best:
        if best[t][1] is not None:
            state.update(best[t][1])
    model.load_state_dict(state)
    model.eval()
    log["best"] = {t: {"epoch": best[t][2], "val_recall@20": best[t][0]} for t in best}
    for t, why in absent_why.items():  # no selection: kept at the last epoch
        log["best"][t] = {"epoch": None, "val_recall@20": None, "absent": why}
    return model, log


def _selection_summary(
    stopped: int | None, epochs: int, best: dict, cfg: TrainConfig, absent_why: dict[str, str]
) -> str:
    """Why selection ended and what it kept: the line printed after the progress bar."""
    kept = ", ".join(
        f"{t} absent ({absent_why[t]}; kept at the last epoch)"
        if t in absent_why
        else f"{t} {best[t][0]:.4f} at epoch {best[t][2]}"
        for t in best
    )
    if stopped is None:
        return f"ran all {epochs} epochs; best validation recall@20: {kept}"
    if len(absent_why) == len(best):
        why = "no head has validation pairs to select on"
    elif absent_why:
        why = (
            f"the scored head's validation recall@20 did not improve in the last "
            f"{cfg.patience} epochs (patience)"
        )
    else:
        why = (
            f"neither head's validation recall@20 improved in the last {cfg.patience} epochs "
            "(patience)"
        )
    return f"early stop at epoch {stopped} of {epochs}: {why}; best: {kept}"


def _head_state(model: TwoTower, task: str) -> dict[str, torch.Tensor]:
    """A copy of one head's parameters (the heads share none)."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if is_content_param(k) == (task == "content")
    }


def _batch(
    b: np.ndarray,
    feats: Features,
    full_items: bool,
    full_users: bool,
    item_p: torch.Tensor,
    user_p: torch.Tensor,
    cfg: TrainConfig,
) -> dict[str, torch.Tensor]:
    """Tower inputs and targets of one batch of users (dense targets or sampled negatives)."""
    hi, hw = feats.history(b)
    fi, fw = feats.friends(b)
    out = {
        k: torch.from_numpy(v)
        for k, v in (("hist_ids", hi), ("hist_w", hw), ("friend_ids", fi), ("friend_w", fw))
    }
    out["users"] = torch.from_numpy(b.astype(np.int64))  # (B,) rows of the split
    out["friend_rows"] = torch.from_numpy(np.diff(feats.fr_indptr)[b] > 0)
    if full_items:
        out["content_target"] = _targets(feats.hist_indptr, feats.hist_items, b, feats.n_items)
    else:
        out["content_pos"], out["content_mask"] = out["hist_ids"], (out["hist_w"] > 0).float()
        out["item_neg"] = torch.multinomial(item_p, cfg.negatives, replacement=True)
    if full_users:
        out["friend_target"] = _targets(feats.fr_indptr, feats.fr_users, b, feats.n_users)
        self_mask = torch.zeros(len(b), feats.n_users, dtype=torch.bool)
        self_mask[torch.arange(len(b)), torch.from_numpy(b.astype(np.int64))] = True
        out["self_mask"] = self_mask
    else:
        out["friend_pos"], out["friend_mask"] = out["friend_ids"], out["friend_w"]
        out["user_neg"] = torch.multinomial(user_p, cfg.negatives, replacement=True)
    return out


def save_checkpoint(
    model: TwoTower, cfg: TrainConfig, path: str | Path, extra: dict | None = None
) -> Path:
    """A checkpoint that carries its own config (tower + training) and provenance."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "tower_config": model.cfg.as_dict(),
            "train_config": asdict(cfg),
            "state_dict": model.state_dict(),
            "extra": extra or {},
        },
        path,
    )
    return path


def load_checkpoint(path: str | Path) -> tuple[TwoTower, dict]:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = TwoTower(TowerConfig(**ck["tower_config"]))
    model.load_state_dict(ck["state_dict"])
    model.eval()
    return model, ck
