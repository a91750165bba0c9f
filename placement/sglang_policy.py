"""moeplace's online policy inside SGLang's EPLB manager.

SGLang (``--enable-eplb``) rebalances every ``--eplb-rebalance-num-iterations`` by calling
``sglang.srt.eplb.eplb_algorithms.rebalance_experts(tokens_per_expert [steps, L, E], num_physical_experts,
num_local_physical_experts, num_groups, num_nodes, algorithm)``, which ``ExpertLocationMetadata.init_by_eplb``
looks up as a module attribute at call time, and which returns ``(physical_to_logical_map [L, S],
logical_to_all_physical_map [L, E, X] (-1 padded), expert_count [L, E])``. :func:`patch` replaces that attribute
by :func:`rebalance_experts` below, which runs :class:`placement.online.OnlinePolicy` from the placement in service
(SGLang's global expert-location metadata) and returns the same three tensors.

``moeplace sglang-launch ARGS...`` starts ``python -m sglang.launch_server ARGS...`` with the policy installed in
every server process (SGLang spawns its scheduler processes: the launcher puts ``placement/sglang_hook`` first on
PYTHONPATH, whose ``sitecustomize`` calls :func:`install_import_hook`). Options come as JSON in
``MOEPLACE_SGLANG_POLICY_OPTIONS``.

Never takes the server down: if SGLang's module is not what this expects, or the policy fails or returns an unusable
map, one warning is logged (logger ``sglang.moeplace``) and SGLang's own algorithm decides (for that call, or from
then on when the module cannot be patched). SGLang's elasticity-aware algorithms (ranks that left) are always left to
SGLang.
"""

from __future__ import annotations

import importlib.abc
import json
import logging
import os
import sys
import threading

import numpy as np

ENV = "MOEPLACE_SGLANG_POLICY"
ENV_OPTIONS = "MOEPLACE_SGLANG_POLICY_OPTIONS"
MODULE = "sglang.srt.eplb.eplb_algorithms"
PARAMS = ("tokens_per_expert", "num_physical_experts", "num_local_physical_experts", "num_groups", "num_nodes",
          "algorithm")

log = logging.getLogger("sglang.moeplace")
_warned: set[str] = set()
_state: dict = {}
_lock = threading.Lock()


def _warn(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("moeplace: %s", message)


def _policy():
    with _lock:
        if "policy" not in _state:
            from placement.online import OnlinePolicy

            text = os.environ.get(ENV_OPTIONS, "").strip()
            opts = json.loads(text) if text else {}
            if not isinstance(opts, dict):
                raise ValueError(f"{ENV_OPTIONS} must be a JSON object such as {{\"max_moves\": 512}}")
            _state["policy"] = OnlinePolicy(**opts)
        return _state["policy"]


def _current_map(shape):
    """The ``physical_to_logical_map`` SGLang serves with now (CPU tensor), or None when unknown or of another
    shape."""
    try:
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        meta = get_global_expert_location_metadata()
        cur = getattr(meta, "physical_to_logical_map_cpu", None)
        if cur is None:
            cur = getattr(meta, "physical_to_logical_map", None)
        if cur is None or tuple(cur.shape) != tuple(shape):
            return None
        return cur.cpu()
    except Exception:  # noqa: BLE001 - no metadata yet (start-up) or another SGLang: plan from counts alone
        return None


def sglang_maps(phy2log, num_experts: int):
    """``(physical_to_logical_map, logical_to_all_physical_map [L, E, X] -1 padded, expert_count [L, E])`` as SGLang's
    algorithms return them, replicas listed by slot."""
    import torch

    X = np.asarray(phy2log.cpu() if hasattr(phy2log, "cpu") else phy2log, dtype=np.int64)
    L, S = X.shape
    cnt = np.zeros((L, num_experts), dtype=np.int64)
    np.add.at(cnt, (np.arange(L)[:, None], X), 1)
    R = max(int(cnt.max()), 1)
    l2p = np.full((L, num_experts, R), -1, dtype=np.int64)
    order = np.argsort(X, axis=1, kind="stable")  # slots grouped by expert, in slot order
    for l in range(L):
        e = X[l, order[l]]
        l2p[l, e, np.arange(S) - np.searchsorted(e, e)] = order[l]  # replica index = rank among the expert's slots
    return torch.as_tensor(X), torch.as_tensor(l2p), torch.as_tensor(cnt)


def make_rebalance(original):
    """SGLang's ``rebalance_experts`` with moeplace's policy in front of ``original``."""

    def rebalance_experts(tokens_per_expert, num_physical_experts, num_local_physical_experts, num_groups, num_nodes,
                          algorithm):
        if "elasticity" in str(getattr(algorithm, "name", algorithm)):
            return original(tokens_per_expert, num_physical_experts, num_local_physical_experts, num_groups,
                            num_nodes, algorithm)
        try:
            from placement.online import check_map

            counts = tokens_per_expert.detach().cpu().double()
            if counts.ndim == 2:
                counts = counts[None]
            L, E = counts.shape[-2:]
            G = num_physical_experts // num_local_physical_experts
            old = _current_map((L, num_physical_experts))
            new = _policy()(counts, num_physical_experts, int(num_groups or 1), int(num_nodes), G, old)
            reason = check_map(np.asarray(new), L, E, num_physical_experts, G)
            if reason is not None:
                raise ValueError(reason)
            p2l, l2p, cnt = sglang_maps(new, E)
            dev = tokens_per_expert.device
            return p2l.to(dev), l2p.to(dev), cnt.to(dev)
        except Exception as exc:  # noqa: BLE001 - SGLang's own algorithm stays in charge
            _warn(f"moeplace's EPLB policy failed ({type(exc).__name__}: {exc}); this rebalance uses SGLang's "
                  f"{getattr(algorithm, 'name', algorithm)} algorithm")
            return original(tokens_per_expert, num_physical_experts, num_local_physical_experts, num_groups,
                            num_nodes, algorithm)

    rebalance_experts.moeplace_original = original
    return rebalance_experts


def patch(module) -> bool:
    """Put moeplace's policy in front of ``module.rebalance_experts`` (SGLang's ``eplb_algorithms``); True if done.
    An unknown signature leaves the module as it is, with one warning."""
    import inspect

    fn = getattr(module, "rebalance_experts", None)
    if fn is None:
        _warn(f"{MODULE} has no rebalance_experts; SGLang keeps its own EPLB algorithm")
        return False
    if getattr(fn, "moeplace_original", None) is not None:
        return True
    try:
        names = tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        names = ()
    if names != PARAMS:
        _warn(f"this SGLang's rebalance_experts takes {names}, not {PARAMS}; SGLang keeps its own EPLB algorithm")
        return False
    module.rebalance_experts = make_rebalance(fn)
    log.info("moeplace: SGLang's EPLB rebalances use moeplace's online policy")
    return True


class _Hook(importlib.abc.MetaPathFinder):
    """Patches SGLang's EPLB module right after it is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            import importlib.util

            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module):
            run(module)
            try:
                patch(module)
            except Exception as exc:  # noqa: BLE001
                _warn(f"could not install the policy ({type(exc).__name__}: {exc}); SGLang keeps its own EPLB "
                      f"algorithm")

        loader.exec_module = exec_module
        return spec


def install_import_hook() -> None:
    """Install the policy in this process when ``MOEPLACE_SGLANG_POLICY=moeplace``: now if SGLang's EPLB module is
    loaded, else when it is imported."""
    if os.environ.get(ENV) != "moeplace":
        return
    if MODULE in sys.modules:
        patch(sys.modules[MODULE])
    elif not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
