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
  * ``coherent`` (context-coherent expert parallelism, ExFlow, arXiv 2401.08383): attention runs wherever a
    token is, so a token does not return to a fixed home. At layer l it is dispatched from its position p to
    the distinct GPUs serving its experts and their partial sums are combined onto its *anchor*, the GPU of its
    highest-gate expert, where layer l+1 starts. Two phases per layer: ``|D \\ {p}|`` dispatch copies and
    ``|D| - 1`` combine copies (D = the token's serving GPUs); affinity saves the dispatch copy when the
    previous anchor serves one of the next experts, and replicas next to the anchors of an expert's tokens
    serve more of them (position-aware served shares, below). Layer 0 is dispatched from the home GPU; tokens
    end at their last anchor. This is the protocol the torch.distributed runtime executes
    (:mod:`placement.coherent`, :mod:`placement.runtime`).

Two ways to feed the model: exact per-token traffic (:mod:`placement.evaluate`, :mod:`placement.coherent`) and
the *counts model* (:func:`estimate_layer_seconds`) that the joint planner optimises. The counts model needs only
per-layer load ``[L, E]``, co-activation ``[L, E, E]`` and, for the coherent dataflow, anchor transitions
``[L-1, E, E]`` (anchor a at l, expert b at l+1) and anchor pairs ``[L, E, E]`` (anchor a, other expert b at
the same layer) from :func:`anchor_counts`; it assumes homes spread evenly over GPUs and counts a token's
duplicate copies on one GPU from pairs of co-activated experts (first-order inclusion-exclusion). Which replica
serves a token:

- standard dataflow: replicas split their expert's tokens evenly and independently (:func:`share_matrix`; with
  homes spread evenly the dispatch rule spreads an expert's tokens over its replicas about evenly).
- coherent dataflow: a token uses the replica that the dispatch rule (:func:`solvers.objective.dispatch_rows`)
  picks for its *position*, and positions concentrate on the GPUs holding hot anchor experts, so the counts model
  uses position-aware *served shares* (:func:`effective_share`): the positions of layer l's tokens are where
  the previous layer's anchors are served, ``pos_l = W_{l-1}^T T_{l-1}`` ``[G, E]`` (uniform homes at layer 0),
  or, given the token routes (``position_routes``), where each token really is after replaying its path
  (:func:`replay_positions`, :func:`position_mass`), and ``W_l[e, h]`` is the fraction of ``pos_l[:, e]`` whose
  dispatch-table entry is h (computed layer by layer).
  W replaces the even split in the load, the duplicate-copy terms and the combine matrix ``W^T Q W``; the
  dispatch matrix is ``M_l[p, h] = sum_e pos_l[p, e] [table_l[e, p] == h]`` (:func:`dispatch_matrix`). An
  expert with one replica has ``W = P``, and without redundant slots the two position models agree (a token's
  anchor is on one GPU). Positions from the even split ``P_{l-1}``, as an earlier version took them, left the
  joint plan at DeepSeek-V3 size 19% optimistic against the replay; see docs/benchmarks.md for the others.

Defaults: DeepSeek-V2-Lite sizes (the bundled trace: hidden 2048, expert intermediate 1408), bf16, H100 at
400 TFLOP/s for a layer's local experts (measured 351-569 TFLOP/s on an H100 SXM for V2-Lite and V3 experts,
``benchmarks/expert_gemm.py``, docs/benchmarks.md); link bandwidths live on
:class:`solvers.base.Topology` (NVLink 4 450 GB/s, 400 Gb/s InfiniBand 50 GB/s per GPU).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import numpy as np

from solvers.base import SolverInputError, Topology, is_number
from solvers.objective import dispatch_table, same_node_mask

DATAFLOWS = ("standard", "coherent")

# Model sizes that set bytes per token and FLOPs per token-expert assignment.
PRESETS: dict[str, dict[str, int]] = {
    "deepseek-v2-lite": {"hidden_size": 2048, "expert_intermediate_size": 1408},
    "deepseek-v2": {"hidden_size": 5120, "expert_intermediate_size": 1536},
    "deepseek-v3": {"hidden_size": 7168, "expert_intermediate_size": 2048},
    "mixtral-8x7b": {"hidden_size": 4096, "expert_intermediate_size": 14336},
    "qwen3-30b-a3b": {"hidden_size": 2048, "expert_intermediate_size": 768},
    "olmoe-1b-7b": {"hidden_size": 2048, "expert_intermediate_size": 1024},
    "kimi-k2": {"hidden_size": 7168, "expert_intermediate_size": 2048},
    "qwen3-235b-a22b": {"hidden_size": 4096, "expert_intermediate_size": 1536},
    "glm-4.5": {"hidden_size": 5120, "expert_intermediate_size": 1536},
    "gpt-oss-120b": {"hidden_size": 2880, "expert_intermediate_size": 2880},
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
        comm: the all-to-all kernels (:mod:`solvers.comm`): "nccl" (one copy per distinct remote GPU, the
            default), "deepep-normal" (RDMA once per remote node, then NVLink) or "deepep-ll" (one message per
            token-expert copy).
        ll_nvlink: deepep-ll reaches same-node peers over NVLink (DeepEP's ``allow_nvlink_for_low_latency_mode``);
            False sends them over RDMA.
        tokens_per_gpu: the tokens each GPU holds per forward step (decode: tens to hundreds). None: expert compute
            is linear in tokens at ``gpu_flops`` (large batches). Given, a GPU's expert compute per step is the
            roofline ``max(FLOPs / gpu_flops, weight bytes of its active experts / hbm_bandwidth)`` plus
            ``expert_overhead`` per active expert (:func:`roofline_compute`).
        hbm_bandwidth: bytes/s a GPU reads its expert weights at (H100 SXM: 3.35e12).
        expert_overhead: seconds per active expert per step (kernel and tile set-up), 0 by default.
    """

    hidden_size: int = 2048
    expert_intermediate_size: int = 1408
    dtype_bytes: int = 2
    gpu_flops: float = 400e12
    dataflow: str = "standard"
    weight_dtype_bytes: int = 2
    comm: str = "nccl"
    ll_nvlink: bool = True
    tokens_per_gpu: float | None = None
    hbm_bandwidth: float = 3.35e12
    expert_overhead: float = 0.0

    def __post_init__(self) -> None:
        from solvers import comm as comm_models

        if self.dataflow not in DATAFLOWS:
            raise SolverInputError(f"dataflow {self.dataflow!r} is not one of {', '.join(DATAFLOWS)}")
        comm_models.get(self.comm)  # a clear error for an unknown name
        if self.dataflow == "coherent" and self.comm != "nccl":
            raise SolverInputError(f"the coherent dataflow is modelled with one copy per GPU (nccl), not {self.comm}; "
                                   f"use the standard dataflow with DeepEP kernels")
        if not isinstance(self.ll_nvlink, (bool, np.bool_)):
            raise SolverInputError(f"cost model ll_nvlink must be true or false, got {self.ll_nvlink!r}")
        if self.tokens_per_gpu is not None and not is_number(self.tokens_per_gpu, 0.0, lo_open=True):
            raise SolverInputError(f"tokens per GPU must be a positive number, got {self.tokens_per_gpu!r}")
        if not is_number(self.hbm_bandwidth, 0.0, lo_open=True):
            raise SolverInputError(f"cost model hbm_bandwidth must be a positive number, got {self.hbm_bandwidth!r}")
        if not is_number(self.expert_overhead, 0.0):
            raise SolverInputError(f"cost model expert_overhead must be a number >= 0, got {self.expert_overhead!r}")
        for name in ("hidden_size", "expert_intermediate_size", "dtype_bytes", "gpu_flops", "weight_dtype_bytes"):
            v = getattr(self, name)
            if not is_number(v, 0.0, lo_open=True):
                raise SolverInputError(f"cost model {name} must be a positive number, got {v!r}")

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
            key = str(params["model"]).lower()
            if key not in PRESETS:
                raise SolverInputError(f"unknown model preset {params['model']!r}; known: {', '.join(sorted(PRESETS))}")
            cm = cls.preset(key, **{f.name: getattr(cm, f.name) for f in fields(cm) if f.name not in PRESETS[key]})
        names = {f.name for f in fields(cls)}
        over = {k: v for k, v in params.items() if k in names and v is not None}
        return replace(cm, **over) if over else cm


def phase_seconds(pair_bytes: np.ndarray, topology: Topology) -> np.ndarray:
    """``[..., G]`` time of one all-to-all phase per GPU from a ``[..., G, G]`` src->dst byte matrix.

    The diagonal (a GPU sending to itself) is ignored.
    """
    intra, inter = _link_masks(topology.num_gpus, topology.gpus_per_node)
    intra_b = np.where(intra, pair_bytes, 0.0)
    intra_t = np.maximum(intra_b.sum(axis=-1), intra_b.sum(axis=-2)) / topology.intra_node_bandwidth
    if inter is None:  # one node: nothing crosses nodes
        return intra_t
    inter_b = np.where(inter, pair_bytes, 0.0)
    inter_t = np.maximum(inter_b.sum(axis=-1), inter_b.sum(axis=-2)) / topology.inter_node_bandwidth
    return intra_t + inter_t


@functools.lru_cache(maxsize=64)
def _link_masks(num_gpus: int, gpus_per_node: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``[G, G]`` masks of the GPU pairs linked inside a node (not a GPU with itself) and across nodes (None when
    there is one node); read-only, shared by every call (the planner evaluates phases hundreds of thousands of
    times)."""
    inter = ~same_node_mask(num_gpus, gpus_per_node)
    intra = ~(inter | np.eye(num_gpus, dtype=bool))
    intra.flags.writeable = False
    inter.flags.writeable = False
    return intra, (inter if inter.any() else None)


def layer_seconds(gpu_load: np.ndarray, dispatch_bytes: np.ndarray, topology: Topology, cost: CostModel,
                  weight_reads: np.ndarray | None = None) -> np.ndarray:
    """``[L]`` estimated MoE-layer time, standard dataflow.

    Args:
        gpu_load: ``[L, G]`` token-expert assignments per GPU.
        dispatch_bytes: ``[L, G, G]`` dispatch bytes home -> expert GPU (the combine sends them back).
        weight_reads: ``[L, G]`` expert-weight reads over the steps (:func:`roofline_compute`), or None.
    """
    compute = gpu_load * cost.flops_per_assignment / cost.gpu_flops
    if cost.tokens_per_gpu is not None and weight_reads is not None:
        compute = roofline_compute(gpu_load, weight_reads, cost)
    comm = phase_seconds(dispatch_bytes, topology) + phase_seconds(np.swapaxes(dispatch_bytes, -1, -2), topology)
    return (compute + comm).max(axis=-1)


def roofline_compute(gpu_load: np.ndarray, weight_reads: np.ndarray | None, cost: CostModel) -> np.ndarray:
    """``[..., G]`` expert compute seconds per GPU over the trace.

    Args:
        gpu_load: ``[..., G]`` token-expert assignments served; weight_reads: ``[..., G]`` expert-weight reads summed
            over the forward steps (an expert with at least one token in a step is read once per step on each GPU
            serving it: a replica reads its own copy), used when ``cost.tokens_per_gpu`` is set.
    Without ``tokens_per_gpu``: ``alpha x load`` (the GEMM rate). With it, the roofline of each step summed over the
    steps, ``max(alpha x load, reads x expert_bytes / hbm_bandwidth) + reads x expert_overhead`` (the steps are
    alike on average, so the maximum of the sums stands for the sum of the maxima).
    """
    gemm = cost.seconds_per_assignment * gpu_load
    if cost.tokens_per_gpu is None or weight_reads is None:
        return gemm
    return np.maximum(gemm, weight_reads * (cost.expert_bytes / cost.hbm_bandwidth)) + weight_reads * cost.expert_overhead


def expected_weight_reads(load: np.ndarray, share: np.ndarray, tokens: float, topology: Topology,
                          cost: CostModel) -> np.ndarray:
    """``[..., G]`` expected expert-weight reads over the trace (counts model): ``steps x sum_e (1 - exp(-m_e
    share[e, g]))`` with ``steps = tokens / (tokens_per_gpu x G)`` and ``m_e = load_e / steps`` the copies of expert e
    in one step (Poisson arrivals: a step's tokens drawn at random from the workload).

    Args:
        load: ``[..., E]`` assignments; share: ``[E, G]`` served shares; tokens: tokens behind ``load``.
    """
    steps = max(float(tokens), 1e-300) / (cost.tokens_per_gpu * topology.num_gpus)
    m = np.asarray(load, dtype=np.float64) / steps
    active = -np.expm1(-m[..., :, None] * share)  # [..., E, G]
    return steps * active.sum(axis=-2)


def message_bytes(cost: CostModel, phase: str) -> float:
    """Bytes of one dispatch or combine message under ``cost.comm`` (:mod:`solvers.comm`)."""
    from solvers import comm as comm_models

    return comm_models.get(cost.comm).message_bytes(cost.hidden_size, cost.dtype_bytes, phase)


def link_layer_seconds(gpu_load: np.ndarray, nvlink: np.ndarray, rdma: np.ndarray, topology: Topology,
                       cost: CostModel, weight_reads: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``([L] layer seconds, [L, G] comm seconds)`` from exact dispatch messages per link class, any ``cost.comm``.

    Args:
        gpu_load: ``[L, G]`` token-expert assignments per GPU; nvlink, rdma: ``[L, G, G]`` dispatch messages
            src -> dst (the combine sends the same messages back, at the combine message size).
    """
    from solvers import comm as comm_models
    from solvers.comm.base import matrix_totals, phase_seconds_per_link

    model = comm_models.get(cost.comm)
    s_nv, r_nv, s_rd, r_rd = matrix_totals(nvlink, rdma)
    disp = phase_seconds_per_link(s_nv, r_nv, s_rd, r_rd, message_bytes(cost, "dispatch"), topology, model.OVERLAP)
    comb = phase_seconds_per_link(r_nv, s_nv, r_rd, s_rd, message_bytes(cost, "combine"), topology, model.OVERLAP)
    comm = disp + comb
    compute = roofline_compute(gpu_load, weight_reads, cost)
    return (compute + comm).max(axis=-1), comm


def comm_seconds(gpu_load: np.ndarray, distinct: np.ndarray | None, node_distinct: np.ndarray | None,
                 topology: Topology, cost: CostModel) -> np.ndarray:
    """``[..., G]`` all-to-all seconds per GPU (dispatch + combine), homes spread evenly, under ``cost.comm``.

    Args:
        gpu_load: ``[..., G]`` token-expert assignments served per GPU; distinct: ``[..., G]`` distinct tokens
            served per GPU; node_distinct: ``[..., Nn]`` distinct tokens served per node (deepep-normal only).
    nccl is :func:`standard_comm_seconds` (the formula the planner always used); the DeepEP models count their
    messages with :func:`solvers.comm` ``counts_messages``.
    """
    if cost.comm == "nccl":
        return standard_comm_seconds(distinct, topology, cost, phases=2)
    from solvers import comm as comm_models
    from solvers.comm.base import phase_seconds_per_link

    model = comm_models.get(cost.comm)
    s_nv, r_nv, s_rd, r_rd = model.counts_messages(gpu_load, distinct, node_distinct, topology,
                                                   allow_nvlink=cost.ll_nvlink)
    disp = phase_seconds_per_link(s_nv, r_nv, s_rd, r_rd, message_bytes(cost, "dispatch"), topology, model.OVERLAP)
    comb = phase_seconds_per_link(r_nv, s_nv, r_rd, s_rd, message_bytes(cost, "combine"), topology, model.OVERLAP)
    return disp + comb


def needs_node_distinct(cost: CostModel) -> bool:
    """Whether the communication model prices the distinct tokens per node (deepep-normal)."""
    return cost.comm == "deepep-normal"


def node_share(share: np.ndarray, topology: Topology) -> np.ndarray:
    """``[E, Nn]`` share of each expert's tokens served in each node, from the ``[E, G]`` per-GPU shares."""
    n = topology.gpus_per_node
    return share.reshape(share.shape[0], share.shape[1] // n, n).sum(axis=2)


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


def token_distinct(share: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``[G]`` distinct tokens served on each GPU, counted on the tokens themselves.

    Args:
        share: ``[E, G]`` share of each expert's tokens served on each GPU; ids: int ``[T, k]`` the tokens' experts
            at this layer (-1 = none).
    A token reaches GPU g unless none of its experts is served there. With each token's replica of expert e on g
    chosen with probability ``share[e, g]`` independently, the expected count is
    ``sum_t (1 - prod_j (1 - share[ids[t, j], g]))``: exact for experts with one replica, and it sees every
    higher-order co-activation (three or more experts of one token on one GPU), which the pairwise estimate of
    :func:`standard_distinct` does not.
    """
    return covered(*token_cover(share, ids)).sum(axis=0)


def token_cover(share: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How the experts ``ids [T, k]`` (-1 ignored) of each token cover each GPU under ``share [E, G]``: int8
    ``z [T, G]`` experts served entirely on g (share 1) and ``q [T, G]`` the product of ``1 - share`` over the
    others; the probability that no expert of token t is served on g is ``q`` where ``z == 0``, else 0."""
    ext = np.vstack([np.asarray(share, dtype=np.float64), np.zeros((1, share.shape[1]))])
    v = ext[np.where(ids >= 0, ids, share.shape[0])]  # [T, k, G]
    one = v >= 1.0
    return one.sum(axis=1, dtype=np.int8), np.prod(np.where(one, 1.0, 1.0 - v), axis=1)


def covered(z: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Probability that a token has an expert served on the GPU, from the ``z, q`` of :func:`token_cover`."""
    return 1.0 - np.where(z == 0, q, 0.0)


def routes_factor(load: np.ndarray, ids: np.ndarray) -> float:
    """Units of ``load [E]`` per token of ``ids [T, k]``: its assignments over the routes' assignments."""
    return float(load.sum()) / max(int((ids >= 0).sum()), 1)


def anchor_counts(routes: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anchor statistics of token routes for the coherent dataflow (the anchor is a token's highest-gate expert).

    Args:
        routes: int ``[T, L, k]`` expert ids, each token's highest gate first (-1 = none, listed last).
    Returns:
        ``anchor_load [L, E]`` tokens anchored at each expert, ``transitions [L-1, E, E]`` (a, b): tokens
        anchored at a in layer l that use b in layer l+1, ``pairs [L, E, E]`` (a, b): tokens anchored at a that
        also use b (b != a) in the same layer.
    """
    T, L, k = routes.shape
    E = num_experts
    ids = routes.astype(np.int64)
    anchor = ids[:, :, 0]  # [T, L]
    load = np.stack([np.bincount(anchor[:, l][anchor[:, l] >= 0], minlength=E) for l in range(L)]).astype(float)

    def pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = np.broadcast_to(a[:, None], b.shape)
        ok = (a >= 0) & (b >= 0)
        return np.bincount(a[ok] * E + b[ok], minlength=E * E).reshape(E, E).astype(float)

    trans = np.stack([pairs(anchor[:, l], ids[:, l + 1]) for l in range(L - 1)]) if L > 1 else np.zeros((0, E, E))
    same = np.stack([pairs(anchor[:, l], ids[:, l, 1:]) for l in range(L)])
    return load, trans, same


def effective_share(share: np.ndarray, table: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
    """``[k, G]`` position-aware share of each expert's tokens served on each GPU (coherent dataflow).

    Args:
        share: ``[k, G]`` even-split shares (:func:`share_matrix` rows), the fallback where no token reaches an
            expert; table: int ``[k, G]`` serving GPU for a token at position p
            (:func:`solvers.objective.dispatch_rows`, -1 = none); positions: ``[G, k]`` mass of the expert's tokens
            at each position (``W_{l-1}^T T_{l-1}``), or None for homes spread evenly (the first layer).
    ``W[e, h] = sum_p positions[p, e] [table[e, p] == h] / sum_p positions[p, e]``: a token uses the replica the
    dispatch rule picks for its position, so a replica next to the anchors of a hot expert serves more than 1/r.
    An expert with one replica keeps share 1 there.
    """
    k, G = share.shape
    w = np.ones((G, k)) if positions is None else np.asarray(positions, dtype=np.float64)
    ok = table >= 0
    flat = (np.arange(k)[:, None] * G + np.maximum(table, 0))[ok]
    W = np.bincount(flat, weights=w.T[ok], minlength=k * G).reshape(k, G)
    tot = W.sum(axis=1, keepdims=True)
    return np.where(tot > 0, W / np.where(tot > 0, tot, 1.0), share)


def replay_positions(table: np.ndarray, routes: np.ndarray, start: int = 0, pos: np.ndarray | None = None) -> np.ndarray:
    """int ``[L, T]`` GPU where each token sits before each layer under the coherent dataflow: homes spread evenly
    (token t on GPU ``t mod G``) before layer 0, then the GPU that serves its anchor (first listed expert) from its
    position, as the runtime moves it (:func:`placement.coherent.coherent_traffic`).

    Args:
        table: int ``[L, E, G]`` dispatch table (:func:`solvers.objective.dispatch_table`); routes: int ``[L, T, k]``
            (-1 = none; a token without experts at a layer stays where it is).
        start, pos: recompute only layers ``start + 1 ..`` of ``pos`` (in place) after layer ``start`` changed.
    """
    L, T, _ = routes.shape
    G = table.shape[2]
    if pos is None:
        pos = np.empty((L, T), dtype=np.int64)
        pos[0] = np.arange(T) % G
        start = 0
    for l in range(start, L - 1):
        a = routes[l, :, 0].astype(np.int64)
        pos[l + 1] = np.where(a >= 0, table[l, np.maximum(a, 0), pos[l]], pos[l])
    return pos


def position_mass(pos: np.ndarray, ids: np.ndarray, num_experts: int, num_gpus: int, factor: float = 1.0) -> np.ndarray:
    """``[G, E]`` token-expert assignments of one layer by the position of their token: pos ``[T]``, ids
    ``[T, k]`` (-1 = none), scaled by ``factor`` (the ``positions`` of :func:`effective_share`)."""
    ok = ids >= 0
    flat = (np.broadcast_to(pos[:, None], ids.shape)[ok] * num_experts + ids[ok]).astype(np.int64)
    return np.bincount(flat, minlength=num_gpus * num_experts).reshape(num_gpus, num_experts) * factor


def dispatch_matrix(positions: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``[G, G]`` (p, h): token-expert mass dispatched from position p to serving GPU h.

    Args:
        positions: ``[G, k]`` mass of each expert's tokens at each position; table: int ``[k, G]`` serving GPU per
            position (-1 = none). ``M[p, h] = sum_e positions[p, e] [table[e, p] == h]`` (a weighted bincount).
    """
    G = positions.shape[0]
    ok = table >= 0
    flat = (np.arange(G)[None, :] * G + np.maximum(table, 0))[ok]
    return np.bincount(flat, weights=positions.T[ok], minlength=G * G).reshape(G, G)


def coherent_comm_seconds(distinct: np.ndarray, gpu_load: np.ndarray, into: np.ndarray | None, anchor: np.ndarray,
                          topology: Topology, cost: CostModel, scale: np.ndarray | float = 1.0) -> np.ndarray:
    """``[N, G]`` all-to-all seconds per GPU of one layer under the coherent dataflow (counts model).

    Args:
        distinct: ``[N, G]`` distinct tokens served on each GPU; gpu_load: ``[N, G]`` token-expert assignments.
        into: ``[G, G]`` (p, h): token-expert assignments served on h whose token sits at position p, the anchor
            GPU of the layer before (:func:`dispatch_matrix`); None for the first layer (dispatched from homes
            spread evenly).
        anchor: ``[G, G]`` (g, h): assignments on h of tokens anchored on g at this layer (``W^T pairs W``, W the
            served shares of :func:`effective_share`).
        scale: ``[N]`` profile token counts relative to the pair counts' units.
    A GPU h receives one dispatch copy per distinct token from each other GPU and sends one combine copy per
    distinct token to each other anchor GPU: pair counts are de-duplicated by ``distinct_h / gpu_load_h``.
    """
    sc = np.broadcast_to(np.asarray(scale, dtype=float), distinct.shape[:1])[:, None, None]
    dd = np.divide(distinct, gpu_load, out=np.zeros_like(distinct), where=gpu_load > 0)[:, None, :]  # [N, 1, G]
    B = cost.token_bytes
    if into is None:
        disp = standard_comm_seconds(distinct, topology, cost, phases=1)
    else:
        disp = phase_seconds(into[None] * sc * dd * B, topology)
    comb = phase_seconds(np.swapaxes(anchor[None] * sc * dd, -1, -2) * B, topology)
    return disp + comb


def estimate_layer_seconds(phy2log: np.ndarray, load: np.ndarray, topology: Topology, cost: CostModel,
                           transitions: np.ndarray | None = None, coactivation: np.ndarray | None = None,
                           anchor_pairs: np.ndarray | None = None, tokens: np.ndarray | None = None,
                           routes: np.ndarray | None = None, position_routes: np.ndarray | None = None,
                           detail: bool = False):
    """``[L]`` estimated MoE-layer seconds of a placement from counts (the joint planner's objective).

    Args:
        phy2log: ``[L, S]``; load: ``[L, E]`` token-expert assignments; coactivation: ``[L, E, E]`` (optional:
            duplicate copies); transitions ``[L-1, E, E]`` and anchor_pairs ``[L, E, E]``: anchor statistics of
            :func:`anchor_counts` (coherent dataflow; needed there); tokens: ``[L]`` tokens per layer (default:
            pairs-only duplicate estimate).
        routes: int ``[T, L, k]`` token routes (-1 = none): count the distinct tokens per GPU on them
            (:func:`token_distinct`, scaled to the units of ``load``) instead of the pairwise estimate.
        position_routes: int ``[T, L, k]`` token routes, highest gate first (coherent dataflow): take each layer's
            token positions from replaying them (:func:`replay_positions`) instead of the previous layer's served
            shares.
        detail: also return ``(compute [L, G], comm [L, G])``.
    All counts must refer to the same tokens (the planner rescales them so). Under the coherent dataflow the
    replicas' shares are the position-aware served shares of :func:`effective_share` (module docstring).
    """
    L, E = load.shape
    G = topology.num_gpus
    alpha = cost.seconds_per_assignment
    shares = np.stack([share_matrix(phy2log[l], E, topology) for l in range(L)])  # [L, E, G] even split
    coherent = cost.dataflow == "coherent"
    if coherent and (transitions is None or anchor_pairs is None):
        raise SolverInputError("the coherent dataflow needs anchor transitions and pairs; give a token trace")
    served = shares
    if coherent:
        table = dispatch_table(phy2log, E, topology)  # [L, E, G]
        # positions of layer l's tokens: where the previous layer's anchors are served
        pos = [None]  # [G, E] each
        served = np.empty_like(shares)
        served[0] = effective_share(shares[0], table[0], None)
        if position_routes is not None:
            ids = np.ascontiguousarray(np.asarray(position_routes).transpose(1, 0, 2))  # [L, T, k]
            tok_pos = replay_positions(table, ids)
        for l in range(1, L):
            if position_routes is not None:
                pos.append(position_mass(tok_pos[l], ids[l], E, G, routes_factor(load[l], ids[l])))
            else:
                pos.append(served[l - 1].T @ transitions[l - 1])
            served[l] = effective_share(shares[l], table[l], pos[l])
    compute = np.empty((L, G))
    distinct = np.empty((L, G))
    by_node = needs_node_distinct(cost)
    node_distinct = np.empty((L, topology.num_nodes)) if by_node else None
    for l in range(L):
        co = None if coactivation is None else coactivation[l]
        tok = None if tokens is None else float(tokens[l])
        if routes is not None:
            compute[l] = load[l] @ served[l]
            f = routes_factor(load[l], routes[:, l])
            distinct[l] = token_distinct(served[l], routes[:, l]) * f
            if by_node:
                node_distinct[l] = token_distinct(node_share(served[l], topology), routes[:, l]) * f
        else:
            compute[l], distinct[l] = standard_distinct(served[l], load[l], co, tok)
            if by_node:
                node_distinct[l] = standard_distinct(node_share(served[l], topology), load[l], co, tok)[1]
    gl = compute.copy()
    compute *= alpha
    if cost.tokens_per_gpu is not None:  # the roofline of each forward step (decode)
        if tokens is None:
            raise SolverInputError("the expert-compute roofline (tokens per GPU) needs the tokens per layer")
        tok = np.asarray(tokens, dtype=np.float64)
        reads = np.stack([expected_weight_reads(load[l], served[l], tok[l], topology, cost) for l in range(L)])
        compute = roofline_compute(gl, reads, cost)
    if not coherent:
        comm = comm_seconds(gl, distinct, node_distinct, topology, cost)
    else:
        comm = np.zeros((L, G))
        for l in range(L):
            into = None if l == 0 else dispatch_matrix(pos[l], table[l])
            anc = served[l].T @ anchor_pairs[l] @ served[l]
            comm[l] = coherent_comm_seconds(distinct[l][None], gl[l][None], into, anc, topology, cost)[0]
    t = (compute + comm).max(axis=1)
    return (t, compute, comm) if detail else t
