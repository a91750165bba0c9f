"""MoETuner's two-stage integer program: load-balanced expert clusters, then clusters onto GPUs across layers.

Reference: Go and Mahajan, "MoETuner: Optimized Mixture of Expert Serving with Balanced Expert Placement and
Token Routing", arXiv 2502.06643 (2025). No public code; this follows the paper's two ILPs.

Stage 1 (one program per layer; "ILP 1"): split the layer's experts into G clusters minimising
``sum_c |load_c - total / G|``::

    min   sum_c dev_c
    s.t.  sum_c y[i, c] = 1                                each expert in one cluster
          size_lo <= sum_i y[i, c] <= size_hi              cluster sizes
          dev_c >= +(G sum_i w_i y[i, c] - W)              (scaled by G to stay integral)
          dev_c >= -(G sum_i w_i y[i, c] - W)

Cluster sizes (``cluster_sizes``): ``"equal"`` (default; what serving stacks need: every GPU has the same number
of slots in every layer): each cluster has exactly ``slots_per_gpu`` physical experts; with redundant slots the
replica counts come first from EPLB's rule (largest load per replica), replicas share their expert's load evenly,
and two replicas of one expert never share a cluster. ``"unequal"`` (the paper): 1 to ``slots_per_gpu`` experts
per cluster, no replicas in the program; the per-GPU total over all layers is then fixed in stage 2, and slots a
GPU has left in a layer get replicas afterwards (EPLB's rule picks the expert, the least-loaded GPU with room
takes it). Without redundant slots both modes are the same program.

Stage 2 ("ILP 2"): map clusters to GPUs one-to-one in every layer. The traffic from GPU g to GPU g' at boundary
l -> l+1 is the transition count between the clusters placed there (all k x k pairs of a token's experts,
replicas splitting evenly); its cost is that traffic times ``intra_node_bandwidth / bandwidth(g, g')`` (1 inside
a node, 9 across nodes by default). Minimise the sum over boundaries of the heaviest GPU-pair cost (the tail of
the all-to-all)::

    min   sum_l t_l
    s.t.  p[l, c, g] one-to-one in each layer
          z[l, c, c', g, g'] >= p[l, c, g] + p[l+1, c', g'] - 1       (for g != g', traffic C_l[c, c'] > 0)
          t_l >= sum_{c, c'} C_l[c, c'] w(g, g') z[l, c, c', g, g']    for every g != g'
          sum_l size_l(cluster on g) = L E / G   for every g             (unequal sizes only)

``stage2="joint"`` solves this program over all layers at once (exact, with a time limit); it has
``(L-1) G^3 (G-1)`` z variables, so ``"auto"`` (default) uses it up to ``joint_max_terms`` (60,000: 4 to 5 GPUs
for a 26-layer model) and otherwise ``"sequential"``: layer 0 keeps cluster c on GPU c, then each next layer's
mapping is the exact optimum of its own boundary given the previous layer (one small program per boundary; the
chain as a whole is a heuristic). The joint program starts from the sequential solution. Unequal sizes need the
joint program (the per-GPU total couples all layers).

Reported objective and bound: stage 2's, given the stage-1 clusters (``stats["stage1"]`` has stage 1's, in
tokens). The bound is the larger of the joint program's bound and a counting bound valid for any mapping: at each
boundary at most a maximum-weight matching of the cluster traffic stays on one GPU, and the rest spreads over
``G (G-1)`` GPU pairs, so the heaviest pair carries at least its average. Gurobi's 2.5% gap tolerance from the
paper is the default ``mip_gap``.

Params (``Options.params``): ``cluster_sizes`` ("equal" | "unequal"), ``stage2`` ("auto" | "joint" |
"sequential"), ``mip_gap`` (0.025), ``stage1_share`` (0.4 of the time limit), ``joint_max_terms`` (60000).
"""

from __future__ import annotations

import numpy as np

from solvers import mip
from solvers._common import assign_with_capacity, fill_redundant
from solvers.base import Options, Problem, Result, SolverInputError, Topology, gap_of
from solvers.params import Params
from solvers.eplb import replicate_experts


# stage 1 ---------------------------------------------------------------------------------------------------------
def _items(load: np.ndarray, S: int, equal: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items to cluster for one layer: expert of each item ``[n]``, weight ``[n]``, replicas per expert ``[E]``."""
    E = len(load)
    if not equal or S == E:
        return np.arange(E), load.astype(np.float64), np.ones(E, dtype=np.int64)
    phy2log, _, cnt = replicate_experts(load[None, :], S)
    expert = phy2log[0]
    return expert, load[expert] / cnt[0][expert], cnt[0]


def _lpt(weight: np.ndarray, expert: np.ndarray, G: int, size_hi: int) -> np.ndarray:
    """Greedy clusters: heaviest item first into the lightest cluster with room that lacks its expert."""
    cluster = np.full(len(weight), -1)
    size = np.zeros(G, dtype=np.int64)
    total = np.zeros(G)
    holds = set()
    for i in np.argsort(-weight, kind="stable"):
        ok = [c for c in range(G) if size[c] < size_hi and (expert[i], c) not in holds]
        if not ok:
            ok = [c for c in range(G) if size[c] < size_hi]
        c = min(ok, key=lambda c: (total[c], size[c], c))
        cluster[i] = c
        size[c] += 1
        total[c] += weight[i]
        holds.add((expert[i], c))
    return cluster


def cluster_layer(weight: np.ndarray, expert: np.ndarray, G: int, size_lo: int, size_hi: int, options: Options,
                  time_limit: float | None, gap: float | None) -> tuple[np.ndarray, dict]:
    """MoETuner's ILP 1 for one layer.

    Args:
        weight: ``[n]`` load of each item (an expert, or a replica carrying its share); expert: ``[n]`` its expert.
    Returns:
        cluster ``[n]`` and a record with the objective ``sum_c |load_c - total / G|`` (in the weight's units),
        its bound and the solver status.
    """
    n = len(weight)
    order = np.argsort(-weight, kind="stable")
    w_int, scale = mip.integerize(weight)
    W = int(w_int.sum())
    model = mip.Model()
    y = model.new_vars((n, G))
    model.add_rows(y, 1, lo=1, hi=1)
    model.add_rows(y.T, 1, lo=size_lo, hi=size_hi)
    for e in np.unique(expert):
        reps = np.flatnonzero(expert == e)
        if 1 < len(reps) <= G:
            model.add_rows(y[reps].T, 1, hi=1)
    for k, i in enumerate(order[: G - 1]):  # clusters are interchangeable: the k-th heaviest item uses clusters <= k
        model.add(y[i, k + 1:], 1, hi=0)
    dev = model.new_vars(G, lb=0, ub=G * W)
    for c in range(G):
        model.add(np.concatenate([y[:, c], [dev[c]]]), np.concatenate([G * w_int, [-1]]), hi=W)
        model.add(np.concatenate([y[:, c], [dev[c]]]), np.concatenate([G * w_int, [1]]), lo=W)
    model.minimize(dev, 1)
    hint = _canonical(_lpt(weight, expert, G, size_hi), order, G)
    hint_ok = np.all(np.bincount(hint, minlength=G) >= size_lo)
    if hint_ok:
        model.set_hint(y, (hint[:, None] == np.arange(G)).astype(np.int64))
        loads = np.bincount(hint, weights=w_int, minlength=G).astype(np.int64)
        model.set_hint(dev, np.abs(G * loads - W))
    sol = mip.solve(model, options.backend, time_limit=time_limit, seed=options.seed, threads=options.threads, gap=gap)
    if sol.values is None:
        raise SolverInputError("MoETuner's clustering found no clusters within the time limit; raise --time-limit")
    cluster = sol.values[y].argmax(axis=1)
    loads = np.bincount(cluster, weights=weight, minlength=G)
    objective = float(np.abs(loads - weight.sum() / G).sum())
    slack = 2.0 * float(np.abs(weight - w_int / scale).sum())
    bound = None if sol.bound is None else min(objective, max(0.0, sol.bound / (G * scale) - slack))
    return cluster, {"status": sol.status, "objective": objective, "bound": bound}


def _canonical(cluster: np.ndarray, order: np.ndarray, G: int) -> np.ndarray:
    """Relabel clusters by first appearance in ``order`` (matches the symmetry-breaking rows)."""
    relabel, nxt = {}, 0
    for i in order:
        c = int(cluster[i])
        if c not in relabel:
            relabel[c] = nxt
            nxt += 1
    for c in range(G):
        if c not in relabel:
            relabel[c] = nxt
            nxt += 1
    return np.array([relabel[int(c)] for c in cluster])


# stage 2 ---------------------------------------------------------------------------------------------------------
def link_weights(topo: Topology) -> np.ndarray:
    """``[G, G]`` cost of one token on each GPU pair: 0 on the diagonal, 1 inside a node, intra/inter across."""
    node = topo.node_of_gpu()
    w = np.where(node[:, None] == node[None, :], 1.0, topo.intra_node_bandwidth / topo.inter_node_bandwidth)
    np.fill_diagonal(w, 0.0)
    return w


def boundary_cost(C: np.ndarray, pi_a: np.ndarray, pi_b: np.ndarray, w: np.ndarray) -> float:
    """Heaviest GPU-pair cost of one boundary: C ``[G, G]`` cluster traffic, pi ``[G]`` GPU of each cluster."""
    G = len(pi_a)
    traffic = np.zeros((G, G))
    traffic[np.ix_(pi_a, pi_b)] = C
    return float((traffic * w).max())


def _sequential(C: list[np.ndarray], w: np.ndarray, options: Options,
                deadline: mip.Deadline) -> tuple[np.ndarray, list]:
    """Layer 0 keeps cluster c on GPU c; each next layer gets the optimal mapping for its own boundary."""
    G = w.shape[0]
    pi = [np.arange(G)]
    records = []
    for l, Cl in enumerate(C):
        rows = np.empty((G, G))  # rows[g, c']: traffic from GPU g (cluster pi^-1(g)) to cluster c'
        rows[pi[-1]] = Cl
        q_hint = assign_with_capacity(np.array([rows[:, cp] for cp in range(G)]), np.ones(G, dtype=np.int64))
        cw, scale = mip.integerize(rows[:, :, None] * w[:, None, :])  # [g, c', g']
        model = mip.Model()
        q = model.new_vars((G, G))  # q[c', g']
        model.add_rows(q, 1, lo=1, hi=1)
        model.add_rows(q.T, 1, lo=1, hi=1)
        t = model.new_vars(1, lb=0, ub=int(cw.sum(axis=1).max()) + 1)[0]
        for g in range(G):
            for gp in range(G):
                if gp != g:
                    model.add(np.concatenate([[t], q[:, gp]]), np.concatenate([[1], -cw[g, :, gp]]), lo=0)
        model.minimize([t], [1])
        model.set_hint(q, (q_hint[:, None] == np.arange(G)).astype(np.int64))
        hint_t = np.zeros((G, G))
        for c in range(G):
            hint_t[:, q_hint[c]] += cw[:, c, q_hint[c]]
        model.set_hint([t], [int(hint_t.max())])
        sol = mip.solve(model, options.backend, time_limit=deadline.share(len(C) - l), seed=options.seed,
                        threads=options.threads)
        nxt = sol.values[q].argmax(axis=1) if sol.values is not None else q_hint
        pi.append(nxt)
        records.append(sol.status)
    return np.array(pi), records


def _joint(C: list[np.ndarray], w: np.ndarray, sizes: np.ndarray | None, hint: np.ndarray | None,
           options: Options, time_limit: float | None, gap: float | None):
    """MoETuner's ILP 2 over all layers: returns (pi ``[L, G]`` or None, mip.Solution, scale, slack)."""
    L, G = len(C) + 1, w.shape[0]
    cw_all = np.stack([Cl[:, :, None, None] * w[None, None, :, :] for Cl in C])  # [L-1, c, c', g, g']
    cw_int, scale = mip.integerize(cw_all)
    slack = float(np.abs(cw_all - cw_int / scale).reshape(L - 1, -1).sum(axis=1).sum())
    model = mip.Model()
    p = model.new_vars((L, G, G))  # p[l, c, g]
    for l in range(L):
        model.add_rows(p[l], 1, lo=1, hi=1)
        model.add_rows(p[l].T, 1, lo=1, hi=1)
    model.add([p[0, 0, 0]], [1], lo=1, hi=1)  # GPU labels: cluster 0 of layer 0 on GPU 0 (any GPU can be renamed 0)
    t = model.new_vars(L - 1, lb=0, ub=int(cw_int.sum(axis=(1, 2)).max()) + 1)
    for l in range(L - 1):
        c, cp = np.nonzero(C[l] > 0)
        pairs = [(g, gp) for g in range(G) for gp in range(G) if g != gp]
        z = model.new_vars((len(pairs), len(c)))
        for k, (g, gp) in enumerate(pairs):
            model.add_rows(np.stack([z[k], p[l, c, g], p[l + 1, cp, gp]], axis=1), [1, -1, -1], lo=-1)
            model.add(np.concatenate([[t[l]], z[k]]), np.concatenate([[1], -cw_int[l, c, cp, g, gp]]), lo=0)
        if hint is not None:
            on = (hint[l][c][None, :] == np.array([g for g, _ in pairs])[:, None]) & \
                 (hint[l + 1][cp][None, :] == np.array([gp for _, gp in pairs])[:, None])
            model.set_hint(z, on.astype(np.int64))
    if sizes is not None:
        total = int(sizes.sum())
        for g in range(G):
            model.add(p[:, :, g], sizes, lo=total // G, hi=-(-total // G))
    model.minimize(t, 1)
    if hint is not None:
        model.set_hint(p, (hint[:, :, None] == np.arange(G)).astype(np.int64))
        model.set_hint(t, [_hint_t(cw_int[l], hint[l], hint[l + 1]) for l in range(L - 1)])
    sol = mip.solve(model, options.backend, time_limit=time_limit, seed=options.seed, threads=options.threads, gap=gap)
    pi = None if sol.values is None else sol.values[p].argmax(axis=2)
    return pi, sol, scale, slack


def _hint_t(cw: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> int:
    """Heaviest GPU-pair cost (model units) of one boundary under the mappings pa, pb; cw ``[c, c', g, g']``."""
    G = len(pa)
    c, cp = np.meshgrid(np.arange(G), np.arange(G), indexing="ij")
    traffic = np.zeros((G, G), dtype=np.int64)
    traffic[pa[c], pb[cp]] = cw[c, cp, pa[c], pb[cp]]
    return int(traffic.max())


def _balanced_hint(sizes: np.ndarray) -> np.ndarray | None:
    """A mapping giving every GPU the same total cluster size, or None: each layer sends its largest cluster to
    the GPU with the smallest running total."""
    L, G = sizes.shape
    cum = np.zeros(G, dtype=np.int64)
    pi = np.zeros((L, G), dtype=np.int64)
    for l in range(L):
        gpus = np.argsort(cum, kind="stable")
        pi[l, np.argsort(-sizes[l], kind="stable")] = gpus
        cum[pi[l]] += sizes[l]
    if pi[0, 0] != 0:  # rename GPUs so that cluster 0 of layer 0 is on GPU 0 (all GPUs are alike here)
        swap = np.arange(G)
        swap[[0, pi[0, 0]]] = swap[[pi[0, 0], 0]]
        pi = swap[pi]
    return pi if cum.max() - cum.min() <= (1 if sizes.sum() % G else 0) else None


def stage2_bound(C: list[np.ndarray], w: np.ndarray) -> float:
    """Counting bound on stage 2: per boundary, (traffic - best on-GPU matching) / (G (G-1)) x cheapest link."""
    G = w.shape[0]
    if G == 1:
        return 0.0
    wmin = float(w[~np.eye(G, dtype=bool)].min())
    total = 0.0
    for Cl in C:
        match = assign_with_capacity(Cl, np.ones(G, dtype=np.int64))
        local = float(Cl[np.arange(G), match].sum())
        total += wmin * max(0.0, float(Cl.sum()) - local) / (G * (G - 1))
    return total


# the solver ------------------------------------------------------------------------------------------------------
def moetuner(problem: Problem, options: Options) -> Result:
    """MoETuner's two-stage ILP (arXiv 2502.06643) on open solvers; see the module docstring."""
    p = Params(options.params, "moetuner", {"cluster_sizes", "stage2", "mip_gap", "stage1_share", "joint_max_terms"})
    sizes_mode = p.choice("cluster_sizes", "equal", ("equal", "unequal"))
    stage2 = p.choice("stage2", "auto", ("auto", "joint", "sequential"))
    # mip_gap=null asks for no relative gap limit
    gap = None if "mip_gap" in p.values and p.values["mip_gap"] is None else p.number("mip_gap", 0.025, lo=0.0)
    share1 = p.number("stage1_share", 0.4, lo=0.0, lo_open=True, hi=1.0, hi_open=True)
    joint_max = p.integer("joint_max_terms", 60000, lo=1)
    if sizes_mode == "unequal" and stage2 == "sequential":
        raise SolverInputError("unequal cluster sizes need stage2=joint (the per-GPU total couples all layers)")
    if problem.budget_slots is not None:
        raise SolverInputError("MoETuner keeps every expert resident; plan without --memory-budget")
    if problem.transitions is None:
        raise SolverInputError("MoETuner needs adjacent-layer transitions, which count data does not have; "
                               "plan from a token routing trace")
    topo = problem.topology
    L, E, G, S, spg = problem.num_layers, problem.num_experts, topo.num_gpus, topo.num_slots, topo.slots_per_gpu
    equal = sizes_mode == "equal"
    if not equal and E < G:
        raise SolverInputError(f"unequal cluster sizes give every GPU at least one of the {E} experts per layer, "
                               f"which {G} GPUs cannot; use cluster_sizes=equal")
    deadline = mip.Deadline(None if options.time_limit is None else 0.95 * options.time_limit)
    left = deadline.left()
    stage1_deadline = mip.Deadline(None if left is None else share1 * left)

    # stage 1: clusters per layer
    expert, cluster, cnt, records = [], [], [], []
    for l in range(L):
        options.say(f"stage 1: clustering layer {l + 1}/{L}")
        ex, wt, ct = _items(problem.load[l], S, equal)
        lo, hi = (spg, spg) if equal else (1, spg)
        cl, rec = cluster_layer(wt, ex, G, lo, hi, options, stage1_deadline.share(L - l), gap)
        expert.append(ex), cluster.append(cl), cnt.append(ct), records.append(rec)
    sizes = np.array([np.bincount(cl, minlength=G) for cl in cluster])  # [L, G]

    # stage 2: cluster -> GPU per layer
    share = [np.zeros((E, G)) for _ in range(L)]  # share[l][e, c]: part of expert e's load in cluster c
    for l in range(L):
        np.add.at(share[l], (expert[l], cluster[l]), 1.0 / cnt[l][expert[l]])
    C = [share[l].T @ problem.transitions[l] @ share[l + 1] for l in range(L - 1)]  # [c, c'] traffic
    w = link_weights(topo)
    method = stage2
    if method == "auto":
        method = "joint" if (L - 1) * G ** 3 * (G - 1) <= joint_max or not equal else "sequential"
    solver_bound, status2 = None, "heuristic"
    options.say(f"stage 2: mapping clusters to GPUs ({method})")
    if G == 1:
        pi, status2 = np.zeros((L, 1), dtype=np.int64), "optimal"
    elif method == "sequential":
        pi, steps = _sequential(C, w, options, deadline)
        status2 = "feasible"
    else:
        hint = _sequential(C, w, options, mip.Deadline(None if deadline.left() is None else 0.2 * deadline.left()))[0] \
            if equal else _balanced_hint(sizes)
        pi, sol, scale, slack = _joint(C, w, None if equal else sizes, hint, options, deadline.left(), gap)
        if pi is None:
            raise SolverInputError("MoETuner found no cluster-to-GPU mapping that gives every GPU the same number of "
                                   "experts within the time limit; use cluster_sizes=equal or raise --time-limit")
        status2 = sol.status
        if sol.bound is not None:
            solver_bound = max(0.0, sol.bound / scale - slack)

    objective = sum(boundary_cost(C[l], pi[l], pi[l + 1], w) for l in range(L - 1))
    bound = max(stage2_bound(C, w), solver_bound or 0.0)
    bound = min(bound, objective)
    gap2 = gap_of(objective, bound)

    # layout: slots of GPU g in layer l hold the cluster mapped to g (+ replicas for unequal sizes)
    if equal:
        phy2log = np.empty((L, S), dtype=np.int64)
        for l in range(L):
            gpu_of_item = pi[l][cluster[l]]
            order = np.lexsort((expert[l], gpu_of_item))
            phy2log[l] = expert[l][order]
    else:
        gpu_of = np.stack([pi[l][cluster[l]] for l in range(L)])  # items are the experts in order
        phy2log = fill_redundant(gpu_of, problem.load, topo)

    stage1 = {"objective": float(sum(r["objective"] for r in records)),
              "bound": None if any(r["bound"] is None for r in records) else float(sum(r["bound"] for r in records)),
              "optimal_layers": int(sum(r["status"] == "optimal" for r in records)), "layers": L}
    on_gpu = np.zeros((L, G), dtype=np.int64)  # experts (not replicas) per GPU and layer
    for l in range(L):
        on_gpu[l, pi[l]] = sizes[l]
    stats = {"cluster_sizes": sizes_mode, "stage2": method, "stage1": stage1, "mip_gap": gap,
             "experts_per_gpu": on_gpu.tolist(),
             "exact": ("stage 1: each layer's program solved to the gap or time limit; stage 2: "
                       + ("the joint program over all layers" if method == "joint" else
                          "each boundary optimal given the previous layer (chain heuristic)"))}
    status = "optimal" if status2 == "optimal" and gap2 == 0.0 else "feasible"
    return Result(phy2log=phy2log, solver="moetuner", status=status, objective=float(objective), bound=float(bound),
                  gap=gap2, backend=options.backend, stats=stats,
                  objective_name=("sum over layer boundaries of the heaviest GPU-pair transition cost (token pairs; "
                                  "inter-node pairs weighted by the bandwidth ratio), given the stage-1 clusters"))


SOLVERS = {"moetuner": moetuner}
