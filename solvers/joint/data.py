"""The joint planner's problem data: every input brought to one set of units (:class:`JointData`, :func:`prepare`).

The request is validated here, once, before any work: the solver parameters (:data:`PARAMS`, read through
:class:`solvers.params.Params`), the cost model, the profiles (scaled to one token count), co-activation and anchor
statistics rescaled to the mean load, the optional token routes (distinct tokens counted on them), the replayed
token positions (coherent dataflow), the ``affinity_weight`` term and the node each expert group is kept on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from solvers.base import Options, Problem, SolverInputError, Topology
from solvers.cost import CostModel, anchor_counts, distinct_terms, routes_factor
from solvers.params import Params


@dataclass(eq=False)
class JointData:
    """Arrays the planner works on, all in the token units of the mean load profile.

    loads ``[N, L, E]`` per profile; load ``[L, E]`` mean profile; T ``[L-1, E, E]`` anchor transitions and
    Q ``[L, E, E]`` anchor pairs (coherent dataflow, :func:`solvers.cost.anchor_counts`) or None;
    C ``[L, E, E]`` co-activation or None; scale ``[N, L]`` token count of each profile relative to the mean;
    current ``[L, S]`` or None; allowed_node ``[L, E]`` (-1 = any); with token routes (distinct tokens counted on
    them, :func:`solvers.cost.token_distinct`): ids int32 ``[L, T, k]`` (-1 = none), tok_factor ``[L]`` load
    units per route token, and per layer the tokens of each expert (tok_order ``[L]`` arrays of token indices
    grouped by expert, tok_start ``[L, E + 1]`` where each expert's group starts); else None. pos_ids int32
    ``[L, T', k]`` and pos_factor ``[L]``: routes (highest gate first) whose replay gives the coherent dataflow's token
    positions (:func:`solvers.cost.replay_positions`), or None (positions from the previous layer's served shares).
    aff ``[L-1, E, E]`` adjacent-layer k x k expert pairs, aff_total their sum and aff_cost seconds per pair with no
    common GPU (the ``affinity_weight`` term), or None.
    """

    topology: Topology
    cost: CostModel
    loads: np.ndarray
    load: np.ndarray
    T: np.ndarray | None
    C: np.ndarray | None
    Q: np.ndarray | None
    tokens: np.ndarray
    U: np.ndarray | None
    Kw: np.ndarray | None
    scale: np.ndarray
    worst: bool
    current: np.ndarray | None
    migration_cost: float
    allowed_node: np.ndarray | None
    ids: np.ndarray | None = None
    tok_factor: np.ndarray | None = None
    tok_order: list | None = None
    tok_start: np.ndarray | None = None
    pos_ids: np.ndarray | None = None
    pos_factor: np.ndarray | None = None
    aff: np.ndarray | None = None
    aff_cost: float = 0.0
    aff_total: float = 0.0

    @property
    def L(self) -> int:
        return int(self.load.shape[0])

    @property
    def E(self) -> int:
        return int(self.load.shape[1])

    @property
    def N(self) -> int:
        return int(self.loads.shape[0])

    @property
    def coherent(self) -> bool:
        return self.cost.dataflow == "coherent"


def _rescale_pairs(pairs: np.ndarray, load: np.ndarray, per_token: float) -> np.ndarray:
    """Scale ``[P, E, E]`` pair counts so that each plane has ``per_token`` pairs per token of ``load``."""
    k_tokens = load.sum(axis=1)  # assignments per layer
    out = pairs.astype(np.float64, copy=True)
    for p in range(pairs.shape[0]):
        s = out[p].sum()
        if s > 0:
            out[p] *= (k_tokens[min(p, len(k_tokens) - 1)] * per_token) / s
    return out


def _smooth(pairs: np.ndarray, amount: float, symmetric_zero_diag: bool = False) -> np.ndarray:
    """Shrink ``[P, E, E]`` pair counts towards the independent (outer product of marginals) counts."""
    if amount <= 0:
        return pairs
    out = np.empty_like(pairs)
    for p in range(pairs.shape[0]):
        t = pairs[p]
        tot = t.sum()
        ind = np.outer(t.sum(axis=1), t.sum(axis=0)) / max(tot, 1e-300)
        if symmetric_zero_diag:
            np.fill_diagonal(ind, 0.0)
            ind *= tot / max(ind.sum(), 1e-300)
        out[p] = (1 - amount) * t + amount * ind
    return out


PARAMS = frozenset({"dataflow", "cost", "model", "objective", "normalize_profiles", "migration_cost",
                    "keep_groups_on_nodes", "caps", "chain_cap", "chain_start", "sweeps", "balance_weight", "smoothing",
                    "local_search", "iterated", "bound_lp", "exact_limit", "token_positions", "position_tokens",
                    "token_distinct", "distinct_tokens", "affinity_weight"})


def prepare(problem: Problem, options: Options, p: Params | None = None) -> JointData:
    """Validate the request and bring every input to one set of units (``p``: ``options.params`` already read)."""
    p = Params(options.params, "joint", PARAMS) if p is None else p
    params = p.values
    if problem.budget_slots is not None:
        raise SolverInputError("the joint planner keeps every expert resident; for a memory budget use a budget "
                               "solver (drop --memory-budget to use joint)")
    topo = problem.topology
    E, L = problem.num_experts, problem.num_layers
    if topo.slots_per_gpu > E:
        raise SolverInputError(f"{topo.slots_per_gpu} slots per GPU exceed the {E} experts, so a GPU would hold the "
                               f"same expert twice; use fewer redundant slots (at most {E * topo.num_gpus - E})")
    cost = CostModel.from_params(params)
    objective = p.choice("objective", "expected", ("expected", "worst"))
    if cost.dataflow == "coherent" and problem.transitions is None and problem.routes is None:
        raise SolverInputError("the coherent dataflow needs adjacent-layer transitions, which counts-only input "
                               "does not have; give a token trace or use --dataflow standard")
    loads = problem.profiles if problem.profiles is not None else problem.load[None]
    loads = np.asarray(loads, dtype=np.float64)
    if loads.shape[0] > 1 and p.flag("normalize_profiles", True):
        # profiles recorded over different spans: compare them per token (every profile scaled to the mean total)
        tot = loads.sum(axis=(1, 2), keepdims=True)
        loads = loads / np.maximum(tot, 1e-300) * tot.mean()
    load = loads.mean(axis=0)
    mean_tot = np.maximum(load.sum(axis=1), 1e-300)
    scale = loads.sum(axis=2) / mean_tot[None, :]
    k = max(int(problem.top_k), 1)
    smoothing = _smoothing(p)
    T = C = Q = None
    if problem.coactivation is not None and k > 1:
        C = _smooth(_rescale_pairs(problem.coactivation, load, float(k - 1)), smoothing, symmetric_zero_diag=True)
    if cost.dataflow == "coherent":
        T, Q = anchor_stats(problem, load, smoothing)
    tokens = load.sum(axis=1) / k
    U = Kw = None
    if C is not None:
        U = np.empty((L, E))
        Kw = np.empty((L, E, E))
        for l in range(L):
            U[l], Kw[l] = distinct_terms(load[l], C[l], tokens[l])
    cur = None if problem.current is None else np.asarray(problem.current, dtype=np.int64)
    if cur is not None and (cur.min() < -1 or cur.max() >= E):
        raise SolverInputError("the current plan names experts outside 0..E-1; plan for the same model")
    mig = p.number("migration_cost", cost.expert_bytes / topo.intra_node_bandwidth if cur is not None else 0.0, lo=0.0)
    allowed = None
    if p.flag("keep_groups_on_nodes", False):
        allowed = _group_nodes(load, problem.expert_groups, topo)
    data = JointData(topo, cost, loads, load, T, C, Q, tokens, U, Kw, scale, objective == "worst", cur, mig,
                     allowed)
    data = with_affinity_weight(data, problem, p.number("affinity_weight", 0.0, lo=0.0))
    tokd = p.flag("token_distinct", None)
    if tokd is None:
        # the count takes each replica of an expert as picked independently per token, as the standard model's even
        # split does; under the coherent dataflow all of a token's replicas are picked from its position, and with
        # redundant slots the counted plans measured slower held out (docs/benchmarks.md), so not by default there
        tokd = not (cost.dataflow == "coherent" and topo.num_slots > E)
    if problem.routes is not None and k > 1 and tokd:
        cap = p.integer("distinct_tokens", max(1, int(64e6 // (L * topo.num_gpus))), lo=1)
        data = with_token_routes(data, problem.routes, cap, options.seed)
    tokpos = p.flag("token_positions", None)
    if tokpos is None:  # positions only differ from the served-share estimate when replicas pick by position
        tokpos = cost.dataflow == "coherent" and topo.num_slots > E
    if tokpos and cost.dataflow == "coherent" and problem.routes is not None:
        cap = p.integer("position_tokens", max(1, int(64e6 // (L * k))), lo=1)
        ids = _sample_routes(problem.routes, cap, options.seed)
        data = replace(data, pos_ids=ids, pos_factor=np.array([routes_factor(data.load[l], ids[l]) for l in range(L)]))
    return data


def _smoothing(p: Params) -> float:
    return p.number("smoothing", 0.0, lo=0.0, hi=1.0)


def _search_settings(p: Params) -> dict:
    """The search's settings (:func:`_solve`), read and checked before any work; ``sweeps`` and ``chain_start``
    are None when not given (their defaults depend on the dataflow and the slots)."""
    return {"caps": p.numbers("caps", [1.02, 1.05, 1.1], lo=1.0), "chain_cap": p.number("chain_cap", 1.2, lo=1.0),
            "balance_weight": p.number("balance_weight", 8.0, lo=0.0), "bound_lp": p.number("bound_lp", 0.0, lo=0.0),
            "exact_limit": p.number("exact_limit", 4096.0, lo=0.0), "sweeps": p.integer("sweeps", None, lo=1),
            "chain_start": p.flag("chain_start", None), "local_search": p.flag("local_search", True),
            "iterated": p.flag("iterated", True)}


def with_affinity_weight(data: JointData, problem: Problem, weight: float) -> JointData:
    """``data`` with the ``affinity_weight`` term: ``weight x C0 x`` (the fitted cross-GPU fraction of adjacent-layer
    k x k expert pairs, ExFlow's locality metric, replicas sharing a GPU counting as local), with ``C0 = alpha x
    sum_l load_l / G`` the perfectly balanced compute time of the fitted workload. So one point (0.01) of cross-GPU
    fraction is worth ``weight`` percent of C0. 0 (the default) leaves the estimated time alone."""
    w = float(weight)  # checked by Params (a finite number >= 0)
    if w == 0.0:
        return data
    if problem.transitions is None or data.L < 2:
        raise SolverInputError("affinity_weight needs adjacent-layer transitions, which counts-only input (or a "
                               "single layer) does not have; give a token trace or drop affinity_weight")
    K = np.asarray(problem.transitions, dtype=np.float64)
    pairs = float(K.sum())
    if pairs <= 0:
        return data
    c0 = data.cost.seconds_per_assignment * float(data.load.sum()) / data.topology.num_gpus
    return replace(data, aff=K, aff_cost=w * c0 / pairs, aff_total=pairs)


def _sample_routes(routes: np.ndarray, max_tokens: int, seed: int) -> np.ndarray:
    """int32 ``[L, T, k]`` routes of at most ``max_tokens`` tokens (a random sample, in token order)."""
    routes = np.asarray(routes)
    if routes.shape[0] > max_tokens:
        routes = routes[np.sort(np.random.default_rng(seed).choice(routes.shape[0], max_tokens, replace=False))]
    return np.ascontiguousarray(routes.transpose(1, 0, 2)).astype(np.int32)


def with_token_routes(data: JointData, routes: np.ndarray, max_tokens: int, seed: int = 0) -> JointData:
    """``data`` counting distinct tokens per GPU on ``routes [T, L, k]`` (at most ``max_tokens`` of them, a random
    sample beyond that, so the per-token state stays near ``max_tokens x L x G`` floats)."""
    ids = _sample_routes(routes, max_tokens, seed)  # [L, T, k]
    L, T, k = ids.shape
    factor = np.array([routes_factor(data.load[l], ids[l]) for l in range(L)])
    tok = np.repeat(np.arange(T, dtype=np.int32), k)
    order, start = [], np.zeros((L, data.E + 1), dtype=np.int64)
    for l in range(L):
        flat = ids[l].ravel()
        ok = flat >= 0
        srt = np.argsort(flat[ok], kind="stable")
        order.append(tok[ok][srt])
        start[l, 1:] = np.cumsum(np.bincount(flat[ok], minlength=data.E))
    return replace(data, ids=ids, tok_factor=factor, tok_order=order, tok_start=start)


def anchor_stats(problem: Problem, load: np.ndarray, smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    """Anchor transitions ``[L-1, E, E]`` and anchor pairs ``[L, E, E]`` (highest-gate expert,
    :func:`solvers.cost.anchor_counts`) in the units of ``load [L, E]``; without routes, the anchor is taken to be
    any of the k experts. Needs routes or transitions."""
    L, E = load.shape
    k = max(int(problem.top_k), 1)
    if problem.routes is not None:
        _, T, Q = anchor_counts(problem.routes, E)
    else:
        T, Q = problem.transitions, problem.coactivation if problem.coactivation is not None else np.zeros((L, E, E))
    T = _smooth(_rescale_pairs(T, load[:-1], 1.0), smoothing) if L > 1 else np.zeros((0, E, E))
    Q = _smooth(_rescale_pairs(Q, load, (k - 1) / k), smoothing)
    return T, Q


def _group_nodes(load: np.ndarray, groups: int, topo: Topology) -> np.ndarray:
    """``[L, E]`` node allowed for each expert: whole expert groups packed onto nodes, heaviest group first into
    the lightest node with room (EPLB's first step), every node getting ``groups / nodes`` groups."""
    Nn = topo.num_nodes
    L, E = load.shape
    if groups < Nn or groups % Nn:
        raise SolverInputError(f"keep_groups_on_nodes needs --expert-groups ({groups}) to be a multiple of the "
                               f"{Nn} nodes")
    per = E // groups
    out = np.empty((L, E), dtype=np.int64)
    for l in range(L):
        gl = load[l].reshape(groups, per).sum(axis=1)
        node_load = np.zeros(Nn)
        count = np.zeros(Nn, dtype=int)
        for grp in np.argsort(-gl, kind="stable"):
            open_ = np.where(count < groups // Nn)[0]
            n = open_[np.argmin(node_load[open_])]
            node_load[n] += gl[grp]
            count[n] += 1
            out[l, grp * per:(grp + 1) * per] = n
    return out
