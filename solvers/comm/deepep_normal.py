"""``deepep-normal``: DeepEP's normal kernels (prefill, training): RDMA once per remote node, then NVLink.

``csrc/kernels/internode.cu`` (and the DeepSeek-V3 report's cross-node all-to-all): a token goes over NVLink to
each distinct target GPU in its home node; to every other node holding one of its experts it goes over RDMA
**once**, to the GPU with the same local index as its home, which forwards it over NVLink to the other target
GPUs of its node. Combine mirrors it (partial sums reduced in the node over NVLink, one RDMA copy back per node).
So inter-node bytes follow the distinct remote *nodes* among a token's experts (hence DeepSeek-V3's node-limited
routing, 4 nodes per token), and co-locating co-activated experts on a node pays. The RDMA sends and the NVLink
forwarding run concurrently in the kernels (the phase takes the longer).

Message bytes: one hidden state, ``hidden x dtype_bytes`` (FP8 adds ``hidden / 128`` FP32 scales); combine in bf16.
"""

from __future__ import annotations

import numpy as np

from solvers.base import Topology
from solvers.comm.base import distinct_sorted, node_sums, pair_matrix

NAME = "deepep-normal"
OVERLAP = True


def message_bytes(hidden_size: int, dtype_bytes: int, phase: str = "dispatch") -> float:
    if phase == "combine":
        return float(hidden_size * 2)
    return float(hidden_size * dtype_bytes + (hidden_size // 128 * 4 if dtype_bytes == 1 else 0))


def token_messages(dest: np.ndarray, home: np.ndarray, topology: Topology, **_) -> tuple[np.ndarray, np.ndarray]:
    """``(nvlink [G, G], rdma [G, G])`` dispatch messages of one layer: home -> target GPUs of its node (NVLink),
    home -> relay of each remote target node (RDMA; the relay has the home's local index), relay -> the node's
    other target GPUs (NVLink)."""
    G, n = topology.num_gpus, topology.gpus_per_node
    srt, first = distinct_sorted(dest)
    h = home[:, None]
    hnode, hlocal = h // n, h % n
    tnode = np.where(srt >= 0, srt // n, -1)
    relay = tnode * n + hlocal  # [t, k] the GPU of the target's node with the home's local index
    in_home = first & (tnode == hnode)
    nv = pair_matrix(h, srt, in_home & (srt != h), G)
    far = first & (tnode != hnode)
    nv += pair_matrix(relay, srt, far & (srt != relay), G)
    nodes, nfirst = distinct_sorted(np.where(dest >= 0, dest // n, -1))
    remote_node = nfirst & (nodes != hnode)
    rdma = pair_matrix(h, nodes * n + hlocal, remote_node, G)
    return nv, rdma


def counts_messages(gpu_load: np.ndarray, distinct: np.ndarray, node_distinct: np.ndarray, topology: Topology,
                    **_) -> tuple[np.ndarray, ...]:
    """Per GPU ``(sent_nvlink, recv_nvlink, sent_rdma, recv_rdma)`` of one phase, homes spread evenly.

    With ``D_g`` the tokens reaching GPU g (``distinct``) and ``D_N`` those reaching node N (``node_distinct``),
    Nn nodes of n GPUs, G = Nn x n: GPU g receives NVLink copies from the other homes of its node and as a
    forwarded copy for remote homes of another local index, ``D_g (G - Nn) / G``; it sends ``(sum of D over its
    node's other GPUs) x Nn / G`` (as home, and as relay for the Nn - 1 remote homes of its local index). RDMA: a
    GPU receives, as relay, ``D_N (G - n) / (G n)`` (homes outside its node with its local index) and sends, as
    home, ``(sum_N D_N - D_node(g)) / G``.
    """
    G, n = topology.num_gpus, topology.gpus_per_node
    Nn = G // n
    node_total = np.repeat(node_sums(distinct, n), n, axis=-1)
    recv_nv = distinct * (G - Nn) / G
    sent_nv = (node_total - distinct) * Nn / G
    own = np.repeat(node_distinct, n, axis=-1)  # [..., G] D of the GPU's node
    recv_rd = own * (G - n) / (G * n)
    sent_rd = (node_distinct.sum(axis=-1, keepdims=True) - own) / G
    return sent_nv, recv_nv, sent_rd, recv_rd
