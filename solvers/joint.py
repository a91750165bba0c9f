"""The joint planner: affinity, co-activation, balance, topology and replicas together, with a bound.

Objective (minimised): the estimated MoE seconds of the fitted workload under the counts model of
:mod:`solvers.cost` (:func:`solvers.cost.estimate_layer_seconds`; under the coherent dataflow replicas serve
position-aware shares of their expert's tokens, :func:`solvers.cost.effective_share`; with a token trace each
GPU's distinct tokens are counted on the fitted tokens, :func:`solvers.cost.token_distinct`): per layer the slowest
GPU's compute plus all-to-all time, summed over layers; with several workload profiles the mean
(``objective="expected"``) or the maximum (``"worst"``) over profiles; plus ``migration_cost`` seconds for every
expert copy that must be moved onto a GPU that does not hold it in the current plan; plus, with
``affinity_weight`` w > 0, ``w x C0 x`` the fitted cross-GPU fraction of adjacent-layer k x k expert pairs (ExFlow's
locality metric; ``C0`` the balanced compute time), which trades estimated time for inter-layer locality
(:func:`with_affinity_weight`).

Method (a decomposition that is exact where it can be, then local search on the true objective):

1. Tiny instances are enumerated exactly (status "optimal", bound = objective).
2. Replica counts per layer: water-filling of the redundant slots onto the largest pieces (optimal for the
   smallest largest piece, as DeepSeek's EPLB does greedily); the local search below re-targets replicas, so
   which experts are replicated and where is decided with the placement, on the same objective.
3. Construction by block coordinate descent over layers: with the neighbouring layers fixed, the gain of
   putting expert e on GPU g is linear (pairs with the neighbours that become GPU- or node-local, co-activated
   pairs that share the GPU, migration), so each layer is an assignment problem solved exactly
   (``scipy.optimize.linear_sum_assignment`` over slots), followed by a swap repair to a load cap. Sweeps run
   forwards and backwards (ExFlow's chaining of layers, arXiv 2401.08383, with MoETuner's balance,
   arXiv 2502.06643); several caps are tried and the cost model picks the best trade-off.
4. Local search on the exact counts objective with incremental evaluation: swaps of two experts between GPUs
   and replica re-targeting, aimed at each layer's slowest GPU, lexicographic on (objective, sum of squared GPU
   times) so that plateaus still improve balance and traffic. Every start (the column construction and, with a
   token trace, an affinity chain under the standard dataflow too) is descended while a descent as long as the
   first still fits; the best is kept.
5. Iterated local search (Lourenco, Martin & Stuetzle, "Iterated Local Search", 2003) with the time left: kick a
   layer, descend on it and its neighbours, keep or undo (:func:`iterated_search`).
6. Bound: :func:`solvers.joint_bound.layer_bounds` (valid for every placement; ``bound_lp`` seconds tighten its
   pair allowances with triangle cuts), plus :func:`affinity_bound` for the affinity term; gap = (objective -
   bound) / objective.

Parameters (``Options.params``): ``dataflow`` ("standard" | "coherent"), ``cost`` (a
:class:`solvers.cost.CostModel`), ``model`` (a cost preset such as "deepseek-v3"), any CostModel field
(``hidden_size``, ``expert_intermediate_size``, ``dtype_bytes``, ``gpu_flops``), ``objective`` ("expected" |
"worst"; profiles are first scaled to the same token count unless ``normalize_profiles=false``),
``migration_cost`` (seconds per moved expert copy; default when a current plan is given: one expert's
weights over the intra-node link), ``keep_groups_on_nodes`` (bool: every expert group stays on one node, for
node-limited routing), ``caps`` (load caps tried by the construction), ``chain_cap`` (load cap of the affinity
chain start under the standard dataflow, default 1.2), ``chain_start`` (bool; default: only without redundant
slots), ``sweeps``, ``balance_weight`` (the column construction's weight on balance, default 8), ``smoothing`` (shrink transitions and
co-activation towards independence, 0..1), ``local_search`` (bool), ``iterated`` (bool: iterated local search
with the time left, default true), ``bound_lp`` (seconds for the triangle-cut pair bound, default 0),
``exact_limit`` (enumerate when there are at most this many placements), ``token_positions`` (bool: under the
coherent dataflow replay each fitted token's position, :func:`solvers.cost.replay_positions`, instead of spreading
an anchor's tokens by its served shares; default: with a token trace and redundant slots), ``position_tokens`` (at
most this many route tokens are replayed; default ``64e6 / (L x k)``), ``token_distinct`` (bool: count each
GPU's distinct tokens on the fitted token routes, :func:`solvers.cost.token_distinct`, instead of the pairwise
estimate; default: with a token trace, except under the coherent dataflow with redundant slots),
``distinct_tokens`` (at most this many route tokens are kept for that count; default ``64e6 / (L x G)``),
``affinity_weight`` (>= 0, default 0: one point of the fitted k x k cross-GPU fraction is worth this many percent of
the balanced compute time; needs transitions).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, replace

import numpy as np

from solvers.base import Options, Params, Problem, Result, SolverInputError, Topology, gap_of
from solvers.cost import (CostModel, anchor_counts, coherent_comm_seconds, covered, dispatch_matrix,
                          distinct_terms, effective_share, position_mass, replay_positions, routes_factor,
                          standard_comm_seconds, token_cover)
from solvers.joint_bound import layer_bounds, max_local_mass, total_bound, water_fill
from solvers.objective import dispatch_rows, dispatch_table

BIG = 1e30


# ----------------------------------------------------------------------------------------------------------------
# Problem data in one set of units
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Incremental state: the exact counts objective under moves
# ----------------------------------------------------------------------------------------------------------------


def _block(M: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``M[idx][:, idx]`` of a square matrix."""
    return M.take(idx, 0).take(idx, 1)


class State:
    """A placement plus the cached products that make a move's exact effect cheap to compute.

    Arrays (l = layer): X ``[L, S]`` slots, r ``[L, E]`` replicas, P ``[L, E, G]`` even-split shares (1/r per
    replica), W ``[L, E, G]`` served shares (what load, duplicates and traffic use: P under the standard
    dataflow; under the coherent one the position-aware shares of :func:`solvers.cost.effective_share`, where a
    token uses the replica the dispatch rule picks for its position), Lg ``[L, N, G]`` GPU load per profile,
    CP ``[L, E, G]`` = C W, KP = Kw W, dup / logp0 ``[L, G]`` duplicate-copy terms; coherent dataflow:
    tab ``[L, E, G]`` dispatch table (:func:`solvers.objective.dispatch_rows`), Vin ``[L, G, E]`` =
    W_{l-1}^T T_{l-1} (positions of layer l's tokens: where the previous anchors are served), Vout
    ``[L, E, G]`` = T_l P_{l+1} (search guidance only), M ``[L, G, G]`` = position-to-serving mass into l
    (:func:`solvers.cost.dispatch_matrix`), QP / QtP ``[L, E, G]`` = Q W / Q^T W, A ``[L, G, G]`` = W^T Q W
    (anchor GPU, serving GPU) within l; tg ``[L, N, G]`` per-GPU seconds, moved ``[L]`` migrated copies. With
    token routes (``data.ids``) the distinct tokens per GPU are counted on them instead of the pairwise estimate:
    z int8 / q ``[L, G, T]`` (how token t's experts cover GPU g, :func:`solvers.cost.token_cover`) and Dt
    ``[L, G]`` distinct tokens in load units; a move updates z and q of the moved experts' tokens on the GPUs
    whose shares changed (one count and one factor per token and moved expert).

    A move at layer l changes P, tab and W at the moved experts' rows and every quantity of layer l; at layer
    l+1 it changes the positions (Vin), hence M and the W rows of replicated experts (and what depends on them),
    exactly. Those W rows move the positions of layer l+2 and so on: a move evaluates layers l and l+1 and marks
    l+2 stale; :meth:`resync` rebuilds stale layers in order (the local search does so after every pass, the
    iterated search after every kick), so the objective it compares is exact. With replayed token positions
    (``data.pos_ids``, tokpos ``[L, T']``) layer l+1 is evaluated from the served shares as above and marked stale:
    :meth:`resync` replays the positions from there and rebuilds every later layer. With token routes the distinct
    tokens of layer l+1 follow its served-share change in proportion (D/load per GPU) and the layer is marked
    stale too (recounted on the tokens by :meth:`resync`).
    """

    def __init__(self, data: JointData, X: np.ndarray):
        self.d = d = data
        topo = d.topology
        self.G, self.m, self.S = topo.num_gpus, topo.slots_per_gpu, topo.num_slots
        self.gpu = topo.gpu_of_slot()
        self.node = topo.node_of_gpu()
        self.alpha = d.cost.seconds_per_assignment
        self.B = d.cost.token_bytes
        L, E, G = d.L, d.E, self.G
        self.X = X.astype(np.int64).copy()
        self.P = np.zeros((L, E, G))
        self.r = np.zeros((L, E), dtype=np.int64)
        for l in range(L):
            np.add.at(self.P[l], (self.X[l], self.gpu), 1.0)
        self.r = self.P.sum(axis=2).astype(np.int64)
        self.P /= np.maximum(self.r, 1)[:, :, None]
        self.use_T = d.coherent and d.T is not None
        self.Vin = np.zeros((L, G, E)) if self.use_T else None
        self.Vout = np.zeros((L, E, G)) if self.use_T else None
        self.M = np.zeros((L, G, G)) if self.use_T else None
        self.tab = None
        self.W = self.P
        self.tokpos = None  # int [L, T'] replayed token positions (data.pos_ids), or None
        if self.use_T:
            self.tab = dispatch_table(self.X, E, topo)
            if d.pos_ids is not None:
                self.tokpos = replay_positions(self.tab, d.pos_ids)
            self.W = np.empty_like(self.P)
            self.W[0] = effective_share(self.P[0], self.tab[0], None)
            for l in range(1, L):  # positions of layer l: where the previous layer's anchors are served
                self.Vin[l] = self._positions(l)
                self.M[l] = dispatch_matrix(self.Vin[l], self.tab[l])
                self.W[l] = effective_share(self.P[l], self.tab[l], self.Vin[l])
            for l in range(L - 1):
                self.Vout[l] = d.T[l] @ self.P[l + 1]
        self.Lg = np.empty((L, d.N, G))
        self.tokd = d.ids is not None
        self.z = self.q = self.Dt = None
        self.stale = np.zeros(L, dtype=bool)
        if self.tokd:
            self.z = np.empty((L, G, d.ids.shape[1]), dtype=np.int8)  # GPU-major: a GPU's tokens are contiguous
            self.q = np.empty((L, G, d.ids.shape[1]))
            self.Dt = np.empty((L, G))
            self._slot = np.zeros(d.ids.shape[1], dtype=np.int64)  # scratch: a token's place in a list
            self._mark = np.zeros(d.ids.shape[1], dtype=np.int64)  # scratch: which list a token was seen in
            self._stamp = 0
            for l in range(L):
                self._recount(l)
        self.CP = self.KP = self.QP = self.QtP = self.A = None
        self.dup = np.zeros((L, G))
        self.logp0 = np.zeros((L, G))
        if d.C is not None and not self.tokd:
            self.CP, self.KP = np.empty((L, E, G)), np.empty((L, E, G))
        if self.use_T:
            self.QP, self.QtP, self.A = np.empty((L, E, G)), np.empty((L, E, G)), np.empty((L, G, G))
        for l in range(L):
            self._products(l)
        self.cur_mask = None
        self.moved = np.zeros(L)
        if d.current is not None:
            self.cur_mask = np.zeros((L, E, G), dtype=bool)
            for l in range(L):
                ok = d.current[l] >= 0
                self.cur_mask[l, d.current[l][ok], self.gpu[ok]] = True
            self.moved = ((self.P > 0) & ~self.cur_mask).sum(axis=(1, 2)).astype(float)
        self.tg = np.stack([self.layer_gpu_seconds(l) for l in range(L)])  # [L, N, G]
        self.tl = self.tg.max(axis=2)  # [L, N]
        self.H = self.local = None  # affinity_weight: GPU masks [L, E, G] and local k x k pair mass [L-1]
        if d.aff is not None:
            self.H = (self.P > 0).astype(np.float64)
            self.local = np.array([(d.aff[l] * ((self.H[l] @ self.H[l + 1].T) > 0)).sum() for l in range(L - 1)])

    def _recount(self, l: int) -> None:
        z, q = token_cover(self.W[l], self.d.ids[l])
        self.z[l], self.q[l] = z.T, q.T
        self.Dt[l] = self.d.tok_factor[l] * covered(self.z[l], self.q[l]).sum(axis=1)

    def _positions(self, l: int) -> np.ndarray:
        """``[G, E]`` where layer l's token-expert assignments sit (l >= 1): replayed on the tokens, or the previous
        anchors spread by their served shares."""
        d = self.d
        if self.tokpos is not None:
            return position_mass(self.tokpos[l], d.pos_ids[l], d.E, self.G, d.pos_factor[l])
        return self.W[l - 1].T @ d.T[l - 1]

    def _products(self, l: int) -> None:
        """Layer l's quantities that follow from its served shares W[l]: GPU loads, duplicate-copy terms, anchor
        products (from scratch; moves update them incrementally)."""
        d = self.d
        W = self.W[l]
        self.Lg[l] = d.loads[:, l, :] @ W
        if self.CP is not None:
            self.CP[l] = d.C[l] @ W
            self.dup[l] = 0.5 * (W * self.CP[l]).sum(axis=0)
            self.KP[l] = d.Kw[l] @ W
            self.logp0[l] = d.U[l] @ W + 0.5 * (W * self.KP[l]).sum(axis=0)
        if self.use_T:
            self.QP[l] = d.Q[l] @ W
            self.QtP[l] = d.Q[l].T @ W
            self.A[l] = W.T @ self.QP[l]

    def _rebuild(self, l: int) -> bool:
        """Recompute layer l from its placement and the previous layer's served shares (positions, served shares,
        loads, duplicate terms, anchor mass, distinct tokens, GPU seconds); True if its served shares changed."""
        d = self.d
        changed = False
        if self.use_T:
            if l >= 1:
                self.Vin[l] = self._positions(l)
                self.M[l] = dispatch_matrix(self.Vin[l], self.tab[l])
            W_l = effective_share(self.P[l], self.tab[l], self.Vin[l] if l >= 1 else None)
            changed = not np.allclose(W_l, self.W[l], rtol=0.0, atol=1e-12)
            self.W[l] = W_l
        self._products(l)
        if self.tokd:
            self._recount(l)
        self.tg[l] = self.layer_gpu_seconds(l)
        self.tl[l] = self.tg[l].max(axis=1)
        return changed

    def resync(self) -> None:
        """Make stale layers exact again, in layer order: a layer whose served shares change moves the positions of
        the next one, which is rebuilt too (:meth:`_rebuild`)."""
        if self.tokpos is not None and self.stale.any():
            # replayed positions: every layer from the first stale one on, positions first
            l0 = int(np.argmax(self.stale))
            replay_positions(self.tab, self.d.pos_ids, start=max(l0 - 1, 0), pos=self.tokpos)
            self.stale[l0:] = True
        for l in range(self.d.L):
            if self.stale[l]:
                if self._rebuild(l) and l + 1 < self.d.L:
                    self.stale[l + 1] = True
                self.stale[l] = False

    def _token_delta(self, l: int, idx: np.ndarray, W_row: np.ndarray, dW: np.ndarray):
        """Change ``[G]`` of layer l's distinct tokens when experts ``idx`` take the served-share rows of ``W_row``
        (``dW [k, G]`` the change), and what :meth:`apply` stores: (tokens, GPUs, new z, new q)."""
        d = self.d
        out = np.zeros(self.G)
        cols = np.nonzero(np.abs(dW).max(axis=0) > 0)[0]
        if not cols.size:
            return out, None
        order, start = d.tok_order[l], d.tok_start[l]
        lists = [order[start[e]:start[e + 1]] for e in idx]
        new_rows = W_row[idx][:, cols]
        old_rows = self.W[l][np.ix_(idx, cols)]
        # per moved expert: the change of its count (share 1) and of its factor 1 - share (share < 1)
        dz = (new_rows >= 1.0).astype(np.int64) - (old_rows >= 1.0)
        dlog = np.log(np.where(new_rows < 1.0, 1.0 - new_rows, 1.0)) - np.log(np.where(old_rows < 1.0, 1.0 - old_rows,
                                                                                       1.0))
        if len(lists) == 2 and not dlog.any():
            # two whole experts (a swap): the tokens of one only, of the other only, and of both, each group with
            # one count change; marks instead of a sort
            a, b = lists
            mark = self._mark
            self._stamp += 2
            mark[a] = self._stamp
            b_in_a = mark[b] == self._stamp
            mark[b] = self._stamp + 1
            a_only = a[mark[a] != self._stamp + 1]
            groups = [(a_only, dz[0]), (b[~b_in_a], dz[1]), (b[b_in_a], dz[0] + dz[1])]
            toks = np.concatenate([g for g, _ in groups])
            if not toks.size:
                return out, None
            change = np.concatenate([np.broadcast_to(v, (g.size, v.size)) for g, v in groups]).T  # [c, tokens]
            z_old = np.stack([self.z[l, g].take(toks) for g in cols])  # [c, tokens]
            q_old = np.stack([self.q[l, g].take(toks) for g in cols])
            z_new, q_new = (z_old + change).astype(np.int8), q_old
        else:
            pairs = np.concatenate(lists)
            if not pairs.size:
                return out, None
            mark = self._slot
            # the distinct tokens among the lists and each list entry's place among them (no sort: a scratch array)
            at = np.arange(pairs.size)
            mark[pairs] = at
            toks = pairs[mark[pairs] == at]
            mark[toks] = np.arange(toks.size)
            z_old = np.stack([self.z[l, g].take(toks) for g in cols])  # [c, tokens]
            q_old = np.stack([self.q[l, g].take(toks) for g in cols])
            reps = [len(t) for t in lists]
            c, n = cols.size, toks.size
            flat = (np.arange(c)[:, None] * n + mark[pairs][None, :]).ravel()  # (GPU, token place) of every entry

            def per_token(per_expert):  # [k, c] -> [c, tokens] summed over each token's moved experts
                w = np.repeat(per_expert, reps, axis=0).T.ravel()
                return np.bincount(flat, weights=w, minlength=c * n).reshape(c, n)

            z_new = (z_old + np.rint(per_token(dz))).astype(np.int8) if dz.any() else z_old
            q_new = q_old * np.exp(per_token(dlog)) if dlog.any() else q_old
        out[cols] = d.tok_factor[l] * (covered(z_new, q_new) - covered(z_old, q_old)).sum(axis=1)
        return out, (toks, cols, z_new, q_new)

    # -- pieces and per-GPU seconds ----------------------------------------------------------------------------
    def piece_max(self, l: int, X_row: np.ndarray, W_row: np.ndarray) -> np.ndarray:
        """``[N, G]`` largest piece on each GPU (the expert's load times its served share there)."""
        pieces = self.d.loads[:, l, X_row] * W_row[X_row, self.gpu][None, :]
        return pieces.reshape(self.d.N, self.G, self.m).max(axis=2)

    def layer_gpu_seconds(self, l: int, Lg=None, dup=None, X_row=None, W_row=None, M_in=None,
                          logp0=None, A=None, Dt=None) -> np.ndarray:
        """``[N, G]`` seconds of each GPU at layer l (optionally with replaced quantities)."""
        d = self.d
        Lg = self.Lg[l] if Lg is None else Lg
        dup = self.dup[l] if dup is None else dup
        logp0 = self.logp0[l] if logp0 is None else logp0
        X_row = self.X[l] if X_row is None else X_row
        W_row = self.W[l] if W_row is None else W_row
        sc = d.scale[:, l][:, None]
        if self.tokd:
            D = sc * (self.Dt[l] if Dt is None else Dt)[None, :]
        elif d.C is not None:
            D = np.maximum(Lg - dup[None, :] * sc, self.piece_max(l, X_row, W_row))
            D = np.maximum(D, sc * (d.tokens[l] * -np.expm1(np.minimum(logp0, 0.0)))[None, :])
        else:
            D = Lg
        t = self.alpha * Lg
        topo = d.topology
        if not d.coherent:
            return t + standard_comm_seconds(D, topo, d.cost, phases=2)
        M = None if l == 0 else (self.M[l] if M_in is None else M_in)
        A = self.A[l] if A is None else A
        return t + coherent_comm_seconds(D, Lg, M, A, topo, d.cost, d.scale[:, l])

    # -- objective ---------------------------------------------------------------------------------------------
    def profile_totals(self, tl: np.ndarray | None = None) -> np.ndarray:
        return (self.tl if tl is None else tl).sum(axis=0)

    def objective(self) -> float:
        return self._combine(self.profile_totals(), float(self.moved.sum()), self.local)

    def _combine(self, tot: np.ndarray, moved_total: float, local: np.ndarray | None) -> float:
        out = float(tot.max() if self.d.worst else tot.mean()) + self.d.migration_cost * moved_total
        return out + self.affinity_seconds(local)

    def affinity_seconds(self, local: np.ndarray | None = None) -> float:
        """The ``affinity_weight`` term of the objective (0 without it) for the local pair mass ``local [L-1]``
        (default: the state's): the pairs with no common GPU, priced."""
        local = self.local if local is None else local
        if local is None:
            return 0.0
        return self.d.aff_cost * (self.d.aff_total - float(local.sum()))

    def _local_update(self, l: int, idx: np.ndarray, P_new: np.ndarray) -> np.ndarray | None:
        """``[L-1]`` local k x k pair mass after experts ``idx`` of layer l take the shares ``P_new`` (None without
        the affinity term): only the pairs with a moved expert change."""
        if self.local is None:
            return None
        d = self.d
        Hn = (P_new > 0).astype(np.float64)  # [k, G]
        Ho = self.H[l].take(idx, 0)
        local = self.local.copy()
        if l >= 1:
            K = d.aff[l - 1].take(idx, 1)  # [E, k]
            local[l - 1] += (K * (((self.H[l - 1] @ Hn.T) > 0).astype(np.float64)
                                  - ((self.H[l - 1] @ Ho.T) > 0))).sum()
        if l + 1 < d.L:
            K = d.aff[l].take(idx, 0)  # [k, E]
            local[l] += (K * (((Hn @ self.H[l + 1].T) > 0).astype(np.float64) - ((Ho @ self.H[l + 1].T) > 0))).sum()
        return local

    # -- moves -------------------------------------------------------------------------------------------------
    def _move_arrays(self, l: int, changes: list[tuple[int, int]]):
        """New X row, r row and the sparse share change for slot changes [(slot, new expert)]."""
        X_row = self.X[l].copy()
        old = [int(X_row[s]) for s, _ in changes]
        for s, e in changes:
            X_row[s] = e
        idx = sorted(set(old) | {e for _, e in changes})
        idx_a = np.asarray(idx, dtype=np.int64)
        pos = {e: i for i, e in enumerate(idx)}
        Pold = self.P[l, idx_a]
        cnt_new = np.rint(Pold * self.r[l, idx_a][:, None])
        for (s, e), o in zip(changes, old):
            g = self.gpu[s]
            cnt_new[pos[o], g] -= 1.0
            cnt_new[pos[e], g] += 1.0
        r_new = cnt_new.sum(axis=1)
        if np.any(r_new == 0) or np.any(cnt_new > 1):
            return None
        P_new = cnt_new / r_new[:, None]
        dP = P_new - Pold
        r_row = self.r[l].copy()
        r_row[idx_a] = r_new.astype(np.int64)
        return X_row, r_row, idx_a, dP, P_new

    def _layer_update(self, l: int, idx: np.ndarray, dW: np.ndarray):
        """New (Lg ``[N, G]``, dup ``[G]``, logp0 ``[G]``, A ``[G, G]`` or None) of layer l when the served shares of
        experts ``idx`` change by ``dW [k, G]``."""
        d = self.d
        Lg = self.Lg[l] + d.loads[:, l, idx] @ dW
        dup = self.dup[l]
        logp0 = self.logp0[l]
        if self.CP is not None:  # sub-blocks by take(): np.ix_ costs more than the products at this size
            dup = dup + (dW * (self.CP[l].take(idx, 0) + 0.5 * (_block(d.C[l], idx) @ dW))).sum(axis=0)
            grow = self.KP[l].take(idx, 0) + 0.5 * (_block(d.Kw[l], idx) @ dW)
            logp0 = logp0 + d.U[l].take(idx) @ dW + (dW * grow).sum(axis=0)
        A = None
        if self.use_T:
            A = self.A[l] + dW.T @ (self.QP[l].take(idx, 0) + _block(d.Q[l], idx) @ dW) \
                + self.QtP[l].take(idx, 0).T @ dW
        return Lg, dup, logp0, A

    def evaluate_move(self, l: int, changes: list[tuple[int, int]]):
        """Exact new objective (and secondary) after a move; None if the move is illegal."""
        arr = self._move_arrays(l, changes)
        if arr is None:
            return None
        X_row, r_row, idx, dP, P_new = arr
        d = self.d
        if d.allowed_node is not None:
            an = d.allowed_node[l, idx]
            if np.any((P_new > 0) & (self.node[None, :] != an[:, None])):
                return None
        tab_new = W_new = None
        dW = dP
        W_row = None
        # replicas involved: the dispatch rule and the positions decide the served shares; else W = P (one GPU)
        replicated = bool((r_row[idx] > 1).any() or (self.r[l, idx] > 1).any())
        if self.use_T:
            if replicated:
                tab_new = dispatch_rows(P_new > 0, d.topology)
                W_new = effective_share(P_new, tab_new, self.Vin[l][:, idx] if l >= 1 else None)
            else:
                tab_new = np.repeat(np.argmax(P_new, axis=1)[:, None], self.G, axis=1)
                W_new = P_new
            dW = W_new - self.W[l, idx]
            W_row = self.W[l].copy()
            W_row[idx] = W_new
        else:
            W_row = self.P[l].copy()
            W_row[idx] = P_new
        Lg, dup, logp0, A_l = self._layer_update(l, idx, dW)
        Dt_l = tok_l = None
        if self.tokd:
            dD, tok_l = self._token_delta(l, idx, W_row, dW)
            Dt_l = self.Dt[l] + dD
        M_l = nxt = None
        if self.use_T:
            if l >= 1:
                V = self.Vin[l][:, idx]
                if replicated:
                    M_l = self.M[l] + dispatch_matrix(V, tab_new) - dispatch_matrix(V, self.tab[l, idx])
                else:
                    M_l = self.M[l] + V @ dP
            if l + 1 < d.L:
                # the anchors of layer l moved: positions, dispatch and replicated experts' shares of l+1 change.
                # dispatch_matrix(dV, tab) = dV @ P for experts with one replica; the others by their table
                M_next = self.M[l + 1] + dW.T @ self.Vout[l][idx]
                R = np.nonzero(self.r[l + 1] >= 2)[0]
                W2 = dW2 = None
                upd = (self.Lg[l + 1], self.dup[l + 1], self.logp0[l + 1], self.A[l + 1])
                W2_row = Dt2 = None
                if R.size:
                    dVR = dW.T @ d.T[l].take(idx, 0).take(R, 1)  # [G, |R|]
                    M_next = M_next + dispatch_matrix(dVR, self.tab[l + 1, R]) - dVR @ self.P[l + 1, R]
                    W2 = effective_share(self.P[l + 1, R], self.tab[l + 1, R], self.Vin[l + 1][:, R] + dVR)
                    dW2 = W2 - self.W[l + 1, R]
                    upd = self._layer_update(l + 1, R, dW2)
                    W2_row = self.W[l + 1].copy()
                    W2_row[R] = W2
                    if self.tokd:  # in proportion to the load change; recounted by resync()
                        Lgm = self.Lg[l + 1].mean(axis=0)
                        ratio = np.divide(self.Dt[l + 1], Lgm, out=np.ones_like(Lgm), where=Lgm > 0)
                        Dt2 = self.Dt[l + 1] + (d.load[l + 1, R] @ dW2) * ratio
                nxt = (M_next, R, W2, dW2, upd, W2_row, Dt2)
        tg_l = self.layer_gpu_seconds(l, Lg, dup, X_row, W_row, M_l, logp0, A_l, Dt_l)
        new_tg = {l: tg_l}
        if nxt is not None:
            Lg2, dup2, logp02, A2 = nxt[4]
            new_tg[l + 1] = self.layer_gpu_seconds(l + 1, Lg2, dup2, None, nxt[5], nxt[0], logp02, A2, nxt[6])
        tl = self.tl.copy()
        for ll, t in new_tg.items():
            tl[ll] = t.max(axis=1)
        moved_total = float(self.moved.sum())
        moved_l = None
        if self.cur_mask is not None:
            cm = self.cur_mask[l, idx]
            moved_l = self.moved[l] - ((self.P[l, idx] > 0) & ~cm).sum() + ((P_new > 0) & ~cm).sum()
            moved_total += moved_l - self.moved[l]
        local = self._local_update(l, idx, P_new)
        obj = self._combine(self.profile_totals(tl), moved_total, local)
        sec_old = sum(float((self.tg[ll] ** 2).sum()) for ll in new_tg)
        sec_new = sum(float((t ** 2).sum()) for t in new_tg.values())
        payload = (l, X_row, r_row, idx, dP, P_new, tab_new, W_new, dW, Lg, dup, logp0, M_l, A_l, nxt, new_tg,
                   moved_l, Dt_l, tok_l, local)
        return obj, sec_new - sec_old, payload

    def _store_layer(self, l: int, idx: np.ndarray, dW: np.ndarray, Lg, dup, logp0, A) -> None:
        d = self.d
        self.Lg[l] = Lg
        self.dup[l] = dup
        self.logp0[l] = logp0
        if self.CP is not None:
            self.CP[l] += d.C[l][:, idx] @ dW
            self.KP[l] += d.Kw[l][:, idx] @ dW
        if self.use_T:
            self.QP[l] += d.Q[l][:, idx] @ dW
            self.QtP[l] += d.Q[l][idx].T @ dW
            self.A[l] = A

    def apply(self, payload) -> None:
        (l, X_row, r_row, idx, dP, P_new, tab_new, W_new, dW, Lg, dup, logp0, M_l, A_l, nxt, new_tg,
         moved_l, Dt_l, tok_l, local) = payload
        d = self.d
        self.X[l] = X_row
        self.r[l] = r_row
        Pl = self.P[l, idx] + dP
        self.P[l, idx] = np.where(np.abs(Pl) < 1e-12, 0.0, Pl)
        if self.use_T:
            self.tab[l, idx] = tab_new
            self.W[l, idx] = W_new
        self._store_layer(l, idx, dW, Lg, dup, logp0, A_l)
        if self.tokd:
            self.Dt[l] = Dt_l
            if tok_l is not None:
                toks, cols, z_new, q_new = tok_l
                for j, g in enumerate(cols):
                    self.z[l, g, toks] = z_new[j]
                    self.q[l, g, toks] = q_new[j]
        if self.use_T:
            if nxt is not None:
                M_next, R, W2, dW2, upd, _, Dt2 = nxt
                self.Vin[l + 1] += dW.T @ d.T[l][idx, :]
                self.M[l + 1] = M_next
                if R.size:
                    self.W[l + 1, R] = W2
                    self._store_layer(l + 1, R, dW2, *upd)
                    if self.tokd:
                        self.Dt[l + 1] = Dt2
                        self.stale[l + 1] = True
                    if l + 2 < d.L and np.abs(dW2).max() > 1e-12:
                        self.stale[l + 2] = True  # its positions moved with layer l+1's served shares
                if self.tokpos is not None:
                    self.stale[l + 1] = True  # replayed positions: rebuilt from l+1 on by resync()
            if l >= 1:
                self.Vout[l - 1] += d.T[l - 1][:, idx] @ dP
                self.M[l] = M_l
        for ll, t in new_tg.items():
            self.tg[ll] = t
            self.tl[ll] = t.max(axis=1)
        if moved_l is not None:
            self.moved[l] = moved_l
        if local is not None:
            self.local = local
            self.H[l, idx] = (self.P[l, idx] > 0)


# ----------------------------------------------------------------------------------------------------------------
# Construction: replica counts, then block coordinate descent with exact per-layer assignments
# ----------------------------------------------------------------------------------------------------------------


def replica_counts(load: np.ndarray, slots: int, max_replicas: int) -> np.ndarray:
    """``[E]`` replicas per expert by water-filling (:func:`solvers.joint_bound.water_fill`); refuses slots that
    cannot all be used."""
    r, left = water_fill(load, slots, max_replicas)
    if left > 0:
        raise SolverInputError("more slots than experts x GPUs; use fewer redundant slots")
    return r


def layer_replicas(data: JointData, load: np.ndarray) -> np.ndarray:
    """``[L, E]`` replica counts by water-filling ``load [L, E]``; with groups kept on nodes, each node's spare slots
    go to that node's experts."""
    topo = data.topology
    G = topo.num_gpus
    if data.allowed_node is None:
        return np.stack([replica_counts(load[l], topo.num_slots, G) for l in range(data.L)])
    per_node = topo.gpus_per_node * topo.slots_per_gpu
    r = np.ones((data.L, data.E), dtype=np.int64)
    for l in range(data.L):
        for n in range(topo.num_nodes):
            mine = np.nonzero(data.allowed_node[l] == n)[0]
            r[l, mine] = replica_counts(load[l, mine], per_node, topo.gpus_per_node)
    return r


class Builder:
    """Per-layer assignment given the neighbouring layers (see the module docstring, step 3)."""

    def __init__(self, data: JointData):
        self.d = d = data
        topo = d.topology
        self.G, self.m, self.S = topo.num_gpus, topo.slots_per_gpu, topo.num_slots
        self.gpu = topo.gpu_of_slot()
        node = topo.node_of_gpu()
        same_node = node[:, None] == node[None, :]
        B = d.cost.token_bytes
        G, n = self.G, topo.gpus_per_node
        # cost (seconds, averaged over GPUs) of one pair copy between GPU g and h
        self.K = np.where(np.eye(G, dtype=bool), 0.0,
                          np.where(same_node, 1.0 / topo.intra_node_bandwidth, 1.0 / topo.inter_node_bandwidth)) * B / G
        self.node = node
        # seconds a GPU spends receiving one more distinct token (standard dataflow, dispatch and combine), and
        # the same averaged over the GPUs (what the mean GPU time gains)
        self.c_dist = 2.0 * B * ((n - 1) / (G * topo.intra_node_bandwidth) + (G - n) / (G * topo.inter_node_bandwidth))
        self.c_dup = self.c_dist / G

    def cost_matrix(self, l: int, X: np.ndarray, with_coactivation: bool = True) -> np.ndarray:
        """``[E, G]`` linearised seconds of putting expert e on GPU g (whole expert, before the 1/r share)."""
        d = self.d
        E, G = d.E, self.G
        cost = np.zeros((E, G))
        if d.coherent and d.T is not None:
            # copies between anchors and serving GPUs: dispatch into l, dispatch into l+1, combine within l
            if l >= 1:
                Pp = _shares(X[l - 1], E, self.gpu, G)
                cost += (Pp.T @ d.T[l - 1]).T @ self.K
            if l + 1 < d.L:
                Pn = _shares(X[l + 1], E, self.gpu, G)
                cost += (d.T[l] @ Pn) @ self.K.T
            P = _shares(X[l], E, self.gpu, G)
            cost += (d.Q[l] @ P) @ self.K.T + (d.Q[l].T @ P) @ self.K
        if d.C is not None and with_coactivation:
            # duplicate copies of a token on one GPU: both phases of every layer (standard), or the first
            # layer's dispatch from home (coherent)
            phases = 2.0 if not d.coherent else 1.0 * (l == 0)
            if phases:
                P = _shares(X[l], E, self.gpu, G)
                logp0 = d.U[l] @ P + 0.5 * np.einsum("ag,ag->g", P, d.Kw[l] @ P)
                # first-order growth of the distinct tokens on g when e joins it
                grow = d.tokens[l] * np.exp(np.minimum(logp0, 0.0))[None, :] * -(d.U[l][:, None] + d.Kw[l] @ P)
                cost += phases / 2.0 * self.c_dup * grow
        return cost

    def solve_layer(self, l: int, X: np.ndarray, r: np.ndarray, cap: float) -> np.ndarray:
        """New slot row for layer l: exact assignment of pieces to slots, then a swap repair to ``cap``."""
        from scipy.optimize import linear_sum_assignment

        d = self.d
        E, G, m = d.E, self.G, self.m
        cost = self.cost_matrix(l, X)
        pieces = np.repeat(np.arange(E), r)  # [S]
        pc = cost[pieces] / r[pieces][:, None]  # [S, G]
        if d.current is not None and d.migration_cost > 0:
            cur = np.zeros((E, G), dtype=bool)
            ok = d.current[l] >= 0
            cur[d.current[l][ok], self.gpu[ok]] = True
            pc = pc + d.migration_cost * ~cur[pieces]
        if d.allowed_node is not None:
            pc = pc + BIG * (self.node[None, :] != d.allowed_node[l, pieces][:, None])
        self._layer = l
        rows, cols = linear_sum_assignment(np.repeat(pc, m, axis=1))
        g_of = np.empty(len(pieces), dtype=np.int64)
        g_of[rows] = cols // m
        g_of = self._fix_duplicates(pieces, g_of, pc)
        g_of = self._repair(l, pieces, g_of, r, pc, cap)
        order = np.lexsort((pieces, g_of))
        return pieces[order]

    def _fix_duplicates(self, pieces, g_of, pc):
        """Move a second replica of an expert off a GPU that already holds it (cheapest legal swap)."""
        G = self.G
        E = self.d.E
        for _ in range(len(pieces)):
            key = pieces * G + g_of
            srt = np.sort(key)
            dupk = srt[1:][srt[1:] == srt[:-1]]
            if dupk.size == 0:
                break
            i = int(np.nonzero(key == dupk[0])[0][1])
            e, g = pieces[i], g_of[i]
            has = np.zeros((E, G), dtype=bool)
            has[pieces, g_of] = True
            h = g_of
            legal = (h != g) & ~has[e, h] & ~has[pieces, g]
            if self.d.allowed_node is not None:
                an = self.d.allowed_node[self._layer]
                legal &= (self.node[h] == an[e]) & (self.node[g] == an[pieces])
            c = pc[i, h] + pc[np.arange(len(pieces)), g] - pc[i, g] - pc[np.arange(len(pieces)), h]
            c = np.where(legal, c, np.inf)
            j = int(np.argmin(c))
            if not np.isfinite(c[j]):
                break
            g_of[i], g_of[j] = g_of[j], g
        return g_of

    def _repair(self, l, pieces, g_of, r, pc, cap):
        """Swap pieces off the most loaded GPU until it is within ``cap`` x mean, losing the least gain per load."""
        d = self.d
        G = self.G
        x = d.load[l][pieces] / r[pieces]
        mean = x.sum() / G
        if mean <= 0:
            return g_of
        for _ in range(4 * len(pieces)):
            gl = np.bincount(g_of, weights=x, minlength=G)
            g = int(np.argmax(gl))
            if gl[g] <= cap * mean * (1 + 1e-9):
                break
            A = np.nonzero(g_of == g)[0]
            Bi = np.nonzero(g_of != g)[0]
            dl = x[A][:, None] - x[Bi][None, :]
            h = g_of[Bi]
            ok = (dl > 0) & (gl[h][None, :] + dl < gl[g])
            # no duplicate expert on either side
            has = np.zeros((d.E, G), dtype=bool)
            has[pieces, g_of] = True
            ok &= ~has[pieces[A]][:, h] & ~has[pieces[Bi], g][None, :]
            if d.allowed_node is not None:
                an = d.allowed_node[l]
                ok &= (self.node[h][None, :] == an[pieces[A]][:, None]) & (self.node[g] == an[pieces[Bi]])[None, :]
            loss = pc[A][:, h] + pc[Bi, g][None, :] - pc[A, g][:, None] - pc[Bi, h][None, :]
            score = np.where(ok, loss / np.maximum(dl, 1e-12), np.inf)
            i, j = np.unravel_index(np.argmin(score), score.shape)
            if not np.isfinite(score[i, j]):
                break
            a, b = A[i], Bi[j]
            g_of[a], g_of[b] = g_of[b], g
        return g_of


def solve_layer_columns(b: "Builder", l: int, X: np.ndarray, lam: float, rounds: int = 3,
                        linear: bool = True) -> np.ndarray:
    """Improve layer l by exact assignments of one slot column at a time (block coordinate descent in the layer).

    Column j holds the j-th slot of every GPU. With the other columns fixed, moving piece p onto GPU g changes
    that GPU's estimated time by ``dt[p, g] = alpha x load_p + c x (new distinct tokens)`` (pairwise
    estimate, exact for one added piece); the cost ``dt / G + lam x (2 t_g dt + dt^2) / (2 G mean_t)`` is the
    change of ``mean_g t_g + lam x sum_g t_g^2 / (2 G mean_t)`` (mean time plus a spread penalty), plus the
    linearised neighbour gains (coherent dataflow) and the migration penalty. Each column is a G x G assignment
    problem solved exactly; rounds repeat until nothing moves.
    """
    from scipy.optimize import linear_sum_assignment

    d = b.d
    E, G, m = d.E, b.G, b.m
    gpu = b.gpu
    row = X[l].copy()
    alpha = d.cost.seconds_per_assignment
    c_D = b.c_dist if not d.coherent else 0.5 * b.c_dist * (l == 0)
    # per-GPU seconds of the pair traffic an expert brings to a GPU (coherent; G x its share of the mean)
    lin = G * b.cost_matrix(l, X, with_coactivation=False) if linear else np.zeros((E, G))
    cur = None
    if d.current is not None and d.migration_cost > 0:
        cur = np.zeros((E, G), dtype=bool)
        ok = d.current[l] >= 0
        cur[d.current[l][ok], gpu[ok]] = True
    load = d.load[l]
    T = d.tokens[l]
    ar = np.arange(G)
    for _ in range(rounds):
        moved = 0
        for j in range(m):
            cols = ar * m + j
            pe = row[cols]  # [G] experts in the column
            rest = row.copy()
            rest[cols] = -1
            P = np.zeros((E, G))
            ok = rest >= 0
            np.add.at(P, (rest[ok], gpu[ok]), 1.0)
            cnt = np.bincount(row, minlength=E).astype(float)
            share = 1.0 / cnt[pe]  # [G]
            P_rest = P / cnt[:, None]
            L_rest = load @ P_rest
            dx = load[pe] * share  # [G] piece loads
            if d.C is not None:
                logp0 = d.U[l] @ P_rest + 0.5 * np.einsum("ag,ag->g", P_rest, d.Kw[l] @ P_rest)
                D_rest = np.maximum(T * -np.expm1(np.minimum(logp0, 0.0)), 0.0)
                delta = share[:, None] * (d.U[l][pe][:, None] + d.Kw[l][pe] @ P_rest)  # [G(piece), G(gpu)]
                dD = T * np.exp(np.minimum(logp0, 0.0))[None, :] * -np.expm1(np.minimum(delta, 0.0))
            else:
                D_rest = L_rest
                dD = np.broadcast_to(dx[:, None], (G, G))
            t_rest = alpha * L_rest + c_D * D_rest + (lin * P_rest).sum(axis=0)
            dt = alpha * dx[:, None] + c_D * dD + lin[pe] * share[:, None]
            mean_t = max(float((t_rest.sum() + dt.diagonal().sum()) / G), 1e-300)
            cost = dt / G + lam * (2 * t_rest[None, :] * dt + dt ** 2) / (2 * G * mean_t)
            if cur is not None:
                cost = cost + d.migration_cost * ~cur[pe]
            if d.allowed_node is not None:
                cost = cost + BIG * (b.node[None, :] != d.allowed_node[l, pe][:, None])
            cost = cost + BIG * (P[pe] > 0)  # the expert already has a replica on that GPU
            ri, ci = linear_sum_assignment(cost)
            new = np.empty(G, dtype=np.int64)
            new[ci] = pe[ri]
            moved += int((new != pe).sum())
            row[cols] = new
        if moved == 0:
            break
    return row


def _shares(X_row: np.ndarray, E: int, gpu: np.ndarray, G: int) -> np.ndarray:
    P = np.zeros((E, G))
    np.add.at(P, (X_row, gpu), 1.0)
    r = P.sum(axis=1, keepdims=True)
    return np.divide(P, r, out=np.zeros_like(P), where=r > 0)


def balanced_start(data: JointData, r: np.ndarray) -> np.ndarray:
    """``[L, S]`` a balanced start: pieces heaviest first into the lightest GPU with room (EPLB's packing), and
    the current plan where one is given with a migration cost."""
    d = data
    topo = d.topology
    G, m = topo.num_gpus, topo.slots_per_gpu
    node = topo.node_of_gpu()
    X = np.empty((d.L, topo.num_slots), dtype=np.int64)
    for l in range(d.L):
        pieces = np.repeat(np.arange(d.E), r[l])
        x = d.load[l][pieces] / r[l][pieces]
        gl = np.zeros(G)
        cnt = np.zeros(G, dtype=int)
        has = np.zeros((d.E, G), dtype=bool)
        g_of = np.empty(len(pieces), dtype=np.int64)
        for i in np.argsort(-x, kind="stable"):
            ok = (cnt < m) & ~has[pieces[i]]
            if d.allowed_node is not None:
                ok &= node == d.allowed_node[l, pieces[i]]
            if not ok.any():
                ok = cnt < m
            cand = np.nonzero(ok)[0]
            g = cand[np.argmin(gl[cand])]
            g_of[i] = g
            gl[g] += x[i]
            cnt[g] += 1
            has[pieces[i], g] = True
        X[l] = pieces[np.lexsort((pieces, g_of))]
    return X


def _sweeps(data: JointData, X: np.ndarray, sweeps: int, deadline: float, solve_layer) -> np.ndarray:
    """Block coordinate descent over layers, forward then backward: ``X[l] = solve_layer(l, X)`` in turn until
    ``sweeps`` passes are done or ``deadline`` (perf_counter seconds) passes."""
    for sweep in range(sweeps):
        order = range(data.L) if sweep % 2 == 0 else range(data.L - 1, -1, -1)
        for l in order:
            X[l] = solve_layer(l, X)
            if time.perf_counter() > deadline:
                return X
    return X


def construct_columns(data: JointData, r: np.ndarray, lam: float, sweeps: int, deadline: float,
                      start: np.ndarray | None = None) -> np.ndarray:
    """Sweeps where each layer is improved column by column (:func:`solve_layer_columns`); the neighbours' gains
    are refreshed at every visit."""
    b = Builder(data)
    X = balanced_start(data, r) if start is None else start.copy()
    return _sweeps(data, X, sweeps, deadline, lambda l, X: solve_layer_columns(b, l, X, lam))


def stratified_start(data: JointData, r: np.ndarray) -> np.ndarray:
    """``[L, S]`` pieces sorted by load and dealt in strata of G, snake order (stratum j fills column j: the j-th
    slot of every GPU), so that one column holds pieces of similar load."""
    topo = data.topology
    G, m = topo.num_gpus, topo.slots_per_gpu
    X = np.empty((data.L, topo.num_slots), dtype=np.int64)
    for l in range(data.L):
        pieces = np.repeat(np.arange(data.E), r[l])
        x = data.load[l][pieces] / r[l][pieces]
        order = pieces[np.argsort(-x, kind="stable")]
        grid = order.reshape(m, G).copy()
        grid[1::2] = grid[1::2, ::-1]
        X[l] = grid.T.reshape(-1)  # slot g*m + j holds stratum j's g-th piece
    return X


def construct(data: JointData, r: np.ndarray, cap: float, sweeps: int, deadline: float,
              start: np.ndarray | None = None) -> np.ndarray:
    """Sweeps (:func:`_sweeps`) from ``start`` where each layer is an exact assignment under a load cap."""
    b = Builder(data)
    X = balanced_start(data, r) if start is None else start.copy()
    return _sweeps(data, X, sweeps, deadline, lambda l, X: b.solve_layer(l, X, r[l], cap))


# ----------------------------------------------------------------------------------------------------------------
# Local search on the exact objective
# ----------------------------------------------------------------------------------------------------------------


def local_search(state: State, deadline: float, rng: np.random.Generator, max_passes: int = 50,
                 candidates: int = 12, say=None, layers: list[int] | None = None) -> int:
    """Improve ``state`` in place (every layer, or only ``layers``); returns the number of accepted moves. When a
    pass finds nothing, the screened neighbourhood widens (twice the candidates, up to 8x) before the search
    stops."""
    d = state.d
    m = state.m
    pool = np.arange(d.L) if layers is None else np.asarray(layers, dtype=np.int64)
    accepted = 0
    widest = 8 * candidates
    for p in range(max_passes):
        gained = 0
        order = rng.permutation(pool)
        for l in order:
            if time.perf_counter() > deadline:
                state.resync()
                return accepted
            for _ in range(m * 2):
                mv = _best_move(state, l, rng, candidates)
                if mv is None:
                    break
                state.apply(mv)
                accepted += 1
                gained += 1
        state.resync()
        after = state.objective()
        if say:
            say(f"local search pass {p + 1}: objective {after:.6g} ({gained} moves, {candidates} candidates)")
        if gained == 0:
            if candidates >= widest:
                break
            candidates *= 2
    return accepted


def _random_swap(state: State, X: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int]]:
    """A swap of a random piece with the piece closest in load ``x [S]`` on another random GPU, in layer row
    ``X [S]``."""
    gpu = state.gpu
    s1 = int(rng.integers(state.S))
    g2 = int(rng.integers(state.G - 1))
    g2 = g2 + (g2 >= gpu[s1])
    cand = np.nonzero(gpu == g2)[0]
    s2 = int(cand[np.argmin(np.abs(x[cand] - x[s1]))])
    return [(s1, int(X[s2])), (s2, int(X[s1]))]


def _restore(state: State, rows: dict[int, np.ndarray]) -> None:
    """Put the slot rows ``{layer: [S] row}`` back (exact incremental moves; a no-op where nothing changed)."""
    for l, row in rows.items():
        diff = np.nonzero(state.X[l] != row)[0]
        if diff.size:
            res = state.evaluate_move(l, [(int(s), int(row[s])) for s in diff])
            if res is None:  # a row the state held before is always legal
                raise RuntimeError("could not restore a layer the state held before")
            state.apply(res[2])
    state.resync()


def iterated_search(state: State, deadline: float, rng: np.random.Generator, swaps: int = 3,
                    patience: int | None = None, min_gain: float = 1e-3, max_kicks: int | None = None,
                    say=None) -> tuple[int, int]:
    """Iterated local search (Lourenco, Martin & Stuetzle, "Iterated Local Search", 2003) until ``deadline``: kick
    one layer with ``swaps`` random swaps of pieces of similar load between GPUs, descend (:func:`local_search`)
    on that layer and its neighbours (the only objective terms a kick touches), keep the result if the objective
    improved, else put the three layers back; stops when the last ``patience`` kicks (default: two per layer)
    gained less than ``min_gain`` of the objective together, or after ``max_kicks``. Returns (kicks, kicks kept)."""
    d = state.d
    best = state.objective()
    kicks = kept = 0
    patience = 2 * d.L if patience is None else patience
    history = [best]  # best objective after each kick
    while time.perf_counter() < deadline and (max_kicks is None or kicks < max_kicks):
        if len(history) > patience and history[-patience - 1] - best < min_gain * abs(best):
            break
        l = int(rng.integers(d.L))
        near = [ll for ll in (l - 1, l, l + 1) if 0 <= ll < d.L]
        saved = {ll: state.X[ll].copy() for ll in near}
        x = d.load[l][state.X[l]] / state.r[l][state.X[l]]
        for _ in range(swaps):
            res = state.evaluate_move(l, _random_swap(state, state.X[l], x, rng))
            if res is not None:
                state.apply(res[2])
        local_search(state, deadline, rng, layers=near)
        kicks += 1
        now = state.objective()
        if now < best - 1e-12 * abs(best):
            best = now
            kept += 1
        else:
            _restore(state, saved)
        history.append(best)
        if say and kicks % 10 == 0:
            say(f"iterated local search: {kicks} kicks, {kept} kept, objective {best:.6g}")
    if say:
        say(f"iterated local search: {kicks} kicks, {kept} kept, objective {state.objective():.6g}")
    return kicks, kept


def _weights(state: State) -> np.ndarray:
    """``[N]`` how much each profile counts in the objective (mean, or the worst profile)."""
    N = state.d.N
    if not state.d.worst:
        return np.full(N, 1.0 / N)
    w = np.zeros(N)
    w[int(np.argmax(state.profile_totals()))] = 1.0
    return w


def _attraction(state: State, l: int) -> np.ndarray | None:
    """``[E, G]`` how strongly expert e is tied to the experts on GPU g: adjacent-layer pair mass that would be
    local (coherent) or co-activation information with the GPU's experts (standard), in comparable units."""
    d = state.d
    A = None
    if state.use_T:
        A = np.zeros((d.E, state.G))
        if l >= 1:
            A += state.Vin[l].T
        if l + 1 < d.L:
            A += state.Vout[l]
        A += state.QP[l] + state.QtP[l]
    elif state.KP is not None:
        A = state.KP[l] * d.tokens[l]
    if state.H is not None:  # affinity_weight: k x k pairs with the neighbours' GPUs, in token copies
        K = np.zeros((d.E, state.G))
        if l >= 1:
            K += d.aff[l - 1].T @ state.H[l - 1]
        if l + 1 < d.L:
            K += d.aff[l] @ state.H[l + 1]
        K *= d.aff_cost * d.topology.intra_node_bandwidth / d.cost.token_bytes
        A = K if A is None else A + K
    return A


def _best_move(state: State, l: int, rng: np.random.Generator, candidates: int):
    """The best improving move at layer l among screened swaps and replica re-targets (or None)."""
    d = state.d
    G, m, S = state.G, state.m, state.S
    gpu = state.gpu
    w = _weights(state)
    tg = np.tensordot(w, state.tg[l], axes=1)  # [G]
    gstar = int(np.argmax(tg))
    X = state.X[l]
    r = state.r[l]
    x = np.tensordot(w, d.loads[:, l, :], axes=1)[X] / r[X]  # piece loads [S]
    Lg = np.tensordot(w, state.Lg[l], axes=1)
    kappa = tg[gstar] / max(Lg[gstar], 1e-300)  # seconds per unit load on the slowest GPU
    A = np.nonzero(gpu == gstar)[0]
    Bi = np.nonzero(gpu != gstar)[0]
    dl = x[A][:, None] - x[Bi][None, :]
    h = gpu[Bi]
    new_partner = tg[h][None, :] + kappa * dl
    drop = np.minimum(kappa * dl, tg[gstar] - new_partner)
    held = state.P[l] > 0
    legal = (dl > 0) & ~held[X[A]][:, h] & ~held[X[Bi], gstar][None, :]
    score = np.where(legal, drop, -np.inf)
    moves: list[list[tuple[int, int]]] = []
    flat = score.ravel()
    k = min(candidates, int(np.isfinite(flat).sum()))
    if k > 0:
        top = np.argpartition(-flat, k - 1)[:k]
        for t in top:
            i, j = divmod(int(t), len(Bi))
            s1, s2 = int(A[i]), int(Bi[j])
            moves.append([(s1, int(X[s2])), (s2, int(X[s1]))])
    # affinity / co-activation moves anywhere (plateaus): an expert drawn by how much it would gain on its most
    # attractive GPU, swapped there with the piece of that GPU that is least attached and closest in load
    attract = _attraction(state, l)  # [E, G] or None
    if attract is not None:
        here = attract[X, gpu]  # [S] attraction of each piece to its own GPU
        best_g = np.argmax(np.where(held[X], -np.inf, attract[X]), axis=1)  # [S]
        gain = attract[X, best_g] - here
        pos = np.nonzero(gain > 0)[0]
        if pos.size:
            p = gain[pos] / gain[pos].sum()
            picks = rng.choice(pos, size=min(pos.size, max(2, candidates // 3)), replace=False, p=p)
            for s1 in picks:
                g2 = int(best_g[s1])
                cand = np.nonzero((gpu == g2) & ~held[X][:, gpu[s1]])[0]
                if cand.size == 0:
                    continue
                loss = attract[X[cand], g2] - attract[X[cand], gpu[s1]]
                mism = np.abs(x[cand] - x[s1]) / max(float(x.mean()), 1e-300)
                score = loss / max(float(gain[s1]), 1e-300) + mism
                s2 = int(cand[np.argmin(score)])
                moves.append([(int(s1), int(X[s2])), (s2, int(X[s1]))])
    for _ in range(2):
        moves.append(_random_swap(state, X, x, rng))
    # replica re-targets: give a spare replica (r >= 2) to the heaviest piece on the slowest GPU
    if S > d.E:
        hot = int(X[A[np.argmax(x[A])]])
        if r[hot] < G:
            spare = np.nonzero((r[X] >= 2) & (X != hot) & ~held[hot][gpu])[0]
            if spare.size:
                loss = d.load[l][X[spare]] / (r[X[spare]] - 1) - d.load[l][X[spare]] / r[X[spare]]
                for s in spare[np.argsort(loss)[:max(2, candidates // 3)]]:
                    moves.append([(int(s), hot)])
        # and take a replica away from the slowest GPU, giving it to the heaviest piece elsewhere
        mine = A[r[X[A]] >= 2]
        if mine.size:
            s = int(mine[np.argmin(x[mine])])
            others = np.argsort(-d.load[l] / (r + 1))[:4]
            for e in others:
                if e != X[s] and not held[e, gstar] and r[e] < G:
                    moves.append([(s, int(e))])
    base = state.objective()
    tol = 1e-12 * max(abs(base), 1e-300)
    sec_tol = 1e-9 * max(float((state.tg[l] ** 2).sum()), 1e-300)
    best, best_key = None, (-tol, -sec_tol)
    for mv in moves:
        if mv[0][1] == X[mv[0][0]]:
            continue
        res = state.evaluate_move(l, mv)
        if res is None:
            continue
        obj, dsec, payload = res
        dobj = obj - base
        if dobj > tol:
            continue
        key = (min(dobj, 0.0) if dobj < -tol else 0.0, dsec)
        if key[0] < best_key[0] - tol or (abs(key[0] - best_key[0]) <= tol and key[1] < best_key[1]):
            best, best_key = payload, key
    return best


# ----------------------------------------------------------------------------------------------------------------
# Exact enumeration (tiny instances)
# ----------------------------------------------------------------------------------------------------------------


def _layer_options(E: int, G: int, m: int) -> list[np.ndarray]:
    """Every slot row (up to slot order within a GPU): per GPU m distinct experts, every expert somewhere."""
    combos = list(itertools.combinations(range(E), m))
    rows = []
    for pick in itertools.product(combos, repeat=G):
        flat = np.concatenate(pick)
        if np.unique(flat).size == E:
            rows.append(flat)
    return rows


def count_placements(E: int, G: int, m: int, L: int) -> float:
    """Number of distinct placements (up to slot order inside a GPU), or inf when obviously huge."""
    per_gpu = G * math.log(max(math.comb(E, m), 1))
    if per_gpu > math.log(2e5):
        return math.inf
    log = L * math.log(max(len(_layer_options(E, G, m)), 1))
    return math.exp(log) if log < 700 else math.inf


def enumerate_exact(data: JointData, deadline: float) -> tuple[np.ndarray, float] | None:
    """Best placement by exhaustive search, or None if the deadline passes first."""
    topo = data.topology
    rows = _layer_options(data.E, topo.num_gpus, topo.slots_per_gpu)
    best, best_X = np.inf, None
    for combo in itertools.product(range(len(rows)), repeat=data.L):
        if time.perf_counter() > deadline:
            return None
        X = np.stack([rows[i] for i in combo])
        v = objective_of(data, X)
        if v < best - 1e-15:
            best, best_X = v, X
    return best_X, best


# ----------------------------------------------------------------------------------------------------------------
# The objective from scratch, and the solver
# ----------------------------------------------------------------------------------------------------------------


def affinity_bound(data: JointData) -> float:
    """Lower bound on the ``affinity_weight`` term: without redundant slots an expert of layer l shares its GPU
    with m experts of layer l+1, so at most its m largest pairs (and each next-layer expert's m largest) are
    local (:func:`solvers.joint_bound.max_local_mass`); with redundant slots 0."""
    if data.aff is None or data.topology.num_slots > data.E:
        return 0.0
    m = data.topology.slots_per_gpu
    cross = sum(float(K.sum()) - max_local_mass(K, m) for K in data.aff)
    return data.aff_cost * max(cross, 0.0)


def objective_of(data: JointData, X: np.ndarray) -> float:
    """Exact counts objective of ``X [L, S]`` computed from scratch (for one profile and no migration it equals
    ``solvers.cost.estimate_layer_seconds(...).sum()``)."""
    return State(data, X).objective()


def solve(problem: Problem, options: Options) -> Result:
    """Joint placement minimising the estimated MoE time (see the module docstring)."""
    from solvers._blas import blas_threads

    with blas_threads(options.threads or 1):
        return _solve(problem, options)


def _solve(problem: Problem, options: Options) -> Result:
    t0 = time.perf_counter()
    limit = options.time_limit
    deadline = t0 + (limit if limit is not None else 1e9) * 0.97
    p = Params(options.params, "joint", PARAMS)
    cfg = _search_settings(p)
    data = prepare(problem, options, p)
    rng = np.random.default_rng(options.seed)
    topo = data.topology
    G, m = topo.num_gpus, topo.slots_per_gpu
    say = options.say
    lb = layer_bounds(data.loads, topo, data.cost, data.T, data.C, data.Q, max_replicas=G,
                      lp_seconds=cfg["bound_lp"], counted=data.ids is not None,
                      token_positions=data.pos_ids is not None)
    bound = total_bound(lb, data.worst) + affinity_bound(data)
    stats: dict = {"dataflow": data.cost.dataflow, "objective": "worst" if data.worst else "expected",
                   "profiles": data.N, "migration_cost": data.migration_cost,
                   "distinct_tokens": "pairwise estimate" if data.ids is None else
                   f"counted on {data.ids.shape[1]} tokens",
                   "bound_seconds": time.perf_counter() - t0}
    if data.coherent:
        stats["token_positions"] = ("previous anchors' served shares" if data.pos_ids is None else
                                    f"replayed on {data.pos_ids.shape[1]} tokens")

    if count_placements(data.E, G, m, data.L) <= cfg["exact_limit"]:
        found = enumerate_exact(data, deadline)
        if found is not None:
            X, obj = found
            return _result(X, obj, obj, "optimal", t0, data, {**stats, "method": "enumeration"})

    # replica counts from the profile-normalised mean load (robust to which profile is hot)
    norm = data.loads / np.maximum(data.loads.sum(axis=2, keepdims=True), 1e-300)
    r = layer_replicas(data, norm.mean(axis=0))
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
        chain_start = topo.num_slots == data.E if cfg["chain_start"] is None else cfg["chain_start"]
        if (problem.routes is not None or problem.transitions is not None) and data.L > 1 and chain_start \
                and time.perf_counter() < c_deadline:
            # an affinity chain is another good start under the standard dataflow too: its assignments see the
            # anchor pairs (co-activation) with whole-layer exactness. Not by default with redundant slots: there it
            # gave no better plan (8 or 16 GPUs + 16 redundant, docs/benchmarks.md) and the column start gets its
            # construction time
            T, Q = anchor_stats(problem, data.load, _smoothing(p))
            chain = replace(data, cost=replace(data.cost, dataflow="coherent"), T=T, Q=Q)
            cap = cfg["chain_cap"]
            candidates.append((f"chain cap {cap}", construct(chain, r, cap, cfg["sweeps"] or 8, c_deadline,
                                                             start=base)))
    scored, built = [], {}
    for name, X in candidates:
        built[name] = State(data, X)  # scored from scratch, then reused by the descent from this start
        v = built[name].objective()
        scored.append((v, name, X))
        say(f"construction {name}: objective {v:.6g}")
    # the column construction trades a little balance for co-activation that the local search turns into time, so
    # it goes first; then the others by objective (the bare balanced start only when nothing else was built)
    order = sorted(scored, key=lambda c: (c[1] != "columns" or data.current is not None, c[0]))
    if len(order) > 1:
        order = [c for c in order if c[1] != "balanced" or data.current is not None] or order
    stats["construction"] = {name: v for v, name, _ in scored}
    stats["construction_seconds"] = time.perf_counter() - t0
    state, picked, starts = None, None, {}
    search = cfg["local_search"]
    built = {name: built[name] for _, name, _ in (order if search else order[:1])}  # drop states never descended
    first_secs = None
    for _, name, _ in (order if search else order[:1]):
        # another start only when a descent as long as the first still fits
        if state is not None and deadline - time.perf_counter() < 1.2 * first_secs:
            break
        t_ls = time.perf_counter()
        st = built.pop(name)
        moves = local_search(st, deadline, rng, say=say) if search else 0
        if first_secs is None:
            first_secs = time.perf_counter() - t_ls
        starts[name] = st.objective()
        if state is None or starts[name] < state.objective():
            state, picked = st, name
        stats["local_search_moves"] = stats.get("local_search_moves", 0) + moves
    built.clear()
    stats["construction_pick"] = picked
    stats["starts"] = starts
    if search and cfg["iterated"] and time.perf_counter() < deadline:
        stats["kicks"], stats["kicks_kept"] = iterated_search(state, deadline, rng, say=say)
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


SOLVERS = {"joint": solve}
