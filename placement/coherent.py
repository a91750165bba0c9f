"""Exact per-token traffic and estimated time under the context-coherent dataflow (ExFlow, arXiv 2401.08383).

In context-coherent expert parallelism, contexts are all-gathered so attention can run wherever a token is;
each MoE layer then needs one all-to-all instead of a dispatch and a combine. A token's partial expert
outputs stay on the GPUs that computed them: every GPU holding one of the token's layer-l experts sends its
partial sum to every other GPU holding one of its layer-(l+1) experts, so a boundary costs
``|A| x |B| - |A n B|`` copies of the hidden state (A, B: the distinct GPUs serving the token's experts at l and
l+1). The first layer is dispatched from the token's home GPU (sequence index mod G) and the last layer is
combined back to it.

Which replica serves a token: one on a GPU the token is already on (the lowest such GPU), else the static
dispatch rule of :func:`solvers.objective.dispatch_table` for its home GPU. Served tokens (not an even split)
give the per-GPU compute here.

:func:`evaluate_coherent` returns the time and byte metrics under this dataflow; the load and affinity metrics
are those of :func:`placement.evaluate.evaluate` (they do not depend on the dataflow).
"""

from __future__ import annotations

import numpy as np

from placement.evaluate import _distinct, prepare
from placement.plan import Plan
from solvers import Topology
from solvers.cost import CostModel, coherent_layer_seconds
from solvers.objective import dispatch_table, gpu_mask
from traces import LoadProfile, RoutingTrace

_CHUNK = 16384


def coherent_traffic(phy2log: np.ndarray, num_experts: int, topology: Topology, expert_ids: np.ndarray,
                     sequence_index: np.ndarray) -> dict[str, np.ndarray]:
    """Per-token traffic under the coherent dataflow.

    Args:
        phy2log: ``[L, S]``; expert_ids: ``[T, L, k]`` (-1 = none); sequence_index: ``[T]``.
    Returns:
        ``pairs [L, G, G]`` token copies src -> dst in the all-to-all before layer l (layer 0: from home),
        ``final [G, G]`` copies of the combine back home after the last layer, ``served [L, G]`` token-expert
        assignments computed on each GPU.
    """
    T, L, k = expert_ids.shape
    G = topology.num_gpus
    table = dispatch_table(phy2log, num_experts, topology)  # [L, E, G]
    mask = gpu_mask(phy2log, num_experts, topology)  # [L, E, G]
    pairs = np.zeros((L, G, G))
    final = np.zeros((G, G))
    served = np.zeros((L, G))
    for s in range(0, T, _CHUNK):
        ids = expert_ids[s:s + _CHUNK].astype(np.int64)
        home = (sequence_index[s:s + _CHUNK] % G).astype(np.int64)
        n = ids.shape[0]
        prev = np.broadcast_to(home[:, None], (n, 1))  # [n, 1] GPUs the token is on
        for l in range(L):
            e = ids[:, l]  # [n, k]
            ok = e >= 0
            ec = np.maximum(e, 0)
            gpu = table[l, ec, home[:, None]]  # [n, k] static rule
            if l > 0:
                on = np.zeros((n, G), dtype=bool)
                pv = prev >= 0
                on[np.nonzero(pv)[0], prev[pv]] = True
                cand = mask[l][ec] & on[:, None, :]  # [n, k, G] replicas where the token already is
                has = cand.any(axis=2)
                gpu = np.where(has, np.argmax(cand, axis=2), gpu)
            gpu = np.where(ok, gpu, -1)
            served[l] += np.bincount(gpu[ok], minlength=G)
            reached = ok.any(axis=1)
            srcs, sfirst = _distinct(prev)
            dsts, dfirst = _distinct(gpu)
            src = np.where(sfirst, srcs, -1)[:, :, None]
            dst = np.where(dfirst, dsts, -1)[:, None, :]
            live = (src >= 0) & (dst >= 0) & (src != dst) & reached[:, None, None]
            flat = (np.broadcast_to(src, live.shape) * G + np.broadcast_to(dst, live.shape))[live]
            pairs[l] += np.bincount(flat, minlength=G * G).reshape(G, G)
            prev = np.where(reached[:, None], gpu, prev)
        srcs, sfirst = _distinct(prev)
        live = sfirst & (srcs != home[:, None])
        flat = (srcs * G + home[:, None])[live]
        final += np.bincount(flat, minlength=G * G).reshape(G, G)
    return {"pairs": pairs, "final": final, "served": served}


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
    tr = coherent_traffic(plan.phy2log, plan.num_experts, topo, ev.expert_ids, ev.sequence_index)
    B = cost.token_bytes
    secs = coherent_layer_seconds(tr["served"], tr["pairs"] * B, topo, cost, tr["final"] * B)
    all_pairs = tr["pairs"].sum(axis=0) + tr["final"]
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
