"""Scale-out: the planner and the trace reduction on 1 and 2 workers and on a Ray local cluster, at today's sizes.

    PYTHONPATH=. python benchmarks/scale_out.py kimi       # Kimi-K2 size: joint (2 workers) vs both EPLB policies
    PYTHONPATH=. python benchmarks/scale_out.py speedup    # V3 size, the same deterministic work on 1 and 2 workers
    PYTHONPATH=. python benchmarks/scale_out.py reduce     # 10M V3 tokens in 20 shards: 1 vs 2 workers vs Ray
    PYTHONPATH=. python benchmarks/scale_out.py layer320   # one planner layer task at 320 GPUs (for the projection)
    PYTHONPATH=. python benchmarks/scale_out.py project    # on paper: 1B tokens, 320 GPUs on 64 cores (from a JSON)

Every section prints a table and appends its figures to ``--json`` (default ``scale_out.json`` in ``--cache``);
``project`` reads the measured per-core rates back from it. Traces are synthetic, calibrated on the bundled trace
(:func:`traces.synthetic.model_trace`), fitted on half the sequences and judged on the other half; they are cached
under ``--cache``.

- ``kimi``: 60 MoE layers x 384 experts, 128 GPUs in 16 nodes, 128 redundant slots, ``--tokens`` (default 200k).
  ``moeplace plan`` with the joint planner on ``--workers 2`` (wall time of the whole command, trace reading and
  evaluation included) against EPLB's hierarchical and global policies, held-out estimated time; then the same
  deterministic plan (``--work-limit``) from 2 local workers and from a Ray local cluster, compared bit for bit.
- ``speedup``: DeepSeek-V3 size (58 x 256, 64 GPUs in 8 nodes, 64 redundant), the joint planner with
  ``--work-limit``: seconds of the parallel part (the per-layer tasks) on 1 and 2 workers, and whether the plans are
  identical.
- ``reduce``: ``--tokens-reduce`` V3 tokens (default 10M) written as 20 shards (whole sequences resampled from
  the cached calibrated ``--v3-tokens`` trace); the statistics reduced with 1 worker, 2 workers and Ray: seconds,
  peak memory of the largest process, identical or not.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def model_trace_path(model: str, tokens: int, cache: Path, seed: int = 0) -> Path:
    return cache / f"{model}-synthetic-{tokens}-s{seed}.npz"


def cached_trace(model: str, tokens: int, cache: Path, seed: int = 0) -> Path:
    """A calibrated synthetic trace of ``model`` in the cache (generated once, in blocks to bound memory)."""
    from traces import save
    from traces.synthetic import model_trace

    path = model_trace_path(model, tokens, cache, seed)
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        tr = model_trace(model, tokens, seed=seed)
        save(tr, path)
        print(f"generated {path.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        del tr
    return path


def run_cli(*args, timeout: float = 3600) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "placement.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=timeout)
    if r.returncode:
        raise SystemExit(f"moeplace {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r


def plan_hash(path: Path) -> str:
    """A short hash of a plan file's placement (``phy2log``)."""
    phy = np.asarray(json.loads(Path(path).read_text())["phy2log"], dtype=np.int64)
    return hashlib.sha256(np.ascontiguousarray(phy).tobytes()).hexdigest()[:16]


def table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# --- kimi ---------------------------------------------------------------------------------------------------------


def section_kimi(args) -> dict:
    trace = cached_trace("kimi-k2", args.tokens, args.cache)
    out_dir = args.cache / "kimi-plans"
    out_dir.mkdir(parents=True, exist_ok=True)
    common = [trace, "--gpus", 128, "--gpus-per-node", 8, "--redundant", 128,
              "--holdout", 0.5, "--model", "kimi-k2", "--json"]
    rows = []
    # Kimi-K2 has one expert group (no node-limited routing), so the stacks run EPLB's global policy; the
    # hierarchical one is given 16 contiguous groups (one per node) to have both
    for solver, extra in (("eplb-hierarchical", ["--expert-groups", 16]), ("eplb-global", [])):
        secs, r = run_cli("plan", *common, "--solver", solver, *extra, "--out", out_dir / f"{solver}.json")
        rows.append(_row(solver + (" (16 groups)" if extra else ""), secs, json.loads(r.stdout)))
    secs, r = run_cli("plan", *common, "--workers", 2, "--time-limit", args.time_limit, "--out",
                      out_dir / "joint-2w.json")
    rows.append(_row(f"joint, 2 workers, --time-limit {args.time_limit:g}", secs, json.loads(r.stdout)))
    best_eplb = min(r["heldout_us_per_token"] for r in rows[:2])
    for r in rows:
        r["x best EPLB"] = r["heldout_us_per_token"] / best_eplb
    det = []
    for label, extra in (("2 local workers", ["--workers", 2]), ("Ray local cluster", ["--ray-address", "local"])):
        name = "joint-det-" + label.split()[0] + ".json"
        secs, r = run_cli("plan", *common, *extra, "--work-limit", args.work_limit, "--out", out_dir / name)
        s = json.loads(r.stdout)
        det.append({"run": f"--work-limit {args.work_limit}, {label}", "seconds": secs,
                    "held-out us/token": s["heldout"]["est_moe_us_per_token"], "plan sha256": plan_hash(out_dir / name)})
    print(f"\nKimi-K2 size: 60 MoE layers x 384 experts, 128 GPUs (16 nodes of 8), 128 redundant slots, "
          f"{args.tokens} synthetic tokens (half fitted, half held out)\n")
    print(table(rows, ["solver", "seconds", "heldout_us_per_token", "x best EPLB", "imbalance", "gap"]))
    print()
    print(table(det, ["run", "seconds", "held-out us/token", "plan sha256"]))
    print(f"\nsame plan from 2 local workers and Ray: {det[0]['plan sha256'] == det[1]['plan sha256']}")
    return {"kimi": {"rows": rows, "deterministic": det, "tokens": args.tokens}}


def _row(name: str, secs: float, s: dict) -> dict:
    h = s["heldout"]
    return {"solver": name, "seconds": secs, "heldout_us_per_token": h["est_moe_us_per_token"],
            "imbalance": h["load_imbalance"], "gap": s["solver"].get("gap")}


# --- speedup ------------------------------------------------------------------------------------------------------


def section_speedup(args) -> dict:
    from placement.executor import InProcess, LocalProcesses
    from placement.problem import build_problem
    from solvers import Options, Topology, solve
    from traces import load

    trace = load(cached_trace("deepseek-v3", args.v3_tokens, args.cache))
    fit, _ = trace.split_by_sequence(0.5, seed=0)
    problem = build_problem(fit, Topology.for_experts(256, 64, 64, gpus_per_node=8), expert_groups=8)
    params = {"model": "deepseek-v3"}
    rows, phys = [], []
    for label, ex in (("1 worker", InProcess()), ("2 workers", LocalProcesses(2))):
        with ex:
            if isinstance(ex, LocalProcesses):  # start the pool outside the timing (a second, once per command)
                ex.map(_noop, [0, 1])
            t0 = time.perf_counter()
            res = solve("joint", problem, Options(time_limit=None, work_limit=args.work_limit, executor=ex,
                                                  params=params))
            total = time.perf_counter() - t0
        phys.append(res.phy2log)
        rows.append({"run": label, "parallel part s": res.stats["parallel_seconds"], "solve s": total,
                     "objective": res.objective})
    rows[1]["speed-up"] = rows[0]["parallel part s"] / rows[1]["parallel part s"]
    same = bool(np.array_equal(phys[0], phys[1]))
    print(f"\nDeepSeek-V3 size, {args.v3_tokens // 2} fitted tokens, 64 GPUs (8 nodes), 64 redundant slots, "
          f"--work-limit {args.work_limit}\n")
    print(table(rows, ["run", "parallel part s", "solve s", "objective", "speed-up"]))
    print(f"\nidentical plans: {same}")
    return {"speedup": {"rows": rows, "identical": same, "tokens": args.v3_tokens, "work_limit": args.work_limit}}


def _noop(_shared, x):
    return x


# --- reduce -------------------------------------------------------------------------------------------------------


def write_shards(tokens: int, shards: int, cache: Path, base_tokens: int) -> Path:
    """``tokens`` V3 tokens as ``shards`` files. Each shard resamples whole sequences (with replacement, its own
    seed) of the cached calibrated ``base_tokens`` trace, with fresh sequence ids: generating 10M tokens afresh takes
    about an hour here, and what the reduction costs does not depend on which sequences a shard holds. Gate weights
    are left out, as in stacks' recorder dumps (the statistics never read them)."""
    from dataclasses import replace

    from traces import load, save

    folder = cache / f"v3-shards-{tokens}-{shards}"
    per = -(-tokens // shards)
    folder.mkdir(parents=True, exist_ok=True)
    base = None
    for i in range(shards):
        path = folder / f"shard{i:03d}.npz"
        if path.exists():
            continue
        if base is None:
            base = load(cached_trace("deepseek-v3", base_tokens, cache))
            starts = np.flatnonzero(np.r_[True, base.seq_id[1:] != base.seq_id[:-1]])
            bounds = np.r_[starts, base.num_tokens]
        n = min(per, tokens - i * per)
        rng = np.random.default_rng(1000 + i)
        picks, got = [], 0
        while got < n:
            j = int(rng.integers(starts.size))
            seg = np.arange(bounds[j], bounds[j + 1])[: n - got]
            picks.append(seg)
            got += seg.size
        idx = np.concatenate(picks)
        seq = np.repeat(np.arange(len(picks), dtype=np.int64) + i * 10_000_000, [p.size for p in picks])
        tr = replace(base.take(idx), seq_id=seq, gate_weights=None, source=f"resampled shard {i}")
        save(tr, path, compress=False)  # as a recorder writes them; compressing 460 MB shards takes minutes each
        print(f"wrote {path.name}", file=sys.stderr)
    return folder


def section_reduce(args) -> dict:
    folder = write_shards(args.tokens_reduce, 20, args.cache, args.v3_tokens)
    code = ("import json, resource, sys, time, numpy as np\n"
            "from placement.executor import make_executor\nfrom placement.reduce import reduce_stats\n"
            "w, addr, folder = sys.argv[1], sys.argv[2], sys.argv[3]\n"
            "ex = make_executor(int(w), addr or None)\n"
            "t0 = time.perf_counter(); s = reduce_stats([folder], ex); dt = time.perf_counter() - t0\n"
            "ex.close()\n"
            "h = __import__('hashlib').sha256(b''.join(np.ascontiguousarray(getattr(s, f)).tobytes() for f in "
            "('load', 'transitions', 'coactivation', 'transitions_top1', 'transitions_shuffled') "
            "if getattr(s, f) is not None)).hexdigest()[:16]\n"
            "peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20\n"
            "print(json.dumps({'seconds': dt, 'peak_gib': peak, 'hash': h, 'tokens': int(s.tokens.max())}))\n")
    rows = []
    for label, w, addr in (("1 worker", "1", ""), ("2 workers", "2", ""), ("Ray local (2 CPUs)", "1", "local")):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        r = subprocess.run([sys.executable, "-c", code, w, addr, str(folder)], capture_output=True, text=True, env=env)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        res = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append({"run": label, **res})
    rows[1]["speed-up"] = rows[0]["seconds"] / rows[1]["seconds"]
    rows[2]["speed-up"] = rows[0]["seconds"] / rows[2]["seconds"]
    print(f"\nTrace reduction: {args.tokens_reduce} DeepSeek-V3 tokens in 20 shards (58 x 256, top-8)\n")
    print(table(rows, ["run", "seconds", "speed-up", "peak_gib", "hash", "tokens"]))
    print(f"\nidentical statistics: {len({r['hash'] for r in rows}) == 1}")
    print("(peak_gib: the largest resident set of the driver and of any worker process; Ray's own processes "
          "are not counted)")
    return {"reduce": {"rows": rows, "tokens": args.tokens_reduce}}


# --- one layer task at 320 GPUs -----------------------------------------------------------------------------------


def section_layer320(args) -> dict:
    """Core-seconds of the joint planner's per-layer task at Kimi-K2 size on 320 GPUs (40 nodes, 640 slots),
    ``--work-limit``, one worker, on the first 2 and 4 MoE layers of the Kimi trace (for the projection)."""
    from dataclasses import replace

    from placement.executor import InProcess
    from placement.problem import build_problem
    from solvers import Options, Topology, solve
    from traces import load

    fit, _ = load(cached_trace("kimi-k2", args.tokens, args.cache)).split_by_sequence(0.5, seed=0)
    rows = []
    for n in (2, 4):
        sub = replace(fit, expert_ids=np.ascontiguousarray(fit.expert_ids[:, :n]), gate_weights=None,
                      moe_layer_index=fit.moe_layer_index[:n])
        problem = build_problem(sub, Topology.for_experts(384, 320, 256, gpus_per_node=8))
        res = solve("joint", problem, Options(time_limit=None, work_limit=args.work_limit, executor=InProcess(),
                                              params={"model": "kimi-k2"}))
        rows.append({"layers": n, "parallel part s": res.stats["parallel_seconds"],
                     "per layer s": res.stats["parallel_seconds"] / n})
    print("\nKimi-K2 at 320 GPUs (40 nodes), 640 slots, --work-limit", args.work_limit, "one worker\n")
    print(table(rows, ["layers", "parallel part s", "per layer s"]))
    return {"layer320": {"rows": rows}}


# --- projection ---------------------------------------------------------------------------------------------------


def section_project(args) -> dict:
    data = json.loads(args.json.read_text()) if args.json.exists() else {}
    red, kimi = data.get("reduce"), data.get("kimi")
    if not red or not kimi:
        raise SystemExit(f"run the reduce and kimi sections first (they write {args.json})")
    one = red["rows"][0]
    rate = red["tokens"] / one["seconds"]  # V3 tokens per core-second
    cores = 64
    billion = 1e9 / (rate * cores)
    print("\nOn paper, from the measured per-core rates (this 2-core machine):\n")
    print(f"- trace reduction: {rate:,.0f} V3 tokens per core-second -> 1e9 tokens on {cores} cores: "
          f"{billion / 60:.0f} min (shards spread evenly, one per task)")
    joint = [r for r in kimi["rows"] if r["solver"].startswith("joint")][0]
    return {"project": {"tokens_per_core_second": rate, "billion_minutes_64_cores": billion / 60,
                        "kimi_joint_seconds": joint["seconds"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("section", choices=["kimi", "speedup", "reduce", "layer320", "project"], nargs="+")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("MOEPLACE_BENCH_CACHE", "/tmp/moeplace-bench")))
    ap.add_argument("--tokens", type=int, default=200_000, help="Kimi-K2 trace tokens")
    ap.add_argument("--v3-tokens", type=int, default=60_000, help="V3 trace tokens for the speed-up")
    ap.add_argument("--tokens-reduce", type=int, default=10_000_000, help="V3 tokens for the reduction")
    ap.add_argument("--time-limit", type=float, default=180.0, help="joint planner's limit in the kimi section")
    ap.add_argument("--work-limit", type=int, default=1, help="deterministic work (kicks per layer)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.json = args.json or args.cache / "scale_out.json"
    data = json.loads(args.json.read_text()) if args.json.exists() else {}
    for section in args.section:
        data.update(globals()[f"section_{section}"](args))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1, default=float))


if __name__ == "__main__":
    main()
