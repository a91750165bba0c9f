"""``deepep-ll``: DeepEP's low-latency kernels (decode): one message per (token, expert) copy, no deduplication.

``csrc/kernels/internode_ll.cu`` writes each copy of a token into the target rank's receive area of that expert
(``dst_expert_local_idx x num_ranks x num_max_dispatch_tokens_per_rank x bytes_per_msg + ...``), so two experts of
one token on one GPU cost two messages, and co-locating co-activated experts saves nothing; balance and the node
of each copy are what count. A copy to the token's own GPU costs no link; a peer in the same node is reached over
NVLink when ``allow_nvlink`` (DeepEP's ``allow_nvlink_for_low_latency_mode``, the default), else over RDMA; other
nodes over RDMA (IBGDA). NVLink and RDMA messages are in flight together (the phase takes the longer).

Message bytes (``num_bytes_per_msg`` in ``internode_ll.cu``): dispatch ``16 + hidden x dtype_bytes`` (a 16-byte
header; in FP8 plus ``hidden / 128`` FP32 scales: 14,352 B in bf16 and 7,408 B in FP8 at hidden 7168); combine
sends the expert outputs back in bf16, ``hidden x 2``.
"""

from __future__ import annotations

import numpy as np

from solvers.base import Topology
from solvers.comm.base import even_home_messages, pair_matrix

NAME = "deepep-ll"
OVERLAP = True


def message_bytes(hidden_size: int, dtype_bytes: int, phase: str = "dispatch") -> float:
    if phase == "combine":
        return float(hidden_size * 2)
    scales = hidden_size // 128 * 4 if dtype_bytes == 1 else 0
    return float(16 + hidden_size * dtype_bytes + scales)


def token_messages(dest: np.ndarray, home: np.ndarray, topology: Topology, allow_nvlink: bool = True,
                   **_) -> tuple[np.ndarray, np.ndarray]:
    """``(nvlink [G, G], rdma [G, G])`` dispatch messages home -> serving GPU, one per (token, expert) copy."""
    G, n = topology.num_gpus, topology.gpus_per_node
    h = np.broadcast_to(home[:, None], dest.shape)
    remote = (dest >= 0) & (dest != h)
    same = remote & (dest // n == h // n)
    nv = same if allow_nvlink else np.zeros_like(same)
    return pair_matrix(h, dest, nv, G), pair_matrix(h, dest, remote & ~nv, G)


def counts_messages(gpu_load: np.ndarray, distinct: np.ndarray | None, node_distinct: np.ndarray | None,
                    topology: Topology, allow_nvlink: bool = True, **_) -> tuple[np.ndarray, ...]:
    """Per GPU ``(sent_nvlink, recv_nvlink, sent_rdma, recv_rdma)`` of one phase, homes spread evenly: GPU g gets
    one message per token-expert copy it serves (``gpu_load``) not homed on it."""
    sent_nv, recv_nv, sent_rd, recv_rd = even_home_messages(gpu_load, topology)
    if not allow_nvlink:
        return np.zeros_like(sent_nv), np.zeros_like(recv_nv), sent_rd + sent_nv, recv_rd + recv_nv
    return sent_nv, recv_nv, sent_rd, recv_rd
