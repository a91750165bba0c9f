"""SGLang: ``--init-expert-location FILE`` with ``{"physical_to_logical_map": [[...]]}``.

SGLang parses it in ``python/sglang/srt/eplb/expert_location.py``: the dict is splatted into
``ExpertLocationMetadata.init_by_mapping``, so it must hold exactly this one key. Shape
``[num_hidden_layers, E + ep_num_redundant_experts]``: one row per decoder layer, dense layers included
(they get the identity row ``s % E``), width divisible by the EP size.
"""

from __future__ import annotations

import json

import numpy as np

from placement.export import ExportError
from placement.plan import Plan

FORMAT = "sglang"
SUFFIX = ".json"


def physical_to_logical_map(plan: Plan) -> np.ndarray:
    """``[num_hidden_layers, S]``: the plan's rows at the MoE layers, the identity row elsewhere."""
    if plan.memory is not None or (plan.phy2log < 0).any():
        raise ExportError("this plan has a memory budget (empty slots); SGLang needs every expert resident on a GPU")
    S = plan.num_slots
    rows = np.tile(np.arange(S) % plan.num_experts, (plan.num_hidden_layers, 1))
    rows[plan.moe_layer_index] = plan.phy2log
    return rows


def export(plan: Plan, path: str = "FILE") -> tuple[str, list[str]]:
    rows = physical_to_logical_map(plan)
    text = json.dumps({"physical_to_logical_map": rows.tolist()})
    hints = [f"--init-expert-location {path}", f"--ep-num-redundant-experts {plan.num_redundant}",
             f"(EP size must be {plan.topology.num_gpus}, e.g. --tp-size {plan.topology.num_gpus} --ep-size "
             f"{plan.topology.num_gpus}; add --ep-dispatch-algorithm static to keep the dispatch rule the plan was "
             f"evaluated with)"]
    return text, hints
