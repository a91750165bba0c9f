"""Planning under a GPU memory budget: which experts stay resident on which GPU, the rest in host memory.

SwapMoE (Kong et al., arXiv 2308.15030) keeps a small set of important experts in GPU memory under a tunable
budget. This solver plans that from routing traces, for expert parallelism over G GPUs (G = 1: one GPU):

1. Ownership: every expert gets the GPU that serves it, a load-balanced partition of each layer (longest
   processing time first, at most ``slots_per_gpu`` experts per GPU and layer).
2. Split of each GPU's budget ``B`` (expert slots, all layers together) into ``R`` resident slots and a swap
   buffer of ``C = B - R`` slots (LRU, fetch-on-miss; see :mod:`solvers.memsim`). The split is chosen by
   simulating the miss policy on the fitted routes for a few candidate splits and keeping the one with the
   most hits. An LRU buffer follows each sequence's own hot experts; resident slots pay off for experts that an
   LRU buffer of that size would keep missing.
3. Which experts are resident, and so how the budget splits across layers: each expert's importance is the
   number of misses it causes in an LRU buffer of ``C`` slots on the fitted routes (its frequency when the
   buffer is small, less for bursty experts a buffer would keep anyway), ties broken by frequency. Each GPU
   keeps its ``R`` most important experts over all layers (not a fixed share per layer); when ``R`` allows,
   every layer keeps at least one resident expert. ``R = 0`` (all of the budget a buffer) is a candidate too.

``Problem.budget_slots`` is the total expert slots over all GPUs (resident + swap buffers), split evenly per GPU.
Without ``budget_slots`` the solver places every expert (load-balanced, redundant slots to the heaviest).

Params (``Options.params``): ``swap_slots`` (per GPU; fixes the split), ``swap_shares`` (candidate buffer shares
of the budget, default 0, 0.1, 0.25, 0.5, 0.75, 0.9, 1), ``min_swap_slots`` (default top_k), ``allocation``
("global" = ours, "per-layer" = the same number of most-frequent experts in every layer, the plain baseline),
``importance`` ("lru-misses" default, or "count"), ``search_tokens`` (fit tokens simulated per candidate split,
default 4096), ``batch`` (tokens per step, default 1), ``policy`` ("static", default, or "dynamic": choose the split
for SwapMoE-style re-picking of the resident set every ``dynamic_interval`` tokens (default 64) from the last
``dynamic_window`` tokens (default 256)).
"""

from __future__ import annotations

import time

import numpy as np

from solvers.base import Options, Problem, Result, SolverInputError
from solvers.params import Params
from solvers.memsim import access_stream, simulate, summarize

__all__ = ["ep_owner", "allocate", "phy2log_of", "budget_split", "solve", "SOLVERS"]

DEFAULT_SHARES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
DYNAMIC_INTERVAL = 64  # tokens between re-picks of the dynamic policy (chosen on the fitted half of the bundled trace)
DYNAMIC_WINDOW = 256  # tokens of history a re-pick looks at


def ep_owner(load: np.ndarray, num_gpus: int, cap: int) -> np.ndarray:
    """int ``[L, E]`` GPU serving each expert: per layer, heaviest expert first onto the least-loaded GPU that
    has fewer than ``cap`` experts (Graham's LPT rule). ``load[L, E]``."""
    L, E = load.shape
    G = int(num_gpus)
    if G * cap < E:
        raise SolverInputError(f"{G} GPUs x {cap} slots cannot serve {E} experts per layer")
    owner = np.zeros((L, E), dtype=np.int64)
    if G == 1:
        return owner
    for l in range(L):
        gl = np.zeros(G)
        n = np.zeros(G, dtype=np.int64)
        for e in np.argsort(-load[l], kind="stable"):
            free = np.flatnonzero(n < cap)
            g = free[np.argmin(gl[free])]
            owner[l, e] = g
            gl[g] += load[l, e]
            n[g] += 1
    return owner


def allocate(importance: np.ndarray, owner: np.ndarray, quota: np.ndarray, layer_cap: int,
             allocation: str = "global", min_per_layer: int = 1) -> np.ndarray:
    """bool ``[L, E]`` resident experts: GPU g keeps ``quota[g]`` of the experts it owns.

    ``global``: every layer first gets ``min_per_layer`` resident experts (its most important ones whose GPU
    has quota left), then each GPU fills its quota with its most important remaining experts over all layers.
    ``per-layer``: each GPU gives every layer the same number of slots (``quota // L``, the remainder to the
    layers whose next expert is most important), most important experts first.
    At most ``layer_cap`` resident experts per GPU and layer. ``importance[L, E]``, ``owner[L, E]``, ``quota[G]``.
    """
    L, E = importance.shape
    G = quota.size
    left = quota.astype(np.int64).copy()
    per_gl = np.zeros((G, L), dtype=np.int64)
    res = np.zeros((L, E), dtype=bool)
    order_in_layer = np.argsort(-importance, axis=1, kind="stable")  # [L, E]

    def take(l: int, e: int) -> None:
        g = owner[l, e]
        res[l, e] = True
        left[g] -= 1
        per_gl[g, l] += 1

    def can(l: int, e: int) -> bool:
        g = owner[l, e]
        return not res[l, e] and left[g] > 0 and per_gl[g, l] < layer_cap

    if allocation == "per-layer":
        for g in range(G):
            mine = owner == g
            share, extra = divmod(int(quota[g]), L)
            for l in range(L):
                cand = [e for e in order_in_layer[l] if mine[l, e]]
                for e in cand[:min(share, layer_cap)]:
                    take(l, e)
            # remainder: one more slot in the layers whose next own expert is most important
            nxt = []
            for l in range(L):
                cand = [e for e in order_in_layer[l] if mine[l, e] and not res[l, e]]
                if cand and per_gl[g, l] < layer_cap:
                    nxt.append((-importance[l, cand[0]], l, cand[0]))
            for _, l, e in sorted(nxt)[:max(0, int(left[g]))]:
                take(l, e)
        return res
    if allocation != "global":
        raise SolverInputError(f"allocation must be 'global' or 'per-layer', got {allocation!r}")
    # at least min_per_layer per layer, layers with the most important experts first
    for l in np.argsort(-importance.max(axis=1), kind="stable"):
        got = 0
        for e in order_in_layer[l]:
            if got >= min_per_layer:
                break
            if can(l, e):
                take(l, e)
                got += 1
    for g in range(G):
        if left[g] <= 0:
            continue
        keys = np.flatnonzero((owner == g).ravel() & ~res.ravel())
        keys = keys[np.argsort(-importance.ravel()[keys], kind="stable")]
        for k in keys:
            if left[g] <= 0:
                break
            l, e = divmod(int(k), E)
            if can(l, e):
                take(l, e)
    return res


def phy2log_of(resident: np.ndarray, owner: np.ndarray, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """int ``[L, G * slots_per_gpu]``: each GPU's resident experts (ascending ids) in its slots, -1 elsewhere."""
    L, E = resident.shape
    out = np.full((L, num_gpus * slots_per_gpu), -1, dtype=np.int64)
    for l in range(L):
        for g in range(num_gpus):
            ex = np.flatnonzero(resident[l] & (owner[l] == g))
            out[l, g * slots_per_gpu:g * slots_per_gpu + ex.size] = ex
    return out


def _search_routes(routes: np.ndarray, home: np.ndarray | None, tokens: int, seed: int) -> np.ndarray:
    """Whole sequences drawn at random (seeded, trace order kept) until ``tokens``; blocks of 512 without ids."""
    T = routes.shape[0]
    if T <= tokens:
        return routes
    rng = np.random.default_rng(seed)
    if home is not None:
        seqs = rng.permutation(np.unique(home))
        sizes = np.bincount(home)[seqs]
        n = int(np.searchsorted(np.cumsum(sizes), tokens)) + 1
        return routes[np.isin(home, seqs[:n])]
    blocks = np.arange(0, T, 512)
    pick = np.sort(rng.permutation(blocks)[:max(1, tokens // 512)])
    return routes[np.concatenate([np.arange(b, min(b + 512, T)) for b in pick])]


def _importance(kind: str, stream, owner, num_gpus: int, swap_slots: int, counts: np.ndarray) -> np.ndarray:
    """``[L, E]`` importance; ``counts`` (fit frequency) break ties."""
    tie = counts / max(float(counts.max()), 1.0) * 1e-3
    if kind == "count" or stream is None:
        return counts + tie
    none = np.zeros(owner.shape, dtype=bool)
    misses = simulate(stream, none, owner, num_gpus, swap_slots).misses_per_key(stream)
    return misses + tie


def budget_split(problem: Problem) -> tuple[int, int]:
    """``(slots per GPU, minimum resident slots per GPU)`` of a budget problem; raises if infeasible."""
    G = problem.topology.num_gpus
    L, E = problem.load.shape
    per_gpu = int(problem.budget_slots) // G
    min_res = -(-L // G)
    if per_gpu < min_res:
        raise SolverInputError(
            f"a memory budget of {problem.budget_slots} expert slots over {G} GPU(s) is smaller than one expert per "
            f"MoE layer ({L} layers need at least {min_res} slot(s) per GPU); raise --memory-budget")
    return per_gpu, min_res


def solve(problem: Problem, options: Options) -> Result:
    """Memory-budget plan (see the module docstring); ``phy2log`` holds -1 in slots left empty."""
    t0 = time.perf_counter()
    p = Params(options.params, "budget", {"swap_slots", "swap_shares", "min_swap_slots", "allocation", "importance",
                                          "search_tokens", "batch", "policy", "dynamic_interval", "dynamic_window"})
    topo = problem.topology
    G, spg = topo.num_gpus, topo.slots_per_gpu
    L, E = problem.load.shape
    load = problem.load
    owner = ep_owner(load, G, spg)
    if problem.budget_slots is None:
        return _full_placement(problem, owner, t0)
    per_gpu, min_res = budget_split(problem)
    owned = np.bincount(owner.ravel(), minlength=G)
    allocation = p.choice("allocation", "global", ("global", "per-layer"))
    importance_kind = p.choice("importance", "lru-misses", ("lru-misses", "count"))
    batch = p.integer("batch", 1, lo=1)
    policy = p.choice("policy", "static", ("static", "dynamic"))
    interval = p.integer("dynamic_interval", DYNAMIC_INTERVAL, lo=1)
    window = p.integer("dynamic_window", DYNAMIC_WINDOW, lo=1)
    dyn = (max(1, interval // batch), max(1, window // batch)) if policy == "dynamic" else None
    policy_rec = {"miss": "fetch-on-miss", "buffer": "lru", "batch": batch, "kind": policy,
                  "dynamic": {"interval_tokens": interval, "window_tokens": window}}
    k = int(problem.top_k)
    min_swap = p.integer("min_swap_slots", k, lo=0)
    max_swap = per_gpu
    if (per_gpu >= owned).all():  # every expert fits: nothing to swap
        resident = np.ones((L, E), dtype=bool)
        return _result(problem, resident, owner, per_gpu, 0, [], allocation, "all-resident", None, policy_rec, t0)
    if "swap_slots" in p:
        cands = [p.integer("swap_slots", 0)]
        if not 0 <= cands[0] <= max_swap:
            raise SolverInputError(f"swap_slots must be between 0 and the budget ({max_swap} slots per GPU), "
                                   f"got {cands[0]}")
    else:
        shares = p.numbers("swap_shares", DEFAULT_SHARES, lo=0.0, hi=1.0)
        lo = min(min_swap, max_swap)
        cands = sorted({int(min(max(round(s * per_gpu), lo), max_swap)) for s in shares})
    # a GPU cannot keep more resident experts than it owns; any slots beyond go to its buffer
    stream_full = None
    if problem.routes is not None:
        stream_full = access_stream(problem.routes, E, batch)
    counts = load if stream_full is None else stream_full.counts().astype(np.float64)
    search = []
    best = None
    if stream_full is not None and len(cands) > 1:
        sub = _search_routes(problem.routes, problem.home, p.integer("search_tokens", 4096, lo=1), options.seed)
        stream = access_stream(sub, E, batch)
        for c in cands:
            quota = np.minimum(per_gpu - c, owned)
            imp = _importance(importance_kind, stream, owner, G, c, counts)
            res = allocate(imp, owner, quota, spg, allocation)
            sim = simulate(stream, res, owner, G, c, dynamic=dyn if res.any() else None, dynamic_prior=counts)
            s = summarize(stream, sim, G, 1.0, 1.0)
            search.append({"swap_slots_per_gpu": c, "resident_slots_per_gpu": int(quota.max()),
                           "fit_hit_rate": s["hit_rate"]})
            options.say(f"swap buffer {c} slots/GPU: fit hit rate {s['hit_rate']:.4f}")
            if best is None or s["hit_rate"] > best[1] + 1e-12:
                best = (c, s["hit_rate"])
        swap = best[0]
    else:
        swap = cands[0] if len(cands) == 1 else min(min_swap, max_swap)
    quota = np.minimum(per_gpu - swap, owned)
    imp = _importance(importance_kind, stream_full, owner, G, swap, counts)
    resident = allocate(imp, owner, quota, spg, allocation)
    fit = None
    if stream_full is not None:
        sim = simulate(stream_full, resident, owner, G, swap, dynamic=dyn if resident.any() else None,
                       dynamic_prior=counts)
        fit = summarize(stream_full, sim, G, 1.0, 1.0)["hit_rate"]
    return _result(problem, resident, owner, per_gpu, swap, search, allocation, importance_kind, fit, policy_rec, t0)


def _result(problem, resident, owner, per_gpu, swap, search, allocation, importance, fit_hit, policy, t0) -> Result:
    topo = problem.topology
    G = topo.num_gpus
    L, E = resident.shape
    phy = phy2log_of(resident, owner, G, topo.slots_per_gpu)
    per_gpu_res = np.bincount(owner[resident], minlength=G)
    memory = {
        "budget_slots": int(problem.budget_slots), "budget_slots_per_gpu": int(per_gpu),
        "swap_slots_per_gpu": int(swap), "resident_slots_per_gpu": [int(x) for x in per_gpu_res],
        "resident_experts": int(resident.sum()), "resident_per_layer": [int(x) for x in resident.sum(axis=1)],
        "resident": [[int(e) for e in np.flatnonzero(resident[l])] for l in range(L)],
        "host": [[int(e) for e in np.flatnonzero(~resident[l])] for l in range(L)],
        "owner": owner.tolist(),
        "policy": policy,
        "allocation": allocation, "importance": importance, "split_search": search,
    }
    miss = None if fit_hit is None else 1.0 - fit_hit
    return Result(phy, solver="budget", status="heuristic", objective=miss, bound=None, gap=None,
                  seconds=time.perf_counter() - t0,
                  objective_name=f"fit miss rate ({policy['kind']} resident set, fetch-on-miss into an LRU buffer)",
                  stats={"memory": memory, "fit_hit_rate": fit_hit})


def _full_placement(problem: Problem, owner: np.ndarray, t0: float) -> Result:
    """No budget: every expert once on its LPT owner, redundant slots to the heaviest load per replica."""
    topo = problem.topology
    G, spg = topo.num_gpus, topo.slots_per_gpu
    L, E = problem.load.shape
    phy = np.full((L, G * spg), -1, dtype=np.int64)
    for l in range(L):
        reps = np.ones(E)
        slots = [list(np.flatnonzero(owner[l] == g)) for g in range(G)]
        for g in range(G):
            while len(slots[g]) < spg:
                per = problem.load[l] / (reps + 1)
                per[slots[g]] = -1.0
                e = int(np.argmax(per))
                slots[g].append(e)
                reps[e] += 1
            phy[l, g * spg:(g + 1) * spg] = sorted(slots[g])
    return Result(phy, solver="budget", status="heuristic", seconds=time.perf_counter() - t0,
                  stats={"note": "no memory budget given: every expert placed (load-balanced)"})


SOLVERS = {"budget": solve}
