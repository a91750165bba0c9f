"""The affinity model: what routing statistics say about which experts belong together.

All statistics are counts, built with ``np.bincount`` over flattened indices (no Python loop over tokens), and
:class:`AffinityStats` objects add up exactly, so a trace can be reduced chunk by chunk or file by file.

- load ``[L, E]``: token-expert assignments per layer (and gate-weighted).
- transitions ``[L-1, E, E]``: for every token and boundary l -> l+1, each of the k x k pairs (expert a at l,
  expert b at l+1) counts once (gate-weighted: w_a x w_b). ExFlow's inter-layer affinity (arXiv 2401.08383)
  is the row-normalised matrix ``P(b at l+1 | a at l)``.
- transitions_top1 ``[L-1, E, E]``: the same for the highest-gate expert only (needs gate weights).
- coactivation ``[L, E, E]``: pairs of distinct experts chosen by one token at one layer (symmetric).
- transitions_shuffled ``[L-1, E, E]``: pairs after shuffling the token order of layer l+1 (seeded): the
  baseline that has the same marginals and no affinity; mutual information is reported against it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable

import numpy as np

from traces import RoutingTrace, iter_trace_chunks
from traces.format import pair_counts

_CHUNK = 8192  # tokens per bincount batch: bounds memory at V3 scale (k x k pairs per token and boundary)


@dataclass(eq=False)
class AffinityStats:
    """Mergeable routing statistics of one model layout. Add two with ``+``."""

    num_experts: int
    moe_layer_index: np.ndarray  # [L]
    tokens: np.ndarray  # [L] tokens that reached each layer
    load: np.ndarray  # [L, E]
    transitions: np.ndarray  # [L-1, E, E]
    transitions_shuffled: np.ndarray | None  # [L-1, E, E]; None when made with baselines=False
    coactivation: np.ndarray  # [L, E, E]
    load_gate: np.ndarray | None = None  # [L, E]
    transitions_gate: np.ndarray | None = None  # [L-1, E, E]
    transitions_top1: np.ndarray | None = None  # [L-1, E, E]

    # construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_trace(cls, trace: RoutingTrace, seed: int = 0, chunk_tokens: int = _CHUNK,
                   baselines: bool = True) -> "AffinityStats":
        """Statistics of one trace (processed in token chunks to bound memory).

        ``baselines=False`` skips the token-shuffled transitions and the gate-weighted counts (None then), which
        the affinity summary needs and the planner does not (two of the five k x k pair counts)."""
        perm = np.random.default_rng(seed).permutation(trace.num_tokens) if baselines else None  # one shuffle
        total = None
        for s in range(0, trace.num_tokens, chunk_tokens):  # a running sum: one part in memory at a time
            part = cls._from_arrays(trace, slice(s, min(s + chunk_tokens, trace.num_tokens)), perm)
            total = part if total is None else total + part
        return total

    @classmethod
    def from_chunks(cls, chunks: Iterable[RoutingTrace], seed: int = 0) -> "AffinityStats":
        """Merge the statistics of a stream of trace chunks (e.g. :func:`traces.iter_trace_chunks`).

        Exact for every count; the shuffled baseline shuffles tokens within each chunk (use large chunks)."""
        total = None
        for i, chunk in enumerate(chunks):
            part = cls.from_trace(chunk, seed=seed + i)
            total = part if total is None else total + part
        if total is None:
            raise ValueError("no chunks")
        return total

    @classmethod
    def from_file(cls, path, chunk_tokens: int = 65536, seed: int = 0) -> "AffinityStats":
        """Reduce a trace file to statistics with memory bounded by ``chunk_tokens`` (streaming)."""
        return cls.from_chunks(iter_trace_chunks(path, chunk_tokens), seed=seed)

    @classmethod
    def _from_arrays(cls, trace: RoutingTrace, sl: slice, perm: np.ndarray | None) -> "AffinityStats":
        """Statistics of tokens ``sl``; the shuffled baseline pairs token t at layer l with token perm[t] at l+1
        (no baseline and no gate-weighted counts when ``perm`` is None)."""
        ids = trace.expert_ids[sl]
        E = trace.num_experts
        T, L, k = ids.shape
        valid = ids >= 0
        lay = np.broadcast_to(np.arange(L)[None, :, None], ids.shape)
        flat = (lay * E + ids.astype(np.int64))[valid]
        load = np.bincount(flat, minlength=L * E).reshape(L, E).astype(np.float64)
        tokens = valid.any(axis=2).sum(axis=0).astype(np.float64)
        a, b = ids[:, :-1], ids[:, 1:]
        trans = pair_counts(a, b, E)
        shuffled = None if perm is None else pair_counts(a, trace.expert_ids[perm[sl], 1:], E)
        coact = pair_counts(ids, ids, E, exclude_diagonal=True)
        load_g = trans_g = trans_1 = None
        if trace.gate_weights is not None:
            g = trace.gate_weights[sl]
            if perm is not None:
                load_g = np.bincount(flat, weights=g[valid].astype(np.float64), minlength=L * E).reshape(L, E)
                trans_g = pair_counts(a, b, E, g[:, :-1], g[:, 1:])
            top1 = trace.take(np.arange(trace.num_tokens)[sl]).top1_ids()[:, :, None]
            trans_1 = pair_counts(top1[:, :-1], top1[:, 1:], E)
        return cls(E, trace.moe_layer_index, tokens, load, trans, shuffled, coact, load_g, trans_g, trans_1)

    def __add__(self, other: "AffinityStats") -> "AffinityStats":
        if self.num_experts != other.num_experts or self.load.shape != other.load.shape:
            raise ValueError(f"cannot merge statistics of different layouts: {self.load.shape} vs {other.load.shape}")
        merged = {}
        for f in fields(self):
            x, y = getattr(self, f.name), getattr(other, f.name)
            if f.name in ("num_experts", "moe_layer_index"):
                merged[f.name] = x
            elif x is None or y is None:
                merged[f.name] = None
            else:
                merged[f.name] = x + y
        return AffinityStats(**merged)

    # shapes --------------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    # derived -------------------------------------------------------------------------------------------------
    def conditional(self, which: str = "transitions") -> np.ndarray:
        """``[L-1, E, E]`` ``P(b at l+1 | a at l)``: rows normalised (an expert never used has a zero row)."""
        t = getattr(self, which)
        rows = t.sum(axis=2, keepdims=True)
        return np.divide(t, rows, out=np.zeros_like(t), where=rows > 0)

    def mutual_information(self, which: str = "transitions") -> np.ndarray:
        """``[L-1]`` mutual information (nats) between the expert at l and at l+1 under the pair distribution."""
        return mutual_information(getattr(self, which))

    def summary(self) -> dict:
        """Per-layer and per-boundary summaries (plain Python types, JSON-ready)."""
        L, E = self.load.shape
        p = self.load / np.maximum(self.load.sum(axis=1, keepdims=True), 1e-300)
        ent = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(axis=1)
        hot = max(1, int(round(0.1 * E)))
        top_share = np.sort(p, axis=1)[:, ::-1][:, :hot].sum(axis=1)
        cond = self.conditional()
        row_mass = self.transitions.sum(axis=2)
        weights = row_mass / np.maximum(row_mass.sum(axis=1, keepdims=True), 1e-300)
        sorted_cond = np.sort(cond, axis=2)[:, :, ::-1]
        top1_cond = (sorted_cond[:, :, 0] * weights).sum(axis=1)
        # successors needed to cover half of a row's mass (mass-weighted mean over rows)
        need_half = ((np.cumsum(sorted_cond, axis=2) < 0.5).sum(axis=2) + 1)
        need_half = (need_half * weights).sum(axis=1)
        mi = self.mutual_information()
        mi_shuf = self.mutual_information("transitions_shuffled")
        centropy = -(np.where(cond > 0, cond * np.log(np.where(cond > 0, cond, 1)), 0)).sum(axis=2)
        cond_entropy = (centropy * weights).sum(axis=1)
        uniform = self.transitions.sum(axis=(1, 2)) / E
        per_layer = [{"moe_layer": int(self.moe_layer_index[l]), "tokens": int(self.tokens[l]),
                      "load_entropy_norm": float(ent[l] / np.log(E)) if E > 1 else 1.0,
                      "hot10_share": float(top_share[l]),
                      "load_max_over_mean": float(self.load[l].max() / max(self.load[l].mean(), 1e-300))}
                     for l in range(L)]
        per_boundary = [{"from_moe_layer": int(self.moe_layer_index[l]), "to_moe_layer": int(self.moe_layer_index[l + 1]),
                         "mutual_information": float(mi[l]), "mutual_information_shuffled": float(mi_shuf[l]),
                         "conditional_entropy": float(cond_entropy[l]),
                         "top1_conditional": float(top1_cond[l]), "successors_for_half": float(need_half[l]),
                         "pairs": float(uniform[l] * E)}
                        for l in range(L - 1)]
        overall = {"tokens": int(self.tokens.max()), "layers": L, "experts": E,
                   "mutual_information_mean": float(mi.mean()) if L > 1 else 0.0,
                   "mutual_information_shuffled_mean": float(mi_shuf.mean()) if L > 1 else 0.0,
                   "top1_conditional_mean": float(top1_cond.mean()) if L > 1 else 0.0,
                   "load_entropy_norm_mean": float(np.mean(ent) / np.log(E)) if E > 1 else 1.0,
                   "hot10_share_mean": float(top_share.mean())}
        return {"overall": overall, "per_layer": per_layer, "per_boundary": per_boundary}


def mutual_information(pairs: np.ndarray) -> np.ndarray:
    """``[P]`` mutual information (nats) of the joint distributions given by ``[P, E, E]`` pair counts."""
    total = pairs.sum(axis=(1, 2), keepdims=True)
    joint = np.divide(pairs, total, out=np.zeros_like(pairs), where=total > 0)
    pa = joint.sum(axis=2, keepdims=True)
    pb = joint.sum(axis=1, keepdims=True)
    denom = pa * pb
    ratio = np.divide(joint, denom, out=np.ones_like(joint), where=(joint > 0) & (denom > 0))
    return (joint * np.log(ratio)).sum(axis=(1, 2))


def affinity_stats(trace_or_traces, seed: int = 0) -> AffinityStats:
    """Statistics of one trace or the merged statistics of several."""
    if isinstance(trace_or_traces, RoutingTrace):
        return AffinityStats.from_trace(trace_or_traces, seed=seed)
    parts = [AffinityStats.from_trace(t, seed=seed) for t in trace_or_traces]
    return sum(parts[1:], parts[0])
