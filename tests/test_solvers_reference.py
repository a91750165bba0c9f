"""Reference solvers (DeepSeek EPLB, ExFlow ILP, MoETuner ILP) and the MIP backends they run on.

Tiny instances are cut from the bundled real DeepSeek-V2-Lite trace (the first experts and layers of its real
counts) and solved both by the ILP and by brute-force enumeration; the larger checks use the real trace directly.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import solvers
from placement.affinity import AffinityStats
from solvers import Options, Problem, SolverInputError, Topology, mip
from solvers.eplb import balanced_packing, rebalance_experts, replicate_experts
from solvers.moetuner import boundary_cost, cluster_layer, link_weights
from traces import datasets

ALL_BACKENDS = ["cp-sat", "highs", "cbc"]


@pytest.fixture(scope="module")
def real():
    trace = datasets.load()
    fit, held = trace.split_by_sequence(0.5, seed=0)
    return {"trace": trace, "fit": fit, "held": held, "stats": AffinityStats.from_trace(fit)}


def _problem(stats, G, layers=None, experts=None, redundant=0, gpus_per_node=None, routes=None, groups=1):
    L = stats.load.shape[0] if layers is None else layers
    E = stats.load.shape[1] if experts is None else experts
    topo = Topology.for_experts(E, G, redundant, gpus_per_node=gpus_per_node)
    return Problem(load=stats.load[:L, :E], topology=topo, transitions=stats.transitions[:L - 1, :E, :E],
                   transitions_top1=stats.transitions_top1[:L - 1, :E, :E], routes=routes, top_k=6,
                   expert_groups=groups)


def _gpu_of(result, problem):
    """``[L, E]`` GPU of each expert for plans without replicas."""
    topo = problem.topology
    L, S = result.phy2log.shape
    out = np.empty((L, problem.num_experts), dtype=np.int64)
    out[np.arange(L)[:, None], result.phy2log] = topo.gpu_of_slot()[None, :]
    return out


def _cross_share(gpu_of, trans):
    local = sum(float((trans[l] * (gpu_of[l][:, None] == gpu_of[l + 1][None, :])).sum()) for l in range(len(trans)))
    return 1.0 - local / float(trans.sum())


def _equal_partitions(E, G):
    """Every assignment of E experts to G GPUs with E / G each, as ``[n, E]`` GPU arrays."""
    per = E // G
    out = []
    for perm in itertools.permutations(range(E)):
        gpu = np.empty(E, dtype=np.int64)
        gpu[list(perm)] = np.repeat(np.arange(G), per)
        out.append(gpu)
    return np.unique(np.array(out), axis=0)


# MIP layer -------------------------------------------------------------------------------------------------------
def _knapsack(n=10, seed=0):
    rng = np.random.default_rng(seed)
    w, v = rng.integers(1, 30, n), rng.integers(1, 40, n)
    model = mip.Model()
    x = model.new_vars(n)
    model.add(x, w, hi=60)
    model.minimize(x, -v)
    best = min(-int(v @ np.array(b)) for b in itertools.product([0, 1], repeat=n) if w @ np.array(b) <= 60)
    return model, best


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_mip_backends_find_the_brute_force_optimum(backend):
    model, best = _knapsack()
    sol = mip.solve(model, backend, time_limit=20, threads=1)
    assert sol.status == "optimal"
    assert sol.objective == best and sol.bound <= sol.objective
    assert model.is_feasible(sol.values)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_mip_backends_report_infeasible(backend):
    model = mip.Model()
    x = model.new_vars(3)
    model.add(x, 1, lo=4)
    model.minimize(x, 1)
    assert mip.solve(model, backend, time_limit=10, threads=1).status == "infeasible"


def test_mip_rejects_fractional_coefficients_and_integerize_scales():
    model = mip.Model()
    x = model.new_vars(2)
    with pytest.raises(ValueError):
        model.add(x, [0.5, 1.0], hi=1)
    ints, scale = mip.integerize(np.array([3.0, 4.0]))
    assert scale == 1.0 and ints.tolist() == [3, 4]
    ints, scale = mip.integerize(np.array([0.25, 1.0 / 3.0]))
    assert np.all(np.abs(ints / scale - [0.25, 1.0 / 3.0]) <= 0.5 / scale)


# EPLB ------------------------------------------------------------------------------------------------------------
def test_eplb_global_hand_checked():
    # 4 experts, 6 slots on 2 GPUs. Replicas: 90 is the largest load per replica (-> 2 copies of 45), then 45 again
    # (-> 3 copies of 30). Slot loads [30, 10, 30, 20, 30, 30]; heaviest first into the lightest GPU with room
    # (ties to GPU 0): 30->G0, 30->G1, 30->G0, 30->G1, 20->G0 (full), 10->G1.
    phy2log, log2phy, logcnt = rebalance_experts(np.array([[90.0, 10.0, 30.0, 20.0]]), 6, 1, 1, 2)
    assert phy2log.tolist() == [[0, 0, 3, 2, 0, 1]]
    assert logcnt.tolist() == [[3, 1, 1, 1]]
    assert log2phy[0, 0].tolist() == [0, 1, 4] and log2phy[0, 1].tolist() == [5, -1, -1]


def test_eplb_hierarchical_hand_checked():
    # 8 experts in 4 groups of 2 (loads 90, 10, 40, 20), 2 nodes x 2 GPUs, 12 slots.
    # Groups -> nodes: 90->N0, 40->N1, 20->N1 (N1 full), 10->N0. N0 = experts 0-3 [50, 40, 5, 5]: replicas to
    # 50 (2 x 25) then 40 (2 x 20); GPUs: 25->G0, 25->G1, 20->G0, 20->G1, 5->G0, 5->G1.
    # N1 = experts 4-7 [30, 10, 2, 18]: replicas to 30 (2 x 15) then 18 (2 x 9); 15->G2, 15->G3, 10->G2, 9->G3,
    # 9->G3 (full), 2->G2.
    phy2log, _, logcnt = rebalance_experts(np.array([[50.0, 40, 5, 5, 30, 10, 2, 18]]), 12, 4, 2, 4)
    assert phy2log.tolist() == [[0, 1, 2, 0, 1, 3, 4, 5, 6, 4, 7, 7]]
    assert logcnt.tolist() == [[2, 2, 1, 1, 2, 1, 1, 2]]


def test_balanced_packing_counts_and_greedy_rule():
    rng = np.random.default_rng(0)
    w = rng.integers(0, 100, (20, 12)).astype(np.float32)
    pack, rank = balanced_packing(w, 3)
    for row in range(20):
        assert np.bincount(pack[row], minlength=3).tolist() == [4, 4, 4]
        for p in range(3):  # ranks inside a pack are 0..3 in heaviest-first order
            members = np.flatnonzero(pack[row] == p)
            assert sorted(rank[row, members].tolist()) == [0, 1, 2, 3]
            assert np.all(np.diff(w[row, members[np.argsort(rank[row, members])]]) <= 0)


@pytest.mark.parametrize("G,nodes,groups,redundant", [(4, 1, 1, 0), (8, 2, 4, 16), (16, 4, 8, 64), (8, 2, 3, 8)])
def test_eplb_invariants_on_real_counts(real, G, nodes, groups, redundant):
    load = real["stats"].load
    L, E = load.shape
    if E % groups:
        groups = 1
    S = E + redundant
    phy2log, log2phy, logcnt = rebalance_experts(load, S, groups, nodes, G)
    assert phy2log.shape == (L, S)
    assert np.all(logcnt >= 1) and np.all(logcnt.sum(axis=1) == S)
    for l in range(L):
        assert np.array_equal(np.bincount(phy2log[l], minlength=E), logcnt[l])
        for e in range(E):
            slots = log2phy[l, e][log2phy[l, e] >= 0]
            assert len(slots) == logcnt[l, e] and np.all(phy2log[l, slots] == e)
    if groups % nodes:  # global policy: replicas went to the hottest load per replica first
        per = load / logcnt
        hot = logcnt >= 2
        before = load / np.maximum(logcnt - 1, 1)  # load per replica just before the last replica was added
        assert np.all(before[hot] >= (per.max(axis=1, keepdims=True) * np.ones_like(per))[hot] - 1e-6)


def test_eplb_solvers_pick_the_policy_and_reject_bad_groups(real):
    problem = _problem(real["stats"], 8, gpus_per_node=4, redundant=8, groups=4)
    assert solvers.solve("eplb", problem).stats["policy"] == "hierarchical"
    assert solvers.solve("eplb-global", problem).stats["policy"] == "global"
    odd = _problem(real["stats"], 8, gpus_per_node=2, redundant=8, groups=2)  # 2 groups, 4 nodes
    assert solvers.solve("eplb", odd).stats["policy"] == "global"
    with pytest.raises(SolverInputError):
        solvers.solve("eplb-hierarchical", odd)


def test_eplb_balances_held_out_load_better_than_contiguous(real):
    from solvers.objective import gpu_load, imbalance

    problem = _problem(real["stats"], 8, redundant=8)
    held = AffinityStats.from_trace(real["held"]).load
    imb = {name: imbalance(gpu_load(solvers.solve(name, problem).phy2log, held, problem.topology)).mean()
           for name in ("contiguous", "eplb")}
    assert imb["eplb"] < imb["contiguous"]


# DeepSeek's eplb.py, logic re-expressed in torch for comparison (the reference computes on CPU in float32 and
# breaks ties with torch.sort / torch.max, which is what this port uses).
def _ref_pack(w, m):
    import torch

    X, n = w.shape
    per = n // m
    if per == 1:
        return torch.arange(n).expand(X, n).clone(), torch.zeros(X, n, dtype=torch.int64)
    order = w.float().sort(-1, descending=True).indices
    pidx = torch.full((X, n), -1, dtype=torch.int64)
    prank = pidx.clone()
    for r in range(X):
        loads, counts = [0] * m, [0] * m
        for it in order[r].tolist():
            p = min((q for q in range(m) if counts[q] < per), key=lambda q: loads[q])
            pidx[r, it], prank[r, it] = p, counts[p]
            loads[p] = loads[p] + w[r, it]
            counts[p] += 1
    return pidx, prank


def _ref_replicate(w, nphy):
    import torch

    X, nlog = w.shape
    p2l = torch.arange(nphy).repeat(X, 1)
    rk = torch.zeros(X, nphy, dtype=torch.int64)
    cnt = torch.ones(X, nlog, dtype=torch.int64)
    ar = torch.arange(X)
    for i in range(nlog, nphy):
        j = (w / cnt).max(dim=-1).indices
        p2l[:, i], rk[:, i] = j, cnt[ar, j]
        cnt[ar, j] += 1
    return p2l, rk, cnt


def _ref_inverse(p):
    import torch

    out = torch.empty_like(p)
    out.scatter_(1, p, torch.arange(p.size(1)).expand(p.shape))
    return out


def _ref_rebalance(weight, S, ng, N, G):
    import torch

    w = torch.as_tensor(np.asarray(weight)).float()
    if ng % N:
        ng, N = 1, 1
    L, E = w.shape
    gs, gpn, ppg = E // ng, ng // N, S // G
    gp, gr = _ref_pack(w.unflatten(-1, (ng, gs)).sum(-1), N)
    l2m = (((gp * gpn + gr) * gs).unsqueeze(-1) + torch.arange(gs)).flatten(-2)
    m2l = _ref_inverse(l2m)
    wm = w.gather(-1, m2l).view(-1, E // N)
    p2m, prk, mc = _ref_replicate(wm, S // N)
    pk, rk = _ref_pack((wm / mc).gather(-1, p2m), G // N)
    pp2p = _ref_inverse(pk * ppg + rk)
    pp2m = (p2m.gather(-1, pp2p).view(L, N, -1) + torch.arange(0, E, E // N).view(1, -1, 1)).flatten(-2)
    return m2l.gather(-1, pp2m).numpy(), mc.view(L, -1).gather(-1, l2m).numpy()


@pytest.mark.parametrize("S,groups,nodes,G", [(80, 4, 2, 8), (64, 1, 1, 4), (128, 8, 4, 16), (72, 8, 2, 8),
                                              (80, 2, 4, 8)])
def test_eplb_equals_the_reference_algorithm(real, S, groups, nodes, G):
    pytest.importorskip("torch")
    counts = real["stats"].load
    # Without ties the plans must be identical up to slot order inside a GPU (here: identical).
    jittered = counts + np.random.default_rng(0).uniform(0.0, 0.5, counts.shape)
    mine, cnt = rebalance_experts(jittered, S, groups, nodes, G)[0::2]
    ref, ref_cnt = _ref_rebalance(jittered, S, groups, nodes, G)
    L = counts.shape[0]
    assert np.array_equal(np.sort(mine.reshape(L, G, -1), axis=2), np.sort(ref.reshape(L, G, -1), axis=2))
    assert np.array_equal(cnt, ref_cnt)
    # On raw integer counts torch's unstable sort orders equal loads its own way; every GPU still gets the same
    # multiset of slot loads and every expert the same replica count.
    mine, cnt = rebalance_experts(counts, S, groups, nodes, G)[0::2]
    ref, ref_cnt = _ref_rebalance(counts, S, groups, nodes, G)
    assert np.array_equal(cnt, ref_cnt)
    def slot_loads(p2l, c):  # [L, G, S/G] sorted load of each slot on each GPU
        per_slot = np.take_along_axis(counts, p2l, 1) / np.take_along_axis(c, p2l, 1)
        return np.sort(per_slot.reshape(L, G, -1), axis=2)

    assert np.allclose(slot_loads(mine, cnt), slot_loads(ref, ref_cnt))


def test_replicate_matches_reference_with_ties():
    pytest.importorskip("torch")
    import torch

    w = np.random.default_rng(1).integers(0, 4, (30, 10)).astype(np.float32)
    mine = replicate_experts(w, 16)
    ref = _ref_replicate(torch.tensor(w), 16)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(mine, ref))


# ExFlow ----------------------------------------------------------------------------------------------------------
def _exflow_brute(trans, E, G):
    """Minimum cross-GPU share over all equal-count placements (layer 0 fixed up to GPU renaming)."""
    parts = _equal_partitions(E, G)
    L = trans.shape[0] + 1
    best = np.inf
    for combo in itertools.product(range(len(parts)), repeat=L):
        best = min(best, _cross_share(parts[list(combo)], trans))
    return best


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_exflow_optimum_equals_brute_force(real, backend):
    problem = _problem(real["stats"], 2, layers=3, experts=4)
    best = _exflow_brute(problem.transitions, 4, 2)
    r = solvers.solve("exflow", problem, Options(time_limit=20, backend=backend, threads=1))
    assert r.status == "optimal"
    assert r.objective == pytest.approx(best, abs=1e-12)
    assert _cross_share(_gpu_of(r, problem), problem.transitions) == pytest.approx(best, abs=1e-12)


def test_exflow_four_gpus_flat_is_optimal_and_bipartition_is_bounded(real):
    problem = _problem(real["stats"], 4, layers=3, experts=4)
    best = _exflow_brute(problem.transitions, 4, 4)
    flat = solvers.solve("exflow", problem, Options(time_limit=20, threads=1, params={"bipartition": False}))
    assert flat.objective == pytest.approx(best, abs=1e-12) and flat.status == "optimal"
    split = solvers.solve("exflow", problem, Options(time_limit=20, threads=1))
    assert split.bound <= best + 1e-12 <= split.objective + 1e-12


def test_exflow_token_form_equals_aggregated_top1(real):
    # Real routes folded onto 4 experts per layer (expert id mod 4), first 3 layers, 400 tokens.
    sub = real["fit"].sorted_by_gate()
    routes = (sub.expert_ids[:400, :3, :] % 4).astype(np.int64)
    load = np.stack([np.bincount(routes[:, l].ravel(), minlength=4) for l in range(3)]).astype(float)
    top1 = np.zeros((2, 4, 4))
    for l in range(2):
        np.add.at(top1[l], (routes[:, l, 0], routes[:, l + 1, 0]), 1.0)
    topo = Topology.for_experts(4, 2)
    problem = Problem(load=load, topology=topo, transitions_top1=top1, routes=routes, top_k=6)
    best = _exflow_brute(top1, 4, 2)
    token = solvers.solve("exflow", problem, Options(time_limit=20, threads=1,
                                                     params={"form": "token", "batch_tokens": 150}))
    agg = solvers.solve("exflow", problem, Options(time_limit=20, threads=1, params={"top1": True}))
    assert token.objective == pytest.approx(best, abs=1e-12) == agg.objective
    assert len(token.stats["subproblems"][0]["solves"]) == 3  # batches of 150, 300 and all 400 tokens


def test_exflow_fills_redundant_slots_and_keeps_equal_counts(real):
    problem = _problem(real["stats"], 4, layers=4, experts=8, redundant=4)
    r = solvers.solve("exflow", problem, Options(time_limit=10, threads=1))
    for l in range(4):  # each GPU: its 2 experts (ExFlow's equal count), then one replica
        originals = r.phy2log[l].reshape(4, 3)[:, :2]
        assert sorted(originals.ravel().tolist()) == list(range(8))
        assert all(row[2] not in row[:2] for row in r.phy2log[l].reshape(4, 3))
    assert r.stats["objective_with_replicas"] <= r.objective + 1e-12


# MoETuner --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_moetuner_clustering_equals_brute_force(real, backend):
    load = real["stats"].load[0, :6]
    opts = Options(time_limit=20, backend=backend, threads=1)
    for G, lo, hi in [(2, 3, 3), (3, 1, 4)]:
        best = min(np.abs(np.bincount(a, weights=load, minlength=G) - load.sum() / G).sum()
                   for a in map(np.array, itertools.product(range(G), repeat=6))
                   if np.all((np.bincount(a, minlength=G) >= lo) & (np.bincount(a, minlength=G) <= hi)))
        cluster, rec = cluster_layer(load, np.arange(6), G, lo, hi, opts, 20, None)
        assert rec["status"] == "optimal"
        assert rec["objective"] == pytest.approx(best) and rec["bound"] <= rec["objective"] + 1e-9
        sizes = np.bincount(cluster, minlength=G)
        assert np.all((sizes >= lo) & (sizes <= hi))


@pytest.mark.parametrize("backend,gpn", [("cp-sat", None), ("cp-sat", 2), ("highs", None), ("cbc", None)])
def test_moetuner_joint_mapping_equals_brute_force(real, backend, gpn):
    G = 4 if gpn else 3
    problem = _problem(real["stats"], G, layers=3, experts=2 * G, gpus_per_node=gpn)
    r = solvers.solve("moetuner", problem, Options(time_limit=20, backend=backend, threads=1,
                                                   params={"stage2": "joint", "mip_gap": None}))
    # recover the clusters the solver chose (the GPU of each expert, up to GPU names) and enumerate all mappings
    gpu_of = _gpu_of(r, problem)
    w = link_weights(problem.topology)
    share = [np.eye(G)[gpu_of[l]] for l in range(3)]  # [E, G]: expert -> its cluster (named by the chosen GPU)
    C = [share[l].T @ problem.transitions[l] @ share[l + 1] for l in range(2)]
    best = min(sum(boundary_cost(C[l], np.array(p[l]), np.array(p[l + 1]), w) for l in range(2))
               for p in itertools.product(list(itertools.permutations(range(G))), repeat=3))
    assert r.objective == pytest.approx(best) and r.status == "optimal"
    assert r.stats["stage2"] == "joint"


def test_moetuner_unequal_sizes_keep_per_gpu_totals(real):
    problem = _problem(real["stats"], 4, layers=4, experts=8, redundant=8)
    r = solvers.solve("moetuner", problem, Options(time_limit=20, threads=1, params={"cluster_sizes": "unequal"}))
    assert r.stats["cluster_sizes"] == "unequal"
    per_gpu = np.array(r.stats["experts_per_gpu"])  # [L, G] experts (not replicas) each GPU holds
    assert per_gpu.sum(axis=0).tolist() == [8, 8, 8, 8]  # the paper's per-GPU total over the model
    for l in range(4):  # on each GPU its cluster comes first, then replicas filling the free slots
        rows = r.phy2log[l].reshape(4, 4)
        originals = [e for g in range(4) for e in rows[g, :per_gpu[l, g]]]
        assert sorted(originals) == list(range(8))


def test_moetuner_balances_held_out_load_better_than_contiguous(real):
    from solvers.objective import gpu_load, imbalance

    problem = _problem(real["stats"], 4, layers=6)
    held = AffinityStats.from_trace(real["held"]).load[:6]
    imb = {name: imbalance(gpu_load(solvers.solve(name, problem, Options(time_limit=2, threads=1)).phy2log, held,
                                    problem.topology)).mean() for name in ("contiguous", "moetuner")}
    assert imb["moetuner"] < imb["contiguous"]


# time-outs, bounds and bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params,backend", [("exflow", {"bipartition": False}, "cp-sat"),
                                                 ("exflow", {"bipartition": False}, "highs"),
                                                 ("moetuner", {"stage2": "joint"}, "cp-sat")])
def test_time_outs_return_feasible_plans_with_their_gap(real, name, params, backend):
    problem = _problem(real["stats"], 4, layers=3 if name == "exflow" else None)
    r = solvers.solve(name, problem, Options(time_limit=2, threads=1, backend=backend, params=params))
    assert r.status == "feasible"  # registry.solve has checked the placement
    assert 0.0 <= r.bound <= r.objective and r.gap > 0


@pytest.mark.parametrize("name", ["exflow", "moetuner"])
@pytest.mark.parametrize("G,gpn,redundant", [(2, None, 0), (4, 2, 4), (8, 4, 0)])
def test_no_solver_beats_its_own_bound(real, name, G, gpn, redundant):
    problem = _problem(real["stats"], G, layers=3, experts=16, redundant=redundant, gpus_per_node=gpn)
    r = solvers.solve(name, problem, Options(time_limit=1.5, threads=1))
    assert r.bound is not None and r.bound <= r.objective + 1e-12
    assert r.gap == pytest.approx((r.objective - r.bound) / r.objective if r.objective else 0.0)


def test_bad_input_gets_solver_input_errors(real):
    stats = real["stats"]
    topo = Topology.for_experts(64, 4)
    counts_only = Problem(load=stats.load, topology=topo)
    for name in ("exflow", "moetuner"):
        with pytest.raises(SolverInputError):
            solvers.solve(name, counts_only)
    with pytest.raises(SolverInputError):
        solvers.solve("exflow", _problem(stats, 4), Options(params={"form": "token"}))  # no routes
    with pytest.raises(SolverInputError):
        solvers.solve("exflow", _problem(stats, 4), Options(params={"form": "sideways"}))
    with pytest.raises(SolverInputError):
        solvers.solve("moetuner", _problem(stats, 4), Options(params={"cluster_sizes": "unequal",
                                                                      "stage2": "sequential"}))
    with pytest.raises(SolverInputError):
        solvers.solve("moetuner", _problem(stats, 4), Options(backend="gurobi"))
    budget = Problem(load=stats.load, topology=Topology(num_gpus=4, slots_per_gpu=8), budget_slots=32)
    for name in ("eplb", "exflow", "moetuner"):
        with pytest.raises(SolverInputError):
            solvers.solve(name, budget)
