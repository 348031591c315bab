"""How large a catalogue the on-device recommender (compression/device.py) can hold.

For each ``--sizes`` N: N random item vectors at the width of a real export's tower
(``--device``, a `socialrec export-device` output), quantised the way `export-device` does
(``sq8``: the exporter's FAISS SQ8 index, its codes read back; ``row4``: per-row int4), saved
as items.npz next to the export's own user_tower.ort, then:

- bytes: items.npz (codes, scales, item ids as the strings "0".."N-1") + user_tower.ort;
- resident: the arrays the runtime keeps (codes + scales), and the float32 matrix a
  dequantise-at-load runtime would keep instead;
- load_s: seconds to open the directory (``DeviceRecommender``);
- us per query, single thread (BLAS and ONNX Runtime pinned to one thread before numpy is
  imported): batch-1 tower run on a random history of ``--history`` items of the real
  export's catalogue + scores of all N items + seen items dropped + top 20, median and p90
  of ``--queries`` queries, scored from the codes and from a dequantised float32 copy.

    python benchmarks/device_sizes.py --device /tmp/device-lastfm \\
        --out benchmarks/reports/device-sizes.json
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"  # before numpy: its BLAS pool size is fixed at import

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from socialrec.compression.device import (  # noqa: E402
    TABLE,
    TOWER_INPUTS,
    TOWER_ORT,
    DeviceRecommender,
    load_table,
    quantize_vectors,
    save_queries,
    save_table,
    table_from_index,
    time_queries,
)


def _table(x: np.ndarray, scheme: str):
    if scheme == "row4":
        return quantize_vectors(x, 4)
    from socialrec.compression.export import build_index

    return table_from_index(build_index(x, "sq8"), 8)


def measure(device: Path, n: int, scheme: str, args, work: Path) -> dict:
    base, _, _, meta = load_table(device / TABLE)
    dim, vocab = base.dim, len(base)
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((n, dim)).astype(np.float32) * 0.1  # (N, D + 1)
    x[:, -1] = rng.standard_normal(n).astype(np.float32)  # the bias slot
    d = work / f"{scheme}-{n}"
    d.mkdir()
    shutil.copy(device / TOWER_ORT, d / TOWER_ORT)
    save_table(d / TABLE, _table(x, scheme), [str(j) for j in range(n)], [], meta)
    del x
    t0 = time.perf_counter()
    rec = DeviceRecommender(d)
    load_s = time.perf_counter() - t0
    t = rec.table
    resident = t.codes.nbytes + t.scale.nbytes + t.offset.nbytes
    feeds, seen = [], []
    for _ in range(args.queries):
        h = rng.choice(vocab, args.history, replace=False).astype(np.int64)
        feeds.append(
            dict(
                zip(
                    TOWER_INPUTS,
                    (
                        h[None, :],
                        np.ones((1, len(h)), np.float32),
                        np.zeros((1, 1), np.int64),
                        np.zeros((1, 1), np.float32),
                    ),
                    strict=True,
                )
            )
        )
        seen.append(h[h < n])
    save_queries(feeds, seen, d / "q.npz")
    del rec
    codes = time_queries(d, d / "q.npz")
    f32 = time_queries(d, d / "q.npz", resident="float32") if n <= args.max_f32 else None
    row = {
        "items": n,
        "scheme": scheme,
        "dim": dim,
        "bytes": (d / TABLE).stat().st_size + (d / TOWER_ORT).stat().st_size,
        "items_npz_bytes": (d / TABLE).stat().st_size,
        "tower_ort_bytes": (d / TOWER_ORT).stat().st_size,
        "resident_codes_bytes": int(resident),
        "resident_float32_bytes": int(n * dim * 4),
        "load_s": round(load_s, 3),
        "us_per_query_codes": round(codes["median"], 1),
        "us_per_query_codes_p90": round(codes["p90"], 1),
        "us_per_query_codes_min": round(codes["min"], 1),
        "us_tower": round(codes["tower_median"], 1),
        "us_rank_codes": round(codes["rank_median"], 1),
        "us_per_query_float32": round(f32["median"], 1) if f32 else None,
        "us_per_query_float32_p90": round(f32["p90"], 1) if f32 else None,
        "us_per_query_float32_min": round(f32["min"], 1) if f32 else None,
        "us_rank_float32": round(f32["rank_median"], 1) if f32 else None,
    }
    shutil.rmtree(d)
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", required=True, help="a `socialrec export-device` output dir")
    p.add_argument("--sizes", default="20000,100000,1000000", help="comma-separated item counts")
    p.add_argument("--schemes", default="sq8,row4", help="comma-separated: sq8, row4")
    p.add_argument("--queries", type=int, default=200, help="timed queries per size")
    p.add_argument("--history", type=int, default=50, help="history items per query")
    p.add_argument("--max-f32", type=int, default=1_000_000, help="largest N also timed as float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/reports/device-sizes.json")
    args = p.parse_args()
    device = Path(args.device)
    if not (device / TABLE).is_file() or not (device / TOWER_ORT).is_file():
        print(f"{device}: not an export-device output (no {TABLE} / {TOWER_ORT})", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            for scheme in args.schemes.split(","):
                rows.append(measure(device, n, scheme, args, Path(tmp)))
    load = os.getloadavg()
    report = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device_export": str(device),
        "threads": 1,
        "load_average_1_5_15": [round(v, 2) for v in load],
        "cpus": os.cpu_count(),
        "note": "x86 server core shared with other jobs (see load average); a phone core is "
        "slower: scale us_per_query by the ratio measured on the target phone",
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
