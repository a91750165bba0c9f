"""Replay of online rebalancing: what the serving stacks do, on a recorded stream, judged out of sample.

vLLM (``--enable-eplb``: ``window_size`` steps recorded before each rearrangement every ``step_interval`` steps)
and SGLang (the recorder buffer, every ``--eplb-rebalance-num-iterations``) re-plan the placement from the
per-expert counts of the last window and move the expert weights to the new map. :func:`replay` does the same on a
stream (a token trace in order, or count windows ``[N, L, E]`` in order): rebalance ``k`` happens at position
``t_k = window + k x interval``; the policy sees only the counts of ``[t_k - window, t_k)`` (plus whatever history it
keeps itself), and its map is judged on ``[t_k, t_k + interval)``, the traffic it serves until the next
rebalance. Positions are tokens for a token trace and rows for count windows.

Per rebalance and overall, for every policy: load imbalance (mean over layers and the worst layer, on the judged
traffic), the estimated MoE time of that traffic (on tokens the exact evaluator, as ``moeplace evaluate`` computes it
on the interval's tokens: :func:`placement.evaluate.token_traffic` and :func:`solvers.cost.layer_seconds`; the counts model of :func:`solvers.cost.estimate_layer_seconds`
on counts), the expert copies moved (an expert landing on a GPU that did not hold it), their bytes at the cost
model's expert size, the migration time they take on the links (every copy sent from a GPU that held the expert,
in the receiver's node when one does; all layers' copies share the links:
:func:`solvers.cost.phase_seconds` of the summed byte matrix), and the policy's wall time.

``scale``: each stream token (or count) stands for ``scale`` served ones (a trace is a sample of the traffic): MoE
time grows with it while migration does not, and a policy that weighs migration (moeplace's) is told that its map
serves ``scale`` times the traffic it saw (its ``horizon``). Policies see the stream's own counts, whose sampling
noise is real.

Before the first rebalance the placement in service is ``initial``: EPLB fitted on the first window (default), the
stacks' start-up layout (``"identity"``: slot s holds expert ``s mod E``, as vLLM starts), or a given map.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from solvers import Topology
from solvers.base import SolverInputError
from solvers.cost import CostModel, estimate_layer_seconds, layer_seconds, phase_seconds
from solvers.objective import gpu_load, imbalance
from traces import LoadProfile, RoutingTrace
from traces.format import layer_counts

__all__ = ["POLICIES", "ReplaySetup", "ReplayError", "PolicySpec", "make_policy", "replay", "migration", "summary_rows",
           "plot_replay", "markdown_table"]

POLICIES = ("eplb", "eplb-global", "eplb-hierarchical", "static", "moeplace")

Policy = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (window counts [L, E], map in service [L, S]) -> [L, S]


class ReplayError(SolverInputError):
    """A replay that cannot run as asked (one sentence)."""


@dataclass(frozen=True)
class ReplaySetup:
    """How to replay: the EP group, window and interval (tokens, or rows of count windows), the cost model."""

    topology: Topology
    window: int
    interval: int
    expert_groups: int = 1
    cost: CostModel = field(default_factory=CostModel)
    scale: float = 1.0
    initial: str | np.ndarray = "eplb"


# policies -------------------------------------------------------------------------------------------------------


def _eplb(setup: ReplaySetup, variant: str) -> Policy:
    from solvers.eplb import rebalance_experts

    topo = setup.topology
    groups, nodes = setup.expert_groups, topo.num_nodes
    if variant == "hierarchical" and groups % nodes:
        raise ReplayError(f"the hierarchical EPLB policy needs the expert groups ({groups}) to be a multiple of the "
                          f"nodes ({nodes}); set --expert-groups or use --policy eplb-global")
    if variant == "global":
        groups, nodes = 1, 1

    def policy(window: np.ndarray, current: np.ndarray) -> np.ndarray:
        return rebalance_experts(window, topo.num_slots, groups, nodes, topo.num_gpus)[0]

    return policy


def make_policy(name: str, setup: ReplaySetup, **options) -> Policy:
    """The policy ``name`` (one of :data:`POLICIES`) as the replay calls it. ``options`` go to moeplace's policy
    (:class:`placement.online.OnlinePolicy`; its ``horizon`` defaults to ``scale x interval / window``: the counts it
    sees are the stream's, and the map serves ``scale`` times the interval's traffic)."""
    if name == "eplb":  # as the stacks run it: hierarchical when the groups divide into nodes, else global
        return _eplb(setup, "hierarchical" if setup.expert_groups % setup.topology.num_nodes == 0 else "global")
    if name == "eplb-global":
        return _eplb(setup, "global")
    if name == "eplb-hierarchical":
        return _eplb(setup, "hierarchical")
    if name == "static":
        return lambda window, current: current
    if name == "moeplace":
        from placement.online import OnlinePolicy

        opts = {"horizon": setup.scale * setup.interval / setup.window, "cost": setup.cost,
                "intra_node_bandwidth": setup.topology.intra_node_bandwidth,
                "inter_node_bandwidth": setup.topology.inter_node_bandwidth, **options}
        pol = OnlinePolicy(**opts)
        topo = setup.topology

        def policy(window: np.ndarray, current: np.ndarray) -> np.ndarray:
            return np.asarray(pol(window, topo.num_slots, setup.expert_groups, topo.num_nodes, topo.num_gpus,
                                  current))

        policy.online = pol  # type: ignore[attr-defined]
        return policy
    raise ReplayError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")


# measurements ---------------------------------------------------------------------------------------------------


def migration(old: np.ndarray, new: np.ndarray, num_experts: int, topology: Topology,
              expert_bytes: float) -> tuple[int, float]:
    """``(copies, seconds)`` to move from ``old [L, S]`` to ``new [L, S]``: a copy is an (expert, GPU) pair of
    ``new`` that ``old`` lacks; it comes from the lowest-numbered GPU holding the expert in ``old`` in the
    receiver's node, else from the lowest-numbered holder anywhere; seconds: one all-to-all phase of the summed
    byte matrix (:func:`solvers.cost.phase_seconds`, the slowest GPU's link time)."""
    from solvers.objective import gpu_mask

    G = topology.num_gpus
    ho = gpu_mask(old, num_experts, topology)  # [L, E, G]
    hn = gpu_mask(new, num_experts, topology)
    need = hn & ~ho
    copies = int(need.sum())
    if copies == 0:
        return 0, 0.0
    node = topology.node_of_gpu()
    same = node[:, None] == node[None, :]  # [src, dst]
    l, e, dst = np.nonzero(need)
    holders = ho[l, e]  # [M, G]
    local = holders & same[:, dst].T  # holders in the receiver's node
    src = np.where(local.any(axis=1), np.argmax(local, axis=1), np.argmax(holders, axis=1))
    pair = np.zeros((G, G))
    np.add.at(pair, (src, dst), expert_bytes)
    return copies, float(phase_seconds(pair, topology).max())


class _Stream:
    """Counts and traffic of a stream's positions ``[a, b)``."""

    def __init__(self, data: RoutingTrace | LoadProfile):
        self.data = data
        if isinstance(data, RoutingTrace):
            self.ids = data.expert_ids
            self.seq = data.sequence_index()
            self.length = data.num_tokens
            self.unit = "tokens"
        else:
            self.rows = data.logical_count
            self.length = int(self.rows.shape[0])
            self.unit = "rows"
        self.num_experts = data.num_experts
        self.num_layers = data.num_layers

    def counts(self, a: int, b: int) -> np.ndarray:
        if self.unit == "tokens":
            return layer_counts(self.ids[a:b], self.num_experts).astype(np.float64)
        return self.rows[a:b].sum(axis=0)

    def moe_seconds(self, phy2log: np.ndarray, a: int, b: int, load: np.ndarray, topo: Topology,
                    cost: CostModel) -> float:
        if self.unit == "tokens":
            from placement.evaluate import token_traffic

            home = np.unique(self.seq[a:b], return_inverse=True)[1]  # as the evaluator numbers a trace's sequences
            tr = token_traffic(phy2log, self.num_experts, topo, self.ids[a:b], home.astype(np.int64))
            return float(layer_seconds(gpu_load(phy2log, load, topo), tr["dispatch_pairs"] * cost.token_bytes,
                                       topo, cost).sum())
        return float(estimate_layer_seconds(phy2log, load, topo, cost).sum())


def _initial(setup: ReplaySetup, stream: _Stream) -> np.ndarray:
    topo = setup.topology
    E, L = stream.num_experts, stream.num_layers
    init = setup.initial
    if isinstance(init, str):
        if init == "identity":
            return np.tile(np.arange(topo.num_slots) % E, (L, 1))
        if init == "eplb":
            from solvers.eplb import rebalance_experts

            groups, nodes = setup.expert_groups, topo.num_nodes
            if groups % nodes:
                groups, nodes = 1, 1
            return rebalance_experts(stream.counts(0, setup.window), topo.num_slots, groups, nodes, topo.num_gpus)[0]
        raise ReplayError(f"unknown initial placement {init!r}; use eplb, identity or a plan file")
    init = np.asarray(init)
    if init.shape != (L, topo.num_slots):
        raise ReplayError(f"the initial placement has shape {list(init.shape)}, but this replay needs "
                          f"[{L}, {topo.num_slots}]; give a plan of this model for these GPUs and slots")
    return init.astype(np.int64)


def check_setup(data: RoutingTrace | LoadProfile, setup: ReplaySetup) -> None:
    """Raise :class:`ReplayError` (one sentence) when the replay cannot run as asked."""
    length = data.num_tokens if isinstance(data, RoutingTrace) else data.num_profiles
    unit = "tokens" if isinstance(data, RoutingTrace) else "count rows"
    for name, v in (("--window", setup.window), ("--interval", setup.interval)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ReplayError(f"{name} must be a positive whole number of {unit}, got {v}")
    if setup.window >= length:
        raise ReplayError(f"the window ({setup.window} {unit}) must be shorter than the stream ({length} {unit}), "
                          f"so that some traffic follows the first rebalance; use a smaller --window or a longer "
                          f"trace")
    if not (np.isfinite(setup.scale) and setup.scale > 0):
        raise ReplayError(f"--scale must be a positive number, got {setup.scale}")
    if setup.cost.dataflow != "standard":
        raise ReplayError("the replay estimates time under the standard dataflow; leave --dataflow out")
    if getattr(setup.cost, "comm", "nccl") != "nccl" or getattr(setup.cost, "tokens_per_gpu", None) is not None:
        raise ReplayError("the replay estimates time with the nccl communication model and the GEMM rate; use a cost "
                          "model without a DeepEP model or a serving phase")
    E, topo = data.num_experts, setup.topology
    if topo.num_slots < E:
        raise ReplayError(f"{topo.num_slots} slots cannot hold the {E} experts; add GPUs or --redundant slots")
    if setup.expert_groups < 1 or E % setup.expert_groups:
        raise ReplayError(f"--expert-groups ({setup.expert_groups}) must divide the {E} experts")


@dataclass(frozen=True)
class PolicySpec:
    """A policy by name and options (:func:`make_policy`): what a worker process builds for itself."""

    name: str
    options: dict = field(default_factory=dict)


def replay(data: RoutingTrace | LoadProfile, policies: dict[str, Policy | PolicySpec | np.ndarray],
           setup: ReplaySetup, progress: Callable[[str], None] | None = None, executor=None) -> dict:
    """Replay every policy on the same stream (see the module docstring).

    Args:
        policies: name -> a policy (:func:`make_policy`), a :class:`PolicySpec`, or a fixed placement ``[L, S]``
            (installed at start-up, never moved: no migration).
        executor: a :mod:`placement.executor` backend; with one, the policies given as specs or fixed placements
            replay in parallel, one task each (the same rows as one after another; each policy's own time is
            measured in its task).
    Returns:
        ``{"setup": {...}, "policies": {name: {"rebalances": [...], "overall": {...}}}}``.
    """
    check_setup(data, setup)
    stream = _Stream(data)
    topo, W, I = setup.topology, int(setup.window), int(setup.interval)
    E, S = stream.num_experts, topo.num_slots
    starts = list(range(W, stream.length, I))
    out: dict = {"setup": {"window": W, "interval": I, "unit": stream.unit, "length": stream.length,
                           "gpus": topo.num_gpus, "gpus_per_node": topo.gpus_per_node, "slots": S,
                           "redundant": S - E, "expert_groups": setup.expert_groups, "scale": setup.scale,
                           "expert_bytes": setup.cost.expert_bytes, "source": data.source,
                           "rebalances": len(starts)}, "policies": {}}
    initial = _initial(setup, stream)
    from placement.executor import InProcess

    shippable = all(not callable(p) for p in policies.values())
    if executor is not None and not isinstance(executor, InProcess) and shippable and len(policies) > 1:
        if progress is not None:
            progress(f"{len(policies)} policies, {len(starts)} rebalances each, in parallel")
        tasks = list(policies.items())
        results = executor.map(_replay_task, tasks, shared=(data, setup, initial))
        out["policies"] = dict(zip(policies, results))
        return out
    for name, pol in policies.items():
        out["policies"][name] = _replay_one(stream, setup, initial, name, pol, progress)
    return out


def _replay_task(shared, task) -> dict:
    data, setup, initial = shared
    return _replay_one(_Stream(data), setup, initial, *task)


def _replay_one(stream: "_Stream", setup: ReplaySetup, initial: np.ndarray, name: str,
                pol: Policy | PolicySpec | np.ndarray, progress: Callable[[str], None] | None = None) -> dict:
    """One policy's rebalances over the stream: ``{"rebalances": [...], "overall": {...}}``."""
    from placement.online import check_map

    topo, cost, W, I = setup.topology, setup.cost, int(setup.window), int(setup.interval)
    E, L, S = stream.num_experts, stream.num_layers, topo.num_slots
    starts = list(range(W, stream.length, I))
    if isinstance(pol, PolicySpec):
        pol = make_policy(pol.name, setup, **pol.options)
    fixed = not callable(pol)
    cur = np.asarray(pol, dtype=np.int64) if fixed else initial
    if fixed and cur.shape != (L, S):
        raise ReplayError(f"the fixed placement {name} has shape {list(cur.shape)}, but this replay needs "
                          f"[{L}, {S}]; give a plan of this model for these GPUs and slots")
    rows = []
    for k, t in enumerate(starts):
        if progress is not None:
            progress(f"{name}: rebalance {k + 1} of {len(starts)}")
        window, b = stream.counts(t - W, t), min(t + I, stream.length)
        judged = stream.counts(t, b)
        t0 = time.perf_counter()
        new = cur if fixed else np.asarray(pol(window, cur), dtype=np.int64)
        wall = 0.0 if fixed else time.perf_counter() - t0
        reason = check_map(new, L, E, S)
        if reason is not None:
            raise ReplayError(f"policy {name} returned an unusable placement at rebalance {k + 1}: {reason}")
        copies, mig = migration(cur, new, E, topo, cost.expert_bytes)
        imb = imbalance(gpu_load(new, judged, topo))
        rows.append({"rebalance": k + 1, "at": t, "judged": b - t, "load_imbalance": float(imb.mean()),
                     "load_imbalance_max": float(imb.max()),
                     "est_moe_seconds": stream.moe_seconds(new, t, b, judged, topo, cost) * setup.scale,
                     "moved_copies": copies, "moved_bytes": copies * cost.expert_bytes,
                     "migration_seconds": mig, "policy_seconds": wall})
        cur = new
    return {"rebalances": rows, "overall": _overall(rows, L, S, fixed)}


def _overall(rows: list[dict], L: int, S: int, fixed: bool) -> dict:
    n = len(rows)
    moe = sum(r["est_moe_seconds"] for r in rows)
    mig = sum(r["migration_seconds"] for r in rows)
    copies = sum(r["moved_copies"] for r in rows)
    return {"rebalances": n, "fixed": fixed,
            "load_imbalance": float(np.mean([r["load_imbalance"] for r in rows])),
            "load_imbalance_max": float(max(r["load_imbalance_max"] for r in rows)),
            "moved_copies": int(copies), "moved_share": copies / (n * L * S),
            "moved_bytes": float(sum(r["moved_bytes"] for r in rows)),
            "migration_seconds": float(mig), "est_moe_seconds": float(moe), "est_total_seconds": float(moe + mig),
            "policy_seconds_mean": float(np.mean([r["policy_seconds"] for r in rows])),
            "policy_seconds_max": float(max(r["policy_seconds"] for r in rows))}


# presentation ---------------------------------------------------------------------------------------------------

COLUMNS = [("load_imbalance", "imbalance (mean)"), ("load_imbalance_max", "imbalance (worst layer)"),
           ("moved_copies", "copies moved"), ("moved_share", "share of slots moved per rebalance"),
           ("moved_bytes", "bytes moved"), ("migration_seconds", "migration s"), ("est_moe_seconds", "MoE s"),
           ("est_total_seconds", "MoE + migration s"), ("policy_seconds_mean", "policy s (mean)"),
           ("policy_seconds_max", "policy s (max)")]


def summary_rows(result: dict) -> list[tuple[str, dict]]:
    """``[(policy, overall)]`` in the order the policies were replayed."""
    return [(name, p["overall"]) for name, p in result["policies"].items()]


def plot_replay(result: dict, path=None):
    """A figure of the replay over time, one line per policy: next-interval load imbalance (top) and expert
    copies moved so far (bottom). Written as PNG to ``path`` when given; returns the figure (matplotlib is
    imported lazily: the ``plot`` extra). This is also the hook for reports: call it with a replay result."""
    from placement import plots

    fig = plots._figure(8.0, 5.5)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    unit = result["setup"]["unit"]
    for name, p in result["policies"].items():
        rows = p["rebalances"]
        x = [r["at"] for r in rows]
        line, = ax1.plot(x, [r["load_imbalance"] for r in rows], marker=".", label=name)
        ax2.plot(x, np.cumsum([r["moved_copies"] for r in rows]), color=line.get_color(), marker=".", label=name)
    ax1.set_ylabel("next-interval load imbalance\n(max/mean GPU load, mean over layers)")
    ax2.set_ylabel("expert copies moved so far")
    ax2.set_xlabel(f"position in the stream ({unit}) at each rebalance")
    ax1.legend(loc="best", fontsize="small")
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    src = result["setup"].get("source") or "stream"
    fig.suptitle(f"online rebalancing replay: {src}, window {result['setup']['window']}, interval "
                 f"{result['setup']['interval']} {unit}", fontsize="medium")
    if path is not None:
        plots.save(fig, path)
    return fig


def markdown_table(result: dict) -> str:
    """The overall numbers of a replay as a Markdown table, one row per policy (for reports; see
    :func:`plot_replay` for the figure)."""
    head = "| policy | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [head, "| --- |" + " ---: |" * len(COLUMNS)]
    for name, o in summary_rows(result):
        cells = [f"{o[k]:.4g}" if isinstance(o[k], float) else str(o[k]) for k, _ in COLUMNS]
        lines.append(f"| {name}{' (fixed)' if o['fixed'] else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
