"""vllm-ascend: the static EPLB expert map (``eplb_config.expert_map_path``).

Read by ``vllm_ascend/eplb/core/eplb_utils.py`` (``expert_file_to_tensor``, ``init_eplb_config``, checked against
vllm-ascend 0.23.0.post1): ``{"moe_layer_count": L, "layer_list": [{"layer_id": l, "device_count": G,
"device_list": [{"device_id": g, "device_expert": [logical ids of g's slots]}]}]}``. ``layer_list`` is indexed by
MoE-layer position (``layer_id`` counts MoE layers from 0), devices in EP-rank order. vllm-ascend stacks the
``device_expert`` lists into one tensor (every device the same length) and derives the redundant count as
slots - experts. It builds each rank's ``expert_map`` with ``expert_map[device_expert] = arange(len)``, so two
replicas of one expert on one device would overwrite each other: such plans are refused. The path must end
in ``.json``.
"""

from __future__ import annotations

import json
from shlex import quote

from placement.export import ExportError, require_distinct_per_gpu, require_resident
from placement.plan import Plan

FORMAT = "vllm-ascend"
SUFFIX = ".json"


def expert_map_json(plan: Plan) -> dict:
    require_resident(plan, "vllm-ascend")
    require_distinct_per_gpu(plan, "vllm-ascend", "keeps one local slot per expert and device")
    G, spg = plan.topology.num_gpus, plan.topology.slots_per_gpu
    layers = []
    for l in range(plan.num_layers):
        row = plan.phy2log[l].reshape(G, spg)
        layers.append({"layer_id": l, "device_count": G,
                       "device_list": [{"device_id": g, "device_expert": [int(x) for x in row[g]]}
                                       for g in range(G)]})
    return {"moe_layer_count": plan.num_layers, "layer_list": layers}


def export(plan: Plan, path: str = "FILE", model: str = "MODEL", plan_path: str = "PLAN.json") -> tuple[str, list[str]]:
    if path != "FILE" and not str(path).endswith(".json"):
        raise ExportError(f"vllm-ascend only reads expert maps whose path ends in .json, got {path}")
    text = json.dumps(expert_map_json(plan), indent=1)
    G = plan.topology.num_gpus
    cfg = json.dumps({"eplb_config": {"expert_map_path": str(path)}})
    hints = [f"vllm serve {quote(model)} --tensor-parallel-size {G} --enable-expert-parallel --additional-config "
             f"{quote(cfg)}",
             f"(EP size must be {G}; vllm-ascend derives {plan.num_redundant} redundant slots from the file and needs "
             f"the path to end in .json)"]
    return text, hints
