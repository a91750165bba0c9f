"""The GPU paths: the collector and the runtime on CUDA give what they give on CPU.

Skipped without a CUDA GPU (CI has none); run on a GPU machine with ``python -m pytest tests/test_cuda.py``.
Users collect traces and run ``moeplace bench --backend nccl`` on GPUs, where a tensor left on the wrong device or
a CPU-only call would only show there.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("transformers")

from placement.plan import Plan  # noqa: E402
from placement import runtime as rt  # noqa: E402
from solvers import Topology  # noqa: E402
from tests.test_collect import SEQS, tiny_model  # noqa: E402
from traces import datasets  # noqa: E402
from traces.collect import RoutingRecorder, record_batch  # noqa: E402

H, I = 64, 32


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_collector_on_cuda_records_the_cpu_routing(model_type):
    """The same tiny model (float32) recorded on CPU and on CUDA: the same experts per token, the same weights."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model(model_type)
    with RoutingRecorder(model) as rec:
        cpu = record_batch(model, rec, SEQS, generate=2)
    model.to("cuda")
    with RoutingRecorder(model) as rec:
        gpu = record_batch(model, rec, SEQS, generate=2)
    assert gpu["row"].tolist() == cpu["row"].tolist() and gpu["pos_in_seq"].tolist() == cpu["pos_in_seq"].tolist()
    assert np.array_equal(np.sort(gpu["expert_ids"], -1), np.sort(cpu["expert_ids"], -1))
    np.testing.assert_allclose(np.sort(gpu["gate_weights"], -1), np.sort(cpu["gate_weights"], -1),
                               rtol=1e-4, atol=1e-6)


def _stack_job(rank: int, world: int, args: dict) -> None:
    """One NCCL rank on the GPU: the replayed trace through the runtime's layers, for both dataflows."""
    device = rt.device_for("nccl", rank)
    plan = Plan.from_dict(args["plan"])
    router = rt.trace_router(args["ids"], args["w"], device)
    x = torch.tensor(args["x"], device=device)
    tok = torch.arange(x.shape[0], device=device)
    held = rt.random_rank_experts(plan, rank, H, I, torch.float32, device)
    out = {}
    with torch.no_grad():
        for dataflow in rt.DATAFLOWS:
            comm = rt.Comm(device=device)
            tid, h = rt.run_stack(rt.build_layers(held, plan, comm), x, tok, router, dataflow)
            out[dataflow] = {"token_id": tid.cpu().tolist(), "h": h.cpu().tolist(),
                             "on_gpu": h.is_cuda and tid.is_cuda}
    with open(args["out"], "w") as f:
        json.dump(out, f)


def test_runtime_on_cuda_equals_the_cpu_reference(tmp_path):
    """The runtime's layers on one NCCL rank on the GPU give the single-process CPU reference's outputs."""
    tr = datasets.load()
    sub = rt.select_tokens(tr, 200, seed=0)
    L, E = tr.num_layers, tr.num_experts
    plan = Plan(np.tile(np.arange(E), (L, 1)), E, Topology(num_gpus=1, slots_per_gpu=E), tr.moe_layer_index,
                int(tr.moe_layer_index[-1]) + 1, solver={"name": "one-gpu"})
    x = torch.randn(sub.num_tokens, H, generator=torch.Generator().manual_seed(0))
    args = {"plan": plan.to_dict(), "ids": sub.expert_ids, "w": sub.gate_weights, "x": x.tolist(),
            "out": str(tmp_path / "out.json")}
    rt.launch(_stack_job, 1, (args,), backend="nccl")
    got = json.loads((tmp_path / "out.json").read_text())
    held = rt.random_rank_experts(plan, 0, H, I, torch.float32)
    ref = rt.reference_stack(held.layers, x, rt.trace_router(sub.expert_ids, sub.gate_weights))
    for dataflow, r in got.items():
        assert r["on_gpu"], dataflow
        order = np.argsort(r["token_id"])
        h = torch.tensor(r["h"])[order]
        assert sorted(r["token_id"]) == list(range(sub.num_tokens))
        assert torch.allclose(h, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())), dataflow


def test_bench_cli_runs_on_nccl(tmp_path):
    """``moeplace bench --backend nccl`` on one GPU: the measured bytes equal the prediction, the layers are timed."""
    from typer.testing import CliRunner

    from placement.cli import app

    plan_path = tmp_path / "one.json"
    runner = CliRunner()
    r = runner.invoke(app, ["plan", "--gpus", "1", "--solver", "contiguous", "--out", str(plan_path)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["bench", str(plan_path), "--backend", "nccl", "--tokens", "512", "--repeats", "3",
                            "--dataflow", "both", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    for row in rep["plans"]:
        assert row["measured"]["a2a_bytes"] == row["predicted"]["a2a_bytes"]
        t = row["measured"]["seconds_per_layer"]
        assert 0 < t["min"] <= t["median"] <= t["max"]


def test_runtime_protocols_on_cuda_bytes_and_outputs(tmp_path):
    """nccl, deepep-normal and deepep-ll on CUDA tensors, 2 nodes x 2 ranks: measured bytes per link class equal the
    evaluator's exactly and the outputs (fp32 combine) equal the CPU reference. With 4 GPUs or more each rank has
    its own GPU and talks NCCL; with fewer, the 4 gloo ranks share the GPUs (gloo's CUDA all-to-all), which still
    runs every protocol's tensors on the device."""
    from tests.test_runtime_comm import LINKS, W, _job, inputs, predicted

    backend = "nccl" if torch.cuda.device_count() >= W else "gloo"
    out = tmp_path / "report.json"
    sub, plans, args = inputs(str(out), cuda=True, backend=backend)
    args["runs"] = [("affinity", proto, True, wire) for proto in rt.PROTOCOLS for wire in (None, "fp32")]
    rt.launch(_job, W, (args,), backend=backend, threads=2)
    rep = json.loads(out.read_text())
    for proto in rt.PROTOCOLS:
        p = predicted(plans["affinity"], sub, proto)
        wire, exact = rep[f"affinity/{proto}/True/None"], rep[f"affinity/{proto}/True/fp32"]
        assert wire["devices"] == exact["devices"] == ["cuda"], proto
        assert wire["bytes"] == {k: p[k] for k in LINKS} and p["rdma"] > 0, proto
        assert exact["every_token_once"] and exact["max_abs_diff"] <= 1e-4 * max(1.0, exact["scale"]), proto
