"""Cost model: estimated MoE-layer time from per-GPU compute and per-GPU all-to-all bytes.

The model (documented for users in docs/concepts.md, "The joint planner and the cost model"):

- compute_g = token-expert assignments on GPU g x ``flops_per_assignment`` / ``gpu_flops``, with
  ``flops_per_assignment = 2 x 3 x hidden_size x expert_intermediate_size`` (gate, up and down projections).
- comm_g (one all-to-all phase) = max(sent, received) intra-node bytes / intra-node bandwidth
  + max(sent, received) inter-node bytes / inter-node bandwidth (full-duplex links, one NIC per GPU).
- layer time = ``max_g(compute_g + comm_g)``: the slowest GPU sets the pace.
- Two dataflows:

  * ``standard`` (DeepEP-style expert parallelism): a token lives on its home GPU (data-parallel attention),
    is dispatched to every distinct remote GPU serving one of its k experts and combined back: two phases per
    layer, one copy of the hidden state per distinct remote GPU and phase.
  * ``coherent`` (ExFlow, arXiv 2401.08383): contexts are all-gathered so attention runs wherever a token is;
    a token's partial expert outputs stay on the GPUs that computed them and are sent straight to the GPUs of
    its experts at the next layer: one phase per layer. Each GPU holding one of the token's layer-l experts
    sends its partial sum to each other GPU holding one of its layer-(l+1) experts (|A| x |B| - |A n B| copies).
    The first layer is dispatched from the home GPU and the last layer is combined back to it.

Two ways to feed the model: exact per-token traffic (:mod:`placement.evaluate`, :mod:`placement.coherent`) and
the *counts model* (:func:`estimate_layer_seconds`) that the joint planner optimises. The counts model needs only
per-layer load ``[L, E]``, co-activation ``[L, E, E]`` and adjacent-layer transitions ``[L-1, E, E]``; it
assumes homes spread evenly over GPUs, replicas splitting their expert's tokens evenly and independently, and
counts a token's duplicate copies on one GPU from pairs of co-activated experts (first-order
inclusion-exclusion).

Defaults: DeepSeek-V2-Lite sizes (the bundled trace: hidden 2048, expert intermediate 1408), bf16, H100 at
400 TFLOP/s effective for grouped GEMMs (about 40% of the dense bf16 peak); link bandwidths live on
:class:`solvers.base.Topology` (NVLink 4 450 GB/s, 400 Gb/s InfiniBand 50 GB/s per GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import numpy as np

from solvers.base import SolverInputError, Topology

DATAFLOWS = ("standard", "coherent")

# Model sizes that set bytes per token and FLOPs per token-expert assignment.
PRESETS: dict[str, dict[str, int]] = {
    "deepseek-v2-lite": {"hidden_size": 2048, "expert_intermediate_size": 1408},
    "deepseek-v2": {"hidden_size": 5120, "expert_intermediate_size": 1536},
    "deepseek-v3": {"hidden_size": 7168, "expert_intermediate_size": 2048},
    "mixtral-8x7b": {"hidden_size": 4096, "expert_intermediate_size": 14336},
    "qwen3-30b-a3b": {"hidden_size": 2048, "expert_intermediate_size": 768},
    "olmoe-1b-7b": {"hidden_size": 2048, "expert_intermediate_size": 1024},
}


@dataclass(frozen=True)
class CostModel:
    """Parameters of the cost model.

    Attributes:
        hidden_size: model hidden size (bytes per token copy = hidden_size x dtype_bytes).
        expert_intermediate_size: the experts' FFN width (FLOPs per assignment).
        dtype_bytes: activation bytes on the wire (bf16 = 2, fp8 = 1).
        gpu_flops: effective GPU throughput for the expert GEMMs, FLOP/s.
        dataflow: "standard" (dispatch + combine) or "coherent" (ExFlow, one all-to-all per layer).
        weight_dtype_bytes: bytes per expert weight (for the migration cost of moving an expert).
    """

    hidden_size: int = 2048
    expert_intermediate_size: int = 1408
    dtype_bytes: int = 2
    gpu_flops: float = 400e12
    dataflow: str = "standard"
    weight_dtype_bytes: int = 2

    def __post_init__(self) -> None:
        if self.dataflow not in DATAFLOWS:
            raise SolverInputError(f"dataflow {self.dataflow!r} is not one of {', '.join(DATAFLOWS)}")
        for name in ("hidden_size", "expert_intermediate_size", "dtype_bytes", "gpu_flops", "weight_dtype_bytes"):
            if not getattr(self, name) > 0:
                raise SolverInputError(f"cost model {name} must be positive, got {getattr(self, name)}")

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's hidden state."""
        return self.hidden_size * self.dtype_bytes

    @property
    def flops_per_assignment(self) -> float:
        return 6.0 * self.hidden_size * self.expert_intermediate_size

    @property
    def seconds_per_assignment(self) -> float:
        """Compute seconds for one token-expert assignment."""
        return self.flops_per_assignment / self.gpu_flops

    @property
    def expert_bytes(self) -> float:
        """Bytes of one expert's weights (gate, up and down projections)."""
        return 3.0 * self.hidden_size * self.expert_intermediate_size * self.weight_dtype_bytes

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "CostModel":
        """Cost model for a known model size (see ``PRESETS``), with overrides."""
        key = name.lower()
        if key not in PRESETS:
            raise SolverInputError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None, base: "CostModel | None" = None) -> "CostModel":
        """Cost model from solver params: ``cost`` (a CostModel), ``model`` (a preset name) and any field
        (``hidden_size``, ``expert_intermediate_size``, ``dtype_bytes``, ``gpu_flops``, ``dataflow``, ...)."""
        params = dict(params or {})
        cm = params.get("cost") or base or cls()
        if not isinstance(cm, CostModel):
            raise SolverInputError("params['cost'] must be a solvers.cost.CostModel")
        if params.get("model"):
            cm = cls.preset(str(params["model"]), **{f.name: getattr(cm, f.name) for f in fields(cm)
                                                      if f.name not in PRESETS[str(params["model"]).lower()]})
        names = {f.name for f in fields(cls)}
        over = {k: v for k, v in params.items() if k in names and v is not None}
        return replace(cm, **over) if over else cm


def phase_seconds(pair_bytes: np.ndarray, topology: Topology) -> np.ndarray:
    """``[..., G]`` time of one all-to-all phase per GPU from a ``[..., G, G]`` src->dst byte matrix.

    The diagonal (a GPU sending to itself) is ignored.
    """
    node = topology.node_of_gpu()
    inter = node[:, None] != node[None, :]
    own = np.eye(topology.num_gpus, dtype=bool)
    intra_b = np.where(inter | own, 0.0, pair_bytes)
    inter_b = np.where(inter, pair_bytes, 0.0)
    intra_t = np.maximum(intra_b.sum(axis=-1), intra_b.sum(axis=-2)) / topology.intra_node_bandwidth
    inter_t = np.maximum(inter_b.sum(axis=-1), inter_b.sum(axis=-2)) / topology.inter_node_bandwidth
    return intra_t + inter_t


def layer_seconds(gpu_load: np.ndarray, dispatch_bytes: np.ndarray, topology: Topology, cost: CostModel) -> np.ndarray:
    """``[L]`` estimated MoE-layer time, standard dataflow.

    Args:
        gpu_load: ``[L, G]`` token-expert assignments per GPU.
        dispatch_bytes: ``[L, G, G]`` dispatch bytes home -> expert GPU (the combine sends them back).
    """
    compute = gpu_load * cost.flops_per_assignment / cost.gpu_flops
    comm = phase_seconds(dispatch_bytes, topology) + phase_seconds(np.swapaxes(dispatch_bytes, -1, -2), topology)
    return (compute + comm).max(axis=-1)


def coherent_layer_seconds(gpu_load: np.ndarray, pair_bytes: np.ndarray, topology: Topology, cost: CostModel,
                           final_bytes: np.ndarray | None = None) -> np.ndarray:
    """``[L]`` estimated MoE-layer time, context-coherent dataflow (one all-to-all phase per layer).

    Args:
        gpu_load: ``[L, G]`` token-expert assignments per GPU.
        pair_bytes: ``[L, G, G]`` bytes src -> dst of the all-to-all before layer l (layer 0: home dispatch).
        final_bytes: ``[G, G]`` bytes of the combine back to the home GPUs after the last layer (or None).
    """
    compute = gpu_load * cost.seconds_per_assignment
    comm = phase_seconds(pair_bytes, topology)
    if final_bytes is not None:
        comm = comm.copy()
        comm[-1] += phase_seconds(final_bytes, topology)
    return (compute + comm).max(axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# The counts model (what the joint planner optimises)
# ----------------------------------------------------------------------------------------------------------------


def share_matrix(phy2log_row: np.ndarray, num_experts: int, topology: Topology) -> np.ndarray:
    """``[E, G]`` share of expert e's tokens served on GPU g: 1/r for each of its r replicas (even split)."""
    gpu = topology.gpu_of_slot()
    valid = phy2log_row >= 0
    P = np.zeros((num_experts, topology.num_gpus))
    np.add.at(P, (phy2log_row[valid], gpu[valid]), 1.0)
    r = P.sum(axis=1, keepdims=True)
    return np.divide(P, r, out=np.zeros_like(P), where=r > 0)


def standard_comm_seconds(distinct: np.ndarray, topology: Topology, cost: CostModel, phases: int = 2) -> np.ndarray:
    """``[..., G]`` all-to-all seconds per GPU, standard dataflow, homes spread evenly over GPUs.

    Args:
        distinct: ``[..., G]`` distinct tokens served on each GPU (a token with two experts there counts once).
        phases: 2 for dispatch + combine, 1 for one of them.
    Every GPU h is home to 1/G of the tokens and sends ``distinct_g / G`` copies to each other GPU g.
    """
    G, n = topology.num_gpus, topology.gpus_per_node
    D = distinct * (cost.token_bytes / G)
    node_sum = D.reshape(*D.shape[:-1], topology.num_nodes, n).sum(axis=-1)
    node_of = np.repeat(node_sum, n, axis=-1)  # [..., G] total of the GPU's node
    recv_i, recv_e = D * (n - 1), D * (G - n)
    sent_i = node_of - D
    sent_e = D.sum(axis=-1, keepdims=True) - node_of
    return phases * (np.maximum(sent_i, recv_i) / topology.intra_node_bandwidth
                     + np.maximum(sent_e, recv_e) / topology.inter_node_bandwidth)


def distinct_terms(load: np.ndarray, coactivation: np.ndarray, tokens: float) -> tuple[np.ndarray, np.ndarray]:
    """Terms of the pairwise (Kirkwood) estimate of how many tokens reach a set of experts.

    Args:
        load: ``[E]`` token-expert assignments; coactivation: ``[E, E]`` ordered pairs of distinct experts chosen
            by one token (symmetric); tokens: tokens behind the counts.
    Returns:
        ``u [E] = log(1 - p_a)`` and ``K [E, E] = log(P(neither a nor b)) - u_a - u_b`` (zero diagonal), with
        ``p_a = load_a / tokens``; a set A of experts is missed by a token with probability about
        ``exp(sum_{a in A} u_a + sum_{a < b in A} K_ab)``.
    """
    t = max(float(tokens), 1e-300)
    p = np.clip(load / t, 0.0, 1.0 - 1e-9)
    pab = coactivation / t
    u = np.log1p(-p)
    neither = np.maximum(1.0 - p[:, None] - p[None, :] + pab, 1e-9)
    K = np.log(neither) - u[:, None] - u[None, :]
    np.fill_diagonal(K, 0.0)
    return u, K


def standard_distinct(share: np.ndarray, load: np.ndarray, coactivation: np.ndarray | None,
                      tokens: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """GPU load and distinct tokens per GPU for one layer.

    Args:
        share: ``[E, G]`` from :func:`share_matrix`; load: ``[E]``; coactivation: ``[E, E]`` or None
            (ordered pair counts, same tokens as ``load``); tokens: tokens behind ``load`` (None: pairs only).
    Returns:
        gpu_load ``[G]`` and distinct ``[G]``: the tokens with at least one expert on the GPU, estimated with the
        pairwise (Kirkwood) approximation ``tokens x (1 - P(no expert on g))`` and never below the provable floor
        ``load - co-activated pairs on g`` nor below the GPU's largest piece.
    """
    gl = load @ share
    if coactivation is None:
        return gl, gl
    CP = coactivation @ share
    dup = 0.5 * np.einsum("ag,ag->g", share, CP)
    piece = (load[:, None] * share).max(axis=0)
    D = np.maximum(gl - dup, piece)
    if tokens is not None:
        u, K = distinct_terms(load, coactivation, tokens)
        logp0 = u @ share + 0.5 * np.einsum("ag,ag->g", share, K @ share)
        D = np.maximum(D, tokens * -np.expm1(np.minimum(logp0, 0.0)))
    return gl, D


def coherent_traffic(share_prev: np.ndarray, share_next: np.ndarray, transitions: np.ndarray) -> np.ndarray:
    """``[G, G]`` token copies between GPUs at one boundary, coherent dataflow (counts model).

    ``M = share_prev^T @ transitions @ share_next`` with a zero diagonal: a pair (a at l, b at l+1) whose experts
    run on the same GPU costs nothing; replicas split pairs evenly.
    """
    M = share_prev.T @ transitions @ share_next
    np.fill_diagonal(M, 0.0)
    return M


def estimate_layer_seconds(phy2log: np.ndarray, load: np.ndarray, topology: Topology, cost: CostModel,
                           transitions: np.ndarray | None = None, coactivation: np.ndarray | None = None,
                           rho: np.ndarray | None = None, tokens: np.ndarray | None = None, detail: bool = False):
    """``[L]`` estimated MoE-layer seconds of a placement from counts (the joint planner's objective).

    Args:
        phy2log: ``[L, S]``; load: ``[L, E]`` token-expert assignments; transitions: ``[L-1, E, E]`` pair counts
            (coherent dataflow; needed there); coactivation: ``[L, E, E]`` (optional: duplicate copies);
        rho: ``[L-1]`` GPU-level de-duplication factor of coherent pair traffic (copies per cross-GPU expert
            pair; default 1); tokens: ``[L]`` tokens per layer (default: pairs-only duplicate estimate).
        detail: also return ``(compute [L, G], comm [L, G])``.
    All counts must refer to the same tokens (the planner rescales them so).
    """
    L, E = load.shape
    G = topology.num_gpus
    alpha = cost.seconds_per_assignment
    shares = np.stack([share_matrix(phy2log[l], E, topology) for l in range(L)])  # [L, E, G]
    compute = np.empty((L, G))
    distinct = np.empty((L, G))
    for l in range(L):
        compute[l], distinct[l] = standard_distinct(shares[l], load[l], None if coactivation is None else coactivation[l],
                                                    None if tokens is None else float(tokens[l]))
    compute *= alpha
    if cost.dataflow == "standard":
        comm = standard_comm_seconds(distinct, topology, cost, phases=2)
    else:
        if transitions is None:
            raise SolverInputError("the coherent dataflow needs adjacent-layer transitions; give a token trace")
        comm = np.zeros((L, G))
        comm[0] = standard_comm_seconds(distinct[0], topology, cost, phases=1)
        comm[-1] += standard_comm_seconds(distinct[-1], topology, cost, phases=1)
        for l in range(1, L):
            M = coherent_traffic(shares[l - 1], shares[l], transitions[l - 1])
            f = 1.0 if rho is None else float(rho[l - 1])
            comm[l] += phase_seconds(M * (f * cost.token_bytes), topology)
    t = (compute + comm).max(axis=1)
    return (t, compute, comm) if detail else t
