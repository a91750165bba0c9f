"""torch.distributed runtime benchmark (issue 8): measured all-to-all bytes and layer time per plan, W = 2/4/8.

Fits plans on half the sequences of the bundled DeepSeek-V2-Lite ESFT trace (seed 0), replays about
``--tokens`` tokens of the other half (whole sequences) through the expert-parallel runtime
(:mod:`placement.runtime`) on W local ranks, and prints, per plan and dataflow, the bytes counted from the split
sizes actually exchanged, the prediction (the evaluator for the standard dataflow,
``placement.coherent.coherent_traffic`` for the coherent one) and the time per MoE layer (slowest rank, median
and range over the repetitions).

Plans: contiguous, and an affinity plan: the ``joint`` solver (default) or, with ``--affinity-plan greedy``, the
co-activation greedy below (Occult-style: experts often chosen together share a GPU; the first recorded table).

``--comm nccl,deepep-normal,deepep-ll`` runs the standard dataflow with each all-to-all protocol (the coherent
dataflow with nccl only) and ``--gpus-per-node N`` puts the W ranks in W / N nodes (plans made for that topology);
the table then also gives the bytes per link class, NVLink (inside a node) and RDMA (across nodes), measured and
predicted by the evaluator under the same communication model (``moeplace evaluate --comm``).

Usage::

    PYTHONPATH=. python benchmarks/runtime_bytes.py [--worlds 2,4,8] [--tokens 2048] [--backend gloo] [--json FILE]
    PYTHONPATH=. python benchmarks/runtime_bytes.py --worlds 4,8 --gpus-per-node 2 --comm nccl,deepep-normal,deepep-ll
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def coactivation_greedy(fit, gpus: int) -> np.ndarray:
    """``[L, E]`` per layer, experts (heaviest first) join the GPU with room whose experts they are most often
    chosen with by the same token (ties: the lighter GPU); E / G experts per GPU."""
    E, L = fit.num_experts, fit.num_layers
    ids = fit.expert_ids.astype(np.int64)
    cap = E // gpus
    out = np.zeros((L, E), dtype=np.int64)
    for l in range(L):
        a = ids[:, l]
        load = np.bincount(a[a >= 0], minlength=E).astype(float)
        co = np.zeros((E, E))
        for i in range(a.shape[1]):
            for j in range(a.shape[1]):
                if i != j:
                    ok = (a[:, i] >= 0) & (a[:, j] >= 0)
                    np.add.at(co, (a[ok, i], a[ok, j]), 1.0)
        groups: list[list[int]] = [[] for _ in range(gpus)]
        gl = np.zeros(gpus)
        for e in np.argsort(-load, kind="stable"):
            best = max((g for g in range(gpus) if len(groups[g]) < cap),
                       key=lambda g: (co[e, groups[g]].sum() if groups[g] else 0.0, -gl[g]))
            groups[best].append(int(e))
            gl[best] += load[e]
        out[l] = np.concatenate(groups)
    return out


def make_plans(fit, gpus: int, time_limit: float, affinity_plan: str = "joint", gpus_per_node: int | None = None):
    from placement.plan import Plan
    from placement.problem import build_problem
    from solvers import Options, Topology, solve

    topo = Topology.for_experts(fit.num_experts, gpus, gpus_per_node=gpus_per_node)
    problem = build_problem(fit, topo)
    mk = lambda res: Plan.from_result(res, fit.num_experts, topo, fit.moe_layer_index, fit.decoder_layers)  # noqa: E731
    plans = [mk(solve("contiguous", problem, Options()))]
    if affinity_plan == "greedy":
        plans.append(Plan(coactivation_greedy(fit, gpus), fit.num_experts, topo, fit.moe_layer_index,
                          fit.decoder_layers, solver={"name": "coactivation-greedy", "status": "heuristic"}))
    else:
        plans.append(mk(solve(affinity_plan, problem, Options(time_limit=time_limit, threads=2, seed=0))))
    return plans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden-size", type=int, default=2048)
    ap.add_argument("--intermediate-size", type=int, default=16)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--time-limit", type=float, default=60.0, help="solver time limit for the affinity plan")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--affinity-plan", default="joint", help="solver of the affinity plan, or 'greedy'")
    ap.add_argument("--comm", default="nccl", help="all-to-all protocols, comma-separated: nccl, deepep-normal, "
                    "deepep-ll")
    ap.add_argument("--gpus-per-node", type=int, default=None, help="ranks per node (default: all in one)")
    ap.add_argument("--json", help="also write every row as JSON to this file")
    args = ap.parse_args()
    comms = args.comm.split(",")

    from placement.commands.bench import predictions
    from placement.evaluate import evaluate
    from placement.runtime import DTYPE_BYTES, BenchSpec, run_bench, select_tokens
    from traces import datasets

    trace = datasets.load()
    fit, held = trace.split_by_sequence(0.5, seed=args.seed)
    sub = select_tokens(held, args.tokens, seed=args.seed)
    rows = []
    t_start = time.perf_counter()
    for W in [int(w) for w in args.worlds.split(",")]:
        n = min(args.gpus_per_node or W, W)
        plans = make_plans(fit, W, args.time_limit, args.affinity_plan, n)
        by_name = {p.name: p for p in plans}
        evals = {p.name: evaluate(p, sub)["overall"] for p in plans}
        for comm in comms:
            spec = BenchSpec(plans=[p.to_dict() for p in plans], names=[p.name for p in plans],
                             expert_ids=sub.expert_ids, gate_weights=sub.gate_weights,
                             sequence_index=sub.sequence_index(), hidden_size=args.hidden_size,
                             intermediate_size=args.intermediate_size, dtype=args.dtype, repeats=args.repeats,
                             warmup=1, dataflows=("standard", "coherent") if comm == "nccl" else ("standard",),
                             backend=args.backend, seed=args.seed, comm=comm)
            t0 = time.perf_counter()
            res = run_bench(spec, W, threads=max(1, (os.cpu_count() or 1) // W))
            secs = time.perf_counter() - t0
            for r in res:
                plan = by_name[r["plan"]]
                pred = predictions(plan, sub, args.hidden_size, DTYPE_BYTES[args.dtype], r["dataflow"], comm)
                ev = evals[r["plan"]]
                rows.append({"world_size": W, "gpus_per_node": n, "plan": r["plan"], "dataflow": r["dataflow"],
                             "comm": comm, "measured": r["measured"], "predicted": pred,
                             "load_imbalance": ev["load_imbalance"], "affinity_locality": ev["affinity_locality"],
                             "run_seconds": secs})
            print(f"# W={W} ({W // n} x {n}) {comm}: {secs:.0f}s", flush=True)
    total = time.perf_counter() - t_start
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": sub.num_tokens, "sequences": sub.num_sequences, "args": vars(args), "rows": rows}, f,
                      indent=1)
    base = {(r["world_size"], r["dataflow"], r["comm"]): r["measured"]["a2a_bytes"] for r in rows
            if r["plan"] == "contiguous"}
    print(f"\nbundled DeepSeek-V2-Lite ESFT trace: plans fitted on {fit.num_tokens} tokens, replayed on "
          f"{sub.num_tokens} held-out tokens ({sub.num_sequences} sequences) x {sub.num_layers} MoE layers; hidden "
          f"{args.hidden_size} {args.dtype}, expert width {args.intermediate_size}; {args.backend}, "
          f"{args.repeats} timed passes after 1 warm-up; {os.cpu_count()} cores "
          f"({platform.processor() or platform.machine()}); {total:.0f}s in all\n")
    print("| W | nodes | plan | dataflow | comm | measured a2a MB | predicted MB | diff | NVLink MB measured / "
          "predicted | RDMA MB measured / predicted | vs contiguous | ms/layer median (min-max) | a2a ms/pass median "
          "| load imbalance | affinity locality |")
    print("|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        m, p = r["measured"], r["predicted"]
        diff = (m["a2a_bytes"] - p["a2a_bytes"]) / p["a2a_bytes"] * 100 if p["a2a_bytes"] else 0.0
        sp = m["seconds_per_layer"]
        a2a = m["a2a_seconds_per_pass_slowest_rank"]
        print(f"| {r['world_size']} | {r['world_size'] // r['gpus_per_node']}x{r['gpus_per_node']} | {r['plan']} | "
              f"{r['dataflow']} | {r['comm']} | {m['a2a_bytes'] / 1e6:.2f} | {p['a2a_bytes'] / 1e6:.2f} | "
              f"{diff:+.2f}% | {m['nvlink_bytes'] / 1e6:.2f} / {p['nvlink_bytes'] / 1e6:.2f} | "
              f"{m['rdma_bytes'] / 1e6:.2f} / {p['rdma_bytes'] / 1e6:.2f} | "
              f"{m['a2a_bytes'] / base[(r['world_size'], r['dataflow'], r['comm'])]:.3f}x | "
              f"{sp['median'] * 1e3:.1f} ({sp['min'] * 1e3:.1f}-{sp['max'] * 1e3:.1f}) | {a2a['median'] * 1e3:.0f} | "
              f"{r['load_imbalance']:.3f} | {r['affinity_locality']:.3f} |")

if __name__ == "__main__":
    main()
