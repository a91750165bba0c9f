"""Turn traces or count profiles into a :class:`solvers.Problem` (the only bridge from data to solvers)."""

from __future__ import annotations

import numpy as np

from placement.affinity import AffinityStats
from placement.plan import Plan, PlanError
from solvers import Problem, Topology
from traces import LoadProfile, RoutingTrace
from traces.format import layer_counts


def build_problem(data: RoutingTrace | LoadProfile | list[RoutingTrace | LoadProfile], topology: Topology,
                  expert_groups: int = 1, current: Plan | None = None, budget_slots: int | None = None,
                  stats: AffinityStats | None = None, with_routes: bool = True, resamples: int = 1,
                  seed: int = 0) -> Problem:
    """Problem for ``topology`` from one trace/profile or several (kept apart as workload profiles).

    ``resamples`` K > 1 with one token trace: the loads of K bootstrap resamples of its sequences
    (:meth:`traces.RoutingTrace.bootstrap_weights`, ``seed``) become the workload profiles, so that the joint planner
    (the only solver that reads profiles) minimises the expected time over K samples of the workload as large as the
    one it was given, rather than the time of that one sample: plans that balance only the fitted sample's noise
    lose. ``load`` stays the whole trace's.

    Token traces give load, k x k transitions, top-1 transitions (with gate weights), co-activation, routes
    (highest gate first) and home sequence indices; count profiles give load (mean over profiles) and the
    profiles ``[N, L, E]``.
    """
    items = data if isinstance(data, list) else [data]
    traces_ = [d for d in items if isinstance(d, RoutingTrace)]
    profiles = [d.load_profile().logical_count for d in items]
    prof = np.concatenate(profiles) if profiles else None
    load = prof.mean(axis=0) if len(items) > 1 else prof.sum(axis=0)
    kwargs: dict = {}
    if traces_ and len(traces_) == len(items):
        trace = RoutingTrace.concat(traces_) if len(traces_) > 1 else traces_[0]
        st = stats or AffinityStats.from_trace(trace, baselines=False)
        kwargs.update(transitions=st.transitions, transitions_top1=st.transitions_top1, coactivation=st.coactivation,
                      top_k=trace.top_k, num_tokens=trace.num_tokens)
        if with_routes:
            kwargs.update(routes=trace.sorted_by_gate().expert_ids, home=trace.sequence_index())
        load = st.load if len(items) == 1 else load
    if prof is not None and prof.shape[0] > 1:
        kwargs["profiles"] = prof
    elif resamples > 1 and len(traces_) == 1 and len(items) == 1:
        trace = traces_[0]
        kwargs["profiles"] = layer_counts(trace.expert_ids, trace.num_experts,
                                          trace.bootstrap_weights(resamples, seed))
    cur = None
    if current is not None:
        ct = current.topology
        if (ct.num_slots != topology.num_slots or ct.num_gpus != topology.num_gpus
                or current.num_layers != load.shape[0]):
            raise PlanError(f"the current plan ({current.num_layers} layers x {ct.num_slots} slots on {ct.num_gpus} "
                            f"GPUs) does not match this request ({load.shape[0]} layers x {topology.num_slots} slots "
                            f"on {topology.num_gpus} GPUs); migration cost needs the same layers, GPUs and slots")
        cur = current.phy2log
    return Problem(load=load, topology=topology, expert_groups=expert_groups, current=cur, budget_slots=budget_slots,
                   **kwargs)
