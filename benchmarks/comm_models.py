"""Every solver under the kernels users run: nccl, DeepEP normal (prefill) and DeepEP low-latency (decode).

    PYTHONPATH=. python benchmarks/comm_models.py v3          # DeepSeek-V3 size: prefill and decode
    PYTHONPATH=. python benchmarks/comm_models.py bundled     # the bundled trace at 8 and 16 GPUs, all three models
    PYTHONPATH=. python benchmarks/comm_models.py v3 --solvers contiguous,eplb-hierarchical,eplb-global,joint

Plans are fitted on half the sequences and judged on the other half, every solver refitted per model; the joint
planner optimises the model of the row (``--comm``, and the decode roofline with ``--tokens-per-gpu``), the
reference solvers are what they are. Columns: held-out load imbalance, NVLink and RDMA bytes per token (dispatch plus
combine, summed over MoE layers), estimated MoE time per token under the row's model and its ratio to the better
EPLB policy, and ``counts/exact``: the counts model's estimate of the same plan on the same held-out tokens (what the
planner optimises: homes spread evenly, Poisson arrivals per step) over the exact per-token evaluation.

- ``v3``: calibrated synthetic DeepSeek-V3 tokens (58 MoE layers x 256 experts, 8 groups of which 4 per token),
  64 GPUs in 8 nodes with 64 redundant slots; prefill = ``deepep-normal`` (16384 tokens per GPU), decode =
  ``deepep-ll`` with 128 tokens per GPU (memory-bound experts), plus the nccl model for reference.
- ``bundled``: the DeepSeek-V2-Lite ESFT trace at 8 GPUs (one node) and 16 GPUs (2 nodes of 8, 16 redundant slots)
  under the three models.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from joint_scale import v3_trace  # noqa: E402

REFERENCES = ["contiguous", "eplb-hierarchical", "eplb-global", "exflow", "moetuner"]
PHASES = {"prefill": {"comm": "deepep-normal", "tokens_per_gpu": 16384},
          "decode": {"comm": "deepep-ll", "tokens_per_gpu": 128},
          "nccl": {"comm": "nccl", "tokens_per_gpu": None}}


def counts_estimate(plan, held, cost) -> float:
    """The counts model's seconds for ``plan`` on the held-out tokens' own statistics (what the planner optimises)."""
    from placement.affinity import AffinityStats
    from solvers.cost import estimate_layer_seconds

    st = AffinityStats.from_trace(held, baselines=False)
    tokens = st.tokens
    routes = held.sorted_by_gate().expert_ids
    return float(estimate_layer_seconds(plan.phy2log, st.load, plan.topology, cost, None, st.coactivation, None,
                                        tokens, routes=routes).sum())


def run(fit, held, topo, groups: int, phase: str, solvers: list[str], time_limit: float, model: str,
        say) -> list[dict]:
    from placement.evaluate import evaluate, prepare
    from placement.plan import Plan
    from placement.problem import build_problem
    from solvers import Options, SolverInputError, solve
    from solvers.cost import CostModel

    cost = CostModel.preset(model, **PHASES[phase])
    problem = build_problem(fit, topo, expert_groups=groups)
    joint_problem = build_problem(fit, topo, expert_groups=groups, resamples=8, seed=0)
    ev = prepare(held)
    rows = []
    for name in solvers:
        params = {"model": model, **{k: v for k, v in PHASES[phase].items() if v is not None}}
        t = time.perf_counter()
        try:
            res = solve(name, joint_problem if name == "joint" else problem,
                        Options(time_limit=time_limit, seed=0, threads=1, params=params))
        except SolverInputError as exc:
            say(f"  {name}: {exc}")
            continue
        secs = time.perf_counter() - t
        plan = Plan.from_result(res, fit.num_experts, topo, fit.moe_layer_index, fit.decoder_layers, fit.model)
        o = evaluate(plan, ev, cost)["overall"]
        est = counts_estimate(plan, held, cost)
        row = {"phase": phase, "gpus": topo.num_gpus, "nodes": topo.num_nodes,
               "redundant": topo.num_slots - fit.num_experts, "solver": name, "seconds": secs,
               "imbalance": o["load_imbalance"], "nvlink_bytes": o["nvlink_bytes"], "rdma_bytes": o["rdma_bytes"],
               "us_per_token": o["est_moe_us_per_token"], "counts/exact": est / o["est_moe_seconds"],
               "dispatch_nodes": o["dispatch_nodes"]}
        rows.append(row)
        say(f"  {phase:8s} {name:18s} {secs:6.1f}s imb {row['imbalance']:.3f} nv {row['nvlink_bytes']:.4g} "
            f"rdma {row['rdma_bytes']:.4g} {row['us_per_token']:.3f} us/tok counts/exact {row['counts/exact']:.3f}")
    eplb = [r for r in rows if r["solver"].startswith("eplb")]
    if eplb:
        best = min(eplb, key=lambda r: r["us_per_token"])
        for r in rows:
            r["x best EPLB"] = r["us_per_token"] / best["us_per_token"]
            r["rdma x best EPLB"] = r["rdma_bytes"] / best["rdma_bytes"] if best["rdma_bytes"] else None
            r["imbalance x best EPLB"] = r["imbalance"] / best["imbalance"]
    return rows


def table(rows: list[dict]) -> str:
    cols = ["phase", "gpus", "solver", "imbalance", "nvlink_bytes", "rdma_bytes", "us_per_token", "x best EPLB",
            "rdma x best EPLB", "counts/exact", "seconds"]
    out = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    from solvers import Topology
    from traces import datasets

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("section", choices=["v3", "bundled"])
    ap.add_argument("--solvers", default=",".join(REFERENCES + ["joint"]))
    ap.add_argument("--time-limit", type=float, default=60.0, help="every solver's limit (the joint planner's too)")
    ap.add_argument("--tokens", type=int, default=60000, help="V3 tokens (half fitted)")
    ap.add_argument("--phases", default="prefill,decode,nccl")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("MOEPLACE_BENCH_CACHE", "/tmp/moeplace-bench")))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    solvers = args.solvers.split(",")
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    if args.section == "v3":
        trace = v3_trace(args.tokens, args.cache)
        fit, held = trace.split_by_sequence(0.5, seed=0)
        topo = Topology.for_experts(256, 64, 64, gpus_per_node=8)
        for phase in args.phases.split(","):
            rows += run(fit, held, topo, 8, phase, solvers, args.time_limit, "deepseek-v3", say)
    else:
        fit, held = datasets.load().split_by_sequence(0.5, seed=0)
        for gpus, gpn, red in ((8, 8, 0), (16, 8, 16)):
            topo = Topology.for_experts(64, gpus, red, gpus_per_node=gpn)
            for phase in args.phases.split(","):
                rows += run(fit, held, topo, 8, phase, solvers, args.time_limit, "deepseek-v2-lite", say)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
