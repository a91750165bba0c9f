"""Exact enumeration of tiny instances (every placement scored by the counts objective)."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np

from solvers.joint.data import JointData
from solvers.joint.state import State


def _layer_options(E: int, G: int, m: int) -> list[np.ndarray]:
    """Every slot row (up to slot order within a GPU): per GPU m distinct experts, every expert somewhere."""
    combos = list(itertools.combinations(range(E), m))
    rows = []
    for pick in itertools.product(combos, repeat=G):
        flat = np.concatenate(pick)
        if np.unique(flat).size == E:
            rows.append(flat)
    return rows


def count_placements(E: int, G: int, m: int, L: int) -> float:
    """Number of distinct placements (up to slot order inside a GPU), or inf when obviously huge."""
    per_gpu = G * math.log(max(math.comb(E, m), 1))
    if per_gpu > math.log(2e5):
        return math.inf
    log = L * math.log(max(len(_layer_options(E, G, m)), 1))
    return math.exp(log) if log < 700 else math.inf


def enumerate_exact(data: JointData, deadline: float) -> tuple[np.ndarray, float] | None:
    """Best placement by exhaustive search, or None if the deadline passes first."""
    topo = data.topology
    rows = _layer_options(data.E, topo.num_gpus, topo.slots_per_gpu)
    best, best_X = np.inf, None
    for combo in itertools.product(range(len(rows)), repeat=data.L):
        if time.perf_counter() > deadline:
            return None
        X = np.stack([rows[i] for i in combo])
        v = objective_of(data, X)
        if v < best - 1e-15:
            best, best_X = v, X
    return best_X, best

def objective_of(data: JointData, X: np.ndarray) -> float:
    """Exact counts objective of ``X [L, S]`` computed from scratch (for one profile and no migration it equals
    ``solvers.cost.estimate_layer_seconds(...).sum()``)."""
    return State(data, X).objective()
