"""Memory-budget metrics of a plan on a trace (out of sample when the trace is held out).

A memory-budget plan (``plan.memory`` set, see docs/memory-budget.md) keeps some experts resident on their
GPU and the rest in host memory. On a token trace this module replays the plan's miss policy
(:mod:`solvers.memsim`: fetch-on-miss into an LRU swap buffer per GPU, tokens in trace order) and reports:

- ``resident_hit_rate``: share of token-expert activations whose expert was in GPU memory when needed
  (resident, or still in the swap buffer); ``resident_static_hit_rate``: served by the resident set alone;
  ``resident_gate_hit_rate``: the same weighted by router gate weight (with gate weights).
- ``fetch_bytes_per_token``, ``fetches_per_token``: host -> GPU copies (expert size ``expert_bytes``).
- ``est_fetch_ms_per_token``: transfer stall at ``pcie_bandwidth`` bytes/s (default 50e9: PCIe Gen5 x16,
  about 64 GB/s raw per direction, about 50 GB/s measured for pinned host memory).
- ``dynamic_*``: the same with SwapMoE-style virtual experts (arXiv 2308.15030): every ``interval`` tokens
  each GPU re-picks its resident experts (same count) from the last ``window`` tokens; ``dynamic_swap_bytes_
  per_token`` is the re-pick traffic, included in ``dynamic_fetch_bytes_per_token``.

Counts-only input gives ``resident_static_hit_rate`` only.
"""

from __future__ import annotations

import numpy as np

from placement.plan import Plan
from solvers.budget import DYNAMIC_INTERVAL, DYNAMIC_WINDOW
from solvers.cost import CostModel
from solvers.memsim import access_stream, prefetch_table, simulate, summarize

PCIE_BANDWIDTH = 50e9  # bytes/s host -> GPU, PCIe Gen5 x16 effective

KEYS = ("resident_hit_rate", "resident_static_hit_rate", "resident_gate_hit_rate", "fetch_bytes_per_token",
        "fetches_per_token", "est_fetch_ms_per_token", "dynamic_resident_hit_rate", "dynamic_fetch_bytes_per_token",
        "dynamic_swap_bytes_per_token", "dynamic_est_fetch_ms_per_token")


def default_expert_bytes(cost: CostModel | None = None) -> int:
    """Bytes of one routed expert from the cost model's sizes: gate, up and down projections in bf16."""
    cost = cost or CostModel()
    return 3 * cost.hidden_size * cost.expert_intermediate_size * 2


def plan_memory_arrays(plan: Plan) -> tuple[np.ndarray, np.ndarray, int]:
    """``(resident [L, E] bool, owner [L, E] int, swap slots per GPU)`` of a memory-budget plan.

    Residents are the plan's non-empty slots (on their slot's GPU); host experts are served by the GPU in
    ``memory["owner"]`` when recorded, else by ``e mod G``.
    """
    L, E, G = plan.num_layers, plan.num_experts, plan.topology.num_gpus
    mem = plan.memory or {}
    resident = np.zeros((L, E), dtype=bool)
    owner = np.tile(np.arange(E) % G, (L, 1))
    rec = mem.get("owner")
    if rec is not None and np.asarray(rec).shape == (L, E):
        owner = np.asarray(rec, dtype=np.int64)
    gpu = plan.topology.gpu_of_slot()
    for l in range(L):
        row = plan.phy2log[l]
        ok = row >= 0
        resident[l, row[ok]] = True
        owner[l, row[ok]] = gpu[ok]
    swap = int(mem.get("swap_slots_per_gpu", 0) or 0)
    return resident, owner, swap


def serving_plan(plan: Plan) -> Plan:
    """The plan as expert parallelism sees it: every expert in a slot of the GPU that serves it (resident or
    fetched on a miss), so load, locality, fan-out and all-to-all metrics count host experts where they run.
    The plan itself is returned if its rows have no room for that."""
    from dataclasses import replace

    resident, owner, _ = plan_memory_arrays(plan)
    G, spg = plan.topology.num_gpus, plan.topology.slots_per_gpu
    L, E = owner.shape
    if np.bincount((np.arange(L)[:, None] * G + owner).ravel(), minlength=L * G).max() > spg:
        return plan
    phy = np.full((L, G * spg), -1, dtype=np.int64)
    for l in range(L):
        for g in range(G):
            ex = np.flatnonzero(owner[l] == g)
            phy[l, g * spg:g * spg + ex.size] = ex
    return replace(plan, phy2log=phy)


def _routes(data) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(expert_ids [T, L, k], gate_weights or None)`` in trace order, experts highest gate first."""
    from traces import RoutingTrace

    if isinstance(data, RoutingTrace):
        tr = data.sorted_by_gate()
        return tr.expert_ids, tr.gate_weights
    return getattr(data, "expert_ids", None), None


def policy_metrics(routes: np.ndarray, num_experts: int, resident: np.ndarray, owner: np.ndarray, num_gpus: int,
                   swap_slots: int, expert_bytes: float, pcie_bandwidth: float = PCIE_BANDWIDTH,
                   gates: np.ndarray | None = None, batch: int = 1, dynamic: tuple[int, int] | None = None,
                   prior: np.ndarray | None = None, prefetch: int = 0, transitions: np.ndarray | None = None,
                   prefetch_overlap_s: float = 0.0, stream=None) -> dict:
    """One miss policy on ``routes[T, L, k]``: :func:`solvers.memsim.summarize` numbers.

    ``dynamic`` is ``(interval, window)`` in tokens; ``prefetch`` experts per layer predicted from the previous
    layer with ``transitions[L-1, E, E]`` (fitted pair counts). ``stream`` reuses a prepared access stream.
    """
    stream = stream or access_stream(routes, num_experts, batch, gates)
    dyn = None
    if dynamic is not None:
        dyn = (max(1, int(dynamic[0]) // batch), max(1, int(dynamic[1]) // batch))
    pf = None
    if prefetch:
        if transitions is None:
            raise ValueError("prefetch needs the fitted transitions [L-1, E, E]")
        pf = prefetch_table(stream, transitions, prefetch)
    sim = simulate(stream, resident, owner, num_gpus, swap_slots, dynamic=dyn, dynamic_prior=prior, prefetch=pf)
    return summarize(stream, sim, num_gpus, expert_bytes, pcie_bandwidth, prefetch_overlap_s)


def memory_overall(plan: Plan, data, cost: CostModel | None = None, dynamic: bool = True) -> dict:
    """The memory keys for ``evaluate()['overall']`` (see the module docstring); None where not computable."""
    mem = plan.memory or {}
    out: dict = {k: None for k in KEYS}
    resident, owner, swap = plan_memory_arrays(plan)
    G = plan.topology.num_gpus
    expert_bytes = float(mem.get("expert_bytes") or default_expert_bytes(cost))
    pcie = float(mem.get("pcie_bandwidth") or PCIE_BANDWIDTH)
    out.update(memory_budget_slots_per_gpu=mem.get("budget_slots_per_gpu"),
               memory_resident_experts=int(resident.sum()), memory_swap_slots_per_gpu=swap,
               memory_expert_bytes=expert_bytes)
    routes, gates = _routes(data)
    if routes is None:
        load = getattr(data, "load", None)
        if load is None and hasattr(data, "total"):
            load = data.total()
        if load is not None and load.sum() > 0:
            out["resident_static_hit_rate"] = float(load[resident].sum() / load.sum())
        return out
    policy = mem.get("policy") or {}
    batch = int(policy.get("batch", 1) or 1)
    stream = access_stream(routes, plan.num_experts, batch, gates)
    s = policy_metrics(routes, plan.num_experts, resident, owner, G, swap, expert_bytes, pcie, batch=batch,
                       stream=stream)
    out.update(resident_hit_rate=s["hit_rate"], resident_static_hit_rate=s["static_hit_rate"],
               resident_gate_hit_rate=s["gate_hit_rate"], fetch_bytes_per_token=s["fetch_bytes_per_token"],
               fetches_per_token=s["fetches_per_token"], est_fetch_ms_per_token=s["est_fetch_ms_per_token"])
    if dynamic and resident.any():
        dyn = policy.get("dynamic") or {}
        interval = int(dyn.get("interval_tokens", DYNAMIC_INTERVAL))
        window = int(dyn.get("window_tokens", DYNAMIC_WINDOW))
        d = policy_metrics(routes, plan.num_experts, resident, owner, G, swap, expert_bytes, pcie, batch=batch,
                           dynamic=(interval, window), prior=resident.astype(float), stream=stream)
        out.update(dynamic_resident_hit_rate=d["hit_rate"], dynamic_fetch_bytes_per_token=d["fetch_bytes_per_token"],
                   dynamic_swap_bytes_per_token=d["swap_bytes_per_token"],
                   dynamic_est_fetch_ms_per_token=d["est_fetch_ms_per_token"])
    elif dynamic:  # nothing resident: the dynamic variant is the static one (all of the budget is the buffer)
        out.update(dynamic_resident_hit_rate=s["hit_rate"], dynamic_fetch_bytes_per_token=s["fetch_bytes_per_token"],
                   dynamic_swap_bytes_per_token=0.0, dynamic_est_fetch_ms_per_token=s["est_fetch_ms_per_token"])
    return out
