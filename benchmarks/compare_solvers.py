"""Reference solvers side by side on the bundled real trace (issue 3).

Fits every solver on half of the sequences of the bundled DeepSeek-V2-Lite ESFT trace (split by ``seq_id``) and
evaluates the plans on the other half with :func:`placement.evaluate.evaluate`, for 4, 8 and 16 GPUs; prints a
markdown table of the held-out metrics and solve times, and the same as ratios to the contiguous placement.
"pair tail/token" is MoETuner's objective measured on the held-out half: the sum over layer boundaries of the
heaviest GPU-pair transition traffic (inter-node pairs weighted by the bandwidth ratio), per token.

A second part times DeepSeek EPLB at DeepSeek-V3 scale: a ``[58, 256]`` count matrix (58 MoE layers, 256
experts, top-8), 32 GPUs in 4 nodes, 32 redundant slots, 8 expert groups. The counts are calibrated on the real
trace: each layer takes the sorted load shares of one real layer, interpolated to 256 experts and shuffled.

    PYTHONPATH=. python benchmarks/compare_solvers.py [--time-limit 60] [--gpus 4 8 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from placement.affinity import AffinityStats
from placement.evaluate import evaluate
from placement.plan import Plan
from placement.problem import build_problem
from solvers import Options, Topology, solve
from solvers.eplb import rebalance_experts
from solvers.moetuner import link_weights
from solvers.objective import replica_counts
from traces import datasets

SOLVERS = [  # (label, solver, params)
    ("contiguous", "contiguous", {}),
    ("round-robin", "round-robin", {}),
    ("eplb", "eplb", {}),
    ("exflow", "exflow", {}),
    ("exflow top-1", "exflow", {"top1": True}),
    ("moetuner", "moetuner", {}),
]
METRICS = [  # (key in evaluate()["overall"], column label, lower is better)
    ("load_imbalance", "load imb.", True),
    ("cross_gpu_fraction", "cross-GPU", True),
    ("affinity_locality_top1", "top-1 local", False),
    ("inter_node_fraction", "inter-node", True),
    ("dispatch_gpus", "GPUs/token", True),
    ("a2a_bytes_per_token", "a2a B/token", True),
    ("est_moe_us_per_token", "est. us/token", True),
    ("pair_tail_per_token", "pair tail/token", True),
]


def pair_tail(phy2log, transitions, topo, tokens):
    """MoETuner's objective on any plan: sum over boundaries of the heaviest GPU-pair transition traffic
    (inter-node pairs weighted by the bandwidth ratio), per token; replicas split traffic evenly."""
    L, E = phy2log.shape[0], transitions.shape[1]
    cnt = replica_counts(phy2log, E)
    share = np.zeros((L, E, topo.num_gpus))
    for l in range(L):
        np.add.at(share[l], (phy2log[l], topo.gpu_of_slot()), 1.0 / cnt[l][phy2log[l]])
    w = link_weights(topo)
    return float(sum((share[l].T @ transitions[l] @ share[l + 1] * w).max() for l in range(L - 1)) / tokens)


def run(gpus_list, time_limit, threads, redundant_per_gpu=0):
    trace = datasets.load()
    fit, held = trace.split_by_sequence(0.5, seed=0)
    held_transitions = AffinityStats.from_trace(held).transitions
    rows = []
    for G in gpus_list:
        gpn = min(G, 8)  # 8 GPUs per node, as on H100 servers
        topo = Topology.for_experts(fit.num_experts, G, redundant_per_gpu * G, gpus_per_node=gpn)
        problem = build_problem(fit, topo)
        for label, name, params in SOLVERS:
            t0 = time.perf_counter()
            result = solve(name, problem, Options(time_limit=time_limit, threads=threads, params=params))
            seconds = time.perf_counter() - t0
            plan = Plan.from_result(result, fit.num_experts, topo, fit.moe_layer_index, fit.decoder_layers, fit.model)
            metrics = evaluate(plan, held)["overall"]
            metrics["pair_tail_per_token"] = pair_tail(result.phy2log, held_transitions, topo, held.num_tokens)
            rows.append({"gpus": G, "gpus_per_node": gpn, "redundant": redundant_per_gpu * G, "solver": label,
                         "seconds": seconds, "status": result.status, "objective": result.objective,
                         "bound": result.bound, "gap": result.gap,
                         **{k: metrics[k] for k, _, _ in METRICS}})
            print(f"  {G} GPUs {label:13s} {seconds:6.1f}s {result.status}", flush=True)
    return rows


def table(rows, ratios=False) -> str:
    head = ["GPUs", "solver"] + [lab for _, lab, _ in METRICS] + ([] if ratios else ["solve s", "gap"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {r["gpus"]: r for r in rows if r["solver"] == "contiguous"}
    for r in rows:
        cells = [str(r["gpus"]), r["solver"]]
        for k, _, _ in METRICS:
            v = r[k]
            if ratios:
                b = base[r["gpus"]][k]
                cells.append("-" if v is None or not b else f"{v / b:.3f}")
            else:
                cells.append("-" if v is None else (f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"))
        if not ratios:
            cells += [f"{r['seconds']:.1f}", "-" if r["gap"] is None else f"{r['gap']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def v3_counts(seed=0, layers=58, experts=256, tokens=8192, top_k=8):
    """``[58, 256]`` counts calibrated on the real trace (sorted load shares of real layers, interpolated)."""
    real = datasets.load().load_profile().logical_count[0]  # [26, 64]
    rng = np.random.default_rng(seed)
    out = np.empty((layers, experts))
    for l in range(layers):
        shares = np.sort(real[l % real.shape[0]])[::-1] / real[l % real.shape[0]].sum()
        curve = np.interp(np.linspace(0, 1, experts), np.linspace(0, 1, len(shares)), shares)
        out[l] = rng.permutation(np.round(curve / curve.sum() * tokens * top_k))
    return out


def eplb_scale(repeats=5):
    counts = v3_counts()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rebalance_experts(counts, 256 + 32, 8, 4, 32)
        times.append(time.perf_counter() - t0)
    return {"shape": list(counts.shape), "gpus": 32, "nodes": 4, "redundant": 32, "groups": 8,
            "best_s": min(times), "median_s": float(np.median(times))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--redundant-per-gpu", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; "
          f"load average {os.getloadavg()[0]:.1f}")
    scale = eplb_scale()
    print(f"EPLB [58, 256], 32 GPUs / 4 nodes / 32 redundant / 8 groups: best {scale['best_s'] * 1e3:.1f} ms, "
          f"median {scale['median_s'] * 1e3:.1f} ms")
    rows = run(args.gpus, args.time_limit, args.threads, args.redundant_per_gpu)
    print("\nHeld-out metrics\n")
    print(table(rows))
    print("\nRatios to contiguous (held-out)\n")
    print(table(rows, ratios=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"eplb_scale": scale, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
