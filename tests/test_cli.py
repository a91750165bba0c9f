"""CLI: the pipeline runs end to end; bad input gives one sentence and exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from placement.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def contiguous_plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "contiguous.json"
    r = run("plan", "deepseek-v2-lite-esft:law", "--gpus", 4, "--solver", "contiguous", "--holdout", 0.5, "--out", path)
    assert r.exit_code == 0, r.output
    return path


def test_plan_evaluate_export_pipeline(contiguous_plan, tmp_path):
    plan = json.loads(contiguous_plan.read_text())
    assert plan["format"] == "moeplace.plan" and plan["version"] == 1
    assert len(plan["phy2log"]) == 26 and len(plan["phy2log"][0]) == 64
    assert plan["heldout"]["tokens"] > 0 and plan["predicted"]["tokens"] > 0
    r = run("evaluate", contiguous_plan, "--trace", "deepseek-v2-lite-esft:law", "--holdout", 0.5, "--json")
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)["overall"]
    for key in ("load_imbalance", "load_imbalance_max", "balancedness", "affinity_locality", "cross_gpu_fraction",
                "inter_node_fraction", "dispatch_gpus", "dispatch_nodes", "a2a_bytes"):
        assert key in metrics
    # the same split: evaluate --holdout reproduces the plan's recorded held-out metrics
    assert metrics["a2a_bytes"] == pytest.approx(plan["heldout"]["a2a_bytes"])
    out = tmp_path / "sglang.json"
    r = run("export", contiguous_plan, "--format", "sglang", "--out", out)
    assert r.exit_code == 0, r.output
    exported = json.loads(out.read_text())
    assert list(exported) == ["physical_to_logical_map"]
    rows = np.array(exported["physical_to_logical_map"])
    assert rows.shape == (27, 64)  # every decoder layer, the dense layer 0 included
    assert np.array_equal(rows[0], np.arange(64)) and np.array_equal(rows[1:], np.array(plan["phy2log"]))


def test_redundant_rows_and_groups(tmp_path):
    out = tmp_path / "p.json"
    r = run("plan", "deepseek-v2-lite-esft:intent", "--gpus", 8, "--gpus-per-node", 4, "--redundant", 8,
            "--solver", "round-robin", "--out", out)
    assert r.exit_code == 0, r.output
    plan = json.loads(out.read_text())
    assert plan["topology"]["num_slots"] == 72 and plan["topology"]["num_nodes"] == 2


def test_affinity_json():
    r = run("affinity", "deepseek-v2-lite-esft:summary", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert len(s["per_boundary"]) == 25
    assert s["overall"]["mutual_information_mean"] > 5 * s["overall"]["mutual_information_shuffled_mean"]


def _bad_inputs(tmp_path):
    notnpz = tmp_path / "x.npz"
    notnpz.write_text("hello")
    badplan = tmp_path / "bad.json"
    badplan.write_text("{not json")
    counts = tmp_path / "counts.npz"
    np.savez(counts, logical_count=np.ones((3, 16)))
    zero_counts = tmp_path / "zero.npz"
    np.savez(zero_counts, logical_count=np.zeros((3, 16)))
    no_routes = tmp_path / "none.npz"
    import traces

    traces.save(traces.RoutingTrace(expert_ids=-np.ones((6, 3, 2), dtype=np.int32), num_experts=16), no_routes)
    bool_config = tmp_path / "config.json"
    bool_config.write_text(json.dumps({"hidden_size": True, "moe_intermediate_size": 1408}))
    return [
        ("plan", "missing.npz", "--gpus", 4),
        ("plan", notnpz, "--gpus", 4),
        ("plan", "--gpus", 7),
        ("plan", "--gpus", 4, "--gpus-per-node", 3),
        ("plan", "--gpus", 4, "--solver", "nope"),
        ("plan", "--gpus", 4, "--redundant", -4),
        ("plan", counts, "--gpus", 4, "--holdout", 0.5),
        ("evaluate", badplan, "--trace", "deepseek-v2-lite-esft:law"),
        ("evaluate", "missing.json"),
        ("export", badplan, "--format", "sglang", "--out", tmp_path / "o.json"),
        ("affinity", counts),
        ("plan", "--gpus", 4, "--gpu-flops", "fast"),
        ("plan", "--gpus", 4, "--intra-node-bandwidth", "-5GB"),
        ("plan", "--gpus", 4, "--model", "gpt-5"),
        ("plan", "--gpus", 4, "--model-config", tmp_path / "nope.json"),
        ("plan", "--gpus", 4, "--solver", "eplb", "--affinity-weight", 1),
        ("plan", "--gpus", 4, "--affinity-weight", -1),
        ("plan", "--gpus", 4, "--param", "afinity_weight=1"),
        ("plan", "--gpus", 4, "--solver", "eplb", "--resamples", 2),
        ("plan", counts, "--gpus", 4, "--resamples", 2),
        ("plan", "--gpus", 4, "--resamples", 0),
        ("plan", "--gpus", 4, "--model-config", bool_config),
        ("plan", "deepseek-v2-lite-esft:law,law", "--gpus", 4),
        ("plan", zero_counts, "--gpus", 4, "--solver", "eplb"),
        ("plan", no_routes, "--gpus", 4, "--solver", "eplb"),
    ]


def test_bad_input_is_one_sentence_exit_2(tmp_path):
    for args in _bad_inputs(tmp_path):
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert "Traceback" not in r.output, args
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.exception)


def test_mismatched_plan_is_refused(contiguous_plan, tmp_path):
    counts = tmp_path / "counts.npz"
    np.savez(counts, logical_count=np.ones((3, 16)))
    r = run("evaluate", contiguous_plan, "--trace", counts)
    assert r.exit_code == 2 and "26 MoE layers x 64 experts" in r.output


def test_help_does_not_import_torch():
    code = "import sys; sys.argv=['moeplace','--help']\nfrom placement.cli import main\ntry:\n main()\nexcept SystemExit:\n pass\nprint('TORCH', 'torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "TORCH False" in res.stdout, res.stdout + res.stderr


def _est(plan_path, *args):
    r = run("evaluate", plan_path, "--trace", "deepseek-v2-lite-esft:law", "--json", *args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_cost_options_reach_planner_and_evaluator(tmp_path):
    """The planner optimises and the evaluator measures the same cost model: a preset given to the solver
    (``--param model=``), a config.json or explicit options; ``evaluate`` defaults to what the plan was made for."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 4096, "moe_intermediate_size": 1024, "n_routed_experts": 64}))
    cases = [(("--param", "model=deepseek-v3"), {"hidden_size": 7168, "expert_intermediate_size": 2048}),
             (("--model-config", cfg, "--gpu-flops", "200T"),
              {"hidden_size": 4096, "expert_intermediate_size": 1024, "gpu_flops": 2e14})]
    for args, want in cases:
        out = tmp_path / "p.json"
        r = run("plan", "deepseek-v2-lite-esft:law", "--gpus", 4, "--solver", "eplb", "--out", out, *args)
        assert r.exit_code == 0, r.output
        plan = json.loads(out.read_text())
        params = plan["solver"]["options"]["params"]
        assert {k: params[k] for k in want} == want and "model" not in params
        ev = _est(out)
        assert ev["cost_model"]["hidden_size"] == want["hidden_size"]
        assert ev["overall"]["est_moe_us_per_token"] == pytest.approx(plan["predicted"]["est_moe_us_per_token"])
        # explicit options still win over what the plan recorded
        assert _est(out, "--model", "deepseek-v2-lite")["cost_model"]["hidden_size"] == 2048


def test_link_bandwidths_are_recorded_and_priced(tmp_path):
    """Bandwidth options land in the plan's topology and the estimate; only the all-to-all part scales with them."""
    out = tmp_path / "pcie.json"
    r = run("plan", "deepseek-v2-lite-esft:law", "--gpus", 8, "--gpus-per-node", 4, "--solver", "contiguous",
            "--intra-node-bandwidth", "50GB", "--inter-node-bandwidth", "25GB", "--out", out)
    assert r.exit_code == 0, r.output
    topo = json.loads(out.read_text())["topology"]
    assert (topo["intra_node_bandwidth"], topo["inter_node_bandwidth"]) == (50e9, 25e9)
    bad = run("evaluate", out, "--inter-node-bandwidth", "fast")
    assert bad.exit_code == 2 and "is not a size" in bad.output
    slow = _est(out)["per_layer"]
    fast = _est(out, "--intra-node-bandwidth", "500GB", "--inter-node-bandwidth", "250GB")["per_layer"]
    compute = _est(out, "--intra-node-bandwidth", "1e30", "--inter-node-bandwidth", "1e30")["per_layer"]
    for s_, f_, c_ in zip(slow, fast, compute):
        # layer time = max_g (compute_g + a x traffic_g) with a = 1 / bandwidth: increasing and convex in a, so
        # 10x faster links cut the excess over compute alone by at least 10x
        s_, f_, c_ = (x["est_moe_seconds"] for x in (s_, f_, c_))
        assert c_ < f_ < s_
        assert f_ - c_ <= (s_ - c_) / 10 * (1 + 1e-9)


def test_evaluate_notes_plans_made_for_different_cost_models(tmp_path):
    paths = []
    for flow in ("standard", "coherent"):
        paths.append(tmp_path / f"{flow}.json")
        r = run("plan", "deepseek-v2-lite-esft:law", "--gpus", 4, "--solver", "eplb", "--dataflow", flow,
                "--out", paths[-1])
        assert r.exit_code == 0, r.output
    r = run("evaluate", *paths, "--trace", "deepseek-v2-lite-esft:law")
    assert r.exit_code == 0 and "different dataflow" in r.output
    assert _est(paths[1])["overall"]["dataflow"] == "coherent"


def test_progress_goes_to_stderr_as_lines_when_not_a_terminal(tmp_path, capsys):
    """In a log (no terminal) long work reports progress as lines on stderr, throttled; stdout stays clean."""
    from placement.cli_common import progress

    with progress("working ...", every=0.0) as p:
        p.update("step 1")
        p.update("step 2")
    with progress("quiet ...", every=1e9) as p:
        p.update("never shown")
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.splitlines()
    assert lines[0] == "working ..." and "step 1" in lines[1] and "step 2" in lines[2]
    assert lines[3] == "quiet ..." and len(lines) == 4
    r = runner.invoke(app, ["plan", "--gpus", "4", "--time-limit", "2", "--out", str(tmp_path / "p.json"), "--json"])
    assert r.exit_code == 0, r.output
    assert "planning with joint on 4 GPUs" in r.stderr
    json.loads(r.stdout)  # the JSON on stdout is not mixed with progress


def test_joint_plans_on_bootstrap_resamples_by_default(contiguous_plan, tmp_path):
    """The joint planner fits the expected time over 8 bootstrap resamples of the fitted sequences unless told
    otherwise; the plan records how many, and other solvers fit the trace as one sample."""
    sizes = {}
    for groups in (None, 1):
        out = tmp_path / f"joint-{groups}.json"
        extra = [] if groups is None else ["--resamples", groups]
        r = run("plan", "deepseek-v2-lite-esft:law", "--gpus", 4, "--time-limit", 2, "--holdout", 0.5, "--out", out,
                *extra)
        assert r.exit_code == 0, r.output
        plan = json.loads(out.read_text())
        sizes[groups] = (plan["solver"]["options"]["resamples"], plan["solver"]["stats"]["profiles"])
    assert sizes == {None: (8, 8), 1: (1, 1)}
    assert json.loads(contiguous_plan.read_text())["solver"]["options"]["resamples"] == 1
