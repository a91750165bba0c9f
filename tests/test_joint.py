"""The joint planner, its cost model and bound, the coherent evaluator and the calibrated trace generator.

Properties, not copied numbers: the bound is never above the optimum (brute force on tiny instances built from the
real trace) nor above any plan's objective; the incremental objective equals the from-scratch one; a migration
penalty keeps experts in place; an affinity weight adds its documented term and buys locality; a planted
affinity is recovered; bad requests get one clear error; a time limit
still returns a valid plan with its gap; the generator reproduces the real trace's statistics.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from solvers import Options, Problem, SolverInputError, Topology, solve
from solvers.cost import CostModel, estimate_layer_seconds
from solvers.joint import State, iterated_search, local_search, objective_of, prepare
from solvers.joint.bound import (layer_bounds, max_colocated_pairs, max_colocated_pairs_lp, max_local_pairs, min_max_piece,
                                 total_bound)


@pytest.fixture(scope="module")
def real():
    from traces import datasets

    trace = datasets.load()
    return trace.split_by_sequence(0.5, seed=0)


@pytest.fixture(scope="module")
def real_problem8(real):
    from placement.problem import build_problem

    fit, _ = real
    return build_problem(fit, Topology.for_experts(64, 8))


def _tiny_problem(real, layers: int, experts: int, gpus: int, redundant: int = 0, k: int = 2,
                  routes: bool = False) -> Problem:
    """A tiny problem from the real routes: the first ``layers`` layers, each token's ``k`` highest-gate experts,
    expert ids folded modulo ``experts`` (with ``routes``, the tokens themselves too)."""
    from placement.affinity import AffinityStats
    from traces import RoutingTrace

    fit, _ = real
    ids = fit.sorted_by_gate().expert_ids[:3000, :layers, :k].astype(np.int64) % experts
    # folding can repeat an expert within a token's top-k: keep the first occurrence only
    dup = np.zeros_like(ids, dtype=bool)
    for j in range(1, ids.shape[2]):
        dup[:, :, j] = (ids[:, :, j:j + 1] == ids[:, :, :j]).any(axis=2)
    ids = np.where(dup, -1, ids)
    tr = RoutingTrace(expert_ids=ids, num_experts=experts, seq_id=fit.seq_id[:3000])
    st = AffinityStats.from_trace(tr)
    topo = Topology.for_experts(experts, gpus, redundant)
    return Problem(load=st.load, topology=topo, transitions=st.transitions, coactivation=st.coactivation,
                   top_k=tr.top_k, num_tokens=tr.num_tokens, routes=ids if routes else None)


def _all_placements(E: int, G: int, m: int, L: int):
    rows = []
    for pick in itertools.product(itertools.combinations(range(E), m), repeat=G):
        flat = np.concatenate(pick)
        if np.unique(flat).size == E:
            rows.append(flat)
    for combo in itertools.product(range(len(rows)), repeat=L):
        yield np.stack([rows[i] for i in combo])


@pytest.mark.parametrize("dataflow", ["standard", "coherent"])
@pytest.mark.parametrize("shape", [(3, 4, 2, 0), (2, 4, 2, 2)])
def test_bound_never_beats_brute_force_optimum(real, dataflow, shape):
    L, E, G, R = shape
    problem = _tiny_problem(real, L, E, G, R)
    opts = Options(time_limit=10, params={"dataflow": dataflow, "exact_limit": 0, "bound_lp": 1.0})
    data = prepare(problem, opts)
    best = min(objective_of(data, X) for X in _all_placements(E, G, problem.topology.slots_per_gpu, L))
    heuristic = solve("joint", problem, opts)
    assert heuristic.bound <= best * (1 + 1e-9)
    assert heuristic.objective >= best * (1 - 1e-9)
    exact = solve("joint", problem, Options(time_limit=10, params={"dataflow": dataflow}))
    assert exact.status == "optimal" and exact.objective == pytest.approx(best, rel=1e-12)
    assert exact.gap == 0.0


@pytest.mark.parametrize("comm", ["deepep-normal", "deepep-ll"])
@pytest.mark.parametrize("shape", [(2, 4, 4, 2, 0), (2, 4, 2, 1, 2)])
def test_deepep_bound_never_beats_brute_force_optimum(real, comm, shape):
    """Two nodes (4 GPUs in 2 nodes of 2; 2 GPUs in 2 nodes of 1 with 2 redundant slots): under either DeepEP model
    the bound is never above the optimum found by enumerating every placement, counted or pairwise."""
    L, E, G, n, R = shape
    problem = replace(_tiny_problem(real, L, E, G, R, routes=True), topology=Topology.for_experts(E, G, R, n))
    for counted in (True, False):
        opts = Options(time_limit=10, params={"comm": comm, "exact_limit": 0, "token_distinct": counted})
        data = prepare(problem, opts)
        best = min(objective_of(data, X) for X in _all_placements(E, G, problem.topology.slots_per_gpu, L))
        res = solve("joint", problem, opts)
        assert 0 < res.bound <= best * (1 + 1e-9) and res.objective >= best * (1 - 1e-9)


def test_replayed_positions_bound_never_beats_brute_force_optimum(real):
    """Coherent dataflow with redundant slots and token routes: positions are replayed token by token, so an
    anchor's tokens can sit on different replicas; the bound (rows of the local-pair b-matching get the replicas'
    capacity too) is still never above the optimum found by enumeration, and replaying changes the objective."""
    problem = _tiny_problem(real, 3, 4, 2, 2, routes=True)
    opts = Options(params={"dataflow": "coherent"})
    data = prepare(problem, opts)
    shares = prepare(problem, Options(params={"dataflow": "coherent", "token_positions": False}))
    assert data.pos_ids is not None and shares.pos_ids is None
    placements = list(_all_placements(4, 2, 3, 3))
    values = np.array([objective_of(data, X) for X in placements])
    assert np.abs(values - np.array([objective_of(shares, X) for X in placements])).max() > 1e-3 * values.min()
    topo = problem.topology
    lb = total_bound(layer_bounds(data.loads, topo, data.cost, data.T, data.C, data.Q, max_replicas=2,
                                  token_positions=True))
    assert lb <= values.min() * (1 + 1e-9)
    res = solve("joint", problem, Options(time_limit=10, params={"dataflow": "coherent", "exact_limit": 0}))
    assert res.bound == pytest.approx(lb) and res.objective >= values.min() * (1 - 1e-9)
    assert res.stats["token_positions"].startswith("replayed on")


@pytest.mark.parametrize("dataflow", ["standard", "coherent"])
def test_counted_bound_never_beats_brute_force_optimum(real, dataflow):
    """With distinct tokens counted on the tokens the bound uses the Dawson-Sankoff inequality (tokens with three or
    more experts on one GPU): on a tiny top-3 problem from the real routes it is above the "load minus pairs"
    bound and still never above the optimum found by enumeration."""
    problem = _tiny_problem(real, 2, 6, 2, k=3, routes=True)
    opts = Options(params={"dataflow": dataflow})
    data = prepare(problem, opts)
    assert data.ids is not None
    best = min(objective_of(data, X) for X in _all_placements(6, 2, 3, 2))
    topo = problem.topology
    ds = total_bound(layer_bounds(data.loads, topo, data.cost, data.T, data.C, data.Q, counted=True))
    plain = total_bound(layer_bounds(data.loads, topo, data.cost, data.T, data.C, data.Q))
    assert plain < ds <= best * (1 + 1e-9)
    res = solve("joint", problem, Options(time_limit=10, params={"dataflow": dataflow, "exact_limit": 0}))
    assert res.bound == pytest.approx(ds) and res.objective >= best * (1 - 1e-9)


@pytest.mark.parametrize("dataflow", ["standard", "coherent"])
def test_bound_below_objective_on_real_trace(real_problem8, dataflow):
    res = solve("joint", real_problem8, Options(time_limit=8, params={"dataflow": dataflow}))
    assert 0 < res.bound <= res.objective
    assert res.gap == pytest.approx((res.objective - res.bound) / res.objective)
    # every other placement is bounded too (the bound does not depend on the plan)
    data = prepare(real_problem8, Options(params={"dataflow": dataflow}))
    contiguous = solve("contiguous", real_problem8).phy2log
    assert res.bound <= objective_of(data, contiguous)
    assert res.objective < objective_of(data, contiguous)


def test_bound_pieces_and_pairs_are_valid():
    rng = np.random.default_rng(0)
    load = rng.gamma(1.0, size=(3, 8))
    # min-max piece: no replica allocation does better (brute force over small allocations)
    for row, pstar in zip(load, min_max_piece(load, 12, 4)):
        best = min((row / np.array(r)).max() for r in itertools.product(range(1, 5), repeat=8) if sum(r) == 12)
        assert pstar == pytest.approx(best)
    # co-located pairs: the Lagrangian bound is above the best partition of 8 experts into 2 GPUs of 4
    W = rng.random((8, 8))
    W = np.triu(W, 1) + np.triu(W, 1).T
    best = max(sum(W[a, b] for grp in (part, tuple(set(range(8)) - set(part))) for a, b in itertools.combinations(grp, 2))
               for part in itertools.combinations(range(8), 4))
    assert max_colocated_pairs(W, 3) >= best - 1e-9
    # adjacent-layer pairs: the bipartite bound is above the best pair of placements of 6 + 6 experts on 3 GPUs
    T = rng.random((6, 6)) ** 3
    splits = [p for p in itertools.permutations(range(6)) if p[0] < p[2] < p[4] and all(p[i] < p[i + 1] for i in (0, 2, 4))]
    local = max(sum(T[a, b] for g in range(3) for a in pa[2 * g:2 * g + 2] for b in pb[2 * g:2 * g + 2])
                for pa in splits for pb in itertools.permutations(range(6)))
    assert max_local_pairs(T, 2) >= local - 1e-9


@pytest.mark.parametrize("shape", [(6, 3, 2), (5, 3, 3), (8, 2, 4)])
def test_triangle_cut_pair_bound_is_valid_and_tighter(real_problem8, shape):
    """The clique-partitioning LP (triangle cuts) bounds the co-located pair mass of every placement, replicas
    with even or position-aware shares included (enumerated), and is tighter than the b-matching on the real
    trace's co-activation."""
    E, G, m = shape
    rows = [pick for pick in itertools.product(itertools.combinations(range(E), m), repeat=G)
            if len(set(np.concatenate(pick))) == E]
    rng = np.random.default_rng(1)
    for _ in range(3):
        W = rng.random((E, E)) ** 3
        W = np.triu(W, 1) + np.triu(W, 1).T
        best = 0.0
        for pick in rows:
            mask = np.zeros((E, G))
            for g, es in enumerate(pick):
                mask[list(es), g] = 1.0
            for shares in (mask / mask.sum(axis=1, keepdims=True),  # even split
                           mask * rng.dirichlet(np.ones(G), size=E)):  # any split over the holding GPUs
                shares = shares / shares.sum(axis=1, keepdims=True)
                best = max(best, 0.5 * float(np.einsum("ag,bg,ab->", shares, shares, W)))
        assert max_colocated_pairs_lp(W, m - 1) >= best - 1e-9
    C = real_problem8.coactivation[5]
    assert max_colocated_pairs_lp(C, 7) < 0.98 * max_colocated_pairs(C, 7)


@pytest.mark.parametrize("shape", [(4, 3, 2), (5, 2, 3)])
def test_position_aware_local_pairs_bound_beats_brute_force(shape):
    """Coherent dispatch with served shares: a token uses the replica on its position's GPU when there is one, so
    the local mass is ``sum_ab T_ab z_ab`` with ``z_ab = sum_g P_prev[a, g] mask[b, g]``; the bound with the
    redundant slots' extra column capacity is above it for every pair of placements (enumerated)."""
    E, G, m = shape
    rows = [pick for pick in itertools.product(itertools.combinations(range(E), m), repeat=G)
            if len(set(np.concatenate(pick))) == E]
    mask = np.zeros((len(rows), E, G))
    for i, pick in enumerate(rows):
        for g, es in enumerate(pick):
            mask[i, list(es), g] = 1.0
    P = mask / mask.sum(axis=2, keepdims=True)
    z = np.einsum("iag,jbg->ijab", P, mask)
    rng = np.random.default_rng(0)
    for _ in range(5):
        T = rng.random((E, E)) ** 3
        best = np.einsum("ijab,ab->ij", z, T).max()
        assert max_local_pairs(T, m, extra_slots=G * m - E, max_copies=G - 1) >= best - 1e-9


@pytest.mark.parametrize("dataflow,counted", [("standard", True), ("standard", False), ("coherent", False),
                                               ("coherent", True)])
def test_incremental_objective_equals_from_scratch(real, dataflow, counted):
    from placement.problem import build_problem

    fit, _ = real
    topo = Topology.for_experts(64, 8, 8, gpus_per_node=4)
    problem = build_problem(fit, topo)
    data = prepare(problem, Options(params={"dataflow": dataflow, "token_distinct": counted}))
    assert (data.ids is not None) == counted
    start = solve("contiguous", problem).phy2log
    state = State(data, start)
    local_search(state, deadline=float("inf"), rng=np.random.default_rng(0), max_passes=1)
    assert state.objective() == pytest.approx(objective_of(data, state.X), rel=1e-9)
    # coherent with redundant slots: token positions replayed on the routes (sampled alike: none here)
    assert (data.pos_ids is not None) == (dataflow == "coherent")
    direct = estimate_layer_seconds(state.X, data.load, topo, data.cost, data.T, data.C, data.Q, data.tokens,
                                    routes=problem.routes if counted else None,
                                    position_routes=problem.routes if dataflow == "coherent" else None).sum()
    assert state.objective() == pytest.approx(direct, rel=1e-9)
    fresh = State(data, state.X)
    assert np.allclose(state.W, fresh.W, atol=1e-12) and np.allclose(state.Lg, fresh.Lg, rtol=1e-9)
    if counted:  # the per-token cover after incremental moves (and resyncs) is the one counted from scratch
        assert np.array_equal(state.z, fresh.z) and np.allclose(state.q, fresh.q, atol=1e-9)
        assert np.allclose(state.Dt, fresh.Dt, rtol=1e-9)
    if dataflow == "coherent":
        # the served shares follow positions: some replicated expert is not split evenly
        assert np.abs(state.W - state.P).max() > 0.05
        assert np.allclose(state.M, fresh.M, rtol=1e-9, atol=1e-9 * state.M.max())


@pytest.mark.parametrize("comm,counted,tpg", [("deepep-normal", True, None), ("deepep-normal", False, None),
                                               ("deepep-ll", True, None), ("deepep-ll", False, 32),
                                               ("nccl", True, 32), ("deepep-normal", True, 32)])
def test_incremental_objective_equals_from_scratch_under_deepep(real, comm, counted, tpg):
    """Under the DeepEP models (2 nodes of 4 GPUs, 8 redundant slots) and the decode roofline (32 tokens per GPU:
    expert weight reads of the active experts) moves keep the objective, the per-GPU and the per-node token cover
    equal to a fresh state's and to the counts model evaluated directly."""
    from placement.problem import build_problem

    fit, _ = real
    topo = Topology.for_experts(64, 8, 8, gpus_per_node=4)
    problem = build_problem(fit, topo, resamples=1 if counted else 3)  # several profiles, or one (direct check)
    data = prepare(problem, Options(params={"comm": comm, "token_distinct": counted, "tokens_per_gpu": tpg,
                                            "model": "deepseek-v3"}))
    state = State(data, solve("contiguous", problem).phy2log)
    local_search(state, deadline=float("inf"), rng=np.random.default_rng(0), max_passes=1)
    assert state.objective() == pytest.approx(objective_of(data, state.X), rel=1e-9)
    if data.N == 1:
        direct = estimate_layer_seconds(state.X, data.load, topo, data.cost, None, data.C, None, data.tokens,
                                        routes=problem.routes if counted else None).sum()
        assert state.objective() == pytest.approx(direct, rel=1e-9)
    fresh = State(data, state.X)
    if tpg:
        assert np.allclose(state.R, fresh.R, rtol=1e-9)
        assert (state.R * data.cost.expert_bytes / data.cost.hbm_bandwidth > data.cost.seconds_per_assignment
                * state.Lg).any()  # the weight reads bind somewhere (decode)
    if counted and comm == "deepep-normal":
        assert np.array_equal(state.zN, fresh.zN) and np.allclose(state.DtN, fresh.DtN, rtol=1e-9)


@pytest.mark.parametrize("dataflow", ["standard", "coherent"])
def test_iterated_search_never_worsens_and_restores_exactly(real, dataflow):
    """A kick that does not pay is undone by exact moves: after random swaps on three layers and the restore, the
    objective is the one before and the incremental state (replicas, served shares) equals a fresh one; the
    iterated search never raises the objective."""
    from placement.problem import build_problem
    from solvers.joint.iterated import _restore

    fit, _ = real
    topo = Topology.for_experts(64, 8, 8, gpus_per_node=4)
    problem = build_problem(fit, topo)
    data = prepare(problem, Options(params={"dataflow": dataflow}))
    state = State(data, solve("contiguous", problem).phy2log)
    local_search(state, deadline=float("inf"), rng=np.random.default_rng(0), max_passes=3)
    before = state.objective()
    rng = np.random.default_rng(1)
    saved = {l: state.X[l].copy() for l in (3, 4, 5)}
    for _ in range(30):
        l = int(rng.choice(list(saved)))
        s1, s2 = rng.choice(topo.num_slots, 2, replace=False)
        res = state.evaluate_move(l, [(int(s1), int(state.X[l][s2])), (int(s2), int(state.X[l][s1]))])
        if res is not None:
            state.apply(res[2])
    assert state.objective() != pytest.approx(before, rel=1e-9)
    _restore(state, saved)
    fresh = State(data, state.X)
    assert state.objective() == pytest.approx(before, rel=1e-9) == fresh.objective()
    assert np.allclose(state.Lg, fresh.Lg, rtol=1e-9) and np.array_equal(state.r, fresh.r)
    if dataflow == "coherent":
        assert np.allclose(state.W, fresh.W, atol=1e-9)
        assert np.allclose(state.M, fresh.M, rtol=1e-9, atol=1e-9 * state.M.max())
    kicks, kept = iterated_search(state, deadline=float("inf"), rng=rng, patience=10**6, max_kicks=4)
    assert kicks == 4 and state.objective() <= before * (1 + 1e-12)
    assert state.objective() == pytest.approx(State(data, state.X).objective(), rel=1e-9)


def test_joint_keeps_the_best_of_its_starts(real_problem8):
    """Standard dataflow with a token trace and no redundant slots: the column and the chain construction both
    start a descent in every layer, and the plan is never worse than the best descent (per layer the best start is
    kept and the iterated search only keeps improvements)."""
    # a work limit instead of a clock: every descent runs whatever the machine's load
    res = solve("joint", real_problem8, Options(time_limit=None, work_limit=1, params={"dataflow": "standard"}))
    starts = res.stats["starts"]
    assert "columns" in starts and any(name.startswith("chain") for name in starts)
    assert res.objective <= min(starts.values()) * (1 + 1e-9)
    assert sum(res.stats["construction_pick"].values()) == real_problem8.num_layers
    assert res.objective == pytest.approx(objective_of(prepare(real_problem8, Options()), res.phy2log), rel=1e-9)


def test_incremental_objective_with_profiles_coherent():
    """Several profiles (worst case), coherent dataflow, redundant slots: moves keep the position-aware shares,
    the dispatch matrices and the objective equal to a fresh state's."""
    from placement.problem import build_problem
    from traces import datasets

    tasks = [datasets.load(tasks=t).take(np.arange(1500)) for t in ("intent", "law", "summary")]
    topo = Topology.for_experts(64, 8, 16, gpus_per_node=4)
    problem = build_problem(tasks, topo)
    data = prepare(problem, Options(params={"dataflow": "coherent", "objective": "worst"}))
    rng = np.random.default_rng(2)
    X = np.stack([_dedupe_gpu(rng.permutation(np.concatenate([np.arange(64), rng.choice(64, 16, replace=False)])),
                               topo) for _ in range(data.L)])
    state = State(data, X)
    assert local_search(state, deadline=float("inf"), rng=rng, max_passes=1) > 0
    fresh = State(data, state.X)
    assert state.objective() == pytest.approx(fresh.objective(), rel=1e-9)
    assert np.allclose(state.W, fresh.W, atol=1e-12)
    assert np.allclose(state.tg, fresh.tg, rtol=1e-9)


def test_coherent_counts_model_tracks_the_token_evaluator_with_replicas(real):
    """With redundant slots the coherent counts model gives each replica the tokens whose positions the dispatch
    rule sends to it (not 1/r each), positions replayed token by token; it then tracks the exact replay on the
    fitted trace, also for the joint plan, whose replicas sit next to the anchors that use them (measured 0.4% and
    3.0% low; an even split was 5.3% and 14% optimistic, positions from the previous anchors' even split 0.8% and
    6.0%)."""
    from placement.coherent import evaluate_coherent
    from placement.plan import Plan
    from placement.problem import build_problem

    fit, _ = real
    topo = Topology.for_experts(64, 8, 16)
    problem = build_problem(fit, topo)
    opts = Options(time_limit=8, params={"dataflow": "coherent"})
    data = prepare(problem, opts)
    for name, rel in (("eplb-global", 0.01), ("joint", 0.05)):
        res = solve(name, problem, opts if name == "joint" else Options())
        plan = Plan.from_result(res, 64, topo, fit.moe_layer_index, fit.decoder_layers, fit.model)
        exact = evaluate_coherent(plan, fit, data.cost)["est_moe_seconds"]
        assert objective_of(data, res.phy2log) == pytest.approx(exact, rel=rel), name


def test_counts_model_tracks_the_token_evaluator(real, real_problem8):
    """The counts model (what the planner optimises) agrees with the per-token evaluator within 5% (standard)."""
    from placement.evaluate import evaluate
    from placement.plan import Plan

    fit, _ = real
    data = prepare(real_problem8, Options())
    for name in ("contiguous", "round-robin"):
        res = solve(name, real_problem8)
        plan = Plan.from_result(res, 64, real_problem8.topology, fit.moe_layer_index, fit.decoder_layers)
        exact = evaluate(plan, fit)["overall"]["est_moe_seconds"]
        assert objective_of(data, res.phy2log) == pytest.approx(exact, rel=0.05)


def test_distinct_tokens_are_counted_on_the_tokens(real, real_problem8):
    """With a token trace the planner counts each GPU's distinct tokens on the tokens: for any plan without replicas
    their sum per layer equals the evaluator's dispatch fan-out (GPUs per token-layer x tokens), also for the
    joint plan, which packs co-activated experts together (the pairwise estimate, still used for counts-only
    input, undercounts such GPUs)."""
    from placement.evaluate import evaluate
    from placement.plan import Plan

    fit, _ = real
    topo = real_problem8.topology
    data = prepare(real_problem8, Options())
    pairwise = prepare(real_problem8, Options(params={"token_distinct": False}))
    assert pairwise.ids is None and data.ids is not None
    under = []
    for name in ("contiguous", "joint"):
        res = solve(name, real_problem8, Options(time_limit=5))
        plan = Plan.from_result(res, 64, topo, fit.moe_layer_index, fit.decoder_layers)
        fan_out = evaluate(plan, fit)["overall"]["dispatch_gpus"]
        active = (fit.expert_ids[:, :, 0] >= 0).sum()
        st = State(data, res.phy2log)
        assert st.Dt.sum() == pytest.approx(fan_out * active, rel=1e-6), name
        if name == "joint":
            assert res.stats["distinct_tokens"] == f"counted on {fit.num_tokens} tokens"
        under.append(_pairwise_distinct(pairwise, res.phy2log) / st.Dt.sum())
    # the pairwise estimate undercounts the joint plan's GPUs more than the contiguous plan's
    assert under[1] < under[0] - 0.02


def test_distinct_tokens_from_a_sample_of_the_tokens(real_problem8):
    """Long traces are sampled for the count (``distinct_tokens``): a quarter of the tokens, scaled back to the load's
    units, gives nearly the full count on every GPU."""
    X = solve("round-robin", real_problem8).phy2log
    full = State(prepare(real_problem8, Options()), X)
    data = prepare(real_problem8, Options(params={"distinct_tokens": real_problem8.routes.shape[0] // 4}))
    assert data.ids.shape[1] == real_problem8.routes.shape[0] // 4
    part = State(data, X)
    assert np.allclose(part.Dt, full.Dt, rtol=0.05)
    assert part.Dt.sum() == pytest.approx(full.Dt.sum(), rel=0.01)


def _pairwise_distinct(data, X) -> float:
    from solvers.cost import share_matrix, standard_distinct

    topo = data.topology
    return sum(float(standard_distinct(share_matrix(X[l], data.E, topo), data.load[l], data.C[l],
                                       float(data.tokens[l]))[1].sum()) for l in range(data.L))


def test_migration_cost_keeps_experts_in_place(real_problem8):
    current = solve("contiguous", real_problem8).phy2log
    problem = replace(real_problem8, current=current)

    def moved(res):
        gpu = problem.topology.gpu_of_slot()
        return sum(len({(e, g) for e, g in zip(res.phy2log[l], gpu)} - {(e, g) for e, g in zip(current[l], gpu)})
                   for l in range(problem.num_layers))

    free = solve("joint", problem, Options(time_limit=5, params={"migration_cost": 0.0}))
    pinned = solve("joint", problem, Options(time_limit=5, params={"migration_cost": 1.0}))
    assert moved(free) > 10 * max(moved(pinned), 1)
    assert moved(pinned) == 0
    # the default (one expert's weights over NVLink) moves fewer than free
    default = solve("joint", problem, Options(time_limit=5))
    assert moved(default) < moved(free)


def test_planted_affinity_is_recovered():
    from placement.affinity import AffinityStats
    from traces.synthetic import planted

    blocks, E, L = 4, 32, 5
    trace = planted(L, E, 2, blocks, 4000, noise=0.05, seed=1)
    fit, held = trace.split_by_sequence(0.5, seed=0)
    st = AffinityStats.from_trace(fit)
    topo = Topology.for_experts(E, blocks)
    problem = Problem(load=st.load, topology=topo, transitions=st.transitions, coactivation=st.coactivation,
                      top_k=2, num_tokens=fit.num_tokens)
    res = solve("joint", problem, Options(time_limit=10, params={"dataflow": "coherent"}))
    per = E // blocks
    X = res.phy2log.reshape(L, blocks, per)
    # every GPU holds one planted block at every layer, and the same block across layers (up to labels)
    block_of = X // per
    purity = np.mean([np.bincount(block_of[l, g], minlength=blocks).max() / per for l in range(L) for g in range(blocks)])
    assert purity >= 0.9
    chain = np.mean([np.bincount(block_of[:, g].ravel(), minlength=blocks).max() / (L * per) for g in range(blocks)])
    assert chain >= 0.9
    # held out: most adjacent-layer pairs stay on one GPU (the planted noise is 5% per expert)
    from solvers.objective import pair_locality

    held_st = AffinityStats.from_trace(held)
    loc = pair_locality(res.phy2log, held_st.transitions, topo)
    assert loc["same_gpu"].sum() / loc["pairs"].sum() >= 0.8


def _cross_pairs(X: np.ndarray, problem: Problem) -> float:
    """Adjacent-layer k x k pairs of the fitted trace with no common GPU, from the evaluator's own locality."""
    from solvers.objective import pair_locality

    loc = pair_locality(X, problem.transitions, problem.topology)
    return float(loc["pairs"].sum() - loc["same_gpu"].sum())


@pytest.mark.parametrize("dataflow", ["standard", "coherent"])
@pytest.mark.parametrize("shape", [(3, 4, 2, 0), (2, 4, 2, 2)])
def test_affinity_weight_adds_the_documented_term_and_keeps_the_bound(real, dataflow, shape):
    """``affinity_weight`` w adds ``w x C0 x`` (cross-GPU fraction of the k x k pairs), ``C0`` the balanced compute
    time, to every placement's objective (checked against the evaluator's pair locality); the bound stays below the
    optimum found by enumeration."""
    L, E, G, R = shape
    problem = _tiny_problem(real, L, E, G, R)
    w = 5.0
    plain = prepare(problem, Options(params={"dataflow": dataflow}))
    data = prepare(problem, Options(params={"dataflow": dataflow, "affinity_weight": w}))
    c0 = data.cost.seconds_per_assignment * data.load.sum() / G
    pairs = float(problem.transitions.sum())
    values = []
    for X in _all_placements(E, G, problem.topology.slots_per_gpu, L):
        v = objective_of(data, X)
        assert v == pytest.approx(objective_of(plain, X) + w * c0 * _cross_pairs(X, problem) / pairs, rel=1e-9)
        values.append(v)
    res = solve("joint", problem, Options(time_limit=10, params={"dataflow": dataflow, "exact_limit": 0,
                                                                 "affinity_weight": w}))
    assert res.bound <= min(values) * (1 + 1e-9) and res.objective >= min(values) * (1 - 1e-9)
    plain_bound = solve("joint", problem, Options(time_limit=10, params={"dataflow": dataflow, "exact_limit": 0})).bound
    if R == 0:  # an expert shares its GPU with m next-layer experts at most: some pairs are always cross-GPU
        assert res.bound > plain_bound
    exact = solve("joint", problem, Options(time_limit=10, params={"dataflow": dataflow, "affinity_weight": w}))
    assert exact.status == "optimal" and exact.objective == pytest.approx(min(values), rel=1e-12)


@pytest.mark.parametrize("dataflow", ["standard", "coherent"])
def test_affinity_weight_trades_time_for_locality(real, dataflow):
    """On the real trace (8 GPUs + 8 redundant slots) the incremental objective with the affinity term equals the
    from-scratch one after a descent, and a strong weight gives a plan with fewer cross-GPU pairs than no weight."""
    from placement.problem import build_problem

    fit, _ = real
    problem = build_problem(fit, Topology.for_experts(64, 8, 8))
    data = prepare(problem, Options(params={"dataflow": dataflow, "affinity_weight": 4.0}))
    state = State(data, solve("contiguous", problem).phy2log)
    local_search(state, deadline=float("inf"), rng=np.random.default_rng(0), max_passes=1)
    assert state.objective() == pytest.approx(objective_of(data, state.X), rel=1e-9)
    assert state.affinity_seconds() == pytest.approx(data.aff_cost * _cross_pairs(state.X, problem), rel=1e-9)
    free = solve("joint", problem, Options(time_limit=4, params={"dataflow": dataflow}))
    tied = solve("joint", problem, Options(time_limit=4, params={"dataflow": dataflow, "affinity_weight": 8.0}))
    assert _cross_pairs(tied.phy2log, problem) < 0.97 * _cross_pairs(free.phy2log, problem)
    assert tied.stats["fitted_cross_gpu_fraction"] == pytest.approx(
        _cross_pairs(tied.phy2log, problem) / float(problem.transitions.sum()), rel=1e-9)
    assert 0 < tied.bound <= tied.objective


def test_bootstrap_resamples_of_sequences_become_profiles(real):
    """A resample draws as many sequences as the trace has, with replacement: the tokens of one sequence share its
    multiplicity; the resampled loads (weighted counts, equal to a naive loop) become the joint planner's profiles,
    while the whole trace's load, which the other solvers use, stays."""
    from placement.problem import build_problem
    from traces.format import layer_counts

    fit, _ = real
    w = fit.bootstrap_weights(4, seed=3)
    _, first, inv = np.unique(fit.seq_id, return_index=True, return_inverse=True)
    assert w.shape == (4, fit.num_tokens)
    assert np.array_equal(w, w[:, first][:, inv])  # one weight per sequence
    assert (w[:, first].sum(axis=1) == fit.num_sequences).all() and (w[:, first] == 0).any()
    assert np.array_equal(w, fit.bootstrap_weights(4, seed=3)) and not np.array_equal(w, fit.bootstrap_weights(4, 4))
    ids = fit.expert_ids
    naive = np.zeros((4, ids.shape[1], 64))
    for t, l, j in zip(*np.nonzero(ids >= 0)):
        naive[:, l, ids[t, l, j]] += w[:, t]
    assert np.allclose(layer_counts(ids, 64, w, block=97), naive)
    topo = Topology.for_experts(64, 8)
    boot = build_problem(fit, topo, resamples=4, seed=3)
    plain = build_problem(fit, topo)
    assert np.allclose(boot.profiles, naive) and plain.profiles is None and np.array_equal(boot.load, plain.load)
    res = solve("joint", boot, Options(time_limit=2))
    assert res.stats["profiles"] == 4 and 0 < res.bound <= res.objective


def test_bad_requests_get_one_clear_error(real_problem8):
    load = np.ones((2, 8))
    with pytest.raises(SolverInputError, match="cannot hold"):
        Problem(load=load, topology=Topology(num_gpus=2, slots_per_gpu=3))
    with pytest.raises(SolverInputError, match="multiple of --gpus"):
        Topology.for_experts(8, 3, redundant=2)
    with pytest.raises(SolverInputError, match="same expert twice"):
        solve("joint", Problem(load=np.ones((2, 4)), topology=Topology(num_gpus=2, slots_per_gpu=6)), Options())
    with pytest.raises(SolverInputError, match="needs adjacent-layer transitions"):
        solve("joint", Problem(load=load, topology=Topology.for_experts(8, 2)), Options(params={"dataflow": "coherent"}))
    with pytest.raises(SolverInputError, match="dataflow"):
        solve("joint", real_problem8, Options(params={"dataflow": "sideways"}))
    with pytest.raises(SolverInputError, match="memory budget"):
        solve("joint", Problem(load=load, topology=Topology.for_experts(8, 2), budget_slots=2), Options())
    with pytest.raises(SolverInputError, match="multiple of the"):
        solve("joint", Problem(load=load, topology=Topology.for_experts(8, 4, gpus_per_node=1), expert_groups=2),
              Options(params={"keep_groups_on_nodes": True}))
    with pytest.raises(SolverInputError, match="objective"):
        solve("joint", real_problem8, Options(params={"objective": "best"}))
    for bad in (-1, "much", float("nan")):
        with pytest.raises(SolverInputError, match="affinity_weight must be a number >= 0"):
            solve("joint", real_problem8, Options(params={"affinity_weight": bad}))
    with pytest.raises(SolverInputError, match="affinity_weight needs adjacent-layer transitions"):
        solve("joint", Problem(load=load, topology=Topology.for_experts(8, 2)), Options(params={"affinity_weight": 1}))


def test_time_limit_returns_a_valid_plan_with_gap(real_problem8):
    res = solve("joint", real_problem8, Options(time_limit=0.5))
    assert res.status in ("feasible", "optimal")
    assert res.gap is not None and 0 <= res.gap < 1
    assert res.seconds < 5


def test_groups_stay_on_their_node(real):
    from placement.problem import build_problem

    fit, _ = real
    topo = Topology.for_experts(64, 8, 8, gpus_per_node=2)
    problem = build_problem(fit, topo, expert_groups=4)
    res = solve("joint", problem, Options(time_limit=5, params={"keep_groups_on_nodes": True}))
    node = topo.node_of_gpu()[topo.gpu_of_slot()]
    group = res.phy2log // 16
    for l in range(problem.num_layers):
        assert all(len(set(node[group[l] == g])) == 1 for g in range(4))


def test_worst_case_profiles(real):
    """Several workload profiles: the worst-case objective bounds and balances the worst profile."""
    from placement.problem import build_problem
    from traces import datasets

    topo = Topology.for_experts(64, 8, 8)
    tasks = [datasets.load(tasks=t) for t in ("intent", "law", "summary")]
    problem = build_problem([t.load_profile() for t in tasks], topo)
    assert problem.profiles.shape[0] == 3
    worst = solve("joint", problem, Options(time_limit=5, params={"objective": "worst"}))
    mean = solve("joint", problem, Options(time_limit=5, params={"objective": "expected"}))
    assert worst.bound <= worst.objective and mean.bound <= mean.objective
    dw, dm = (prepare(problem, Options(params={"objective": o})) for o in ("worst", "expected"))
    assert objective_of(dw, worst.phy2log) <= objective_of(dw, mean.phy2log) * (1 + 0.01)  # 5 s heuristics
    assert objective_of(dm, mean.phy2log) <= objective_of(dm, worst.phy2log) * (1 + 0.02)
    # the expected-case bound is the mean of the per-profile bounds, the worst-case one their maximum
    lb = layer_bounds(dw.loads, topo, dw.cost, None, dw.C)
    assert total_bound(lb, True) >= total_bound(lb, False)


def test_cost_model_parameters():
    v3 = CostModel.preset("deepseek-v3", dtype_bytes=1)
    assert v3.token_bytes == 7168 and v3.flops_per_assignment == 6 * 7168 * 2048
    assert CostModel.from_params({"model": "deepseek-v3", "dataflow": "coherent"}).hidden_size == 7168
    assert CostModel.from_params({"hidden_size": 4096}).hidden_size == 4096
    with pytest.raises(SolverInputError):
        CostModel.preset("gpt-7")
    with pytest.raises(SolverInputError):
        CostModel(gpu_flops=0)


def test_coherent_traffic_on_hand_made_tokens():
    """Dispatch from the token's position to its serving GPUs, combine onto its anchor (highest gate), go on from
    there; counted by hand."""
    from placement.coherent import coherent_traffic

    topo = Topology.for_experts(4, 2)
    phy2log = np.array([[0, 1, 2, 3], [0, 2, 1, 3]])  # layer 0: GPU0 {0,1} GPU1 {2,3}; layer 1: GPU0 {0,2} GPU1 {1,3}
    ids = np.array([[[0, 1], [0, 2]],  # home 0: everything on GPU0 at both layers: nothing moves
                    [[2, 0], [1, 3]]])  # home 1: layer 0 on {GPU1 (anchor, expert 2), GPU0}; layer 1 on GPU1 only
    tr = coherent_traffic(phy2log, 4, topo, ids, None, np.array([0, 1]))
    # token 1 at layer 0: dispatch home GPU1 -> GPU0 (expert 0), combine GPU0 -> anchor GPU1
    assert tr["dispatch_pairs"][0].tolist() == [[0, 0], [1, 0]]
    assert tr["combine_pairs"][0].tolist() == [[0, 1], [0, 0]]
    # layer 1: the anchor GPU1 serves both next experts: nothing moves; both tokens end where they are
    assert tr["dispatch_pairs"][1].sum() == 0 and tr["combine_pairs"][1].sum() == 0
    assert tr["position"][:, -1].tolist() == [0, 1]
    assert tr["served"].sum() == 8
    # with gate weights the anchor follows the highest gate: expert 0 (GPU0) leads token 1 at layer 0, so the
    # combine goes GPU1 -> GPU0 and layer 1 (both experts on GPU1) costs one dispatch copy GPU0 -> GPU1
    gates = np.array([[[0.6, 0.4], [0.5, 0.5]], [[0.3, 0.7], [0.5, 0.5]]])
    tr = coherent_traffic(phy2log, 4, topo, ids, gates, np.array([0, 1]))
    assert tr["combine_pairs"][0].tolist() == [[0, 0], [1, 0]]
    assert tr["dispatch_pairs"][1].tolist() == [[0, 1], [0, 0]]


def test_coherent_counts_model_tracks_the_token_evaluator(real):
    """The coherent counts model (anchor statistics) agrees with the exact per-token replay on unoptimised plans,
    and the joint plan is cheaper than contiguous under the exact replay too."""
    from placement.coherent import evaluate_coherent
    from placement.plan import Plan
    from placement.problem import build_problem

    fit, held = real
    topo = Topology.for_experts(64, 8)
    problem = build_problem(fit, topo)
    data = prepare(problem, Options(params={"dataflow": "coherent"}))
    plans = {}
    for name in ("contiguous", "round-robin", "joint"):
        res = solve(name, problem, Options(time_limit=10, params={"dataflow": "coherent"} if name == "joint" else {}))
        plans[name] = Plan.from_result(res, 64, topo, fit.moe_layer_index, fit.decoder_layers, fit.model)
    for name in ("contiguous", "round-robin"):
        est = objective_of(data, plans[name].phy2log)
        exact = evaluate_coherent(plans[name], fit, data.cost)["est_moe_seconds"]
        assert est == pytest.approx(exact, rel=0.05), name
    held_t = {n: evaluate_coherent(p, held, data.cost)["est_moe_seconds"] for n, p in plans.items()}
    assert held_t["joint"] < 0.85 * held_t["contiguous"]


def test_synthetic_generator_reproduces_real_statistics(real):
    from traces import datasets
    from traces.synthetic import ESFT_CALIBRATED, generate, routing_stats

    target = routing_stats(datasets.load(), max_tokens=12000)
    synth = routing_stats(generate(ESFT_CALIBRATED, 12000, seq_len=145, seed=3), max_tokens=12000)
    for key in ("load_cv", "transition_mi_excess", "coactivation_mi_excess", "sequence_mi_excess"):
        assert synth[key] == pytest.approx(target[key], rel=0.25), key
    # and the structure is real information, not estimator bias: far above the shuffled baseline
    assert synth["transition_mi_excess"] > 10 * synth["transition_mi_shuffled"]


def test_anchor_counts_match_a_naive_loop(real):
    from solvers.cost import anchor_counts

    fit, _ = real
    routes = fit.take(np.arange(300)).sorted_by_gate().expert_ids[:, :4].astype(np.int64)
    E = fit.num_experts
    load, trans, same = anchor_counts(routes, E)
    T, L, k = routes.shape
    n_load, n_trans, n_same = np.zeros((L, E)), np.zeros((L - 1, E, E)), np.zeros((L, E, E))
    for t in range(T):
        for l in range(L):
            a = routes[t, l, 0]
            n_load[l, a] += 1
            for b in routes[t, l, 1:]:
                n_same[l, a, b] += 1
            if l + 1 < L:
                for b in routes[t, l + 1]:
                    n_trans[l, a, b] += 1
    assert np.array_equal(load, n_load) and np.array_equal(trans, n_trans) and np.array_equal(same, n_same)
    # the anchor is the highest gate: the same counts from the unsorted trace's top-1 ids
    assert np.array_equal(load.argmax(axis=1), np.array([np.bincount(fit.take(np.arange(300)).top1_ids()[:, l],
                                                                      minlength=E).argmax() for l in range(4)]))


def test_coherent_bound_holds_for_random_placements_with_profiles():
    """Several token traces kept apart as profiles, coherent dataflow: the bound is below the objective of every
    placement tried (random ones included), not only the planner's."""
    from placement.problem import build_problem
    from traces import datasets

    tasks = [datasets.load(tasks=t).take(np.arange(1500)) for t in ("intent", "law", "summary")]
    topo = Topology.for_experts(64, 8, 8, gpus_per_node=4)
    problem = build_problem(tasks, topo)
    assert problem.profiles.shape[0] == 3 and problem.routes is not None
    rng = np.random.default_rng(1)
    for worst in (False, True):
        opts = Options(time_limit=5, params={"dataflow": "coherent", "objective": "worst" if worst else "expected"})
        data = prepare(problem, opts)
        lb = total_bound(layer_bounds(data.loads, topo, data.cost, data.T, data.C, data.Q, max_replicas=8), worst)
        for _ in range(5):
            X = np.stack([rng.permutation(np.concatenate([np.arange(64), rng.choice(64, 8, replace=False)]))
                          for _ in range(data.L)])
            X = np.stack([_dedupe_gpu(row, topo) for row in X])
            assert lb <= objective_of(data, X) * (1 + 1e-9)
        res = solve("joint", problem, opts)
        assert res.bound <= res.objective


def _dedupe_gpu(row: np.ndarray, topo: Topology) -> np.ndarray:
    """Swap slots until no GPU holds the same expert twice."""
    row = row.copy()
    m = topo.slots_per_gpu
    for _ in range(100):
        grid = row.reshape(topo.num_gpus, m)
        bad = [(g, j) for g in range(topo.num_gpus) for j in range(m) if list(grid[g]).count(grid[g, j]) > 1]
        if not bad:
            return row
        g, j = bad[0]
        s = g * m + j
        for t in range(row.size):
            h = t // m
            if h != g and row[s] not in row[h * m:(h + 1) * m] and row[t] not in grid[g]:
                row[s], row[t] = row[t], row[s]
                break
    return row


def test_coherent_positions_follow_where_anchors_are_served():
    """Hand-made chain: every token's anchor at layer 0 is expert 1 (on GPU0 only), then expert 0 (a replica on
    each GPU) at layers 1 and 2. The dispatch rule serves a token from the replica on its position, so all tokens
    stay on GPU0; the counts model must see that at layer 2 too (its positions come from where layer 1's anchors
    are served; an even split of their replicas would put half the tokens on GPU1)."""
    from placement.coherent import coherent_traffic
    from solvers.cost import CostModel, anchor_counts

    topo = Topology.for_experts(3, 2, 1)  # 2 GPUs x 2 slots, 3 experts, one redundant slot
    phy2log = np.array([[0, 1, 2, 0]] * 3)  # GPU0 {0, 1}, GPU1 {2, 0}
    routes = np.array([[[1], [0], [0]]] * 4)  # [T, L, k]
    tr = coherent_traffic(phy2log, 3, topo, routes, None, np.arange(4))
    assert tr["served"].tolist() == [[4, 0]] * 3  # the replay: everything on GPU0
    load, trans, pairs = anchor_counts(routes, 3)
    cost = CostModel(dataflow="coherent")
    _, compute, _ = estimate_layer_seconds(phy2log, load, topo, cost, trans, None, pairs, detail=True)
    assert np.allclose(compute / cost.seconds_per_assignment, tr["served"])


def test_replayed_positions_are_the_runtime_protocol(real):
    """The counts model's replay of token positions (solvers.cost.replay_positions) and the exact coherent replay
    (placement.coherent.coherent_traffic, the runtime's protocol) put every token on the same GPU before every
    layer, for a plan with replicas and homes spread evenly."""
    from placement.coherent import coherent_traffic
    from placement.evaluate import prepare as prepare_eval
    from placement.problem import build_problem
    from solvers.cost import replay_positions
    from solvers.objective import dispatch_table

    fit, _ = real
    topo = Topology.for_experts(64, 8, 16)
    X = solve("eplb-global", build_problem(fit, topo)).phy2log
    ev = prepare_eval(fit)
    ids = ev.expert_ids.astype(np.int64)  # [T, L, k], highest gate first
    tr = coherent_traffic(X, 64, topo, ids, None, np.arange(ids.shape[0]))
    pos = replay_positions(dispatch_table(X, 64, topo), np.ascontiguousarray(ids.transpose(1, 0, 2)))
    assert np.array_equal(pos, tr["position"][:, :-1].T)
    assert (pos[1:] != pos[:-1]).any()  # tokens do move
