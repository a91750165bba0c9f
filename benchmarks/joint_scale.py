"""Joint planner at DeepSeek-V3 size on calibrated synthetic traces, side by side with the reference solvers.

    PYTHONPATH=. python benchmarks/joint_scale.py                    # 32 and 64 GPUs, 32/64 redundant, both dataflows
    PYTHONPATH=. python benchmarks/joint_scale.py --gpus 64 --redundant 64 --dataflow standard --solvers joint,eplb
    PYTHONPATH=. python benchmarks/joint_scale.py --profiles         # counts-only input, several workload profiles
    PYTHONPATH=. python benchmarks/joint_scale.py --calibrate        # refit the generator on the bundled trace

The trace comes from :func:`traces.synthetic.deepseek_v3` (58 MoE layers x 256 experts, top-8, 8 groups, 4 groups
per token; strengths calibrated on the bundled DeepSeek-V2-Lite trace). Plans are fitted on half the sequences and
evaluated on the other half. Each row: held-out load imbalance, cross-GPU and inter-node transitions, GPUs per
token-layer, estimated MoE time under the standard and the coherent dataflow (DeepSeek-V3 sizes), solve time,
objective, bound and gap. Traces are cached under ``--cache``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small matrix products: one BLAS thread is fastest

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from placement.commands.plan import RESAMPLES  # noqa: E402

import numpy as np  # noqa: E402

SOLVERS = ["contiguous", "eplb-hierarchical", "eplb-global", "exflow", "moetuner", "joint"]


def v3_trace_path(tokens: int, cache: Path, seed: int = 0, **overrides) -> Path:
    """Where :func:`v3_trace` caches the trace of these arguments."""
    tag = "-".join(f"{k}{v}" for k, v in sorted(overrides.items()))
    return cache / f"v3-synthetic-{tokens}-s{seed}{('-' + tag) if tag else ''}.npz"


def v3_trace(tokens: int, cache: Path, seed: int = 0, **overrides):
    from traces import load, save
    from traces.synthetic import deepseek_v3

    path = v3_trace_path(tokens, cache, seed, **overrides)
    if path.exists():
        return load(path)
    cache.mkdir(parents=True, exist_ok=True)
    tr = deepseek_v3(tokens, seed=seed, **overrides)
    save(tr, path)
    return tr


def evaluate_all(plan, held, cost_std, cost_coh) -> dict:
    from placement.coherent import evaluate_coherent
    from placement.evaluate import evaluate

    o = evaluate(plan, held, cost_std)["overall"]
    c = evaluate_coherent(plan, held, cost_coh)
    return {"load_imbalance": o["load_imbalance"], "balancedness": o["balancedness"],
            "cross_gpu_fraction": o["cross_gpu_fraction"], "inter_node_fraction": o["inter_node_fraction"],
            "dispatch_gpus": o["dispatch_gpus"], "dispatch_nodes": o["dispatch_nodes"],
            "std_us_per_token": o["est_moe_us_per_token"], "coherent_us_per_token": c["est_moe_us_per_token"]}


def run_config(fit, held_ev, gpus: int, gpn: int, redundant: int, solvers: list[str], dataflows: list[str],
               time_limit: float, seed: int, say, resamples: int = 1) -> list[dict]:
    from placement.evaluate import prepare
    from placement.plan import Plan
    from placement.problem import build_problem
    from solvers import Options, Topology, names, solve
    from solvers.cost import CostModel

    topo = Topology.for_experts(fit.num_experts, gpus, redundant, gpn)
    t = time.perf_counter()
    from placement.affinity import AffinityStats

    stats = AffinityStats.from_trace(fit, baselines=False)
    problem = build_problem(fit, topo, expert_groups=8, stats=stats)
    # the joint planner's profiles: resamples of the fitted sequences, as `moeplace plan` does by default
    joint_problem = problem if resamples <= 1 else build_problem(fit, topo, expert_groups=8, stats=stats,
                                                                       resamples=resamples, seed=seed)
    build_s = time.perf_counter() - t
    say(f"  problem built in {build_s:.1f}s")
    cost_std = CostModel.preset("deepseek-v3")
    cost_coh = CostModel.preset("deepseek-v3", dataflow="coherent")
    rows = []
    available = set(names())
    for name in solvers:
        if name not in available:
            say(f"  {name}: not available on this branch, skipped")
            continue
        for flow in (dataflows if name == "joint" else [None]):
            params = {"model": "deepseek-v3"}
            if flow:
                params["dataflow"] = flow
            t = time.perf_counter()
            res = solve(name, joint_problem if name == "joint" else problem,
                        Options(time_limit=time_limit, seed=seed, threads=1, params=params))
            secs = time.perf_counter() - t
            plan = Plan.from_result(res, fit.num_experts, topo, fit.moe_layer_index, fit.decoder_layers, fit.model)
            m = evaluate_all(plan, held_ev, cost_std, cost_coh)
            label = name if not flow else f"{name} ({flow})"
            row = {"gpus": gpus, "gpus_per_node": gpn, "redundant": redundant, "solver": label, "seconds": secs,
                   "build_seconds": build_s, "objective": res.objective, "bound": res.bound, "gap": res.gap,
                   "status": res.status, **m}
            rows.append(row)
            say(f"  {label:22s} {secs:6.1f}s gap {fmt(res.gap)} imb {m['load_imbalance']:.3f} cross "
                f"{m['cross_gpu_fraction']:.3f} std {m['std_us_per_token']:.3f}us coh {m['coherent_us_per_token']:.3f}us")
    return rows


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def mixture_robustness(fit_counts: np.ndarray, held_counts: np.ndarray, topo, expert_groups: int, time_limit: float,
                       params: dict, say, mixtures: int = 16, seed: int = 0) -> dict:
    """Fit on N task profiles, measure balance on held-out traffic of unseen task mixtures.

    Args:
        fit_counts: ``[N, L, E]`` fitted counts per task; held_counts: ``[N, L, E]`` held-out counts per task.
    The unseen workloads are ``mixtures`` random mixes (Dirichlet(1) weights over the tasks) of the held-out
    traffic, each task normalised to one token. EPLB and joint (summed counts) see the summed profile; joint also
    runs with the N profiles kept apart (expected and worst case).
    """
    from placement.problem import build_problem
    from solvers import Options, SolverInputError, names, solve
    from solvers.objective import gpu_load, imbalance
    from traces import LoadProfile

    rng = np.random.default_rng(seed)
    N = fit_counts.shape[0]
    held_norm = held_counts / held_counts.sum(axis=(1, 2), keepdims=True)
    w = rng.dirichlet(np.ones(N), size=mixtures)
    mixes = np.einsum("mn,nle->mle", w, held_norm)
    summed = LoadProfile(fit_counts.sum(axis=0))
    profiles = LoadProfile(fit_counts)
    configs = [("eplb-hierarchical", summed, {}), ("eplb-global", summed, {}),
               ("joint (summed counts)", summed, {}),
               (f"joint ({N} profiles, expected)", profiles, {"objective": "expected"}),
               (f"joint ({N} profiles, worst)", profiles, {"objective": "worst"})]
    out = {}
    for label, data, extra in configs:
        name = label.split(" ")[0]
        if name not in names():
            continue
        problem = build_problem(data, topo, expert_groups=expert_groups)
        t = time.perf_counter()
        try:
            res = solve(name, problem, Options(time_limit=time_limit, threads=1, params={**params, **extra}))
        except SolverInputError as exc:
            say(f"  {label}: {exc}")
            continue
        secs = time.perf_counter() - t

        def imb(loads):
            return np.array([float(imbalance(gpu_load(res.phy2log, x, topo)).mean()) for x in loads])

        fitted, tasks, mix = imb(fit_counts), imb(held_norm), imb(mixes)
        out[label] = {"seconds": secs, "gap": res.gap, "fitted_tasks_mean": float(fitted.mean()),
                      "fitted_tasks_worst": float(fitted.max()), "heldout_tasks_mean": float(tasks.mean()),
                      "heldout_tasks_worst": float(tasks.max()), "unseen_mixes_mean": float(mix.mean()),
                      "unseen_mixes_worst": float(mix.max()),
                      "fitted_sum": float(imb(fit_counts.sum(axis=0)[None])[0]),
                      "heldout_sum": float(imb(held_counts.sum(axis=0)[None])[0])}
        o = out[label]
        say(f"  {label:32s} {secs:6.1f}s gap {fmt(res.gap)} fitted sum {o['fitted_sum']:.3f} held-out sum "
            f"{o['heldout_sum']:.3f} fitted tasks {o['fitted_tasks_mean']:.3f}/"
            f"{o['fitted_tasks_worst']:.3f} held-out tasks {o['heldout_tasks_mean']:.3f}/{o['heldout_tasks_worst']:.3f}"
            f" unseen mixes {o['unseen_mixes_mean']:.3f}/{o['unseen_mixes_worst']:.3f}")
    return out


def profiles_experiment(cache: Path, tokens: int, gpus: int, gpn: int, redundant: int, time_limit: float, say,
                        tasks: int = 4, skew: float = 1.0) -> dict:
    """Counts-only input at V3 size: ``tasks`` synthetic workloads (each its own mix of token types), fitted on
    half of each one's sequences, measured on the other half and on unseen mixtures of them."""
    from solvers import Topology

    fit, held = [], []
    for i in range(tasks):
        tr = v3_trace(tokens, cache, seed=100 + i, workload_skew=skew)
        f, h = tr.split_by_sequence(0.5, seed=0)
        fit.append(f.load_profile().logical_count[0])
        held.append(h.load_profile().logical_count[0])
    topo = Topology.for_experts(256, gpus, redundant, gpn)
    say(f"{tasks} synthetic V3 workloads, {gpus} GPUs, {redundant} redundant slots, counts only")
    return mixture_robustness(np.stack(fit), np.stack(held), topo, 8, time_limit, {"model": "deepseek-v3"}, say)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, nargs="*", default=[32, 64])
    ap.add_argument("--redundant", type=int, nargs="*", default=[32, 64])
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32768, help="synthetic tokens (half fit, half held out)")
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--dataflow", nargs="*", default=["standard", "coherent"])
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--profiles", action="store_true", help="run the several-profiles experiment only")
    ap.add_argument("--calibrate", action="store_true", help="refit the generator on the bundled trace and exit")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "moeplace-bench")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resamples", type=int, default=RESAMPLES, help="the joint planner's profiles: "
                    "this many bootstrap resamples of the fitted sequences (default as `moeplace plan`; 1: none)")
    args = ap.parse_args()
    say = lambda m: print(m, flush=True)  # noqa: E731

    if args.calibrate:
        from dataclasses import replace

        from traces import datasets
        from traces.synthetic import ESFT_CALIBRATED, calibrate

        spec, info = calibrate(datasets.load(), start=replace(ESFT_CALIBRATED))
        print(spec)
        print(json.dumps(info, indent=2))
        return
    result: dict = {"machine": f"{os.cpu_count()} CPU cores (shared)", "tokens": args.tokens}
    if args.profiles:
        result["profiles"] = profiles_experiment(args.cache, args.tokens // 2, max(args.gpus), args.gpus_per_node,
                                                 max(args.redundant), args.time_limit, say)
    else:
        from placement.evaluate import prepare
        from traces.synthetic import routing_stats

        t = time.perf_counter()
        tr = v3_trace(args.tokens, args.cache, seed=args.seed)
        say(f"trace {tr.expert_ids.shape} ready in {time.perf_counter() - t:.1f}s; stats {routing_stats(tr)}")
        fit, held = tr.split_by_sequence(0.5, seed=args.seed)
        held_ev = prepare(held)
        rows = result["rows"] = []
        for gpus in args.gpus:
            for red in args.redundant:
                if (tr.num_experts + red) % gpus:
                    say(f"{gpus} GPUs, {red} redundant slots: {tr.num_experts + red} slots do not split over the GPUs, "
                        f"skipped")
                    continue
                say(f"{gpus} GPUs ({gpus // args.gpus_per_node} nodes), {red} redundant slots")
                rows += run_config(fit, held_ev, gpus, args.gpus_per_node, red, args.solvers.split(","), args.dataflow,
                                   args.time_limit, args.seed, say, args.resamples)
                if args.json:
                    args.json.write_text(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
