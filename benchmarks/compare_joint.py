"""The joint planner against contiguous, EPLB (both policies), ExFlow and MoETuner on the bundled real trace.

    PYTHONPATH=. python benchmarks/compare_joint.py                       # 4, 8 and 16 GPUs (8 per node)
    PYTHONPATH=. python benchmarks/compare_joint.py --gpus 8 --redundant 8 --markdown
    PYTHONPATH=. python benchmarks/compare_joint.py --tasks --gpus 8 --redundant 8   # several profiles, counts only
    PYTHONPATH=. python benchmarks/compare_joint.py --gpus 8 --solvers joint --even-homes  # homes spread evenly
    PYTHONPATH=. python benchmarks/compare_joint.py --gpus 16 --redundant 16 --joint-param chain_start=true
    PYTHONPATH=. python benchmarks/compare_joint.py --gpus 8 --gpu-flops 455T   # expert rate from expert_gemm.py
    PYTHONPATH=. python benchmarks/compare_joint.py --gpus 8 --affinity-weights 0 1 2 4  # time vs k x k locality
    PYTHONPATH=. python benchmarks/compare_joint.py --gpus 8 --seed 0 1 2 3 4   # five hold-out splits, summary

Plans are fitted on half the sequences of the bundled DeepSeek-V2-Lite ESFT trace (split by sequence, seed 0)
and measured on the other half. With several nodes the experts form 8 groups (EPLB's hierarchical policy packs
groups onto nodes). Columns: held-out load imbalance, cross-GPU transitions (and their ratio to
contiguous), inter-node transitions, GPUs per token-layer, estimated MoE time per token under the standard and the
coherent dataflow (DeepSeek-V2-Lite sizes, H100 defaults), solve seconds and the solver's own gap. The joint planner
runs once per dataflow; its row says which it optimised.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small matrix products: one BLAS thread is fastest

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from placement.commands.plan import RESAMPLES  # noqa: E402

REFERENCES = ["contiguous", "eplb-hierarchical", "eplb-global", "exflow", "moetuner"]
KEYS = [("load_imbalance", "imbalance"), ("cross_gpu_fraction", "cross-GPU"), ("cross_ratio", "x contig."),
        ("inter_node_fraction", "inter-node"), ("dispatch_gpus", "GPUs/token"),
        ("std_us_per_token", "std us/tok"), ("coherent_us_per_token", "coh. us/tok"), ("seconds", "solve s"),
        ("gap", "gap")]


def run(gpus: int, gpn: int, redundant: int, ref_limit: float, joint_limit: float, dataflows: list[str],
        solvers: list[str], seed: int, say, even_homes: bool = False, joint_params: dict | None = None,
        bandwidths: tuple[float | None, float | None] = (None, None), gpu_flops: float | None = None,
        affinity_weights: list[float] | None = None, resamples: int = 1) -> list[dict]:
    from placement.coherent import evaluate_coherent
    from placement.evaluate import evaluate, prepare
    from placement.plan import Plan
    from placement.problem import build_problem
    from solvers import Options, SolverInputError, Topology, names, solve
    from solvers.cost import CostModel
    from traces import datasets

    trace = datasets.load()
    fit, held = trace.split_by_sequence(0.5, seed=seed)
    if even_homes:  # every held-out token its own sequence: homes (sequence index mod G) spread evenly
        from dataclasses import replace

        import numpy as np

        held = replace(held, seq_id=np.arange(held.num_tokens), pos_in_seq=None)
    held_ev = prepare(held)
    topo = Topology.for_experts(trace.num_experts, gpus, redundant, min(gpn, gpus))
    topo = topo.with_bandwidths(*bandwidths)
    # several nodes: 8 expert groups so that EPLB's hierarchical policy (groups -> nodes) applies
    from placement.affinity import AffinityStats

    stats = AffinityStats.from_trace(fit, baselines=False)
    problem = build_problem(fit, topo, expert_groups=8 if topo.num_nodes > 1 else 1, stats=stats)
    # the joint planner's profiles: resamples of the fitted sequences, as `moeplace plan` does by default
    joint_problem = problem if resamples <= 1 else build_problem(
        fit, topo, expert_groups=8 if topo.num_nodes > 1 else 1, stats=stats, resamples=resamples,
        seed=seed)
    flops = {"gpu_flops": gpu_flops} if gpu_flops else {}
    cost_std, cost_coh = CostModel(**flops), CostModel(dataflow="coherent", **flops)
    rows = []
    available = set(names())
    for name in solvers:
        if name not in available:
            say(f"  {name}: not available here, skipped")
            continue
        weights = affinity_weights or [None]
        for flow, w in (itertools.product(dataflows, weights) if name == "joint" else [(None, None)]):
            params = {**flops, **(joint_params or {}), "dataflow": flow} if flow else {}
            if w is not None:
                params["affinity_weight"] = w
            limit = joint_limit if name == "joint" else ref_limit
            t = time.perf_counter()
            try:
                res = solve(name, joint_problem if name == "joint" else problem,
                            Options(time_limit=limit, seed=seed, threads=1, params=params))
            except SolverInputError as exc:
                say(f"  {name}: {exc}")
                continue
            secs = time.perf_counter() - t
            plan = Plan.from_result(res, trace.num_experts, topo, fit.moe_layer_index, fit.decoder_layers, fit.model)
            o = evaluate(plan, held_ev, cost_std)["overall"]
            c = evaluate_coherent(plan, held, cost_coh)
            label = name if not flow else f"joint ({flow})" if w is None else f"joint ({flow}, w={w:g})"
            row = {"gpus": gpus, "redundant": redundant, "solver": label, "affinity_weight": w,
                   "seconds": secs, "gap": res.gap, "status": res.status, "objective": res.objective,
                   "bound": res.bound, "load_imbalance": o["load_imbalance"], "balancedness": o["balancedness"],
                   "cross_gpu_fraction": o["cross_gpu_fraction"], "inter_node_fraction": o["inter_node_fraction"],
                   "dispatch_gpus": o["dispatch_gpus"], "std_us_per_token": o["est_moe_us_per_token"],
                   "coherent_us_per_token": c["est_moe_us_per_token"]}
            rows.append(row)
            say(f"  {row['solver']:28s} {secs:6.1f}s imb {row['load_imbalance']:.3f} cross "
                f"{row['cross_gpu_fraction']:.3f} std {row['std_us_per_token']:.4f} coh {row['coherent_us_per_token']:.4f}"
                f" gap {fmt(row['gap'])}")
    base = next((r for r in rows if r["solver"] == "contiguous"), None)
    for r in rows:
        r["cross_ratio"] = r["cross_gpu_fraction"] / base["cross_gpu_fraction"] if base else None
    return rows


def fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    out = []
    for (gpus, red) in sorted({(r["gpus"], r["redundant"]) for r in rows}):
        out.append(f"\n{gpus} GPUs, {red} redundant slots\n")
        out.append("| solver | " + " | ".join(label for _, label in KEYS) + " |")
        out.append("| --- |" + " ---: |" * len(KEYS))
        for r in rows:
            if (r["gpus"], r["redundant"]) != (gpus, red):
                continue
            cells = [fmt(r[k], 1 if k == "seconds" else (4 if k.endswith("per_token") else 3)) for k, _ in KEYS]
            out.append(f"| {r['solver']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def over_splits(rows: list[dict]) -> str:
    """Markdown summary over hold-out splits: per solver the mean of each held-out metric, the time of each dataflow
    as a ratio to the best reference solver (EPLB, ExFlow, MoETuner) of the same split (mean and worst split), and
    in how many splits it is below every reference."""
    import numpy as np

    out = []
    flows = [("std_us_per_token", "std"), ("coherent_us_per_token", "coherent")]
    for (gpus, red) in sorted({(r["gpus"], r["redundant"]) for r in rows}):
        sub = [r for r in rows if (r["gpus"], r["redundant"]) == (gpus, red)]
        seeds = sorted({r["seed"] for r in sub})
        best_ref = {(s, k): min((r[k] for r in sub if r["seed"] == s and r["solver"] in REFERENCES[1:]),
                                default=None) for s in seeds for k, _ in flows}
        out.append(f"\n{gpus} GPUs, {red} redundant slots, {len(seeds)} hold-out splits (seeds "
                   f"{', '.join(map(str, seeds))})\n")
        head = ["imbalance", "x contig.", "std us/tok", "coh. us/tok"]
        for _, f in flows:
            head += [f"{f} / best ref. (mean)", f"{f} / best ref. (worst)", f"{f} below every ref."]
        out.append("| solver | " + " | ".join(head) + " |")
        out.append("| --- |" + " ---: |" * len(head))
        for name in dict.fromkeys(r["solver"] for r in sub):
            rs = [r for r in sub if r["solver"] == name]
            mean = lambda vals: None if any(v is None for v in vals) else float(np.mean(vals))  # noqa: E731
            cells = [fmt(mean([r[k] for r in rs]), d) for k, d in
                     (("load_imbalance", 3), ("cross_ratio", 3), ("std_us_per_token", 4), ("coherent_us_per_token", 4))]
            for k, _ in flows:
                ratio = [r[k] / best_ref[(r["seed"], k)] for r in rs if best_ref[(r["seed"], k)]]
                cells += [fmt(np.mean(ratio) if ratio else None), fmt(max(ratio) if ratio else None),
                          f"{sum(x < 1.0 for x in ratio)}/{len(ratio)}" if ratio else "-"]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, nargs="*", default=[4, 8, 16])
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--redundant", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=60.0, help="time limit of the reference ILP solvers")
    ap.add_argument("--joint-time-limit", type=float, default=10.0)
    ap.add_argument("--dataflow", nargs="*", default=["standard", "coherent"])
    ap.add_argument("--solvers", default=",".join(REFERENCES + ["joint"]))
    ap.add_argument("--seed", type=int, nargs="*", default=[0], help="hold-out split (and solver) seeds; with "
                    "several, every split is run and a summary over splits is printed")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--even-homes", action="store_true", help="evaluate with every held-out token its own sequence "
                    "(homes spread evenly over the GPUs, as the planner's counts model assumes)")
    ap.add_argument("--intra-node-bandwidth", default=None, metavar="SIZE",
                    help="GPU-GPU bytes/s per GPU and direction inside a node, e.g. 50GB (default: 450GB, NVLink 4)")
    ap.add_argument("--inter-node-bandwidth", default=None, metavar="SIZE",
                    help="bytes/s per GPU and direction between nodes (default: 50GB, 400 Gb/s InfiniBand)")
    ap.add_argument("--gpu-flops", default=None, metavar="RATE",
                    help="expert GEMM FLOP/s of the cost model, e.g. 455T (default: 400T; see expert_gemm.py)")
    ap.add_argument("--affinity-weights", type=float, nargs="*", default=None, metavar="W",
                    help="run the joint planner once per affinity_weight (its k x k locality term), side by side")
    ap.add_argument("--joint-param", action="append", default=[], metavar="KEY=VALUE",
                    help="joint planner parameter, as `moeplace plan --param` (repeatable)")
    ap.add_argument("--tasks", action="store_true", help="counts only: fit on the three bundled tasks as separate "
                    "profiles, measure balance on held-out traffic of unseen task mixtures")
    ap.add_argument("--resamples", type=int, default=RESAMPLES, help="the joint planner's profiles: "
                    "this many bootstrap resamples of the fitted sequences (default as `moeplace plan`; 1: none)")
    ap.add_argument("--summary-of", type=Path, default=None, metavar="JSON",
                    help="print the summary over splits of a run saved with --json, and exit")
    args = ap.parse_args()
    if args.summary_of:
        print(over_splits(json.loads(args.summary_of.read_text())["rows"]))
        return
    say = lambda m: print(m, flush=True)  # noqa: E731
    from placement.commands.plan import parse_bandwidth, parse_params, parse_rate

    if args.tasks:
        import numpy as np

        from benchmarks.joint_scale import mixture_robustness
        from solvers import Topology
        from traces import datasets

        fit, held = [], []
        for task in datasets.ESFT_TASKS:
            f, h = datasets.load(tasks=task).split_by_sequence(0.5, seed=args.seed[0])
            fit.append(f.load_profile().logical_count[0])
            held.append(h.load_profile().logical_count[0])
        out = {}
        for g in args.gpus:
            topo = Topology.for_experts(64, g, args.redundant, min(args.gpus_per_node, g))
            say(f"{g} GPUs, {args.redundant} redundant slots, counts of the three tasks")
            out[g] = mixture_robustness(np.stack(fit), np.stack(held), topo, 8 if topo.num_nodes > 1 else 1,
                                        args.joint_time_limit, {}, say)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        return
    rows = []
    for seed in args.seed:
        for g in args.gpus:
            say(f"{g} GPUs, {args.redundant} redundant, split seed {seed}")
            got = run(g, args.gpus_per_node, args.redundant, args.time_limit, args.joint_time_limit, args.dataflow,
                      args.solvers.split(","), seed, say, args.even_homes, parse_params(args.joint_param),
                      (parse_bandwidth(args.intra_node_bandwidth, "--intra-node-bandwidth"),
                       parse_bandwidth(args.inter_node_bandwidth, "--inter-node-bandwidth")),
                      parse_rate(args.gpu_flops, "--gpu-flops") if args.gpu_flops else None, args.affinity_weights,
                      args.resamples)
            rows += [{**r, "seed": seed} for r in got]
    if args.json:
        args.json.write_text(json.dumps({"machine": f"{os.cpu_count()} CPU cores (shared)", "rows": rows}, indent=2))
    if args.markdown:
        print(markdown(rows) if len(args.seed) == 1 else over_splits(rows))
    elif len(args.seed) > 1:
        print(over_splits(rows))


if __name__ == "__main__":
    main()
