"""Affinity model: counts equal naive loops on real data, merging is exact, a planted structure is recovered."""

from __future__ import annotations

import numpy as np
import pytest

from placement.affinity import AffinityStats, mutual_information
from traces import RoutingTrace, datasets


@pytest.fixture(scope="module")
def law():
    return datasets.load("deepseek-v2-lite-esft:law")


@pytest.mark.parametrize("blocks", [False, True])
def test_counts_equal_naive_loops_on_real_slice(law, blocks, monkeypatch):
    """``blocks``: the k x k pair counts are made a few tokens at a time (as on long traces), same counts."""
    if blocks:
        import traces.format

        monkeypatch.setattr(traces.format, "_PAIRS_PER_BLOCK", 3 * 26 * 36)  # 3 tokens per block
    part = law.take(np.arange(150))
    st = AffinityStats.from_trace(part)
    E, (T, L, k) = part.num_experts, part.expert_ids.shape
    load = np.zeros((L, E))
    trans = np.zeros((L - 1, E, E))
    trans_g = np.zeros((L - 1, E, E))
    coact = np.zeros((L, E, E))
    ids, g = part.expert_ids, part.gate_weights
    for t in range(T):
        for l in range(L):
            for i in range(k):
                load[l, ids[t, l, i]] += 1
                for j in range(k):
                    if i != j:
                        coact[l, ids[t, l, i], ids[t, l, j]] += 1
                    if l < L - 1:
                        trans[l, ids[t, l, i], ids[t, l + 1, j]] += 1
                        trans_g[l, ids[t, l, i], ids[t, l + 1, j]] += float(g[t, l, i]) * float(g[t, l + 1, j])
    assert np.array_equal(st.load, load)
    assert np.array_equal(st.transitions, trans)
    assert np.array_equal(st.coactivation, coact) and np.array_equal(coact, coact.transpose(0, 2, 1))
    assert np.allclose(st.transitions_gate, trans_g, rtol=1e-5)
    top1 = part.top1_ids()
    t1 = np.zeros((L - 1, E, E))
    for t in range(T):
        for l in range(L - 1):
            t1[l, top1[t, l], top1[t, l + 1]] += 1
    assert np.array_equal(st.transitions_top1, t1)
    lean = AffinityStats.from_trace(part, baselines=False)  # what the planner asks for: same counts, no baselines
    assert np.array_equal(lean.transitions, trans) and np.array_equal(lean.coactivation, coact)
    assert np.array_equal(lean.transitions_top1, t1) and np.array_equal(lean.load, load)
    assert lean.transitions_shuffled is None and lean.transitions_gate is None
    # the shuffled baseline keeps both marginals
    assert np.array_equal(st.transitions_shuffled.sum(axis=2), trans.sum(axis=2))
    assert np.array_equal(st.transitions_shuffled.sum(axis=1), trans.sum(axis=1))


def test_merge_is_exact(law, tmp_path):
    whole = AffinityStats.from_trace(law)
    halves = AffinityStats.from_trace(law.take(np.arange(4000))) + AffinityStats.from_trace(law.take(np.arange(4000, law.num_tokens)))
    path = tmp_path / "law.npz"
    import traces

    traces.save(law, path)
    streamed = AffinityStats.from_file(path, chunk_tokens=777)
    for other in (halves, streamed):
        for key in ("load", "transitions", "coactivation", "transitions_top1", "tokens"):
            assert np.array_equal(getattr(whole, key), getattr(other, key)), key
        assert np.allclose(whole.transitions_gate, other.transitions_gate)


def planted_trace(T=6000, L=6, E=16, k=1, noise=0.05, seed=0):
    """Expert at layer l+1 = perm_l(expert at l) except for a `noise` share of tokens (random expert)."""
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(E) for _ in range(L - 1)]
    ids = np.empty((T, L, k), dtype=np.int64)
    ids[:, 0] = np.argsort(rng.random((T, E)), axis=1)[:, :k]
    for l in range(1, L):
        nxt = perms[l - 1][ids[:, l - 1]]
        noisy = rng.random(T) < noise
        nxt[noisy] = np.argsort(rng.random((int(noisy.sum()), E)), axis=1)[:, :k]
        ids[:, l] = nxt
    return RoutingTrace(expert_ids=ids, num_experts=E, seq_id=np.arange(T) // 50), perms


def test_planted_permutation_is_recovered():
    trace, perms = planted_trace()
    st = AffinityStats.from_trace(trace)
    cond = st.conditional()
    for l, perm in enumerate(perms):
        planted = cond[l, np.arange(16), perm]
        assert planted.min() > 0.9  # near-1 conditional probability on the planted successor
        assert np.array_equal(cond[l].argmax(axis=1), perm)
    mi, mi_shuf = st.mutual_information(), st.mutual_information("transitions_shuffled")
    assert (mi > 2.0).all() and (mi_shuf < 0.05).all()  # log(16) = 2.77 nats at most


def test_real_trace_has_affinity_far_above_shuffled(law):
    s = AffinityStats.from_trace(law).summary()
    for b in s["per_boundary"]:
        assert b["mutual_information"] > 5 * b["mutual_information_shuffled"]


def test_mutual_information_of_independent_and_identical():
    E = 8
    independent = np.ones((1, E, E))
    identical = np.eye(E)[None]
    assert mutual_information(independent)[0] == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(identical)[0] == pytest.approx(np.log(E))
