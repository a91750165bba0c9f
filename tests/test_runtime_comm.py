"""The runtime speaks the communication models (issue 20): on gloo with 2 nodes x 2 ranks, the bytes each protocol
(nccl, deepep-normal, deepep-ll) actually sends per link class (NVLink inside a node, RDMA across nodes) and phase
equal the evaluator's prediction under the same model exactly, for real held-out tokens of the bundled trace, with
and without redundant slots; the outputs equal the single-process reference.

One spawned gloo group of 4 processes runs every distributed check (module fixture) to keep the file fast.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from placement.evaluate import evaluate, token_traffic  # noqa: E402
from placement.plan import Plan  # noqa: E402
from placement.runtime import PROTOCOLS, select_tokens  # noqa: E402
from solvers import Topology  # noqa: E402
from solvers import comm as comm_models  # noqa: E402
from solvers.cost import CostModel  # noqa: E402
from tests.test_runtime import affinity_plan  # noqa: E402
from traces import datasets  # noqa: E402

W, N = 4, 2  # ranks, ranks per node: 2 nodes x 2
H, I = 32, 8  # hidden size (bytes scale with it) and expert width of the random experts
DTYPE_BYTES = 4  # the runtime computes and dispatches in fp32 here: CostModel(dtype_bytes=4)
LINKS = ("nvlink_dispatch_bytes", "rdma_dispatch_bytes", "nvlink_combine_bytes", "rdma_combine_bytes")


def with_nodes(plan: Plan, gpus_per_node: int) -> Plan:
    d = plan.to_dict()
    d["topology"]["gpus_per_node"] = gpus_per_node
    d["solver"] = {**d["solver"], "name": f"{plan.name}@{gpus_per_node}"}
    return Plan.from_dict(d)


def runs(plans: list[Plan]) -> list[tuple]:
    """(plan, protocol, ll_nvlink, combine dtype) of every distributed run: each protocol on each 2 x 2 plan with
    its own wire format (DeepEP combines in bf16) and with an fp32 combine (exact outputs); deepep-ll with same-node
    copies counted as RDMA; deepep-normal on one node of 4 and on 4 nodes of 1 (subgroups of one rank)."""
    out = [(p.name, proto, True, wire) for p in plans for proto in PROTOCOLS for wire in (None, "fp32")]
    out.append((plans[1].name, "deepep-ll", False, None))
    out += [(f"{plans[1].name}@{n}", "deepep-normal", True, None) for n in (W, 1)]
    return out


def _job(rank: int, world: int, args: dict) -> None:
    import torch.distributed as dist

    from placement import runtime as rt

    if args["backend"] == "nccl":  # one GPU per rank
        device = rt.device_for("nccl", rank)
    else:  # gloo, CPU tensors, or CUDA tensors with ranks sharing the GPUs (tests/test_cuda.py)
        device = torch.device("cuda", rank % torch.cuda.device_count()) if args["cuda"] else torch.device("cpu")
    plans = {p["solver"]["name"]: Plan.from_dict(p) for p in args["plans"]}
    router = rt.trace_router(args["ids"], args["w"], device)
    T = args["ids"].shape[0]
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(11))
    mine = torch.as_tensor(np.nonzero(args["seq"] % world == rank)[0])
    report = {}
    with torch.no_grad():
        held = {}
        for name, proto, ll_nvlink, wire in args["runs"]:
            plan = plans[name]
            if name not in held:
                held[name] = rt.random_rank_experts(plan, rank, H, I, torch.float32, device)
            comm = rt.Comm.for_plan(plan, device, proto, ll_nvlink, torch.float32 if wire == "fp32" else None)
            tid, out = rt.run_stack(rt.build_layers(held[name], plan, comm), x[mine].to(device), mine.to(device),
                                    router, "standard")
            parts = [None] * world
            dist.all_gather_object(parts, (tid.cpu(), out.cpu(), [getattr(comm.stats, f) for f in LINKS],
                                           out.device.type))
            if rank == 0:
                got = torch.zeros_like(x)
                seen = torch.zeros(T, dtype=torch.int64)
                for t, o, _, _ in parts:
                    got[t] = o
                    seen[t] += 1
                report[f"{name}/{proto}/{ll_nvlink}/{wire}"] = {
                    "bytes": dict(zip(LINKS, np.sum([p[2] for p in parts], axis=0).tolist())),
                    "every_token_once": bool((seen == 1).all()), "devices": sorted({p[3] for p in parts}), "out": got}
    if rank == 0:  # every expert in one process: the same weights and routing
        plan = next(iter(plans.values()))
        layers = []
        for l in range(plan.num_layers):
            ws = [rt.random_expert(l, e, plan.num_experts, H, I) for e in range(plan.num_experts)]
            layers.append(rt.LayerExperts(np.arange(plan.num_experts), *[torch.stack([w[i] for w in ws])
                                                                          for i in range(3)], plan.num_experts))
        ref = rt.reference_stack(layers, x, rt.trace_router(args["ids"], args["w"]))  # on the CPU
        for r in report.values():
            d = (r.pop("out") - ref).abs()
            r.update(max_abs_diff=float(d.max()), mean_abs_diff=float(d.mean()), scale=float(ref.abs().max()),
                     mean_abs=float(ref.abs().mean()))
        with open(args["out"], "w") as f:
            json.dump(report, f)


def inputs(out: str, cuda: bool = False, backend: str = "gloo") -> tuple:
    """``(held-out tokens, plans by name, the job's args)``: about 300 held-out tokens of the bundled trace (whole
    sequences), a contiguous plan and an affinity plan with 8 redundant slots (the hottest experts replicated, so
    replicas on both nodes exercise the node rule) on 2 nodes x 2 ranks, and the affinity plan on 1 node of 4 and on
    4 nodes of 1."""
    tr = datasets.load()
    fit, held = tr.split_by_sequence(0.5, seed=0)
    sub = select_tokens(held, 300, seed=1)
    L, E = tr.num_layers, tr.num_experts
    contig = Plan(np.tile(np.arange(E), (L, 1)), E, Topology(W, E // W, N), tr.moe_layer_index, 27,
                  solver={"name": "contiguous"})
    aff = Plan(affinity_plan(fit, W, redundant=8), E, Topology(W, (E + 8) // W, N), tr.moe_layer_index, 27,
               solver={"name": "affinity"})
    plans = {p.name: p for p in (contig, aff, with_nodes(aff, W), with_nodes(aff, 1))}
    args = {"plans": [p.to_dict() for p in plans.values()], "ids": sub.expert_ids, "w": sub.gate_weights,
            "seq": sub.sequence_index(), "runs": runs([contig, aff]), "out": out, "cuda": cuda, "backend": backend}
    return sub, plans, args


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from placement.runtime import launch

    d = tmp_path_factory.mktemp("rtcomm")
    sub, plans, args = inputs(str(d / "report.json"))
    launch(_job, W, (args,), threads=1)
    return sub, plans, json.loads((d / "report.json").read_text())


def predicted(plan: Plan, sub, proto: str, ll_nvlink: bool = True) -> dict:
    """The evaluator's bytes per link class (dispatch + combine) and, per phase, its messages times the model's
    message size."""
    ev = evaluate(plan, sub, CostModel(hidden_size=H, dtype_bytes=DTYPE_BYTES, comm=proto, ll_nvlink=ll_nvlink))
    tr = token_traffic(plan.phy2log, plan.num_experts, plan.topology, sub.expert_ids, sub.sequence_index(),
                       comm=proto, ll_nvlink=ll_nvlink)
    size = comm_models.get(proto).message_bytes
    phases = {f"{k}_{ph}_bytes": float(tr[k].sum()) * size(H, DTYPE_BYTES, ph)
              for k in ("nvlink", "rdma") for ph in ("dispatch", "combine")}
    return {"nvlink": ev["overall"]["nvlink_bytes_total"], "rdma": ev["overall"]["rdma_bytes_total"], **phases}


@pytest.mark.parametrize("plan", ["contiguous", "affinity"])
@pytest.mark.parametrize("proto", PROTOCOLS)
def test_measured_bytes_per_link_equal_the_evaluator(setup, plan, proto):
    sub, plans, rep = setup
    m = rep[f"{plan}/{proto}/True/None"]["bytes"]
    p = predicted(plans[plan], sub, proto)
    assert m["nvlink_dispatch_bytes"] + m["nvlink_combine_bytes"] == p["nvlink"] > 0
    assert m["rdma_dispatch_bytes"] + m["rdma_combine_bytes"] == p["rdma"] > 0
    assert m == {k: p[k] for k in m}


def test_protocols_differ_as_their_kernels(setup):
    """deepep-normal sends a token once per remote node over RDMA: fewer RDMA bytes than nccl's one copy per remote
    rank; deepep-ll one message per token-expert copy, 16 bytes longer: more than nccl's deduplicated copies; both
    DeepEP protocols combine in bf16 (half an fp32 dispatch message, the header apart)."""
    sub, plans, rep = setup
    for plan in ("contiguous", "affinity"):
        b = {proto: rep[f"{plan}/{proto}/True/None"]["bytes"] for proto in PROTOCOLS}
        assert b["deepep-normal"]["rdma_dispatch_bytes"] < b["nccl"]["rdma_dispatch_bytes"]
        assert b["deepep-ll"]["rdma_dispatch_bytes"] / (H * 4 + 16) > b["nccl"]["rdma_dispatch_bytes"] / (H * 4)
        assert b["nccl"]["rdma_combine_bytes"] == b["nccl"]["rdma_dispatch_bytes"]
        assert 2 * b["deepep-normal"]["rdma_combine_bytes"] == b["deepep-normal"]["rdma_dispatch_bytes"]
        assert b["deepep-ll"]["rdma_combine_bytes"] / (H * 2) == b["deepep-ll"]["rdma_dispatch_bytes"] / (H * 4 + 16)


def test_ll_without_nvlink_counts_same_node_copies_as_rdma(setup):
    sub, plans, rep = setup
    m = rep["affinity/deepep-ll/False/None"]["bytes"]
    p = predicted(plans["affinity"], sub, "deepep-ll", ll_nvlink=False)
    assert m["nvlink_dispatch_bytes"] == m["nvlink_combine_bytes"] == p["nvlink"] == 0
    assert m["rdma_dispatch_bytes"] + m["rdma_combine_bytes"] == p["rdma"]
    on = rep["affinity/deepep-ll/True/None"]["bytes"]
    assert sum(m.values()) == sum(on.values())


@pytest.mark.parametrize("nodes", [f"affinity@{W}", "affinity@1"])
def test_deepep_normal_on_one_node_and_on_single_rank_nodes(setup, nodes):
    """One node of 4 (no RDMA: every inter-node subgroup has one rank) and 4 nodes of 1 (the relay is the target)."""
    sub, plans, rep = setup
    r = rep[f"{nodes}/deepep-normal/True/None"]
    p = predicted(plans[nodes], sub, "deepep-normal")
    assert r["bytes"] == {k: p[k] for k in LINKS}
    assert (p["rdma"] == 0) == (nodes.endswith(f"@{W}")) and (p["nvlink"] == 0) == nodes.endswith("@1")
    assert r["every_token_once"] and r["mean_abs_diff"] <= 5e-3 * r["mean_abs"]


@pytest.mark.parametrize("plan", ["contiguous", "affinity"])
@pytest.mark.parametrize("proto", PROTOCOLS)
def test_outputs_equal_the_reference(setup, plan, proto):
    """With an fp32 combine every protocol gives the single-process reference to fp32 rounding (the same paths as
    the byte-exact runs, only the combine's wire dtype differs). With DeepEP's bf16 combine the difference stays at
    bf16 rounding accumulated over the 26 layers (mean under 0.5% of the outputs' mean magnitude;
    about 0.1% here)."""
    _, _, rep = setup
    exact = rep[f"{plan}/{proto}/True/fp32"]
    assert exact["every_token_once"]
    assert exact["max_abs_diff"] <= 1e-4 * max(1.0, exact["scale"])
    wire = rep[f"{plan}/{proto}/True/None"]
    assert wire["every_token_once"]
    if proto == "nccl":
        assert wire["max_abs_diff"] <= 1e-4 * max(1.0, wire["scale"])
    else:
        assert wire["mean_abs_diff"] <= 5e-3 * wire["mean_abs"]


# ---------------------------------------------------------------------------------------------------------------
# the CLI verb
# ---------------------------------------------------------------------------------------------------------------

def _cli(*args):
    from typer.testing import CliRunner

    from placement.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def plan_2x2(tmp_path_factory):
    p = tmp_path_factory.mktemp("bench_comm") / "eplb.json"
    r = _cli("plan", "deepseek-v2-lite-esft:law", "--gpus", W, "--gpus-per-node", N, "--redundant", 4, "--solver",
             "eplb", "--holdout", 0.5, "--out", p)
    assert r.exit_code == 0, r.output
    return p


def test_bench_cli_comm_reports_link_bytes_next_to_evaluator(plan_2x2):
    r = _cli("bench", plan_2x2, "--trace", "deepseek-v2-lite-esft:law", "--holdout", 0.5, "--tokens", 150,
             "--hidden-size", 16, "--dtype", "bf16", "--comm", "deepep-normal", "--repeats", 1, "--warmup", 0, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["comm"] == "deepep-normal" and rep["world_size"] == W
    row = rep["plans"][0]
    held = datasets.load("deepseek-v2-lite-esft:law").split_by_sequence(0.5, seed=0)[1]
    sub = select_tokens(held, 150, seed=0)
    ev = evaluate(Plan.load(plan_2x2), sub, CostModel(hidden_size=16, dtype_bytes=2, comm="deepep-normal"))["overall"]
    m = row["measured"]
    assert (m["nvlink_bytes"], m["rdma_bytes"]) == (ev["nvlink_bytes_total"], ev["rdma_bytes_total"])
    assert ev["rdma_bytes_total"] > 0 and row["nvlink_rel_diff"] == row["rdma_rel_diff"] == 0
    assert sum(m["per_layer_a2a_bytes"]) == m["a2a_bytes"] == ev["a2a_bytes"]


def test_bench_cli_comm_bad_input_is_one_sentence_exit_2(plan_2x2):
    cases = [
        (("--comm", "deepep"), "is not one of nccl, deepep-normal, deepep-ll"),
        (("--comm", "deepep-ll", "--dataflow", "coherent"), "coherent dataflow runs with --comm nccl only"),
        (("--comm", "deepep-normal", "--dataflow", "both"), "coherent dataflow runs with --comm nccl only"),
        (("--gpus-per-node", 3), "--gpus-per-node 3 must divide the world size 4"),
        (("--world-size", 2), "is for 4 GPUs but the world size is 2"),
    ]
    for extra, words in cases:
        r = _cli("bench", plan_2x2, *extra)
        assert r.exit_code == 2, (extra, r.output)
        text = " ".join(r.output.split())
        assert words in text and "Traceback" not in text, (extra, r.output)
