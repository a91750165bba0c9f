"""Small helpers shared by the reference solvers (ExFlow, MoETuner): capacitated assignment and replica filling.

Shapes: L layers, E logical experts, G GPUs, S slots (``slots_per_gpu`` per GPU).
"""

from __future__ import annotations

import numpy as np

from solvers.base import Topology


def assign_with_capacity(profit: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Give each of n items one of P bins, bin p taking exactly ``capacity[p]`` items, maximising total profit.

    Args:
        profit: float ``[n, P]``; capacity: int ``[P]`` summing to n.
    Returns:
        int ``[n]`` bin of each item (an optimal linear assignment, OR-Tools' solver on integer-scaled profit).
    """
    from ortools.graph.python import linear_sum_assignment

    n, P = profit.shape
    columns = np.repeat(np.arange(P), capacity)
    assert len(columns) == n, "capacities must add up to the number of items"
    top = float(np.abs(profit).max()) if profit.size else 0.0
    scale = 1e9 / top if top > 0 else 1.0
    cost = -np.round(profit[:, columns] * scale).astype(np.int64)  # [n, n]
    solver = linear_sum_assignment.SimpleLinearSumAssignment()
    solver.add_arcs_with_cost(np.repeat(np.arange(n), n), np.tile(np.arange(n), n), cost.ravel())
    if solver.solve() != solver.OPTIMAL:
        raise RuntimeError("linear assignment failed")
    return columns[np.array([solver.right_mate(i) for i in range(n)], dtype=np.int64)]


def fill_redundant(gpu_of: np.ndarray, load: np.ndarray, topology: Topology,
                   transitions: np.ndarray | None = None) -> np.ndarray:
    """Lay out ``phy2log [L, S]`` from one GPU per expert, filling the free slots with replicas.

    Each free slot goes, one at a time, to the expert with the largest load per replica (EPLB's replication rule)
    that can still go to a GPU with a free slot not holding it. The GPU is the one where the replica keeps the most
    adjacent-layer pair mass local when ``transitions`` is given (ExFlow's objective), else the least-loaded one
    (ties: least loaded, then lowest index). On each GPU the experts come first (by id), then their replicas.

    Args:
        gpu_of: int ``[L, E]`` GPU of each logical expert (at most ``slots_per_gpu`` experts per GPU and layer).
        load: ``[L, E]``; transitions: ``[L-1, E, E]`` or None.
    """
    L, E = gpu_of.shape
    G, spg = topology.num_gpus, topology.slots_per_gpu
    phy2log = np.empty((L, G * spg), dtype=np.int64)
    for l in range(L):
        holds = np.zeros((E, G), dtype=bool)
        holds[np.arange(E), gpu_of[l]] = True
        cnt = np.ones(E)
        slots = [sorted(np.flatnonzero(gpu_of[l] == g).tolist()) for g in range(G)]
        score = np.zeros((E, G))
        if transitions is not None:
            if l > 0:
                score += transitions[l - 1].T @ _onehot(gpu_of[l - 1], G)
            if l < L - 1:
                score += transitions[l] @ _onehot(gpu_of[l + 1], G)
        for _ in range(G * spg - E):
            free = np.array([len(s) < spg for s in slots])
            per = load[l] / cnt
            gpu_load = (holds * (load[l] / cnt)[:, None]).sum(axis=0)
            placed = False
            for e in np.argsort(-per, kind="stable"):
                ok = free & ~holds[e]
                if not ok.any():
                    continue
                cand = np.flatnonzero(ok)
                key = np.lexsort((cand, gpu_load[cand], -score[e, cand]))  # most affinity, least load, lowest id
                g = int(cand[key[0]])
                slots[g].append(int(e))
                holds[e, g] = True
                cnt[e] += 1
                placed = True
                break
            if not placed:  # every expert is already on every GPU with room: a second copy on one GPU (EPLB allows it)
                g = int(np.flatnonzero(free)[0])
                e = int(np.argmax(per))
                slots[g].append(e)
                cnt[e] += 1
        phy2log[l] = np.concatenate([np.asarray(s, dtype=np.int64) for s in slots])
    return phy2log


def _onehot(gpu_of_layer: np.ndarray, G: int) -> np.ndarray:
    out = np.zeros((len(gpu_of_layer), G))
    out[np.arange(len(gpu_of_layer)), gpu_of_layer] = 1.0
    return out
