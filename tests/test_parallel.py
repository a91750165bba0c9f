"""Parallel work gives the results of one process: trace statistics over shards, the layer-parallel joint planner,
on local worker processes and on a real Ray cluster started on this machine; bad parallel options get one sentence.

Properties: the statistics of shards reduced by 1 worker, 2 workers, in another shard order and on Ray equal each
other exactly and equal the counts of the concatenated trace counted in memory; the plan for a fixed seed and work
limit is the same array with 1 worker, 2 workers and Ray, and its objective is the from-scratch objective.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from placement.affinity import AffinityStats
from placement.executor import InProcess, LocalProcesses
from placement.reduce import reduce_stats
from solvers import Options, Topology, solve
from traces import RoutingTrace, datasets, save

ROOT = Path(__file__).resolve().parent.parent
COUNT_FIELDS = ("tokens", "load", "transitions", "coactivation", "transitions_top1")
ALL_FIELDS = COUNT_FIELDS + ("transitions_shuffled", "load_gate", "transitions_gate")


@pytest.fixture(scope="module")
def real():
    return datasets.load()


@pytest.fixture(scope="module")
def shards(real, tmp_path_factory) -> list[Path]:
    """The bundled trace's first 6,000 tokens in five shards of unequal size (real routing, gate weights kept)."""
    folder = tmp_path_factory.mktemp("shards")
    cuts = [0, 700, 2000, 2100, 4200, 6000]
    out = []
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        idx = np.arange(a, b)
        part = real.take(idx)
        path = folder / f"part{i:02d}.npz"
        save(part, path)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def small_problem(real):
    """A planning problem from 1,500 real tokens and the first 10 MoE layers: 8 GPUs with no redundant slots (the
    affinity chain is a cross-layer start) and 8 GPUs + 8 redundant slots."""
    from placement.problem import build_problem

    tr = real.take(np.arange(1500))
    tr = RoutingTrace(expert_ids=tr.expert_ids[:, :10], num_experts=64, gate_weights=tr.gate_weights[:, :10],
                      seq_id=tr.seq_id, moe_layer_index=tr.moe_layer_index[:10])
    return {r: build_problem(tr, Topology.for_experts(64, 8, r)) for r in (0, 8)}


def _equal_stats(a: AffinityStats, b: AffinityStats, fields=ALL_FIELDS) -> None:
    for f in fields:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert np.array_equal(x, y), f


def test_statistics_of_shards_are_exact_for_any_workers_and_order(real, shards):
    one = reduce_stats(shards, None)
    with LocalProcesses(2) as ex:
        two = reduce_stats(shards, ex)
        shuffled = reduce_stats([shards[i] for i in (3, 0, 4, 2, 1)], ex)
        batched = reduce_stats(shards, ex, batch=2)  # merged batch by batch: memory bounded, same result
    _equal_stats(one, two)
    _equal_stats(one, batched)
    # another order: every count is an exact integer sum, so it is the same whatever the order
    _equal_stats(one, shuffled, COUNT_FIELDS)
    # and they are the counts of the whole trace in memory
    whole = AffinityStats.from_trace(RoutingTrace.concat([real.take(np.arange(6000))]), baselines=False)
    _equal_stats(one, whole, COUNT_FIELDS)
    assert one.tokens.max() == 6000


def test_a_folder_and_a_glob_are_their_shards(shards):
    from placement.cli_common import trace_files

    folder = shards[0].parent
    assert trace_files([str(folder)]) == sorted(shards)
    assert trace_files([str(folder / "part0[0-2].npz")]) == sorted(shards)[:3]


@pytest.mark.parametrize("redundant", [0, 8])
def test_joint_plan_is_bit_identical_for_1_and_2_workers(small_problem, redundant):
    from solvers.joint import objective_of, prepare

    problem = small_problem[redundant]
    opts = dict(time_limit=None, seed=3, work_limit=1)
    serial = solve("joint", problem, Options(**opts, executor=InProcess()))
    with LocalProcesses(2) as ex:
        parallel = solve("joint", problem, Options(**opts, executor=ex))
    assert np.array_equal(serial.phy2log, parallel.phy2log)
    assert serial.objective == parallel.objective and serial.bound == parallel.bound
    assert serial.stats["method"] == "layer by layer" and parallel.stats["workers"] == 2
    if redundant == 0:
        assert serial.stats["cross_layer_starts"]  # the affinity chain took part
    # the per-layer objectives add up to the objective of the whole plan, counted from scratch
    assert serial.objective == pytest.approx(objective_of(prepare(problem, Options()), serial.phy2log), rel=1e-9)
    assert serial.bound <= serial.objective


def test_ray_local_cluster_gives_the_same_statistics_and_plan(shards, small_problem):
    pytest.importorskip("ray")
    from placement.executor import RayExecutor

    problem = small_problem[8]
    opts = dict(time_limit=None, seed=1, work_limit=1)
    serial_plan = solve("joint", problem, Options(**opts))
    serial_stats = reduce_stats(shards, None)
    ex = RayExecutor("local", num_cpus=2)
    try:
        ray_stats = reduce_stats(shards, ex)
        ray_plan = solve("joint", problem, Options(**opts, executor=ex))
    finally:
        ex.close()
    import ray

    assert not ray.is_initialized()
    _equal_stats(serial_stats, ray_stats)
    assert np.array_equal(serial_plan.phy2log, ray_plan.phy2log)
    assert serial_plan.objective == ray_plan.objective


def _cli(*args, env=None, timeout=120):
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "placement.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=e, timeout=timeout)


def test_affinity_of_a_folder_on_two_workers_equals_one(shards):
    a = _cli("affinity", shards[0].parent, "--workers", 2, "--json")
    b = _cli("affinity", *shards, "--workers", 1, "--json")
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["overall"] == json.loads(b.stdout)["overall"]


def test_bad_parallel_input_gets_one_sentence(tmp_path, shards, real):
    other = tmp_path / "other.npz"
    tr = real.take(np.arange(50))
    save(RoutingTrace(expert_ids=tr.expert_ids[:, :10], num_experts=64), other)  # 10 MoE layers, not 26
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (("affinity", "--workers", 0), "--workers"),
        (("plan", "--gpus", 8, "--work-limit", 0), "--work-limit"),
        (("plan", "--gpus", 8, "--work-limit", 1, "--time-limit", 5), "not both"),
        (("plan", "--gpus", 8, "--solver", "eplb", "--work-limit", 1), "joint"),
        (("affinity", shards[0], other), "different models"),
        (("affinity", empty), "no .npz"),
        (("affinity", str(tmp_path / "nothing*.npz")), "matches"),
    ]
    for args, words in cases:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_an_unreachable_ray_address_is_refused_quickly():
    pytest.importorskip("ray")
    t0 = time.monotonic()
    r = _cli("affinity", "--ray-address", "127.0.0.1:1")  # nothing listens on port 1
    assert r.returncode == 2 and "127.0.0.1:1" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert time.monotonic() - t0 < 30  # the interpreter's start included; the check itself takes about a second


def test_ray_not_installed_says_which_extra(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\nclass _Hide:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n            raise ImportError('hidden')\n"
        "sys.meta_path.insert(0, _Hide())\n")
    r = _cli("affinity", "--ray-address", "local", env={"PYTHONPATH": f"{hide}{os.pathsep}{ROOT}"})
    assert r.returncode == 2 and 'moeplace[ray]' in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_evaluation_in_blocks_on_two_workers_equals_one(real, monkeypatch):
    import placement.evaluate
    from placement.evaluate import evaluate
    from placement.plan import Plan
    from placement.problem import build_problem

    fit, held = real.split_by_sequence(0.5, seed=0)
    topo = Topology.for_experts(64, 8, 8, gpus_per_node=4)
    res = solve("eplb", build_problem(fit, topo))
    plan = Plan.from_result(res, 64, topo, fit.moe_layer_index, fit.decoder_layers, fit.model)
    whole = evaluate(plan, held)
    monkeypatch.setattr(placement.evaluate, "_IDS_PER_BLOCK", 26 * 6 * 1000)  # blocks of 1,000 tokens
    with LocalProcesses(2) as ex:
        parts = evaluate(plan, held, executor=ex)
    assert parts["overall"] == whole["overall"] and parts["per_layer"] == whole["per_layer"]


def test_replay_of_policies_on_two_workers_equals_one():
    """Policies replayed in parallel (one task each, built in the worker from their specs) give the rows of the
    replay one after another (each policy's own wall time aside)."""
    from placement.replay import PolicySpec, ReplaySetup, replay
    from traces import drift

    data = drift.scenario("esft-drift:phases")
    data = data.take(np.arange(3000, 9000))
    setup = ReplaySetup(Topology.for_experts(64, 4, 4, gpus_per_node=2), 1200, 1200, scale=8.0)
    specs = {"eplb": PolicySpec("eplb"), "moeplace": PolicySpec("moeplace", {"max_moves": 30}),
             "fixed": np.tile(np.arange(68) % 64, (data.num_layers, 1))}
    one = replay(data, specs, setup)
    with LocalProcesses(2) as ex:
        two = replay(data, specs, setup, executor=ex)
    assert list(one["policies"]) == list(two["policies"]) == list(specs)
    for name in specs:
        a, b = one["policies"][name]["rebalances"], two["policies"][name]["rebalances"]
        assert len(a) == len(b) == 4
        for ra, rb in zip(a, b):
            assert {k: v for k, v in ra.items() if k != "policy_seconds"} == \
                   {k: v for k, v in rb.items() if k != "policy_seconds"}
    assert any(r["moved_copies"] for r in one["policies"]["moeplace"]["rebalances"])  # the policies did act
