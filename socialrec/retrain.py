"""`socialrec retrain`: app events -> new dataset -> retrained, compressed bundle -> gated publish.

``run(RetrainConfig) -> ROOT/retrain-<version>.json``. A pipeline stage of its own that drives
training, compression and serving modules, so it lives in the top-level package beside the
CLI rather than inside any one of them. Steps (rank 0 does all but training):

1. **Consume** every shard of the Redis event stream after ``state.json``'s ``cursor`` (the
   last stream id consumed in each shard): each entry is appended to ``ROOT/events.jsonl``
   (id-keyed, fsynced). Reading dedups by event id (stream id and shard), so a crash between
   the append and the checkpoint cannot double count, and the stream still holds the
   entries, so nothing is lost: the rerun appends them again and the dedup absorbs it. A
   cursor per shard, not one position in time: writes to different shards arrive in any
   order, and an entry that lands in one shard after a later one was read from another is
   still read next time.
2. **Merge** base dataset (RUN_DIR/run.json) + *every* consumed event (not only the new ones:
   training is from scratch, so each run needs the whole history) with
   :func:`training.events.merge_events`, written as TSV into a fresh run directory. Every
   event type is folded (interactions, friendships, dismissals, blocks, item takedowns and
   restores); unknown types are skipped and counted by name in the report. Feed controls are
   state the replay rebuilds each run, so nothing about them is kept in ``state.json``: a
   takedown stays in events.jsonl, every later retrain applies it again (the item stays out
   of the catalogue and its interactions out of the data) until a restore, which brings the
   interactions back. The taken-down ids are written beside the data (``removed_items.txt``)
   and counted in the report, for audit only.
3. **Retrain from scratch** with the base run's train config (``training.run.run``; under
   torchrun every rank trains, DDP over gloo). From scratch, not warm-started: new users and
   items change the embedding tables' shapes, the early-stopping selection stays honest on
   the new split, and the result does not depend on the chain of earlier bundles.
4. **Compress** with the base run's settings (its compression.json config), or export the
   fp32 teacher if the base run was only exported.
5. **Gate**: the candidate and the live bundle are both scored through the served path (ONNX
   Runtime + FAISS) on the *new* protocol split (same seed), minus the test rows the live
   bundle trained on (see :func:`unseen_by`), the live one through an id mapping (ids it
   never saw count as misses: that is what serving it would do; see
   :func:`compression.served_eval.served_evaluate`). Publish only if content
   and friends recall@20 are each >= live - ``gate_margin`` (absolute). A task the gate split
   cannot score (no test positives, e.g. friends on a dataset without a friend graph) is
   absent: it is listed as such and only the tasks present are compared; with none present
   the gate fails (nothing shows the candidate is not worse).
6. **Publish** (``serving.rollout.publish_bundle``: copy, verify, move CURRENT), write the
   report, then ``state.json`` atomically.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from socialrec.compression.served_eval import served_evaluate
from socialrec.serving.bundle import load_manifest
from socialrec.serving.rollout import current, publish_bundle
from socialrec.training.data import DataConfig, load_dataset
from socialrec.training.events import Event, merge_events, stream_key, write_tsv
from socialrec.training.metrics import is_absent
from socialrec.training.split import Split

EVENTS = "events.jsonl"
STATE = "state.json"
REMOVED = "removed_items.txt"  # in the run's data directory: the items this bundle leaves out
TASKS = ("content", "friends")
REPORT_IDS = 1000  # taken-down ids listed in the report (all of them are in REMOVED)


@dataclass(frozen=True)
class RetrainConfig:
    run_dir: str  # the base training run (its run.json names the base data and settings)
    redis_url: str
    bundles: str  # bundle root watched by the servers
    namespace: str = "socialrec"
    gate_margin: float = 0.02  # absolute recall@20 the candidate may lose vs live, per task
    epochs: int | None = None  # None: the base run's train config
    compress: str = "auto"  # auto (as the base run did) | quick | export
    work_dir: str | None = None  # retraining run directories; default ROOT/retrain-runs
    max_eval_users: int | None = None
    page: int = 100  # stream entries per XRANGE, per shard (one page: one XRANGE per shard)
    threads: int = 0  # torch threads; 0: torch's default
    progress: bool = False
    redis_cluster: bool = False  # redis_url names a node of a Redis Cluster


# --------------------------------------------------------------------------- events + state


def read_state(root: Path) -> dict:
    """The checkpoint: ``cursor`` ({shard: last stream id consumed}) and the runs published.

    A state from store layout v1 (one stream, ``last_id``) starts the v2 shards from the
    beginning: they are new keys, nothing of them was consumed yet."""
    p = root / STATE
    state = json.loads(p.read_text()) if p.exists() else {}
    state.setdefault("cursor", {})
    return state


def write_state(root: Path, state: dict) -> None:
    """tmp + fsync + os.replace: a crash leaves the old state or the new one, never half."""
    tmp = root / (STATE + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(state, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / STATE)


def read_events(root: Path) -> list[Event]:
    """Every consumed event once, in stream order (duplicated lines from a rerun collapse)."""
    p = root / EVENTS
    if not p.exists():
        return []
    seen: dict[str, dict[str, str]] = {}
    with p.open(encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # a torn last line from a crash: its entry is re-read from the stream
            e = json.loads(line)
            seen.setdefault(e["id"], e["fields"])
    return sorted(seen.items(), key=lambda kv: stream_key(kv[0]))


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line a crash left without its newline (its entry is re-read from the stream)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def consume(cfg: RetrainConfig, root: Path, after: dict[str, str]) -> tuple[int, dict[str, str]]:
    """Append every entry of every stream shard after the cursor ``after`` to events.jsonl;
    returns (count, the cursor past them)."""
    from socialrec.serving.offline_store import OfflineStore, advance
    from socialrec.serving.store import StoreConfig

    _drop_torn_tail(root / EVENTS)
    store_cfg = StoreConfig(url=cfg.redis_url, namespace=cfg.namespace, cluster=cfg.redis_cluster)
    n, cursor = 0, dict(after)
    with OfflineStore(store_cfg) as store, (root / EVENTS).open("a", encoding="utf-8") as f:
        while rows := store.events(after=cursor, count=cfg.page):
            for eid, fields in rows:
                f.write(json.dumps({"id": eid, "fields": fields}, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
            n, cursor = n + len(rows), advance(cursor, rows)
    return n, cursor


def feed_summary(applied: dict) -> list[str]:
    """The merge's non-zero feed-control counts in words, for the report."""
    labels = {
        "removed_items": "items taken down (left out of the catalogue)",
        "interactions_dropped_by_takedowns": "interactions dropped with taken-down items",
        "interactions_dropped_by_dismissals": "interactions dropped by dismissals",
        "friend_pairs_dropped_by_dismissals": "friend pairs dropped by dismissals",
        "friend_pairs_dropped_by_blocks": "friend pairs dropped by blocks",
        "clamped_weights": "(user, item) weights clamped to the server's bounds",
        "skipped": "events skipped (why: events.applied.skip_reasons)",
    }
    out = [f"{label}: {applied[k]:,}" for k, label in labels.items() if applied.get(k)]
    out += [f"unknown event type {t!r}: {c:,} skipped" for t, c in applied["unknown_types"].items()]
    return out


# --------------------------------------------------------------------------- gate scoring


def _absent_tasks(metrics: dict | None) -> dict[str, str]:
    """Task -> reason for each task the served metrics hold no numbers for."""
    if metrics is None:
        return {}
    return {
        t: (metrics.get(t) or {}).get("reason", "not scored")
        for t in TASKS
        if is_absent(metrics.get(t))
    }


def gate(candidate: dict, live: dict | None, margin: float) -> dict:
    """Pass when each task's recall@20 is >= live - margin (or when nothing is live yet).

    Only tasks both sides can score are compared; the others are listed under ``absent``
    (task -> reason). With a live bundle and no task to compare, the gate fails.
    """
    absent_tasks = {**_absent_tasks(live), **_absent_tasks(candidate)}
    if live is None:
        return {
            "passed": True,
            "reason": "no live bundle",
            "margin": margin,
            "absent": absent_tasks,
        }
    present = [t for t in TASKS if t not in absent_tasks]
    checks = {
        t: {
            "candidate": candidate[t]["recall@20"],
            "live": live[t]["recall@20"],
            "passed": candidate[t]["recall@20"] >= live[t]["recall@20"] - margin,
        }
        for t in present
    }
    failed = [t for t, c in checks.items() if not c["passed"]]
    ok = bool(checks) and not failed
    if not checks:
        reason = f"no task to compare (absent: {absent_tasks})"
    elif failed:
        reason = f"worse on {failed}"
    else:
        reason = "not worse than live by more than the margin"
    if checks and absent_tasks:
        reason += f"; compared {present} only, absent: {sorted(absent_tasks)}"
    return {
        "passed": ok,
        "reason": reason,
        "margin": margin,
        "recall@20": checks,
        "absent": absent_tasks,
    }


def unseen_by(split: Split, ds, seen_run: Path | None) -> tuple[Split, dict]:
    """The split with test rows the live bundle trained on removed (both bundles see this).

    The new split is redrawn over the grown dataset, so ~80% of its test rows sat in the live
    model's training part: scoring the live bundle on them would flatter it. Keeping only test
    rows that neither model trained on (old test rows and rows new since) compares fairly.
    ``seen_run`` is the run directory the live bundle came from; None keeps the full split.
    """
    if seen_run is None:
        return split, {"filtered": False, "why": "live bundle's training run unknown"}
    from socialrec.training.run import load_run

    old_ds, old_split, _ = load_run(seen_run)
    ou, oi = old_ds.user_ids, old_ds.item_ids
    seen_items = set(
        zip(ou[old_split.train_user].tolist(), oi[old_split.train_item].tolist(), strict=True)
    )
    seen_pairs = {frozenset(p) for p in ou[old_split.friends_train].tolist()}
    u, i = ds.user_ids, ds.item_ids
    test = zip(u[split.test_user].tolist(), i[split.test_item].tolist(), strict=True)
    keep_c = np.array([p not in seen_items for p in test], dtype=bool)
    keep_f = np.array(
        [frozenset(p) not in seen_pairs for p in u[split.friends_test].tolist()], dtype=bool
    ).reshape(-1)
    out = replace(
        split,
        test_user=split.test_user[keep_c],
        test_item=split.test_item[keep_c],
        friends_test=split.friends_test[keep_f].reshape(-1, 2),
    )
    info = {
        "filtered": True,
        "live_run": str(seen_run),
        "content_test_rows": [int(keep_c.sum()), len(keep_c)],
        "friends_test_pairs": [int(keep_f.sum()), len(keep_f)],
    }
    return out, info


def live_run_dir(root: Path, version: str, base_dir: Path) -> Path | None:
    """The run directory that produced bundle ``version``: recorded by retrain, or the base run."""
    known = read_state(root).get("runs", {}).get(version)
    if known and Path(known).exists():
        return Path(known)
    manifest = load_manifest(root / version, verify=False)
    base_report = json.loads((base_dir / "report.json").read_text())
    if manifest.get("split", {}).get("sha256") == base_report["split"]["sha256"]:
        return base_dir
    return None


# --------------------------------------------------------------------------- the job


def _base_settings(run_dir: Path) -> tuple[dict, dict | None]:
    """(run.json, compression config or None) of the base run."""
    cfg = json.loads((run_dir / "run.json").read_text())
    comp = run_dir / "compression.json"
    return cfg, json.loads(comp.read_text())["config"] if comp.exists() else None


def _train(cfg: RetrainConfig, base: dict, data: DataConfig, out: Path) -> Path:
    """Train from scratch on ``data`` with the base run's settings (every torchrun rank)."""
    from socialrec.training.baselines import BaselineConfig
    from socialrec.training.refine import config_from_dict as refine_config_from_dict
    from socialrec.training.run import RunConfig
    from socialrec.training.run import run as train_run
    from socialrec.training.split import SplitConfig
    from socialrec.training.train import TrainConfig

    tc = TrainConfig(**base["train"])
    if cfg.epochs is not None:
        tc = replace(tc, epochs=cfg.epochs)
    if cfg.threads:
        tc = replace(tc, threads=cfg.threads)
    return train_run(
        RunConfig(
            out=str(out),
            data=data,
            split=SplitConfig(**base["split"]),
            train=tc,
            baselines=BaselineConfig(**base["baselines"]),
            refine=refine_config_from_dict(base.get("refine")),
            max_eval_users=base.get("max_eval_users"),
            progress=cfg.progress,
        )
    )


def compress_config(compression: dict | None, run_dir: Path, mode: str, threads: int = 0):
    """The base run's CompressConfig (from compression.json) aimed at ``run_dir``.

    Only fields this version still has are kept (the JSON may come from an older run), lists
    become tuples again, the nested distill config is rebuilt; ``mode="quick"`` forces quick.
    """
    from socialrec.compression.run import CompressConfig
    from socialrec.training.distill import DistillConfig

    names = {f.name for f in fields(CompressConfig)} - {"run_dir"}
    c = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in (compression or {}).items()
        if k in names
    }
    if isinstance(c.get("distill"), dict):
        c["distill"] = DistillConfig(**c["distill"])
    if mode == "quick":
        c["quick"] = True
    c["threads"] = threads
    return CompressConfig(run_dir=str(run_dir), **c)


def _bundle(cfg: RetrainConfig, compression: dict | None, run_dir: Path) -> tuple[Path, str]:
    """Compress the new run as the base run was compressed; returns (bundle dir, how)."""
    mode = cfg.compress
    if mode == "auto":
        mode = "same" if compression is not None else "export"
    if mode == "export":
        from socialrec.compression.export import export_run

        return export_run(run_dir), "export (fp32 teacher, as the base run)"
    from socialrec.compression.run import run as compress_run

    cc = replace(compress_config(compression, run_dir, mode, cfg.threads), progress=cfg.progress)
    return compress_run(cc), f"compress ({'quick' if cc.quick else 'base settings'})"


# Test hook: called on rank 0 after events are appended, before anything else (crash tests).
after_consume: Callable[[], None] | None = None


def run(cfg: RetrainConfig) -> Path | None:
    """The whole retraining job; returns the report path on rank 0 (None on other ranks)."""
    from socialrec.training.train import init_distributed

    distributed = init_distributed()
    rank = 0
    if distributed:
        import torch.distributed as dist

        rank = dist.get_rank()
    root = Path(cfg.bundles)
    base_dir = Path(cfg.run_dir)
    base, compression = _base_settings(base_dir)
    payload: list = [None]
    if rank == 0:
        t0 = time.time()
        root.mkdir(parents=True, exist_ok=True)
        state = read_state(root)
        n_new, cursor = consume(cfg, root, state["cursor"])
        if after_consume is not None:
            after_consume()
        events = read_events(root)
        merged, stats = merge_events(load_dataset(DataConfig(**base["data"])), events)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        work = Path(cfg.work_dir) if cfg.work_dir else root / "retrain-runs"
        run_dir = work / f"{stamp}-{len(events)}ev"
        data = write_tsv(merged, run_dir / "data")
        removed = stats.removed_item_ids
        (run_dir / "data" / REMOVED).write_text("".join(f"{i}\n" for i in removed))
        payload = [
            {
                "run_dir": str(run_dir),
                "data": asdict(data),
                "t0": t0,
                "state": state,
                "n_new": n_new,
                "cursor": cursor,
                "n_events": len(events),
                "stats": stats.as_dict(),
                "removed": list(removed[:REPORT_IDS]),
            }
        ]
    if distributed:
        import torch.distributed as dist

        dist.broadcast_object_list(payload, src=0)  # every rank trains on the same data
    p = payload[0]
    run_dir = Path(p["run_dir"])
    t1 = time.time()
    _train(cfg, base, DataConfig(**p["data"]), run_dir)  # destroys the process group at the end
    if rank != 0:
        return None
    t2 = time.time()
    bundle, how = _bundle(cfg, compression, run_dir)
    t3 = time.time()

    from socialrec.training.run import load_run

    ds, split, _ = load_run(run_dir)
    live_version = current(root)
    gate_split, gate_rows = split, {"filtered": False, "why": "no live bundle"}
    live = None
    if live_version is not None:
        gate_split, gate_rows = unseen_by(split, ds, live_run_dir(root, live_version, base_dir))
        live = served_evaluate(
            root / live_version,
            gate_split,
            cfg.max_eval_users,
            user_ids=ds.user_ids,
            item_ids=ds.item_ids,
        )
    cand = served_evaluate(
        bundle, gate_split, cfg.max_eval_users, user_ids=ds.user_ids, item_ids=ds.item_ids
    )
    verdict = gate(cand, live, cfg.gate_margin)
    version = str(load_manifest(bundle, verify=False)["bundle_version"])
    published = None
    if verdict["passed"]:
        published = publish_bundle(root, bundle, action="retrain")
    t4 = time.time()
    report = {
        "version": version,
        "published": verdict["passed"],
        "pointer_move": published,
        "live_before": live_version,
        "gate": verdict,
        "metrics": {"candidate": cand, "live": live},
        "protocol": "both bundles scored through ONNX Runtime + FAISS on the new dataset's "
        "protocol split (same seed), minus test rows the live bundle trained on; the live "
        "bundle via external ids (ids it never saw are misses)",
        "gate_test_rows": gate_rows,
        "events": {
            "cursor_before": p["state"]["cursor"],  # {shard: last stream id consumed}
            "cursor_after": p["cursor"],
            "new": p["n_new"],
            "total_used": p["n_events"],
            "applied": p["stats"],
            "summary": feed_summary(p["stats"]),
            "removed_items": {
                "count": p["stats"]["removed_items"],
                "ids": p["removed"],  # the first REPORT_IDS, sorted
                "file": str(run_dir / "data" / REMOVED),
            },
        },
        "dataset": ds.summary(),
        "split_sha256": split.sha256(),
        "run_dir": str(run_dir),
        "bundle": str(bundle),
        "bundled_by": how,
        "training": "from scratch with the base run's train config"
        + (f", epochs={cfg.epochs}" if cfg.epochs is not None else ""),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "timings_s": {
            "consume_merge": round(t1 - p["t0"], 2),
            "train": round(t2 - t1, 2),
            "compress": round(t3 - t2, 2),
            "gate_publish": round(t4 - t3, 2),
        },
        "config": asdict(cfg),
    }
    out = root / f"retrain-{version}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    runs = read_state(root).get("runs", {})
    if verdict["passed"]:
        runs[version] = str(run_dir)  # the next gate needs what this bundle trained on
    write_state(
        root,
        {
            "cursor": p["cursor"],
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "last_report": out.name,
            "runs": runs,
        },
    )
    return out
