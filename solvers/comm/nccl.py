"""``nccl``: one copy of a token per distinct remote GPU serving one of its experts, at dispatch and at combine.

This is what ``placement.runtime``'s ``torch.distributed.all_to_all_single`` exchange does and what DeepEP's
intra-node normal kernels do inside one node. A copy between GPUs of one node goes over NVLink, across nodes
over RDMA; the two parts of a phase are counted one after the other (NCCL's all-to-all runs them as one
collective, no forwarding).
"""

from __future__ import annotations

import numpy as np

from solvers.base import Topology
from solvers.comm.base import distinct_sorted, even_home_messages, pair_matrix
from solvers.objective import same_node_mask

NAME = "nccl"
OVERLAP = False


def message_bytes(hidden_size: int, dtype_bytes: int, phase: str = "dispatch") -> float:
    """One copy of the hidden state (``hidden_size x dtype_bytes``), both phases."""
    return float(hidden_size * dtype_bytes)


def token_messages(dest: np.ndarray, home: np.ndarray, topology: Topology, **_) -> tuple[np.ndarray, np.ndarray]:
    """``(nvlink [G, G], rdma [G, G])`` dispatch copies home -> serving GPU, one per distinct remote GPU."""
    G = topology.num_gpus
    srt, first = distinct_sorted(dest)
    h = home[:, None]
    pairs = pair_matrix(h, srt, first & (srt != h), G)
    same = same_node_mask(G, topology.gpus_per_node)
    return np.where(same, pairs, 0.0), np.where(same, 0.0, pairs)


def counts_messages(gpu_load: np.ndarray, distinct: np.ndarray, node_distinct: np.ndarray | None,
                    topology: Topology, **_) -> tuple[np.ndarray, ...]:
    """Per GPU ``(sent_nvlink, recv_nvlink, sent_rdma, recv_rdma)`` of one phase, homes spread evenly: GPU g gets
    one copy of each of its ``distinct`` tokens not homed on it."""
    return even_home_messages(distinct, topology)
