"""The evaluator against a second, naive implementation (plain loops) on small slices of the real trace."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from placement.evaluate import evaluate
from placement.plan import Plan
from solvers import Topology
from traces import datasets


@pytest.fixture(scope="module")
def bundled():
    return datasets.load()


def naive_metrics(phy2log, topo: Topology, ids, seq, E, token_bytes):
    """Every metric computed the obvious way: loops over layers, tokens and experts."""
    L, S = phy2log.shape
    G, spg, gpn = topo.num_gpus, topo.slots_per_gpu, topo.gpus_per_node
    T, _, k = ids.shape
    gpus_of = [[sorted({s // spg for s in range(S) if phy2log[l][s] == e}) for e in range(E)] for l in range(L)]
    # 1. load per GPU, replicas share evenly
    imbs, means, maxes = [], [], []
    for l in range(L):
        load = [0.0] * G
        for t in range(T):
            for e in ids[t][l]:
                if e < 0:
                    continue
                slots = [s for s in range(S) if phy2log[l][s] == e]
                for s in slots:
                    load[s // spg] += 1.0 / len(slots)
        m = sum(load) / G
        imbs.append(max(load) / m)
        means.append(m)
        maxes.append(max(load))
    # 2. affinity locality over k x k pairs
    pairs = same_gpu = same_node = 0
    for t in range(T):
        for l in range(L - 1):
            for a in ids[t][l]:
                for b in ids[t][l + 1]:
                    if a < 0 or b < 0:
                        continue
                    pairs += 1
                    ga, gb = set(gpus_of[l][a]), set(gpus_of[l + 1][b])
                    if ga & gb:
                        same_gpu += 1
                    elif {g // gpn for g in ga} & {g // gpn for g in gb}:
                        same_node += 1
    # 3./4. dispatch with the documented replica rule, bytes
    uniq = {s: i for i, s in enumerate(sorted(set(seq.tolist())))}

    def serve(l, e, h):
        hosts = gpus_of[l][e]
        if h in hosts:
            return h
        near = [g for g in hosts if g // gpn == h // gpn]
        cand = near if near else hosts
        return cand[h % len(cand)]

    fan, fan_nodes, copies = [], [], []
    pair_bytes = np.zeros((G, G))
    for t in range(T):
        h = uniq[int(seq[t])] % G
        for l in range(L):
            experts = [e for e in ids[t][l] if e >= 0]
            if not experts:
                continue
            dest = {serve(l, e, h) for e in experts}
            fan.append(len(dest))
            fan_nodes.append(len({g // gpn for g in dest}))
            for g in dest:
                if g != h:
                    pair_bytes[h, g] += token_bytes  # dispatch
                    pair_bytes[g, h] += token_bytes  # combine
    busiest = max(pair_bytes[g].sum() + pair_bytes[:, g].sum() for g in range(G))
    inter = sum(pair_bytes[a, b] for a in range(G) for b in range(G) if a // gpn != b // gpn)
    return {"load_imbalance": np.mean(imbs), "load_imbalance_max": max(imbs),
            "balancedness": sum(means) / sum(maxes), "affinity_locality": same_gpu / pairs,
            "intra_node_cross_fraction": same_node / pairs, "inter_node_fraction": (pairs - same_gpu - same_node) / pairs,
            "dispatch_gpus": np.mean(fan), "dispatch_nodes": np.mean(fan_nodes), "a2a_bytes": pair_bytes.sum(),
            "a2a_bytes_busiest_gpu": busiest, "a2a_bytes_inter_node": inter}


def _plans(L, E, topo, rng):
    S = topo.num_slots
    contiguous = np.tile(np.arange(S) % E, (L, 1))
    shuffled = np.stack([rng.permutation(np.arange(S) % E) for _ in range(L)])
    return {"contiguous": contiguous, "random-with-replicas": shuffled}


@pytest.mark.parametrize("gpus,gpn,redundant,blocks", [(4, 4, 0, False), (8, 4, 0, False), (4, 2, 8, False),
                                                       (4, 2, 8, True)])
def test_metrics_equal_naive_loops_on_real_slices(bundled, gpus, gpn, redundant, blocks, monkeypatch):
    """``blocks``: the per-token arrays are processed a few tokens at a time (as on long traces), same results."""
    if blocks:
        import placement.evaluate
        import traces.format

        monkeypatch.setattr(placement.evaluate, "_IDS_PER_BLOCK", 7 * 5 * 6)  # 7 tokens of 5 layers x top-6
        monkeypatch.setattr(traces.format, "_PAIRS_PER_BLOCK", 5 * 4 * 36)  # 5 tokens of 4 boundaries
    rng = np.random.default_rng(gpus + redundant)
    fit, held = bundled.split_by_sequence(0.5, seed=1)
    # a small real slice: a few held-out sequences, first layers only, so the loops stay fast
    seqs = np.unique(held.seq_id)[:4]
    part = held.take(np.isin(held.seq_id, seqs))
    part = part.take(np.arange(min(part.num_tokens, 120)))
    L = 5
    ids = part.expert_ids[:, :L].astype(int)
    ids[3, 2, :] = -1  # a token that skipped a layer
    E = bundled.num_experts
    from dataclasses import replace

    sliced = replace(part, expert_ids=ids, gate_weights=part.gate_weights[:, :L],
                     moe_layer_index=part.moe_layer_index[:L])
    topo = Topology.for_experts(E, gpus, redundant, gpn)
    for name, phy2log in _plans(L, E, topo, rng).items():
        plan = Plan(phy2log, E, topo, sliced.moe_layer_index, 27)
        got = evaluate(plan, sliced)["overall"]
        want = naive_metrics(phy2log, topo, ids, sliced.seq_id, E, token_bytes=2048 * 2)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)
        assert got["cross_gpu_fraction"] == pytest.approx(1 - want["affinity_locality"])


def test_contiguous_heldout_metrics_are_sane(bundled):
    """Full held-out half: contiguous placement has roughly random locality (1/G) and imbalance > 1."""
    fit, held = bundled.split_by_sequence(0.5, seed=0)
    topo = Topology.for_experts(64, 8)
    plan = Plan(np.tile(np.arange(64), (26, 1)), 64, topo, bundled.moe_layer_index, 27)
    m = evaluate(plan, held)["overall"]
    assert 1.0 < m["load_imbalance"] <= m["load_imbalance_max"]
    assert abs(m["affinity_locality"] - 1 / 8) < 0.05
    assert 1 <= m["dispatch_gpus"] <= 6
    assert m["inter_node_fraction"] == 0.0  # one node


def test_replica_on_every_gpu_makes_everything_local(bundled):
    """An expert replicated on every GPU is local for every token: locality 1, no bytes, fan-out 1."""
    E, G = 64, 2
    topo = Topology.for_experts(E, G, redundant=E)
    phy2log = np.tile(np.concatenate([np.arange(E), np.arange(E)]), (26, 1))
    plan = Plan(phy2log, E, topo, bundled.moe_layer_index, 27)
    m = evaluate(plan, bundled.take(np.arange(500)))["overall"]
    assert m["affinity_locality"] == 1.0 and m["a2a_bytes"] == 0.0 and m["dispatch_gpus"] == 1.0
    assert m["load_imbalance"] == pytest.approx(1.0)


def test_counts_only_gives_load_metrics(bundled):
    prof = bundled.load_profile()
    topo = Topology.for_experts(64, 4)
    plan = Plan(np.tile(np.arange(64), (26, 1)), 64, topo, bundled.moe_layer_index, 27)
    m_counts = evaluate(plan, prof)["overall"]
    m_trace = evaluate(plan, bundled)["overall"]
    assert m_counts["load_imbalance"] == pytest.approx(m_trace["load_imbalance"])
    assert m_counts["affinity_locality"] is None and m_counts["a2a_bytes"] is None


def test_plan_for_other_model_is_refused(bundled):
    from placement.plan import PlanError

    topo = Topology.for_experts(64, 4)
    plan = Plan(np.tile(np.arange(64), (10, 1)), 64, topo, np.arange(10), 27)
    with pytest.raises(PlanError, match="10 MoE layers"):
        evaluate(plan, bundled)


def test_dispatch_table_prefers_local_then_node():
    from solvers.objective import dispatch_table

    topo = Topology(num_gpus=4, slots_per_gpu=3, gpus_per_node=2)
    # expert 0 on GPUs 0 and 3; expert 1 on GPU 2 only
    row = np.array([0, 2, 3, 4, 5, 6, 1, 7, 2, 0, 3, 4])
    table = dispatch_table(row[None], 8, topo)[0]
    assert list(table[0]) == [0, 0, 3, 3]  # local on 0 and 3, same node otherwise
    assert list(table[1]) == [2, 2, 2, 2]
    for e, h in itertools.product(range(8), range(4)):
        assert row[table[e, h] * 3:(table[e, h] + 1) * 3].tolist().count(e) >= 1
