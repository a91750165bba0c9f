"""Online rebalancing: the policy (solvers/online.py, placement/online.py), the drift scenarios and the replay.

Properties, not numbers: every map is valid for every input (hypothesis over random loads, layouts and old maps),
``max_moves`` is never exceeded, free moves give a balance at least as good as a fresh plan's, a planted phase
change on real windows is followed at the first rebalance that sees it, the replay's numbers equal a naive loop
written here on a real slice, and bad input to ``moeplace replay`` is one sentence with exit code 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from placement import online as api
from solvers import online
from traces import datasets, drift
from traces.format import layer_counts

ROOT = Path(__file__).resolve().parents[1]


def valid(X: np.ndarray, lay: online.Layout, L: int) -> str | None:
    reason = api.check_map(X, L, lay.num_experts, lay.num_slots, lay.num_gpus)
    if reason is None and lay.keep_groups and online._group_nodes(X, lay.num_experts, lay) is None:
        reason = "an expert group is split over nodes"
    return reason


@st.composite
def instances(draw):
    nodes = draw(st.sampled_from([1, 2]))
    gpn = draw(st.sampled_from([1, 2, 4]))
    G = nodes * gpn
    groups = draw(st.sampled_from([1, 2, 4]))
    E = groups * draw(st.sampled_from([2, 4, 6]))
    keep = draw(st.booleans()) and groups % nodes == 0 and nodes > 1
    spg_min = -(-E // G)
    spg = draw(st.integers(spg_min, spg_min + 2))
    if keep:  # a node must hold its groups' experts
        spg = max(spg, -(-(E // nodes) // gpn))
    spg = min(spg, E // nodes if keep else E)  # a GPU holds distinct experts
    if spg * G < E or (keep and spg * gpn < E // nodes):
        keep, spg = False, max(spg_min, 1)
    L = draw(st.integers(1, 3))
    N = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    skew = draw(st.sampled_from([0.0, 1.0, 3.0]))
    base = rng.gamma(1.0, 1.0, size=(L, E)) ** skew
    W = rng.poisson(base[None] * draw(st.sampled_from([0, 5, 200])), size=(N, L, E)).astype(float)
    lay = online.Layout(E, G * spg, G, nodes, groups, keep)
    old = None
    if draw(st.booleans()):  # a valid map in service: a fresh plan of other loads, shuffled inside nodes
        X = online.fresh_plan(rng.gamma(1.0, 1.0, size=(L, E)), lay)
        for l in range(L):
            for n in range(nodes):
                a, b = n * gpn * spg, (n + 1) * gpn * spg
                X[l, a:b] = rng.permutation(X[l, a:b]) if not keep else X[l, a:b]
        if valid(X, lay, L) is None:
            old = X
    max_moves = draw(st.one_of(st.none(), st.integers(0, 6)))
    move_cost = draw(st.sampled_from([None, 0.0, 1e-3]))
    return W, lay, old, max_moves, move_cost


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_every_map_is_valid_and_max_moves_holds(inst):
    W, lay, old, max_moves, move_cost = inst
    L = W.shape[1]
    X, stats = online.rebalance(W, lay.num_slots, lay.num_groups, lay.num_nodes, lay.num_gpus, old,
                                max_moves=max_moves, move_cost=move_cost, keep_groups_on_nodes=lay.keep_groups,
                                horizon=1e6)
    assert valid(X, lay, L) is None, valid(X, lay, L)
    if old is not None:
        moved = int(online.moved_copies(X, old, lay.num_experts, lay).sum())
        assert moved == stats["moved"]
        if max_moves is not None:
            assert moved <= max_moves
    # the API wrapper gives the same map for the same input
    Y = api.rebalance(W, lay.num_slots, lay.num_groups, lay.num_nodes, lay.num_gpus, old, max_moves=max_moves,
                      move_cost=move_cost, keep_groups_on_nodes=lay.keep_groups, horizon=1e6)
    assert np.array_equal(X, Y)


# real windows ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tasks():
    return {t: datasets.load(tasks=[t]).expert_ids for t in ("intent", "law")}


def windows(ids: np.ndarray, size: int, n: int, start: int = 0) -> np.ndarray:
    return np.stack([layer_counts(ids[start + i * size:start + (i + 1) * size], 64).astype(float) for i in range(n)])


def objective(X, P, lay):
    return float(online.predicted_load(X, P, lay).max(axis=-1).mean(axis=0).sum())


def test_free_moves_balance_at_least_as_well_as_a_fresh_plan(tasks):
    """Fresh plan: the policy called with no map in service on the same windows. With move_cost 0 (and no
    max_moves) the policy from any map in service reaches a predicted busiest-GPU load no higher than it."""
    W = windows(tasks["intent"], 1000, 3)
    lay = online.Layout(64, 72, 8)
    fresh, _ = online.rebalance(W, 72, 1, 1, 8, None)
    P, _ = online.select_windows(W)
    for old in (np.tile(np.arange(72) % 64, (26, 1)), online.fresh_plan(windows(tasks["law"], 1000, 1)[0], lay)):
        X, stats = online.rebalance(W, 72, 1, 1, 8, old, move_cost=0.0)
        assert objective(X, P, lay) <= objective(fresh, P, lay) * (1 + 1e-12)
        with_cost, _ = online.rebalance(W, 72, 1, 1, 8, old)  # a move cost only ever moves less
        assert online.moved_copies(with_cost, old, 64, lay).sum() <= online.moved_copies(X, old, 64, lay).sum()


def test_a_planted_phase_change_is_followed_within_one_interval(tasks):
    """Four windows of intent, then law: at the first rebalance whose newest window is law, the policy drops the
    intent windows and its map balances the next law window about as well as a fresh plan of law does, far better
    than the intent map it replaces; while intent continues it keeps all four windows."""
    lay = online.Layout(64, 72, 8)
    before = windows(tasks["intent"], 1000, 4)
    after = windows(tasks["law"], 1000, 2)
    pol = api.OnlinePolicy(horizon=1e4)  # a long interval: moves are cheap next to the balance they buy
    old = None
    for w in before:
        old = pol(w, 72, 1, 1, 8, old)
    assert pol.last_stats["windows"] == 4 and not pol.last_stats["change"]
    new = pol(after[0], 72, 1, 1, 8, old)
    assert pol.last_stats["change"] and pol.last_stats["windows"] == 1

    def imb(X):
        gl = online.predicted_load(X, after[1], lay)[0]
        return float((gl.max(-1) / gl.mean(-1)).mean())

    fresh, _ = online.rebalance(after[0], 72, 1, 1, 8, None)
    assert imb(new) <= imb(fresh) + 0.25 * (imb(old) - imb(fresh))
    assert imb(new) < imb(old)


def test_api_keeps_the_kind_and_refuses_bad_input():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w = rng.poisson(50, size=(3, 16)).astype(float)
    X = api.rebalance(w, 20, 1, 1, 4)
    assert isinstance(X, np.ndarray) and X.shape == (3, 20)
    T = api.rebalance(torch.tensor(w), 20, 1, 1, 4, torch.tensor(X))
    assert isinstance(T, torch.Tensor) and T.dtype == torch.int64 and tuple(T.shape) == (3, 20)
    assert api.rebalance(np.stack([w, w]), 20, 1, 1, 4).shape == (3, 20)
    bad = [((w, 21, 1, 1, 4), {}), ((w, 20, 3, 1, 4), {}), ((w[0], 20, 1, 1, 4), {}), ((-w, 20, 1, 1, 4), {}),
           ((w, 20, 1, 1, 4, X[:, :19]), {}), ((w, 20, 1, 1, 4), {"max_move": 3}), ((w, 20, 1, 1, 4), {"max_moves": -1})]
    for args, kw in bad:
        with pytest.raises(api.RebalanceInputError):
            api.rebalance(*args, **kw)


def test_scenarios_stream_held_out_sequences_only():
    held = {t: h for t, (_, h) in drift.split().items()}
    fit = drift.fit_trace()
    key = lambda ids: {r.tobytes() for r in ids.reshape(len(ids), -1)}  # noqa: E731
    held_rows = set().union(*(key(h.expert_ids) for h in held.values()))
    fit_rows = key(fit.expert_ids) - held_rows  # rows that occur only in the fit halves
    for name in ("phases", "mix-0.3"):
        sc = drift.scenario(f"esft-drift:{name}")
        rows = key(sc.expert_ids)
        assert rows <= held_rows and not rows & fit_rows
    counts = drift.scenario("esft-drift:counts")
    assert counts.logical_count.shape[1:] == (26, 64)


# the replay against a naive loop ---------------------------------------------------------------------------------

def test_replay_equals_a_naive_loop():
    from placement.evaluate import evaluate
    from placement.plan import Plan
    from placement.replay import ReplaySetup, make_policy, replay
    from solvers import Topology
    from solvers.cost import CostModel
    from solvers.eplb import rebalance_experts

    sc = drift.scenario("esft-drift:phases")
    data = sc.take(np.arange(3500, 8700))  # intent into law: a phase change inside the slice
    topo = Topology.for_experts(64, 4, 4, gpus_per_node=2)
    cost = CostModel()
    W, I, scale = 1200, 900, 3.0
    setup = ReplaySetup(topo, W, I, cost=cost, scale=scale)
    fixed = rebalance_experts(layer_counts(data.expert_ids, 64), 68, 1, 1, 4)[0]
    res = replay(data, {"eplb": make_policy("eplb", setup), "static": make_policy("static", setup),
                        "moeplace": make_policy("moeplace", setup, max_moves=40), "fixed": fixed}, setup)

    T, E, S, G = data.num_tokens, 64, 68, 4
    gpu_of = np.arange(S) // (S // G)
    node_of = np.arange(G) // 2
    own = api.OnlinePolicy(horizon=scale * I / W, cost=cost, max_moves=40)
    cnt = lambda a, b: layer_counts(data.expert_ids[a:b], E).astype(float)  # noqa: E731
    for name in ("eplb", "static", "moeplace", "fixed"):
        cur = fixed if name == "fixed" else rebalance_experts(cnt(0, W), S, 1, 1, G)[0]
        t, k = W, 0
        while t < T:
            window = cnt(t - W, t)
            if name == "eplb":
                new = rebalance_experts(window, S, 1, 1, G)[0]
            elif name == "moeplace":
                new = np.asarray(own(window, S, 1, 2, G, cur))  # two nodes of two GPUs
            else:
                new = cur
            row = res["policies"][name]["rebalances"][k]
            b = min(t + I, T)
            judged = cnt(t, b)
            # imbalance: GPU loads by a loop over slots
            imbs = []
            for l in range(26):
                reps = np.bincount(new[l], minlength=E)
                gl = np.zeros(G)
                for s in range(S):
                    gl[gpu_of[s]] += judged[l, new[l, s]] / reps[new[l, s]]
                imbs.append(gl.max() / gl.mean())
            assert row["load_imbalance"] == pytest.approx(np.mean(imbs), rel=1e-12), (name, k)
            assert row["load_imbalance_max"] == pytest.approx(max(imbs), rel=1e-12)
            # copies moved, and their link time: each from the first holder in the receiver's node, else anywhere
            moved, pair = 0, np.zeros((G, G))
            for l in range(26):
                for g in range(G):
                    for e in set(new[l, gpu_of == g]) - set(cur[l, gpu_of == g]):
                        holders = [h for h in range(G) if e in cur[l, gpu_of == h]]
                        local = [h for h in holders if node_of[h] == node_of[g]]
                        pair[(local or holders)[0], g] += cost.expert_bytes
                        moved += 1
            assert row["moved_copies"] == moved
            link = []
            for g in range(G):
                t_g = 0.0
                for same, bw in ((True, topo.intra_node_bandwidth), (False, topo.inter_node_bandwidth)):
                    peers = [h for h in range(G) if h != g and (node_of[h] == node_of[g]) == same]
                    t_g += max(pair[g, peers].sum(), pair[peers, g].sum()) / bw
                link.append(t_g)
            assert row["migration_seconds"] == pytest.approx(max(link), rel=1e-9)
            # estimated MoE time: the evaluator on the judged tokens, times the scale
            plan = Plan(new, E, topo, data.moe_layer_index, data.num_hidden_layers)
            est = evaluate(plan, data.take(np.arange(t, b)), cost)["overall"]["est_moe_seconds"]
            assert row["est_moe_seconds"] == pytest.approx(est * scale, rel=1e-9)
            cur, t, k = new, t + I, k + 1
        assert k == len(res["policies"][name]["rebalances"])


# the command line ------------------------------------------------------------------------------------------------

def run(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "placement.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    from traces import save

    p = tmp_path_factory.mktemp("replay") / "slice.npz"
    save(drift.scenario("esft-drift:phases").take(np.arange(3000, 7000)), p)
    return p


def test_replay_command_json_and_plot(small_trace, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "replay.png"
    r = run("replay", str(small_trace), "--gpus", "4", "--redundant", "4", "--window", "1000", "--interval", "1000",
            "--policy", "eplb", "--policy", "moeplace", "--scale", "100", "--plot", str(png), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res["policies"]) == {"eplb", "moeplace"} and res["setup"]["rebalances"] == 3
    from placement.replay import markdown_table

    table = markdown_table(res).splitlines()
    assert len(table) == 4 and table[2].startswith("| eplb |") and table[3].startswith("| moeplace |")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("case", ["window", "interval", "model"])
def test_replay_bad_input_is_one_sentence_and_exit_2(small_trace, tmp_path, case):
    from traces import LoadProfile, save

    args = ["replay", str(small_trace), "--gpus", "4", "--window", "1000", "--interval", "1000"]
    if case == "window":
        args[args.index("--window") + 1] = "4000"
    elif case == "interval":
        args[args.index("--interval") + 1] = "0"
    else:  # counts of another model next to counts of this one
        a, b = tmp_path / "a.npz", tmp_path / "b.npz"
        save(LoadProfile(np.ones((3, 26, 64))), a)
        save(LoadProfile(np.ones((3, 26, 128))), b)
        args = ["replay", str(a), str(b), "--gpus", "4", "--window", "1", "--interval", "1"]
    r = run(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [x for x in r.stderr.strip().splitlines() if x.strip() and x.strip() != "replaying"]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
