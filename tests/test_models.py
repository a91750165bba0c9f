"""Presets of today's models: the layouts from their config.json reach the synthetic generator and the cost model.

Properties: the cost presets and the layouts agree on the sizes; a generated trace of each model has its MoE layers
(decoder indices), experts and top-k, distinct experts per token, and DeepSeek-V3's node-limited routing (at most 4 of
8 groups per token).
"""

from __future__ import annotations

import numpy as np
import pytest

from solvers.cost import PRESETS, CostModel
from traces.models import MODELS, model_shape
from traces.synthetic import model_trace


def test_cost_presets_agree_with_the_layouts():
    for name, m in MODELS.items():
        assert PRESETS[name] == {"hidden_size": m.hidden_size, "expert_intermediate_size": m.expert_intermediate_size}
        assert CostModel.preset(name).token_bytes == 2 * m.hidden_size


@pytest.mark.parametrize("name", ["deepseek-v3", "kimi-k2", "qwen3-235b-a22b", "glm-4.5", "gpt-oss-120b"])
def test_a_synthetic_trace_has_the_models_layout(name):
    m = model_shape(name)
    tr = model_trace(name, 150, seed=1)
    L = m.num_hidden_layers - m.first_dense
    assert tr.expert_ids.shape == (150, L, m.top_k)
    assert list(tr.moe_layer_index) == list(range(m.first_dense, m.num_hidden_layers))
    assert tr.num_hidden_layers == m.num_hidden_layers and tr.num_experts == m.num_experts
    ids = np.sort(tr.expert_ids, axis=2)
    assert (ids[:, :, 1:] != ids[:, :, :-1]).all() and ids.min() >= 0 and ids.max() < m.num_experts
    if m.topk_groups:
        groups = tr.expert_ids // (m.num_experts // m.groups)
        per_token = np.array([[len(set(groups[t, l])) for l in range(L)] for t in range(150)])
        assert per_token.max() <= m.topk_groups


def test_an_unknown_model_is_named():
    from traces import TraceError

    with pytest.raises(TraceError, match="kimi-k2"):
        model_shape("kimi-k3")
