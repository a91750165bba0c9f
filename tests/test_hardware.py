"""Hardware profiles: the presets carry the published figures, a profile round-trips and bad ones are one sentence,
--hardware sets the cost model and links (explicit options win), and 'moeplace calibrate' on gloo writes a profile
that 'moeplace plan --hardware' reads and records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from placement import hardware
from placement.calibrate import build_profile, fit_gemm, group_layout
from placement.cli import app
from placement.commands.plan import cost_model, link_bandwidths

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
TRACE = "deepseek-v2-lite-esft:law"  # one task of the bundled trace: real routing, small enough to be quick

# the published figures, per GPU, as the sources state them (bandwidths bidirectional where the source says so)
GB, TB, TFLOPS = 1e9, 1e12, 1e12
PUBLISHED = {
    # NVIDIA H100 SXM: NVLink 900 GB/s (bidirectional), HBM3 3.35 TB/s, BF16 1,979 TFLOP/s with sparsity;
    # DGX H100: one 400 Gb/s ConnectX-7 per GPU
    "h100": {"nvlink_bidir": 900 * GB, "nic_gbit": 400, "hbm": 3.35 * TB, "bf16_sparse": 1979 * TFLOPS},
    # NVIDIA H200 SXM: NVLink 900 GB/s, HBM3e 4.8 TB/s, the H100's compute; DGX H200: 400 Gb/s per GPU
    "h200": {"nvlink_bidir": 900 * GB, "nic_gbit": 400, "hbm": 4.8 * TB, "bf16_sparse": 1979 * TFLOPS},
    # DGX B200: NVLink 5 switches 14.4 TB/s aggregate for 8 GPUs, 8 x 400 Gb/s ConnectX-7; HGX B200: 8 TB/s HBM3e
    # per GPU, BF16 36 PFLOP/s with sparsity for 8 GPUs
    "b200": {"nvlink_bidir": 14.4 * TB / 8, "nic_gbit": 400, "hbm": 8 * TB, "bf16_sparse": 36e15 / 8},
}
H100_MEASURED_FLOPS = 400 * TFLOPS  # docs/benchmarks.md, "Expert compute on an H100"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_carry_the_published_figures(name):
    src = PUBLISHED[name]
    hw = hardware.load(name)
    assert hw.intra_node_bandwidth == pytest.approx(src["nvlink_bidir"] / 2)  # per direction
    assert hw.inter_node_bandwidth == pytest.approx(src["nic_gbit"] * 1e9 / 8)  # bits to bytes
    assert hw.hbm_bandwidth == pytest.approx(src["hbm"])
    # the measured H100 rate, scaled by the dense (half the sparse) BF16 peak over the H100's
    dense_ratio = (src["bf16_sparse"] / 2) / (PUBLISHED["h100"]["bf16_sparse"] / 2)
    assert hw.gpu_flops == pytest.approx(H100_MEASURED_FLOPS * dense_ratio, rel=1e-3)
    assert hw.gpus_per_node == 8 and hw.expert_overhead == 0
    assert "http" in hw.source  # each preset names where its figures come from
    # and they reach the cost model and the links
    cost = cost_model(hardware=name)
    assert (cost.gpu_flops, cost.hbm_bandwidth, cost.expert_overhead) == (hw.gpu_flops, hw.hbm_bandwidth, 0.0)
    assert link_bandwidths(None, None, name) == (hw.intra_node_bandwidth, hw.inter_node_bandwidth)


def test_explicit_options_win_over_the_profile():
    cost = cost_model(hardware="b200", gpu_flops="300T", hbm_bandwidth="2TB")
    assert (cost.gpu_flops, cost.hbm_bandwidth) == (300e12, 2e12)
    intra, inter = link_bandwidths("100GB", None, "b200")
    assert intra == 100e9 and inter == PUBLISHED["b200"]["nic_gbit"] * 1e9 / 8
    assert cost_model().gpu_flops == H100_MEASURED_FLOPS  # no profile: the defaults


def test_gpus_per_node_follows_the_profile():
    h100 = hardware.load("h100")
    assert hardware.gpus_per_node(h100, 16, None) == 8
    assert hardware.gpus_per_node(h100, 8, None) is None  # one node
    assert hardware.gpus_per_node(h100, 16, 4) == 4  # the option wins
    with pytest.raises(hardware.HardwareError, match="whole nodes"):
        hardware.gpus_per_node(h100, 12, None)


def _profile_dict(**over):
    d = {"format": "moeplace.hardware", "version": 1, "name": "lab", "source": "hand-written",
         "intra_node_bandwidth": 400e9, "inter_node_bandwidth": 40e9, "gpu_flops": 350e12, "hbm_bandwidth": 3e12,
         "expert_overhead": 2e-6, "gpus_per_node": 4, "gemm_rate": [[16, 1e13], [4096, 3.5e14]], "measured": {}}
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


def test_profile_round_trips(tmp_path):
    path = tmp_path / "hw.json"
    (tmp_path / "src.json").write_text(json.dumps(_profile_dict()))
    hw = hardware.load(tmp_path / "src.json")
    hardware.save(hw, path)
    again = hardware.load(path)
    assert again == hw and again.to_dict() == json.loads((tmp_path / "src.json").read_text())


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_sentence(r, *words):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit))
    text = " ".join(r.output.split())
    for w in words:
        assert w in text, (w, text)


@pytest.mark.parametrize("over, words", [
    ({"gpu_flops": None}, ["'gpu_flops'", "no field"]),
    ({"inter_node_bandwidth": -5e9}, ["'inter_node_bandwidth'", "positive"]),
    ({"expert_overhead": -1e-6}, ["'expert_overhead'", ">= 0"]),
    ({"hbm_bandwidth": "fast"}, ["'hbm_bandwidth'"]),
    ({"format": "something.else"}, ["'format'", "moeplace.hardware"]),
    ({"version": 2}, ["'version'"]),
    ({"gpus_per_node": 0}, ["'gpus_per_node'"]),
    ({"gemm_rate": [[16, -1]]}, ["'gemm_rate'"]),
])
def test_bad_profile_is_one_sentence_exit_2(tmp_path, over, words):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_profile_dict(**over)))
    _one_sentence(_run("plan", "--gpus", 4, "--hardware", bad, "--out", tmp_path / "p.json"), str(bad), *words)
    assert not (tmp_path / "p.json").exists()


def test_unknown_preset_and_bad_cost_options_are_one_sentence(tmp_path):
    _one_sentence(_run("plan", "--gpus", 4, "--hardware", "a100", "--out", tmp_path / "p.json"),
                  "'a100'", "h100, h200, b200")
    notjson = tmp_path / "hw.json"
    notjson.write_text("{not json")
    _one_sentence(_run("plan", "--gpus", 4, "--hardware", notjson), "not valid JSON")
    _one_sentence(_run("plan", "--gpus", 4, "--tokens-per-gpu", 0), "tokens per GPU", "positive")
    _one_sentence(_run("replay", "deepseek-v2-lite-esft", "--gpus", 4, "--window", 100, "--interval", 100,
                       "--hardware", "tpu"), "'tpu'")


def test_fit_recovers_a_planted_rate_and_overhead():
    """Timings made from the roofline with a known rate, HBM bandwidth and per-expert overhead: the fit recovers
    the rate (from the compute-bound points) and the overhead (from all of them)."""
    H, I, E = 7168, 2048, 8
    rate, hbm, overhead = 550e12, 3.0e12, 4e-6
    fpt, wbytes = 6.0 * H * I, 3.0 * H * I * 2
    ms = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
    times = [E * (max(m * fpt / rate, wbytes / hbm) + overhead) for m in ms]
    fit = fit_gemm(list(zip(ms, times)), E, fpt, wbytes, hbm)
    assert fit["gpu_flops"] == pytest.approx(rate, rel=1e-9)
    assert fit["expert_overhead"] == pytest.approx(overhead, rel=1e-9)
    assert fit["fit_points"] == [512, 1024, 2048, 4096, 8192]


def test_one_node_keeps_the_presets_inter_node_figure():
    pts = [{"tokens_per_peer": t, "bandwidth": b} for t, b in ((8, 1e9), (512, 7e9), (4096, 6e9))]
    results = {"a2a": {"intra_node": {"group_size": 8, "groups": 1, "points": pts}}, "nodes": 1, "hosts": ["a"],
               "ranks_per_node": 8, "world_size": 8, "backend": "nccl", "device": "NVIDIA H200",
               "hbm": {"bandwidth": 4e12},
               "gemm": {"hidden_size": 64, "intermediate_size": 32, "local_experts": 2,
                        "points": [{"tokens_per_expert": m, "seconds": 1e-6 * m, "flops_rate": 1.0} for m in (16, 64)]}}
    hw = build_profile(results, hardware.PRESETS["h200"], "x", "host", "today")
    assert hw.intra_node_bandwidth == 7e9  # the highest rate over the sizes
    assert hw.inter_node_bandwidth == 50e9 and "inter_node_bandwidth" in hw.measured["kept"]
    assert hw.gpus_per_node == 8 and hw.hbm_bandwidth == 4e12


def test_calibrate_bad_options_are_one_sentence(tmp_path, monkeypatch):
    _one_sentence(_run("calibrate", "--backend", "mpi"), "gloo")
    _one_sentence(_run("calibrate", "--tokens-per-expert", "16,x"), "--tokens-per-expert")
    _one_sentence(_run("calibrate", "--preset", "a100"), "--preset")
    _one_sentence(_run("calibrate", "--backend", "gloo", "--world-size", 3, "--ranks-per-node", 2), "divide")
    _one_sentence(_run("calibrate", "--backend", "nccl"), "CUDA")
    from placement.commands import calibrate as cmd

    monkeypatch.setattr(cmd, "torch_available", lambda: False)
    _one_sentence(_run("calibrate", "--out", tmp_path / "hw.json"), 'pip install "moeplace[torch]"')
    assert not (tmp_path / "hw.json").exists()


def test_calibrate_on_gloo_writes_a_profile_that_plan_reads(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 8}))
    out = tmp_path / "hw.json"
    r = _run("calibrate", "--backend", "gloo", "--world-size", 2, "--model-config", cfg, "--seconds-per-point", 0.01,
             "--tokens-per-expert", "16,64,256", "--tokens-per-peer", "8,256", "--preset", "h200", "--out", out)
    assert r.exit_code == 0, r.output
    prof = json.loads(out.read_text())  # read back with the JSON parser, not our loader
    m = prof["measured"]
    assert prof["source"].startswith("measured by moeplace calibrate on ") and m["world_size"] == 2
    intra = m["a2a"]["intra_node"]["points"]
    assert [p["tokens_per_peer"] for p in intra] == [8, 256]
    assert all(p["bytes_per_gpu"] == p["tokens_per_peer"] * 64 * 2 for p in intra)  # one peer, hidden 64, bf16
    assert prof["intra_node_bandwidth"] == max(p["bandwidth"] for p in intra) > 0
    assert "inter_node" not in m["a2a"] and prof["inter_node_bandwidth"] == 50e9  # one node: h200's kept
    assert [p[0] for p in prof["gemm_rate"]] == [16, 64, 256] and prof["gpu_flops"] > 0
    assert prof["hbm_bandwidth"] == m["hbm"]["bandwidth"] > 0 and prof["expert_overhead"] >= 0
    assert "gpus_per_node" not in prof  # gloo ranks are not GPUs

    plan_path = tmp_path / "plan.json"
    r = _run("plan", TRACE, "--gpus", 4, "--solver", "eplb", "--hardware", out, "--tokens-per-gpu", 64, "--out",
             plan_path)
    assert r.exit_code == 0, r.output
    plan = json.loads(plan_path.read_text())
    assert plan["provenance"]["hardware"]["name"] == prof["name"]
    assert plan["provenance"]["hardware"]["source"] == prof["source"]
    params = plan["solver"]["options"]["params"]
    for key in ("gpu_flops", "hbm_bandwidth", "expert_overhead"):
        assert params[key] == prof[key], key
    topo = plan["topology"]
    assert (topo["intra_node_bandwidth"], topo["inter_node_bandwidth"]) == (prof["intra_node_bandwidth"],
                                                                            prof["inter_node_bandwidth"])
    # evaluate under the profile gives what the plan predicted for itself (same cost model and links)
    r = _run("evaluate", plan_path, "--trace", TRACE, "--hardware", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["overall"]["est_moe_seconds"] == pytest.approx(plan["predicted"]["est_moe_seconds"])


def test_group_layout_pairs_ranks_by_node_and_local_index():
    world, n = 12, 4  # 3 nodes of 4 ranks, numbered node by node as torchrun does
    layout = group_layout(world, n)
    node = {r: r // n for r in range(world)}
    local = {r: r % n for r in range(world)}
    # a naive reading: each intra group is one node's ranks, each inter group one local index's ranks
    assert sorted(map(sorted, layout["intra_node"])) == [[r for r in range(world) if node[r] == k] for k in range(3)]
    assert sorted(map(sorted, layout["inter_node"])) == [[r for r in range(world) if local[r] == i] for i in range(n)]


def test_calibrate_across_two_torchrun_nodes(tmp_path):
    """Two torchrun agents (2 nodes x 1 rank, on this one host): ranks group by LOCAL_WORLD_SIZE, the inter-node
    exchange runs between the nodes, the intra-node figure is kept from the preset (one rank per node), and the
    profile says no network was crossed."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 32, "moe_intermediate_size": 16}))
    out = tmp_path / "hw.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = _free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), "-m",
               "placement.cli", "calibrate", "--backend", "gloo", "--model-config", str(cfg), "--seconds-per-point",
               "0.01", "--tokens-per-expert", "16,64", "--tokens-per-peer", "8,128", "--out", str(out)]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-2000:]
    prof = json.loads(out.read_text())
    m = prof["measured"]
    assert (m["world_size"], m["ranks_per_node"], m["nodes"]) == (2, 1, 2)
    inter = m["a2a"]["inter_node"]
    assert (inter["group_size"], inter["groups"]) == (2, 1)
    assert [p["bytes_per_gpu"] for p in inter["points"]] == [8 * 32 * 2, 128 * 32 * 2]
    assert prof["inter_node_bandwidth"] == max(p["bandwidth"] for p in inter["points"])
    assert "intra_node" not in m["a2a"] and prof["intra_node_bandwidth"] == 450e9  # h100's kept
    assert "crossed no network" in m["note"]
    assert "wrote" in outs[0][0] and not outs[1][0]  # rank 0 (node 0) reports; node 1's rank prints nothing


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
