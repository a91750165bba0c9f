"""Construction of the joint planner's starts: replica counts by water-filling, then block coordinate descent over
layers where each layer is an exact assignment (:func:`construct`, whole layers under a load cap;
:func:`construct_columns`, one slot column at a time).

The per-layer steps are pure functions of the layer's data and its neighbours' placement
(:meth:`Builder.solve_layer`, :func:`solve_layer_columns`).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from solvers.base import Problem, SolverInputError
from solvers.joint.bound import water_fill
from solvers.joint.data import JointData, _smoothing, anchor_stats
from solvers.params import Params

BIG = 1e30


def replica_counts(load: np.ndarray, slots: int, max_replicas: int) -> np.ndarray:
    """``[E]`` replicas per expert by water-filling (:func:`solvers.joint.bound.water_fill`); refuses slots that
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


def replicas_of(data: JointData) -> np.ndarray:
    """``[L, E]`` replica counts from the profile-normalised mean load (robust to which profile is hot)."""
    norm = data.loads / np.maximum(data.loads.sum(axis=2, keepdims=True), 1e-300)
    return layer_replicas(data, norm.mean(axis=0))


def chain_starts(problem: Problem, data: JointData, p: Params, cfg: dict, r: np.ndarray, base: np.ndarray,
                 c_deadline: float) -> list[tuple[str, np.ndarray]]:
    """Starts built across layers under the standard dataflow: an affinity chain (its assignments see the anchor
    pairs, co-activation, with whole-layer exactness). By default only without redundant slots: with them it gave no
    better plan (8 or 16 GPUs + 16 redundant, docs/benchmarks.md) and the column start gets the construction time."""
    chain_start = data.topology.num_slots == data.E if cfg["chain_start"] is None else cfg["chain_start"]
    if not ((problem.routes is not None or problem.transitions is not None) and data.L > 1 and chain_start
            and time.perf_counter() < c_deadline):
        return []
    T, Q = anchor_stats(problem, data.load, _smoothing(p))
    chain = replace(data, cost=replace(data.cost, dataflow="coherent", comm="nccl"), T=T, Q=Q)  # a start only
    cap = cfg["chain_cap"]
    return [(f"chain cap {cap}", construct(chain, r, cap, cfg["sweeps"] or 8, c_deadline, start=base))]
