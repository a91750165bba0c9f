"""Where the joint planner's gap comes from at DeepSeek-V3 size (standard dataflow).

    PYTHONPATH=. python benchmarks/joint_gap.py                      # 64 GPUs / 8 nodes / 64 redundant, 120 s
    PYTHONPATH=. python benchmarks/joint_gap.py --gpus 32 --redundant 32
    PYTHONPATH=. python benchmarks/joint_gap.py --bound-lp 120   # and the bound with triangle cuts (+120 s)
    PYTHONPATH=. python benchmarks/joint_gap.py --resamples 1    # plan on the fitted sample alone

Plans the calibrated V3-size synthetic trace of ``benchmarks/joint_scale.py`` (fitted half) with the joint planner
and splits its counts objective against the bound (:mod:`solvers.joint.bound`) into the terms that make the gap:
the slowest vs the mean GPU, summed over layers (the bound can only use the mean); distinct GPUs per token-layer
(counted on the fitted tokens as the planner does, the pairwise estimate, the provable pair floor, and the floor the
bound assumes); co-activated expert pairs per token-layer that share a GPU (the plan vs the b-matching bound).

It then asks how far any bound of this kind could go. The bound takes the mean GPU and must grant the copies that
co-location saves (duplicates) in every placement, however unbalanced. A placement that groups co-activated experts
on GPUs with no regard to load (:func:`max_dup_grouping`, :func:`grouping_placement`) is one of them: with its
copies in place of the bound's allowance the bound's value is a ceiling that no sharper duplicate allowance can pass
(the ``ceiling`` line and the duplicates row).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from placement.commands.plan import RESAMPLES  # noqa: E402


def max_dup_grouping(ids: np.ndarray, num_experts: int, size: int, seeds: int = 32) -> list[list[int]]:
    """Experts grouped ``size`` at a time for many duplicates of ``ids [T, k]`` (a token with c of its experts in
    one group counts ``c - 1``), greedily and with no regard to load: each group grows from the ``seeds`` remaining
    experts with the most co-activated mass among the remaining ones, adding the expert whose tokens the group
    already covers most; the best of them is kept."""
    T = ids.shape[0]
    inc = np.zeros((num_experts, T), dtype=np.float32)  # [E, T] expert e routes token t
    for j in range(ids.shape[1]):
        ok = ids[:, j] >= 0
        inc[ids[ok, j], np.nonzero(ok)[0]] = 1.0
    co = inc @ inc.T
    np.fill_diagonal(co, 0.0)
    rem = np.ones(num_experts, dtype=bool)
    groups = []
    while rem.any():
        idx = np.nonzero(rem)[0]
        if len(idx) <= size:
            g = [int(a) for a in idx]
        else:
            S = idx[np.argsort(-co[np.ix_(idx, idx)].sum(axis=1))[:seeds]]
            cov = inc[S].copy()  # [seeds, T] tokens each growing group covers
            grp, val = [[int(a)] for a in S], np.zeros(len(S))
            for _ in range(size - 1):
                gain = cov @ inc[idx].T  # [seeds, remaining] tokens of each candidate already covered
                for i, g in enumerate(grp):
                    gain[i, np.searchsorted(idx, g)] = -1.0
                b = gain.argmax(axis=1)
                for i in range(len(S)):
                    grp[i].append(int(idx[b[i]]))
                    val[i] += gain[i, b[i]]
                cov = np.maximum(cov, inc[idx[b]])
            g = grp[int(np.argmax(val))]
        groups.append(g)
        rem[g] = False
    return groups


def grouping_placement(groups: list, load: np.ndarray, topo) -> np.ndarray:
    """``[S]`` a placement (phy2log row) with each group of experts on its own GPU, in order, and the slots left over
    (GPUs beyond the groups, short groups) given to replicas of the least loaded experts ``load [E]``, one per expert
    while they last, each on a GPU that does not hold it yet: a replica splits its expert's tokens between two GPUs,
    and a cold expert's split costs the grouping the fewest duplicates."""
    G, m = topo.num_gpus, topo.slots_per_gpu
    rows = [list(g) for g in groups] + [[] for _ in range(G - len(groups))]
    cold = iter(np.argsort(load, kind="stable").tolist() * m)
    for row in rows:
        while len(row) < m:
            e = next(cold)
            if e not in row:
                row.append(e)
    return np.array([e for row in rows for e in row], dtype=np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--redundant", type=int, default=64)
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "moeplace-bench")
    ap.add_argument("--bound-lp", type=float, default=0.0, help="after the solve, spend this many seconds on the "
                    "triangle-cut pair bound (solvers.joint.bound.max_colocated_pairs_lp) and report its gap")
    ap.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples of the fitted sequences as "
                    f"workload profiles, as `moeplace plan` does (default {RESAMPLES})")
    args = ap.parse_args()

    from joint_scale import v3_trace
    from placement.problem import build_problem
    from solvers import Options, Topology, solve
    from solvers.joint import State, prepare
    from solvers.joint.bound import (dawson_sankoff, layer_bounds, min_max_piece, pair_allowance, standard_mean_comm,
                                     total_bound)

    fit, _ = v3_trace(args.tokens, args.cache).split_by_sequence(0.5, seed=0)
    topo = Topology.for_experts(fit.num_experts, args.gpus, args.redundant, args.gpus_per_node)
    problem = build_problem(fit, topo, expert_groups=8, resamples=args.resamples, seed=0)
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
    # the ceiling of a mean-GPU bound: the copies of a placement that groups co-activated experts, balance ignored
    t = time.perf_counter()
    ids = data.ids  # [L, T, k] the fitted tokens the objective counts on
    Xw = np.stack([grouping_placement(max_dup_grouping(ids[l], data.E, m), data.load[l], topo)
                   for l in range(data.L)])
    wst = State(data, Xw)
    routed = np.array([(ids[l] >= 0).sum() for l in range(data.L)])
    dup_per_tok = lambda D: float(((routed - D.sum(axis=1) / data.tok_factor) / ids.shape[1]).mean())  # noqa: E731
    rows.append(("duplicates per token-layer (a token with c experts on a GPU: c - 1)", f"{dup_per_tok(st.Dt):.2f}",
                 f"{dup_per_tok(wst.Dt):.2f} (a placement grouping co-activated experts, balance ignored)"))
    alpha = data.cost.seconds_per_assignment
    tot = data.loads.sum(axis=2)  # [N, L]
    lb_c = alpha * np.maximum(tot / topo.num_gpus, min_max_piece(data.loads, topo.num_slots, topo.num_gpus))
    lb_m = alpha * tot / topo.num_gpus + standard_mean_comm(data.scale * wst.Dt.sum(axis=1)[None, :], topo, data.cost,
                                                            phases=2)
    ceiling = total_bound(np.maximum(lb_c, lb_m), data.worst)
    print(f"ceiling of a mean-GPU bound ({time.perf_counter() - t:.1f} s): that placement's copies in place of the "
          f"duplicate allowance give {ceiling * 1e3:.2f} ms, gap {(res.objective - ceiling) / res.objective:.3f}; "
          f"no sharper duplicate allowance can bring this kind of bound closer (its own time: "
          f"{wst.objective() * 1e3:.2f} ms)")
    print(f"{'term':50s} {'plan':>40s}  bound assumes")
    for name, plan, bound in rows:
        print(f"{name:50s} {plan:>40s}  {bound}")


if __name__ == "__main__":
    main()
