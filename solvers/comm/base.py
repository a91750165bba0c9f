"""What every communication model shares: distinct values per token, pair counting, link times.

Shapes: ``dest [t, k]`` the GPU serving each of a token's k experts at one layer (-1 = none), ``home [t]`` the
token's home GPU; message matrices ``[G, G]`` (src, dst); per-GPU vectors ``[..., G]``; ``Nn`` nodes of
``n = gpus_per_node`` GPUs, GPU g on node ``g // n`` with local index ``g % n``.
"""

from __future__ import annotations

import numpy as np

from solvers.base import Topology

__all__ = ["distinct_sorted", "pair_matrix", "node_sums", "phase_seconds_per_link", "even_home_messages"]


def distinct_sorted(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values ``[..., k]`` and a mask of first occurrences among the non-negative ones."""
    srt = np.sort(values, axis=-1)
    first = np.ones_like(srt, dtype=bool)
    first[..., 1:] = srt[..., 1:] != srt[..., :-1]
    return srt, first & (srt >= 0)


def pair_matrix(src: np.ndarray, dst: np.ndarray, mask: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[G, G]`` count of the (src, dst) pairs where ``mask`` (arrays of one shape; src broadcast to it)."""
    src = np.broadcast_to(src, mask.shape)
    flat = (src[mask].astype(np.int64) * num_gpus + dst[mask].astype(np.int64))
    return np.bincount(flat, minlength=num_gpus * num_gpus).reshape(num_gpus, num_gpus).astype(np.float64)


def node_sums(x: np.ndarray, gpus_per_node: int) -> np.ndarray:
    """``[..., Nn]`` sums of a per-GPU ``[..., G]`` vector over each node's GPUs."""
    G = x.shape[-1]
    return x.reshape(*x.shape[:-1], G // gpus_per_node, gpus_per_node).sum(axis=-1)


def even_home_messages(per_gpu: np.ndarray, topology: Topology) -> tuple[np.ndarray, ...]:
    """Messages of one phase when every GPU g receives ``per_gpu[g]`` messages (one per token-copy it serves) from
    homes spread evenly over the G GPUs (a home never messages itself): ``(sent_nvlink, recv_nvlink, sent_rdma,
    recv_rdma)``, each ``[..., G]``; same-node pairs are NVLink, others RDMA."""
    G, n = topology.num_gpus, topology.gpus_per_node
    D = per_gpu / G  # what each home sends to g
    node_of = np.repeat(node_sums(D, n), n, axis=-1)  # [..., G] total of the GPU's node
    recv_nv, recv_rdma = D * (n - 1), D * (G - n)
    sent_nv = node_of - D
    sent_rdma = D.sum(axis=-1, keepdims=True) - node_of
    return sent_nv, recv_nv, sent_rdma, recv_rdma


def phase_seconds_per_link(sent_nv: np.ndarray, recv_nv: np.ndarray, sent_rdma: np.ndarray, recv_rdma: np.ndarray,
                           msg_bytes: float, topology: Topology, overlap: bool) -> np.ndarray:
    """``[..., G]`` seconds of one all-to-all phase per GPU: per link class the larger of bytes sent and received
    (full-duplex links) over the class's bandwidth (``intra_node_bandwidth`` for NVLink, ``inter_node_bandwidth``
    for RDMA, one NIC per GPU); the two classes concurrently (``overlap``: the longer) or in turn (the sum)."""
    nv = np.maximum(sent_nv, recv_nv) * msg_bytes / topology.intra_node_bandwidth
    rd = np.maximum(sent_rdma, recv_rdma) * msg_bytes / topology.inter_node_bandwidth
    return np.maximum(nv, rd) if overlap else nv + rd


def matrix_totals(nvlink: np.ndarray, rdma: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(sent_nvlink, recv_nvlink, sent_rdma, recv_rdma)`` per GPU from ``[..., G, G]`` src->dst message
    matrices (the diagonal is never counted: a GPU does not message itself)."""
    def off(m):
        return m - np.einsum("...ii->...i", m)[..., None] * np.eye(m.shape[-1])
    nv, rd = off(nvlink), off(rdma)
    return nv.sum(axis=-1), nv.sum(axis=-2), rd.sum(axis=-1), rd.sum(axis=-2)
