"""The vLLM startup plugin (placement/vllm_plugin.py).

Always run: the entry point is discoverable through importlib.metadata, register() is harmless when called
repeatedly, and bad or mismatched plans give one warning, never an exception.

Run where vLLM imports (e.g. ``/tmp/vllm-venv/bin/python -m pytest tests/test_vllm_plugin.py``, see
docs/serving.md): against vLLM's real classes, two EP ranks on CPU (gloo) build a real ``EplbState``; the plugin
must move the expert weights with vLLM's ``rearrange_expert_weights_inplace`` and publish the maps, refuse a
mismatched plan on every rank, and keep every rank on the default when one rank lacks the plan file.
Test-environment substitutions there (CPU-only machine): no pinned host memory, the ``torch_nccl`` EPLB
communicator (which vLLM runs over the CPU process group for CPU tensors), a stand-in MoE model exposing
vLLM's ``MixtureOfExperts`` attributes whose expert weights encode their logical expert id, a model-config stand-in
with ``compute_hash`` and ``compile_factors`` (vLLM >= 0.34 keys model states by the latter) and, for the online
rearrangement, a ``torch.Event`` that records nothing (rank 0 times a rearrangement with device events).

Set up from a clean machine with ``scripts/tier-vllm.sh 0.34.0`` (or ``0.33.0``), then
``/work/side-envs/vllm-0.34.0/bin/python -m pytest tests/test_vllm_plugin.py``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import socket
import sys
import tomllib
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from placement import vllm_plugin
from placement.plan import Plan
from tests.test_export import hot_replica_plan
from traces import datasets

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fit():
    return datasets.load().split_by_sequence(0.5, seed=0)[0]


@pytest.fixture
def records():
    """Messages the plugin logs (logger ``vllm.moeplace``), with the per-process dedupe reset."""
    got: list[logging.LogRecord] = []

    class H(logging.Handler):
        def emit(self, record):
            got.append(record)

    h = H(level=logging.DEBUG)
    lg = logging.getLogger("vllm.moeplace")
    old = lg.level
    lg.addHandler(h)
    lg.setLevel(logging.DEBUG)
    vllm_plugin._warned.clear()
    vllm_plugin._plans.clear()
    yield got
    lg.removeHandler(h)
    lg.setLevel(old)


def warnings_of(records):
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


# entry point and re-entrancy -----------------------------------------------------------------------------

def test_entry_point_is_discoverable_through_importlib_metadata(tmp_path, monkeypatch):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    eps = project.get("entry-points", {}).get("vllm.general_plugins", {})
    assert eps, ('pyproject.toml needs [project.entry-points."vllm.general_plugins"] '
                 'moeplace = "placement.vllm_plugin:register"')
    # the metadata an install writes from pyproject; vLLM finds plugins with entry_points(group=...) + load()
    dist = tmp_path / f"moeplace-{project['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: moeplace\nVersion: {project['version']}\n")
    (dist / "entry_points.txt").write_text("[vllm.general_plugins]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    monkeypatch.syspath_prepend(str(tmp_path))
    found = [ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins")
             if ep.value.split(":")[0] == "placement.vllm_plugin"]
    assert len(found) == 1 and found[0].load() is vllm_plugin.register


def test_register_without_a_plan_does_nothing(monkeypatch, records):
    monkeypatch.delenv(vllm_plugin.ENV_PLAN, raising=False)
    before = set(sys.modules)
    vllm_plugin.register()
    vllm_plugin.register()
    assert not [m for m in set(sys.modules) - before if m.split(".")[0] == "vllm"]
    assert records == []


def test_register_twice_without_vllm_warns_once(fit, tmp_path, monkeypatch, records):
    p = tmp_path / "plan.json"
    hot_replica_plan(fit, 4, 4).save(p)
    monkeypatch.setenv(vllm_plugin.ENV_PLAN, str(p))
    monkeypatch.setitem(sys.modules, "vllm", None)  # "vLLM is not importable here"
    monkeypatch.setitem(sys.modules, "vllm.distributed", None)
    monkeypatch.setitem(sys.modules, "vllm.distributed.eplb", None)
    vllm_plugin.register()
    vllm_plugin.register()
    w = warnings_of(records)
    assert len(w) == 1 and "cannot be imported" in w[0] and "default expert placement" in w[0]


# checks against a model ----------------------------------------------------------------------------------

def lite_model_kwargs(redundant: int = 4, ep: int = 4) -> dict:
    """DeepSeek-V2-Lite as vLLM's MixtureOfExperts describes it (26 MoE layers at decoder layers 1..26)."""
    return dict(num_moe_layers=26, num_logical_experts=64, num_physical_experts=64 + redundant, ep_size=ep,
                layer_names=[f"model.layers.{i}.mlp.experts" for i in range(1, 27)])


def test_check_against_model(fit):
    plan = hot_replica_plan(fit, 4, 4)
    assert vllm_plugin.check_against_model(plan, **lite_model_kwargs()) is None
    cases = {
        "redundant slots": lite_model_kwargs(redundant=0),
        "EP size": lite_model_kwargs(ep=8),
        "MoE layers": {**lite_model_kwargs(), "num_moe_layers": 27},
        "experts per layer": {**lite_model_kwargs(), "num_logical_experts": 160, "num_physical_experts": 164},
        "decoder layers": {**lite_model_kwargs(), "layer_names": [f"model.layers.{i}.mlp.experts"
                                                                   for i in range(0, 26)]},
    }
    for needle, kw in cases.items():
        reason = vllm_plugin.check_against_model(plan, **kw)
        assert reason is not None and needle in reason, (needle, reason)
    assert "num_redundant_experts\": 4" in vllm_plugin.check_against_model(plan, **lite_model_kwargs(redundant=0))
    rows = plan.phy2log.copy()
    rows[:, -1] = -1
    mem = Plan(rows, 64, plan.topology, plan.moe_layer_index, 27, memory={"budget_slots": 67})
    assert "memory budget" in vllm_plugin.check_against_model(mem, **lite_model_kwargs())


# the hook, with a stand-in vLLM module (no vLLM needed) ----------------------------------------------------

def fake_vllm(monkeypatch, ep_size: int = 4):
    """Just enough of vLLM's module tree for register() to find EplbState.add_model and for the hook to run."""
    import torch

    calls = []

    class EplbState:
        def __init__(self):
            self.model_states = {}
            self.expert_rearrangement_step_interval = 3000
            self.expert_rearrangement_step = 2250

        def add_model(self, model, model_config, model_name=None):
            S = model.num_physical_experts
            row = torch.arange(S) % model.num_logical_experts
            L, E = model.num_moe_layers, model.num_logical_experts
            l2p = torch.full((L, E, 1024), -1)
            l2p[:, :, 0] = torch.arange(E)
            l2p[:, torch.arange(S - E) % E, 1] = torch.arange(E, S)
            self.model_states[model_config.compute_hash()] = SimpleNamespace(
                physical_to_logical_map=row.expand(L, S).clone(), logical_to_physical_map=l2p,
                logical_replica_count=torch.bincount(row, minlength=E).expand(L, E).clone(), expert_buffer=[],
                communicator=object())

    def rearrange_expert_weights_inplace(old_global_expert_indices, new_global_expert_indices, expert_weights,
                                         expert_buffer, ep_group, communicator, is_profile=False, rank_mapping=None):
        calls.append(new_global_expert_indices)

    es = types.ModuleType("vllm.distributed.eplb.eplb_state")
    es.EplbState = EplbState
    es.rearrange_expert_weights_inplace = rearrange_expert_weights_inplace
    ps = types.ModuleType("vllm.distributed.parallel_state")
    ps.get_ep_group = lambda: SimpleNamespace(world_size=ep_size, rank_in_group=0, device_group=object())
    for name in ("vllm", "vllm.distributed", "vllm.distributed.eplb"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.distributed.eplb.eplb_state", es)
    monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", ps)
    sys.modules["vllm.distributed.eplb"].eplb_state = es
    return EplbState, calls


def lite_model(redundant: int):
    return SimpleNamespace(num_moe_layers=26, num_logical_experts=64, num_physical_experts=64 + redundant,
                           expert_weights=[[None]] * 26,
                           moe_layers=[SimpleNamespace(layer_name=f"model.layers.{i}.mlp.experts")
                                       for i in range(1, 27)])


@pytest.mark.parametrize("bad", ["missing", "not-json", "mismatched", "memory"])
def test_bad_or_mismatched_plan_warns_and_keeps_the_default(fit, tmp_path, monkeypatch, records, bad):
    EplbState, calls = fake_vllm(monkeypatch)
    path = tmp_path / "plan.json"
    plan = hot_replica_plan(fit, 4, 4)
    if bad == "not-json":
        path.write_text("{ this is not json")
    elif bad == "mismatched":
        hot_replica_plan(fit, 2, 2).save(path)  # 2 GPUs, vLLM runs 4
    elif bad == "memory":
        rows = plan.phy2log.copy()
        rows[:, -1] = -1
        Plan(rows, 64, plan.topology, plan.moe_layer_index, 27, memory={"budget_slots": 67}).save(path)
    monkeypatch.setenv(vllm_plugin.ENV_PLAN, str(path))
    vllm_plugin.register()
    vllm_plugin.register()
    state = EplbState()
    cfg = SimpleNamespace(model="m", compute_hash=lambda: "h")
    state.add_model(lite_model(4), cfg)  # must not raise
    w = warnings_of(records)
    assert len(w) == 1 and "not installed" in w[0] and "default expert placement" in w[0], w
    assert calls == []  # no weight moved
    assert state.expert_rearrangement_step_interval == 3000  # vLLM's EPLB left as configured
    assert (state.model_states["h"].physical_to_logical_map[0] == np.arange(68) % 64).all()


def test_register_is_reentrant_and_installs_once(fit, tmp_path, monkeypatch, records):
    EplbState, calls = fake_vllm(monkeypatch)
    path = tmp_path / "plan.json"
    plan = hot_replica_plan(fit, 4, 4)
    plan.save(path)
    monkeypatch.setenv(vllm_plugin.ENV_PLAN, str(path))
    for _ in range(3):
        vllm_plugin.register()
    assert getattr(EplbState.add_model, vllm_plugin._HOOK_ATTR)
    assert not hasattr(EplbState.add_model.__wrapped__, vllm_plugin._HOOK_ATTR)  # wrapped once, not thrice
    state = EplbState()
    state.add_model(lite_model(4), SimpleNamespace(model="m", compute_hash=lambda: "h"),
                    model_name=None)
    state.add_model(lite_model(4), SimpleNamespace(model="m", compute_hash=lambda: "d"), model_name="m-draft")
    state.add_model(lite_model(4), SimpleNamespace(model="mtp", runner_type="draft", compute_hash=lambda: "e"))
    assert len(calls) == 1 and np.array_equal(calls[0].numpy(), plan.phy2log)  # the drafter is left alone
    ms = state.model_states["h"]  # maps published in place (vLLM without _commit_eplb_maps: direct copies)
    assert np.array_equal(ms.physical_to_logical_map.numpy(), plan.phy2log)
    ref = plan.log2phy()
    assert np.array_equal(ms.logical_to_physical_map[:, :, :ref.shape[2]].numpy(), ref)
    assert (ms.logical_to_physical_map[:, :, ref.shape[2]:] == -1).all()
    assert np.array_equal(ms.logical_replica_count.numpy(), plan.replica_counts())
    for drafter in ("d", "e"):  # vLLM >= 0.30 names drafters; older ones mark their config runner_type="draft"
        assert (state.model_states[drafter].physical_to_logical_map[0] == np.arange(68) % 64).all()
    assert state.expert_rearrangement_step_interval == vllm_plugin.FROZEN_INTERVAL
    assert warnings_of(records) == []


def _load_plugins_like_vllm_worker(enable_eplb: bool):
    """vLLM's worker init holds its config in a local ``vllm_config`` when it calls the plugins."""
    vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(enable_eplb=enable_eplb))  # noqa: F841
    vllm_plugin.register()


def test_plan_without_eplb_gets_a_warning(fit, tmp_path, monkeypatch, records):
    fake_vllm(monkeypatch)
    path = tmp_path / "plan.json"
    hot_replica_plan(fit, 4, 4).save(path)
    monkeypatch.setenv(vllm_plugin.ENV_PLAN, str(path))
    _load_plugins_like_vllm_worker(enable_eplb=True)
    assert warnings_of(records) == []
    _load_plugins_like_vllm_worker(enable_eplb=False)
    _load_plugins_like_vllm_worker(enable_eplb=False)
    w = warnings_of(records)
    assert len(w) == 1 and "--enable-eplb" in w[0]


# against vLLM's real classes ------------------------------------------------------------------------------

def _vllm_determine_expert_map():
    try:
        from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map
    except ImportError:  # vLLM < 0.30 keeps it in layer.py
        from vllm.model_executor.layers.fused_moe.layer import determine_expert_map
    return determine_expert_map


def _vllm_importable() -> bool:
    try:
        import vllm.distributed.eplb.eplb_state  # noqa: F401

        _vllm_determine_expert_map()
    except Exception:  # noqa: BLE001
        return False
    return True


needs_vllm = pytest.mark.skipif(not _vllm_importable(), reason="vLLM is not importable here (see docs/serving.md)")


@needs_vllm
def test_determine_expert_map_matches_vllm():
    from placement.export import vllm as vllm_export

    determine_expert_map = _vllm_determine_expert_map()

    for ep in (1, 2, 3, 4, 8):
        for n in (8, 64, 68, 66, 160):
            for strategy in ("linear", "round_robin"):
                for rank in range(ep):
                    theirs = determine_expert_map(ep, rank, n, expert_placement_strategy=strategy)
                    ours = vllm_export.determine_expert_map(ep, rank, n, strategy)
                    assert theirs[0] == ours[0]
                    assert (theirs[1] is None) == (ours[1] is None)
                    if ours[1] is not None:
                        assert theirs[1].tolist() == ours[1].tolist()


class _MoEStandIn:
    """vLLM's MixtureOfExperts attributes; each expert weight row holds its logical id (+1000 x layer)."""

    def __init__(self, E, R, L, ep, rank, initial, first_moe_layer=1):
        import torch

        self.num_moe_layers, self.num_logical_experts, self.num_routed_experts = L, E, E
        self.num_redundant_experts, self.num_physical_experts = R, E + R
        self.num_local_physical_experts = (E + R) // ep
        self.num_expert_groups, self.num_shared_experts = 1, 0
        spg = self.num_local_physical_experts
        ids = torch.tensor(initial[rank * spg:(rank + 1) * spg], dtype=torch.float32)[:, None]
        self.expert_weights = [[ids.repeat(1, 8) + 1000 * l, ids.repeat(1, 3) + 1000 * l] for l in range(L)]
        self.moe_layers = [SimpleNamespace(layer_name=f"model.layers.{l + first_moe_layer}.mlp.experts")
                           for l in range(L)]

    def set_eplb_state(self, expert_load_view, logical_to_physical_map, logical_replica_count):
        self.views = (logical_to_physical_map, logical_replica_count)


def _rank_worker(rank, world, port, scenarios, out_dir):
    """One EP rank: vLLM's distributed state on gloo, then one real EplbState per scenario."""
    import os

    import torch

    sys.path.insert(0, str(ROOT))
    from vllm.config import DeviceConfig, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.config.parallel import EPLBConfig

    from placement import vllm_plugin as plugin

    records = []
    lg = logging.getLogger("vllm.moeplace")
    lg.addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append((r.levelname,
                                                                                          r.getMessage()))})())
    lg.setLevel(logging.INFO)
    R = scenarios[0]["vllm_redundant"]
    fields = getattr(EPLBConfig, "__dataclass_fields__", {}) or getattr(EPLBConfig, "model_fields", {})
    eplb_kw = {k: v for k, v in (("communicator", "torch_nccl"), ("use_async", False)) if k in fields}
    pc = ParallelConfig(tensor_parallel_size=world, enable_expert_parallel=True, eplb_config=EPLBConfig(**eplb_kw))
    cfg = VllmConfig(parallel_config=pc, device_config=DeviceConfig(device="cpu"))
    pc.enable_eplb = True  # ParallelConfig refuses EPLB without a GPU at validation; set it afterwards
    pc.eplb_config.num_redundant_experts = R
    results = []
    with set_current_vllm_config(cfg):
        from vllm.distributed.parallel_state import init_distributed_environment, initialize_model_parallel

        init_distributed_environment(world, rank, f"tcp://127.0.0.1:{port}", rank, backend="gloo")
        initialize_model_parallel(tensor_model_parallel_size=world)
        import vllm.distributed.eplb.eplb_state as es

        for mod in [es, sys.modules.get("vllm.distributed.eplb.eplb_communicator")]:
            if mod is not None and hasattr(mod, "PIN_MEMORY"):
                mod.PIN_MEMORY = False  # no pinned host memory without a GPU
        for i, sc in enumerate(scenarios):
            path = sc["plan_on_rank"][rank]
            os.environ.pop(plugin.ENV_POLICY, None)
            if path is None:
                os.environ.pop(plugin.ENV_PLAN, None)
            else:
                os.environ[plugin.ENV_PLAN] = path
            if sc.get("policy"):
                os.environ[plugin.ENV_POLICY] = plugin.POLICY_NAME
            plugin.register()
            plugin.register()  # vLLM may load plugins more than once per process
            initial = es.EplbState.build_initial_global_physical_to_logical_map(64, R)
            model = _MoEStandIn(64, R, 26, world, rank, initial)
            n_before = len(records)
            # vLLM >= 0.34 keys model states by the config's compile factors, earlier ones by compute_hash()
            mc = SimpleNamespace(model="deepseek-v2-lite", compute_hash=lambda i=i: f"h{i}",
                                 compile_factors=lambda i=i: {"scenario": i})
            if hasattr(es.EplbState, "add_model"):  # vLLM >= 0.13
                state = es.EplbState(pc, torch.device("cpu"))
                state.add_model(model, mc)
                ms = next(iter(state.model_states.values()))
            else:  # vLLM 0.10-0.12
                state = ms = es.EplbState.build(model, torch.device("cpu"), pc)
            extra = {}
            if sc.get("policy"):  # one real rearrangement with the load window the test gives (rank 0 only)
                if not hasattr(torch, "_moeplace_cpu_event"):  # rank 0 times the rearrangement with device events,
                    class _CpuEvent:  # which a CPU build cannot record: a stand-in that measures nothing
                        def __init__(self, *a, **k):
                            pass

                        def record(self, *a, **k):
                            pass

                        def synchronize(self):
                            pass

                        def elapsed_time(self, other):
                            return 0.0

                    torch.Event, torch._moeplace_cpu_event = _CpuEvent, True
                load = torch.tensor(sc["load"], dtype=ms.expert_load_window.dtype)
                ms.expert_load_window.zero_()
                if rank == 0:
                    ms.expert_load_window[0] = load
                extra = {"policy": getattr(state.policy, "__name__", str(state.policy)),
                         "horizon": state.expert_rearrangement_step_interval / state.expert_load_window_size,
                         "p2l_before": ms.physical_to_logical_map.tolist()}
                state.rearrange()
            results.append({"p2l": ms.physical_to_logical_map.tolist(),
                            "l2p": ms.logical_to_physical_map[:, :, :4].tolist(),
                            "cnt": ms.logical_replica_count.tolist(),
                            "w0": [w[0][:, 0].tolist() for w in model.expert_weights],
                            "w1": [w[1][:, 2].tolist() for w in model.expert_weights],
                            "interval": state.expert_rearrangement_step_interval,
                            "logs": records[n_before:], **extra})
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))


def _run_ranks(scenarios, tmp_path, world=2, timeout=300):
    import multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_worker, args=(r, world, port, scenarios, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.terminate()
    assert not hung, "EP ranks hung (the plugin must never leave ranks waiting on each other)"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def _transfer_runs_on_cpu() -> bool:
    """vLLM < 0.2x calls CUDA inside rearrange_expert_weights_inplace; those versions need a GPU for scenario 1."""
    import inspect

    import torch
    from vllm.distributed.eplb import rebalance_execute

    return torch.cuda.is_available() or "torch.cuda." not in inspect.getsource(
        rebalance_execute.rearrange_expert_weights_inplace)


@needs_vllm
def test_plugin_against_real_vllm_eplb_state(fit, tmp_path):
    G, R = 2, 2
    good = hot_replica_plan(fit, G, R)
    good_path = tmp_path / "good.json"
    good.save(good_path)
    wrong_path = tmp_path / "wrong.json"
    hot_replica_plan(fit, G, 4).save(wrong_path)  # 4 redundant slots; vLLM runs with 2
    scenarios = {
        "installed": {"plan_on_rank": [str(good_path)] * G, "vllm_redundant": R},
        "mismatched": {"plan_on_rank": [str(wrong_path)] * G, "vllm_redundant": R},
        "missing-on-rank-1": {"plan_on_rank": [str(good_path), str(tmp_path / "not-on-this-node.json")],
                              "vllm_redundant": R},
    }
    if not _transfer_runs_on_cpu():
        del scenarios["installed"]
    ranks = _run_ranks(list(scenarios.values()), tmp_path)
    spg = (64 + R) // G
    layer = 1000 * np.arange(26)[:, None]
    identity = np.tile(np.arange(64 + R) % 64, (26, 1))
    for rank, results in enumerate(ranks):
        res = dict(zip(scenarios, results))
        if "installed" in res:
            # 1. vLLM's maps hold the plan, and vLLM's own transfer moved the weights to match
            ok = res["installed"]
            assert np.array_equal(ok["p2l"], good.phy2log)
            assert np.array_equal(ok["cnt"], good.replica_counts())
            l2p = np.asarray(ok["l2p"])
            ref = good.log2phy()
            assert np.array_equal(l2p[:, :, :ref.shape[2]], ref) and (l2p[:, :, ref.shape[2]:] == -1).all()
            local = good.phy2log[:, rank * spg:(rank + 1) * spg]
            assert np.array_equal(ok["w0"], local + layer) and np.array_equal(ok["w1"], local + layer)
            assert ok["interval"] == vllm_plugin.FROZEN_INTERVAL
            assert not [m for lvl, m in ok["logs"] if lvl == "WARNING"]
        # 2. mismatched plan: one warning, vLLM's default maps and weights untouched, no exception, no hang
        wrong = res["mismatched"]
        warns = [m for lvl, m in wrong["logs"] if lvl == "WARNING"]
        assert len(warns) == 1 and "redundant" in warns[0], warns
        assert np.array_equal(wrong["p2l"], identity)
        assert np.array_equal(wrong["w0"], identity[:, rank * spg:(rank + 1) * spg] + layer)
        assert wrong["interval"] != vllm_plugin.FROZEN_INTERVAL
        # 3. the plan is missing on rank 1 only: every rank keeps the default
        split = res["missing-on-rank-1"]
        warns = [m for lvl, m in split["logs"] if lvl == "WARNING"]
        assert len(warns) == 1 and ("another EP rank" in warns[0] if rank == 0 else "no such plan file" in warns[0])
        assert np.array_equal(split["p2l"], identity)
        assert np.array_equal(split["w0"], identity[:, rank * spg:(rank + 1) * spg] + layer)


@needs_vllm
def test_real_engine_args_without_eplb_warn(fit, tmp_path, monkeypatch, records):
    """vLLM's own EngineArgs loads the plugins (given our entry point, as an install would register it)."""
    import vllm.plugins as vp
    from vllm.engine.arg_utils import EngineArgs

    path = tmp_path / "plan.json"
    hot_replica_plan(fit, 2, 2).save(path)
    monkeypatch.setenv(vllm_plugin.ENV_PLAN, str(path))
    monkeypatch.setattr(vp, "plugins_loaded", False)
    monkeypatch.setattr(vp, "load_plugins_by_group", lambda group: {"moeplace": vllm_plugin.register}
                        if group == vp.DEFAULT_PLUGINS_GROUP else {})
    try:
        EngineArgs(model=str(tmp_path / "no-model-here"), enable_eplb=False)
    except Exception:  # noqa: BLE001 - later validation of the missing model does not matter here
        pass
    w = warnings_of(records)
    assert len(w) == 1 and "EPLB is off" in w[0] and "--enable-eplb" in w[0]


@needs_vllm
def test_vllm_online_rearrangement_uses_the_moeplace_policy(tmp_path):
    """MOEPLACE_EPLB_POLICY=moeplace: a real EplbState.rearrange() on two CPU ranks calls moeplace's policy with the
    all-reduced load window, moves the expert weights with vLLM's own transfer, and ends with moeplace's map."""
    from placement.online import rebalance
    from traces import datasets
    from traces.format import layer_counts

    if not _transfer_runs_on_cpu():
        pytest.skip("this vLLM's weight transfer needs a GPU")
    G, R = 2, 2
    counts = layer_counts(datasets.load(tasks=["law"]).expert_ids[:2000], 64).astype(float)  # real [26, 64] window
    load = np.zeros((26, 64 + R))
    load[:, :64] = counts  # vLLM's initial map puts expert s in slot s for s < 64: logical load = these counts
    ranks = _run_ranks([{"plan_on_rank": [None] * G, "vllm_redundant": R, "policy": True, "load": load.tolist()}],
                       tmp_path)
    spg = (64 + R) // G
    layer = 1000 * np.arange(26)[:, None]
    for rank, (res,) in enumerate(ranks):
        assert res["policy"] == "MoeplaceEplbPolicy"
        before = np.asarray(res["p2l_before"])
        expected = rebalance(counts, 64 + R, 1, 1, G, before, horizon=res["horizon"])
        assert np.array_equal(res["p2l"], expected)
        assert not np.array_equal(expected, before)
        local = expected[:, rank * spg:(rank + 1) * spg]
        assert np.array_equal(res["w0"], local + layer) and np.array_equal(res["w1"], local + layer)
        assert not [m for lvl, m in res["logs"] if lvl == "WARNING"], res["logs"]


# the online policy hook, with a stand-in policy registry (no vLLM needed) -----------------------------------------

def fake_registry(monkeypatch):
    """vLLM's policy registry as 0.33/0.34 have it: an abstract base, the default policy, EPLB_POLICIES."""
    import torch

    from solvers.eplb import rebalance_experts

    class AbstractEplbPolicy:
        pass

    class DefaultEplbPolicy(AbstractEplbPolicy):
        calls = 0

        @classmethod
        def rebalance_experts(cls, weight, num_replicas, num_groups, num_nodes, num_ranks,
                              old_global_expert_indices=None) -> torch.Tensor:
            cls.calls += 1
            return torch.as_tensor(rebalance_experts(weight.numpy(), num_replicas, num_groups, num_nodes,
                                                     num_ranks)[0])

    reg = types.ModuleType("vllm.distributed.eplb.policy")
    reg.AbstractEplbPolicy, reg.DefaultEplbPolicy = AbstractEplbPolicy, DefaultEplbPolicy
    reg.EPLB_POLICIES = {"default": DefaultEplbPolicy}
    for name in ("vllm", "vllm.distributed", "vllm.distributed.eplb"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.distributed.eplb.policy", reg)
    sys.modules["vllm.distributed.eplb"].policy = reg
    return reg


def test_policy_hook_installs_and_falls_back(fit, monkeypatch, records):
    import torch

    reg = fake_registry(monkeypatch)
    monkeypatch.setenv(vllm_plugin.ENV_POLICY, vllm_plugin.POLICY_NAME)
    monkeypatch.setenv(vllm_plugin.ENV_POLICY_OPTIONS, '{"max_moves": 50}')
    state = SimpleNamespace(policy=reg.DefaultEplbPolicy, expert_load_window_size=1000,
                            expert_rearrangement_step_interval=3000)
    assert vllm_plugin.install_policy(state)
    assert reg.EPLB_POLICIES["moeplace"] is state.policy and issubclass(state.policy, reg.AbstractEplbPolicy)
    assert state.policy.moeplace.options == {"max_moves": 50, "horizon": 3.0}
    weight = torch.tensor(fit.load_profile().logical_count[0])
    old = torch.tensor(np.tile(np.arange(68) % 64, (26, 1)))
    new = state.policy.rebalance_experts(weight, 68, 1, 1, 4, old)
    assert isinstance(new, torch.Tensor) and reg.DefaultEplbPolicy.calls == 0
    moved = sum(len(set(new[l, g * 17:(g + 1) * 17].tolist()) - set(old[l, g * 17:(g + 1) * 17].tolist()))
                for l in range(26) for g in range(4))
    assert 0 < moved <= 50
    assert warnings_of(records) == []
    # an unusable map in service (an expert id out of range): vLLM's default policy decides, one warning
    bad = old.clone()
    bad[0, 0] = 99
    for _ in range(2):
        out = state.policy.rebalance_experts(weight, 68, 1, 1, 4, bad)
    assert reg.DefaultEplbPolicy.calls == 2 and tuple(out.shape) == (26, 68)
    w = warnings_of(records)
    assert len(w) == 1 and "default policy" in w[0]


@pytest.mark.parametrize("case", ["bad-json", "bad-option", "no-registry", "other-name"])
def test_policy_hook_problems_keep_vllm_default(monkeypatch, records, case):
    reg = fake_registry(monkeypatch)
    monkeypatch.setenv(vllm_plugin.ENV_POLICY, vllm_plugin.POLICY_NAME)
    state = SimpleNamespace(policy=reg.DefaultEplbPolicy)
    if case == "bad-json":
        monkeypatch.setenv(vllm_plugin.ENV_POLICY_OPTIONS, "{max_moves: 5")
    elif case == "bad-option":
        monkeypatch.setenv(vllm_plugin.ENV_POLICY_OPTIONS, '{"max_movez": 5}')
    elif case == "no-registry":
        monkeypatch.setitem(sys.modules, "vllm.distributed.eplb.policy", None)  # a vLLM before the registry
        monkeypatch.delattr(sys.modules["vllm.distributed.eplb"], "policy")
    else:
        monkeypatch.setenv(vllm_plugin.ENV_POLICY, "fancy")
    assert not vllm_plugin.install_policy(state)
    if case == "other-name":
        vllm_plugin.register()  # the name is checked (and warned about) where the plugin is loaded
    assert state.policy is reg.DefaultEplbPolicy and "moeplace" not in reg.EPLB_POLICIES
    w = warnings_of(records)
    assert len(w) == 1 and ("default EPLB policy" in w[0]), w
