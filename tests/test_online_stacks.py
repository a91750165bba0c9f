"""moeplace's online policy inside SGLang: the launcher and the policy in SGLang's own expert-location code.

Always run: ``moeplace sglang-launch`` starts ``python -m sglang.launch_server`` with the policy installed in the
server process and in the processes it spawns (checked with a stand-in ``sglang`` package that only reports whether
its ``eplb_algorithms.rebalance_experts`` is moeplace's), passes SGLang's exit code through, and without SGLang exits
with one sentence and code 2.

SGLang tier (``pytest -m sglang``, in the environment ``scripts/tier-sglang.sh`` builds): SGLang's own
``ExpertLocationMetadata.init_by_eplb`` runs with the patched ``eplb_algorithms`` on real counts and ends with
moeplace's map, its replica lists and static dispatch built by SGLang from it; a failing policy leaves SGLang's own
algorithm in charge with one warning. Replaced for the CPU run, as in tests/test_sglang_parser.py: SGLang's config
accessors and the model-class lookup, plus ``torch.distributed.get_rank`` (0: one process) and the global
expert-location metadata (the map in service, given by the test).

The vLLM side is in tests/test_vllm_plugin.py (``test_vllm_online_rearrangement_uses_the_moeplace_policy``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fake_sglang(root: Path) -> None:
    pkg = root / "sglang"
    (pkg / "srt" / "eplb").mkdir(parents=True)
    for d in (pkg, pkg / "srt", pkg / "srt" / "eplb"):
        (d / "__init__.py").write_text("")
    (pkg / "srt" / "eplb" / "eplb_algorithms.py").write_text(textwrap.dedent("""
        def rebalance_experts(tokens_per_expert, num_physical_experts, num_local_physical_experts, num_groups,
                              num_nodes, algorithm):
            raise NotImplementedError
    """))
    (pkg / "launch_server.py").write_text(textwrap.dedent("""
        import multiprocessing as mp
        import sys

        def report(tag):
            from sglang.srt.eplb import eplb_algorithms
            ours = getattr(eplb_algorithms.rebalance_experts, "moeplace_original", None) is not None
            print(f"{tag} moeplace={ours} args={sys.argv[1:]}", flush=True)

        if __name__ == "__main__":
            report("server")
            ctx = mp.get_context("spawn")  # SGLang starts its schedulers as spawned processes
            p = ctx.Process(target=report, args=("scheduler",))
            p.start()
            p.join()
            sys.exit(3)
    """))


def test_sglang_launch_installs_the_policy_in_spawned_processes(tmp_path):
    _fake_sglang(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    r = subprocess.run([sys.executable, "-m", "placement.cli", "sglang-launch", "--max-moves", "64", "--",
                        "--model-path", "m", "--enable-eplb"], capture_output=True, text=True, env=env, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 3, r.stderr  # SGLang's own exit code
    lines = r.stdout.split("\n")
    assert "server moeplace=True args=['--model-path', 'm', '--enable-eplb']" in lines
    assert any(x.startswith("scheduler moeplace=True") for x in lines)


def test_sglang_launch_without_sglang_is_one_sentence(tmp_path):
    code = ("import sys, importlib.util; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda n, *a: None if n == 'sglang' else real(n, *a); "
            "sys.argv = ['moeplace', 'sglang-launch', '--', '--enable-eplb']; from placement.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "SGLang is not installed" in lines[0]
    bad = subprocess.run([sys.executable, "-m", "placement.cli", "sglang-launch", "--max-moves", "-1", "--"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2 and "max_moves" in bad.stderr


def test_sglang_maps_are_what_sglang_algorithms_return():
    """The replica lists sglang_maps builds name every slot of each expert once, in slot order, -1 padded."""
    from placement.sglang_policy import sglang_maps
    from solvers import online

    X = online.fresh_plan(np.random.default_rng(0).gamma(1.0, 1.0, (3, 16)), online.Layout(16, 24, 4))
    p2l, l2p, cnt = (t.numpy() for t in sglang_maps(X, 16))
    assert np.array_equal(p2l, X)
    for l in range(3):
        for e in range(16):
            slots = np.flatnonzero(X[l] == e)
            assert cnt[l, e] == len(slots)
            assert list(l2p[l, e, :len(slots)]) == list(slots) and (l2p[l, e, len(slots):] == -1).all()


# SGLang tier ----------------------------------------------------------------------------------------------------

def _sglang_importable() -> bool:
    try:
        from sglang.srt.eplb import eplb_algorithms, expert_location  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


needs_sglang = pytest.mark.skipif(not _sglang_importable(), reason="sglang is not importable here")


@pytest.fixture
def sglang_setup(monkeypatch):
    import torch
    from sglang.srt.eplb import eplb_algorithms, expert_location as el

    from placement import sglang_policy
    from traces import datasets
    from traces.format import layer_counts

    G, R = 4, 4
    moe = SimpleNamespace(init_expert_location="trivial", ep_num_redundant_experts=R, ep_join_mode="none",
                          moe_a2a_backend="none", ep_dispatch_algorithm="static", eplb_algorithm="auto")
    monkeypatch.setattr(el, "get_exec", lambda: SimpleNamespace(moe=moe))
    monkeypatch.setattr(el, "get_parallel", lambda: SimpleNamespace(ep_size=G, tp_size=G, nnodes=1,
                                                                    elastic_ep_initial_size=None,
                                                                    ep_join_rank_offset=0))
    monkeypatch.setattr(el, "get_device", lambda: SimpleNamespace(device="cpu"))
    monkeypatch.setattr(el.ModelConfigForExpertLocation, "from_model_config", staticmethod(
        lambda model_config: el.ModelConfigForExpertLocation(num_layers=27, num_logical_experts=64, num_groups=1)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
    current = torch.tensor(np.tile(np.arange(64 + R) % 64, (27, 1)))  # SGLang's trivial start-up layout
    monkeypatch.setattr(el, "get_global_expert_location_metadata",
                        lambda: SimpleNamespace(physical_to_logical_map=current, physical_to_logical_map_cpu=current))
    monkeypatch.setattr(eplb_algorithms, "rebalance_experts", eplb_algorithms.rebalance_experts)  # undone after
    monkeypatch.setattr(sglang_policy, "_state", {})
    sglang_policy._warned.clear()
    ids = datasets.load(tasks=["law"]).expert_ids[:3000]
    steps = np.zeros((3, 27, 64))  # the recorder buffer: [steps, decoder layers, E]; layer 0 is dense (no counts)
    for s in range(3):
        steps[s, 1:] = layer_counts(ids[s * 1000:(s + 1) * 1000], 64)
    return SimpleNamespace(el=el, algorithms=eplb_algorithms, policy=sglang_policy, G=G, R=R, current=current,
                           steps=torch.tensor(steps))


@pytest.mark.sglang
@needs_sglang
def test_sglang_init_by_eplb_ends_with_moeplace_map(sglang_setup, monkeypatch):
    s = sglang_setup
    from placement.online import OnlinePolicy

    monkeypatch.setenv(s.policy.ENV_OPTIONS, '{"max_moves": 200, "horizon": 1000}')  # a long interval: moves pay
    assert s.policy.patch(s.algorithms)
    meta = s.el.ExpertLocationMetadata.init_by_eplb(None, s.steps)
    expected = OnlinePolicy(max_moves=200, horizon=1000)(s.steps, 64 + s.R, 1, 1, s.G, s.current)
    p2l = meta.physical_to_logical_map.numpy()
    assert np.array_equal(p2l, np.asarray(expected))
    assert not np.array_equal(p2l, s.current.numpy())
    moved = sum(len(set(p2l[l, g * 17:(g + 1) * 17]) - set(s.current.numpy()[l, g * 17:(g + 1) * 17]))
                for l in range(27) for g in range(s.G))
    assert moved <= 200
    l2p = meta.logical_to_all_physical_map.numpy()
    dispatch = meta.logical_to_rank_dispatch_physical_map.numpy()
    for l in range(27):
        for e in range(64):
            slots = set(np.flatnonzero(p2l[l] == e).tolist())
            assert {int(x) for x in l2p[l, e] if x >= 0} == slots
            assert int(dispatch[l, e]) in slots


@pytest.mark.sglang
@needs_sglang
def test_sglang_failing_policy_leaves_sglang_in_charge(sglang_setup, monkeypatch, caplog):
    s = sglang_setup
    own = s.algorithms.rebalance_experts
    monkeypatch.setenv(s.policy.ENV_OPTIONS, '{"history": "four"}')  # a bad option: the policy raises
    assert s.policy.patch(s.algorithms)
    with caplog.at_level(logging.WARNING, logger="sglang.moeplace"):
        meta = s.el.ExpertLocationMetadata.init_by_eplb(None, s.steps)
        s.el.ExpertLocationMetadata.init_by_eplb(None, s.steps)
    ref = own(s.steps, 64 + s.R, (64 + s.R) // s.G, 1, 1, s.algorithms.EplbAlgorithm.deepseek_hierarchical)[0]
    assert np.array_equal(meta.physical_to_logical_map.numpy(), ref.numpy())
    warns = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warns) == 1 and "SGLang" in warns[0]

