"""Online rebalancing with EPLB's calling convention: moeplace's migration-aware policy for any serving stack.

DeepSeek's EPLB (``deepseek-ai/EPLB``, vendored by vLLM and SGLang) is called as
``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)`` and recomputes the placement from
scratch. :func:`rebalance` takes the same arguments plus the placement in service and returns the next
``phy2log [L, num_replicas]``, moving an expert copy only where the predicted gain repays it
(:mod:`solvers.online` has the algorithm)::

    from placement.online import rebalance
    phy2log = rebalance(weight, num_replicas=72, num_groups=1, num_nodes=1, num_gpus=8, old_phy2log=current,
                        max_moves=64)

``weight`` is ``[L, E]`` (one window of per-expert token counts) or ``[N, L, E]`` (windows, newest last), a numpy
array or a torch tensor; the result is of the same kind (torch: int64 on ``weight``'s device), every expert has at
least one copy and no GPU holds two copies of one expert. A stack that calls its policy once per window and
keeps no history uses :class:`OnlinePolicy`, which remembers the recent windows itself.

Options (all keywords, see :func:`solvers.online.rebalance`): ``max_moves`` (most expert copies moved per
rebalance), ``move_cost`` (seconds per moved copy; default: one expert's weights over the intra-node link), ``history``
(windows kept as profiles, default 4), ``horizon`` (traffic served before the next rebalance, in windows: vLLM's
``step_interval / window_size``), ``keep_groups_on_nodes`` (default as EPLB: when ``num_nodes > 1`` and groups divide
into nodes), ``model`` (a cost-model preset such as ``"deepseek-v3"``) or ``cost`` (a
:class:`solvers.cost.CostModel`), ``intra_node_bandwidth`` / ``inter_node_bandwidth`` (bytes/s), ``change_factor``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from solvers.base import SolverInputError

__all__ = ["rebalance", "OnlinePolicy", "RebalanceInputError", "check_map", "OPTIONS"]

OPTIONS = ("history", "max_moves", "move_cost", "horizon", "keep_groups_on_nodes", "model", "cost",
           "intra_node_bandwidth", "inter_node_bandwidth", "change_factor", "max_rounds", "resamples")


class RebalanceInputError(SolverInputError):
    """Arguments :func:`rebalance` cannot use (one sentence)."""


def _to_numpy(x) -> tuple[np.ndarray, Any]:
    """``(array, torch-like template or None)``."""
    if isinstance(x, np.ndarray):
        return x, None
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        return x.detach().cpu().numpy(), x
    return np.asarray(x), None


def _like(arr: np.ndarray, template) -> Any:
    if template is None:
        return arr
    import torch

    return torch.as_tensor(arr, dtype=torch.int64, device=template.device)


def _check_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise RebalanceInputError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def check_map(phy2log: np.ndarray, num_layers: int, num_experts: int, num_replicas: int,
              num_gpus: int | None = None) -> str | None:
    """Why ``phy2log`` is not a usable ``[L, S]`` placement (every expert at least once, ids in range; with
    ``num_gpus``: no GPU with two copies of one expert), or None."""
    m = np.asarray(phy2log)
    if m.shape != (num_layers, num_replicas):
        return f"the placement has shape {list(m.shape)}, expected [{num_layers}, {num_replicas}]"
    if not np.issubdtype(m.dtype, np.integer):
        return "the placement must hold integer expert ids"
    if m.size and (m.min() < 0 or m.max() >= num_experts):
        return f"the placement names experts outside 0..{num_experts - 1}"
    present = np.zeros((num_layers, num_experts), dtype=bool)
    present[np.arange(num_layers)[:, None], m] = True
    if not present.all():
        return "the placement leaves an expert without a copy"
    if num_gpus is not None:
        srt = np.sort(m.reshape(num_layers, num_gpus, -1), axis=-1)
        if (srt[..., 1:] == srt[..., :-1]).any():
            return "the placement puts two copies of one expert on one GPU"
    return None


def _options(options: dict, num_groups: int, num_nodes: int) -> dict:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], OPTIONS, n=1)
        raise RebalanceInputError(f"rebalance has no option {unknown[0]!r}"
                                  + (f"; did you mean {near[0]!r}?" if near else f"; options: {', '.join(OPTIONS)}"))
    out = {k: v for k, v in options.items() if v is not None}
    model = out.pop("model", None)
    if model is not None:
        from solvers.cost import CostModel

        out["cost"] = CostModel.preset(str(model))
    if out.get("max_moves") is not None:
        mm = out["max_moves"]
        if isinstance(mm, bool) or not isinstance(mm, (int, np.integer)) or mm < 0:
            raise RebalanceInputError(f"max_moves must be a non-negative integer, got {mm!r}")
    for key in ("history", "max_rounds"):
        if key in out:
            _check_int(key, out[key])
    if "resamples" in out and (isinstance(out["resamples"], bool) or not isinstance(out["resamples"], (int, np.integer))
                               or out["resamples"] < 0):
        raise RebalanceInputError(f"resamples must be a non-negative integer, got {out['resamples']!r}")
    for key in ("move_cost", "horizon", "change_factor", "intra_node_bandwidth", "inter_node_bandwidth"):
        if key in out:
            v = out[key]
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v) or v < 0 \
                    or (v == 0 and key != "move_cost"):
                raise RebalanceInputError(f"{key} must be a {'non-negative' if key == 'move_cost' else 'positive'} "
                                          f"number, got {v!r}")
    if out.get("keep_groups_on_nodes") is None:
        out["keep_groups_on_nodes"] = num_nodes > 1 and num_groups % num_nodes == 0
    return out


def rebalance(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, old_phy2log=None,
              **options) -> Any:
    """The next placement ``phy2log [L, num_replicas]`` (see the module docstring); raises
    :class:`RebalanceInputError` for arguments it cannot use."""
    return rebalance_with_stats(weight, num_replicas, num_groups, num_nodes, num_gpus, old_phy2log, **options)[0]


def rebalance_with_stats(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                         old_phy2log=None, **options) -> tuple[Any, dict]:
    """:func:`rebalance` and the policy's statistics (windows used, change detected, copies moved, choice)."""
    from solvers import online

    W, template = _to_numpy(weight)
    if W.ndim not in (2, 3) or min(W.shape) == 0:
        raise RebalanceInputError(f"weight must be [L, E] or [N, L, E] counts, got shape {list(W.shape)}")
    if not np.issubdtype(W.dtype, np.number) or not np.all(np.isfinite(W)) or (W < 0).any():
        raise RebalanceInputError("weight must hold finite, non-negative counts")
    S, grp, N, G = (_check_int(n, v) for n, v in (("num_replicas", num_replicas), ("num_groups", num_groups),
                                                  ("num_nodes", num_nodes), ("num_gpus", num_gpus)))
    L, E = W.shape[-2:]
    if S < E or S % G or G % N or E % grp:
        raise RebalanceInputError(
            f"{S} slots for {E} experts on {G} GPUs in {N} nodes with {grp} groups cannot be planned: slots must be "
            f"at least the experts and a multiple of the GPUs, GPUs a multiple of nodes, experts of groups")
    opts = _options(dict(options), grp, N)
    old = None
    if old_phy2log is not None:
        old, _ = _to_numpy(old_phy2log)
        reason = check_map(old, L, E, S)
        if reason is not None:
            raise RebalanceInputError(f"old_phy2log is not a placement of this model: {reason}")
        old = old.astype(np.int64)
    try:
        X, stats = online.rebalance(W, S, grp, N, G, old, **opts)
    except SolverInputError as exc:
        raise RebalanceInputError(str(exc)) from None
    return _like(X, template), stats


class OnlinePolicy:
    """:func:`rebalance` for a stack that passes one window per call: keeps the recent windows per model shape.

    Call it like EPLB: ``policy(weight [L, E], num_replicas, num_groups, num_nodes, num_gpus, old_phy2log)``; a
    ``[steps, L, E]`` weight (SGLang's recorder buffer) is split into ``history`` windows of consecutive steps when
    no older window is kept yet, else summed into one. Thread-safe; ``last_stats`` holds the latest statistics.

    ``move_budget``: copies the policy may move per rebalance on average; what a rebalance leaves unused is saved
    (up to ``burst`` copies, default unbounded) for a later one, so a phase change can afford a larger move. With
    ``max_moves`` too, the smaller limit applies.
    """

    def __init__(self, reference: int = 16, move_budget: float | None = None, burst: float | None = None, **options):
        _options(dict(options), 1, 1)  # check names and values now
        for name, v in (("move_budget", move_budget), ("burst", burst)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
                raise RebalanceInputError(f"{name} must be a non-negative number of copies, got {v!r}")
        self.options = options
        self.reference = int(reference)
        self.move_budget = move_budget
        self.burst = burst
        self.saved = 0.0
        self.windows: dict[tuple, list[np.ndarray]] = {}
        self.last_stats: dict = {}
        self._lock = threading.Lock()

    def add_window(self, weight) -> np.ndarray:
        """Remember one window ``[L, E]`` (or ``[steps, L, E]``, see the class docstring); returns the windows kept."""
        W, _ = _to_numpy(weight)
        W = np.asarray(W, dtype=np.float64)
        key = tuple(W.shape[-2:])
        kept = self.windows.setdefault(key, [])
        if W.ndim == 3:
            if not kept and W.shape[0] > 1:
                parts = np.array_split(W, min(int(self.options.get("history") or 4), W.shape[0]))
                kept.extend(p.sum(axis=0) for p in parts if p.sum() > 0)
            elif W.sum() > 0:
                kept.append(W.sum(axis=0))
        elif W.sum() > 0:  # an all-zero window (a profiling run) says nothing about the traffic
            kept.append(W)
        del kept[:-self.reference]
        return np.stack(kept) if kept else W.reshape((-1,) + key)[:1] * 0

    def __call__(self, weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, old_phy2log=None):
        with self._lock:
            _, template = _to_numpy(weight)
            windows = self.add_window(weight)
            opts = dict(self.options)
            if self.move_budget is not None and old_phy2log is not None:
                cap = float("inf") if self.burst is None else float(self.burst)
                self.saved = min(self.saved + float(self.move_budget), max(cap, float(self.move_budget)))
                mm = int(self.saved)
                opts["max_moves"] = mm if opts.get("max_moves") is None else min(mm, int(opts["max_moves"]))
            X, stats = rebalance_with_stats(windows, num_replicas, num_groups, num_nodes, num_gpus, old_phy2log,
                                            **opts)
            if self.move_budget is not None and old_phy2log is not None:
                self.saved = max(self.saved - stats["moved"], 0.0)
            self.last_stats = stats
            return _like(np.asarray(X), template)
