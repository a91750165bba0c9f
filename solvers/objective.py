"""Pure array functions that score a placement; shared by solvers (as objectives) and the evaluator (as metrics).

Shapes: ``phy2log[L, S]`` (-1 = empty slot), ``load[L, E]``, ``transitions[L-1, E, E]``; G GPUs, Nn nodes.
Replicas of one expert share its load evenly (EPLB's assumption).
"""

from __future__ import annotations

import functools

import numpy as np

from solvers.base import Topology


def replica_counts(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """``[L, E]`` number of slots holding each logical expert."""
    L, S = phy2log.shape
    valid = phy2log >= 0
    flat = (np.arange(L)[:, None] * num_experts + phy2log)[valid]
    return np.bincount(flat, minlength=L * num_experts).reshape(L, num_experts)


def gpu_mask(phy2log: np.ndarray, num_experts: int, topology: Topology) -> np.ndarray:
    """bool ``[L, E, G]``: expert e of layer l has at least one replica on GPU g."""
    L, S = phy2log.shape
    G = topology.num_gpus
    mask = np.zeros((L, num_experts, G), dtype=bool)
    gpu = np.broadcast_to(topology.gpu_of_slot(), (L, S))
    lay = np.broadcast_to(np.arange(L)[:, None], (L, S))
    valid = phy2log >= 0
    mask[lay[valid], phy2log[valid], gpu[valid]] = True
    return mask


def node_mask(mask: np.ndarray, topology: Topology) -> np.ndarray:
    """bool ``[L, E, Nn]`` from a ``[L, E, G]`` GPU mask."""
    L, E, G = mask.shape
    return mask.reshape(L, E, topology.num_nodes, topology.gpus_per_node).any(axis=3)


def slot_load(phy2log: np.ndarray, load: np.ndarray) -> np.ndarray:
    """``[L, S]`` load of each physical slot: its expert's load split evenly over the expert's replicas."""
    L, S = phy2log.shape
    cnt = replica_counts(phy2log, load.shape[1])
    safe = np.maximum(phy2log, 0)
    rows = np.arange(L)[:, None]
    per = load[rows, safe] / np.maximum(cnt[rows, safe], 1)
    return np.where(phy2log >= 0, per, 0.0)


def gpu_load(phy2log: np.ndarray, load: np.ndarray, topology: Topology) -> np.ndarray:
    """``[L, G]`` token-expert assignments landing on each GPU (replicas split evenly)."""
    L, S = phy2log.shape
    return slot_load(phy2log, load).reshape(L, topology.num_gpus, topology.slots_per_gpu).sum(axis=2)


def imbalance(loads: np.ndarray) -> np.ndarray:
    """``[...]`` max / mean over the last axis (1.0 where a layer carries no load)."""
    mean = loads.mean(axis=-1)
    return np.where(mean > 0, loads.max(axis=-1) / np.where(mean > 0, mean, 1.0), 1.0)


def balancedness(loads: np.ndarray) -> float:
    """vLLM's balancedness ``sum_l mean_g / sum_l max_g`` over ``[L, G]`` loads (1 = perfect)."""
    top = loads.max(axis=-1).sum()
    return float(loads.mean(axis=-1).sum() / top) if top > 0 else 1.0


def pair_locality(phy2log: np.ndarray, transitions: np.ndarray, topology: Topology) -> dict[str, np.ndarray]:
    """Where adjacent-layer expert pairs land, per boundary.

    Args:
        phy2log: ``[L, S]``; transitions: ``[L-1, E, E]`` pair counts (token's expert a at l, b at l+1).
    Returns:
        ``pairs [L-1]`` total pair count, ``same_gpu [L-1]`` pairs whose experts share a GPU (any replica),
        ``same_node [L-1]`` pairs sharing a node but no GPU, ``cross_node [L-1]`` pairs sharing no node.
    """
    E = transitions.shape[1]
    gm = gpu_mask(phy2log, E, topology).astype(np.float32)
    nm = node_mask(gm.astype(bool), topology).astype(np.float32)
    share_gpu = np.einsum("lag,lbg->lab", gm[:-1], gm[1:]) > 0
    share_node = np.einsum("lan,lbn->lab", nm[:-1], nm[1:]) > 0
    pairs = transitions.sum(axis=(1, 2))
    same_gpu = (transitions * share_gpu).sum(axis=(1, 2))
    same_node = (transitions * (share_node & ~share_gpu)).sum(axis=(1, 2))
    return {"pairs": pairs, "same_gpu": same_gpu, "same_node": same_node,
            "cross_node": pairs - same_gpu - same_node}


@functools.lru_cache(maxsize=64)
def same_node_mask(num_gpus: int, gpus_per_node: int) -> np.ndarray:
    """Read-only bool ``[G, G]``: the two GPUs share a node (cached: the planner asks hundreds of thousands of
    times)."""
    node = np.arange(num_gpus) // gpus_per_node
    out = node[:, None] == node[None, :]
    out.flags.writeable = False
    return out


def dispatch_rows(mask: np.ndarray, topology: Topology) -> np.ndarray:
    """int ``[n, G]``: for each row (an expert's GPU mask) the GPU serving a token whose position is GPU h.

    Args:
        mask: bool ``[n, G]``: the expert of row i has a replica on GPU g.
    The rule (static dispatch, as SGLang's ``--ep-dispatch-algorithm static`` does in spirit): a replica on GPU h
    if there is one; else one of the replicas on h's node, the ``(h mod n)``-th of those n in GPU order; else the
    ``(h mod n)``-th of all n GPUs holding the expert. -1 where the row is empty. A row's answer depends on that
    row only, so moving one expert changes one row.
    """
    mask = np.asarray(mask, dtype=bool)
    G = topology.num_gpus
    same_node = same_node_mask(G, topology.gpus_per_node)  # [H, G]
    h = np.arange(G)
    cand_node = mask[:, None, :] & same_node[None, :, :]  # [n, H, G]
    has_node = cand_node.any(axis=2)  # [n, H]
    cand = np.where(has_node[:, :, None], cand_node, mask[:, None, :])  # [n, H, G]
    cnt = cand.sum(axis=2)  # [n, H]
    rank = np.cumsum(cand, axis=2) - 1
    want = (h[None, :] % np.maximum(cnt, 1))[:, :, None]
    chosen = np.argmax(cand & (rank == want), axis=2)
    chosen = np.where(mask, h[None, :], chosen)  # mask[i, h]: a replica on GPU h itself wins
    return np.where(cnt > 0, chosen, -1).astype(np.int64)


def dispatch_table(phy2log: np.ndarray, num_experts: int, topology: Topology) -> np.ndarray:
    """int ``[L, E, G]``: the GPU that serves expert e of layer l for a token whose home is GPU h.

    The rule is :func:`dispatch_rows` applied to every expert's GPU mask (-1 where the expert has no slot).
    Used by the evaluator for fan-out and bytes, by the runtime for routing and by the counts model's effective
    shares (:func:`solvers.cost.effective_share`), so they agree exactly.
    """
    L = phy2log.shape[0]
    G = topology.num_gpus
    mask = gpu_mask(phy2log, num_experts, topology)  # [L, E, G]
    return dispatch_rows(mask.reshape(L * num_experts, G), topology).reshape(L, num_experts, G)
