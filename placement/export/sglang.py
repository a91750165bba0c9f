"""SGLang: ``--init-expert-location FILE`` with ``{"physical_to_logical_map": [[...]]}``.

SGLang parses it in ``python/sglang/srt/eplb/expert_location.py`` (``compute_initial_expert_location_metadata``):
the dict is splatted into ``ExpertLocationMetadata.init_by_mapping``, so it must hold exactly this one key.
Shape ``[num_hidden_layers, E + ep_num_redundant_experts]``: one row per decoder layer, dense layers included
(they get the identity row ``s % E``, the row SGLang itself builds for them), width divisible by the EP size.
Physical slot ``s`` lives on EP rank ``s // (width / ep_size)``.
"""

from __future__ import annotations

import json
from shlex import quote

import numpy as np

from placement.export import ExportError, require_resident
from placement.plan import Plan

FORMAT = "sglang"
SUFFIX = ".json"


def physical_to_logical_map(plan: Plan) -> np.ndarray:
    """``[num_hidden_layers, S]``: the plan's rows at the MoE layers, the identity row ``s % E`` elsewhere."""
    require_resident(plan, "SGLang")
    S = plan.num_slots
    if S % plan.topology.num_gpus:
        raise ExportError(f"{S} slots do not split evenly over {plan.topology.num_gpus} EP ranks")
    rows = np.tile(np.arange(S) % plan.num_experts, (plan.num_hidden_layers, 1))
    rows[plan.moe_layer_index] = plan.phy2log
    return rows


def export(plan: Plan, path: str = "FILE", model: str = "MODEL", plan_path: str = "PLAN.json") -> tuple[str, list[str]]:
    rows = physical_to_logical_map(plan)
    text = json.dumps({"physical_to_logical_map": rows.tolist()})
    G = plan.topology.num_gpus
    hints = [f"python -m sglang.launch_server --model-path {quote(model)} --tp-size {G} --ep-size {G} "
             f"--init-expert-location {quote(path)} --ep-num-redundant-experts {plan.num_redundant} "
             f"--ep-dispatch-algorithm static",
             f"(EP size must be {G}; --ep-num-redundant-experts must be {plan.num_redundant} so that "
             f"{plan.num_experts} + {plan.num_redundant} = {plan.num_slots} slots match the file's width; "
             f"leave --enable-eplb off to keep this placement fixed)"]
    return text, hints
