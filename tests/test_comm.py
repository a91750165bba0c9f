"""Communication models (nccl, deepep-normal, deepep-ll): the evaluator's bytes per link class equal a naive loop
over the tokens written here from the kernels' descriptions, on real held-out tokens, one and two nodes, with and
without replicas; the counts model's expected messages are what the exact ones average to when homes are spread
evenly; bad names are refused.
"""

from __future__ import annotations

import numpy as np
import pytest

from placement.evaluate import evaluate
from placement.plan import Plan
from placement.problem import build_problem
from solvers import Options, SolverInputError, Topology, solve
from solvers.cost import CostModel, message_bytes
from solvers.objective import dispatch_table
from traces import datasets


@pytest.fixture(scope="module")
def split():
    fit, held = datasets.load().split_by_sequence(0.5, seed=0)
    return fit, held.take(np.arange(400))


def _naive(plan: Plan, held, comm: str, cost: CostModel, allow_nvlink: bool = True) -> tuple[float, float]:
    """(NVLink bytes, RDMA bytes) of dispatch + combine, token by token."""
    topo = plan.topology
    G, n = topo.num_gpus, topo.gpus_per_node
    table = dispatch_table(plan.phy2log, plan.num_experts, topo)
    db, cb = message_bytes(cost, "dispatch"), message_bytes(cost, "combine")
    nv = rd = 0.0
    ids = held.sorted_by_gate().expert_ids
    seq = held.sequence_index()
    for t in range(ids.shape[0]):
        h = int(seq[t] % G)
        for l in range(ids.shape[1]):
            dests = [int(table[l, e, h]) for e in ids[t, l] if e >= 0]
            if comm == "nccl":
                for g in set(dests) - {h}:
                    if g // n == h // n:
                        nv += db + cb
                    else:
                        rd += db + cb
            elif comm == "deepep-normal":
                for g in set(dests):
                    relay = (g // n) * n + h % n if g // n != h // n else h
                    if g != relay:
                        nv += db + cb  # from home in its node, or forwarded by the relay
                for node in {g // n for g in dests} - {h // n}:
                    rd += db + cb  # once per remote node, home <-> the relay with its local index
            else:
                for g in dests:
                    if g == h:
                        continue
                    if g // n == h // n and allow_nvlink:
                        nv += db + cb
                    else:
                        rd += db + cb
    return nv, rd


@pytest.mark.parametrize("gpn,redundant", [(8, 0), (4, 0), (4, 8)])
@pytest.mark.parametrize("comm", ["nccl", "deepep-normal", "deepep-ll"])
def test_bytes_per_link_equal_a_naive_loop(split, comm, gpn, redundant):
    fit, held = split
    topo = Topology.for_experts(64, 8, redundant, gpus_per_node=gpn)
    res = solve("eplb-global", build_problem(fit, topo), Options())
    plan = Plan.from_result(res, 64, topo, fit.moe_layer_index, fit.decoder_layers, fit.model)
    cost = CostModel(comm=comm)
    o = evaluate(plan, held, cost)["overall"]
    nv, rd = _naive(plan, held, comm, cost)
    assert o["nvlink_bytes_total"] == nv and o["rdma_bytes_total"] == rd
    assert o["nvlink_bytes"] == pytest.approx(nv / held.num_tokens, rel=1e-12)
    if gpn == 8:
        assert rd == 0.0  # one node: nothing crosses a NIC
    if comm == "deepep-ll":
        nv2, rd2 = _naive(plan, held, comm, CostModel(comm=comm, ll_nvlink=False), allow_nvlink=False)
        o2 = evaluate(plan, held, CostModel(comm=comm, ll_nvlink=False))["overall"]
        assert (o2["nvlink_bytes_total"], o2["rdma_bytes_total"]) == (nv2, rd2) == (0.0, nv + rd)


def test_message_sizes_are_deepeps():
    v3 = CostModel.preset("deepseek-v3", comm="deepep-ll")
    assert message_bytes(v3, "dispatch") == 14352  # internode_ll.cu: 16-byte header + 7168 bf16
    from dataclasses import replace

    assert message_bytes(replace(v3, dtype_bytes=1), "dispatch") == 7408  # FP8 + 56 FP32 scales


@pytest.mark.parametrize("comm", ["nccl", "deepep-normal", "deepep-ll"])
def test_counts_messages_are_the_average_over_homes(comm):
    """With every token present once from each home (homes spread exactly evenly), the exact messages summed per
    GPU equal the counts model's expected messages (2 nodes of 4 GPUs, random tokens)."""
    from solvers import comm as comm_models
    from solvers.comm.base import distinct_sorted, matrix_totals

    topo = Topology(num_gpus=8, slots_per_gpu=1, gpus_per_node=4)
    G, n = 8, 4
    rng = np.random.default_rng(0)
    dest = np.stack([rng.choice(G, size=3, replace=False) for _ in range(50)])  # [t, k] serving GPUs
    model = comm_models.get(comm)
    nv = rd = 0.0
    for h in range(G):  # every token from every home, each with weight 1/G
        a, b = model.token_messages(dest, np.full(len(dest), h), topo)
        nv, rd = nv + a / G, rd + b / G
    exact = matrix_totals(nv, rd)
    first = distinct_sorted(dest)[1]
    gpu_load = np.bincount(dest.ravel(), minlength=G).astype(float)
    distinct = np.array([(dest == g).any(axis=1).sum() for g in range(G)], dtype=float)
    node_distinct = np.array([((dest // n) == N).any(axis=1).sum() for N in range(G // n)], dtype=float)
    assert first.sum() == distinct.sum()
    counted = model.counts_messages(gpu_load, distinct, node_distinct, topo)
    for e, c in zip(exact, counted):
        assert np.allclose(e, c, rtol=1e-12, atol=1e-12)


def test_an_unknown_comm_model_and_coherent_deepep_are_refused():
    with pytest.raises(SolverInputError, match="deepep-normal"):
        CostModel(comm="deepep")
    with pytest.raises(SolverInputError, match="coherent"):
        CostModel(comm="deepep-ll", dataflow="coherent")


@pytest.mark.parametrize("regime", ["compute", "memory"])
def test_roofline_time_matches_a_hand_computed_case(regime):
    """One GPU, two layers of 4 experts, four tokens in one forward step (4 tokens per GPU): layer 0 uses experts
    {0, 1} (three tokens on 0, one on 1), layer 1 only expert 2. The step reads 2 + 1 expert weights; the time is
    max(FLOPs time, weight-read time) + overhead per read, in each regime."""
    from dataclasses import replace

    from traces import RoutingTrace

    ids = np.array([[[0], [2]], [[0], [2]], [[0], [2]], [[1], [2]]])
    tr = RoutingTrace(expert_ids=ids, num_experts=4)
    topo = Topology.for_experts(4, 1)
    plan = Plan.from_result(solve("contiguous", build_problem(tr, topo)), 4, topo, tr.moe_layer_index,
                            tr.decoder_layers, None)
    hbm = 1e30 if regime == "compute" else 1e6
    cost = CostModel(tokens_per_gpu=4, hbm_bandwidth=hbm, expert_overhead=1e-6)
    o = evaluate(plan, tr, cost)["overall"]
    alpha, read = cost.seconds_per_assignment, cost.expert_bytes / hbm
    by_hand = max(alpha * 4, 2 * read) + 2e-6 + max(alpha * 4, 1 * read) + 1e-6
    assert o["est_moe_seconds"] == pytest.approx(by_hand, rel=1e-12)
    if regime == "memory":
        assert 2 * read > alpha * 4  # the weight reads bind
    linear = evaluate(plan, tr, replace(cost, tokens_per_gpu=None))["overall"]["est_moe_seconds"]
    assert linear == pytest.approx(alpha * 8, rel=1e-12)
