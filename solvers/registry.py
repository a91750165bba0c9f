"""Solver discovery: every module in :mod:`solvers` that defines ``SOLVERS = {name: solve}`` is registered.

Solver modules must import heavy backends (ortools, pulp) inside functions so that discovery stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from functools import lru_cache
from typing import Callable

import numpy as np

import solvers
from solvers.base import Options, Problem, Result, SolverInputError

SolveFn = Callable[[Problem, Options], Result]


@lru_cache(maxsize=1)
def _registry() -> dict[str, SolveFn]:
    found: dict[str, SolveFn] = {}
    for info in pkgutil.iter_modules(solvers.__path__):
        module = importlib.import_module(f"solvers.{info.name}")
        for name, fn in getattr(module, "SOLVERS", {}).items():
            if name in found:
                raise RuntimeError(f"two solver modules register {name!r}")
            found[name] = fn
    return found


def names() -> list[str]:
    """Registered solver names, sorted."""
    return sorted(_registry())


def get(name: str) -> SolveFn:
    try:
        return _registry()[name]
    except KeyError:
        raise SolverInputError(f"unknown solver {name!r}; choose one of: {', '.join(names())}") from None


def check_placement(phy2log: np.ndarray, problem: Problem, allow_empty: bool = False) -> None:
    """Raise if ``phy2log`` is not a valid ``[L, S]`` placement for ``problem`` (every expert has a slot)."""
    L, E, S = problem.num_layers, problem.num_experts, problem.topology.num_slots
    if phy2log.shape != (L, S):
        raise AssertionError(f"solver returned phy2log of shape {phy2log.shape}, expected {(L, S)}")
    lo = -1 if allow_empty else 0
    if phy2log.min() < lo or phy2log.max() >= E:
        raise AssertionError("solver returned expert ids out of range")
    if not allow_empty:
        present = np.zeros((L, E), dtype=bool)
        present[np.arange(L)[:, None], phy2log] = True
        if not present.all():
            raise AssertionError("solver returned a placement that leaves an expert without a slot")


def solve(name: str, problem: Problem, options: Options | None = None) -> Result:
    """Run solver ``name``, check its placement, and fill in wall-clock seconds."""
    options = options or Options()
    fn = get(name)
    from solvers.mip import BACKENDS

    if options.backend not in BACKENDS:  # every solver, also those that build no MIP: a typo is never ignored
        raise SolverInputError(f"unknown backend {options.backend!r}; choose one of: {', '.join(BACKENDS)}")
    t0 = time.perf_counter()
    result = fn(problem, options)
    seconds = time.perf_counter() - t0
    check_placement(result.phy2log, problem, allow_empty=problem.budget_slots is not None)
    if result.objective is not None and result.bound is not None and result.bound > result.objective + 1e-6 * max(1.0, abs(result.objective)):
        raise AssertionError(f"solver {name} reported a bound {result.bound} above its objective {result.objective}")
    from dataclasses import replace

    return replace(result, seconds=result.seconds or seconds)
