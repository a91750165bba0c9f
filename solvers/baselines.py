"""Baseline placements: contiguous (Megatron / vLLM default) and round-robin.

Both put the E logical experts first and the R = S - E redundant slots after them as experts ``i % E``
(vLLM's initial map), then lay the physical experts onto slots.
"""

from __future__ import annotations

import numpy as np

from solvers.base import Options, Problem, Result
from solvers.params import Params


def _physical_experts(problem: Problem) -> np.ndarray:
    """``[S]`` logical expert of each physical expert: 0..E-1 then the redundant ones i % E."""
    S, E = problem.topology.num_slots, problem.num_experts
    return np.arange(S) % E


def contiguous(problem: Problem, options: Options) -> Result:
    """Slot s holds physical expert s: GPU g holds experts g*S/G .. (g+1)*S/G - 1, the same for every layer."""
    Params(options.params, "contiguous", set())  # none of its own
    row = _physical_experts(problem)
    phy2log = np.tile(row, (problem.num_layers, 1))
    return Result(phy2log=phy2log, solver="contiguous", status="fixed")


def round_robin(problem: Problem, options: Options) -> Result:
    """Physical expert p goes to GPU p mod G (vLLM's ``--expert-placement-strategy round_robin``)."""
    Params(options.params, "round-robin", set())  # none of its own
    topo = problem.topology
    phys = _physical_experts(problem)
    p = np.arange(topo.num_slots)
    order = np.lexsort((p, p % topo.num_gpus))  # GPU-major, then physical index
    phy2log = np.tile(phys[order], (problem.num_layers, 1))
    return Result(phy2log=phy2log, solver="round-robin", status="fixed")


SOLVERS = {"contiguous": contiguous, "round-robin": round_robin}
