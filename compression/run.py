"""`socialrec compress`: every compression technique on a trained run, scored through the served path.

``run(CompressConfig) -> RUN_DIR/bundle``. Selection never sees the test part:

1. **Validation pass.** The validation split is carved from the train part
   (``training.split.validation_split``, the one the teacher's epochs were chosen on). The
   teacher's recipe is refit on its train part for the teacher's selected epochs, and every
   variant is built from that teacher, KD students training on the same part only; each KD
   fine-tune keeps each head at its best validation epoch (its schedule). Every variant is
   written as a bundle and scored through ONNX Runtime + FAISS (``served_eval``) on the
   validation pairs; the smallest that keeps ``min_retention`` of that teacher's content
   recall@20 AND friends recall@20 is selected.
2. **Test pass.** The teacher and the selected variant (every variant with ``test_all``)
   are rebuilt from the real teacher on the whole train part, with the KD schedules chosen
   in step 1, written under RUN_DIR/compress/NAME, scored once on the test part and timed
   single threaded; the selected one is copied to RUN_DIR/bundle. A variant not rebuilt
   keeps its validation numbers in the report, with empty test columns.

The grid (``grid``): "standard" builds the candidates; "full" adds study variants that
measure a technique but have not reached the size/quality frontier on any dataset measured
(docs/benchmarks.md): hashed ids, magnitude pruning (stored dense), torch.ao dynamic
quantisation (a no-op on this tower), students trained from scratch on EASE or the mix.

The KD target of the content head is chosen in step 1 too: the teacher, EASE, or the
teacher's standardised scores plus w times EASE's, whichever has the best validation
recall@20 (``kd_target``); students distilled from EASE and from the chosen mix compete in
the selection like every other variant.

A task the split cannot score (no held-out positives, e.g. friends on a dataset without a
friend graph) is absent: its metrics and retention are null, retention is taken over the
tasks present, and the table and footer say so. The report goes to
RUN_DIR/compression.json, compression.md and compression.png, validation and test side by
side.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from socialrec.compression.export import bundle_meta, choose_index, export_onnx, write_bundle
from socialrec.compression.hashing import to_hashed
from socialrec.compression.lowrank import (
    factor_tables,
    factored_serving,
    half_factors,
    to_lowrank,
)
from socialrec.compression.prune import finalize_masked, prune_dims, prune_unstructured, sparsity
from socialrec.compression.quantize import ort_dynamic, quantize_tables
from socialrec.compression.served_eval import bundle_bytes, served_evaluate, us_per_query
from socialrec.compression.tables import INPUT_TABLES
from socialrec.serving.bundle import MANIFEST
from socialrec.serving.fresh import manifest_block
from socialrec.training.baselines import BaselineConfig
from socialrec.training.distill import (
    ENSEMBLE_WEIGHTS,
    BlendedTeacher,
    DistillConfig,
    EaseScorer,
    content_recall,
    content_scores,
    distill,
    kd_target,
)
from socialrec.training.metrics import TASKS, absent_reason, is_absent
from socialrec.training.model import TwoTower
from socialrec.training.refine import config_from_dict as refine_config_from_dict
from socialrec.training.refine import replay
from socialrec.training.run import VALIDATION_TWIN, load_run
from socialrec.training.split import Split, validation_split
from socialrec.training.train import TrainConfig, fit, load_checkpoint, tower_config
from torch import nn


@dataclass(frozen=True)
class CompressConfig:
    run_dir: str
    min_retention: float = 0.97  # of the served teacher's validation recall@20, each task present
    quick: bool = False  # few variants, few epochs (tests, smoke runs)
    student_dims: tuple[int, ...] = (64,)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lowrank_ranks: tuple[int, ...] = (32, 64)  # SVD only (the teacher's tables are near low-rank)
    lowrank_kd_rank: int = 32  # SVD init + KD fine-tune
    hash_bucket_fraction: float = 0.25
    n_hashes: int = 2
    prune_sparsity: float = 0.5
    prune_keep_fraction: float = 0.5  # structured: fraction of embedding dims kept per head
    epochs: int | None = None  # KD from scratch: most epochs per head; None: the teacher's counts
    # KD fine-tune of near-teacher conversions (low-rank, unstructured pruning): at most this
    # many epochs at a gentle lr; each head keeps its best validation epoch. The lr is chosen
    # on validation among ``finetune_lrs`` by the pass's first fine-tune (the rank-r SVD
    # taught by the teacher) and used by every fine-tune after it.
    finetune_epochs: int = 20
    finetune_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    # KD target of the content head: teacher + w * EASE (both standardised per user); w = 0
    # (the teacher) and EASE alone are always candidates. Chosen on validation.
    ensemble_weights: tuple[float, ...] = ENSEMBLE_WEIGHTS
    ease_lambda: float | None = None  # None: the run's EASE lambda (report.json), else 100
    only: tuple[str, ...] = ()  # build only these variants (the teacher always); (): the grid
    # "standard": the candidates (every technique that has reached the size/quality frontier
    # on some dataset, plus KD from scratch); "full": also the study variants kept to measure a
    # technique (hashed ids, magnitude pruning stored dense, torch.ao dynamic quantisation,
    # students trained from scratch on EASE or the teacher + EASE mix).
    grid: str = "standard"
    # Score every variant on test (the full table), not only the teacher and the selected one.
    # Selection never looks at test either way; scoring all roughly doubles the run.
    test_all: bool = False
    max_eval_users: int | None = None
    timing_queries: int = 300
    threads: int = 0  # torch threads for fine-tuning; 0: torch's default
    progress: bool = True


@dataclass
class Variant:
    """One bundle to build: a torch model (or a prepared ONNX file) and its index kinds."""

    name: str
    techniques: list[str]
    build: Callable[[], TwoTower]  # lazily: fine-tuning only runs when the variant is built
    index: str = "flat"
    onnx: Callable[[TwoTower, Path], Path] | None = None  # turns the exported tower into another
    # (tower to export, item vectors, user vectors) when they are not the model's own
    serve: Callable[[TwoTower], tuple[nn.Module, torch.Tensor, torch.Tensor]] | None = None
    notes: dict = field(default_factory=dict)
    study: bool = False  # built with ``grid="full"`` (or when named in ``only``), not by default


GRIDS = ("standard", "full")


def _teacher_epochs(report: dict) -> dict[str, int]:
    """The teacher's selected epoch count per head (a head without validation pairs has none
    and trains along to the end, as it did in the teacher's refit)."""
    refit = report["teacher"]["train_log"].get("refit", {}).get("epochs")
    best = {t: v["epoch"] for t, v in report["teacher"]["train_log"]["best"].items()}
    e = {t: max(int(v), 1) for t, v in (refit or best).items() if v is not None}
    return e or {t: 1 for t in TASKS}


def _epochs(report: dict, cfg: CompressConfig) -> dict[str, int]:
    """Most KD epochs per head: the teacher's selected counts (or ``cfg.epochs``; quick: 3)."""
    e = _teacher_epochs(report)
    if cfg.epochs is not None:
        e = {t: cfg.epochs for t in e}
    if cfg.quick:
        e = {t: min(v, 3) for t, v in e.items()}
    return e


def _once(fn: Callable[[], TwoTower]) -> Callable[[], TwoTower]:
    """Build a model at most once (several variants quantise the same fine-tuned model)."""
    cache: dict[str, TwoTower] = {}

    def get() -> TwoTower:
        if "m" not in cache:
            cache["m"] = fn()
        return cache["m"]

    return get


def variants(
    teacher: TwoTower,
    split: Split,
    tc: TrainConfig,
    cfg: CompressConfig,
    epochs: dict[str, int],
    kd_plan: dict | None = None,
    ease: EaseScorer | None = None,
    schedule: dict[str, dict[str, int]] | None = None,
    choose: bool = False,
    finetune: dict | None = None,
) -> list[Variant]:
    """The teacher as served, every technique alone, then combinations with quantisation.

    Cheap (training-free) variants come first; fine-tuned ones (KD) after. ``split`` is what
    the KD students train on. With ``choose`` it is the validation split and each KD run keeps
    each head at its best validation epoch, recording the counts in ``schedule`` (by run
    name); otherwise the counts recorded there are replayed. ``kd_plan`` (:func:`kd_target`) and
    ``ease`` (fitted on ``split``) add students whose content head learns from EASE and, when
    it won on validation, from the teacher + EASE mix. ``finetune`` holds the fine-tune lr:
    with ``choose`` the first short fine-tune fills it (``lr`` and the validation score of
    each candidate), otherwise it is read.
    """
    schedule = {} if schedule is None else schedule
    finetune = {} if finetune is None else finetune

    def choose_lr(source, student, e, desc):
        """Fine-tune a copy of ``student`` at each candidate lr on validation; keep the best
        by the mean over scored heads of their best validation recall@20."""
        trials = []
        for lr in cfg.finetune_lrs:
            m, log = distill(
                source,
                copy.deepcopy(student),
                split,
                replace(tc, lr=lr),
                e,
                cfg.distill,
                cfg.progress,
                f"{desc} (lr {lr:g})",
                val=split,
            )
            scores = [v["val_recall@20"] for v in log["best"].values() if v["epoch"] is not None]
            trials.append((float(np.mean(scores)) if scores else 0.0, lr, m, log))
        best = max(trials, key=lambda t: t[0])  # ties: the first (smallest) lr
        finetune.update(
            lr=best[1],
            chosen_by=desc,
            val_score={f"{lr:g}": round(v, 4) for v, lr, _, _ in trials},
        )
        if cfg.progress:
            grid = ", ".join(f"{k}: {v:.4f}" for k, v in finetune["val_score"].items())
            print(f"[compress] fine-tune lr on validation ({grid}); chosen {best[1]:g}", flush=True)
        return best[2], best[3]

    def tune(student: TwoTower, desc: str, short: bool = True, w: float = 0.0) -> TwoTower:
        """KD training. ``short``: a gentle fine-tune for conversions that keep the teacher's
        function nearly intact (low-rank, unstructured pruning; longer runs overfit the train
        part); otherwise the teacher's own schedule (fresh students, and conversions that
        change the function a lot: hashed ids, dropped dimensions). ``w``: weight of EASE in
        the content head's KD target (0: the teacher alone)."""
        e, t_cfg = epochs, tc
        if short:
            e = {t: cfg.finetune_epochs for t in epochs}
            if "lr" in finetune:
                t_cfg = replace(tc, lr=finetune["lr"])
            elif not choose:
                raise RuntimeError(f"{desc}: no fine-tune lr chosen on validation")
        if cfg.quick:
            e = {t: min(v, 3) for t, v in e.items()}
        source: nn.Module = teacher if w == 0 else BlendedTeacher(teacher, ease, w)
        if choose:
            if short and "lr" not in finetune:
                model, log = choose_lr(source, student, e, desc)
            else:
                model, log = distill(
                    source, student, split, t_cfg, e, cfg.distill, cfg.progress, desc, val=split
                )
            schedule[desc] = {
                t: int(v["epoch"]) for t, v in log["best"].items() if v["epoch"] is not None
            }
        else:
            e = schedule.get(desc) or e  # a head without validation pairs trains along
            model, _ = distill(source, student, split, t_cfg, e, cfg.distill, cfg.progress, desc)
        return model.eval()

    def fresh(dim: int) -> TwoTower:
        torch.manual_seed(tc.seed)
        return TwoTower(replace(tower_config(tc, split.n_users, split.n_items), dim=dim))

    def torch_dynamic() -> TwoTower:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao is deprecated in 2.13
            return torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(teacher), {nn.Linear}, torch.qint8
            )

    def quantized(get: Callable[[], TwoTower], bits: int, names=INPUT_TABLES):
        return lambda: quantize_tables(get(), bits, names)

    def quantized_factors(get: Callable[[], TwoTower], bits: int):
        """Low-rank: the A factors quantised row-wise, the B factors in fp16."""
        return lambda: half_factors(quantize_tables(get(), bits, a_tables))

    d = teacher.cfg.dim
    keep = max(int(d * cfg.prune_keep_fraction), 1)
    pruned_notes: dict = {}

    def unstructured() -> TwoTower:
        m = tune(prune_unstructured(teacher, cfg.prune_sparsity), "prune-unstructured")
        pruned_notes["sparsity_input_tables"] = round(sparsity(finalize_masked(m)), 4)
        return finalize_masked(m)

    out = [
        Variant("teacher-fp32", [], lambda: teacher),
        Variant(
            "teacher-torch-dynamic-int8",
            ["torch.ao quantize_dynamic(nn.Linear)"],
            torch_dynamic,
            notes={
                "linear_modules": sum(isinstance(m, nn.Linear) for m in teacher.modules()),
                "why": "quantize_dynamic only replaces nn.Linear; the tower is embeddings + "
                "pooling + tanh with no nn.Linear, so nothing is quantised",
            },
            study=True,
        ),
        Variant(
            "teacher-ort-dynamic-int8",
            ["onnxruntime quantize_dynamic"],
            lambda: teacher,
            onnx=lambda _m, p: ort_dynamic(p, p.with_name("tower.ortq.onnx")),
        ),
        Variant("teacher-int8", ["int8 rows", "faiss sq8"], quantized(lambda: teacher, 8), "sq8"),
        Variant("teacher-int4", ["int4 rows", "faiss sq8"], quantized(lambda: teacher, 4), "sq8"),
    ]
    ranks = cfg.lowrank_ranks[-1:] if cfg.quick else cfg.lowrank_ranks
    a_tables = factor_tables(INPUT_TABLES)
    for r in ranks:
        svd = _once(lambda r=r: to_lowrank(teacher, r))
        lr = f"low-rank r={r} (SVD, in + out)"
        out += [
            Variant(f"lowrank-r{r}", [lr], svd, serve=factored_serving),
            Variant(
                f"lowrank-r{r}-int8",
                [lr, "int8 rows", "fp16 factors", "faiss sq8"],
                quantized_factors(svd, 8),
                "sq8",
                serve=factored_serving,
            ),
            Variant(
                f"lowrank-r{r}-int4",
                [lr, "int4 rows", "fp16 factors", "faiss sq8"],
                quantized_factors(svd, 4),
                "sq8",
                serve=factored_serving,
            ),
        ]
    sources = _kd_sources(kd_plan) if ease is not None and kd_plan is not None else []
    if cfg.quick:
        dim = cfg.student_dims[0]
        out.append(Variant(f"distill-d{dim}", ["KD"], lambda: tune(fresh(dim), "kd", False)))
        for sfx, w, label in sources[:1]:
            out.append(
                Variant(
                    f"distill-d{dim}-kd-{sfx}",
                    [f"KD from {label}"],
                    lambda sfx=sfx, w=w: tune(fresh(dim), f"kd-{sfx}", False, w),
                )
            )
        return out
    r = cfg.lowrank_kd_rank
    lr_kd = _once(lambda: tune(to_lowrank(teacher, r), f"lowrank-r{r}-kd"))
    kd_lr = [f"low-rank r={r} (SVD init)", "KD fine-tune"]
    out += [
        Variant(f"lowrank-r{r}-kd", kd_lr, lr_kd, serve=factored_serving),
        Variant(
            f"lowrank-r{r}-kd-int4",
            [*kd_lr, "int4 rows", "fp16 factors", "faiss sq8"],
            quantized_factors(lr_kd, 4),
            "sq8",
            serve=factored_serving,
        ),
    ]
    for dim in cfg.student_dims:
        student = _once(lambda dim=dim: tune(fresh(dim), f"distill-d{dim}", False))
        kd = f"KD d={dim} T={cfg.distill.temperature:g}"
        out += [
            Variant(f"distill-d{dim}", [kd], student),
            Variant(
                f"distill-d{dim}-int8", [kd, "int8 rows", "faiss sq8"], quantized(student, 8), "sq8"
            ),
            Variant(
                f"distill-d{dim}-int4", [kd, "int4 rows", "faiss sq8"], quantized(student, 4), "sq8"
            ),
        ]
    for sfx, w, label in sources:
        for dim in cfg.student_dims:
            name = f"distill-d{dim}-kd-{sfx}"
            student = _once(lambda dim=dim, w=w, name=name: tune(fresh(dim), name, False, w))
            kd = f"KD d={dim} T={cfg.distill.temperature:g} from {label}"
            out += [  # from scratch on EASE (or the mix): how much of EASE a tower can learn
                Variant(name, [kd], student, study=True),
                Variant(
                    f"{name}-int4",
                    [kd, "int4 rows", "faiss sq8"],
                    quantized(student, 4),
                    "sq8",
                    study=True,
                ),
            ]
        name = f"lowrank-r{r}-kd-{sfx}"
        lr_src = _once(lambda w=w, name=name: tune(to_lowrank(teacher, r), name, True, w))
        kd_src = [f"low-rank r={r} (SVD init)", f"KD fine-tune from {label}"]
        out += [
            Variant(name, kd_src, lr_src, serve=factored_serving),
            Variant(
                f"{name}-int4",
                [*kd_src, "int4 rows", "fp16 factors", "faiss sq8"],
                quantized_factors(lr_src, 4),
                "sq8",
                serve=factored_serving,
            ),
        ]
    structured = _once(lambda: tune(prune_dims(teacher, keep), "prune-structured", False))
    sp = [f"structured prune dims {d}->{keep}", "KD fine-tune"]
    hashed = [f"hashed ids x{cfg.n_hashes} ({cfg.hash_bucket_fraction:g} buckets/id)"]
    out += [
        Variant(
            f"hashed-{cfg.hash_bucket_fraction:g}",
            [*hashed, "KD fine-tune"],
            lambda: tune(
                to_hashed(teacher, cfg.hash_bucket_fraction, cfg.n_hashes), "hashed", False
            ),
            study=True,
        ),
        Variant(
            f"prune-unstructured-{cfg.prune_sparsity:g}",
            [f"magnitude prune {cfg.prune_sparsity:.0%}", "KD fine-tune"],
            unstructured,
            notes=pruned_notes,
            study=True,  # stored dense: no smaller until a sparse format serves it
        ),
        Variant(f"prune-structured-d{keep}", sp, structured),
        Variant(
            f"prune-structured-d{keep}-int4",
            [*sp, "int4 rows", "faiss sq8"],
            quantized(structured, 4),
            "sq8",
        ),
    ]
    return out


def _kd_sources(kd_plan: dict) -> list[tuple[str, float, str]]:
    """(name suffix, EASE weight, label) of the non-teacher KD targets to distil from: the
    validation winner when it is a teacher + EASE mix, and EASE alone always (it measures how
    much of EASE a history-pooling tower can represent)."""
    out = []
    if kd_plan["chosen"] == "ensemble":
        w = kd_plan["w"]
        out.append(("ens", w, f"teacher + {w:g} EASE"))
    out.append(("ease", math.inf, "EASE"))
    return out


EASE_LAMBDA_DEFAULT = 100.0  # when neither the config nor the run names one


def ease_lambda_for(report: dict, cfg: CompressConfig) -> float:
    """EASE's lambda: the config's, else the one the training run chose or used, else 100."""
    if cfg.ease_lambda is not None:
        return float(cfg.ease_lambda)
    ease = (report.get("baseline_params") or {}).get("EASE") or {}
    for key in ("lambda", "chosen", "best", "ease_lambda"):
        v = ease.get(key) if isinstance(ease, dict) else None
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    v = (report.get("config", {}).get("baselines") or {}).get("ease_lambda")
    return float(v) if isinstance(v, int | float) else EASE_LAMBDA_DEFAULT


def teacher_on_validation(
    val: Split,
    tc: TrainConfig,
    report: dict,
    run_cfg: dict,
    progress: bool,
    run_dir: Path | None = None,
) -> TwoTower:
    """The teacher's recipe on the validation split's train part: the run's saved twin
    (RUN_DIR/teacher.validation.pt, written by `socialrec train`) when there is one for this
    split, else refit here, each head at the teacher's selected epoch count, then the run's
    refinement by distillation replayed (training.refine.replay). Either way the validation
    pairs stay unseen."""
    twin = None if run_dir is None else Path(run_dir) / VALIDATION_TWIN
    if twin is not None and twin.exists():
        model, ck = load_checkpoint(twin)
        if ck["extra"].get("split_sha256") == report["split"]["sha256"]:
            if progress:
                print(f"[compress] validation pass: the teacher's validation twin ({twin})")
            return model
        print(f"[compress] {twin}: another split; refitting instead", file=sys.stderr)
    if progress:
        print("[compress] validation pass: the teacher refit on the validation train part")
    e = _teacher_epochs(report)
    model, _ = fit(
        val,
        tc,
        max(e.values()),
        snapshot_at=e,
        progress=progress,
        desc="teacher (validation split's train part)",
    )
    lam = ((report.get("baseline_params") or {}).get("EASE") or {}).get("lambda")
    refine_cfg = refine_config_from_dict(run_cfg.get("refine"))
    refine_log = (report.get("teacher") or {}).get("refine")
    return replay(val, model.eval(), refine_log, tc, lam, refine_cfg)


def _build_and_score(
    todo: list[Variant],
    split: Split,
    work: Path,
    ds,
    ck: dict,
    report: dict,
    cfg: CompressConfig,
    label: str,
    run_dir: Path,
) -> list[dict]:
    """Write each variant as a bundle under ``work`` and score it on ``split``'s held-out part."""
    rows: list[dict] = []
    work.mkdir(parents=True, exist_ok=True)
    for k, v in enumerate(todo, start=1):
        step = f"[compress] {label}: variant {k} of {len(todo)}: {v.name}"
        if cfg.progress:
            print(f"{step} ({', '.join(v.techniques) or 'the teacher as trained'})", flush=True)
        t0 = time.time()
        model = v.build().eval()
        t_build = time.time() - t0
        bdir = work / v.name
        if bdir.exists():
            shutil.rmtree(bdir)
        bdir.mkdir(parents=True)
        onnx_file, items, users, bundle_model = None, None, None, model
        if v.serve is not None:
            tower, items_t, users_t = v.serve(model)
            onnx_file = export_onnx(tower, bdir / "tower.fp32.onnx")
            items, users, bundle_model = items_t.numpy(), users_t.numpy(), None
        if v.onnx is not None:
            plain = onnx_file or export_onnx(model.user_tower, bdir / "tower.fp32.onnx")
            onnx_file = v.onnx(model, plain)
        kind = v.index if v.index == "flat" else choose_index(split.n_items, compact=True)
        kinds = {
            "items": kind,
            "users": v.index if v.index == "flat" else choose_index(split.n_users, True),
        }
        meta = bundle_meta(
            ds,
            split,
            ck["train_config"],
            {"name": v.name, "techniques": v.techniques, "notes": v.notes},
            {"teacher_torch": {t: report[t].get("teacher") for t in ("content", "friends")}},
            report,
        )
        write_bundle(
            bundle_model,
            split,
            ds.user_ids,
            ds.item_ids,
            bdir,
            meta,
            kinds,
            onnx_file=onnx_file,
            items=items,
            users=users,
            fresh=manifest_block(run_dir),
        )
        for extra in bdir.glob("tower.*.onnx"):
            extra.unlink()  # intermediate files are not part of the bundle
        m = served_evaluate(bdir, split, max_users=cfg.max_eval_users)
        _record_metrics(bdir, m)
        row = {
            "name": v.name,
            "techniques": v.techniques,
            "bytes": bundle_bytes(bdir),
            "recall@20": _metric(m["content"], "recall@20"),
            "ndcg@20": _metric(m["content"], "ndcg@20"),
            "friends_recall@20": _metric(m["friends"], "recall@20"),
            "friends_ndcg@20": _metric(m["friends"], "ndcg@20"),
            "index": kinds,
            "build_s": round(t_build, 1),
            "metrics": m,
            "notes": v.notes,
            "bundle": str(bdir),
        }
        rows.append(row)
        if cfg.progress:
            print(
                f"{step}: {row['bytes'] / 1e6:.2f} MB, R@20 {_num(row['recall@20'])}, "
                f"friends R@20 {_num(row['friends_recall@20'])} (built in {t_build:.0f}s)",
                flush=True,
            )
    return rows


def _pick(todo: list[Variant], cfg: CompressConfig) -> list[Variant]:
    """The variants to build, the teacher first (the retention reference): those ``cfg.only``
    names (from the full grid), else the grid's (``"standard"`` leaves out study variants)."""
    if cfg.grid not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {cfg.grid!r}")
    if not cfg.only:
        return [v for v in todo if cfg.grid == "full" or not v.study]
    known = {v.name for v in todo}
    unknown = sorted(set(cfg.only) - known)
    if unknown:  # e.g. a teacher + EASE student when the mix did not win on validation
        print(
            f"[compress] not built (not among this run's variants): {', '.join(unknown)}; "
            f"this run builds: {', '.join(sorted(known))}",
            file=sys.stderr,
            flush=True,
        )
    return [v for k, v in enumerate(todo) if k == 0 or v.name in cfg.only]


TEST_KEYS = ("recall@20", "ndcg@20", "friends_recall@20", "friends_ndcg@20", "us_per_query")


def _untested(val_row: dict) -> dict:
    """A variant the test pass did not build (``test_all`` off): its validation row with the
    test numbers empty; bytes are validation's (same catalogue, same tables)."""
    row = {k: v for k, v in val_row.items() if k != "bundle"}
    row.update({k: None for k in TEST_KEYS}, metrics=None, tested=False)
    row.update(test_retention=None, test_retention_content=None, test_retention_friends=None)
    return row


def _absent(row: dict) -> dict[str, str]:
    return {t: row["metrics"][t]["reason"] for t in TASKS if is_absent(row["metrics"][t])}


VAL_KEYS = ("recall@20", "ndcg@20", "friends_recall@20", "friends_ndcg@20", "bytes", "metrics")


def run(cfg: CompressConfig) -> Path:
    """Select on validation, score on test; write the selected bundle and the report."""
    run_dir = Path(cfg.run_dir)
    teacher, ck = load_checkpoint(run_dir / "teacher.pt")
    ds, split, report = load_run(run_dir)
    tc = TrainConfig(**{**ck["train_config"], "threads": cfg.threads})
    epochs = _epochs(report, cfg)
    work = run_dir / "compress"
    work.mkdir(parents=True, exist_ok=True)
    val = validation_split(split)  # as training/run.py carves it for the teacher's selection

    # 1. Validation pass: everything learns from val's train part and is scored on val.
    run_cfg = json.loads((run_dir / "run.json").read_text())
    teacher_v = teacher_on_validation(val, tc, report, run_cfg, cfg.progress, run_dir)
    lam = ease_lambda_for(report, cfg)
    ease_ok = split.n_items <= BaselineConfig().ease_max_items and not absent_reason(val, "content")
    ease_v = EaseScorer(val, lam) if ease_ok else None
    kd_plan = (
        kd_target(teacher_v, ease_v, val, tc, cfg.ensemble_weights, cfg.max_eval_users)
        if ease_v is not None
        else None
    )
    if kd_plan is not None and cfg.progress:
        grid = ", ".join(f"w={g['w']}: {g['val_recall@20']:.4f}" for g in kd_plan["grid"])
        print(
            f"[compress] KD target on validation (teacher + w EASE): {grid}; "
            f"chosen: {kd_plan['chosen']}",
            flush=True,
        )
    if kd_plan is None:
        kd_plan_note = (
            f"no EASE KD target: {split.n_items} items > ease_max_items"
            if not ease_ok and not absent_reason(val, "content")
            else "no EASE KD target: no validation content pairs"
        )
    schedule: dict[str, dict[str, int]] = {}
    finetune: dict = {}
    vdir = work / "validation"
    todo = variants(teacher_v, val, tc, cfg, epochs, kd_plan, ease_v, schedule, True, finetune)
    todo = _pick(todo, cfg)
    val_rows = _build_and_score(todo, val, vdir, ds, ck, report, cfg, "validation", run_dir)
    val_absent = _absent(val_rows[0])
    add_retention(val_rows, [t for t in TASKS if t not in val_absent])
    selected_name = select(val_rows, cfg.min_retention)["name"]
    shutil.rmtree(vdir)  # the validation bundles were only scored; their numbers are kept
    del teacher_v, ease_v

    # 2. Test pass: the real teacher, the whole train part, the schedules chosen above.
    ease_t = EaseScorer(split, lam) if kd_plan is not None else None
    todo = variants(teacher, split, tc, cfg, epochs, kd_plan, ease_t, schedule, False, finetune)
    todo = _pick(todo, cfg)
    if [v.name for v in todo] != [r["name"] for r in val_rows]:
        raise RuntimeError("the validation and test passes list different variants")
    if not cfg.test_all:  # the reference and the one served; the rest keep validation's numbers
        todo = [v for k, v in enumerate(todo) if k == 0 or v.name == selected_name]
    tested = _build_and_score(todo, split, work, ds, ck, report, cfg, "test", run_dir)
    if kd_plan is not None:
        kd_plan["test_recall@20"] = {
            "teacher": round(
                content_recall(
                    content_scores(teacher, ease_t, split, tc, 0), split, cfg.max_eval_users
                ),
                4,
            ),
            "EASE": round(
                content_recall(
                    content_scores(teacher, ease_t, split, tc, math.inf), split, cfg.max_eval_users
                ),
                4,
            ),
            "ensemble": round(
                content_recall(
                    content_scores(teacher, ease_t, split, tc, kd_plan["best_mix_w"]),
                    split,
                    cfg.max_eval_users,
                ),
                4,
            )
            if kd_plan["best_mix_w"]
            else None,
        }
    del ease_t
    if cfg.progress:
        print(f"[compress] timing {len(tested)} bundles side by side", flush=True)
    us = us_per_query([r["bundle"] for r in tested], split, cfg.timing_queries)
    for r, t in zip(tested, us, strict=True):
        r["us_per_query"] = round(t, 1)
    teacher_row = tested[0]
    absent_tasks = _absent(teacher_row)
    add_retention(tested, [t for t in TASKS if t not in absent_tasks], out_prefix="test_")
    by_name = {r["name"]: r for r in tested}
    for v in val_rows:
        if v["name"] not in by_name:  # a bundle an earlier run left there would look current
            shutil.rmtree(work / v["name"], ignore_errors=True)
    rows = [by_name.get(v["name"]) or _untested(v) for v in val_rows]
    for r, v in zip(rows, val_rows, strict=True):
        ref = teacher_row if r.setdefault("tested", True) else val_rows[0]
        r["x_smaller"] = round(ref["bytes"] / r["bytes"], 2)
        for key in VAL_KEYS:
            r[f"val_{key}"] = v[key]
        for key in ("retention", "retention_content", "retention_friends"):
            r[key] = v[key]  # the selection's (validation) retention
    selected = next(r for r in rows if r["name"] == selected_name)
    bundle = run_dir / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(selected["bundle"], bundle)
    _record_selection(bundle, selected, cfg.min_retention)
    out = {
        "teacher": {
            "bytes": teacher_row["bytes"],
            "recall@20": teacher_row["recall@20"],
            "ndcg@20": teacher_row["ndcg@20"],
            "friends_recall@20": teacher_row["friends_recall@20"],
            "val_recall@20": teacher_row["val_recall@20"],
            "val_friends_recall@20": teacher_row["val_friends_recall@20"],
            "us_per_query": teacher_row["us_per_query"],
            "torch": {t: report[t].get("teacher") for t in ("content", "friends")},
        },
        "absent_tasks": absent_tasks,  # task -> why it has no test metrics (not in the retention)
        "absent_tasks_validation": val_absent,
        "variants": rows,
        "selected": selected_name,
        "selected_on": "validation",
        "bundle": str(bundle),
        "min_retention": cfg.min_retention,
        "kd_epochs_full_schedule": epochs,  # the most epochs of a KD run from scratch
        "kd_epochs_chosen_on_validation": schedule,  # per KD run and head, replayed on test
        # the fine-tune lr (near-teacher conversions), chosen on validation; {} if none ran
        "finetune_lr_chosen_on_validation": finetune,
        "kd_target": kd_plan if kd_plan is not None else {"note": kd_plan_note},
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "protocol": "validation pass: the teacher's recipe refit on the validation split's train "
        "part (carved from train), every variant built from it and KD-trained there, scored on "
        "the validation pairs; selection = the smallest with retention >= min_retention there. "
        "Test pass: the teacher and the selected variant (every variant with test_all) rebuilt "
        "from the teacher on the whole train part with the KD epochs chosen on validation, "
        "scored once on test; a variant not rebuilt keeps its validation numbers and null test "
        "ones. Every score through ONNX Runtime + FAISS (compression/served_eval.py); "
        "us_per_query = median of batch-1 tower run + k=20 FAISS search, 1 thread, test-pass "
        "bundles timed side by side (round robin, same queries)",
    }
    (run_dir / "compression.json").write_text(json.dumps(out, indent=2) + "\n")
    (run_dir / "compression.md").write_text(format_table(out) + "\n")
    plot(out, run_dir / "compression.png")
    if cfg.progress:
        print(format_table(out))
    return bundle


ROW_KEY = {"content": "recall@20", "friends": "friends_recall@20"}  # a row's recall@20 by task


def _metric(entry: dict, key: str) -> float | None:
    """One served metric of a task, None when the task is absent."""
    return None if is_absent(entry) else entry[key]


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "absent" if x is None else format(x, fmt)


def add_retention(rows: list[dict], tasks: list[str], out_prefix: str = "") -> None:
    """Each row's recall@20 as a fraction of the first row's (the teacher), per task present.

    ``{out_prefix}retention`` is the minimum over ``tasks``; absent tasks get None, and with no
    task present it is None (nothing qualifies).
    """
    teacher = rows[0]
    for r in rows:
        per = {
            t: round(r[ROW_KEY[t]] / max(teacher[ROW_KEY[t]], 1e-12), 4) if t in tasks else None
            for t in TASKS
        }
        r[f"{out_prefix}retention_content"] = per["content"]
        r[f"{out_prefix}retention_friends"] = per["friends"]
        present = [v for v in per.values() if v is not None]
        r[f"{out_prefix}retention"] = min(present) if present else None


def select(rows: list[dict], min_retention: float) -> dict:
    """The smallest row whose retention is >= ``min_retention``; the teacher when none is."""
    ok = [r for r in rows if r["retention"] is not None and r["retention"] >= min_retention]
    return min(ok, key=lambda r: r["bytes"]) if ok else rows[0]


def _retained_tasks(out: dict) -> str:
    """'content and friends', or the tasks present when some are absent."""
    absent_tasks = out.get("absent_tasks", {})
    present = [t for t in TASKS if t not in absent_tasks]
    return " and ".join(present) if present else "no task"


def _record_metrics(bundle_dir: Path, metrics: dict) -> None:
    """Add the served metrics to the manifest (the manifest itself is not checksummed)."""
    p = bundle_dir / MANIFEST
    m = json.loads(p.read_text())
    m["metrics"]["served"] = metrics
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(m, indent=2) + "\n")
    tmp.replace(p)


def _record_selection(bundle_dir: Path, row: dict, min_retention: float) -> None:
    """Say in the served bundle's manifest how it was chosen: on validation, with which scores."""
    p = bundle_dir / MANIFEST
    m = json.loads(p.read_text())
    m["metrics"]["selection"] = {
        "split": "validation (carved from train)",
        "min_retention": min_retention,
        "retention": row["retention"],
        "served": row["val_metrics"],
    }
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(m, indent=2) + "\n")
    tmp.replace(p)


def format_table(out: dict) -> str:
    """The variants as a markdown table, validation (selection) and test side by side,
    selected one marked."""
    lines = [
        "| variant | techniques | MB | x smaller | val R@20 | val friends R@20 | val retention "
        "| test R@20 | test N@20 | test friends R@20 | test retention | us/query |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in out["variants"]:
        name = f"**{r['name']}** (selected)" if r["name"] == out["selected"] else r["name"]
        if r.get("tested", True):
            test = (
                f"{_num(r['recall@20'])} | {_num(r['ndcg@20'])} | "
                f"{_num(r['friends_recall@20'])} | {_num(r.get('test_retention'), '.3f')} | "
                f"{r['us_per_query']:.0f}"
            )
        else:
            test = " | ".join(["-"] * 5)
        lines.append(
            f"| {name} | {', '.join(r['techniques']) or 'fp32'} | {r['bytes'] / 1e6:.2f} | "
            f"{r['x_smaller']:.1f} | {_num(r.get('val_recall@20'))} | "
            f"{_num(r.get('val_friends_recall@20'))} | {_num(r['retention'], '.3f')} | {test} |"
        )
    lines.append("")
    untested = [r["name"] for r in out["variants"] if not r.get("tested", True)]
    if untested:
        lines.append(
            f"-: not scored on test ({len(untested)} variants; `socialrec compress --test-all` "
            "scores every variant); their sizes are the validation bundles'."
        )
    absent_tasks = out.get("absent_tasks", {})
    lines.append(
        f"min retention {out['min_retention']} (of the served teacher's "
        f"{_retained_tasks(out)} recall@20); selected: {out['selected']}, on validation "
        "(carved from train; the teacher's recipe and every variant trained there); test "
        "scored once after; bytes = ONNX tower + items.faiss + users.faiss."
    )
    for t, why in absent_tasks.items():
        lines.append(
            f"The {t} task is absent ({why}): it has no metrics and is not part of the "
            "retention or the selection."
        )
    kd = out.get("kd_target")
    if kd and "chosen" in kd:
        val, test = kd["val_recall@20"], kd.get("test_recall@20", {})
        mix = f"teacher + {kd['best_mix_w']:g} EASE" if kd.get("best_mix_w") else "no mix"
        lines.append(
            f"KD target of the content head (torch, full ranking; EASE lambda {kd['lambda']:g}): "
            f"teacher val {_num(val['teacher'])} / test {_num(test.get('teacher'))}, EASE val "
            f"{_num(val['EASE'])} / test {_num(test.get('EASE'))}, best mix ({mix}) val "
            f"{_num(val['ensemble'])} / test {_num(test.get('ensemble'))}; chosen on validation: "
            f"{kd['chosen']}."
        )
    elif kd:
        lines.append(f"KD target of the content head: the teacher ({kd['note']}).")
    return "\n".join(lines)


def _family(name: str) -> str:
    """The technique family of a variant name (one colour per family in the plot)."""
    return name.split("-")[0]


def plot(out: dict, path: Path) -> Path:
    """Size (MB, log x) vs recall@20, one panel per task; teacher and selected variant ringed.

    Every variant has its own colour (by technique family) and marker in one shared legend
    instead of a text label next to its point: variants of near-equal size and quality would
    print their labels over each other.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = out["variants"]
    palette = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink")
    families = list(dict.fromkeys(_family(r["name"]) for r in rows))
    markers = "os^DvP<>Xph*"
    count: dict[str, int] = {}
    style: dict[str, tuple[str, str]] = {}
    for r in rows:
        fam = _family(r["name"])
        count[fam] = count.get(fam, -1) + 1
        style[r["name"]] = (
            palette[families.index(fam) % len(palette)],
            markers[count[fam] % len(markers)],
        )
    rings = {"teacher-fp32": ("tab:red", "teacher (fp32)")}
    rings[out["selected"]] = ("black", f"selected: {out['selected']}")  # may be the teacher

    t = out["teacher"]
    absent_tasks = out.get("absent_tasks", {})
    panels = (
        ("content", "recall@20", "content recall@20"),
        ("friends", "friends_recall@20", "friends recall@20"),
    )
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, (task, key, label) in zip(axes, panels, strict=True):
        if task in absent_tasks:
            ax.set_title(f"{label}: absent")
            ax.text(0.5, 0.5, absent_tasks[task], ha="center", va="center", wrap=True)
            ax.set_axis_off()
            continue
        for r in rows:
            colour, marker = style[r["name"]]
            if r[key] is not None:  # None: not scored on test (validation only)
                ax.scatter(r["bytes"] / 1e6, r[key], color=colour, marker=marker, s=45, zorder=3)
            if r.get(f"val_{key}") is not None:  # the validation score selection used: hollow
                ax.scatter(
                    r["bytes"] / 1e6,
                    r[f"val_{key}"],
                    facecolors="none",
                    edgecolors=colour,
                    marker=marker,
                    s=45,
                    zorder=3,
                )
        for name, (ring, _) in rings.items():
            r = next(v for v in rows if v["name"] == name)
            ax.scatter(
                r["bytes"] / 1e6, r[key], s=260, facecolors="none", edgecolors=ring, lw=2, zorder=4
            )
        ax.axhline(t[key] * out["min_retention"], ls="--", c="grey", lw=0.8)
        if t.get(f"val_{key}") is not None:
            ax.axhline(t[f"val_{key}"] * out["min_retention"], ls=":", c="grey", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("served size, MB (ONNX tower + FAISS indexes)")
        ax.set_ylabel(f"{label} (served path; filled test, hollow validation)")
        ax.set_title(label)
        ax.grid(True, which="major", alpha=0.3)
    handles = [
        Line2D([], [], ls="", marker=m, color=c, label=name) for name, (c, m) in style.items()
    ]
    handles += [
        Line2D([], [], ls="", marker="o", ms=12, mfc="none", mec=ring, mew=2, label=text)
        for ring, text in rings.values()
    ]
    handles.append(
        Line2D(
            [], [], ls="--", c="grey", lw=0.8, label=f"{out['min_retention']:.0%} of teacher, test"
        )
    )
    if any(r.get("val_recall@20") is not None for r in rows):
        handles += [
            Line2D(
                [],
                [],
                ls=":",
                c="grey",
                lw=0.8,
                label=f"{out['min_retention']:.0%} of teacher, validation (selects)",
            ),
            Line2D([], [], ls="", marker="o", color="grey", label="filled: test"),
            Line2D([], [], ls="", marker="o", mfc="none", mec="grey", label="hollow: validation"),
        ]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(
        f"compression: size vs quality, {len(rows)} variants; selected: {out['selected']} "
        f"(smallest with >= {out['min_retention']:.0%} of the teacher on "
        f"{'both tasks' if not absent_tasks else _retained_tasks(out)}, on validation)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
