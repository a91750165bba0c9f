"""Exporters: a plan in the formats serving stacks load at startup. One module per stack, each with
``FORMAT`` (the --format name), ``SUFFIX`` and ``export(plan, path, model="MODEL", plan_path="PLAN.json") ->
(text, hints)``: the file content and the commands that start the server with it (paths shell-quoted; ``model``
and ``plan_path``, the plan file itself, fill the commands where the caller knows them). A module may also define
``companions(plan, path) -> [(path, text), ...]`` for files that go next to the main one (vLLM's per-rank maps).
:func:`render` calls both.

Every stack assumes physical slots contiguous per GPU (slot ``s`` on EP rank ``s // slots_per_gpu``), which is
also the plan's convention, so the slot order of ``phy2log`` is written as is. A plan a stack cannot represent is
refused with :class:`ExportError` naming the reason.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

import numpy as np


class ExportError(ValueError):
    """The plan cannot be represented in the requested format (one sentence with the reason)."""


@lru_cache(maxsize=1)
def exporters() -> dict:
    import placement.export as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"placement.export.{info.name}")
        if hasattr(mod, "FORMAT") and hasattr(mod, "export"):
            found[mod.FORMAT] = mod
    return found


def render(module, plan, path, *, plan_path=None, model: str | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """One export: ``([(path, text)] with the main file first, then its companions; hints)``."""
    names = {k: str(v) for k, v in (("plan_path", plan_path), ("model", model)) if v is not None}
    text, hints = module.export(plan, str(path), **names)
    extra = module.companions(plan, str(path)) if hasattr(module, "companions") else []
    return [(str(path), text), *extra], hints


def require_resident(plan, stack: str) -> None:
    """Refuse memory-budget plans (empty slots, experts without a GPU): no serving stack loads those."""
    if plan.memory is not None or (plan.phy2log < 0).any():
        raise ExportError(f"this plan has a memory budget (empty slots or experts kept off the GPUs); {stack} needs "
                          f"every expert resident on some GPU, so plan again without --memory-budget")
    missing = np.argwhere(plan.replica_counts() == 0)
    if missing.size:
        l, e = missing[0]
        raise ExportError(f"expert {e} of MoE layer {l} has no slot; {stack} needs every expert on some GPU")


def require_distinct_per_gpu(plan, stack: str, why: str) -> None:
    """Refuse plans that put two replicas of one expert on the same GPU."""
    G, spg = plan.topology.num_gpus, plan.topology.slots_per_gpu
    rows = np.sort(plan.phy2log.reshape(plan.num_layers, G, spg), axis=2)
    dup = np.argwhere((rows[:, :, 1:] == rows[:, :, :-1]).any(axis=2))
    if dup.size:
        l, g = dup[0]
        raise ExportError(f"MoE layer {l} puts two replicas of one expert on GPU {g}; {stack} {why}; plan with a "
                          f"solver that spreads replicas over GPUs (e.g. the joint solver) or fewer redundant slots")


def moe_layer_rows(plan) -> list[list[int]]:
    """``[L, S]`` slot map as plain lists (one row per MoE layer)."""
    return plan.phy2log.astype(int).tolist()
