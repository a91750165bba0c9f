"""The joint planner's solve: validate, bound, build the starts, descend, iterate, report (see
:mod:`solvers.joint` for the method).

Two paths share every step. When the objective is a sum of independent per-layer terms (:func:`separable`: the
standard dataflow, the expected time over profiles, no affinity weight), each layer is planned on its own by
:func:`solvers.joint.layers.plan_layer` and the layers run on ``Options.executor`` (one process, local
processes or a Ray cluster, the same plan from each). Otherwise (the coherent dataflow, the worst profile, the
affinity weight: terms that couple adjacent layers) one search runs over all layers in this process.
"""

from __future__ import annotations

import math
import time

import numpy as np

from solvers.base import Options, Problem, Result, SolverInputError, gap_of
from solvers.joint.bound import affinity_bound, layer_bounds, total_bound
from solvers.joint.construct import (balanced_start, chain_starts, construct, construct_columns, replicas_of,
                                     stratified_start)
from solvers.joint.data import PARAMS, JointData, _search_settings, prepare
from solvers.joint.exact import count_placements, enumerate_exact
from solvers.joint.iterated import iterated_search
from solvers.joint.layers import solve_layers
from solvers.joint.search import descend_starts
from solvers.params import Params


def solve(problem: Problem, options: Options) -> Result:
    """Joint placement minimising the estimated MoE time (see the module docstring)."""
    from solvers._blas import blas_threads

    with blas_threads(options.threads or 1):
        return _solve(problem, options)


def separable(data: JointData) -> bool:
    """Whether the objective is a sum of per-layer terms that no other layer's placement changes: the standard
    dataflow (a layer's traffic depends on its own placement), the expected time over profiles (the mean of sums
    is the sum of means; the worst profile is not), no affinity weight (it prices pairs across adjacent layers)."""
    return not data.coherent and not data.worst and data.aff is None


def work_limit_of(options: Options) -> int | None:
    """``Options.work_limit`` checked: None or a whole number >= 1."""
    w = options.work_limit
    if w is None:
        return None
    if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1:
        raise SolverInputError(f"the work limit must be a whole number >= 1 (iterated-search kicks per layer), "
                               f"got {w!r}")
    return int(w)


def _solve(problem: Problem, options: Options) -> Result:
    t0 = time.perf_counter()
    work = work_limit_of(options)
    limit = options.time_limit
    deadline = t0 + (limit if limit is not None else 1e9) * 0.97 if work is None else math.inf
    p = Params(options.params, "joint", PARAMS)
    cfg = _search_settings(p)
    data = prepare(problem, options, p)
    topo = data.topology
    G, m = topo.num_gpus, topo.slots_per_gpu
    stats: dict = {"dataflow": data.cost.dataflow, "objective": "worst" if data.worst else "expected",
                   "profiles": data.N, "migration_cost": data.migration_cost,
                   "distinct_tokens": "pairwise estimate" if data.ids is None else
                   f"counted on {data.ids.shape[1]} tokens"}
    if work is not None:
        stats["work_limit"] = work
    if data.coherent:
        stats["token_positions"] = ("previous anchors' served shares" if data.pos_ids is None else
                                    f"replayed on {data.pos_ids.shape[1]} tokens")
    exact = count_placements(data.E, G, m, data.L) <= cfg["exact_limit"]
    if separable(data) and not exact:
        X, obj, lb, layer_stats = solve_layers(problem, data, p, cfg, options, deadline, work)
        stats.update(layer_stats)
        return _result(X, obj, total_bound(lb, data.worst), "feasible", t0, data, stats)

    rng = np.random.default_rng(options.seed)
    say = options.say
    lb = layer_bounds(data.loads, topo, data.cost, data.T, data.C, data.Q, max_replicas=G,
                      lp_seconds=cfg["bound_lp"], counted=data.ids is not None,
                      token_positions=data.pos_ids is not None, tokens=data.tokens)
    bound = total_bound(lb, data.worst) + affinity_bound(data)
    stats["bound_seconds"] = time.perf_counter() - t0
    if exact:
        found = enumerate_exact(data, deadline)
        if found is not None:
            X, obj = found
            return _result(X, obj, obj, "optimal", t0, data, {**stats, "method": "enumeration"})

    r = replicas_of(data)
    coherent = data.coherent and data.T is not None
    candidates: list[tuple[str, np.ndarray]] = []
    if data.current is not None and (np.asarray(data.current) >= 0).all():
        candidates.append(("current", np.asarray(data.current, dtype=np.int64).copy()))
    base = balanced_start(data, r)
    candidates.append(("balanced", base))
    # construction gets at most 40% of the time left; the local search the rest
    c_deadline = time.perf_counter() + 0.4 * max(deadline - time.perf_counter(), 0.0)
    if coherent:
        sweeps = cfg["sweeps"] or 8
        for cap in cfg["caps"]:
            if time.perf_counter() > c_deadline:
                break
            candidates.append((f"chain cap {cap}", construct(data, r, float(cap), sweeps, c_deadline, start=base)))
    else:
        if data.C is not None and time.perf_counter() < c_deadline:
            start = stratified_start(data, r) if data.allowed_node is None else base
            candidates.append(("columns", construct_columns(data, r, cfg["balance_weight"], cfg["sweeps"] or 3,
                                                            c_deadline, start=start)))
        candidates += chain_starts(problem, data, p, cfg, r, base, c_deadline)
    search = cfg["local_search"]
    state, picked, info, moves = descend_starts(data, candidates, deadline, rng, search, say)
    stats.update(construction=info["built"], construction_seconds=info["seconds"] - t0, local_search_moves=moves,
                 construction_pick=picked, starts=info["descended"])
    if search and cfg["iterated"] and time.perf_counter() < deadline:
        kicks = None if work is None else work * data.L
        stats["kicks"], stats["kicks_kept"] = iterated_search(state, deadline, rng, max_kicks=kicks, say=say)
    state.resync()
    if data.aff is not None:
        stats["affinity_seconds"] = state.affinity_seconds()
        stats["fitted_cross_gpu_fraction"] = 1.0 - float(state.local.sum()) / data.aff_total
    # the incremental objective equals the from-scratch one (tests/test_joint.py checks it), so no recount here
    return _result(state.X, state.objective(), bound, "feasible", t0, data, stats)


def _result(X, obj, bound, status, t0, data: JointData, stats) -> Result:
    g = gap_of(obj, bound)
    return Result(phy2log=np.asarray(X, dtype=np.int64), solver="joint", status=status, objective=float(obj),
                  bound=float(bound), gap=g, seconds=time.perf_counter() - t0, backend="scipy-lsa+local-search",
                  objective_name=f"est_moe_seconds ({data.cost.dataflow} dataflow, counts model)", stats=stats)
