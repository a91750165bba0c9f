"""Reports, plots and the demo: real trace, held-out evaluation, files a user can open."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from placement.cli import app
from placement.evaluate import evaluate
from placement.plan import Plan, validate_plan_dict
from traces import datasets

pytest.importorskip("matplotlib")

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_ok(path) -> bool:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC):
        return False
    img = mpimg.imread(path)
    # a real picture: not one flat colour
    return img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and float(img[..., :3].std()) > 0.01


def _has_budget_sweep() -> bool:
    import importlib

    try:
        return hasattr(importlib.import_module("placement.budget"), "sweep")
    except ImportError:
        return False


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """'moeplace demo' as a user runs it (every solver), with a 2-second limit per solver to keep the test short."""
    out = tmp_path_factory.mktemp("demo")
    res = runner.invoke(app, ["demo", "--out", str(out), "--time-limit", "2"])
    assert res.exit_code == 0, res.output
    return out


def test_demo_writes_plans_report_and_pngs(demo_dir):
    from placement.report import comparable_solvers

    plans = sorted(demo_dir.glob("plan-*.json"))
    report = json.loads((demo_dir / "report.json").read_text())
    # one plan per solver, unless the solver said why it could not plan this request
    assert {p.stem[len("plan-"):] for p in plans} | set(report["skipped"]) == set(comparable_solvers())
    md = (demo_dir / "report.md").read_text()
    html = (demo_dir / "report.html").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| metric |"))
    for p in plans:
        d = json.loads(p.read_text())
        assert validate_plan_dict(d, str(p), require=True)
        name = d["solver"]["name"]
        assert f"| {name} |" in header + " |" or f"| {name} |" in header
        assert name in report["plans"]
    pngs = sorted((demo_dir / "plots").glob("*.png"))
    stems = {p.stem for p in pngs}
    assert {"load_imbalance", "cross_gpu", "affinity_heatmaps", "mutual_information"} <= stems
    assert all(_png_ok(p) for p in pngs)
    for p in pngs:  # every plot is linked from the Markdown and embedded in the HTML
        assert f"(plots/{p.name})" in md
    assert html.count("data:image/png;base64,") == len(pngs)
    if _has_budget_sweep():  # the memory-budget curve is part of the demo once the budget planner is installed
        assert "memory_budget" in stems
        rows = report["memory_curve"]
        assert rows and all(0.0 <= r["hit_rate"] <= 1.0 for r in rows)
        assert {r["budget"] for r in rows} == {"10%", "25%", "50%"}
    sg = next(demo_dir.glob("sglang-*.json"))
    rows = np.array(json.loads(sg.read_text())["physical_to_logical_map"])
    trace = datasets.load()
    assert rows.shape == (trace.decoder_layers, trace.num_experts)
    assert (np.sort(rows, axis=1) == np.arange(trace.num_experts)).all()  # each row a permutation of the experts


def test_demo_metrics_are_out_of_sample(demo_dir):
    """The report's numbers are those of the plan on the held-out half, which the fit never saw."""
    trace = datasets.load()
    fit, held = trace.split_by_sequence(0.5, seed=0)
    assert not set(np.unique(fit.seq_id)) & set(np.unique(held.seq_id))
    report = json.loads((demo_dir / "report.json").read_text())
    for path in demo_dir.glob("plan-*.json"):
        plan = Plan.load(path)
        assert plan.provenance["tokens"] == fit.num_tokens
        assert plan.provenance["tokens"] + plan.heldout["tokens"] == trace.num_tokens
        fresh = evaluate(plan, held)["overall"]
        rep = report["plans"][plan.name]["overall"]
        for key in ("load_imbalance", "cross_gpu_fraction", "est_moe_us_per_token"):
            assert rep[key] == pytest.approx(fresh[key]) == pytest.approx(plan.heldout[key])


def test_report_command_on_user_plans(tmp_path):
    plan_path = tmp_path / "rr.json"
    res = runner.invoke(app, ["plan", "--gpus", "8", "--solver", "round-robin", "--holdout", "0.5", "--out",
                              str(plan_path)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "rep"
    res = runner.invoke(app, ["report", str(plan_path), "--holdout", "0.5", "--seed", "0", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    # the contiguous reference is added, and the held-out numbers match what 'plan --holdout' recorded
    assert set(info["overall"]) == {"contiguous", "round-robin"}
    recorded = Plan.load(plan_path).heldout
    assert info["overall"]["round-robin"]["load_imbalance"] == pytest.approx(recorded["load_imbalance"])
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    assert all(_png_ok(tmp_path / "rep" / "plots" / f"{s}.png") for s in ("load_imbalance", "affinity_heatmaps"))
    # slower links: the same plans take longer, and the report says which links it assumed and how to redo it
    slow = tmp_path / "slow"
    res = runner.invoke(app, ["report", str(plan_path), "--holdout", "0.5", "--out", str(slow), "--no-plots", "--json",
                              "--intra-node-bandwidth", "50GB"])
    assert res.exit_code == 0, res.output
    slow_info = json.loads(res.stdout)
    for name in ("contiguous", "round-robin"):
        assert slow_info["overall"][name]["est_moe_seconds"] > info["overall"][name]["est_moe_seconds"]
    text = (slow / "report.md").read_text()
    assert "links 50 GB/s inside a node" in text and "--intra-node-bandwidth 50GB" in text
    # sizes from the model's config.json, as plan and evaluate take them
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 7168, "moe_intermediate_size": 2048}))
    res = runner.invoke(app, ["report", str(plan_path), "--holdout", "0.5", "--out", str(tmp_path / "v3"),
                              "--no-plots", "--model-config", str(cfg)])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "v3" / "report.md").read_text()
    assert "hidden size 7168" in text and "expert intermediate size 2048" in text and "--model-config" in text


def _fixed_plan(name: str, trace, gpus: int = 8, layers: int | None = None) -> Plan:
    """A rule-based plan (contiguous, round-robin) for the trace's layout, without building a full problem."""
    from solvers import Problem, Topology, solve

    L = layers or trace.num_layers
    topo = Topology.for_experts(trace.num_experts, gpus)
    res = solve(name, Problem(load=trace.load_profile().total()[:L], topology=topo))
    return Plan.from_result(res, trace.num_experts, topo, trace.moe_layer_index[:L], trace.decoder_layers)


def test_report_rejects_plan_for_another_model(tmp_path):
    plan_path = tmp_path / "p.json"
    _fixed_plan("contiguous", datasets.load(), 4, layers=25).save(plan_path)  # one MoE layer short
    res = runner.invoke(app, ["report", str(plan_path), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "Traceback" not in res.output and "25 MoE layers" in res.output


def test_report_counts_only_data(tmp_path):
    """Counts carry no transitions: the report still compares balance and says nothing about affinity."""
    from placement.report import build_report

    trace = datasets.load()
    prof = trace.load_profile()
    plans = [_fixed_plan(s, trace) for s in ("contiguous", "round-robin")]
    rep = build_report(plans, prof, tmp_path / "r")
    stems = {p.stem for p in rep["plots"]}
    assert "load_imbalance" in stems and "cross_gpu" not in stems and "affinity_heatmaps" not in stems
    assert rep["results"]["round-robin"]["overall"]["cross_gpu_fraction"] is None


def test_affinity_plots_option(tmp_path):
    res = runner.invoke(app, ["affinity", "--plots", str(tmp_path / "aff")])
    assert res.exit_code == 0, res.output
    pngs = sorted((tmp_path / "aff").glob("*.png"))
    assert {p.stem for p in pngs} == {"affinity_heatmaps", "mutual_information", "expert_load"}
    assert all(_png_ok(p) for p in pngs)


def test_spectral_order_recovers_planted_blocks():
    """Four planted groups (experts of group i route to successors of group i), shuffled: the order regroups them."""
    from placement.plots import spectral_order

    rng = np.random.default_rng(3)
    E, groups = 32, 4
    label = np.repeat(np.arange(groups), E // groups)
    base = np.where(label[:, None] == label[None, :], 40.0, 1.0)
    counts = rng.poisson(base).astype(float)
    pr, pc = rng.permutation(E), rng.permutation(E)
    shuffled = counts[np.ix_(pr, pc)]
    ro, co = spectral_order(shuffled)
    for order, lab in ((ro, label[pr]), (co, label[pc])):
        seq = lab[order]
        # one vector separates the two outer groups from the inner ones: each group is one contiguous run
        assert (np.diff(seq) != 0).sum() == groups - 1


def test_gpu_order_groups_experts_by_gpu():
    from placement.plots import gpu_order

    rng = np.random.default_rng(0)
    row = rng.permutation(16)
    order, gpu = gpu_order(row, 16, 4)
    assert (gpu[row] == np.arange(16) // 4).all()
    assert (np.diff(gpu[order]) >= 0).all()


def test_html_escapes_and_renders_inline_markup():
    from placement.report import _inline

    assert _inline("a <b> `x<y>` **bold** [docs](concepts.md)") == (
        'a &lt;b&gt; <code>x&lt;y&gt;</code> <strong>bold</strong> <a href="concepts.md">docs</a>')


def test_report_without_matplotlib_says_how_to_get_plots(tmp_path, monkeypatch):
    """A core install (no 'plot' extra) still writes the report, and says how to get the plots."""
    from placement import plots
    from placement.report import build_report

    monkeypatch.setattr(plots, "available", lambda: False)
    trace = datasets.load()
    rep = build_report([_fixed_plan("contiguous", trace), _fixed_plan("round-robin", trace)], trace.load_profile(),
                       tmp_path / "r")
    assert rep["plots"] == [] and not (tmp_path / "r" / "plots").exists()
    assert any("moeplace[plot]" in n for n in rep["notes"])
    assert "moeplace[plot]" in rep["markdown"].read_text()
