"""Drift scenarios for replaying online rebalancing, built from the bundled ESFT tasks (no extra data files).

A serving deployment's traffic drifts: one kind of request dominates for a while, then another. These scenarios
stream the real DeepSeek-V2-Lite routing of the three bundled ESFT tasks (intent, law, summary) in orders that
drift in known ways, so that online rebalancing policies can be replayed on them (``moeplace replay``,
``placement.replay``).

Held-out sequences only: every task's sequences are split in two halves by whole sequence (:func:`split`, seed
0); the scenarios stream only the held-out halves, and :func:`fit_trace` gives the other halves, on which a fixed
plan is fitted, so a fixed plan is judged out of sample like the online policies (which see only windows of the
stream before the tokens they are judged on).

Scenarios (:data:`SCENARIOS`; name them as ``esft-drift:NAME``):

- ``phases``: the tasks one after another (intent, law, summary), the cycle twice: abrupt phase changes.
- ``mix-0.1``, ``mix-0.3``: the same phases, but each next sequence comes from one of the other two tasks with
  probability 0.1 or 0.3 (interleaved at a mixing rate; each phase keeps the held-out token count of its task).
- ``shuffled``: all held-out sequences twice, in random order: no drift (a fixed plan should be enough).
- ``counts``: the ``phases`` stream as counts only, one ``[L, E]`` row per 500 tokens (``[N, L, E]``, as a
  stack's recorder dumps arrive); replay it with window and interval in rows.
"""

from __future__ import annotations

import numpy as np

from traces.format import LoadProfile, RoutingTrace, TraceError, layer_counts

__all__ = ["SCENARIOS", "PREFIX", "split", "fit_trace", "scenario", "is_scenario", "COUNTS_ROW_TOKENS"]

PREFIX = "esft-drift"
SCENARIOS = {
    "phases": "the three tasks one after another, twice (abrupt phase changes)",
    "mix-0.1": "phases, each sequence from another task with probability 0.1",
    "mix-0.3": "phases, each sequence from another task with probability 0.3",
    "shuffled": "all held-out sequences twice in random order (no drift)",
    "counts": "the phases stream as counts, one [L, E] row per 500 tokens",
}
COUNTS_ROW_TOKENS = 500
_CYCLES = 2


def split(seed: int = 0) -> dict[str, tuple[RoutingTrace, RoutingTrace]]:
    """``{task: (fit half, held-out half)}`` of each bundled ESFT task, split by whole sequence."""
    from traces import datasets

    return {t: datasets.load(tasks=[t]).split_by_sequence(0.5, seed=seed) for t in datasets.ESFT_TASKS}


def fit_trace(seed: int = 0) -> RoutingTrace:
    """The fit halves of the three tasks (the sequences no scenario streams), for fitting fixed plans."""
    return RoutingTrace.concat([fit for fit, _ in split(seed).values()])


def _sequences(trace: RoutingTrace) -> list[np.ndarray]:
    """Token indices of each sequence, in order of first appearance."""
    idx = trace.sequence_index()
    order = np.argsort(idx, kind="stable")
    bounds = np.flatnonzero(np.diff(idx[order])) + 1
    return np.split(order, bounds)


def _stream(parts: list[tuple[RoutingTrace, np.ndarray]], source: str) -> RoutingTrace:
    """One trace from (trace, token indices of one sequence) pieces, each piece a new sequence, in order."""
    traces = []
    for n, (tr, tok) in enumerate(parts):
        piece = tr.take(tok)
        traces.append(RoutingTrace(expert_ids=piece.expert_ids, num_experts=piece.num_experts,
                                   gate_weights=piece.gate_weights, seq_id=np.full(len(tok), n, dtype=np.int64),
                                   pos_in_seq=piece.pos_in_seq, moe_layer_index=piece.moe_layer_index,
                                   num_hidden_layers=piece.num_hidden_layers, model=piece.model, source=source))
    out = RoutingTrace.concat(traces, renumber_sequences=False)
    return RoutingTrace(expert_ids=out.expert_ids, num_experts=out.num_experts, gate_weights=out.gate_weights,
                        seq_id=out.seq_id, pos_in_seq=out.pos_in_seq, moe_layer_index=out.moe_layer_index,
                        num_hidden_layers=out.num_hidden_layers, model=out.model, source=source)


def _phases(held: dict[str, RoutingTrace], mix: float, rng: np.random.Generator, source: str) -> RoutingTrace:
    tasks = list(held)
    seqs = {t: _sequences(held[t]) for t in tasks}
    nxt = {t: 0 for t in tasks}
    parts = []
    for _ in range(_CYCLES):
        for t in tasks:
            budget, used = held[t].num_tokens, 0
            while used < budget:
                src = t
                if mix > 0 and rng.random() < mix:
                    others = [o for o in tasks if o != t]
                    src = others[int(rng.integers(len(others)))]
                tok = seqs[src][nxt[src] % len(seqs[src])]
                nxt[src] += 1
                parts.append((held[src], tok))
                used += len(tok)
    return _stream(parts, source)


def scenario(name: str, seed: int = 0) -> RoutingTrace | LoadProfile:
    """The scenario ``name`` (a key of :data:`SCENARIOS`, with or without the ``esft-drift:`` prefix)."""
    key = name.split(":", 1)[1] if name.startswith(PREFIX + ":") else name
    if key not in SCENARIOS:
        raise TraceError(f"no drift scenario named {key!r}; scenarios: "
                         + ", ".join(f"{PREFIX}:{k}" for k in SCENARIOS))
    held = {t: h for t, (_, h) in split(seed).items()}
    rng = np.random.default_rng(seed)
    source = f"{PREFIX}:{key}"
    if key == "shuffled":
        parts = [(held[t], s) for _ in range(_CYCLES) for t in held for s in _sequences(held[t])]
        order = rng.permutation(len(parts))
        return _stream([parts[i] for i in order], source)
    if key == "counts":
        tr = _phases(held, 0.0, rng, source)
        n = tr.num_tokens // COUNTS_ROW_TOKENS
        rows = np.stack([layer_counts(tr.expert_ids[i * COUNTS_ROW_TOKENS:(i + 1) * COUNTS_ROW_TOKENS],
                                      tr.num_experts) for i in range(n)])
        return LoadProfile(logical_count=rows, moe_layer_index=tr.moe_layer_index,
                           num_hidden_layers=tr.num_hidden_layers, model=tr.model, source=source,
                           names=[f"tokens {i * COUNTS_ROW_TOKENS}-{(i + 1) * COUNTS_ROW_TOKENS}" for i in range(n)])
    mix = 0.0 if key == "phases" else float(key.split("-", 1)[1])
    return _phases(held, mix, rng, source)


def is_scenario(name: str) -> bool:
    """Whether ``name`` names a drift scenario (``esft-drift:NAME``)."""
    return isinstance(name, str) and name.startswith(PREFIX + ":")
