"""The evaluator: every metric of docs/concepts.md for a plan on a trace, per layer and overall.

Metrics (replica-aware):

1. Load imbalance per layer ``max_g load_g / mean_g load_g`` (replicas split an expert's load evenly) and
   vLLM's balancedness ``sum_l mean_g / sum_l max_g``.
2. Affinity locality: over tokens, boundaries l -> l+1 and the k x k pairs of the token's experts, the share
   of pairs whose experts have a GPU in common (any replica); cross-GPU = 1 - locality, split into pairs that
   still share a node and pairs that share none (inter-node). Also the top-1 variant (highest gate).
3. Dispatch fan-out: mean distinct GPUs (and nodes) serving a token's k experts at a layer, after the static
   dispatch rule picks one replica per expert (:func:`solvers.objective.dispatch_table`).
4. All-to-all bytes, standard EP: a token's home GPU is its sequence index mod G (token index without seq_id);
   each distinct remote GPU gets one ``hidden_size x dtype_bytes`` copy at dispatch and one at combine.
5. Estimated MoE time from :mod:`solvers.cost` (slowest GPU per layer, summed over layers).

Counts-only input (:class:`traces.LoadProfile`) gives the load metrics only; the rest are None.

The trace side (:class:`placement.evaldata.EvalData`, :func:`placement.evaldata.prepare`) is shared with the
coherent evaluator (:mod:`placement.coherent`).
"""

from __future__ import annotations

import numpy as np

from placement.evaldata import EvalData, distinct_sorted, prepare
from placement.plan import Plan
from solvers import Topology
from solvers.cost import CostModel, layer_seconds, link_layer_seconds, message_bytes
from solvers.objective import balancedness, dispatch_table, gpu_load, imbalance, pair_locality
from traces import LoadProfile, RoutingTrace


_IDS_PER_BLOCK = 1 << 22  # token-expert ids per block in token_traffic (bounds memory on long traces)


def token_traffic(phy2log: np.ndarray, num_experts: int, topology: Topology, expert_ids: np.ndarray,
                  sequence_index: np.ndarray, executor=None, comm: str = "nccl",
                  ll_nvlink: bool = True) -> dict[str, np.ndarray]:
    """Dispatch under the static rule, summed over tokens (in blocks of tokens, on ``executor`` when given: the
    sums are integers, so the result is the same however the blocks are spread).

    Args:
        phy2log: ``[L, S]``; expert_ids: ``[T, L, k]`` (-1 = none); sequence_index: ``[T]``; comm: the
            communication model (:mod:`solvers.comm`) whose messages are counted.
    Returns:
        ``gpus [L]`` distinct GPUs summed over the token-layers, ``nodes [L]`` distinct nodes, ``active [L]``
        token-layers that reached the layer, ``nvlink [L, G, G]`` and ``rdma [L, G, G]`` dispatch messages
        src -> dst under ``comm``, and ``dispatch_pairs [L, G, G]`` their sum (for nccl: one copy per distinct
        remote GPU, home -> serving GPU).
    """
    T, L, k = expert_ids.shape
    table = dispatch_table(phy2log, num_experts, topology)  # [L, E, G]
    step = max(1, _IDS_PER_BLOCK // max(L * k, 1))  # tokens per block: bounds the [tokens, L, k] temporaries
    blocks = [(s, min(s + step, T)) for s in range(0, T, step)]
    shared = (table, topology, expert_ids, sequence_index, comm, ll_nvlink)
    parts = [_traffic_block(shared, b) for b in blocks] if executor is None or len(blocks) < 2 else \
        executor.map(_traffic_block, blocks, shared=shared)
    out = {key: sum(p[key] for p in parts) for key in ("gpus", "nodes", "active", "nvlink", "rdma")}
    out["dispatch_pairs"] = out["nvlink"] + out["rdma"]
    return out


def _traffic_block(shared, block: tuple[int, int]) -> dict[str, np.ndarray]:
    """:func:`token_traffic`'s sums over tokens ``block = (start, stop)`` (runs in any worker)."""
    from solvers import comm as comm_models

    table, topology, expert_ids, sequence_index, comm, ll_nvlink = shared
    model = comm_models.get(comm)
    s, e = block
    L = table.shape[0]
    node_of = topology.node_of_gpu()
    lay = np.arange(L)[None, :, None]
    home = sequence_index[s:e] % topology.num_gpus
    ids = expert_ids[s:e].astype(np.int64)
    gpu = np.where(ids >= 0, table[lay, np.maximum(ids, 0), home[:, None, None]], -1)  # [t, L, k]
    first = distinct_sorted(gpu)[1]
    gpus = first.sum(axis=2)  # [t, L]
    nodes = distinct_sorted(np.where(gpu >= 0, node_of[np.maximum(gpu, 0)], -1))[1].sum(axis=2)
    msgs = [model.token_messages(gpu[:, l], home, topology, allow_nvlink=ll_nvlink) for l in range(L)]
    return {"gpus": gpus.sum(axis=0), "nodes": nodes.sum(axis=0), "active": (gpus > 0).sum(axis=0),
            "nvlink": np.stack([m[0] for m in msgs]), "rdma": np.stack([m[1] for m in msgs])}


def weight_reads(phy2log: np.ndarray, num_experts: int, topology: Topology, expert_ids: np.ndarray,
                 sequence_index: np.ndarray, tokens_per_gpu: float, seed: int = 0) -> np.ndarray:
    """``[L, G]`` expert-weight reads summed over forward steps, counted on the tokens: the tokens, in a seeded
    random order, form steps of ``tokens_per_gpu x G`` tokens; in each step every (expert, serving GPU) that
    receives at least one token reads that expert's weights once (the roofline of :func:`solvers.cost.roofline_compute`).

    Args:
        phy2log: ``[L, S]``; expert_ids: ``[T, L, k]`` (-1 = none); sequence_index: ``[T]`` (homes pick replicas).
    """
    T, L, k = expert_ids.shape
    G, E = topology.num_gpus, num_experts
    batch = max(1, int(round(tokens_per_gpu * G)))
    step = np.empty(T, dtype=np.int64)
    step[np.random.default_rng(seed).permutation(T)] = np.arange(T) // batch
    table = dispatch_table(phy2log, E, topology)
    home = sequence_index % G
    out = np.zeros((L, G))
    for l in range(L):
        ids = expert_ids[:, l].astype(np.int64)  # [T, k]
        ok = ids >= 0
        gpu = table[l, np.maximum(ids, 0), home[:, None]]
        key = np.unique(((step[:, None] * E + ids) * G + gpu)[ok])
        out[l] = np.bincount(key % G, minlength=G)
    return out


def evaluate(plan: Plan, data: RoutingTrace | LoadProfile | EvalData, cost: CostModel | None = None,
             executor=None) -> dict:
    """All metrics of ``plan`` on ``data``: ``{"overall": {...}, "per_layer": [...], "gpu_pair_bytes": [[...]]}``.
    ``executor`` (:mod:`placement.executor`): where the per-token traffic is counted, block by block."""
    ev = prepare(data)
    plan.check_fits(ev.num_layers, ev.num_experts, source=ev.source or "the trace")
    cost = cost or CostModel()
    memory: dict = {}
    if plan.memory is not None:  # memory-budget plans: hit rate, host->GPU bytes, stall (placement/memory_eval.py);
        from placement.memory_eval import memory_overall, serving_plan  # EP metrics with host experts on their GPU

        memory = memory_overall(plan, data if isinstance(data, RoutingTrace) else ev, cost)
        plan = serving_plan(plan)
    topo = plan.topology
    L = plan.num_layers
    loads = gpu_load(plan.phy2log, ev.load, topo)  # [L, G]
    imb = imbalance(loads)
    overall: dict = {"load_imbalance": float(imb.mean()), "load_imbalance_max": float(imb.max()),
                     "balancedness": balancedness(loads), "tokens": ev.num_tokens,
                     "max_replicas": int(plan.replica_counts().max())}
    per_layer = [{"moe_layer": int(plan.moe_layer_index[l]), "load_imbalance": float(imb[l]),
                  "max_gpu_load": float(loads[l].max()), "mean_gpu_load": float(loads[l].mean())} for l in range(L)]
    result = {"plan": plan.name, "source": ev.source, "overall": overall, "per_layer": per_layer}
    if ev.profiles is not None and ev.profiles.shape[0] > 1:
        per_profile = [imbalance(gpu_load(plan.phy2log, p, topo)) for p in ev.profiles]
        overall["load_imbalance_per_profile"] = [float(x.mean()) for x in per_profile]
        overall["load_imbalance_worst_profile"] = float(max(x.mean() for x in per_profile))
    overall.update(memory)
    if ev.expert_ids is None:
        for key in ("affinity_locality", "cross_gpu_fraction", "intra_node_cross_fraction", "inter_node_fraction",
                    "affinity_locality_top1", "dispatch_gpus", "dispatch_nodes", "a2a_bytes", "a2a_bytes_intra_node",
                    "a2a_bytes_inter_node", "a2a_bytes_busiest_gpu", "a2a_bytes_per_token", "est_moe_seconds",
                    "est_moe_us_per_token", "nvlink_bytes", "rdma_bytes"):
            overall[key] = None
        return result

    loc = pair_locality(plan.phy2log, ev.transitions, topo)
    pairs = loc["pairs"].sum()
    overall["affinity_locality"] = float(loc["same_gpu"].sum() / pairs) if pairs else None
    overall["cross_gpu_fraction"] = 1.0 - overall["affinity_locality"] if pairs else None
    overall["intra_node_cross_fraction"] = float(loc["same_node"].sum() / pairs) if pairs else None
    overall["inter_node_fraction"] = float(loc["cross_node"].sum() / pairs) if pairs else None
    overall["affinity_locality_top1"] = None
    if ev.transitions_top1 is not None:
        loc1 = pair_locality(plan.phy2log, ev.transitions_top1, topo)
        overall["affinity_locality_top1"] = float(loc1["same_gpu"].sum() / max(loc1["pairs"].sum(), 1e-300))

    tr = token_traffic(plan.phy2log, plan.num_experts, topo, ev.expert_ids, ev.sequence_index, executor, cost.comm,
                       cost.ll_nvlink)
    active = tr["active"]
    overall["dispatch_gpus"] = float(tr["gpus"].sum() / max(active.sum(), 1))
    overall["dispatch_nodes"] = float(tr["nodes"].sum() / max(active.sum(), 1))
    db, cb = message_bytes(cost, "dispatch"), message_bytes(cost, "combine")
    link_bytes = {k: tr[k] * db + np.swapaxes(tr[k], 1, 2) * cb for k in ("nvlink", "rdma")}  # dispatch + combine
    pair_bytes = link_bytes["nvlink"] + link_bytes["rdma"]  # [L, G, G]
    node = topo.node_of_gpu()
    inter = node[:, None] != node[None, :]
    total = pair_bytes.sum()
    overall["comm"] = cost.comm
    overall["a2a_bytes"] = float(total)
    overall["a2a_bytes_inter_node"] = float(pair_bytes[:, inter].sum())
    overall["a2a_bytes_intra_node"] = float(total - overall["a2a_bytes_inter_node"])
    all_pairs = pair_bytes.sum(axis=0)  # [G, G]
    overall["a2a_bytes_busiest_gpu"] = float((all_pairs.sum(axis=0) + all_pairs.sum(axis=1)).max())
    overall["a2a_bytes_per_token"] = float(total / ev.num_tokens)
    for k, who in (("nvlink", "gpu"), ("rdma", "nic")):  # per link class: per token, in all, busiest GPU / NIC
        m = link_bytes[k].sum(axis=0)
        overall[f"{k}_bytes"] = float(m.sum() / ev.num_tokens)
        overall[f"{k}_bytes_total"] = float(m.sum())
        overall[f"{k}_bytes_busiest_{who}"] = float((m.sum(axis=0) + m.sum(axis=1)).max())
    reads = None
    if cost.tokens_per_gpu is not None:  # the decode roofline: weight reads of the active experts per step
        reads = weight_reads(plan.phy2log, plan.num_experts, topo, ev.expert_ids, ev.sequence_index,
                             cost.tokens_per_gpu)
        overall["tokens_per_gpu"] = cost.tokens_per_gpu
        overall["weight_reads_per_step_gpu"] = float(reads.sum() / topo.num_gpus / L / max(
            np.ceil(ev.num_tokens / (cost.tokens_per_gpu * topo.num_gpus)), 1))
    if cost.comm == "nccl":
        secs = layer_seconds(loads, tr["dispatch_pairs"] * cost.token_bytes, topo, cost, reads)
    else:
        secs = link_layer_seconds(loads, tr["nvlink"], tr["rdma"], topo, cost, reads)[0]
    overall["est_moe_seconds"] = float(secs.sum())
    overall["est_moe_us_per_token"] = float(secs.sum() / ev.num_tokens * 1e6)
    for l in range(L):
        per_layer[l]["dispatch_gpus"] = float(tr["gpus"][l] / active[l]) if active[l] else None
        per_layer[l]["a2a_bytes"] = float(pair_bytes[l].sum())
        per_layer[l]["est_moe_seconds"] = float(secs[l])
        if l < L - 1:
            p = loc["pairs"][l]
            per_layer[l]["affinity_locality_next"] = float(loc["same_gpu"][l] / p) if p else None
    overall["dataflow"] = cost.dataflow
    if cost.dataflow == "coherent":  # time and bytes of ExFlow's dataflow; a2a_bytes above stay standard-EP bytes
        from placement.coherent import evaluate_coherent

        coh = evaluate_coherent(plan, ev, cost)
        overall["est_moe_seconds"] = coh["est_moe_seconds"]
        overall["est_moe_us_per_token"] = coh["est_moe_us_per_token"]
        overall["coherent_a2a_bytes_per_token"] = coh["a2a_bytes_per_token"]
    result["gpu_pair_bytes"] = all_pairs.tolist()
    result["cost_model"] = {"hidden_size": cost.hidden_size, "dtype_bytes": cost.dtype_bytes,
                            "expert_intermediate_size": cost.expert_intermediate_size, "gpu_flops": cost.gpu_flops,
                            "dataflow": cost.dataflow, "comm": cost.comm, "tokens_per_gpu": cost.tokens_per_gpu,
                            "hbm_bandwidth": cost.hbm_bandwidth, "expert_overhead": cost.expert_overhead}
    return result


# Order and labels of the headline metrics in tables (lower is better unless marked).
HEADLINE = [
    ("load_imbalance", "load imbalance (mean max/mean)"),
    ("load_imbalance_max", "load imbalance (worst layer)"),
    ("balancedness", "balancedness (higher better)"),
    ("affinity_locality", "affinity locality (higher better)"),
    ("cross_gpu_fraction", "cross-GPU transitions"),
    ("inter_node_fraction", "inter-node transitions"),
    ("dispatch_gpus", "GPUs per token-layer"),
    ("dispatch_nodes", "nodes per token-layer"),
    ("a2a_bytes_per_token", "a2a bytes per token (standard)"),
    ("coherent_a2a_bytes_per_token", "a2a bytes per token (coherent)"),
    ("a2a_bytes_busiest_gpu", "busiest GPU a2a bytes"),
    ("est_moe_us_per_token", "est. MoE time (us/token)"),
    ("resident_hit_rate", "expert hit rate in GPU memory (higher better)"),
    ("resident_static_hit_rate", "hit rate of the resident set alone"),
    ("fetch_bytes_per_token", "host->GPU bytes per token"),
    ("est_fetch_ms_per_token", "est. PCIe stall (ms/token)"),
    ("dynamic_resident_hit_rate", "hit rate, dynamic re-pick (higher better)"),
    ("dynamic_fetch_bytes_per_token", "host->GPU bytes/token, dynamic"),
]
