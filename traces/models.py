"""The MoE layouts of the models users serve now, from their config.json, for synthetic traces and cost presets.

Values as published in each model's ``config.json`` (num_hidden_layers, first_k_dense_replace, n_routed_experts /
num_experts / num_local_experts, num_experts_per_tok / experts_per_token, n_group / topk_group, hidden_size,
moe_intermediate_size / intermediate_size); ../shared/REFERENCE.md lists them with the same numbers.
:func:`traces.synthetic.model_trace` makes a calibrated synthetic trace of each; ``solvers.cost.PRESETS`` holds the
same sizes for the cost model (``tests/test_models.py`` checks the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ModelShape", "MODELS", "model_shape"]


@dataclass(frozen=True)
class ModelShape:
    """An MoE model's layout: decoder layers, leading dense layers, routed experts, experts per token, expert groups
    and groups per token (node-limited routing; 1 / None: none), hidden size and routed-expert FFN width."""

    name: str
    num_hidden_layers: int
    first_dense: int
    num_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    groups: int = 1
    topk_groups: int | None = None
    moe_every: int = 1

    @property
    def moe_layer_index(self) -> np.ndarray:
        """``[L]`` decoder-layer index of each MoE layer."""
        return np.arange(self.first_dense, self.num_hidden_layers, self.moe_every)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_index)


MODELS: dict[str, ModelShape] = {m.name: m for m in (
    ModelShape("deepseek-v3", 61, 3, 256, 8, 7168, 2048, groups=8, topk_groups=4),
    ModelShape("kimi-k2", 61, 1, 384, 8, 7168, 2048),
    ModelShape("qwen3-235b-a22b", 94, 0, 128, 8, 4096, 1536),
    ModelShape("qwen3-30b-a3b", 48, 0, 128, 8, 2048, 768),
    ModelShape("glm-4.5", 92, 3, 160, 8, 5120, 1536),
    ModelShape("gpt-oss-120b", 36, 0, 128, 4, 2880, 2880),
    ModelShape("deepseek-v2-lite", 27, 1, 64, 6, 2048, 1408),
)}


def model_shape(name: str) -> ModelShape:
    """The layout of a known model (case-insensitive); :class:`traces.TraceError` names the known ones."""
    from traces.format import TraceError

    key = str(name).lower()
    if key not in MODELS:
        raise TraceError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[key]
