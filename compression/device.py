"""The user tower on the device: `socialrec export-device` and a reference device runtime.

``run(DeviceConfig) -> DIR`` reads a run's selected bundle (RUN_DIR/bundle) and writes what
a phone needs to recommend content on its own, plus a report::

    user_tower.ort             the bundle's tower cut to its content output, in ONNX
                               Runtime's mobile (ORT) format
    required_operators.config  the operators a reduced-operator ONNX Runtime build needs for
                               it (build input, not shipped to the phone)
    items.npz                  the quantised item table (codes + scales), item and user ids,
                               and the feature caps (numpy, no pickle)
    device.json                bytes, device and server recall@20, us per query

The item table keeps the server's own codes when the bundle's item index stores 8-bit
scalar-quantiser codes (FAISS SQ8: per-dimension ranges), so brute-force scores on the
device are the server's scores up to float rounding. Any other index (fp32 flat, HNSW,
IVF-PQ) is read back and quantised per row (int8 or int4) with the bundle's table
quantiser (compression/quantize.py).

:class:`DeviceRecommender` is the reference device runtime: it imports only numpy and
onnxruntime (no torch, no FAISS), runs the .ort tower on a user's history and friends,
scores every item straight from the codes, drops the user's seen items as the server does
and takes the top k.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

TOWER_ORT = "user_tower.ort"
OPS_CONFIG = "required_operators.config"
TABLE = "items.npz"
REPORT = "device.json"
DEVICE_FILES = (TOWER_ORT, TABLE)  # what the phone holds; the rest is build input / report
TOWER_INPUTS = ("hist_ids", "hist_w", "friend_ids", "friend_w")  # serving/bundle.py's names
CONTENT_OUTPUT = "content_vector"
SCHEMES = ("sq8", "row8", "row4")  # per-dimension 8-bit (FAISS SQ8), per-row 8 / 4-bit
CHUNK_BYTES = 1 << 19  # float32 codes converted at a time while scoring (cache-sized)
K = 20


# ---------------------------------------------------------------------------- item table


@dataclass
class ItemTable:
    """Quantised (N, D) item vectors.

    ``sq8``: ``v[:, d] = codes[:, d] * scale[d] + offset[d]`` (one range per dimension, the
    FAISS 8-bit scalar quantiser's layout); ``row8`` / ``row4``: ``v[r] = codes[r] * scale[r]
    + offset[r]`` (one range per row, fp16 scale and offset, compression/quantize.py's
    layout; ``row4`` packs two codes per byte, column j low nibble, j + ceil(D/2) high).
    """

    scheme: str
    dim: int
    codes: np.ndarray  # (N, D) uint8, or (N, ceil(D/2)) for row4
    scale: np.ndarray  # (D,) float32 for sq8, (N,) float16 per row
    offset: np.ndarray  # same shape as scale

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"item table scheme {self.scheme!r} is not one of {SCHEMES}")
        width = -(-self.dim // 2) if self.scheme == "row4" else self.dim
        n = len(self.codes)
        want = (self.dim,) if self.scheme == "sq8" else (n,)
        if self.codes.dtype != np.uint8 or self.codes.shape != (n, width):
            raise ValueError(
                f"item codes: {self.codes.dtype} {self.codes.shape}, want uint8 {(n, width)}"
            )
        if self.scale.shape != want or self.offset.shape != want:
            raise ValueError(
                f"item scale/offset shapes {self.scale.shape}/{self.offset.shape}, want {want}"
            )

    def __len__(self) -> int:
        return len(self.codes)

    def _codes(self, a: int, b: int) -> np.ndarray:
        """Rows a..b of the codes as float32.  (b - a, D)"""
        c = self.codes[a:b]
        if self.scheme != "row4":
            return c.astype(np.float32)
        q = np.concatenate([c & 15, c >> 4], axis=1).astype(np.float32)
        return q[:, : self.dim]

    def dequantize(self) -> np.ndarray:
        """(N, D) float32 item vectors."""
        q = self._codes(0, len(self))
        if self.scheme == "sq8":
            return q * self.scale + self.offset
        return q * self.scale.astype(np.float32)[:, None] + self.offset.astype(np.float32)[:, None]

    def scores(self, u: np.ndarray, chunk: int | None = None) -> np.ndarray:
        """Inner products of queries with every item, straight from the codes.  (B, D) -> (B, N)

        The affine dequantisation folds into the query (sq8: ``q . (u * scale) + offset . u``)
        or into the per-row result (row: ``scale_r (q_r . u) + offset_r sum(u)``), so only
        ``chunk`` rows of codes (default: CHUNK_BYTES of float32) are ever held as float32, in
        reused buffers. int4 rows are
        scored as two halves (low nibbles against the first ceil(D/2) query entries, high
        nibbles against the rest), never unpacked into one row.
        """
        u = np.ascontiguousarray(u, np.float32)
        width = self.codes.shape[1]
        chunk = chunk or max(CHUNK_BYTES // (4 * width), 64)
        n, rows, b = len(self), max(min(chunk, len(self)), 1), len(u)
        out = np.empty((b, n), np.float32)
        w = np.ascontiguousarray((u * self.scale).T if self.scheme == "sq8" else u.T)  # (D, B)
        if self.scheme == "row4":  # (2, ceil(D/2), B): halves of w, the odd pad row zero
            w = np.concatenate([w, np.zeros((2 * width - self.dim, b), np.float32)])
            halves = w.reshape(2, width, b)
        nib = np.empty((rows, width), np.uint8)
        buf = np.empty((rows, width), np.float32)
        dots = np.empty((rows, b), np.float32)
        part = np.empty((rows, b), np.float32)
        for a in range(0, n, rows):
            c = self.codes[a : a + rows]  # (m, width) uint8
            m = len(c)
            if self.scheme != "row4":
                np.copyto(buf[:m], c, casting="unsafe")
                np.matmul(buf[:m], w, out=dots[:m])
            else:
                np.bitwise_and(c, 15, out=nib[:m])
                np.copyto(buf[:m], nib[:m], casting="unsafe")
                np.matmul(buf[:m], halves[0], out=dots[:m])
                np.right_shift(c, 4, out=nib[:m])
                np.copyto(buf[:m], nib[:m], casting="unsafe")
                np.matmul(buf[:m], halves[1], out=part[:m])
                dots[:m] += part[:m]
            out[:, a : a + m] = dots[:m].T
        if self.scheme == "sq8":
            out += (u @ self.offset)[:, None]
        else:
            out *= self.scale.astype(np.float32)
            out += u.sum(axis=1)[:, None] * self.offset.astype(np.float32)
        return out


def table_from_index(index, bits: int = 8) -> ItemTable:
    """The item table of a bundle's FAISS index.

    bits 8 and an index holding SQ8 codes (``sq8``, ``hnsw_sq8``, the re-ranking codes of
    ``ivfpq_fs``: FAISS's 8-bit per-dimension scalar quantiser, maybe behind the zero-padding
    transform of compression/export.py): the index's own codes and ranges, padding dropped. Otherwise the stored vectors are read back
    and quantised per row to ``bits`` with compression/quantize.py's ``quantize_rows``.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if bits == 8:
        table = _sq8_table(index)
        if table is not None:
            return table
    return quantize_vectors(index.reconstruct_n(0, index.ntotal), bits)


def quantize_vectors(x: np.ndarray, bits: int) -> ItemTable:
    """Per-row int8 / int4 table of (N, D) float vectors (compression/quantize.py's quantiser)."""
    import torch
    from socialrec.compression.quantize import pack_int4, quantize_rows

    codes, scale, offset = quantize_rows(torch.from_numpy(np.asarray(x, np.float32)), bits)
    if bits == 4:
        codes = pack_int4(codes)
    return ItemTable(
        "row8" if bits == 8 else "row4",
        int(x.shape[1]),
        codes.numpy(),
        scale.numpy(),
        offset.numpy(),
    )


def _sq8_table(index) -> ItemTable | None:
    """The codes and ranges of an index that stores FAISS QT_8bit codes, else None."""
    import faiss

    d = index.d
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        if index.chain.size() != 1:
            return None
        vt = faiss.downcast_VectorTransform(index.chain.at(0))
        if not isinstance(vt, faiss.RemapDimensionsTransform):
            return None
        keep = faiss.vector_to_array(vt.map)[:d]  # output dim of each input dim (-1: dropped)
        if not np.array_equal(keep, np.arange(d)):
            return None  # only the leading-dimension zero padding of compression/export.py
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    elif isinstance(index, faiss.IndexRefine):  # ivfpq_fs: its SQ8 re-ranking codes
        index = faiss.downcast_index(index.refine_index)
    if not isinstance(index, faiss.IndexScalarQuantizer):
        return None
    sq = index.sq
    if sq.qtype != faiss.ScalarQuantizer.QT_8bit or sq.code_size != sq.d:
        return None
    trained = faiss.vector_to_array(sq.trained)  # [vmin (dp,), vdiff (dp,)]
    vmin, vdiff = trained[: sq.d][:d], trained[sq.d :][:d]
    codes = faiss.vector_to_array(index.codes).reshape(index.ntotal, sq.code_size)[:, :d]
    # FAISS decodes vmin + (c + 0.5) / 255 * vdiff: the same affine map, written c * s + o.
    scale = (vdiff / np.float32(255)).astype(np.float32)
    offset = (vmin + np.float32(0.5) * scale).astype(np.float32)
    return ItemTable("sq8", d, np.ascontiguousarray(codes), scale, offset)


# ---------------------------------------------------------------------------- files


def _ids_array(ids: Sequence[str]) -> np.ndarray:
    """External ids as a fixed-width UTF-8 bytes array (numpy-readable without pickle)."""
    return np.array([s.encode("utf-8") for s in ids], dtype=np.bytes_)


def save_table(
    path: Path,
    table: ItemTable,
    item_ids: Sequence[str],
    user_ids: Sequence[str],
    meta: dict,
) -> Path:
    if len(item_ids) != len(table):
        raise ValueError(f"{len(item_ids)} item ids for {len(table)} item rows")
    meta = {**meta, "scheme": table.scheme, "dim": table.dim}
    with path.open("wb") as f:  # uncompressed: the arrays read back as they are stored
        np.savez(
            f,
            codes=table.codes,
            scale=table.scale,
            offset=table.offset,
            item_ids=_ids_array(item_ids),
            user_ids=_ids_array(user_ids),
            meta=np.array(json.dumps(meta)),
        )
    return path


def load_table(path: Path) -> tuple[ItemTable, np.ndarray, np.ndarray, dict]:
    """(table, item ids, user ids, meta) of an items.npz; ids stay bytes until looked up."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        table = ItemTable(meta["scheme"], int(meta["dim"]), z["codes"], z["scale"], z["offset"])
        return table, z["item_ids"], z["user_ids"], meta


def content_only(onnx_in: Path, onnx_out: Path) -> Path:
    """The tower graph cut to its content output (the phone does not rank friends)."""
    import onnx
    import onnx.utils

    model = onnx.load(str(onnx_in))
    names = [i.name for i in model.graph.input]
    sub = onnx.utils.Extractor(model).extract_model(names, [CONTENT_OUTPUT])
    onnx.save(sub, str(onnx_out))
    return onnx_out


def to_ort(onnx_file: Path, out_dir: Path) -> tuple[Path, Path]:
    """ONNX -> ORT format with onnxruntime's converter (fixed optimisations, ARM target: no
    x86-only layouts baked in) -> (DIR/user_tower.ort, DIR/required_operators.config)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    # The converter prints its progress and logs the temporary config path at INFO: muted.
    quiet = logging.getLogger("ort_format_model.utils")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    with (
        tempfile.TemporaryDirectory() as tmp,
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.ExitStack() as restore,
    ):
        restore.callback(quiet.setLevel, level)
        src = Path(tmp) / "user_tower.onnx"
        src.write_bytes(onnx_file.read_bytes())
        convert_onnx_models_to_ort(
            src,
            output_dir=Path(tmp) / "ort",
            optimization_styles=[OptimizationStyle.Fixed],
            target_platform="arm",
        )
        made = Path(tmp) / "ort"
        ort_file, config = made / "user_tower.ort", made / "user_tower.required_operators.config"
        if not ort_file.is_file() or not config.is_file():
            raise RuntimeError(f"onnxruntime's converter wrote {sorted(os.listdir(made))}")
        (out_dir / TOWER_ORT).write_bytes(ort_file.read_bytes())
        lines = config.read_text().splitlines()
        # The converter names the temporary path it read; the file name is what matters.
        lines = [f"# - {TOWER_ORT}" if ln.startswith("# - ") else ln for ln in lines]
        (out_dir / OPS_CONFIG).write_text("\n".join(lines) + "\n")
    return out_dir / TOWER_ORT, out_dir / OPS_CONFIG


def export_device(bundle_dir: str | Path, out_dir: str | Path, bits: int = 8) -> Path:
    """File in, file out: a verified bundle -> DIR/user_tower.ort, required_operators.config,
    items.npz (see the module docstring)."""
    import faiss
    from socialrec.serving.bundle import BundleError, open_bundle

    try:
        b = open_bundle(bundle_dir)
    except BundleError as e:
        raise ValueError(str(e)) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cut = content_only(b.path("user_tower.onnx"), Path(tmp) / "content.onnx")
        to_ort(cut, out)
    index = faiss.read_index(str(b.path("items.faiss")))
    table = table_from_index(index, bits)
    f = b.manifest.get("features", {})
    meta = {
        "bundle_version": b.version,
        "variant": b.manifest.get("variant", {}).get("name"),
        "max_history": int(f.get("max_history", 256)),
        "max_friends": int(f.get("max_friends", 256)),
    }
    save_table(out / TABLE, table, b.item_ids, b.user_ids, meta)
    return out


def device_bytes(device_dir: str | Path) -> dict[str, int]:
    """Bytes of each file the phone holds (DEVICE_FILES)."""
    return {n: (Path(device_dir) / n).stat().st_size for n in DEVICE_FILES}


# ---------------------------------------------------------------------------- runtime


def _session(path: Path, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class DeviceRecommender:
    """Reference device runtime: .ort tower + quantised item table, numpy brute-force top-k.

    ``resident="codes"`` scores from the codes (memory = the table file); ``"float32"``
    dequantises once at load (4x the memory of int8 codes, one BLAS product per query).
    """

    def __init__(self, device_dir: str | Path, resident: str = "codes") -> None:
        d = Path(device_dir)
        for name in DEVICE_FILES:
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name}: missing (write DIR with `export-device`)")
        if resident not in ("codes", "float32"):
            raise ValueError(f"resident must be 'codes' or 'float32', got {resident!r}")
        self.session = _session(d / TOWER_ORT)
        self.inputs = tuple(i.name for i in self.session.get_inputs())
        self.table, self._item_ids, self._user_ids, self.meta = load_table(d / TABLE)
        self.max_history = int(self.meta.get("max_history", 256))
        self.max_friends = int(self.meta.get("max_friends", 256))
        self.vectors_f32 = self.table.dequantize() if resident == "float32" else None
        self._item_index: dict[str, int] | None = None
        self._user_index: dict[str, int] | None = None

    @property
    def n_items(self) -> int:
        return len(self.table)

    def item_id(self, j: int) -> str:
        return self._item_ids[j].decode("utf-8")

    def _index(self) -> tuple[dict[str, int], dict[str, int]]:
        if self._item_index is None or self._user_index is None:
            self._item_index = {s.decode("utf-8"): j for j, s in enumerate(self._item_ids)}
            self._user_index = {s.decode("utf-8"): j for j, s in enumerate(self._user_ids)}
        return self._item_index, self._user_index

    def vectors(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Content query vectors of a batch of tower inputs.  (B, D + 1)"""
        (u,) = self.session.run([CONTENT_OUTPUT], {n: feeds[n] for n in self.inputs})
        return np.ascontiguousarray(u, np.float32)

    def scores(self, u: np.ndarray) -> np.ndarray:
        """(B, D + 1) -> (B, N) inner products with every item."""
        if self.vectors_f32 is not None:
            return u @ self.vectors_f32.T
        return self.table.scores(u)

    def top(self, u: np.ndarray, k: int, banned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item indices and scores of one (1, D + 1) query, ``banned`` indices left out."""
        s = self.scores(u)[0]  # (N,)
        s[banned] = -np.inf
        k = min(k, self.n_items - len(np.unique(banned)))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        part = np.argpartition(-s, k - 1)[:k]
        order = part[np.argsort(-s[part], kind="stable")]
        return order, s[order]

    def features(
        self, history: Sequence[tuple[str, float]], friends: Sequence[str]
    ) -> tuple[dict[str, np.ndarray], set[int]]:
        """Tower feeds and seen items from external ids, as the server builds them
        (serving/engine.py ``Engine._features``): history cut to ``max_history`` entries,
        unknown ids and non-positive weights skipped, repeats summed; friends cut, unknown
        skipped, deduplicated; every known history item is seen."""
        items, users = self._index()
        acc: dict[int, float] = {}
        seen: set[int] = set()
        for n, (item, w) in enumerate(history):
            j = items.get(item)
            if j is None:
                continue
            seen.add(j)
            if n < self.max_history and w > 0 and math.isfinite(w):
                acc[j] = acc.get(j, 0.0) + w
        fr = dict.fromkeys(
            j for f in friends[: self.max_friends] if (j := users.get(f)) is not None
        )
        feeds = {
            "hist_ids": np.array([list(acc) or [0]], np.int64),
            "hist_w": np.array([list(acc.values()) or [0.0]], np.float32),
            "friend_ids": np.array([list(fr) or [0]], np.int64),
            "friend_w": np.full((1, max(len(fr), 1)), 1.0 if fr else 0.0, np.float32),
        }
        return feeds, seen

    def recommend(
        self,
        history: Sequence[tuple[str, float]],
        friends: Sequence[str],
        k: int,
        exclude: Collection[str] = (),
    ) -> list[tuple[str, float]]:
        """Top-k (item id, score), never an item of the history nor of ``exclude``. A user
        the table knows nothing of gets an empty list (the app shows its popular shelf)."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        feeds, seen = self.features(history, friends)
        if not feeds["hist_w"].any() and not feeds["friend_w"].any():
            return []
        items, _ = self._index()
        banned = seen.union(j for e in exclude if (j := items.get(e)) is not None)
        idx, s = self.top(self.vectors(feeds), k, np.fromiter(banned, np.int64, len(banned)))
        return [(self.item_id(int(j)), float(v)) for j, v in zip(idx, s, strict=True)]


# ---------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class DeviceConfig:
    run_dir: str
    out: str
    bits: int = 8  # 8: the bundle's SQ8 codes when it has them, else per-row int8; 4: per-row
    max_eval_users: int | None = None  # None: every user with a content test positive
    timing_queries: int = 300
    seed: int = 0


def save_queries(feeds: Sequence[dict[str, np.ndarray]], seen: Sequence[np.ndarray], path: Path):
    """Batch-1 tower inputs and seen items of the timed queries, as one npz."""
    arrays = {}
    for i, (f, s) in enumerate(zip(feeds, seen, strict=True)):
        for name, a in f.items():
            arrays[f"{i}_{name}"] = a
        arrays[f"{i}_seen"] = s
    np.savez(path, n=np.array(len(feeds)), **arrays)


def time_queries(
    device_dir: str | Path, queries: str | Path, k: int = K, resident: str = "codes"
) -> dict[str, float]:
    """Median / p90 microseconds per query (tower + score every item + drop seen + top-k),
    one query at a time, after 10 warm-up queries; the fastest query (the least disturbed by
    other processes on a shared host); medians of the tower and of the ranking part alone. Run it single-threaded
    (:func:`time_single_threaded`)."""
    rec = DeviceRecommender(device_dir, resident)
    with np.load(queries, allow_pickle=False) as z:
        n = int(z["n"])
        qs = [({name: z[f"{i}_{name}"] for name in TOWER_INPUTS}, z[f"{i}_seen"]) for i in range(n)]
    times = np.zeros((n, 2))  # (tower, rank) seconds per query
    for i in range(-10, n):
        feeds, seen = qs[max(i, 0)]
        t0 = time.perf_counter()
        u = rec.vectors(feeds)
        t1 = time.perf_counter()
        rec.top(u, k, seen)
        if i >= 0:
            times[i] = (t1 - t0, time.perf_counter() - t1)
    t = times * 1e6
    total = t.sum(axis=1)
    return {
        "median": float(np.median(total)),
        "p90": float(np.percentile(total, 90)),
        "min": float(total.min()),
        "tower_median": float(np.median(t[:, 0])),
        "rank_median": float(np.median(t[:, 1])),
        "queries": n,
    }


SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def time_single_threaded(device_dir: str | Path, queries: str | Path) -> dict[str, float]:
    """:func:`time_queries` in a fresh interpreter whose BLAS pools are one thread (numpy's
    thread count is fixed when it is first imported, so this process cannot change its own)."""
    code = (
        "import json, sys\n"
        "from socialrec.compression.device import time_queries\n"
        "print(json.dumps(time_queries(sys.argv[1], sys.argv[2])))\n"
    )
    env = {**os.environ, **SINGLE_THREAD_ENV}
    out = subprocess.run(
        [sys.executable, "-c", code, str(device_dir), str(queries)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"device timing failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(cfg: DeviceConfig) -> Path:
    """Export RUN_DIR/bundle for the device, score and time it; write DIR/device.json."""
    from socialrec.compression.served_eval import (
        ServedModel,
        mapped_features,
        served_evaluate,
        served_topk,
        tower_inputs,
        us_per_query,
    )
    from socialrec.training.metrics import Graph, absent_reason, evaluate
    from socialrec.training.run import load_run

    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    bundle = run_dir / "bundle"
    if not (bundle / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{bundle / 'manifest.json'}: the run has no selected bundle "
            f"(run `socialrec compress --run {run_dir}` first)"
        )
    _, split, _ = load_run(run_dir)
    out = export_device(bundle, cfg.out, cfg.bits)
    rec = DeviceRecommender(out)
    sm = ServedModel(bundle)
    n_items, n_users = rec.n_items, sm.users.ntotal
    if n_items != split.n_items or n_users != split.n_users:
        raise ValueError(
            f"{bundle}: {n_items} items / {n_users} users, the run's split has "
            f"{split.n_items} / {split.n_users}: the bundle is not this run's"
        )
    feats = mapped_features(
        split,
        np.arange(split.n_users),
        np.arange(split.n_items),
        n_items,
        rec.max_history,
        rec.max_friends,
    )
    report: dict = {
        "run": str(run_dir),
        "bundle": str(bundle),
        "bundle_version": rec.meta.get("bundle_version"),
        "variant": rec.meta.get("variant"),
        "table": {"scheme": rec.table.scheme, "dim": rec.table.dim, "items": n_items},
        "files": device_bytes(out),
    }
    report["bytes"] = sum(report["files"].values())
    why = absent_reason(split, "content")
    if why:
        report.update({"recall@20": None, "server_recall@20": None, "absent": why})
    else:
        train = Graph(split.n_users, split.train_user, split.train_item)
        test = Graph(split.n_users, split.test_user, split.test_item)
        agree = {"same": 0, "overlap": 0.0, "users": 0}

        def score(users: np.ndarray) -> np.ndarray:
            x = tower_inputs(feats, users)
            u = rec.vectors(dict(zip(TOWER_INPUTS, x, strict=True)))
            s = rec.scores(u)  # (B, N)
            # Side check: the device's top 20 against the server's (ONNX + FAISS) for these users.
            masked = s.copy()
            rows, cols = train.batch(users)
            masked[rows, cols] = -np.inf
            mine = np.argsort(-masked, axis=1, kind="stable")[:, :K]
            theirs = served_topk(sm.items, sm.vectors(x)[0], users, train, False, K)
            for a, b in zip(mine, theirs, strict=True):
                common = len(set(a.tolist()) & set(b.tolist()))
                agree["same"] += common == K
                agree["overlap"] += common / K
                agree["users"] += 1
            return s

        dev = evaluate(score, train, test, max_users=cfg.max_eval_users, seed=cfg.seed)
        srv = served_evaluate(bundle, split, max_users=cfg.max_eval_users, seed=cfg.seed)
        n = max(agree["users"], 1)
        report.update(
            {
                "recall@20": dev["recall@20"],
                "server_recall@20": srv["content"]["recall@20"],
                "ndcg@20": dev["ndcg@20"],
                "server_ndcg@20": srv["content"]["ndcg@20"],
                "evaluated_users": agree["users"],
                "top20_same_as_server": agree["same"] / n,
                "top20_overlap_with_server": agree["overlap"] / n,
            }
        )
    users = np.random.default_rng(cfg.seed).choice(
        feats.active_users(), cfg.timing_queries, replace=True
    )
    feeds, seen = [], []
    for user in users.tolist():
        x = tower_inputs(feats, np.array([user]))
        feeds.append(dict(zip(TOWER_INPUTS, x, strict=True)))
        seen.append(split.train_item[split.train_user == user].astype(np.int64))
    with tempfile.TemporaryDirectory() as tmp:
        save_queries(feeds, seen, Path(tmp) / "q.npz")
        t = time_single_threaded(out, Path(tmp) / "q.npz")
    report["us_per_query"] = t["median"]
    report["us_per_query_p90"] = t["p90"]
    report["us_per_query_min"] = t["min"]
    report["us_tower"] = t["tower_median"]
    # This host's cores are shared: the load while timing says how far to trust the times.
    report["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    report["us_rank"] = t["rank_median"]
    report["timing"] = (
        f"median of {t['queries']} batch-1 queries (tower + score all items from the codes + "
        f"drop seen + top {K}), one thread"
    )
    # The server's batch-1 tower + FAISS search, same process, for scale (not side by side).
    report["server_us_per_query"] = us_per_query([bundle], split, cfg.timing_queries)[0]
    report["config"] = asdict(cfg)
    report["onnxruntime"] = ort.__version__
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return out
