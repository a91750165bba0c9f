"""vLLM: the per-MoE-layer slot map, plus per-rank expert maps.

Upstream vLLM (checked up to 0.33.0) has no option that loads a placement file: with ``--enable-eplb`` it starts
from the identity map plus ``i % E`` redundant slots, the same for every layer. Two ways in:

* the moeplace vLLM plugin (``placement.vllm_plugin``, set ``MOEPLACE_PLAN=plan.json``) installs the plan through
  vLLM's own EPLB state and weight-transfer functions at startup;
* vLLM builds carrying PR #49572 read ``eplb_config.initial_expert_map_path``: a JSON list with one row of
  ``E + R`` logical expert ids per MoE layer (or one shared row). That list is the main file written here.

The companion ``<name>.expert_maps.json`` holds, per EP rank, the ``expert_map`` vLLM's
``determine_expert_map`` produces (global index -> local index, -1 where absent; vLLM forces the ``linear``
strategy whenever EPLB or redundant experts are on, so under EPLB the global index is the *physical* slot id and the
map is the same for every layer), and the per-layer *logical* expert -> local slot map (first local replica),
which is what a permutation plan's ``expert_map`` would be without EPLB.
"""

from __future__ import annotations

import json
from pathlib import Path
from shlex import quote

import numpy as np

from placement.export import require_resident
from placement.plan import Plan

FORMAT = "vllm"
SUFFIX = ".json"
STRATEGIES = ("linear", "round_robin")


def determine_expert_map(ep_size: int, ep_rank: int, global_num_experts: int,
                         strategy: str = "linear") -> tuple[int, np.ndarray | None]:
    """vLLM's ``determine_expert_map`` semantics: ``(local_num_experts, expert_map[global_num_experts])``.

    Experts are split as evenly as possible; the first ``global % ep_size`` ranks get one more. ``linear`` gives
    rank r a contiguous block, ``round_robin`` the ids ``r, r + ep_size, ...``. ``expert_map[g]`` is the local index
    of global expert g on this rank, -1 if absent; None when ``ep_size == 1`` (vLLM's convention).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown placement strategy {strategy!r}; vLLM knows {', '.join(STRATEGIES)}")
    if ep_size == 1:
        return global_num_experts, None
    base, rem = divmod(global_num_experts, ep_size)
    local = base + 1 if ep_rank < rem else base
    out = np.full(global_num_experts, -1, dtype=np.int32)
    if strategy == "linear":
        start = ep_rank * base + min(ep_rank, rem)
        out[start:start + local] = np.arange(local, dtype=np.int32)
    else:
        out[np.arange(ep_rank, global_num_experts, ep_size)] = np.arange(local, dtype=np.int32)
    return local, out


def initial_expert_map(plan: Plan) -> list[list[int]]:
    """``[L, S]`` rows for ``eplb_config.initial_expert_map_path`` (one per MoE layer)."""
    require_resident(plan, "vLLM")
    return plan.phy2log.astype(int).tolist()


def logical_expert_maps(plan: Plan) -> np.ndarray:
    """int ``[L, G, E]``: local slot on rank g of logical expert e at MoE layer l (first local replica), -1 if none."""
    L, E = plan.num_layers, plan.num_experts
    G, spg = plan.topology.num_gpus, plan.topology.slots_per_gpu
    out = np.full((L, G, E), -1, dtype=np.int64)
    local = np.tile(np.arange(spg), G)
    gpu = plan.topology.gpu_of_slot()
    for s in range(plan.num_slots - 1, -1, -1):  # descending, so the first local replica wins
        out[np.arange(L), gpu[s], plan.phy2log[:, s]] = local[s]
    return out


def expert_maps(plan: Plan) -> dict:
    """Per-rank maps (see module docstring) as a JSON-ready dict."""
    require_resident(plan, "vLLM")
    G, S = plan.topology.num_gpus, plan.num_slots
    physical = []
    for r in range(G):
        _, m = determine_expert_map(G, r, S, "linear")
        physical.append((m if m is not None else np.arange(S)).astype(int).tolist())
    return {"format": "moeplace.vllm-expert-maps", "ep_size": G, "num_logical_experts": plan.num_experts,
            "num_physical_experts": S, "num_redundant_experts": plan.num_redundant,
            "local_num_experts": plan.topology.slots_per_gpu, "placement_strategy": "linear",
            "moe_layer_index": plan.moe_layer_index.astype(int).tolist(),
            "expert_map": physical, "logical_expert_map": logical_expert_maps(plan).tolist()}


def companion_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(p.stem + ".expert_maps.json")


def companions(plan: Plan, path: str = "FILE") -> list[tuple[str, str]]:
    return [(str(companion_path(path)), json.dumps(expert_maps(plan)))]


def export(plan: Plan, path: str = "FILE", model: str = "MODEL", plan_path: str = "PLAN.json") -> tuple[str, list[str]]:
    rows = initial_expert_map(plan)
    text = "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n"
    G, R = plan.topology.num_gpus, plan.num_redundant
    eplb = json.dumps({"num_redundant_experts": R})
    pr = json.dumps({"num_redundant_experts": R, "initial_expert_map_path": str(path)})
    hints = [f"MOEPLACE_PLAN={quote(str(plan_path))} vllm serve {quote(model)} --tensor-parallel-size {G} "
             f"--enable-expert-parallel --enable-eplb --eplb-config {quote(eplb)}",
             f"(the moeplace plugin installs the plan file at startup; EP size must be {G})",
             f"vllm serve {quote(model)} --tensor-parallel-size {G} --enable-expert-parallel --enable-eplb "
             f"--eplb-config {quote(pr)}",
             f"(vLLM builds with PR #49572; per-rank expert maps: {companion_path(path)})"]
    return text, hints
