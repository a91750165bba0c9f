"""The torch.distributed runtime: measured all-to-all bytes equal the evaluator's prediction on the bundled real
trace, distributed outputs equal a single-process reference (a Hugging Face Mixtral block and the replayed
trace), for both dataflows, contiguous and affinity plans with replicas; re-planning moves exactly the plan diff.

The distributed checks run in one spawned gloo group of 4 processes (module fixture) to keep the file fast."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from placement.affinity import AffinityStats  # noqa: E402
from placement.evaluate import evaluate  # noqa: E402
from placement.plan import Plan  # noqa: E402
from placement.runtime import (BenchSpec, anchor_column, coherent_traffic, plan_moves,  # noqa: E402
                               predict_a2a, rank_experts, select_tokens)
from solvers import Topology  # noqa: E402
from solvers.cost import CostModel  # noqa: E402
from traces import RoutingTrace, datasets  # noqa: E402

W = 4  # ranks of the spawned group
H_TRACE, I_TRACE = 32, 8  # hidden / expert intermediate size for the trace replay (bytes scale with H)


def make_plan(phy2log, num_experts, gpus, mli, name, num_hidden_layers=None) -> Plan:
    phy2log = np.asarray(phy2log)
    topo = Topology(num_gpus=gpus, slots_per_gpu=phy2log.shape[1] // gpus)
    mli = np.asarray(mli)
    return Plan(phy2log, num_experts, topo, mli, num_hidden_layers or int(mli[-1]) + 1, solver={"name": name})


def affinity_plan(fit: RoutingTrace, gpus: int, redundant: int = 0) -> np.ndarray:
    """``[L, S]`` co-activation grouping (Occult-style greedy): the hottest experts get one extra replica each,
    then physical experts (replicated ones first, then heaviest first) join the GPU with room whose experts they
    are most often chosen with (ties: lighter GPU); never two replicas of one expert on one GPU."""
    E, L = fit.num_experts, fit.num_layers
    S = E + redundant
    cap = S // gpus
    out = np.zeros((L, S), dtype=np.int64)
    stats = AffinityStats.from_trace(fit)
    for l in range(L):
        load, co = stats.load[l], stats.coactivation[l]
        phys = list(range(E)) + list(np.argsort(-load)[:redundant])
        reps = np.bincount(phys, minlength=E)
        weight = np.array([load[e] / reps[e] for e in phys])
        groups: list[list[int]] = [[] for _ in range(gpus)]
        gl = np.zeros(gpus)
        for p in np.lexsort((-weight, reps[phys] == 1)):  # replicated experts first: they cannot share a GPU
            e = phys[p]
            best = None
            for g in range(gpus):
                if len(groups[g]) >= cap or e in groups[g]:
                    continue
                key = (co[e, groups[g]].sum() if groups[g] else 0.0, -gl[g])
                if best is None or key > best[0]:
                    best = (key, g)
            groups[best[1]].append(e)
            gl[best[1]] += weight[p]
        out[l] = np.concatenate(groups)
    return out


# ---------------------------------------------------------------------------------------------------------------
# pure functions (no processes)
# ---------------------------------------------------------------------------------------------------------------

def test_coherent_top1_bytes_are_exflow_hops():
    """With top-1 routing the coherent dataflow sends one copy exactly when a token changes GPU (ExFlow's hop),
    counted per token by brute force over the bundled trace's highest-gate experts."""
    tr = datasets.load().take(np.arange(3000))
    top1 = tr.top1_ids()[:, :, None]
    G = 4
    plan = make_plan(np.tile(np.random.default_rng(1).permutation(64), (tr.num_layers, 1)), 64, G,
                     tr.moe_layer_index, "perm")
    res = coherent_traffic(plan.phy2log, 64, plan.topology, top1, None, tr.sequence_index())
    gpu_of = np.empty((tr.num_layers, 64), dtype=int)
    for l in range(tr.num_layers):
        gpu_of[l, plan.phy2log[l]] = np.arange(64) // plan.topology.slots_per_gpu
    hops = 0
    for t in range(tr.num_tokens):
        pos = tr.sequence_index()[t] % G
        for l in range(tr.num_layers):
            g = gpu_of[l, top1[t, l, 0]]
            hops += g != pos
            pos = g
    assert res["dispatch_pairs"].sum() == hops
    assert res["combine_pairs"].sum() == 0  # top-1: one all-to-all per layer


def test_coherent_prediction_counts_dispatch_and_anchor_combine():
    """Per token: remote serving GPUs from its position (dispatch) + serving GPUs other than its anchor (combine),
    checked against a direct loop on a few hundred real tokens with replicas."""
    tr = datasets.load().take(np.arange(400))
    G = 4
    phy = affinity_plan(tr, G, redundant=4)
    plan = make_plan(phy, 64, G, tr.moe_layer_index, "aff")
    from solvers.objective import dispatch_table
    table = dispatch_table(plan.phy2log, 64, plan.topology)
    res = coherent_traffic(plan.phy2log, 64, plan.topology, tr.expert_ids, tr.gate_weights, tr.sequence_index())
    disp = comb = 0
    for t in range(tr.num_tokens):
        pos = tr.sequence_index()[t] % G
        for l in range(tr.num_layers):
            e = tr.expert_ids[t, l]
            D = {int(table[l, x, pos]) for x in e if x >= 0}
            anchor = int(table[l, e[int(np.argmax(tr.gate_weights[t, l]))], pos])
            disp += len(D - {pos})
            comb += len(D - {anchor})
            pos = anchor
    assert res["dispatch_pairs"].sum() == disp
    assert res["combine_pairs"].sum() == comb
    assert anchor_column(np.array([[-1, 3, 5]]), np.array([[9.0, 0.2, 0.7]]))[0] == 2


def test_plan_moves_are_the_plan_diff():
    tr = datasets.load().take(np.arange(2000))
    G = 4
    contig = np.tile(np.arange(68) % 64, (tr.num_layers, 1))
    aff = affinity_plan(tr, G, redundant=4)
    topo = Topology(num_gpus=G, slots_per_gpu=17)
    moves = plan_moves(contig, aff, topo)
    diff = 0
    for l in range(tr.num_layers):
        for g in range(G):
            old = set(contig[l, g * 17:(g + 1) * 17].tolist())
            new = set(aff[l, g * 17:(g + 1) * 17].tolist())
            diff += len(new - old)
    assert len(moves) == diff > 0
    for mv in moves:
        assert mv.expert in contig[mv.layer, mv.src * 17:(mv.src + 1) * 17]
        assert mv.expert in aff[mv.layer, mv.dst * 17:(mv.dst + 1) * 17]
        assert mv.expert not in contig[mv.layer, mv.dst * 17:(mv.dst + 1) * 17]
    assert plan_moves(aff, aff, topo) == []
    # a slot shuffle inside each GPU moves nothing
    shuffled = aff.reshape(tr.num_layers, G, 17)[:, :, ::-1].reshape(tr.num_layers, 68)
    assert plan_moves(aff, shuffled, topo) == []


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe"])
def test_expert_source_maps_hugging_face_layouts(arch, tmp_path):
    """In-memory fused tensors (transformers 5) and the per-expert checkpoint on disk give the same experts, our
    expert MLP reproduces the model's own experts module, and softmax_topk_router its router."""
    import transformers

    from placement import runtime as rt

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  num_experts=8, num_experts_per_tok=2, norm_topk_prob=arch == "olmoe")
    if arch == "olmoe":
        model = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(intermediate_size=16, **common))
    else:
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, **common))
    model.eval()
    with torch.no_grad():
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.mlp.gate.weight)
    model.save_pretrained(tmp_path)
    mem, disk = rt.ExpertSource.from_model(model), rt.ExpertSource.from_checkpoint(tmp_path)
    assert mem.layers == disk.layers == [0, 1] and mem.num_experts == disk.num_experts == 8
    assert (mem.hidden_size, mem.intermediate_size) == (disk.hidden_size, disk.intermediate_size) == (32, 16)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
    for l in (0, 1):
        a, b = mem.get(l, range(8)), disk.get(l, range(8))
        assert all(torch.equal(u, v) for u, v in zip(a, b))
        assert torch.equal(mem.router_weight(l), disk.router_weight(l))
        block = model.model.layers[l].mlp
        with torch.no_grad():
            _, w_hf, ids_hf = block.gate(x)
            ids, w = rt.softmax_topk_router([disk.router_weight(i) for i in (0, 1)], 2, normalize=arch == "olmoe")(
                l, x, None)
            assert torch.equal(ids, ids_hf) and torch.allclose(w, w_hf)
            ours = rt.experts_forward(rt.LayerExperts(np.arange(8), *b, 8), x, ids, w)
            assert torch.allclose(ours, block.experts(x, ids_hf, w_hf), atol=1e-6)
        # a subset of experts reads just those rows
        g, u, d = disk.get(l, [5, 2])
        assert torch.equal(g[0], a[0][5]) and torch.equal(d[1], a[2][2])


# ---------------------------------------------------------------------------------------------------------------
# one spawned gloo group for every distributed check
# ---------------------------------------------------------------------------------------------------------------

HF_E, HF_K, HF_LAYERS, HF_H, HF_I = 8, 2, 2, 32, 16


def _hf_config():
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=64, hidden_size=HF_H, intermediate_size=HF_I, num_hidden_layers=HF_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=HF_E,
                         num_experts_per_tok=HF_K)


def _job(rank: int, world: int, args: dict) -> None:
    """Every distributed check, on one rank; rank 0 writes what the test asserts."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from placement import runtime as rt

    report: dict = {}
    # --- 1. a Hugging Face Mixtral checkpoint: each rank reads only its experts -----------------------------------
    ckpt = args["ckpt"]
    source = rt.ExpertSource.from_checkpoint(ckpt)
    full = load_file(f"{ckpt}/model.safetensors")
    hf_plans = [Plan.from_dict(d) for d in args["hf_plans"]]
    x = torch.tensor(args["hf_x"])
    router = rt.softmax_topk_router([source.router_weight(l) for l in range(HF_LAYERS)], HF_K)
    with torch.no_grad():
        mine = torch.arange(x.shape[0])[torch.arange(x.shape[0]) % world == rank]
        held_by_plan = {}
        for plan in hf_plans:
            held = rt.load_rank_experts(source, plan, rank, dtype=torch.float32)
            held_by_plan[plan.name] = held
            sets = rank_experts(plan.phy2log, W)
            ok = True
            for l, lay in enumerate(held.layers):
                ok &= lay.experts.tolist() == sets[l][rank].tolist()
                for j, e in enumerate(lay.experts):
                    key = f"model.layers.{l}.block_sparse_moe.experts.{e}"
                    ok &= torch.equal(lay.gate[j], full[f"{key}.w1.weight"])
                    ok &= torch.equal(lay.up[j], full[f"{key}.w3.weight"])
                    ok &= torch.equal(lay.down[j], full[f"{key}.w2.weight"])
            for dataflow in rt.DATAFLOWS:
                comm = rt.Comm()
                moes = rt.build_layers(held, plan, comm)
                tid, out = rt.run_stack(moes, x[mine], mine, router, dataflow, norm=False)
                parts = [None] * world
                dist.all_gather_object(parts, (tid, out, ok))
                if rank == 0:
                    got = torch.zeros_like(x)
                    seen = torch.zeros(x.shape[0], dtype=torch.int64)
                    for t, o, _ in parts:
                        got[t] = o
                        seen[t] += 1
                    report[f"hf/{plan.name}/{dataflow}"] = {
                        "out": got.tolist(), "every_token_once": bool((seen == 1).all()),
                        "weights_exact": all(p[2] for p in parts)}
    # --- 2. re-planning moves only the changed experts ----------------------------------------------------------
        a, b = hf_plans[0], hf_plans[1]
        moved, stats = rt.apply_moves(held_by_plan[a.name], b)
        direct = held_by_plan[b.name]
        same = all(torch.equal(m.gate, d.gate) and torch.equal(m.up, d.up) and torch.equal(m.down, d.down)
                   and m.experts.tolist() == d.experts.tolist() for m, d in zip(moved.layers, direct.layers))
        parts = [None] * world
        dist.all_gather_object(parts, (same, stats.moves, stats.received, stats.sent, stats.bytes_sent))
        if rank == 0:
            report["replan"] = {"same_as_fresh_load": all(p[0] for p in parts), "moves": parts[0][1],
                                "received": sum(p[2] for p in parts), "sent": sum(p[3] for p in parts),
                                "bytes_sent": sum(p[4] for p in parts)}
    # --- 3. the bundled trace: bytes (bench) and outputs against the single-process reference -------------------------
    spec: BenchSpec = args["spec"]
    bench = rt.bench_rank(rank, world, spec)
    if rank == 0:
        report["bench"] = bench
    router = rt.trace_router(spec.expert_ids, spec.gate_weights)
    T = spec.expert_ids.shape[0]
    xt = torch.randn(T, H_TRACE, generator=torch.Generator().manual_seed(11))
    mine = torch.as_tensor(np.nonzero(spec.sequence_index % world == rank)[0])
    ref = None
    with torch.no_grad():
        for name, pd in zip(spec.names, spec.plans):
            plan = Plan.from_dict(pd)
            held = rt.random_rank_experts(plan, rank, H_TRACE, I_TRACE, torch.float32)
            for dataflow in rt.DATAFLOWS:
                comm = rt.Comm()
                tid, out = rt.run_stack(rt.build_layers(held, plan, comm), xt[mine], mine, router, dataflow)
                parts = [None] * world
                dist.all_gather_object(parts, (tid, out))
                if rank == 0:
                    got = torch.zeros_like(xt)
                    for t, o in parts:
                        got[t] = o
                    if ref is None:  # every expert in one process: the same weights, the same routing
                        full_layers = []
                        for l in range(plan.num_layers):
                            ws = [rt.random_expert(l, e, plan.num_experts, H_TRACE, I_TRACE)
                                  for e in range(plan.num_experts)]
                            full_layers.append(rt.LayerExperts(np.arange(plan.num_experts),
                                                               *[torch.stack([w[i] for w in ws]) for i in range(3)],
                                                               plan.num_experts))
                        ref = rt.reference_stack(full_layers, xt, router)
                    report[f"trace/{name}/{dataflow}"] = {"max_abs_diff": float((got - ref).abs().max()),
                                                          "scale": float(ref.abs().max())}
    if rank == 0:
        with open(args["out"], "w") as f:
            json.dump(report, f)


@pytest.fixture(scope="module")
def trace_setup():
    tr = datasets.load()
    fit, held = tr.split_by_sequence(0.5, seed=0)
    sub = select_tokens(held, 900, seed=0)
    contig = make_plan(np.tile(np.arange(64), (tr.num_layers, 1)), 64, W, tr.moe_layer_index, "contiguous", 27)
    aff = make_plan(affinity_plan(fit, W, redundant=4), 64, W, tr.moe_layer_index, "affinity", 27)
    return sub, [contig, aff]


@pytest.fixture(scope="module")
def report(tmp_path_factory, trace_setup):
    from transformers import MixtralForCausalLM

    from placement.runtime import launch

    d = tmp_path_factory.mktemp("rt")
    torch.manual_seed(0)
    model = MixtralForCausalLM(_hf_config()).eval()
    model.save_pretrained(d / "ckpt")
    x = torch.randn(48, HF_H, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # Hugging Face's own MoE blocks (router + experts), residual between them
        ref = x.clone()
        for i in range(HF_LAYERS):
            ref = ref + model.model.layers[i].mlp(ref[None])[0]
    rng = np.random.default_rng(3)
    # contiguous (2 experts per rank) and a shuffled plan with 4 replicas (3 slots per rank)
    contig = make_plan(np.tile(np.arange(HF_E), (HF_LAYERS, 1)), HF_E, W, np.arange(HF_LAYERS), "hf-contiguous")
    rows = []
    for _ in range(HF_LAYERS):
        while True:
            row = np.concatenate([rng.permutation(HF_E), rng.choice(HF_E, 4, replace=False)])
            if all(len(set(row[g * 3:(g + 1) * 3])) == 3 for g in range(W)):
                break
        rows.append(row)
    replicas = make_plan(np.array(rows), HF_E, W, np.arange(HF_LAYERS), "hf-replicas")
    sub, plans = trace_setup
    spec = BenchSpec(plans=[p.to_dict() for p in plans], names=[p.name for p in plans], expert_ids=sub.expert_ids,
                     gate_weights=sub.gate_weights, sequence_index=sub.sequence_index(), hidden_size=H_TRACE,
                     intermediate_size=I_TRACE, dtype="fp32", repeats=2, warmup=0, dataflows=("standard", "coherent"),
                     backend="gloo")
    args = {"ckpt": str(d / "ckpt"), "hf_plans": [contig.to_dict(), replicas.to_dict()], "hf_x": x.tolist(),
            "spec": spec, "out": str(d / "report.json")}
    launch(_job, W, (args,), threads=1)
    rep = json.loads((d / "report.json").read_text())
    rep["hf_plans"] = (contig, replicas)
    rep["hf_ref"] = ref
    return rep


@pytest.mark.parametrize("plan", ["hf-contiguous", "hf-replicas"])
@pytest.mark.parametrize("dataflow", ["standard", "coherent"])
def test_distributed_mixtral_equals_hugging_face_block(report, plan, dataflow):
    """Ranks route with the checkpoint's router weights and their own experts; the result equals two layers of
    transformers' MixtralSparseMoeBlock on one process."""
    r = report[f"hf/{plan}/{dataflow}"]
    assert r["weights_exact"]  # each rank read exactly its experts, bit for bit
    assert r["every_token_once"]
    ref = report["hf_ref"]
    assert torch.allclose(torch.tensor(r["out"]), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("plan", ["contiguous", "affinity"])
@pytest.mark.parametrize("dataflow", ["standard", "coherent"])
def test_trace_replay_equals_reference(report, plan, dataflow):
    r = report[f"trace/{plan}/{dataflow}"]
    assert r["max_abs_diff"] <= 1e-4 * max(1.0, r["scale"])


def test_replan_moves_exactly_the_diff(report):
    a, b = report["hf_plans"]
    diff = sum(len(set(b.phy2log[l, g * 3:(g + 1) * 3]) - set(a.phy2log[l, g * 2:(g + 1) * 2]))
               for l in range(HF_LAYERS) for g in range(W))
    r = report["replan"]
    assert r["same_as_fresh_load"]
    assert r["moves"] == r["received"] == r["sent"] == diff > 0
    assert r["bytes_sent"] == diff * 3 * HF_H * HF_I * 4


def test_measured_bytes_equal_prediction_on_real_trace(report, trace_setup):
    sub, plans = trace_setup
    bench = {(r["plan"], r["dataflow"]): r for r in report["bench"]}
    cost = CostModel(hidden_size=H_TRACE, dtype_bytes=4)
    for plan in plans:
        std = bench[(plan.name, "standard")]["measured"]
        assert std["a2a_bytes"] == evaluate(plan, sub, cost)["overall"]["a2a_bytes"] > 0
        assert std["dispatch_bytes"] == std["combine_bytes"]
        coh = bench[(plan.name, "coherent")]["measured"]
        pred = predict_a2a(plan, sub, H_TRACE * 4, "coherent")
        assert coh["a2a_bytes"] == pred["a2a_bytes"]
        assert coh["per_layer_a2a_bytes"] == pred["per_layer_a2a_bytes"]
        t = bench[(plan.name, "standard")]["measured"]["seconds_per_layer"]
        assert t["repeats"] == 2 and 0 < t["min"] <= t["median"] <= t["max"]
    # the affinity plan (fitted on other sequences) moves fewer bytes than contiguous, in both dataflows
    for df in ("standard", "coherent"):
        assert bench[("affinity", df)]["measured"]["a2a_bytes"] < bench[("contiguous", df)]["measured"]["a2a_bytes"]


# ---------------------------------------------------------------------------------------------------------------
# the CLI verb
# ---------------------------------------------------------------------------------------------------------------

def _cli(*args):
    from typer.testing import CliRunner

    from placement.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def plans_2gpu(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    paths = []
    for solver in ("contiguous", "round-robin"):
        p = d / f"{solver}.json"
        r = _cli("plan", "deepseek-v2-lite-esft:law", "--gpus", 2, "--solver", solver, "--holdout", 0.5, "--out", p)
        assert r.exit_code == 0, r.output
        paths.append(p)
    return paths


def test_bench_cli_reports_measured_next_to_evaluator(plans_2gpu):
    r = _cli("bench", *plans_2gpu, "--trace", "deepseek-v2-lite-esft:law", "--holdout", 0.5, "--world-size", 2,
             "--tokens", 300, "--hidden-size", 64, "--dtype", "fp32", "--repeats", 2, "--warmup", 0, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["world_size"] == 2 and rep["trace"]["tokens"] <= 300 and len(rep["plans"]) == 2
    for row in rep["plans"]:
        plan = Plan.load(row["plan_file"])
        # the evaluator's own number for the same held-out tokens, recomputed here
        held = datasets.load("deepseek-v2-lite-esft:law").split_by_sequence(0.5, seed=0)[1]
        sub = select_tokens(held, 300, seed=0)
        assert row["predicted"]["a2a_bytes"] == evaluate(plan, sub, CostModel(hidden_size=64, dtype_bytes=4))[
            "overall"]["a2a_bytes"]
        assert row["measured"]["a2a_bytes"] == row["predicted"]["a2a_bytes"]
        assert row["measured"]["metadata_bytes"] > 0
        t = row["measured"]["seconds_per_layer"]
        assert t["repeats"] == 2 and t["min"] <= t["median"] <= t["max"]


def test_bench_bad_input_is_one_sentence_exit_2(plans_2gpu, tmp_path):
    counts = tmp_path / "counts.npz"
    np.savez(counts, logical_count=np.ones((26, 64)))
    cases = [
        (("--world-size", 4), "is for 2 GPUs but the world size is 4"),
        (("--dtype", "fp8"), "bf16, fp16 or fp32"),
        (("--backend", "mpi"), "gloo, nccl"),
        (("--dataflow", "sideways"), "standard, coherent, both"),
        (("--trace", counts), "token trace"),
        (("--trace", "deepseek-v2-lite-esft:law", "--repeats", 0), "--repeats"),
    ]
    for extra, words in cases:
        r = _cli("bench", plans_2gpu[0], *extra)
        assert r.exit_code == 2, (extra, r.output)
        text = " ".join(r.output.split())  # the error console wraps long lines
        assert words in text and "Traceback" not in text, (extra, r.output)


def test_bench_under_torchrun(plans_2gpu, tmp_path):
    """Every rank runs the command; it joins torchrun's process group and only rank 0 prints."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "placement.cli",
           "bench", str(plans_2gpu[0]), "--tokens", "200", "--hidden-size", "32", "--repeats", "1", "--warmup", "0",
           "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads(res.stdout)  # one JSON document: rank 1 printed nothing
    assert rep["launcher"] == "torchrun" and rep["world_size"] == 2
    row = rep["plans"][0]
    assert row["measured"]["a2a_bytes"] == row["predicted"]["a2a_bytes"] > 0
