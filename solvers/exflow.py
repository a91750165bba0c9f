"""ExFlow's integer program: place experts so that tokens stay on their GPU between consecutive MoE layers.

Reference: Yao et al., "Exploiting Inter-Layer Expert Affinity for Accelerating Mixture-of-Experts Model
Inference", IPDPS 2024, arXiv 2401.08383 (code: YJHMITWEB/ExFlow, ``solve_affinity.py``). With context-coherent
expert parallelism a token that moves from an expert at layer l to an expert at layer l+1 on the same GPU costs
no communication, so the program minimises the share of consecutive-layer transitions that change GPU, subject
only to every GPU holding the same number of experts of each layer.

The model (one "item" per expert and layer; x[i, p] = 1 puts item i in part p)::

    min   sum_k w_k cost_k / sum_k w_k
    s.t.  sum_p x[i, p] = 1                                  every item in one part
          m_p lo <= sum_{i in layer l} x[i, p] <= m_p hi     equal expert counts per GPU and layer
          cost_k >= x[a_k, p] - x[b_k, p]                    for every part p: cost_k = 1 when the pair
          cost_k >= x[b_k, p] - x[a_k, p]                    (a_k at layer l, b_k at l+1) is split

``m_p`` is the number of GPUs in part p, ``lo = floor(E / G)``, ``hi = ceil(E / G)`` (both E/G when G divides E,
the paper's constraint). Two forms of the pairs k:

- ``form="token"`` (the paper): one binary ``cost`` per token and layer boundary, weight 1, from ``Problem.routes``
  (top-1 by default, as in the paper: the highest-gate expert; ``top1=False`` uses all k x k pairs). Tokens are
  added in batches (``batch_tokens``, 5,000 in the paper), each solve warm-started from the previous one.
- ``form="aggregated"`` (default, for larger traces): identical pairs merged into one ``cost`` with their count
  as weight, from ``Problem.transitions`` (all k x k pairs, ExFlow generalised from top-1 to top-k) or
  ``Problem.transitions_top1`` (``top1=True``). With the same pairs it has exactly the token form's optimum.

Scaling trick from the ExFlow repository (``bipartition=True``, default): recursive bipartition, nodes first
(halves of the node set), then GPUs inside a node; a part of odd size is split into its nodes or GPUs at once.
``bipartition=False`` solves the G-way program in one go. A sub-problem only counts pairs whose two experts are
both inside it. Every solve starts from a hint (a layer-by-layer assignment heuristic: each layer placed by an
optimal linear assignment against its neighbours, a few sweeps), our addition for open solvers; ``hint=False``
turns it off for the first solve.

Objective and bound: the share of adjacent-layer pairs whose experts sit on different GPUs (fit data, the chosen
pairs), before replicas. The bound is the larger of two valid bounds on the whole G-way program: the top-level
solve's bound over all pairs (any plan's cross-GPU pairs include the pairs crossing its top-level split), and a
counting bound (an expert's GPU holds at most ``ceil(E / G)`` experts of the next layer, so at most that many of
its heaviest pairs to that layer can be local). The LP relaxation of this program is weak, so expect the
counting bound to be the one that holds.

Redundant slots: ExFlow places each expert once. Slots left over (``S > E``, or uneven counts when G does not
divide E) get replicas by EPLB's rule (the expert with the largest load per replica), each on the GPU with a free
slot where it keeps the most pairs local; ``stats["objective_with_replicas"]`` gives the share after that.

Params (``Options.params``): ``form`` ("aggregated" | "token"), ``top1`` (bool; default True for the token form,
False for the aggregated form), ``bipartition`` (True), ``batch_tokens`` (5000), ``hint`` (True).
"""

from __future__ import annotations

import numpy as np

from solvers import mip
from solvers._common import assign_with_capacity, fill_redundant
from solvers.base import Options, Problem, Result, SolverInputError, Topology, gap_of
from solvers.params import Params

_FORMS = ("aggregated", "token")


def _pairs(problem: Problem, form: str, top1: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The pairs of the program: items a ``[K]`` (layer l), b ``[K]`` (layer l+1), weights ``[K]`` (float) and, for
    the token form, the token index ``[K]`` of each pair (pairs come token by token)."""
    L, E = problem.num_layers, problem.num_experts
    if form == "token":
        if problem.routes is None:
            raise SolverInputError("ExFlow's token form needs per-token routes; plan from a routing trace "
                                   "(not a counts-only profile) or use form=aggregated")
        r = np.asarray(problem.routes, dtype=np.int64)
        r = r[:, :, :1] if top1 else r
        T, _, k = r.shape
        item = np.where(r >= 0, r + (np.arange(L) * E)[None, :, None], -1)  # [T, L, k]
        a = np.broadcast_to(item[:, :-1, :, None], (T, L - 1, k, k))
        b = np.broadcast_to(item[:, 1:, None, :], (T, L - 1, k, k))
        tok = np.broadcast_to(np.arange(T)[:, None, None, None], (T, L - 1, k, k))
        ok = (a >= 0) & (b >= 0)
        return a[ok], b[ok], np.ones(int(ok.sum())), tok[ok]
    trans = problem.transitions_top1 if top1 else problem.transitions
    if trans is None:
        other = problem.transitions if top1 else problem.transitions_top1
        if other is not None:
            what = "top-1 transition counts (a trace with gate weights)" if top1 else "k x k transition counts"
            raise SolverInputError(f"ExFlow with top1={str(top1).lower()} needs {what}; "
                                   f"set top1={str(not top1).lower()}")
        raise SolverInputError("ExFlow needs adjacent-layer transitions, which count data does not have; "
                               "plan from a token routing trace")
    l, i, j = np.nonzero(trans)
    return l * E + i, (l + 1) * E + j, trans[l, i, j].astype(np.float64), None


def _split(gpus: list[int], topo: Topology, bipartition: bool) -> list[list[int]]:
    """Children of a GPU range: its nodes (or GPUs inside one node), halved when ``bipartition`` and even."""
    if not bipartition:
        return [[g] for g in gpus]
    nodes = sorted({g // topo.gpus_per_node for g in gpus})
    if len(nodes) > 1:
        units = [[g for g in gpus if g // topo.gpus_per_node == n] for n in nodes]
    else:
        units = [[g] for g in gpus]
    if len(units) % 2 == 0 and len(units) > 2:
        h = len(units) // 2
        return [sum(units[:h], []), sum(units[h:], [])]
    return units


def _tree(gpus: list[int], topo: Topology, bipartition: bool) -> list[list[int]]:
    """All GPU ranges that get split, parents before children."""
    if len(gpus) == 1:
        return []
    out = [gpus]
    for child in _split(gpus, topo, bipartition):
        out += _tree(child, topo, bipartition)
    return out


def _targets(n: int, m: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Exact per-part counts for the hint: ``m_p lo`` each, the rest one by one while below ``m_p hi``."""
    t = m * lo
    p = 0
    while t.sum() < n:
        if t[p] < m[p] * hi:
            t[p] += 1
        p = (p + 1) % len(m)
    return t


def _chain_hint(items: np.ndarray, E: int, m: np.ndarray, lo: int, hi: int, la: np.ndarray, lb: np.ndarray,
                w: np.ndarray, sweeps: int = 3) -> np.ndarray:
    """Heuristic part of each item: layers placed one at a time by an optimal assignment against the neighbours.

    Args:
        items: ``[n]`` global item ids (sorted); la, lb: ``[K]`` local indices of the pairs; w: ``[K]`` weights.
    Returns:
        ``[n]`` part of each item.
    """
    n, P = len(items), len(m)
    layer = items // E
    layers = np.unique(layer)
    groups = [np.flatnonzero(layer == l) for l in layers]
    # both ends of every pair, grouped by the layer of the first: (item in the layer, its partner, weight)
    mine, other, weight = np.concatenate([lb, la]), np.concatenate([la, lb]), np.concatenate([w, w])
    order = np.argsort(layer[mine], kind="stable")
    mine, other, weight = mine[order], other[order], weight[order]
    starts = np.searchsorted(layer[mine], layers, side="left")
    stops = np.searchsorted(layer[mine], layers, side="right")
    pos = np.full(n, -1)
    part = np.full(n, -1)

    def profit(k: int) -> np.ndarray:  # [items of layer k, P] pair weight to the placed items of each part
        idx = groups[k]
        pos[idx] = np.arange(len(idx))
        sl = slice(starts[k], stops[k])
        placed = part[other[sl]] >= 0
        out = np.zeros((len(idx), P))
        np.add.at(out, (pos[mine[sl]][placed], part[other[sl]][placed]), weight[sl][placed])
        return out

    for k, idx in enumerate(groups):
        cap = _targets(len(idx), m, lo, hi)
        part[idx] = np.repeat(np.arange(P), cap) if k == 0 else assign_with_capacity(profit(k), cap)
    for s in range(sweeps):
        for k in (range(len(groups)) if s % 2 == 0 else reversed(range(len(groups)))):
            part[groups[k]] = assign_with_capacity(profit(k), _targets(len(groups[k]), m, lo, hi))
    return part


def _solve_split(items: np.ndarray, E: int, m: np.ndarray, lo: int, hi: int, la: np.ndarray, lb: np.ndarray,
                 w_int: np.ndarray, hint: np.ndarray | None, options: Options, deadline: mip.Deadline,
                 solves_left: int):
    """One ExFlow program over ``items`` and P parts: returns (part ``[n]``, mip.Solution)."""
    n, P = len(items), len(m)
    model = mip.Model()
    x = model.new_vars((n, P))
    model.add_rows(x, 1, lo=1, hi=1)
    layer = items // E
    for l in np.unique(layer):
        idx = np.flatnonzero(layer == l)
        for p in range(P):
            model.add(x[idx, p], 1, lo=int(m[p] * lo), hi=int(m[p] * hi))
    cost = model.new_vars(len(la))
    for p in range(P if P > 2 else 1):  # with two parts the p = 1 rows repeat the p = 0 rows
        model.add_rows(np.stack([cost, x[la, p], x[lb, p]], axis=1), [1, -1, 1], lo=0)
        model.add_rows(np.stack([cost, x[lb, p], x[la, p]], axis=1), [1, -1, 1], lo=0)
    model.add([x[0, 0]], [1], lo=1, hi=1)  # parts are interchangeable: the first item goes to part 0
    model.minimize(cost, w_int)
    if hint is not None:
        hint = _relabel(hint, P)
        model.set_hint(x, (hint[:, None] == np.arange(P)[None, :]).astype(np.int64))
        model.set_hint(cost, (hint[la] != hint[lb]).astype(np.int64))
    sol = mip.solve(model, options.backend, time_limit=deadline.share(solves_left), seed=options.seed,
                    threads=options.threads)
    if sol.values is None:
        return (_relabel(hint, P) if hint is not None else None), sol
    part = sol.values[x].argmax(axis=1)
    return part, sol


_SECONDS_PER_ROW = 2.5e-5  # building and loading one model row, measured on a 2-core machine with CP-SAT


def _affordable(deadline: mip.Deadline, rows: int, solves_left: int, subproblems_left: int, last: bool) -> bool:
    """Whether a solve whose model has ``rows`` rows fits its share of the time left (overheads included)."""
    left = deadline.left()
    if left is None:
        return True
    share = left / max(1, subproblems_left) if last else left / max(1, solves_left)
    return _SECONDS_PER_ROW * rows <= share


def _relabel(part: np.ndarray, P: int) -> np.ndarray:
    """Swap part labels so that item 0 is in part 0 (parts are interchangeable)."""
    p0 = int(part[0])
    if p0 == 0:
        return part
    out = part.copy()
    out[part == 0], out[part == p0] = p0, 0
    return out


def exflow(problem: Problem, options: Options) -> Result:
    """ExFlow's integer program (arXiv 2401.08383) on open solvers; see the module docstring."""
    p = Params(options.params, "exflow", {"form", "top1", "bipartition", "batch_tokens", "hint"})
    form = p.choice("form", "aggregated", tuple(_FORMS))
    top1 = p.flag("top1", form == "token")
    bipartition = p.flag("bipartition", True)
    batch = p.integer("batch_tokens", 5000, lo=1)
    use_hint = p.flag("hint", True)
    if problem.budget_slots is not None:
        raise SolverInputError("ExFlow keeps every expert resident; plan without --memory-budget")
    topo = problem.topology
    L, E, G = problem.num_layers, problem.num_experts, topo.num_gpus
    lo, hi = E // G, min(-(-E // G), topo.slots_per_gpu)
    if L < 2:
        raise SolverInputError("ExFlow needs at least two MoE layers (it places consecutive-layer transitions)")

    pa, pb, w, tok = _pairs(problem, form, top1)
    total = float(w.sum())
    w_int, scale = mip.integerize(w)
    slack = float(np.abs(w - w_int / scale).sum())  # bound correction for rounded weights
    tree = _tree(list(range(G)), topo, bipartition)
    T = int(tok.max()) + 1 if tok is not None and len(tok) else 0
    steps = list(range(batch, T, batch)) + [T] if form == "token" else [None]
    deadline = mip.Deadline(None if options.time_limit is None else 0.95 * options.time_limit)  # 5% to wrap up
    solves_left = len(tree) * len(steps)

    gpu_of = np.zeros(L * E, dtype=np.int64)  # GPU range of each item (its first GPU), refined level by level
    subproblems, top_bound = [], 0.0
    for depth, gpus in enumerate(tree):
        children = _split(gpus, topo, bipartition)
        m = np.array([len(c) for c in children])
        items = np.flatnonzero(gpu_of == gpus[0])
        if len(items) == 0:  # fewer experts than GPUs: nothing to split here
            solves_left -= len(steps)
            continue
        member = np.full(L * E, -1)
        member[items] = np.arange(len(items))
        inside = (member[pa] >= 0) & (member[pb] >= 0)
        la_all, lb_all = member[pa[inside]], member[pb[inside]]
        hint = _chain_hint(items, E, m, lo, hi, la_all, lb_all, w[inside]) if use_hint or depth > 0 else None
        record = {"gpus": [int(g) for g in gpus], "parts": len(children), "items": int(len(items)), "solves": []}
        if hint is not None:
            record["hint_objective"] = float(w_int[inside][hint[la_all] != hint[lb_all]].sum())
        part, sol = hint, None
        for s, upto in enumerate(steps):
            sel = inside if upto is None else inside & (tok < upto)
            last = s == len(steps) - 1
            rows = int(sel.sum()) * 2 * (len(m) if len(m) > 2 else 1)
            if part is not None and not _affordable(deadline, rows, solves_left, len(tree) - depth, last):
                solves_left -= 1
                record["solves"].append({"tokens": upto, "pairs": int(sel.sum()), "status": "skipped (time)"})
                continue
            la, lb = member[pa[sel]], member[pb[sel]]
            options.say(f"splitting GPUs {gpus[0]}-{gpus[-1]} into {len(m)} ({int(sel.sum())} pairs)")
            part, sol = _solve_split(items, E, m, lo, hi, la, lb, w_int[sel], part, options, deadline, solves_left)
            solves_left -= 1
            record["solves"].append({"tokens": upto, "pairs": int(sel.sum()), "status": sol.status,
                                     "objective": sol.objective, "bound": sol.bound, "seconds": round(sol.seconds, 3)})
            if part is None:
                raise SolverInputError("ExFlow found no placement within the time limit; raise --time-limit")
        all_pairs = record["solves"][-1]["status"] != "skipped (time)"  # the last solve saw every pair
        if depth == 0 and all_pairs and sol is not None and sol.bound is not None:
            top_bound = max(0.0, sol.bound / scale - slack)
        for p, child in enumerate(children):
            gpu_of[items[part == p]] = child[0]
        subproblems.append(record)

    gpu_of = gpu_of.reshape(L, E)
    flat = gpu_of.ravel()
    objective = float(w[flat[pa] != flat[pb]].sum() / total) if total > 0 else 0.0
    bound = min(objective, max(top_bound, _pair_bound(pa, pb, w, L, E, hi)) / total) if total > 0 else 0.0
    phy2log = fill_redundant(gpu_of, problem.load, topo, problem.transitions_top1 if top1 and form == "aggregated"
                             else problem.transitions)
    stats = {"form": form, "top1": top1, "bipartition": bipartition, "pairs": int(len(w)), "subproblems": subproblems,
             "objective_with_replicas": _cross_share(phy2log, pa, pb, w, E, topo)}
    gap = gap_of(objective, bound)
    return Result(phy2log=phy2log, solver="exflow", status="optimal" if gap == 0.0 else "feasible",
                  objective=objective, bound=bound, gap=gap, backend=options.backend,
                  objective_name="share of adjacent-layer expert pairs on different GPUs (fit data, before replicas)",
                  stats=stats)


def _pair_bound(pa: np.ndarray, pb: np.ndarray, w: np.ndarray, L: int, E: int, hi: int) -> float:
    """Pair mass that must cross GPUs in any plan: the GPU of an expert holds at most ``hi`` experts of the next
    layer, so at most its ``hi`` heaviest pairs to that layer are local (likewise for the previous layer)."""
    T = np.zeros((L - 1, E, E))
    np.add.at(T, (pa // E, pa % E, pb % E), w)
    row = np.sort(T, axis=2)[:, :, -hi:].sum()
    col = np.sort(T, axis=1)[:, -hi:, :].sum()
    return float(max(0.0, T.sum() - min(row, col)))


def _cross_share(phy2log: np.ndarray, pa: np.ndarray, pb: np.ndarray, w: np.ndarray, E: int, topo: Topology) -> float:
    """Share of the pairs whose experts have no GPU in common (replicas count)."""
    L = phy2log.shape[0]
    mask = np.zeros((L * E, topo.num_gpus), dtype=bool)
    lay = np.repeat(np.arange(L), phy2log.shape[1])
    mask[lay * E + phy2log.ravel(), np.tile(topo.gpu_of_slot(), L)] = True
    local = (mask[pa] & mask[pb]).any(axis=1)
    total = float(w.sum())
    return float(w[~local].sum() / total) if total > 0 else 0.0


SOLVERS = {"exflow": exflow}
