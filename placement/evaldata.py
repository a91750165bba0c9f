"""What the evaluators need from a trace, computed once and reused for every plan (:class:`EvalData`,
:func:`prepare`), and the per-token helper they share (:func:`distinct_sorted`). Used by :mod:`placement.evaluate`
and :mod:`placement.coherent`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from traces import LoadProfile, RoutingTrace, layer_counts
from traces.format import pair_counts

__all__ = ["EvalData", "prepare", "distinct_sorted"]


@dataclass(eq=False)
class EvalData:
    """What the evaluator needs from a trace, computed once and reused for every plan."""

    num_experts: int
    load: np.ndarray  # [L, E] (summed over profiles)
    profiles: np.ndarray | None = None  # [N, L, E] counts-only input
    expert_ids: np.ndarray | None = None  # [T, L, k], each token's experts highest gate first
    sequence_index: np.ndarray | None = None  # [T]
    transitions: np.ndarray | None = None  # [L-1, E, E]
    transitions_top1: np.ndarray | None = None  # [L-1, E, E]
    source: str | None = None

    @property
    def num_tokens(self) -> int:
        return 0 if self.expert_ids is None else int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])


def prepare(data: RoutingTrace | LoadProfile | EvalData) -> EvalData:
    """Reduce a trace (or profile) to what :func:`evaluate` needs."""
    if isinstance(data, EvalData):
        return data
    if isinstance(data, LoadProfile):
        return EvalData(data.num_experts, data.total(), profiles=data.logical_count, source=data.source)
    ids = data.sorted_by_gate().expert_ids  # highest gate first (the coherent dataflow's anchor is column 0)
    E = data.num_experts
    top1 = None
    if data.gate_weights is not None:
        t1 = data.top1_ids()[:, :, None]
        top1 = pair_counts(t1[:, :-1], t1[:, 1:], E)
    return EvalData(E, layer_counts(ids, E), expert_ids=ids, sequence_index=data.sequence_index(),
                    transitions=pair_counts(ids[:, :-1], ids[:, 1:], E), transitions_top1=top1, source=data.source)


def distinct_sorted(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values ``[..., k]`` and a mask of first occurrences among the non-negative ones."""
    srt = np.sort(values, axis=-1)
    first = np.ones_like(srt, dtype=bool)
    first[..., 1:] = srt[..., 1:] != srt[..., :-1]
    return srt, first & (srt >= 0)
