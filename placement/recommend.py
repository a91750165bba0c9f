"""Which plan to recommend, and how sure that is.

The recommended plan is the one with the lowest estimated MoE time on the evaluation tokens (held-out sequences
where the caller split them). How sure: its margin over the next best plan, set against the spread of that margin
over bootstrap resamples of the evaluation sequences (Efron and Tibshirani, "An Introduction to the Bootstrap",
1993: resampling whole sequences keeps the routing of a request together). The margin is called larger than the
spread when the recommended plan is also the faster of the two in at least :data:`CONFIDENCE` of the resamples.

The estimate is additive over sequences (expert loads and dispatched token copies are sums over tokens), so each
sequence's contribution is computed once per plan with the evaluator's own functions and a resample is a weighted
sum: hundreds of resamples cost less than one evaluation, under any communication model (:mod:`solvers.comm`).
Counts-only data is ranked by load imbalance, without a spread; the coherent dataflow, the decode roofline
(``tokens_per_gpu``) and memory-budget plans get no spread either (their estimate is not additive here).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from placement.evaluate import EvalData, prepare, token_traffic
from placement.plan import Plan
from solvers.cost import CostModel, layer_seconds, link_layer_seconds
from solvers.objective import gpu_load
from traces import layer_counts

RESAMPLES = 200
CONFIDENCE = 0.95
_MAX_UNIT_FLOATS = 1e7  # bounds each of the per-unit parts [units, L, G, G] (two of them: about 160 MB)


def sequence_units(ev: EvalData, num_layers: int, num_gpus: int) -> list[np.ndarray]:
    """Token indices of the resampling units: one per evaluation sequence, or contiguous groups of sequences when
    there are so many that their parts ``[units, L, G, G]`` would not stay small."""
    seq = ev.sequence_index
    order = np.argsort(seq, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(seq[order]) != 0])
    per_seq = np.split(order, starts[1:])
    cap = max(8, int(_MAX_UNIT_FLOATS // max(1, num_layers * num_gpus * num_gpus)))
    if len(per_seq) <= cap:
        return per_seq
    groups = np.array_split(np.arange(len(per_seq)), cap)
    return [np.concatenate([per_seq[i] for i in g]) for g in groups]


def unit_parts(plan: Plan, ev: EvalData, units: list[np.ndarray], cost: CostModel) -> tuple[np.ndarray, ...]:
    """Per unit: GPU loads ``[U, L, G]`` and dispatch messages over NVLink and RDMA ``[U, L, G, G]`` (home ->
    expert GPU, under ``cost.comm``), as :func:`placement.evaluate.evaluate` computes them for the whole trace (their
    sums over units are its values)."""
    topo = plan.topology
    loads, nvlink, rdma = [], [], []
    for idx in units:
        ids = ev.expert_ids[idx]
        loads.append(gpu_load(plan.phy2log, layer_counts(ids, ev.num_experts), topo))
        tr = token_traffic(plan.phy2log, plan.num_experts, topo, ids, ev.sequence_index[idx], comm=cost.comm,
                           ll_nvlink=cost.ll_nvlink)
        nvlink.append(tr["nvlink"])
        rdma.append(tr["rdma"])
    return np.stack(loads), np.stack(nvlink), np.stack(rdma)


def resampled_times(plan: Plan, ev: EvalData, cost: CostModel, weights: np.ndarray,
                    units: list[np.ndarray]) -> np.ndarray:
    """Estimated MoE time (microseconds per token) of ``plan`` on each resample: ``weights [R, U]`` counts how often
    each unit is drawn (a row of ones is the evaluation data itself)."""
    loads, nvlink, rdma = unit_parts(plan, ev, units, cost)
    tokens = np.array([len(u) for u in units], dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    U, L, G = loads.shape

    def drawn(a: np.ndarray) -> np.ndarray:
        return (w @ a.reshape(U, -1)).reshape((-1,) + a.shape[1:])

    if cost.comm == "nccl":
        secs = layer_seconds(drawn(loads), drawn(nvlink + rdma) * cost.token_bytes, plan.topology, cost)
    else:
        secs = link_layer_seconds(drawn(loads), drawn(nvlink), drawn(rdma), plan.topology, cost)[0]
    return secs.sum(axis=-1) / (w @ tokens) * 1e6


def recommend(plans: Mapping[str, Plan], data, overall: Mapping[str, dict], cost: CostModel | None = None,
              resamples: int = RESAMPLES, seed: int = 0, what: str = "evaluation") -> dict | None:
    """The plan to recommend among ``plans`` and the one-line reason.

    Args:
        plans: ``{name: plan}``; overall: ``{name: evaluate(plan, data, cost)["overall"]}``.
        data: the evaluation trace, counts or :class:`EvalData`.
        what: how the sentence names the data ("held-out", "evaluation").
    Returns:
        None for fewer than two plans, else ``{"best", "runner_up", "metric", "value", "runner_up_value",
        "margin" (relative), "wins", "resamples", "margin_low", "margin_high" (middle 90% of the relative margin
        over resamples; None without resampling), "clear" (bool or None), "sentence"}``.
    """
    names = [n for n in plans if n in overall]
    if len(names) < 2:
        return None
    metric = "est_moe_us_per_token"
    if any(overall[n].get(metric) is None for n in names):
        metric = "load_imbalance"
    ranked = sorted(names, key=lambda n: overall[n][metric])  # stable: ties keep the given order
    best, second = ranked[:2]
    v1, v2 = float(overall[best][metric]), float(overall[second][metric])
    margin = (v2 - v1) / v2 if v2 else 0.0
    rec = {"best": best, "runner_up": second, "metric": metric, "value": v1, "runner_up_value": v2,
           "margin": margin, "wins": None, "resamples": 0, "margin_low": None, "margin_high": None, "clear": None}
    ev = prepare(data)
    cost = cost or CostModel()
    resamplable = (metric == "est_moe_us_per_token" and ev.expert_ids is not None and cost.dataflow == "standard"
                   and cost.tokens_per_gpu is None and plans[best].memory is None and plans[second].memory is None)
    if resamplable:
        units = sequence_units(ev, plans[best].num_layers, max(plans[best].topology.num_gpus,
                                                                plans[second].topology.num_gpus))
        if len(units) >= 2:
            rng = np.random.default_rng(seed)
            draws = rng.integers(0, len(units), size=(resamples, len(units)))
            weights = np.stack([np.bincount(d, minlength=len(units)) for d in draws])
            t1 = resampled_times(plans[best], ev, cost, weights, units)
            t2 = resampled_times(plans[second], ev, cost, weights, units)
            rel = (t2 - t1) / t2
            lo, hi = np.quantile(rel, [0.05, 0.95])
            wins = int((t1 < t2).sum())
            rec.update(wins=wins, resamples=resamples, margin_low=float(lo), margin_high=float(hi),
                       clear=bool(wins >= CONFIDENCE * resamples and margin > 0), units=len(units))
    rec["sentence"] = _sentence(rec, what)
    return rec


def _sentence(r: dict, what: str) -> str:
    time = r["metric"] == "est_moe_us_per_token"
    unit = " us/token" if time else ""
    how = "estimated MoE time" if time else "load imbalance"
    head = (f"recommended: {r['best']}, the lowest {how} on the {what} tokens ({r['value']:.4g}{unit}); ")
    if r["margin"] <= 0:
        head += f"it ties with {r['runner_up']} ({r['runner_up_value']:.4g}{unit})"
    else:
        head += (f"{100 * r['margin']:.1f}% below the next best, {r['runner_up']} ({r['runner_up_value']:.4g}"
                 f"{unit})")
    if r["clear"] is None:
        why = ("counts only, so no resampling" if not time else "no resampling for this dataflow or plan kind")
        return head + f"; the spread between resamples is not known ({why})."
    spread = (f"{r['wins']} of {r['resamples']} bootstrap resamples of the {what} sequences; margin "
              f"{100 * r['margin_low']:+.1f}% to {100 * r['margin_high']:+.1f}% in the middle 90%")
    if r["clear"]:
        return head + f"; it is faster in {spread}: the margin is larger than the spread between resamples."
    return (head + f"; it is faster in only {spread}: the margin is within the spread between resamples, so the two "
            f"are a tie on this data.")
