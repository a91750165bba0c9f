"""Where the joint planner's gap comes from at DeepSeek-V3 size (standard dataflow).

    PYTHONPATH=. python benchmarks/joint_gap.py                      # 64 GPUs / 8 nodes / 64 redundant, 120 s
    PYTHONPATH=. python benchmarks/joint_gap.py --gpus 32 --redundant 32
    PYTHONPATH=. python benchmarks/joint_gap.py --bound-lp 120   # and the bound with triangle cuts (+120 s)

Plans the calibrated V3-size synthetic trace of ``benchmarks/joint_scale.py`` (fitted half) with the joint planner
and splits its counts objective against the bound (:mod:`solvers.joint_bound`) into the terms that make the gap:
the slowest vs the mean GPU, summed over layers (the bound can only use the mean); distinct GPUs per token-layer
(counted on the fitted tokens as the planner does, the pairwise estimate, the provable pair floor, and the floor the
bound assumes); co-activated expert pairs per token-layer that share a GPU (the plan vs the b-matching bound).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--redundant", type=int, default=64)
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "moeplace-bench")
    ap.add_argument("--bound-lp", type=float, default=0.0, help="after the solve, spend this many seconds on the "
                    "triangle-cut pair bound (solvers.joint_bound.max_colocated_pairs_lp) and report its gap")
    args = ap.parse_args()

    from joint_scale import v3_trace
    from placement.problem import build_problem
    from solvers import Options, Topology, solve
    from solvers.joint import State, prepare
    from solvers.joint_bound import dawson_sankoff, layer_bounds, pair_allowance, total_bound

    fit, _ = v3_trace(args.tokens, args.cache).split_by_sequence(0.5, seed=0)
    topo = Topology.for_experts(fit.num_experts, args.gpus, args.redundant, args.gpus_per_node)
    problem = build_problem(fit, topo, expert_groups=8)
    opts = Options(time_limit=args.time_limit, threads=1, params={"model": "deepseek-v3", "dataflow": "standard"})
    t = time.perf_counter()
    res = solve("joint", problem, opts)
    print(f"joint (standard) on {args.gpus} GPUs / {topo.num_nodes} nodes / {args.redundant} redundant: "
          f"{time.perf_counter() - t:.1f} s, objective {res.objective * 1e3:.2f} ms, bound {res.bound * 1e3:.2f} ms, "
          f"gap {res.gap:.3f}")
    data = prepare(problem, opts)
    st = State(data, res.phy2log)
    # the pair terms (duplicates, pairwise estimate) from the same plan under the pairwise model
    pw = State(prepare(problem, Options(params={**opts.params, "token_distinct": False})), res.phy2log)
    tg = st.tg[:, 0, :]  # [L, G] seconds per GPU (one profile)
    tokens = data.tokens
    Lg = st.Lg[:, 0, :]
    floor = np.maximum(Lg - pw.dup, 0.0)
    kirkwood = np.maximum(floor, tokens[:, None] * -np.expm1(np.minimum(pw.logp0, 0.0)))
    counted = st.Dt if st.Dt is not None else kirkwood
    m = topo.slots_per_gpu
    dup_max = pair_allowance(data.C, m)
    per_tok = lambda x: float((x / tokens).mean())  # noqa: E731  mean over layers of a per-token quantity
    total = Lg.sum(axis=1)
    # the distinct-token floor the bound uses: Dawson-Sankoff when the objective counts tokens, else load - pairs
    floor_of = (lambda pairs: dawson_sankoff(total, pairs)) if st.Dt is not None else (lambda pairs: total - pairs)
    rows = [("slowest GPU, summed over layers (ms)", f"{tg.max(axis=1).sum() * 1e3:.2f}",
             f"{tg.mean(axis=1).sum() * 1e3:.2f} (mean GPU)"),
            ("distinct GPUs per token-layer", f"{per_tok(counted.sum(axis=1)):.2f} (pairwise estimate "
             f"{per_tok(kirkwood.sum(axis=1)):.2f}; pair floor {per_tok(floor.sum(axis=1)):.2f})",
             f"{per_tok(floor_of(dup_max)):.2f}"),
            ("co-activated pairs sharing a GPU per token-layer", f"{per_tok(pw.dup.sum(axis=1)):.2f}",
             f"{per_tok(dup_max):.2f} (b-matching)")]
    if args.bound_lp > 0:
        t = time.perf_counter()
        lp_max = pair_allowance(data.C, m, args.bound_lp)
        rows.append(("co-activated pairs sharing a GPU per token-layer", f"{per_tok(pw.dup.sum(axis=1)):.2f}",
                     f"{per_tok(lp_max):.2f} (b-matching + triangle cuts)"))
        rows.append(("distinct GPUs per token-layer", "", f"{per_tok(floor_of(lp_max)):.2f} (with triangle cuts)"))
        lb = total_bound(layer_bounds(data.loads, topo, data.cost, data.T, data.C, data.Q, max_replicas=topo.num_gpus,
                                      dup_max=lp_max, counted=data.ids is not None,
                                      token_positions=data.pos_ids is not None), data.worst)
        print(f"with triangle cuts ({time.perf_counter() - t:.1f} s): bound {lb * 1e3:.2f} ms, gap "
              f"{(res.objective - lb) / res.objective:.3f}")
    print(f"{'term':50s} {'plan':>40s}  bound assumes")
    for name, plan, bound in rows:
        print(f"{name:50s} {plan:>40s}  {bound}")


if __name__ == "__main__":
    main()
