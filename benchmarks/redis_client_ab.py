"""Which Redis client the server's request path uses, decided by server CPU per request.

Runs the same `socialrec loadtest` (our server only, constant load) with
`--serve-args "--redis-client resp"` and `"--redis-client redis-py"` alternately, ``--rounds``
times each, and reports per client the median server CPU per request (all worker processes,
psutil), throughput and p99, plus the saving of the hand-written client:
``1 - cpu(resp) / cpu(redis-py)``. Alternating rounds spread the host's drift over both sides.

    python benchmarks/redis_client_ab.py --run runs/lastfm --rounds 2 --duration 45
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLIENTS = ("resp", "redis-py")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run directory (RUN/bundle exported if missing)")
    ap.add_argument("--rounds", type=int, default=2, help="load runs per client, alternating")
    ap.add_argument("--duration", type=float, default=45, help="seconds of load per run")
    ap.add_argument("--users", type=int, default=16, help="simulated Locust users")
    ap.add_argument("--workers", type=int, default=2, help="server worker processes")
    ap.add_argument("--out", default="benchmarks/reports/redis-client-ab.json")
    a = ap.parse_args()

    work = Path(a.run) / "redis-client-ab"
    rows: dict[str, list[dict]] = {c: [] for c in CLIENTS}
    for r in range(a.rounds):
        order = CLIENTS if r % 2 == 0 else CLIENTS[::-1]
        for client in order:
            out = work / f"{client}-r{r}"
            cmd = [
                sys.executable, "-m", "socialrec.cli", "loadtest", "--run", a.run,
                "--duration", str(a.duration), "--users", str(a.users),
                "--workers", str(a.workers), "--no-peer", "--out", str(out),
                "--serve-args", f"--redis-client {client}",
            ]  # fmt: skip
            print(f"round {r + 1}/{a.rounds}: {client}", flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            s = json.loads((out / "summary.json").read_text())
            row = {
                "round": r,
                "server_cpu_us_per_request": s["server_cpu_us_per_request"],
                "redis_cpu_us_per_request": s.get("redis_cpu_us_per_request"),
                "rps": s["rps"],
                "p99_ms": s["p99_ms"],
                "failures": s["failures"],
                "requests": s["requests"],
                "wall_s": round(time.perf_counter() - t0, 1),
            }
            rows[client].append(row)
            print(f"  {row}", flush=True)

    def med(client: str, key: str) -> float:
        return statistics.median(x[key] for x in rows[client])

    report = {
        "command": " ".join(sys.argv),
        "per_client": {
            c: {
                "median_server_cpu_us_per_request": med(c, "server_cpu_us_per_request"),
                "median_rps": med(c, "rps"),
                "median_p99_ms": med(c, "p99_ms"),
                "runs": rows[c],
            }
            for c in CLIENTS
        },
    }
    cpu_resp = report["per_client"]["resp"]["median_server_cpu_us_per_request"]
    cpu_py = report["per_client"]["redis-py"]["median_server_cpu_us_per_request"]
    report["resp_saves_server_cpu"] = round(1 - cpu_resp / cpu_py, 3)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    for c in CLIENTS:
        pc = report["per_client"][c]
        print(
            f"{c:9s} server CPU {pc['median_server_cpu_us_per_request']:.1f} us/request  "
            f"{pc['median_rps']:.1f} rps  p99 {pc['median_p99_ms']} ms (medians)"
        )
    print(f"resp saves {report['resp_saves_server_cpu']:.1%} of server CPU per request")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
