"""CPU per ``session.run`` of the user tower: the whole graph vs one session per output.

Why: ONNX Runtime runs every node of a graph whatever outputs are asked for, and a read needs
one output; the engine therefore splits the tower by output at load
(``serving/engine.py`` ``tower_sessions``). This measures what that saves, side by side in
one process: for each batch size, rounds alternate the whole graph (asked for one output)
and the output's own session, over the same random inputs (history and friend rows padded
as the engine pads them); the figure is the thread CPU per run, median over rounds.

    python benchmarks/tower_split.py --bundle DIR [--batches 1,4,8] [--rounds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from socialrec.serving.bundle import TOWER_OUTPUTS, open_bundle  # noqa: E402
from socialrec.serving.engine import tower_sessions  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--history", type=int, default=48, help="padded history length")
    ap.add_argument("--friends", type=int, default=16, help="padded friend list length")
    ap.add_argument("--runs", type=int, default=2000, help="runs per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out")
    a = ap.parse_args()
    bundle = open_bundle(a.bundle, verify=False)
    path = bundle.path("user_tower.onnx")
    heads = tower_sessions(path)
    whole = tower_sessions(path, max_bytes=0)
    if not isinstance(heads, dict):
        print(f"{path}: the tower does not split by output", file=sys.stderr)
        return 1
    n_items, n_users = len(bundle.item_ids), len(bundle.user_ids)
    rng = np.random.default_rng(0)
    rows = []
    for b in (int(x) for x in a.batches.split(",")):
        L, F = a.history, a.friends
        feeds = {"hist_ids": rng.integers(0, n_items, (b, L)), "hist_w": np.ones((b, L), np.float32),
                 "friend_ids": rng.integers(0, n_users, (b, F)),
                 "friend_w": np.ones((b, F), np.float32)}  # fmt: skip
        for out in TOWER_OUTPUTS:
            times: dict[str, list[float]] = {"whole": [], "split": []}
            for _ in range(a.rounds):
                for name, sess in (("whole", whole), ("split", heads[out])):
                    sess.run([out], feeds)
                    t = time.thread_time()
                    for _ in range(a.runs):
                        sess.run([out], feeds)
                    times[name].append((time.thread_time() - t) / a.runs * 1e6)
            w, s = statistics.median(times["whole"]), statistics.median(times["split"])
            rows.append({"batch": b, "output": out, "whole_us": round(w, 1),
                         "split_us": round(s, 1), "split_over_whole": round(s / w, 3)})  # fmt: skip
            print(f"batch {b:2d} {out:15s} whole {w:7.1f} us  split {s:7.1f} us  "
                  f"split/whole {s / w:5.2f}", flush=True)  # fmt: skip
    if a.out:
        report = {"command": "python benchmarks/tower_split.py " + " ".join(sys.argv[1:]),
                  "bundle": str(a.bundle), "load": os.getloadavg(), "rows": rows}  # fmt: skip
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
