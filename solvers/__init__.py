"""Pure optimisation: arrays and a topology in, a slot assignment per layer plus solver statistics out.

Call any solver the same way::

    from solvers import Problem, Topology, Options, solve
    result = solve("contiguous", Problem(load=load, topology=Topology(num_gpus=8, slots_per_gpu=8)))

This package never imports ``placement`` or ``traces``.
"""

from solvers.base import Options, Problem, Result, SolverInputError, Topology, gap_of
from solvers.registry import names, solve

__all__ = ["Options", "Problem", "Result", "SolverInputError", "Topology", "gap_of", "names", "solve"]
