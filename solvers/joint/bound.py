"""A valid lower bound on the counts-model step time (:func:`solvers.cost.estimate_layer_seconds`).

Every placement of every layer satisfies, for each layer l and workload profile n,

    t_l = max_g (compute_g + comm_g) >= max( LB_compute, LB_mean )

- ``LB_compute = alpha x max(total / G, p*)``: the busiest GPU carries at least the mean load and at least the
  smallest achievable largest piece ``p* = min over replica counts of max_e load_e / r_e`` (water-filling the
  S - E redundant slots onto the heaviest pieces, at most one replica per GPU, is optimal for that min-max).
- ``LB_mean = alpha x total / G + (lower bound on the mean communication time)``: the maximum is at least the mean.

  * standard dataflow: the GPUs together receive ``sum_g distinct_g`` token copies, at least the load minus the
    largest possible duplicate count; a GPU holds at most m slots, so expert a shares a GPU with at most
    ``m - 1`` other experts and the duplicates are at most ``1/2 sum_a top_{m-1}(coactivation[a, :])``, or the
    fractional b-matching bound (:func:`max_colocated_pairs`), or with ``lp_seconds`` the b-matching plus
    triangle cuts (:func:`max_colocated_pairs_lp`). When the objective counts distinct tokens on the tokens
    (``counted``), the Dawson-Sankoff inequality is used instead of "load minus pairs": a token with J of its
    experts on a GPU reaches it once, and ``[J >= 1] >= 2J/(j+1) - 2 C(J, 2)/(j(j+1))`` for every integer j >= 1
    (Dawson & Sankoff, "An inequality for probabilities", 1967), so the copies are at least
    ``2 S1/(j+1) - 2 S2/(j(j+1))`` with S1 the load and S2 the co-located pairs (:func:`dawson_sankoff`); j = 1 is
    "load minus pairs", and with many co-located pairs j = 2 or more is tighter. (The pairwise estimate the
    objective uses otherwise can fall below this bound, so it keeps j = 1 there.)
  * coherent dataflow (dispatch from the previous anchor, combine onto the anchor): a GPU h receives
    ``dd_h (load_h - local_h)`` dispatch copies and sends ``dd_h (load_h - anchored_h - local'_h)`` combine
    copies, with ``dd_h = distinct_h / load_h >= 1 - dup_h / load_h`` (with counted tokens the Dawson-Sankoff
    form ``2/(j+1) - 2 dup_h / (j (j+1) load_h)``, best j), so the copies of a layer are at least
    the load (minus the tokens, for the combine) minus the largest duplicate count minus the largest local
    mass: anchor-to-next-expert pairs on one GPU (a bipartite b-matching of the anchor transitions: a previous
    anchor shares a GPU with at most m experts of the next layer; with the position-aware served shares of
    :func:`solvers.cost.effective_share` a token uses the replica on its position's GPU whenever there is one,
    so an expert of the next layer with r replicas can be local to ``r x m`` anchors: the column capacities grow
    by m for each of the ``S - E`` redundant slots, at most ``G - 1`` per expert, see :func:`max_local_pairs`),
    anchor-to-other-expert pairs on one GPU (a b-matching with ``m - 1`` partners; served shares W satisfy
    ``sum_b sum_g W_ag W_bg <= m - 1`` like even ones). The same with ``m x gpus_per_node`` for a common node
    (at most ``nodes - 1`` extra nodes per expert) bounds the inter-node copies; the copies are sent at the
    cheapest link the node bound allows. Loads under W still sum to the total and an expert's largest piece is
    at least ``load / r``, so the compute terms hold as they are. Every expert is resident (the joint planner's
    placements).

Sum over layers; over profiles, the mean (expected objective) or the maximum (worst case) of the per-profile
bounds is a valid bound of the mean or maximum. A migration penalty is >= 0 and adds nothing. The bound relaxes
the coupling between layers (a layer's expert sits on one GPU for both of its boundaries), so it is loosest when
adjacent-layer affinity is strong and the coherent dataflow is asked for.
"""

from __future__ import annotations

import time

import numpy as np

from solvers.base import Topology
from solvers.cost import CostModel
from solvers.joint.data import JointData


def water_fill(load: np.ndarray, slots: int, max_replicas: int) -> tuple[np.ndarray, int]:
    """``([E] replicas, slots left over)``: every expert once, then each extra slot to the largest piece
    ``load / r`` (ties: lower expert id), at most ``max_replicas`` per expert. Minimises the largest piece."""
    import heapq

    E = load.shape[0]
    r = np.ones(E, dtype=np.int64)
    heap = [(-float(load[e]), e) for e in range(E)]
    heapq.heapify(heap)
    left = slots - E
    while left > 0 and heap:
        _, e = heapq.heappop(heap)
        if r[e] >= max_replicas:
            continue
        r[e] += 1
        left -= 1
        heapq.heappush(heap, (-float(load[e]) / r[e], e))
    return r, left


def min_max_piece(load: np.ndarray, slots: int, max_replicas: int) -> np.ndarray:
    """``[...]`` smallest achievable ``max_e load_e / r_e`` with ``sum_e r_e = slots``, ``1 <= r_e <= max_replicas``
    (reached by :func:`water_fill`).

    Args:
        load: ``[..., E]`` per-expert load.
    """
    load = np.asarray(load, dtype=np.float64)
    flat = load.reshape(-1, load.shape[-1])
    out = np.empty(flat.shape[0])
    for i, row in enumerate(flat):
        out[i] = (row / water_fill(row, slots, max_replicas)[0]).max() if row.size else 0.0
    return out.reshape(load.shape[:-1])


def _top_sum(mat: np.ndarray, n: int, axis: int) -> float:
    """Sum over the other axis of the ``n`` largest entries along ``axis`` of a ``[E, E]`` matrix."""
    E = mat.shape[axis]
    if n >= E:
        return float(mat.sum())
    if n <= 0:
        return 0.0
    part = -np.partition(-mat, n - 1, axis=axis)
    return float(np.take(part, np.arange(n), axis=axis).sum())


def max_local_mass(T: np.ndarray, per_group: int) -> float:
    """Upper bound on the pair mass of a ``[E, E]`` transition matrix that can be local when every group (GPU or
    node) holds ``per_group`` experts of each layer: ``min(row-wise, column-wise)`` sums of the top entries."""
    return min(_top_sum(T, per_group, axis=1), _top_sum(T, per_group, axis=0))


def max_colocated_pairs(pairs: np.ndarray, partners: int, iterations: int = 30) -> float:
    """Upper bound on ``sum_{a<b} pairs[a, b] y_ab`` over fractional b-matchings (``sum_b y_ab <= partners``,
    ``0 <= y <= 1``): the co-activated pairs that can share a GPU when a GPU holds ``partners + 1`` experts.

    Lagrangian dual ``min_{lam >= 0} partners x sum_a lam_a + sum_{a<b} max(0, pairs_ab - lam_a - lam_b)``; any
    lam gives a valid bound, so a few damped coordinate updates (lam_a = the ``partners``-th largest of
    ``pairs[a, :] - lam``) are enough; the best value seen is returned. Replicas (shares 1/r) satisfy the same
    constraints, so the bound holds for them too.
    """
    W = np.triu(np.asarray(pairs, dtype=np.float64), 1)
    W = W + W.T  # symmetric, zero diagonal (pairs[a, b] counts the unordered pair once)
    E = W.shape[0]
    if partners <= 0 or E < 2:
        return 0.0
    if partners >= E - 1:
        return float(np.triu(W, 1).sum())
    iu = np.triu_indices(E, 1)

    def value(lam):
        slack = W - lam[:, None] - lam[None, :]
        return float(partners * lam.sum() + np.maximum(slack[iu], 0.0).sum())

    lam = -np.partition(-W, partners - 1, axis=1)[:, partners - 1] / 2.0
    best = value(lam)
    for it in range(iterations):
        red = W - lam[None, :]
        np.fill_diagonal(red, -np.inf)
        target = np.maximum(-np.partition(-red, partners - 1, axis=1)[:, partners - 1], 0.0)
        lam = 0.5 * lam + 0.5 * target
        best = min(best, value(lam))
    return best


def max_colocated_pairs_lp(pairs: np.ndarray, partners: int, time_limit: float = 5.0, max_rounds: int = 30,
                           say=None) -> float:
    """A tighter upper bound than :func:`max_colocated_pairs` on the co-activated pair mass that can share a GPU:
    the b-matching LP plus the triangle inequalities of clique partitioning (Groetschel & Wakabayashi, "A cutting
    plane algorithm for a clustering problem", Math. Programming 1989), solved by cutting planes and column
    generation with OR-Tools' GLOP.

    Variables ``y_ab`` = co-located share of the pair, ``sum_g W_ag W_bg`` for shares W (rows sum to 1, entries in
    [0, 1]); constraints ``0 <= y <= 1``, ``sum_b y_ab <= partners`` and ``y_ab + y_ac - y_bc <= 1`` (per GPU
    ``xy + xz - yz <= x`` for x, y, z in [0, 1], summed over GPUs; so replicas and position-aware shares obey it).
    Any nonnegative multipliers of the degree rows and of the cuts give a valid bound by weak duality
    (``partners x sum lam + sum mu + sum_ab max(0, reduced cost)`` over every pair, present in the LP or not),
    so the value returned is valid whenever the loop stops (time limit, rounds); it is never above
    :func:`max_colocated_pairs`, its starting value.
    """
    from ortools.linear_solver import pywraplp  # GLOP (highspy cannot share a process with OR-Tools)

    W = np.triu(np.asarray(pairs, dtype=np.float64), 1)
    W = W + W.T
    E = W.shape[0]
    if partners <= 0 or E < 2:
        return 0.0
    if partners >= E - 1:
        return float(np.triu(W, 1).sum())
    t_end = time.perf_counter() + time_limit
    lp = pywraplp.Solver.CreateSolver("GLOP")
    objective = lp.Objective()
    objective.SetMaximization()
    degree = [lp.Constraint(-lp.infinity(), float(partners)) for _ in range(E)]
    cut_rows: list = []
    col_of = -np.ones((E, E), dtype=np.int64)  # column index of pair (a, b), a < b
    ends: list[tuple[int, int]] = []
    cols: list = []
    cuts: list[tuple[int, int, int]] = []  # columns (+, +, -) of each triangle cut

    def add_pairs(a_idx, b_idx):
        for a, b in zip(a_idx, b_idx):
            a, b = (int(a), int(b)) if a < b else (int(b), int(a))
            if a == b or col_of[a, b] >= 0:
                continue
            col_of[a, b] = len(ends)
            ends.append((a, b))
            v = lp.NumVar(0.0, 1.0, "")
            objective.SetCoefficient(v, float(W[a, b]))
            degree[a].SetCoefficient(v, 1.0)
            degree[b].SetCoefficient(v, 1.0)
            cols.append(v)

    q = min(E - 1, max(2 * partners, 12))
    top = np.argpartition(-W, q - 1, axis=1)[:, :q]
    add_pairs(np.repeat(np.arange(E), q), top.ravel())
    iu = np.triu_indices(E, 1)
    best = max_colocated_pairs(W, partners)
    for _ in range(max_rounds):
        lp.SetTimeLimit(max(int(1000 * (t_end - time.perf_counter())), 1))  # milliseconds
        if lp.Solve() != pywraplp.Solver.OPTIMAL:  # out of time: the best bound so far stands
            break
        y_col = np.array([v.solution_value() for v in cols])
        lam = np.abs(np.array([c.dual_value() for c in degree]))
        mu = np.abs(np.array([c.dual_value() for c in cut_rows]))
        # the Lagrangian bound of (lam, mu) over every pair
        ea = np.asarray(ends, dtype=np.int64)
        red = W - lam[:, None] - lam[None, :]
        if cuts:
            cc = np.asarray(cuts, dtype=np.int64)
            adj = np.zeros(len(ends))
            np.add.at(adj, cc[:, 0], mu)
            np.add.at(adj, cc[:, 1], mu)
            np.add.at(adj, cc[:, 2], -mu)
            red[ea[:, 0], ea[:, 1]] -= adj
        value = float(partners * lam.sum() + mu.sum() + np.maximum(red[iu], 0.0).sum())
        best = min(best, value)
        if time.perf_counter() > t_end:
            break
        # separation: y_ab + y_ac - y_bc > 1 at some apex a
        Y = np.zeros((E, E))
        Y[ea[:, 0], ea[:, 1]] = y_col
        Y = Y + Y.T
        new_cuts = []
        for a in range(E):
            nb = np.nonzero(Y[a] > 1e-6)[0]
            if nb.size < 2:
                continue
            ya = Y[a, nb]
            viol = ya[:, None] + ya[None, :] - Y[np.ix_(nb, nb)] - 1.0
            ii, jj = np.nonzero(np.triu(viol > 1e-6, 1))
            new_cuts.extend((float(viol[i, j]), a, int(nb[i]), int(nb[j])) for i, j in zip(ii, jj))
        # pricing: pairs outside the LP whose reduced cost is positive
        absent = red.copy()
        absent[ea[:, 0], ea[:, 1]] = 0.0
        pa, pb = np.nonzero(np.triu(absent > 1e-9 * max(float(W.max()), 1e-300), 1))
        if not new_cuts and pa.size == 0:
            break
        if pa.size:
            keep = np.argsort(-absent[pa, pb])[:5000]
            add_pairs(pa[keep], pb[keep])
        new_cuts.sort(reverse=True)
        for _, a, b, c in new_cuts[:20000]:
            add_pairs([b], [c])
            k = [col_of[min(a, b), max(a, b)], col_of[min(a, c), max(a, c)], col_of[min(b, c), max(b, c)]]
            cuts.append((int(k[0]), int(k[1]), int(k[2])))
            row = lp.Constraint(-lp.infinity(), 1.0)
            row.SetCoefficient(cols[k[0]], 1.0)
            row.SetCoefficient(cols[k[1]], 1.0)
            row.SetCoefficient(cols[k[2]], -1.0)
            cut_rows.append(row)
        if say:
            say(f"clique LP: bound {best:.6g}, {len(ends)} pairs, {len(cuts)} cuts")
    return best


def _top_copies(mu: np.ndarray, count: int, max_copies: int) -> float:
    """Sum of the ``count`` largest values of ``mu`` (>= 0) when each entry may be taken up to ``max_copies``
    times."""
    if count <= 0 or max_copies <= 0:
        return 0.0
    total, left = 0.0, count
    for v in np.sort(mu)[::-1]:
        if left <= 0 or v <= 0:
            break
        take = min(left, max_copies)
        total += take * float(v)
        left -= take
    return total


def max_local_pairs(T: np.ndarray, per_group: int, iterations: int = 40, extra_slots: int = 0,
                    max_copies: int = 0, row_extra: bool = False) -> float:
    """Upper bound on the adjacent-layer pair mass that can be local: a bipartite b-matching (each expert of
    either layer shares groups with at most ``per_group`` experts of the other layer, as a group holds
    ``per_group`` of each layer's slots; replicas split their share, so they obey the same limits).

    Lagrangian dual ``min m (sum_a lam_a + sum_b mu_b) + sum_ab max(0, T_ab - lam_a - mu_b)`` by alternating
    exact coordinate updates; any (lam, mu) >= 0 gives a valid bound, the best seen is returned (never above
    the row-wise and column-wise top-sum bound).

    ``extra_slots > 0`` is the position-aware case (coherent dataflow): a token at position p uses the replica
    of b on p's group whenever there is one, so the local mass is ``sum_ab T_ab z_ab`` with
    ``z_ab = sum_p P_prev[a, p] [b has a replica in p's group]`` (a's anchors spread over positions, ``P_prev``
    the previous layer's served shares: rows sum to 1, and a GPU's column to at most m, one per slot). Then ``z_ab <= 1`` and ``sum_b z_ab <= m`` as before, but
    ``sum_a z_ab <= m x (groups holding b)``: an expert with ``c_b`` extra groups has ``(1 + c_b) m`` column
    capacity, with ``sum_b c_b <= extra_slots`` (the redundant slots) and ``c_b <= max_copies``. The dual adds
    ``m sum_b c_b mu_b`` and its largest value over such c (the ``extra_slots`` largest mu, each at most
    ``max_copies`` times) keeps every (lam, mu) a valid bound for every replica allocation.

    ``row_extra``: each token has its own position (replayed positions, :func:`solvers.cost.replay_positions`), so
    ``z_ab`` is the share of the (a, b) tokens whose position holds b, and only ``z_ab <= 1``, ``z_ab = 0`` unless a
    and b share a group, hold: an anchor a with ``c_a`` extra groups shares groups with at most ``(1 + c_a) m``
    experts b, so rows get the same extra capacity as columns (a second ``m x`` top-copies term for lam; the
    previous layer's redundant slots are ``extra_slots`` too).
    """
    T = np.asarray(T, dtype=np.float64)
    E1, E2 = T.shape
    m = per_group
    extra = max(int(extra_slots), 0) if max_copies > 0 else 0
    if m >= min(E1, E2):
        return float(T.sum())

    rows_too = bool(row_extra and extra)

    def value(lam, mu):
        v = float(m * (lam.sum() + mu.sum()) + np.maximum(T - lam[:, None] - mu[None, :], 0.0).sum())
        if rows_too:
            v += m * _top_copies(lam, extra, max_copies)
        return v + m * _top_copies(mu, extra, max_copies) if extra else v

    # without extra slots: min(row-wise, column-wise) top sums; with them only the row-wise one (mu = 0) holds, and
    # with extra rows too only the total
    best = max_local_mass(T, m) if not extra else (float(T.sum()) if rows_too else _top_sum(T, m, axis=1))
    lam, mu = np.zeros(E1), np.zeros(E2)
    for _ in range(iterations):
        red = T - mu[None, :]
        lam = np.maximum(-np.partition(-red, m, axis=1)[:, m], 0.0)  # (m+1)-th largest: m entries stay positive
        red = T - lam[:, None]
        mu = np.maximum(-np.partition(-red, m, axis=0)[m, :], 0.0)
        best = min(best, value(lam, mu))
        if extra:
            # the columns with extra capacity want a smaller mu: try the same lam with those mu dropped
            keep = mu.copy()
            keep[np.argsort(-mu)[:extra]] = 0.0
            best = min(best, value(lam, keep))
            if rows_too:
                keep_l = lam.copy()
                keep_l[np.argsort(-lam)[:extra]] = 0.0
                best = min(best, value(keep_l, keep), value(keep_l, mu))
    return best


def pair_allowance(coactivation: np.ndarray, slots_per_gpu: int, lp_seconds: float = 0.0) -> np.ndarray:
    """``[L]`` most co-activated pair mass of ``coactivation [L, E, E]`` that can share GPUs holding
    ``slots_per_gpu`` slots: the smaller of the row-wise top sums and the b-matching bound, or with
    ``lp_seconds > 0`` (shared by the layers) the triangle-cut LP (:func:`max_colocated_pairs_lp`)."""
    L = coactivation.shape[0]
    p = slots_per_gpu - 1
    out = np.empty(L)
    for l in range(L):
        pairs = coactivation[l]
        b = max_colocated_pairs_lp(pairs, p, lp_seconds / L) if lp_seconds > 0 else max_colocated_pairs(pairs, p)
        out[l] = min(0.5 * _top_sum(pairs, p, axis=1), b)
    return out


def dawson_sankoff(s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """Lower bound ``max_j 2 s1/(j+1) - 2 s2/(j(j+1))`` (j >= 1 integer, the best j = floor(2 s2 / s1) + 1) on the
    number of tokens that reach a set, from ``s1`` token-member incidences and ``s2`` pairs of members of one token
    (elementwise, clipped at 0)."""
    s1 = np.asarray(s1, dtype=np.float64)
    s2 = np.maximum(np.asarray(s2, dtype=np.float64), 0.0)
    j = np.floor(2.0 * s2 / np.where(s1 > 0, s1, 1.0)) + 1.0
    return np.maximum(2.0 * s1 / (j + 1.0) - 2.0 * s2 / (j * (j + 1.0)), 0.0)


def standard_mean_comm(distinct_total: np.ndarray, topology: Topology, cost: CostModel, phases: int) -> np.ndarray:
    """Lower bound on ``mean_g comm_g`` (standard dataflow) when the GPUs receive ``distinct_total`` copies."""
    G, n = topology.num_gpus, topology.gpus_per_node
    per = (n - 1) / topology.intra_node_bandwidth + (G - n) / topology.inter_node_bandwidth
    return phases * cost.token_bytes * distinct_total / (G * G) * per


def deepep_mean_comm(distinct_total: np.ndarray, tokens: np.ndarray, topology: Topology, cost: CostModel) -> np.ndarray:
    """Lower bound on ``mean_g comm_g`` under deepep-normal (dispatch + combine) when the GPUs receive at least
    ``distinct_total`` token copies and at least ``tokens`` tokens reach some node.

    A GPU's phase takes the longer of its NVLink and RDMA parts, each at least what it receives, so the mean over
    GPUs is at least the larger of the mean NVLink and the mean RDMA receive time; with homes spread evenly the
    GPUs receive ``sum_g D_g (G - Nn) / G`` NVLink copies and ``sum_N D_N (G - n) / G`` RDMA copies
    (:mod:`solvers.comm.deepep_normal`), with ``sum_N D_N >= tokens``."""
    from solvers.cost import message_bytes

    G, n = topology.num_gpus, topology.gpus_per_node
    Nn = G // n
    nv = distinct_total * (G - Nn) / (G * G) / topology.intra_node_bandwidth
    rd = tokens * (G - n) / (G * G) / topology.inter_node_bandwidth
    return np.maximum(nv, rd) * (message_bytes(cost, "dispatch") + message_bytes(cost, "combine"))


def deepep_ll_per_assignment(topology: Topology, cost: CostModel) -> float:
    """Seconds of deepep-ll traffic (dispatch + combine) a GPU spends at least per token-expert copy it serves: it
    receives ``(n - 1) / G`` of them over NVLink and ``(G - n) / G`` over RDMA (homes spread evenly), and a phase
    takes the longer part (:mod:`solvers.comm.deepep_ll`)."""
    from solvers.cost import message_bytes

    G, n = topology.num_gpus, topology.gpus_per_node
    nv_frac, rd_frac = ((n - 1) / G, (G - n) / G) if cost.ll_nvlink else (0.0, (G - 1) / G)
    per = max(nv_frac / topology.intra_node_bandwidth, rd_frac / topology.inter_node_bandwidth)
    return per * (message_bytes(cost, "dispatch") + message_bytes(cost, "combine"))


def layer_bounds(load: np.ndarray, topology: Topology, cost: CostModel, transitions: np.ndarray | None = None,
                 coactivation: np.ndarray | None = None, anchor_pairs: np.ndarray | None = None,
                 max_replicas: int | None = None, lp_seconds: float = 0.0,
                 dup_max: np.ndarray | None = None, counted: bool = False,
                 token_positions: bool = False, tokens: np.ndarray | None = None) -> np.ndarray:
    """``[N, L]`` lower bound on each layer's counts-model seconds for each profile.

    Args:
        load: ``[N, L, E]`` per-profile load; coactivation ``[L, E, E]``, and for the coherent dataflow the anchor
            transitions ``[L-1, E, E]`` and anchor pairs ``[L, E, E]`` (:func:`solvers.cost.anchor_counts`), in the
            units of the mean profile (they are scaled by each profile's token count).
        lp_seconds: > 0 tightens the GPU-level pair bounds with :func:`max_colocated_pairs_lp` (triangle cuts),
            this many seconds in all, shared evenly by the layers.
        dup_max: ``[L]`` co-activated pair allowances already computed (:func:`pair_allowance`), or None.
        counted: the objective counts distinct tokens on the tokens: use :func:`dawson_sankoff` for the copies.
        token_positions: the coherent objective replays each token's position (``max_local_pairs(row_extra=True)``).
        tokens: ``[L]`` tokens per layer in mean-profile units (deepep-normal: at least this many reach a node).
    Under ``cost.comm`` deepep-ll every copy a GPU serves costs it at least :func:`deepep_ll_per_assignment`, so a
    GPU's time is at least ``(alpha + that) x its load``; under deepep-normal the mean communication is bounded by
    :func:`deepep_mean_comm`.
    """
    N, L, E = load.shape
    G, S = topology.num_gpus, topology.num_slots
    m = topology.slots_per_gpu
    alpha = cost.seconds_per_assignment
    total = load.sum(axis=2)  # [N, L]
    mean_total = np.maximum(total.mean(axis=0), 1e-300)  # [L]
    scale = total / mean_total  # [N, L]
    p_star = min_max_piece(load, S, max_replicas or G)  # [N, L]
    lb_compute = alpha * np.maximum(total / G, p_star)
    # duplicates (standard) and local pair mass (coherent), in mean-profile units
    lp_c = coactivation is not None and dup_max is None
    calls = L * (lp_c + (cost.dataflow != "standard" and anchor_pairs is not None))
    per_call = lp_seconds / max(calls, 1)
    if dup_max is None:
        dup_max = pair_allowance(coactivation, m, per_call * L) if coactivation is not None else np.zeros(L)
    distinct_lb = np.maximum(total - dup_max[None, :] * scale, 0.0)  # [N, L]
    if cost.dataflow == "standard":
        if counted:
            distinct_lb = dawson_sankoff(total, dup_max[None, :] * scale)
        if cost.comm == "deepep-ll":  # linear in each GPU's load: the busiest piece and the mean GPU pay it too
            per = alpha + deepep_ll_per_assignment(topology, cost)
            return per * np.maximum(total / G, p_star)
        if cost.comm == "deepep-normal":
            tok = np.zeros(L) if tokens is None else np.asarray(tokens, dtype=float)
            reach = np.maximum(tok[None, :] * scale, distinct_lb / topology.gpus_per_node)  # a node has n GPUs
            comm_lb = deepep_mean_comm(distinct_lb, reach, topology, cost)
        else:
            comm_lb = standard_mean_comm(distinct_lb, topology, cost, phases=2)
    else:
        comm_lb = np.zeros((N, L))
        comm_lb[:, 0] += standard_mean_comm(distinct_lb[:, 0], topology, cost, phases=1)
        n = topology.gpus_per_node
        bi, be = topology.intra_node_bandwidth, topology.inter_node_bandwidth
        multi = topology.num_nodes > 1

        for l in range(L):
            parts = []  # (pair counts [E, E] whose column sums are the experts' shares of the copies, local mass)
            if l >= 1:  # dispatch from the previous anchors (to the replica the dispatch rule picks)
                Tl = transitions[l - 1]
                parts.append((Tl, max_local_pairs(Tl, m, extra_slots=S - E, max_copies=G - 1,
                                                  row_extra=token_positions),
                              max_local_pairs(Tl, m * n, extra_slots=S - E, max_copies=topology.num_nodes - 1,
                                              row_extra=token_positions) if multi else None))
            Ql = anchor_pairs[l]  # combine onto the anchors
            sym = Ql + Ql.T
            local = max_colocated_pairs_lp(sym, m - 1, per_call) if per_call > 0 else max_colocated_pairs(sym, m - 1)
            parts.append((Ql, local, max_colocated_pairs(sym, m * n - 1) if multi else None))
            for pairs, local, local_node in parts:
                # a GPU's copies are dd_h x its pair mass Y_h, dd_h >= 1 - dup_h / load_h and Y_h <= c x load_h
                col = pairs.sum(axis=0)
                lo = load[:, l, :]
                c = np.where(col[None, :] > 0, scale[:, l][:, None] * col[None, :] / np.where(lo > 0, lo, 1e-300), 0.0)
                c = np.maximum(c.max(axis=1), 1.0)  # [N]
                tp = float(pairs.sum())
                if counted:  # dd_h >= 2/(j+1) - 2 dup_h / (j (j+1) load_h), the per-GPU Dawson-Sankoff floor
                    x = dawson_sankoff(scale[:, l] * (tp - local), scale[:, l] * c * dup_max[l])
                    xe = dawson_sankoff(scale[:, l] * (tp - local_node), scale[:, l] * c * dup_max[l]) if multi \
                        else np.zeros(N)
                else:
                    x = np.maximum(scale[:, l] * (tp - local - c * dup_max[l]), 0.0)
                    xe = np.maximum(scale[:, l] * (tp - local_node - c * dup_max[l]), 0.0) if multi else np.zeros(N)
                if be <= bi:
                    secs = np.maximum(x - xe, 0.0) / bi + xe / be
                else:
                    secs = np.maximum(x, xe) / be
                comm_lb[:, l] += cost.token_bytes / G * secs
    lb_mean = alpha * total / G + comm_lb
    return np.maximum(lb_compute, lb_mean)


def total_bound(layer_lb: np.ndarray, worst_case: bool = False) -> float:
    """Bound on the objective from ``[N, L]`` per-layer bounds: mean (expected) or max (worst case) over profiles."""
    per_profile = layer_lb.sum(axis=1)
    return float(per_profile.max() if worst_case else per_profile.mean())


def affinity_bound(data: JointData) -> float:
    """Lower bound on the ``affinity_weight`` term: without redundant slots an expert of layer l shares its GPU
    with m experts of layer l+1, so at most its m largest pairs (and each next-layer expert's m largest) are
    local (:func:`solvers.joint.bound.max_local_mass`); with redundant slots 0."""
    if data.aff is None or data.topology.num_slots > data.E:
        return 0.0
    m = data.topology.slots_per_gpu
    cross = sum(float(K.sum()) - max_local_mass(K, m) for K in data.aff)
    return data.aff_cost * max(cross, 0.0)
