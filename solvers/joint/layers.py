"""The joint planner layer by layer: the per-layer step as a pure function, and the layers in parallel.

Under a separable objective (:func:`solvers.joint.solve.separable`: the standard dataflow, the expected time over
profiles, no affinity weight) a layer's placement changes only its own term, so the plan of every layer is found
on its own by :func:`plan_layer` ``(problem data, task) -> layer result``, a pure function of the layer's data
(:func:`layer_slice`), the starts built across layers, a seed and a budget. Per layer: the starts (the plan in
service, the balanced packing, the column construction, and the cross-layer starts such as the affinity chain)
are scored and descended (:func:`solvers.joint.search.descend_starts`), the best is kept, then iterated local
search; the layer's part of the bound (:func:`solvers.joint.bound.layer_bounds`) comes with it. Keeping the best
start per layer is never worse than keeping one start for all layers.

The layers run as tasks on ``Options.executor`` (:mod:`placement.executor`: this process, local processes or a Ray
cluster); the problem data reaches each worker once. Determinism: each layer draws from its own random stream
(``numpy.random.default_rng([seed, layer])``) and, with a work limit (``Options.work_limit``: at most that many
iterated-search kicks per layer, every descent run to its end), nothing depends on the clock, so the plan is the
same bit for bit with one worker, many, or a Ray cluster. With a wall-clock limit each layer gets an equal share
of the time left times the number of workers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from solvers.base import Options, Problem
from solvers.joint.bound import layer_bounds
from solvers.joint.construct import balanced_start, chain_starts, construct_columns, replicas_of, stratified_start
from solvers.joint.data import JointData
from solvers.joint.iterated import iterated_search
from solvers.joint.search import descend_starts
from solvers.params import Params

__all__ = ["LayerTask", "layer_slice", "plan_layer", "solve_layers"]


@dataclass(frozen=True)
class LayerTask:
    """One layer to plan: its index, the run's seed, seconds it may take (None: no clock, the work limit decides),
    and the rows ``[S]`` of the starts built across layers, as ``(name, row)`` pairs."""

    layer: int
    seed: int
    budget: float | None
    starts: tuple = ()


def layer_slice(data: JointData, l: int) -> JointData:
    """The one-layer problem of layer ``l`` (separable objectives: the standard dataflow has no anchor statistics,
    replayed positions or affinity term, so every array is sliced at its layer axis)."""
    sl = slice(l, l + 1)

    def cut(a):
        return None if a is None else a[sl]

    return replace(data, loads=data.loads[:, sl], load=data.load[sl], C=cut(data.C), tokens=data.tokens[sl],
                   U=cut(data.U), Kw=cut(data.Kw), scale=data.scale[:, sl], current=cut(data.current),
                   allowed_node=cut(data.allowed_node), ids=cut(data.ids), tok_factor=cut(data.tok_factor),
                   tok_order=None if data.tok_order is None else data.tok_order[sl], tok_start=cut(data.tok_start))


def plan_layer(shared: tuple[JointData, dict, np.ndarray], task: LayerTask) -> dict:
    """Plan one layer (the pure per-layer step; runs in any worker).

    Args:
        shared: ``(data, settings, r)``: the whole problem (:class:`JointData`), the search settings
            (:func:`solvers.joint.data._search_settings` plus ``work_limit``) and the replica counts ``[L, E]``.
        task: the layer, seed, budget and cross-layer starts.
    Returns:
        ``row [S]``, ``objective`` (the layer's term of the objective), ``bound [N]`` (its lower bound per
        profile), ``picked`` (the start kept), ``descended`` (the layer's objective after each start's descent),
        ``moves``, ``kicks``, ``kicks_kept``, ``seconds``.
    """
    data, cfg, r_all = shared
    l = task.layer
    t0 = time.perf_counter()
    deadline = math.inf if task.budget is None else t0 + task.budget
    d = layer_slice(data, l)
    r = r_all[l:l + 1]
    rng = np.random.default_rng([task.seed, l])
    candidates: list[tuple[str, np.ndarray]] = []
    if d.current is not None and (d.current >= 0).all():
        candidates.append(("current", np.asarray(d.current, dtype=np.int64).copy()))
    base = balanced_start(d, r)
    candidates.append(("balanced", base))
    c_deadline = time.perf_counter() + 0.4 * max(deadline - time.perf_counter(), 0.0)
    if d.C is not None and time.perf_counter() < c_deadline:
        start = stratified_start(d, r) if d.allowed_node is None else base
        # the global construction visits a layer once per sweep, and under the standard dataflow a visit depends
        # on that layer alone: sweeps x rounds rounds of the layer
        sweeps = cfg["sweeps"] or 3
        candidates.append(("columns", construct_columns(d, r, cfg["balance_weight"], sweeps, c_deadline,
                                                        start=start)))
    candidates += [(name, np.asarray(row, dtype=np.int64)[None, :]) for name, row in task.starts]
    search = cfg["local_search"]
    state, picked, info, moves = descend_starts(d, candidates, deadline, rng, search)
    kicks = kept = 0
    if search and cfg["iterated"] and time.perf_counter() < deadline:
        kicks, kept = iterated_search(state, deadline, rng, max_kicks=cfg["work_limit"])
    state.resync()
    lb = layer_bounds(d.loads, d.topology, d.cost, None, d.C, None, max_replicas=d.topology.num_gpus,
                      lp_seconds=cfg["bound_lp"] / data.L, counted=d.ids is not None, tokens=d.tokens)
    return {"row": state.X[0].copy(), "objective": state.objective(), "bound": lb[:, 0], "picked": picked,
            "descended": info["descended"],
            "moves": moves, "kicks": kicks, "kicks_kept": kept, "seconds": time.perf_counter() - t0}


def solve_layers(problem: Problem, data: JointData, p: Params, cfg: dict, options: Options, deadline: float,
                 work: int | None) -> tuple[np.ndarray, float, np.ndarray, dict]:
    """Plan every layer with :func:`plan_layer` on ``options.executor``: ``(X [L, S], objective, bound [N, L],
    stats)``. The cross-layer starts (the affinity chain) are built here first."""
    t0 = time.perf_counter()
    L = data.L
    say = options.say
    r = replicas_of(data)
    base = balanced_start(data, r)
    c_deadline = t0 + 0.4 * max(deadline - t0, 0.0)
    cross = chain_starts(problem, data, p, cfg, r, base, c_deadline)
    ex = options.executor
    workers = 1 if ex is None else max(1, int(getattr(ex, "workers", 1)))
    budget = None if work is not None else max(deadline - time.perf_counter(), 0.0) * min(workers, L) / L
    tasks = [LayerTask(l, int(options.seed), budget, tuple((name, X[l]) for name, X in cross)) for l in range(L)]
    settings = {**cfg, "work_limit": work}
    say(f"planning {L} layers on {workers} worker(s)" + ("" if budget is None else f", {budget:.1f} s each"))
    shared = (data, settings, r)
    if ex is None:
        results = [plan_layer(shared, t) for t in tasks]
    else:
        results = ex.map(plan_layer, tasks, shared=shared)
    X = np.stack([res["row"] for res in results])
    objective = float(sum(res["objective"] for res in results))
    bound = np.stack([res["bound"] for res in results], axis=1)  # [N, L]
    picks: dict[str, int] = {}
    for res in results:
        picks[res["picked"]] = picks.get(res["picked"], 0) + 1
    # each start's objective where it was descended in every layer (the plan keeps the best per layer, so it is
    # never above any of them)
    names = set.intersection(*(set(res["descended"]) for res in results))
    starts = {name: float(sum(res["descended"][name] for res in results)) for name in sorted(names)}
    stats = {"method": "layer by layer", "workers": workers, "construction_pick": picks, "starts": starts,
             "cross_layer_starts": [name for name, _ in cross],
             "local_search_moves": int(sum(res["moves"] for res in results)),
             "kicks": int(sum(res["kicks"] for res in results)),
             "kicks_kept": int(sum(res["kicks_kept"] for res in results)),
             "layer_seconds_max": float(max(res["seconds"] for res in results)),
             "parallel_seconds": time.perf_counter() - t0}
    return X, objective, bound, stats
