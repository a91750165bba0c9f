"""How well the counts model (what the joint planner optimises) tracks the exact per-token replay.

    PYTHONPATH=. python benchmarks/counts_vs_exact.py                 # 8 GPUs, 16 and 0 redundant slots
    PYTHONPATH=. python benchmarks/counts_vs_exact.py --redundant 8 --time-limit 5
    PYTHONPATH=. python benchmarks/counts_vs_exact.py --v3            # DeepSeek-V3 size, 64 GPUs, 64 redundant
    PYTHONPATH=. python benchmarks/counts_vs_exact.py --dataflow standard --gpus 8 --redundant 0 16
    PYTHONPATH=. python benchmarks/counts_vs_exact.py --dataflow standard --gpus 16 --redundant 16 \
        --joint-param chain_start=true

``--dataflow standard`` compares the standard replay with homes spread evenly (as the model assumes) and shows,
for each plan, the model with distinct tokens counted on the fitted tokens and with the pairwise estimate; the
joint plan is solved with each (``token_distinct`` true / false). Columns there: counts/exact of both models on
the fitted half, the held-out standard time with even homes and with sequence homes, GPUs per token-layer.

On the bundled DeepSeek-V2-Lite trace (fit on half the sequences, held out on the other half), for the contiguous,
EPLB (global) and joint (coherent) plans: the counts objective over the exact replay on the fitted trace
(:func:`placement.coherent.evaluate_coherent`; also the compute and the all-to-all seconds each summed over GPUs
and layers, model over replay), the exact held-out coherent MoE time per token, the served-load
imbalance of the replay, and the solve seconds. ``--v3`` does the same on the calibrated DeepSeek-V3-size synthetic
trace of ``benchmarks/joint_scale.py`` (64 GPUs, 8 per node, 64 redundant slots, V3 sizes, 120 s limit).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--redundant", type=int, nargs="*", default=[16, 0])
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--solvers", default="contiguous,eplb-global,joint")
    ap.add_argument("--v3", action="store_true", help="DeepSeek-V3-size synthetic trace instead of the bundled one")
    ap.add_argument("--dataflow", choices=["coherent", "standard"], default="coherent")
    ap.add_argument("--joint-param", action="append", default=[], metavar="KEY=VALUE",
                    help="joint planner parameter, as `moeplace plan --param` (repeatable; --dataflow standard)")
    args = ap.parse_args()
    if args.dataflow == "standard":
        return standard(args)

    from placement.coherent import evaluate_coherent
    from placement.plan import Plan
    from placement.problem import build_problem
    from solvers import Options, Topology, solve
    from solvers.cost import CostModel
    from solvers.joint import State, prepare
    from traces import datasets

    if args.v3:
        import os
        from pathlib import Path

        from joint_scale import v3_trace

        trace = v3_trace(32768, Path(os.environ.get("TMPDIR", "/tmp")) / "moeplace-bench")
        args.gpus, args.redundant, args.time_limit = 64, [64], 120.0
        gpn, groups, params = 8, 8, {"dataflow": "coherent", "model": "deepseek-v3"}
        cost = CostModel.preset("deepseek-v3", dataflow="coherent")
    else:
        trace = datasets.load()
        gpn, groups, params = None, 1, {"dataflow": "coherent"}
        cost = CostModel(dataflow="coherent")
    from placement.evaluate import prepare as prepare_eval

    fit, held = trace.split_by_sequence(0.5, seed=0)
    fit_ev, held_ev = prepare_eval(fit), prepare_eval(held)  # once: every plan is replayed on the same tokens
    for red in args.redundant:
        topo = Topology.for_experts(fit.num_experts, args.gpus, red, gpn)
        problem = build_problem(fit, topo, expert_groups=groups)
        opts = Options(time_limit=args.time_limit, threads=1, params=params)
        data = prepare(problem, opts)
        for name in args.solvers.split(","):
            t = time.perf_counter()
            res = solve(name, problem, opts if name == "joint" else Options())
            secs = time.perf_counter() - t
            plan = Plan.from_result(res, fit.num_experts, topo, fit.moe_layer_index, fit.decoder_layers, fit.model)
            exact = evaluate_coherent(plan, fit_ev, cost)
            out = evaluate_coherent(plan, held_ev, cost)
            state = State(data, res.phy2log)
            ratio = state.objective() / exact["est_moe_seconds"]
            ex_compute, ex_comm = coherent_parts(plan, fit_ev, cost)
            compute = state.alpha * state.Lg[:, 0]  # [L, G]
            comm = float((state.tg[:, 0] - compute).sum()) / ex_comm
            print(f"{args.gpus} GPUs +{red:3d} redundant  {name:12s} counts/exact {ratio:.3f} (summed over GPUs: "
                  f"compute {compute.sum() / ex_compute:.3f}, all-to-all {comm:.3f})  held-out "
                  f"{out['est_moe_us_per_token']:.4f} us/token  served imbalance {exact['served_imbalance']:.3f}  "
                  f"solve {secs:5.1f}s", flush=True)


def coherent_parts(plan, ev, cost) -> tuple[float, float]:
    """Compute and all-to-all seconds of the exact coherent replay on ``ev`` (:func:`placement.evaluate.prepare`),
    each summed over GPUs and layers (the counts model's slowest-GPU time can be off while these sums are right,
    or the other way round)."""
    from placement.coherent import coherent_traffic
    from solvers.cost import phase_seconds

    tr = coherent_traffic(plan.phy2log, plan.num_experts, plan.topology, ev.expert_ids, None, ev.sequence_index)
    B = cost.token_bytes
    comm = sum(float((phase_seconds(tr["dispatch_pairs"][l] * B, plan.topology)
                      + phase_seconds(tr["combine_pairs"][l] * B, plan.topology)).sum())
               for l in range(plan.num_layers))
    return float(tr["served"].sum()) * cost.seconds_per_assignment, comm


def standard(args) -> None:
    from dataclasses import replace

    import numpy as np

    from placement.evaluate import evaluate, prepare as prepare_eval
    from placement.plan import Plan
    from placement.problem import build_problem
    from solvers import Options, Topology, solve
    from solvers.cost import CostModel
    from solvers.joint import objective_of, prepare
    from traces import datasets

    from placement.commands.plan import parse_params

    extra = parse_params(args.joint_param)
    fit, held = datasets.load().split_by_sequence(0.5, seed=0)
    even = lambda t: prepare_eval(replace(t, seq_id=np.arange(t.num_tokens), pos_in_seq=None))  # noqa: E731
    fit_even, held_even, held_seq = even(fit), even(held), prepare_eval(held)
    cost = CostModel()
    print("| GPUs + redundant | plan | counted / exact | pairwise / exact | held-out even homes us/token | "
          "held-out sequence homes | GPUs/token (held-out) | solve s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for red in args.redundant:
        topo = Topology.for_experts(fit.num_experts, args.gpus, red, 8)
        problem = build_problem(fit, topo, expert_groups=8 if args.gpus > 8 else 1)
        counted = prepare(problem, Options(params={"dataflow": "standard", "token_distinct": True}))
        pairwise = prepare(problem, Options(params={"dataflow": "standard", "token_distinct": False}))
        for name, tokd in [(n, None) for n in args.solvers.split(",") if n != "joint"] + [("joint", True),
                                                                                             ("joint", False)]:
            opts = Options(time_limit=args.time_limit, threads=1,
                           params={**extra, "dataflow": "standard", "token_distinct": tokd})
            t = time.perf_counter()
            res = solve(name, problem, opts if name == "joint" else Options())
            secs = time.perf_counter() - t
            plan = Plan.from_result(res, fit.num_experts, topo, fit.moe_layer_index, fit.decoder_layers, fit.model)
            exact = evaluate(plan, fit_even, cost)["overall"]["est_moe_seconds"]
            he, hs = evaluate(plan, held_even, cost)["overall"], evaluate(plan, held_seq, cost)["overall"]
            label = name if tokd is None else f"joint ({'counted' if tokd else 'pairwise'} distinct tokens)"
            print(f"| {args.gpus} + {red} | {label} | {objective_of(counted, res.phy2log) / exact:.3f} | "
                  f"{objective_of(pairwise, res.phy2log) / exact:.3f} | {he['est_moe_us_per_token']:.4f} | "
                  f"{hs['est_moe_us_per_token']:.4f} | {he['dispatch_gpus']:.3f} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
