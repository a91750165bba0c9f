"""TensorRT-LLM: the static MoE load-balancer YAML (``MoeLoadBalancerConfig``).

Fields, as ``tensorrt_llm/llmapi/llm_args.py`` defines them (a strict pydantic model, so no other key is allowed):
``num_slots`` (total expert slots, divisible by the EP size), ``initial_global_assignments`` (decoder-layer index
of every MoE layer -> list of ``num_slots`` logical expert ids; a missing layer is a KeyError, a wrong length a
ValueError) and ``layer_updates_per_iter`` (0 = static: the placement never changes). The C++ balancer reads slot
``rank * (num_slots / ep_size) + local_slot``, i.e. slots contiguous per rank, as in the plan. The file goes under
``moe_config.load_balancer`` in the YAML given to ``--extra_llm_api_options`` (older releases: top-level
``moe_load_balancer``), the same file TensorRT-LLM's ``examples/ep_load_balancer/generate_eplb_config.py`` writes.
"""

from __future__ import annotations

from pathlib import Path
from shlex import quote

import yaml

from placement.export import ExportError, require_resident
from placement.plan import Plan

FORMAT = "trtllm"
SUFFIX = ".yaml"


class _FlowList(list):
    pass


def _dumper() -> type:
    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_FlowList, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data,
                                                                            flow_style=True))
    return Dumper


def load_balancer_config(plan: Plan) -> dict:
    """The ``MoeLoadBalancerConfig`` fields as a plain dict (keys: decoder-layer indices as ints)."""
    require_resident(plan, "TensorRT-LLM")
    if plan.num_slots % plan.topology.num_gpus:
        raise ExportError(f"num_slots {plan.num_slots} is not divisible by the EP size {plan.topology.num_gpus}")
    return {
        "num_slots": int(plan.num_slots),
        "layer_updates_per_iter": 0,
        "initial_global_assignments": {int(d): [int(x) for x in row]
                                       for d, row in zip(plan.moe_layer_index, plan.phy2log)},
    }


def extra_options_path(path: str | Path) -> Path:
    """The ``--extra_llm_api_options`` YAML written next to the load-balancer file."""
    p = Path(path)
    return p.with_name(p.stem + ".extra.yaml")


def companions(plan: Plan, path: str = "FILE") -> list[tuple[str, str]]:
    """The ``--extra_llm_api_options`` file that points TensorRT-LLM at the load-balancer file."""
    options = {"moe_config": {"backend": "WIDEEP", "load_balancer": str(path)}}
    return [(str(extra_options_path(path)), yaml.safe_dump(options, sort_keys=False))]


def export(plan: Plan, path: str = "FILE", model: str = "MODEL", plan_path: str = "PLAN.json") -> tuple[str, list[str]]:
    cfg = load_balancer_config(plan)
    cfg["initial_global_assignments"] = {k: _FlowList(v) for k, v in cfg["initial_global_assignments"].items()}
    text = yaml.dump(cfg, Dumper=_dumper(), sort_keys=False, width=1 << 30)
    G = plan.topology.num_gpus
    hints = [f"trtllm-serve {quote(model)} --backend pytorch --tp_size {G} --ep_size {G} "
             f"--extra_llm_api_options {quote(str(extra_options_path(path)))}",
             f"({extra_options_path(path).name} sets moe_config: {{backend: WIDEEP, load_balancer: {path}}}; older "
             f"TensorRT-LLM releases read a top-level 'moe_load_balancer: {path}'; EP size must be {G}; "
             f"{plan.num_slots} slots = {plan.num_experts} experts + {plan.num_redundant} redundant)"]
    return text, hints
