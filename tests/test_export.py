"""Exports for SGLang, vLLM, TensorRT-LLM and vllm-ascend, and import-plan reading them back.

Plans come from the bundled DeepSeek-V2-Lite trace (26 MoE layers at decoder indices 1..26 of 27, 64 experts):
hot experts replicated per layer and packed greedily on the fitted half, so every layer differs and replicas exist.
Each stack's file is checked field by field against the rules its own loader applies (docs/serving.md cites the
source); all four exports of one plan must read back, through import-plan, to the same placement.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from placement.cli import app
from placement.evaluate import evaluate
from placement.export import ExportError, exporters
from placement.export import sglang as sglang_export
from placement.export import trtllm as trtllm_export
from placement.export import vllm as vllm_export
from placement.export import vllm_ascend as ascend_export
from placement.importplan import PlacementImportError, import_placement
from placement.plan import Plan
from solvers import Topology
from traces import datasets

G, R = 4, 4  # 4 EP ranks, 4 redundant slots: 68 slots, 17 per GPU


@pytest.fixture(scope="module")
def split():
    tr = datasets.load()
    return tr.split_by_sequence(0.5, seed=0)


def hot_replica_plan(trace, gpus: int, redundant: int, spread: bool = True) -> Plan:
    """Per layer: one extra replica for each of the ``redundant`` hottest experts, then heaviest-first packing onto
    the lightest GPU with room (and, if ``spread``, without that expert yet). Slots GPU-major."""
    load = trace.load_profile().mean()  # [L, E]
    L, E = load.shape
    topo = Topology.for_experts(E, gpus, redundant)
    spg = topo.slots_per_gpu
    rows = np.empty((L, topo.num_slots), dtype=np.int64)
    for l in range(L):
        hot = np.argsort(-load[l], kind="stable")[:redundant]
        phys = np.concatenate([np.arange(E), hot])
        reps = np.bincount(phys, minlength=E)
        weight = load[l][phys] / reps[phys]
        bins = [[] for _ in range(gpus)]
        gl = np.zeros(gpus)
        for p in np.argsort(-weight, kind="stable"):
            ok = [g for g in range(gpus) if len(bins[g]) < spg and not (spread and phys[p] in bins[g])]
            g = min(ok, key=lambda x: gl[x])
            bins[g].append(int(phys[p]))
            gl[g] += weight[p]
        rows[l] = np.concatenate(bins)
    return Plan(rows, E, topo, trace.moe_layer_index, trace.decoder_layers, trace.model,
                solver={"name": "hot-replica"})


@pytest.fixture(scope="module")
def plan(split):
    return hot_replica_plan(split[0], G, R)


@pytest.fixture(scope="module")
def dup_plan(split):
    """Planted: layer 0 holds two replicas of one expert on the same GPU."""
    p = hot_replica_plan(split[0], G, R)
    rows = p.phy2log.copy()
    spg = p.topology.slots_per_gpu
    hot = int(np.bincount(rows[0], minlength=p.num_experts).argmax())  # a replicated expert
    where = np.flatnonzero(rows[0] == hot)
    gpu_a = where[0] // spg
    other = next(s for s in range(gpu_a * spg, (gpu_a + 1) * spg) if rows[0, s] != hot)
    # swap the second replica with a slot on gpu_a: the plan stays complete, two copies now share gpu_a
    rows[0, where[1]], rows[0, other] = rows[0, other], rows[0, where[1]]
    return Plan(rows, p.num_experts, p.topology, p.moe_layer_index, p.num_hidden_layers, solver={"name": "dup"})


def write_export(plan: Plan, fmt: str, tmp_path) -> tuple:
    mod = exporters()[fmt]
    path = tmp_path / f"plan_{fmt}{mod.SUFFIX}"
    text, hints = mod.export(plan, str(path))
    path.write_text(text)
    for extra, body in getattr(mod, "companions", lambda *a: [])(plan, str(path)):
        Path(extra).write_text(body)
    return path, hints


def test_fixture_plan_is_nontrivial(plan):
    # the round trips below only mean something if layers differ and replicas exist
    assert not np.array_equal(plan.phy2log[0], plan.phy2log[1])
    assert plan.replica_counts().max() == 2 and plan.num_slots == 68
    assert plan.moe_layer_index[0] == 1 and plan.num_hidden_layers == 27


def test_all_four_formats_are_discovered():
    assert {"sglang", "vllm", "trtllm", "vllm-ascend"} <= set(exporters())


def test_sglang_file_rules(plan, tmp_path):
    path, hints = write_export(plan, "sglang", tmp_path)
    data = json.loads(path.read_text())
    assert list(data) == ["physical_to_logical_map"]  # splatted into init_by_mapping: no other key allowed
    m = np.asarray(data["physical_to_logical_map"])
    assert m.shape == (plan.num_hidden_layers, plan.num_experts + plan.num_redundant)
    assert m.shape[1] % G == 0
    assert np.array_equal(m[0], np.arange(68) % 64)  # the dense decoder layer 0 gets the identity row
    assert np.array_equal(m[plan.moe_layer_index], plan.phy2log)
    assert any(f"--ep-num-redundant-experts {R}" in h and f"--init-expert-location {path}" in h for h in hints)


def test_trtllm_fields(plan, tmp_path):
    path, hints = write_export(plan, "trtllm", tmp_path)
    cfg = yaml.safe_load(path.read_text())
    # MoeLoadBalancerConfig is a strict pydantic model with exactly these fields
    assert set(cfg) == {"num_slots", "initial_global_assignments", "layer_updates_per_iter"}
    assert isinstance(cfg["num_slots"], int) and cfg["num_slots"] == 68 and cfg["num_slots"] % G == 0
    assert cfg["layer_updates_per_iter"] == 0  # static
    assign = cfg["initial_global_assignments"]
    # keyed by the decoder-layer index of every MoE layer (DeepSeek-V2-Lite: 1..26, layer 0 is dense)
    assert all(isinstance(k, int) for k in assign) and sorted(assign) == list(range(1, 27))
    spg = cfg["num_slots"] // G
    for l, d in enumerate(plan.moe_layer_index):
        row = assign[int(d)]
        assert len(row) == cfg["num_slots"] and all(isinstance(x, int) and 0 <= x < 64 for x in row)
        assert set(row) == set(range(64))  # every expert has a replica, else tokens would have nowhere to go
        for rank in range(G):  # the C++ balancer reads slot rank * slots_per_rank + local
            assert row[rank * spg:(rank + 1) * spg] == plan.phy2log[l, rank * spg:(rank + 1) * spg].tolist()
    assert any("moe_config" in h and "load_balancer" in h for h in hints)


def test_vllm_ascend_fields(plan, tmp_path):
    path, hints = write_export(plan, "vllm-ascend", tmp_path)
    data = json.loads(path.read_text())
    assert set(data) == {"moe_layer_count", "layer_list"} and data["moe_layer_count"] == plan.num_layers
    for pos, layer in enumerate(data["layer_list"]):
        assert layer["layer_id"] == pos  # read by position, counting MoE layers from 0
        assert layer["device_count"] == G and [d["device_id"] for d in layer["device_list"]] == list(range(G))
        device_data = np.asarray([d["device_expert"] for d in layer["device_list"]])  # must stack: equal lengths
        assert device_data.shape == (G, 17)
        assert device_data.size - plan.num_experts == R  # vllm-ascend's n_redundant = slots - experts
        # vllm-ascend's per-rank map: expert_map[device_expert] = arange(len); it must not lose a replica
        for g in range(G):
            assert len(set(device_data[g].tolist())) == device_data.shape[1]
            emap = np.full(64, -1)
            emap[device_data[g]] = np.arange(device_data.shape[1])
            assert (emap >= 0).sum() == device_data.shape[1]
        assert np.array_equal(device_data.reshape(-1), plan.phy2log[pos])
    assert any('"expert_map_path"' in h for h in hints)


def test_vllm_list_and_expert_maps(plan, tmp_path):
    path, hints = write_export(plan, "vllm", tmp_path)
    rows = json.loads(path.read_text())
    assert isinstance(rows, list) and len(rows) == plan.num_layers and all(len(r) == 68 for r in rows)
    maps = json.loads(vllm_export.companion_path(path).read_text())
    spg = 17
    # under EPLB vLLM uses the linear physical map: rank r owns physical slots r*spg .. r*spg+spg-1
    for r, m in enumerate(maps["expert_map"]):
        m = np.asarray(m)
        assert np.array_equal(np.flatnonzero(m >= 0), np.arange(r * spg, (r + 1) * spg))
        assert np.array_equal(m[r * spg:(r + 1) * spg], np.arange(spg))
    lem = np.asarray(maps["logical_expert_map"])  # [L, G, E]
    assert lem.shape == (plan.num_layers, G, 64)
    for l in range(plan.num_layers):
        on_gpu = plan.phy2log[l].reshape(G, spg)
        for r in range(G):
            for e in range(64):
                v = lem[l, r, e]
                assert (v >= 0) == (e in on_gpu[r])
                if v >= 0:
                    assert on_gpu[r, v] == e and v == on_gpu[r].tolist().index(e)


def test_determine_expert_map_semantics():
    # vLLM's rules: first global % ep ranks get one extra; linear = contiguous block, round_robin = stride ep
    n, m = vllm_export.determine_expert_map(3, 0, 8, "linear")
    assert n == 3 and m.tolist() == [0, 1, 2, -1, -1, -1, -1, -1]
    n, m = vllm_export.determine_expert_map(3, 2, 8, "linear")
    assert n == 2 and m.tolist() == [-1, -1, -1, -1, -1, -1, 0, 1]
    n, m = vllm_export.determine_expert_map(3, 1, 8, "round_robin")
    assert n == 3 and m.tolist() == [-1, 0, -1, -1, 1, -1, -1, 2]
    assert vllm_export.determine_expert_map(1, 0, 8)[1] is None


def test_memory_budget_plan_is_refused_by_every_stack(plan):
    rows = plan.phy2log.copy()
    rows[:, -1] = -1
    mem = Plan(rows, plan.num_experts, plan.topology, plan.moe_layer_index, plan.num_hidden_layers,
               memory={"budget_slots": 67})
    for fmt, mod in exporters().items():
        with pytest.raises(ExportError, match="memory budget"):
            mod.export(mem, "x.json")


def test_two_replicas_on_one_gpu(dup_plan):
    with pytest.raises(ExportError, match="two replicas of one expert on GPU"):
        ascend_export.export(dup_plan, "x.json")
    # the other stacks keep one entry per physical slot and accept it
    for mod in (sglang_export, trtllm_export, vllm_export):
        mod.export(dup_plan, "x")


def test_all_four_exports_describe_the_same_placement(plan, split, tmp_path):
    back = {}
    for fmt in ("sglang", "vllm", "trtllm", "vllm-ascend"):
        path, _ = write_export(plan, fmt, tmp_path)
        # options a user would pass: EP size where the file does not record it, the model's layout where needed
        kw = {} if fmt == "vllm-ascend" else {"num_gpus": G}
        if fmt == "sglang":
            kw.update(moe_layer_index=split[0].moe_layer_index)
        back[fmt] = import_placement(path, None, **kw)  # format detected from the content
        assert back[fmt].provenance["imported_from"]["format"] == fmt
    for fmt, p in back.items():
        assert np.array_equal(p.phy2log, plan.phy2log), fmt
        assert (p.num_experts, p.topology.num_gpus, p.topology.slots_per_gpu) == (64, G, 17), fmt
    for fmt in ("sglang", "trtllm"):  # these two know the decoder-layer indices
        assert np.array_equal(back[fmt].moe_layer_index, plan.moe_layer_index), fmt
    # same placement, same metrics on held-out sequences
    held = split[1]
    ref = evaluate(plan, held)["overall"]
    for fmt, p in back.items():
        got = evaluate(p, held)["overall"]
        for key in ("load_imbalance", "affinity_locality", "dispatch_gpus", "a2a_bytes"):
            assert got[key] == pytest.approx(ref[key]), (fmt, key)


@pytest.mark.parametrize("kind", ["npy", "npz", "pt", "pt-tuple", "json"])
def test_eplb_phy2log_files(plan, tmp_path, kind):
    phy2log = plan.phy2log
    if kind == "npy":
        path = tmp_path / "p.npy"
        np.save(path, phy2log)
    elif kind == "npz":
        path = tmp_path / "p.npz"
        np.savez(path, phy2log=phy2log, logcnt=plan.replica_counts())
    elif kind.startswith("pt"):
        import torch

        path = tmp_path / "p.pt"
        t = torch.from_numpy(phy2log)
        obj = t
        if kind == "pt-tuple":  # what rebalance_experts returns: (phy2log, log2phy, logcnt)
            obj = (t, torch.from_numpy(plan.log2phy()), torch.from_numpy(plan.replica_counts()))
        torch.save(obj, path)
    else:
        path = tmp_path / "p.json"
        path.write_text(json.dumps({"phy2log": phy2log.tolist()}))
    got = import_placement(path, "eplb", num_gpus=G, moe_layer_index=plan.moe_layer_index, num_hidden_layers=27)
    assert np.array_equal(got.phy2log, phy2log)
    assert np.array_equal(got.moe_layer_index, plan.moe_layer_index)


def test_import_refuses_what_a_plan_cannot_hold(plan, tmp_path):
    data = ascend_export.expert_map_json(plan)
    data["layer_list"][3]["device_list"][1]["device_expert"].append(5)  # unequal slots on one device
    path = tmp_path / "uneven.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlacementImportError, match="same number of slots"):
        import_placement(path, "vllm-ascend")
    vpath, _ = write_export(plan, "vllm", tmp_path)
    with pytest.raises(PlacementImportError, match="--gpus"):
        import_placement(vpath, "vllm")
    with pytest.raises(PlacementImportError, match="split evenly"):
        import_placement(vpath, "vllm", num_gpus=5)
    shared = tmp_path / "shared.json"
    shared.write_text(json.dumps(plan.phy2log[0].tolist()))
    with pytest.raises(PlacementImportError, match="one row shared"):
        import_placement(shared, "vllm", num_gpus=G)
    got = import_placement(shared, "vllm", num_gpus=G, moe_layer_index=plan.moe_layer_index)
    assert (got.phy2log == plan.phy2log[0]).all()
    for name in ("damaged.pt", "damaged.npz", "damaged.json"):
        (tmp_path / name).write_bytes(b"\xff\xfe\x00 not a placement \x01" * 3)
        with pytest.raises(PlacementImportError, match="damaged"):
            import_placement(tmp_path / name, None, num_gpus=G)


def test_cli_export_then_import_then_evaluate(plan, tmp_path):
    runner = CliRunner()
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path)
    out = tmp_path / "p.yaml"
    r = runner.invoke(app, ["export", str(plan_path), "--format", "trtllm", "--out", str(out)])
    assert r.exit_code == 0, r.output
    back = tmp_path / "back.json"
    r = runner.invoke(app, ["import-plan", str(out), "--gpus", str(G), "--like", str(plan_path), "--out", str(back)])
    assert r.exit_code == 0, r.output
    assert np.array_equal(Plan.load(back).phy2log, plan.phy2log)
    r = runner.invoke(app, ["evaluate", str(plan_path), str(back), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    vals = [v["overall"]["load_imbalance"] for v in res.values()]
    assert vals[0] == pytest.approx(vals[1])


def flat(text: str) -> str:
    return " ".join(text.split())


def test_cli_errors_are_one_sentence_exit_2(plan, dup_plan, tmp_path):
    runner = CliRunner()
    dp = tmp_path / "dup.json"
    dup_plan.save(dp)
    r = runner.invoke(app, ["export", str(dp), "--format", "vllm-ascend", "--out", str(tmp_path / "a.json")])
    assert r.exit_code == 2 and "two replicas" in flat(r.output) and "Traceback" not in r.output
    junk = tmp_path / "junk.json"
    junk.write_text('{"hello": 1, "world": 2}')
    r = runner.invoke(app, ["import-plan", str(junk), "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "--format" in flat(r.output) and "Traceback" not in r.output
    r = runner.invoke(app, ["import-plan", str(tmp_path / "missing.yaml"), "--format", "trtllm"])
    assert r.exit_code == 2 and "no such file" in flat(r.output)
