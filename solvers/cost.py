"""Cost model: estimated MoE-layer time from per-GPU compute and per-GPU all-to-all bytes.

The model (documented in docs/concepts.md):

- compute_g = token-expert assignments on GPU g x ``flops_per_assignment`` / ``gpu_flops``, with
  ``flops_per_assignment = 2 x 3 x hidden_size x expert_intermediate_size`` (gate, up and down projections).
- comm_g (one all-to-all phase) = max(sent, received) intra-node bytes / intra-node bandwidth
  + max(sent, received) inter-node bytes / inter-node bandwidth (full-duplex links, per-GPU NICs).
- standard dataflow: dispatch then combine (two phases, the combine is the dispatch transposed);
  the layer time is ``max_g(compute_g + comm_g)``: the slowest GPU sets the pace.

Defaults: DeepSeek-V2-Lite sizes (the bundled trace: hidden 2048, expert intermediate 1408), bf16, H100 at
400 TFLOP/s effective for grouped GEMMs (about 40% of the dense bf16 peak).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from solvers.base import Topology


@dataclass(frozen=True)
class CostModel:
    hidden_size: int = 2048
    expert_intermediate_size: int = 1408
    dtype_bytes: int = 2
    gpu_flops: float = 400e12
    dataflow: str = "standard"

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's hidden state."""
        return self.hidden_size * self.dtype_bytes

    @property
    def flops_per_assignment(self) -> float:
        return 6.0 * self.hidden_size * self.expert_intermediate_size


def phase_seconds(pair_bytes: np.ndarray, topology: Topology) -> np.ndarray:
    """``[..., G]`` time of one all-to-all phase per GPU from a ``[..., G, G]`` src->dst byte matrix."""
    node = topology.node_of_gpu()
    inter = node[:, None] != node[None, :]
    intra_b = np.where(inter, 0.0, pair_bytes)
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
