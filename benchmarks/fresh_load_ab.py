"""Fresh items on vs off under load: the same load test (20% of logged interactions with items
the bundle does not know, by default), our server with fresh items on (the default) and with
``--no-fresh-items``, alternating rounds; server CPU per request and client p99 side by side.

    python benchmarks/fresh_load_ab.py --run runs/lastfm --rounds 2 --duration 40 --users 8

Report: benchmarks/reports/fresh-load-ab.json (per-round numbers, medians, ratios). The host
is shared and noisy: only the medians of alternating rounds are worth comparing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from socialrec.loadtest.run import LoadTestConfig, run

VARIANTS = {"fresh-on": (), "fresh-off": ("--no-fresh-items",)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=40.0)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--new-items", type=float, default=0.2)
    p.add_argument("--out", default="benchmarks/reports/fresh-load-ab.json")
    a = p.parse_args(argv)
    work = Path(a.run) / "fresh-load-ab"
    rounds: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(a.rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for v in order:
            cfg = LoadTestConfig(
                run=a.run, duration=a.duration, users=a.users, spawn_rate=float(a.users),
                peer=False, serve_args=VARIANTS[v], new_items=a.new_items,
                out=str(work / f"{v}-{r}"),
            )  # fmt: skip
            s = json.loads(run(cfg).read_text())
            row = {
                "round": r,
                "rps": s["rps"],
                "p99_ms": s["p99_ms"],
                "server_cpu_us_per_request": s["server_cpu_us_per_request"],
                "failures": s["failures"],
                "requests": s["requests"],
                "writes_lost": s["writes"]["lost"],
                "fresh": s.get("fresh"),
            }
            rounds[v].append(row)
            print(f"{v:10s} round {r}: {row['rps']:.0f} rps, p99 {row['p99_ms']} ms, "
                  f"CPU {row['server_cpu_us_per_request']} us/request", flush=True)  # fmt: skip

    def med(v: str, k: str) -> float:
        return statistics.median(x[k] for x in rounds[v])

    medians = {
        v: {k: med(v, k) for k in ("rps", "p99_ms", "server_cpu_us_per_request")} for v in VARIANTS
    }
    ratios = {
        k: round(medians["fresh-on"][k] / medians["fresh-off"][k], 3)
        for k in ("rps", "p99_ms", "server_cpu_us_per_request")
    }
    report = {
        "what": __doc__.splitlines()[0],
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "args": vars(a),
        "rounds": rounds,
        "medians": medians,
        "on_over_off": ratios,
        "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(f"medians {medians}\non/off {ratios}\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
