"""End-to-end `moeplace plan` on long DeepSeek-V3-size traces: wall time, solver time and peak memory.

    PYTHONPATH=. python benchmarks/long_trace.py                          # 32k, 131k and 262k tokens
    PYTHONPATH=. python benchmarks/long_trace.py --tokens 65536 --time-limit 30

Each trace is the calibrated synthetic V3 trace of ``benchmarks/joint_scale.py`` (58 MoE layers x 256 experts,
top-8; cached under ``--cache``). The command run is the one a user runs, in its own process:
``moeplace plan TRACE --gpus 64 --gpus-per-node 8 --redundant 64 --model deepseek-v3 --holdout 0.5
--time-limit T --json``. Columns: tokens, trace file size, wall seconds of the whole command, the solver's
seconds (from the plan), the rest (loading, statistics, evaluation on the fitted and the held-out half), peak
resident memory of the process, and the held-out estimated MoE time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="*", default=[32768, 131072, 262144])
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--redundant", type=int, default=64)
    ap.add_argument("--resamples", type=int, default=None, help="passed to `moeplace plan` (default: its default)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "moeplace-bench")
    args = ap.parse_args()
    from benchmarks.joint_scale import v3_trace, v3_trace_path

    rows = []
    for n in args.tokens:
        v3_trace(n, args.cache)  # generate (or find) the cached trace
        path = v3_trace_path(n, args.cache)
        out = args.cache / f"plan-{n}.json"
        cmd = [sys.executable, "-m", "placement.cli", "plan", str(path), "--gpus", str(args.gpus), "--gpus-per-node",
               "8", "--redundant", str(args.redundant), "--model", "deepseek-v3", "--holdout", "0.5",
               "--time-limit", str(args.time_limit), "--out", str(out), "--json"]
        if args.resamples is not None:
            cmd += ["--resamples", str(args.resamples)]
        with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
            t = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=so, stderr=se, text=True)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory (ru_maxrss, kB on Linux)
            wall = time.perf_counter() - t
            code = os.waitstatus_to_exitcode(status)
            so.seek(0)
            se.seek(0)
            stdout, stderr = so.read(), se.read()
        peak_gb = usage.ru_maxrss / 1e6
        if code != 0:
            print(f"{n} tokens: moeplace plan failed ({code}): {stderr.strip()[-400:]}", file=sys.stderr)
            return 1
        rep = json.loads(stdout)
        solver_s = rep["solver"]["seconds"]
        rows.append((n, path.stat().st_size / 1e6, wall, solver_s, wall - solver_s, peak_gb,
                     rep["heldout"]["est_moe_us_per_token"], rep["solver"].get("gap")))
        print(f"{n} tokens: wall {wall:.1f} s, solver {solver_s:.1f} s, peak {peak_gb:.2f} GB", flush=True)
    print("\n| tokens | trace MB | wall s | solver s | rest s | peak memory GB | held-out us/token | gap |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, mb, wall, sol, rest, peak, us, gap in rows:
        print(f"| {n} | {mb:.0f} | {wall:.1f} | {sol:.1f} | {rest:.1f} | {peak:.2f} | {us:.3f} | {gap:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
