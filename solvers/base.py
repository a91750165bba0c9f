"""The one calling convention every solver follows.

A solver is a function ``solve(problem: Problem, options: Options) -> Result`` registered in its module's
``SOLVERS = {"name": solve}`` dict; :mod:`solvers.registry` discovers every module of this package, so adding a
solver is adding one file. Problems are plain arrays plus a :class:`Topology`; results are a slot map
``phy2log[L, S]`` plus statistics. Nothing here knows about files, traces or plans.

Conventions: L MoE layers, E logical experts, G GPUs, S = G x slots_per_gpu physical slots, slot ``s`` on GPU
``s // slots_per_gpu``, GPU ``g`` on node ``g // gpus_per_node``. Objectives are minimised; ``bound`` is a
valid lower bound on the optimum of the solver's own objective, so ``bound <= objective`` always.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["SolverInputError", "Topology", "Problem", "Options", "Result", "gap_of", "is_number"]


class SolverInputError(ValueError):
    """The request cannot be planned as stated (one sentence: what is wrong and how to fix it)."""


@dataclass(frozen=True)
class Topology:
    """GPUs, nodes, slots and links.

    Bandwidths are bytes per second per GPU in one direction. Defaults: H100 NVLink 4 (450 GB/s each way)
    inside a node, one 400 Gb/s InfiniBand NIC per GPU (50 GB/s) between nodes.
    """

    num_gpus: int
    slots_per_gpu: int
    gpus_per_node: int | None = None
    intra_node_bandwidth: float = 450e9
    inter_node_bandwidth: float = 50e9

    def __post_init__(self) -> None:
        if self.num_gpus < 1:
            raise SolverInputError(f"--gpus must be >= 1, got {self.num_gpus}")
        if self.slots_per_gpu < 1:
            raise SolverInputError(f"each GPU needs at least one expert slot, got {self.slots_per_gpu}")
        gpn = self.num_gpus if self.gpus_per_node is None else int(self.gpus_per_node)
        if gpn < 1 or self.num_gpus % gpn:
            raise SolverInputError(f"--gpus-per-node ({gpn}) must divide --gpus ({self.num_gpus})")
        object.__setattr__(self, "gpus_per_node", gpn)
        if self.intra_node_bandwidth <= 0 or self.inter_node_bandwidth <= 0:
            raise SolverInputError("link bandwidths must be positive")

    def with_bandwidths(self, intra: float | None = None, inter: float | None = None) -> "Topology":
        """The same topology with other link bandwidths (bytes/s per GPU and direction; None keeps one)."""
        from dataclasses import replace

        return replace(self, intra_node_bandwidth=self.intra_node_bandwidth if intra is None else float(intra),
                       inter_node_bandwidth=self.inter_node_bandwidth if inter is None else float(inter))

    @property
    def num_nodes(self) -> int:
        return self.num_gpus // self.gpus_per_node

    @property
    def num_slots(self) -> int:
        return self.num_gpus * self.slots_per_gpu

    def gpu_of_slot(self) -> np.ndarray:
        """``[S]`` GPU of each physical slot."""
        return np.arange(self.num_slots) // self.slots_per_gpu

    def node_of_gpu(self) -> np.ndarray:
        """``[G]`` node of each GPU."""
        return np.arange(self.num_gpus) // self.gpus_per_node

    @staticmethod
    def for_experts(num_experts: int, num_gpus: int, redundant: int = 0, gpus_per_node: int | None = None,
                    **links: float) -> "Topology":
        """Topology with ``(num_experts + redundant) / num_gpus`` slots per GPU; a clear error if it does not divide."""
        if redundant < 0:
            raise SolverInputError(f"--redundant must be >= 0, got {redundant}")
        slots = num_experts + redundant
        if num_gpus < 1:
            raise SolverInputError(f"--gpus must be >= 1, got {num_gpus}")
        if slots % num_gpus:
            raise SolverInputError(
                f"{num_experts} experts + {redundant} redundant slots = {slots} slots cannot be split evenly over "
                f"{num_gpus} GPUs; choose --redundant so that experts + redundant is a multiple of --gpus")
        return Topology(num_gpus=num_gpus, slots_per_gpu=slots // num_gpus, gpus_per_node=gpus_per_node, **links)


@dataclass(frozen=True, eq=False)
class Problem:
    """What to place.

    Attributes:
        load: float ``[L, E]`` expected token-expert assignments per layer (mean over profiles if several given,
            the whole trace's when the profiles are resamples of its sequences).
        topology: the GPUs and slots.
        transitions: float ``[L-1, E, E]`` or None: tokens' expert pairs (k x k product) across adjacent layers.
        transitions_top1: float ``[L-1, E, E]`` or None: the same for each token's highest-gate expert only.
        coactivation: float ``[L, E, E]`` or None: pairs of experts chosen together by one token (symmetric,
            zero diagonal).
        profiles: float ``[N, L, E]`` or None: several workload profiles kept apart.
        routes: int ``[T, L, k]`` or None: per-token expert ids (-1 = none), highest gate first when gates were
            recorded; for token-level formulations (ExFlow's ILP).
        home: int ``[T]`` or None: home GPU index source per token (sequence index), for byte metrics.
        expert_groups: experts are split into this many equal contiguous groups (DeepSeek-V3: 8).
        current: int ``[L, S]`` or None: the placement in service now (migration cost is counted against it).
        top_k: experts per token.
        num_tokens: tokens behind ``load`` (for per-token normalisation).
        budget_slots: int or None: memory-budget mode (see the budget solvers); None = every expert resident.
    """

    load: np.ndarray
    topology: Topology
    transitions: np.ndarray | None = None
    transitions_top1: np.ndarray | None = None
    coactivation: np.ndarray | None = None
    profiles: np.ndarray | None = None
    routes: np.ndarray | None = None
    home: np.ndarray | None = None
    expert_groups: int = 1
    current: np.ndarray | None = None
    top_k: int = 1
    num_tokens: int | None = None
    budget_slots: int | None = None

    def __post_init__(self) -> None:
        load = np.asarray(self.load, dtype=np.float64)
        if load.ndim != 2:
            raise SolverInputError(f"load must be [L, E], got shape {list(load.shape)}")
        object.__setattr__(self, "load", load)
        L, E = load.shape
        topo = self.topology
        if self.budget_slots is None and topo.num_slots < E:
            raise SolverInputError(
                f"{topo.num_slots} slots ({topo.num_gpus} GPUs x {topo.slots_per_gpu}) cannot hold {E} experts; "
                f"add GPUs or slots, or plan with a memory budget (--memory-budget)")
        if self.expert_groups < 1 or E % self.expert_groups:
            raise SolverInputError(f"--expert-groups ({self.expert_groups}) must divide the {E} experts")
        for name, shape in (("transitions", (L - 1, E, E)), ("transitions_top1", (L - 1, E, E)),
                            ("coactivation", (L, E, E))):
            arr = getattr(self, name)
            if arr is not None and tuple(arr.shape) != shape:
                raise SolverInputError(f"{name} must have shape {list(shape)}, got {list(arr.shape)}")
        if self.profiles is not None and (self.profiles.ndim != 3 or self.profiles.shape[1:] != (L, E)):
            raise SolverInputError(f"profiles must be [N, {L}, {E}], got {list(self.profiles.shape)}")
        if self.routes is not None and (self.routes.ndim != 3 or self.routes.shape[1] != L):
            raise SolverInputError(f"routes must be [T, {L}, k], got {list(self.routes.shape)}")
        if self.current is not None:
            cur = np.asarray(self.current)
            if cur.shape != (L, topo.num_slots):
                raise SolverInputError(f"the current placement has shape {list(cur.shape)}, but this problem needs "
                                       f"[{L}, {topo.num_slots}]; plan for the same layers, GPUs and slots")

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[1])

    @property
    def num_redundant(self) -> int:
        return self.topology.num_slots - self.num_experts


def is_number(v, lo: float | None = None, hi: float | None = None, *, integer: bool = False, lo_open: bool = False,
              hi_open: bool = False) -> bool:
    """Whether ``v`` is a finite number (not a bool; a whole one with ``integer``) in ``[lo, hi]``, an end excluded
    with ``lo_open`` / ``hi_open``."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
        return False
    if integer and float(v) != int(v):
        return False
    return not ((lo is not None and (v <= lo if lo_open else v < lo)) or
                (hi is not None and (v >= hi if hi_open else v > hi)))


@dataclass(frozen=True)
class Options:
    """How to solve: the same knobs for every solver; solver-specific ones go in ``params``.

    backend: "cp-sat" (OR-Tools, default), "highs" or "cbc" (through PuLP) for solvers that build a MIP.
    work_limit: a deterministic amount of search instead of the wall-clock ``time_limit`` (which is then not
    used), in the solver's documented units (the joint planner: iterated-search kicks per layer); with it a plan
    depends only on the problem, the parameters and the seed.
    executor: where a solver may run independent tasks (an object with ``map(fn, tasks, shared)``, see
    :mod:`placement.executor`); None runs them here, one after another. Results do not depend on it.
    """

    time_limit: float | None = 60.0
    seed: int = 0
    backend: str = "cp-sat"
    threads: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    progress: Callable[[str], None] | None = None
    work_limit: int | None = None
    executor: Any = None

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


@dataclass(frozen=True, eq=False)
class Result:
    """A placement and how it was found.

    phy2log: int ``[L, S]`` logical expert of each physical slot (-1 = empty slot, budget mode only).
    status: "optimal" (proved), "feasible" (stopped at a limit with a plan), "heuristic" (no optimality
    claim), or "fixed" (a rule such as contiguous).
    objective / bound / gap: in the solver's own objective (``objective_name``), minimised; gap =
    (objective - bound) / |objective|.
    """

    phy2log: np.ndarray
    solver: str
    status: str
    objective: float | None = None
    bound: float | None = None
    gap: float | None = None
    seconds: float = 0.0
    backend: str | None = None
    objective_name: str | None = None
    stats: dict = field(default_factory=dict)


def gap_of(objective: float | None, bound: float | None) -> float | None:
    """Relative gap ``(objective - bound) / |objective|`` (0 when both are 0; None when either is unknown)."""
    if objective is None or bound is None:
        return None
    if abs(objective) < 1e-12:
        return 0.0 if abs(bound) < 1e-12 else float("inf")
    return max(0.0, (objective - bound) / abs(objective))
