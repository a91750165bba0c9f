"""Exact per-token traffic and estimated time under the context-coherent dataflow (ExFlow, arXiv 2401.08383).

In context-coherent expert parallelism (Yao et al., "Exploiting Inter-Layer Expert Affinity for Accelerating
Mixture-of-Experts Model Inference", IPDPS 2024) attention can run wherever a token is, so a token does not go
back to a fixed home GPU after each MoE layer. The protocol here is the one the torch.distributed runtime
(:mod:`placement.runtime`) executes, so predicted bytes equal measured bytes:

- a token is *at* a position GPU p: its home (sequence index mod G) before the first MoE layer;
- at layer l it is dispatched from p to the distinct GPUs D serving its experts (``dispatch_table[l, e, p]``:
  a replica on p itself when there is one), one copy per GPU other than p;
- the serving GPUs send their partial sums to the token's *anchor*, the GPU serving its highest-gate expert
  (without gate weights: its first listed expert), one copy per GPU of D other than the anchor; the next
  layer starts there (p = anchor).

Per token and layer: ``|D \\ {p}|`` dispatch copies plus ``|D| - 1`` combine copies. Inter-layer affinity pays
off when the previous anchor also serves one of the token's next experts (then that copy stays local); with
top-1 routing a token whose next expert sits on its GPU moves nothing (ExFlow's case). Compared with the
standard dataflow (dispatch from and combine back to a fixed home every layer), the combine never leaves a
copy at a GPU that serves none of the token's experts. Tokens end at their last anchor (no final combine home).

:func:`evaluate_coherent` returns the time and byte metrics under this dataflow; the load and affinity metrics
are those of :func:`placement.evaluate.evaluate` (they do not depend on the dataflow).
"""

from __future__ import annotations

import numpy as np

from placement.evaldata import distinct_sorted, prepare
from placement.plan import Plan
from solvers import Topology
from solvers.cost import CostModel, phase_seconds
from solvers.objective import dispatch_table
from traces import LoadProfile, RoutingTrace


def serving_ranks(table_l: np.ndarray, ids: np.ndarray, position: np.ndarray) -> np.ndarray:
    """``[T, k]`` rank serving each chosen expert for a token at ``position`` (-1 where the id is -1).

    Args:
        table_l: int ``[E, G]`` one layer of :func:`solvers.objective.dispatch_table`.
        ids: int ``[T, k]`` expert ids (-1 = none); position: int ``[T]`` rank the token is on.
    """
    ids = ids.astype(np.int64)
    return np.where(ids >= 0, table_l[np.maximum(ids, 0), position[:, None]], -1)


def anchor_column(ids: np.ndarray, gates: np.ndarray | None) -> np.ndarray:
    """``[T]`` column of the token's highest-gate valid expert (first valid one without gates; -1 if none).

    Args:
        ids: int ``[T, k]`` (-1 = none); gates: float ``[T, k]`` or None.
    """
    valid = ids >= 0
    if gates is None:
        score = np.where(valid, -np.arange(ids.shape[1])[None, :], -np.inf)
    else:
        score = np.where(valid, gates.astype(np.float64), -np.inf)
    col = np.argmax(score, axis=1)
    return np.where(valid.any(axis=1), col, -1)


def coherent_traffic(phy2log: np.ndarray, num_experts: int, topology: Topology, expert_ids: np.ndarray,
                     gate_weights: np.ndarray | None, sequence_index: np.ndarray) -> dict[str, np.ndarray]:
    """Token copies of the context-coherent dataflow (module docstring), as the runtime moves them.

    Args:
        phy2log: ``[L, S]``; expert_ids: ``[T, L, k]`` (-1 = none); gate_weights: ``[T, L, k]`` or None (then
            the first listed expert is the anchor); sequence_index: ``[T]``.
    Returns:
        ``dispatch_pairs [L, G, G]`` copies position -> serving rank, ``combine_pairs [L, G, G]`` copies serving
        rank -> anchor (remote only), ``served [L, G]`` token-expert assignments computed on each rank,
        ``position [T, L + 1]`` rank of each token before each layer and at the end.
    """
    T, L, k = expert_ids.shape
    G = topology.num_gpus
    table = dispatch_table(phy2log, num_experts, topology)  # [L, E, G]
    pos = (np.asarray(sequence_index) % G).astype(np.int64)
    positions = np.empty((T, L + 1), dtype=np.int64)
    dispatch = np.zeros((L, G, G))
    combine = np.zeros((L, G, G))
    served = np.zeros((L, G))
    rows = np.arange(T)
    for l in range(L):
        positions[:, l] = pos
        ids = expert_ids[:, l].astype(np.int64)
        dest = serving_ranks(table[l], ids, pos)  # [T, k]
        served[l] = np.bincount(dest[dest >= 0], minlength=G)
        col = anchor_column(ids, None if gate_weights is None else gate_weights[:, l])
        active = col >= 0
        anchor = np.where(active, dest[rows, np.maximum(col, 0)], pos)
        uniq, first = distinct_sorted(dest)  # each serving rank once per token
        src = np.broadcast_to(pos[:, None], uniq.shape)
        d_mask = first & (uniq != src)
        dispatch[l] = np.bincount((src[d_mask] * G + uniq[d_mask]), minlength=G * G).reshape(G, G)
        anc = np.broadcast_to(anchor[:, None], uniq.shape)
        c_mask = first & (uniq != anc)
        combine[l] = np.bincount((uniq[c_mask] * G + anc[c_mask]), minlength=G * G).reshape(G, G)
        pos = anchor
    positions[:, L] = pos
    return {"dispatch_pairs": dispatch, "combine_pairs": combine, "served": served, "position": positions}


def coherent_layer_seconds(served: np.ndarray, dispatch_bytes: np.ndarray, combine_bytes: np.ndarray,
                           topology: Topology, cost: CostModel) -> np.ndarray:
    """``[L]`` estimated MoE-layer time under the coherent dataflow: the slowest GPU's compute plus its dispatch
    and combine phases (:func:`solvers.cost.phase_seconds`).

    Args:
        served: ``[L, G]`` assignments computed per GPU; dispatch_bytes, combine_bytes: ``[L, G, G]`` src -> dst.
    """
    t = served * cost.seconds_per_assignment + phase_seconds(dispatch_bytes, topology) \
        + phase_seconds(combine_bytes, topology)
    return t.max(axis=-1)


def evaluate_coherent(plan: Plan, data: RoutingTrace | LoadProfile, cost: CostModel | None = None) -> dict:
    """Time and bytes of ``plan`` on a token trace under the coherent dataflow.

    Returns ``{"est_moe_seconds", "est_moe_us_per_token", "a2a_bytes", "a2a_bytes_per_token",
    "a2a_bytes_inter_node", "a2a_bytes_busiest_gpu", "copies_per_token_layer", "served_imbalance",
    "per_layer_seconds"}``; values are None for counts-only input (the coherent dataflow needs token paths).
    """
    ev = prepare(data)
    plan.check_fits(ev.num_layers, ev.num_experts, source=ev.source or "the trace")
    keys = ("est_moe_seconds", "est_moe_us_per_token", "a2a_bytes", "a2a_bytes_per_token", "a2a_bytes_inter_node",
            "a2a_bytes_busiest_gpu", "copies_per_token_layer", "served_imbalance", "per_layer_seconds")
    if ev.expert_ids is None:
        return {k: None for k in keys}
    cost = cost or CostModel(dataflow="coherent")
    topo = plan.topology
    # the evaluator keeps each token's experts highest gate first, so the first listed one is the anchor
    tr = coherent_traffic(plan.phy2log, plan.num_experts, topo, ev.expert_ids, None, ev.sequence_index)
    B = cost.token_bytes
    secs = coherent_layer_seconds(tr["served"], tr["dispatch_pairs"] * B, tr["combine_pairs"] * B, topo, cost)
    all_pairs = (tr["dispatch_pairs"] + tr["combine_pairs"]).sum(axis=0)
    node = topo.node_of_gpu()
    inter = node[:, None] != node[None, :]
    total = float(all_pairs.sum() * B)
    served = tr["served"]
    mean = served.mean(axis=1)
    imb = np.where(mean > 0, served.max(axis=1) / np.where(mean > 0, mean, 1), 1.0)
    T = ev.num_tokens
    return {"est_moe_seconds": float(secs.sum()), "est_moe_us_per_token": float(secs.sum() / T * 1e6),
            "a2a_bytes": total, "a2a_bytes_per_token": total / T, "a2a_bytes_inter_node": float(all_pairs[inter].sum() * B),
            "a2a_bytes_busiest_gpu": float(((all_pairs.sum(axis=0) + all_pairs.sum(axis=1)) * B).max()),
            "copies_per_token_layer": float(all_pairs.sum() / (T * ev.num_layers)),
            "served_imbalance": float(imb.mean()), "per_layer_seconds": secs.tolist()}
