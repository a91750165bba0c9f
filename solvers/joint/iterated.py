"""Iterated local search around :func:`solvers.joint.search.local_search` (Lourenco, Martin & Stuetzle, "Iterated
Local Search", 2003)."""

from __future__ import annotations

import time

import numpy as np

from solvers.joint.search import _random_swap, local_search
from solvers.joint.state import State


def _restore(state: State, rows: dict[int, np.ndarray]) -> None:
    """Put the slot rows ``{layer: [S] row}`` back (exact incremental moves; a no-op where nothing changed)."""
    for l, row in rows.items():
        diff = np.nonzero(state.X[l] != row)[0]
        if diff.size:
            res = state.evaluate_move(l, [(int(s), int(row[s])) for s in diff])
            if res is None:  # a row the state held before is always legal
                raise RuntimeError("could not restore a layer the state held before")
            state.apply(res[2])
    state.resync()


def iterated_search(state: State, deadline: float, rng: np.random.Generator, swaps: int = 3,
                    patience: int | None = None, min_gain: float = 1e-3, max_kicks: int | None = None,
                    say=None) -> tuple[int, int]:
    """Iterated local search (Lourenco, Martin & Stuetzle, "Iterated Local Search", 2003) until ``deadline``: kick
    one layer with ``swaps`` random swaps of pieces of similar load between GPUs, descend (:func:`local_search`)
    on that layer and its neighbours (the only objective terms a kick touches), keep the result if the objective
    improved, else put the three layers back; stops when the last ``patience`` kicks (default: two per layer)
    gained less than ``min_gain`` of the objective together, or after ``max_kicks``. Returns (kicks, kicks kept)."""
    d = state.d
    best = state.objective()
    kicks = kept = 0
    patience = 2 * d.L if patience is None else patience
    history = [best]  # best objective after each kick
    while time.perf_counter() < deadline and (max_kicks is None or kicks < max_kicks):
        if len(history) > patience and history[-patience - 1] - best < min_gain * abs(best):
            break
        l = int(rng.integers(d.L))
        near = [ll for ll in (l - 1, l, l + 1) if 0 <= ll < d.L]
        saved = {ll: state.X[ll].copy() for ll in near}
        x = d.load[l][state.X[l]] / state.r[l][state.X[l]]
        for _ in range(swaps):
            res = state.evaluate_move(l, _random_swap(state, state.X[l], x, rng))
            if res is not None:
                state.apply(res[2])
        local_search(state, deadline, rng, layers=near)
        kicks += 1
        now = state.objective()
        if now < best - 1e-12 * abs(best):
            best = now
            kept += 1
        else:
            _restore(state, saved)
        history.append(best)
        if say and kicks % 10 == 0:
            say(f"iterated local search: {kicks} kicks, {kept} kept, objective {best:.6g}")
    if say:
        say(f"iterated local search: {kicks} kicks, {kept} kept, objective {state.objective():.6g}")
    return kicks, kept
