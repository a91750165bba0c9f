"""DeepSeek's expert-parallel load balancer (EPLB), written from its published description.

Reference: deepseek-ai/EPLB, ``eplb.py`` (MIT), the balancer vendored by vLLM, SGLang and others. The algorithm:

1. Hierarchical policy (used when the number of expert groups is a multiple of the number of nodes):
   (a) pack the expert groups onto nodes with balanced packing (group-limited routing keeps a token's experts in
   few groups, so this keeps its traffic inside few nodes); (b) inside each node, add redundant replicas one at a
   time, each to the expert with the largest load per replica; (c) pack the node's physical experts onto its GPUs
   with balanced packing.
2. Global policy (otherwise): the same with one group and one node.
3. Balanced packing: items heaviest first, each into the lightest pack that still has room; every pack gets
   exactly ``n / packs`` items (with one item per pack, item i goes to pack i).

Everything is computed in float32 as the reference does, with its tie-breaking (stable descending sort, first
lightest pack, first expert of largest load per replica), so plans equal the reference's placement.

Shapes: L layers, E logical experts, S physical slots (= ``num_replicas``), G GPUs, N nodes, R the largest
replica count. Pure functions over numpy arrays; the solvers at the bottom wrap them in the common convention.
"""

from __future__ import annotations

import numpy as np

from solvers.base import Options, Problem, Result, SolverInputError
from solvers.params import Params

__all__ = ["balanced_packing", "replicate_experts", "rebalance_experts_hierarchical", "rebalance_experts"]


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n weighted items into ``num_packs`` packs of exactly ``n / num_packs`` items each, greedily.

    Args:
        weight: ``[X, n]`` item weights (X independent rows).
        num_packs: packs per row; must divide n.
    Returns:
        pack_index ``[X, n]`` (pack of each item) and rank_in_pack ``[X, n]`` (order of arrival in its pack).
    """
    X, n = weight.shape
    assert n % num_packs == 0
    per_pack = n // num_packs
    if per_pack == 1:
        return np.broadcast_to(np.arange(n), (X, n)).copy(), np.zeros((X, n), dtype=np.int64)
    w = weight.astype(np.float32)
    order = np.argsort(-w, axis=1, kind="stable")  # heaviest first; ties by index
    rows = np.arange(X)
    pack_w = np.zeros((X, num_packs), dtype=np.float32)
    pack_n = np.zeros((X, num_packs), dtype=np.int64)
    pack_index = np.empty((X, n), dtype=np.int64)
    rank_in_pack = np.empty((X, n), dtype=np.int64)
    for j in range(n):
        item = order[:, j]
        pack = np.argmin(np.where(pack_n < per_pack, pack_w, np.inf), axis=1)  # first lightest pack with room
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = pack_n[rows, pack]
        pack_w[rows, pack] += w[rows, item]
        pack_n[rows, pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicate ``num_log`` experts to ``num_phy`` physical experts, minimising the largest load per replica.

    Physical experts ``0 .. num_log - 1`` are the logical experts in order; each further one is a replica of the
    expert with the largest ``weight / replicas`` at that moment.

    Args:
        weight: ``[X, num_log]``.
    Returns:
        phy2log ``[X, num_phy]``, rank ``[X, num_phy]`` (replica index of each physical expert),
        logcnt ``[X, num_log]`` (replicas of each logical expert).
    """
    X, num_log = weight.shape
    assert num_phy >= num_log
    w = weight.astype(np.float32)
    rows = np.arange(X)
    phy2log = np.broadcast_to(np.arange(num_phy), (X, num_phy)).copy()
    rank = np.zeros((X, num_phy), dtype=np.int64)
    logcnt = np.ones((X, num_log), dtype=np.int64)
    for i in range(num_log, num_phy):
        best = np.argmax(w / logcnt.astype(np.float32), axis=1)
        phy2log[:, i] = best
        rank[:, i] = logcnt[rows, best]
        logcnt[rows, best] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of a ``[X, n]`` permutation."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(weight: np.ndarray, num_physical_experts: int, num_groups: int, num_nodes: int,
                                   num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The hierarchical policy: groups -> nodes, replicas inside each node, physical experts -> GPUs.

    Args:
        weight: ``[L, E]`` load of each logical expert.
        num_physical_experts: S, a multiple of ``num_gpus``.
        num_groups: expert groups (E/num_groups consecutive experts each); a multiple of ``num_nodes``.
        num_nodes: N; ``num_gpus`` must be a multiple of it.
    Returns:
        phy2log ``[L, S]``, phyrank ``[L, S]`` (replica index of each slot), logcnt ``[L, E]``.
    """
    L, E = weight.shape
    S, G, N = num_physical_experts, num_gpus, num_nodes
    assert E % num_groups == 0 and num_groups % N == 0 and G % N == 0 and S % G == 0
    group_size = E // num_groups
    groups_per_node = num_groups // N
    per_gpu = S // G
    w = weight.astype(np.float32)

    # 1. groups -> nodes; "mlog" numbers the experts node by node (node-major, groups in packing order)
    group_load = w.reshape(L, num_groups, group_size).sum(axis=-1)
    gpack, grank = balanced_packing(group_load, N)
    log2mlog = (((gpack * groups_per_node + grank) * group_size)[:, :, None] + np.arange(group_size)).reshape(L, E)
    mlog2log = _inverse(log2mlog)

    # 2. replicas inside each node: rows are (layer, node) pairs, [L * N, E / N]
    mlog_load = np.take_along_axis(w, mlog2log, axis=1).reshape(L * N, E // N)
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_load, S // N)

    # 3. physical experts -> the node's GPUs, [L * N, S / N]
    phy_load = np.take_along_axis(mlog_load / mlogcnt.astype(np.float32), phy2mlog, axis=1)
    pack, rank = balanced_packing(phy_load, G // N)
    pphy2phy = _inverse(pack * per_gpu + rank)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (pphy2mlog.reshape(L, N, -1) + (np.arange(N) * (E // N))[None, :, None]).reshape(L, -1)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(L, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, -1), log2mlog, axis=1)
    return phy2log, pphyrank, logcnt


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's entry point: the hierarchical policy if ``num_groups % num_nodes == 0``, else the global one.

    Args:
        weight: ``[L, E]`` load statistics of the logical experts.
        num_replicas: S physical experts, a multiple of ``num_gpus``.
        num_groups: expert groups; num_nodes: server nodes; num_gpus: GPUs, a multiple of ``num_nodes``.
    Returns:
        phy2log ``[L, S]`` logical expert of each slot, log2phy ``[L, E, R]`` slots of each expert (-1 padded,
        by replica index), logcnt ``[L, E]`` replicas of each expert.
    """
    weight = np.asarray(weight, dtype=np.float32)
    L, E = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, num_groups, num_nodes,
                                                                  num_gpus)
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    R = int(logcnt.max())
    log2phy = np.full((L, E * R), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * R + phyrank, np.broadcast_to(np.arange(num_replicas), phy2log.shape),
                      axis=1)
    return phy2log, log2phy.reshape(L, E, R), logcnt


# solvers ---------------------------------------------------------------------------------------------------------
def _eplb(problem: Problem, options: Options, policy: str) -> Result:
    Params(options.params, "eplb" if policy == "auto" else f"eplb-{policy}", set())  # none of its own
    topo = problem.topology
    if problem.budget_slots is not None:
        raise SolverInputError("EPLB keeps every expert resident; plan without --memory-budget or use a budget solver")
    groups, nodes = problem.expert_groups, topo.num_nodes
    if policy == "hierarchical" and groups % nodes:
        raise SolverInputError(
            f"the hierarchical EPLB policy needs the expert groups ({groups}) to be a multiple of the nodes "
            f"({nodes}); set --expert-groups to a multiple of {nodes} or use --solver eplb-global")
    used = "hierarchical" if policy == "hierarchical" or (policy == "auto" and groups % nodes == 0) else "global"
    if used == "global":
        groups, nodes = 1, 1
    phy2log, _, logcnt = rebalance_experts(problem.load, topo.num_slots, groups, nodes, topo.num_gpus)
    name = "eplb" if policy == "auto" else f"eplb-{policy}"
    return Result(phy2log=phy2log, solver=name, status="heuristic",
                  stats={"policy": used, "expert_groups": problem.expert_groups, "max_replicas": int(logcnt.max())})


def eplb(problem: Problem, options: Options) -> Result:
    """DeepSeek EPLB as the reference runs it: hierarchical if groups divide into nodes, else global."""
    return _eplb(problem, options, "auto")


def eplb_hierarchical(problem: Problem, options: Options) -> Result:
    """DeepSeek EPLB, hierarchical policy only (groups -> nodes -> GPUs)."""
    return _eplb(problem, options, "hierarchical")


def eplb_global(problem: Problem, options: Options) -> Result:
    """DeepSeek EPLB, global policy only (one group, one node)."""
    return _eplb(problem, options, "global")


SOLVERS = {"eplb": eplb, "eplb-hierarchical": eplb_hierarchical, "eplb-global": eplb_global}
