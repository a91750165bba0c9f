"""GPU memory budgets: parsing ``--memory-budget``, expert sizes, and the budget sweep (the tunable-budget curve).

A budget is GPU memory for routed-expert weights **per GPU**, over all MoE layers, counted in expert slots
(one slot holds one expert of one layer). It covers the resident experts and the swap buffer that fetched
experts go into. Three ways to give it (docs/memory-budget.md):

- ``416``: expert slots per GPU;
- ``25%``: a share of all the model's routed experts (L x E) held on GPUs in total, split evenly over the
  G GPUs (each GPU gets ``floor(0.25 x L x E / G)`` slots);
- ``6GiB`` / ``6.4GB`` / ``512MiB``: bytes per GPU, divided by the size of one expert (``--expert-bytes``, or
  derived from the model's ``config.json`` with ``--model-config``). Binary suffixes (KiB, MiB, GiB, TiB and
  the bare K, M, G, T) are powers of 1024; KB, MB, GB, TB are powers of 1000.

Less than one slot per MoE layer over all GPUs is refused; a budget that holds every expert each GPU serves
is not a budget: the plan is then made without one (and says so).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from placement.cli_common import UserError, default_solver

BUDGET_SOLVERS = ("budget",)

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4,
          "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4}
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
                "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1, "int8": 1}


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from ``6GiB``, ``6.4GB``, ``512MiB``, ``17301504``; a UserError for anything else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise UserError(f"{what} {text!r} is not a size; write e.g. 6GiB, 6.4GB, 512MiB or a number of bytes")
    if re.fullmatch(r"[KMGT]i?b", m.group(2)):  # 10Gb: gigabits, not bytes
        raise UserError(f"{what} {text!r} is in bits ({m.group(2)}); write bytes with a capital B "
                        f"({m.group(1)}{m.group(2)} = {float(m.group(1)) / 8:g}{m.group(2)[:-1]}B)")
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value):
        raise UserError(f"{what} {text!r} is too large to be a size; write e.g. 6GiB, 6.4GB or 1e30")
    if int(value) <= 0:
        raise UserError(f"{what} must be at least one byte, got {text!r}")
    return int(value)


def _read_config(path: str | Path) -> tuple[Path, dict, int, int, int]:
    """``(path, config, hidden, intermediate, matrices)`` of one routed expert from a Hugging Face ``config.json``
    (or the folder holding it); a UserError when the file or the sizes are missing."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UserError(f"{p}: no such model config; give the model's config.json (or its folder)")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{p} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{p} is not a model config (a JSON object was expected)")
    if "hidden_size" not in cfg and "d_model" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    hidden = cfg.get("hidden_size") or cfg.get("d_model")
    if "moe_intermediate_size" in cfg:
        inter, mats = cfg["moe_intermediate_size"], 3
    elif "intermediate_size" in cfg:
        inter, mats = cfg["intermediate_size"], 3
    elif "d_ff" in cfg:
        gated = bool(cfg.get("is_gated_act")) or "gated" in str(cfg.get("feed_forward_proj", ""))
        inter, mats = cfg["d_ff"], 3 if gated else 2
    else:
        inter = None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (hidden, inter)):  # true is an int
        raise UserError(f"{p} does not give the expert sizes (hidden_size and moe_intermediate_size or "
                        f"intermediate_size); give --expert-bytes instead")
    return p, cfg, hidden, inter, mats


def model_sizes_from_config(path: str | Path) -> tuple[int, int]:
    """``(hidden_size, expert_intermediate_size)`` from a Hugging Face ``config.json``, for the cost model."""
    _, _, hidden, inter, _ = _read_config(path)
    return hidden, inter


def expert_bytes_from_config(path: str | Path, num_experts: int | None = None) -> int:
    """Bytes of one routed expert from a Hugging Face ``config.json`` (or the folder holding it).

    Gated MLP experts (DeepSeek, Qwen-MoE, Mixtral, OLMoE, ...: ``moe_intermediate_size`` or
    ``intermediate_size``) have 3 matrices ``hidden x intermediate``; T5-style experts (Switch: ``d_model``,
    ``d_ff``) have 2 unless the activation is gated. Weights in ``torch_dtype`` (bf16 if absent); fp8 or n-bit
    quantized configs are counted at 1 byte or n/8 bytes per weight (scales ignored).
    """
    p, cfg, hidden, inter, mats = _read_config(path)
    q = cfg.get("quantization_config") or {}
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", "")
    if q:
        if str(q.get("quant_method", "")).lower() == "fp8":
            per_weight = 1.0
        elif isinstance(q.get("bits"), int):
            per_weight = q["bits"] / 8
        else:
            raise UserError(f"{p} declares quantized weights ({q.get('quant_method', 'unknown method')}) without a "
                            f"bit width; give --expert-bytes with the size of one quantized expert")
    elif dtype in _DTYPE_BYTES:
        per_weight = float(_DTYPE_BYTES[dtype])
    else:
        raise UserError(f"{p} has torch_dtype {dtype!r}, which moeplace does not know; give --expert-bytes")
    n = cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts")
    if num_experts is not None and isinstance(n, int) and n != num_experts:
        raise UserError(f"{p} describes a model with {n} routed experts per layer but the trace has {num_experts}; "
                        f"give the config of the model the trace was recorded on")
    return int(math.ceil(mats * hidden * inter * per_weight))


@dataclass(frozen=True)
class Budget:
    """A resolved memory budget.

    spec: what the user wrote; slots_per_gpu: expert slots per GPU (all MoE layers, resident + swap buffer);
    num_gpus, num_layers, num_experts: the deployment; expert_bytes: one expert's size, or None if unknown.
    """

    spec: str
    slots_per_gpu: int
    num_gpus: int
    num_layers: int
    num_experts: int
    expert_bytes: int | None = None

    @property
    def total_slots(self) -> int:
        return self.slots_per_gpu * self.num_gpus

    @property
    def share(self) -> float:
        """Share of the model's routed experts the budget could hold (over all GPUs)."""
        return self.total_slots / (self.num_layers * self.num_experts)

    @property
    def model_slots_per_gpu(self) -> int:
        """Slots per GPU that hold every expert the GPU serves (each serves at most ceil(E / G) per layer)."""
        return self.num_layers * -(-self.num_experts // self.num_gpus)

    @property
    def holds_model(self) -> bool:
        return self.slots_per_gpu >= self.model_slots_per_gpu

    @property
    def bytes_per_gpu(self) -> int | None:
        return None if self.expert_bytes is None else self.slots_per_gpu * self.expert_bytes

    def describe(self) -> str:
        size = f" = {self.bytes_per_gpu / 2 ** 30:.2f} GiB" if self.expert_bytes else ""
        return (f"{self.slots_per_gpu} expert slots per GPU{size} on {self.num_gpus} GPU(s), {self.share:.1%} of the "
                f"model's {self.num_layers} x {self.num_experts} routed experts")

    def topology(self, gpus_per_node: int | None = None):
        """Topology whose rows have room for every expert a GPU serves in a layer (most slots stay empty)."""
        from solvers import Topology

        return Topology(num_gpus=self.num_gpus, slots_per_gpu=-(-self.num_experts // self.num_gpus),
                        gpus_per_node=gpus_per_node)

    def memory_record(self, pcie_bandwidth: float | None = None) -> dict:
        """What a plan records about its budget (added to ``plan.memory``)."""
        from placement.memory_eval import PCIE_BANDWIDTH

        return {"spec": self.spec, "budget_slots_per_gpu": self.slots_per_gpu, "budget_share": self.share,
                "expert_bytes": self.expert_bytes, "budget_bytes_per_gpu": self.bytes_per_gpu,
                "pcie_bandwidth": pcie_bandwidth or PCIE_BANDWIDTH}


def resolve_expert_bytes(expert_bytes: str | int | None, model_config: str | Path | None,
                         num_experts: int | None = None) -> int | None:
    """The expert size from ``--expert-bytes`` (a size) or ``--model-config``; None if neither is given."""
    if expert_bytes is not None and model_config is not None:
        raise UserError("give --expert-bytes or --model-config, not both")
    if expert_bytes is not None:
        return parse_size(str(expert_bytes), "--expert-bytes")
    if model_config is not None:
        return expert_bytes_from_config(model_config, num_experts)
    return None


def parse_budget(spec: str | int | float, num_layers: int, num_experts: int, num_gpus: int,
                 expert_bytes: int | None = None, flag: str = "--memory-budget") -> Budget:
    """Resolve a budget (slots per GPU, a percentage, or bytes per GPU) given as ``flag``; raises UserError if
    unusable."""
    text = str(spec).strip()
    if num_gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {num_gpus}")
    L, E, G = int(num_layers), int(num_experts), int(num_gpus)
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise UserError(f"{flag} {text!r} is not a percentage; write e.g. 25%") from None
        if not 0 < pct:
            raise UserError(f"{flag} must be positive, got {text!r}")
        slots = int(math.floor(pct / 100 * L * E / G + 1e-9))
    elif re.fullmatch(r"[0-9]+", text):
        slots = int(text)
    elif re.fullmatch(r"[0-9]*\.[0-9]+", text):
        raise UserError(f"{flag} {text!r}: write a share as a percentage (e.g. 25%), slots as a whole number")
    else:
        nbytes = parse_size(text, flag)
        if expert_bytes is None:
            raise UserError(f"{flag} {text!r} is in bytes, so the size of one expert is needed: give "
                            f"--expert-bytes or --model-config")
        slots = int(nbytes // expert_bytes)
    budget = Budget(text, slots, G, L, E, expert_bytes)
    if slots * G < L:
        raise UserError(f"{flag} {text} gives {slots} expert slot(s) per GPU on {G} GPU(s), fewer than one "
                        f"expert per MoE layer ({L} layers need at least {-(-L // G)} per GPU); raise the budget")
    return budget


def budget_note(budget: Budget) -> str:
    return (f"--memory-budget {budget.spec} ({budget.slots_per_gpu} slots per GPU) holds every expert each GPU "
            f"serves ({budget.model_slots_per_gpu} slots), so the plan is made without a memory budget")


# -- the sweep: the tunable-budget curve ------------------------------------------------------------------------

def top_frequency_resident(counts: np.ndarray, owner: np.ndarray, per_gpu: int, swap: int, cap: int) -> np.ndarray:
    """bool ``[L, E]`` the plain baseline: per layer the most frequent experts, the same number in every layer."""
    from solvers.budget import allocate

    G = int(owner.max()) + 1
    owned = np.bincount(owner.ravel(), minlength=G)
    quota = np.minimum(per_gpu - swap, owned)
    return allocate(counts.astype(np.float64), owner, quota, cap, "per-layer")


POLICIES = ("ours", "ours-dynamic", "top-frequency", "top-frequency-dynamic", "lru-only")


def sweep(fit, held, gpus: int, budgets: list[str], expert_bytes: int, pcie_bandwidth: float | None = None,
          time_limit: float | None = 60.0, seed: int = 0, search_tokens: int = 4096, batch: int = 1,
          prefetch: int = 0, prefetch_overlap_s: float = 0.0, policies: tuple[str, ...] = POLICIES,
          progress=None) -> list[dict]:
    """Plan at each budget on ``fit`` and replay the miss policies on ``held``.

    Policies at the same memory: ``ours`` (the budget solver: resident set + LRU buffer, split chosen on the
    fit), ``ours-dynamic`` (the budget solver for a resident set re-picked every 64 tokens), ``top-frequency`` (per layer the most
    frequent experts, an equal share per layer, a buffer of top_k slots), ``top-frequency-dynamic`` (that set
    re-picked, SwapMoE-style), ``lru-only`` (no resident set: the whole budget is an LRU buffer).
    Returns one row per (budget, policy) with hit rates, fetched bytes and estimated stall per token.
    """
    from placement.affinity import AffinityStats
    from placement.memory_eval import PCIE_BANDWIDTH, policy_metrics
    from placement.problem import build_problem
    from solvers import Options, solve
    from solvers.budget import DYNAMIC_INTERVAL, DYNAMIC_WINDOW, ep_owner
    from solvers.memsim import access_stream

    say = progress or (lambda m: None)
    pcie = pcie_bandwidth or PCIE_BANDWIDTH
    L, E, k = fit.num_layers, fit.num_experts, fit.top_k
    stats = AffinityStats.from_trace(fit)
    held_sorted = held.sorted_by_gate()
    stream = access_stream(held_sorted.expert_ids, E, batch, held_sorted.gate_weights)
    counts = stats.load
    rows = []
    resolved = [parse_budget(b, L, E, gpus, expert_bytes, flag="--budgets") for b in budgets]
    resolved.sort(key=lambda b: b.slots_per_gpu)
    dyn = (DYNAMIC_INTERVAL, DYNAMIC_WINDOW)
    for b in resolved:
        if b.holds_model:
            say(f"{b.spec}: holds the whole model, skipped")
            rows.append({"budget": b.spec, "slots_per_gpu": b.slots_per_gpu, "share": b.share, "policy": "all-resident",
                         "hit_rate": 1.0, "static_hit_rate": 1.0, "fetch_bytes_per_token": 0.0,
                         "est_fetch_ms_per_token": 0.0, "note": "holds every expert"})
            continue
        topo = b.topology()
        cap = topo.slots_per_gpu
        owner = ep_owner(counts, gpus, cap)
        common = dict(num_experts=E, num_gpus=gpus, expert_bytes=float(expert_bytes), pcie_bandwidth=pcie,
                      batch=batch, prefetch=prefetch, transitions=stats.transitions,
                      prefetch_overlap_s=prefetch_overlap_s, stream=stream)
        configs = {}
        for name, kind in (("ours", "static"), ("ours-dynamic", "dynamic")):
            if name not in policies:
                continue
            say(f"{b.spec}: planning ({kind} policy) ...")
            problem = build_problem(fit, topo, budget_slots=b.total_slots, stats=stats)
            res = solve("budget", problem, Options(time_limit=time_limit, seed=seed, threads=1,
                                                   params={"search_tokens": search_tokens, "batch": batch,
                                                           "policy": kind}))
            mem = res.stats["memory"]
            resident = np.zeros((L, E), dtype=bool)
            for l, ex in enumerate(mem["resident"]):
                resident[l, ex] = True
            configs[name] = (resident, np.asarray(mem["owner"]), mem["swap_slots_per_gpu"],
                             dyn if kind == "dynamic" else None)
        swap = min(k, b.slots_per_gpu)
        tf = top_frequency_resident(counts, owner, b.slots_per_gpu, swap, cap)
        configs["top-frequency"] = (tf, owner, swap, None)
        configs["top-frequency-dynamic"] = (tf, owner, swap, dyn)
        configs["lru-only"] = (np.zeros((L, E), dtype=bool), owner, b.slots_per_gpu, None)
        for name in policies:
            resident, own, swap_slots, dynamic = configs[name]
            if dynamic is not None and not resident.any():
                dynamic = None
            say(f"{b.spec}: replaying {name} on the held-out tokens ...")
            s = policy_metrics(routes=None, resident=resident, owner=own, swap_slots=int(swap_slots),
                               dynamic=dynamic, prior=counts, **common)
            rows.append({"budget": b.spec, "slots_per_gpu": b.slots_per_gpu, "share": b.share, "policy": name,
                         "resident_experts": int(resident.sum()), "swap_slots_per_gpu": int(swap_slots),
                         "hit_rate": s["hit_rate"], "static_hit_rate": s["static_hit_rate"],
                         "gate_hit_rate": s["gate_hit_rate"], "fetch_bytes_per_token": s["fetch_bytes_per_token"],
                         "swap_bytes_per_token": s["swap_bytes_per_token"],
                         "est_fetch_ms_per_token": s["est_fetch_ms_per_token"]})
    return rows


def monotone(rows: list[dict], policy: str = "ours", tol: float = 1e-9) -> bool:
    """True when ``policy``'s hit rate never falls as the budget grows (rows ordered by budget)."""
    hits = [r["hit_rate"] for r in rows if r["policy"] in (policy, "all-resident")]
    return all(b >= a - tol for a, b in zip(hits, hits[1:]))


# -- the plan command's hooks -----------------------------------------------------------------------------------

def resolve_plan_budget(spec: str, fit, gpus: int, redundant: int, solver: str, expert_bytes: str | None = None,
                        model_config: str | Path | None = None) -> tuple[Budget | None, str | None, str]:
    """For ``moeplace plan --memory-budget``: ``(budget or None, note or None, solver to use)``.

    A budget that holds every expert gives no budget and a note (the plan is made as usual, with the default
    solver if the budget solver was asked for); a solver that places every expert is refused under a budget.
    """
    if redundant:
        raise UserError("--redundant does not apply with --memory-budget: a budget plan holds each expert at most once "
                        "and keeps the rest in host memory; drop --redundant")
    eb = resolve_expert_bytes(expert_bytes, model_config, fit.num_experts)
    budget = parse_budget(spec, fit.num_layers, fit.num_experts, gpus, eb)
    if budget.holds_model:
        return None, budget_note(budget), (default_solver() if solver in BUDGET_SOLVERS else solver)
    if solver not in BUDGET_SOLVERS:
        raise UserError(f"solver {solver!r} places every expert on a GPU; with --memory-budget use "
                        f"--solver {BUDGET_SOLVERS[0]} (the default when a budget is given)")
    return budget, None, solver


def describe_plan_memory(plan) -> str:
    """One line on a memory-budget plan: budget, resident experts, buffer, expert size."""
    m = plan.memory or {}
    eb = m.get("expert_bytes")
    size = f", {eb / 1e6:.1f} MB per expert" if eb else ""
    per_layer = m.get("resident_per_layer") or []
    spread = f" ({min(per_layer)}-{max(per_layer)} per layer)" if per_layer else ""
    return (f"memory budget {m.get('spec', '?')}: {m.get('budget_slots_per_gpu')} expert slots per GPU = "
            f"{m.get('resident_experts')} resident experts in total{spread} + a swap buffer of "
            f"{m.get('swap_slots_per_gpu')} slot(s) per GPU (LRU, fetch-on-miss); the other experts stay in host "
            f"memory{size}")
