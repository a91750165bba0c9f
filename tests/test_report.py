"""Reports, plots and the demo: real trace, held-out evaluation, files a user can open."""

from __future__ import annotations

import json
from pathlib import Path

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
    # one plan per solver, unless the solver said why it could not plan this request or gave the plan of another
    assert {p.stem[len("plan-"):] for p in plans} | set(report["skipped"]) | set(report["same_plan_as"]) == \
        set(comparable_solvers())
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
    gpus = 8  # the demo's default, with one redundant slot per GPU
    assert rows.shape == (trace.decoder_layers, trace.num_experts + gpus)
    # every row holds every expert, plus one replica per redundant slot
    assert all(set(r) == set(range(trace.num_experts)) for r in rows)


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


# the demo's comparison: distinct plans, redundant slots, a recommendation with its reason, files that exist ----
def test_demo_shows_each_distinct_plan_once_with_redundant_slots(demo_dir):
    """EPLB's global and hierarchical policies give EPLB's plan on one node: shown once, named as the same; every
    plan has one redundant slot per GPU (the demo's default, what EPLB deployments run)."""
    from placement.problem import build_problem
    from solvers import Options, solve

    report = json.loads((demo_dir / "report.json").read_text())
    plans = {p.stem[len("plan-"):]: Plan.load(p) for p in demo_dir.glob("plan-*.json")}
    assert all(p.num_redundant == p.topology.num_gpus == 8 for p in plans.values())
    names = list(plans)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.array_equal(plans[a].phy2log, plans[b].phy2log), (a, b)
    same = report["same_plan_as"]
    assert set(same) == {"eplb-global", "eplb-hierarchical"} and set(same.values()) == {"eplb"}
    fit = datasets.load().split_by_sequence(0.5, seed=0)[0]  # the duplicates really plan what eplb planned
    problem = build_problem(fit, plans["eplb"].topology)
    for dup, twin in same.items():
        assert np.array_equal(solve(dup, problem, Options()).phy2log, plans[twin].phy2log)
    md = (demo_dir / "report.md").read_text()
    assert "eplb-global gave the same plan as eplb" in md and "| eplb-global |" not in md


def test_demo_recommends_the_lowest_estimated_time_and_says_why(demo_dir):
    report = json.loads((demo_dir / "report.json").read_text())
    times = {n: v["overall"]["est_moe_us_per_token"] for n, v in report["plans"].items()}
    rec = report["recommendation"]
    ranked = sorted(times, key=times.get)
    assert rec["best"] == ranked[0] and rec["runner_up"] == ranked[1]
    assert rec["margin"] == pytest.approx((times[ranked[1]] - times[ranked[0]]) / times[ranked[1]])
    assert rec["resamples"] >= 100 and 0 <= rec["wins"] <= rec["resamples"]
    assert rec["clear"] == (rec["wins"] >= 0.95 * rec["resamples"] and rec["margin"] > 0)
    md = (demo_dir / "report.md").read_text()
    assert f"**Recommended: {rec['best']}**" in md and "resamples of the held-out sequences" in md
    assert f"below the next best, {ranked[1]}" in md
    # the exports are of the recommended plan
    sg = json.loads(next(demo_dir.glob("sglang-*.json")).read_text())["physical_to_logical_map"]
    best = Plan.load(demo_dir / f"plan-{rec['best']}.json")
    assert np.array_equal(np.array(sg)[best.moe_layer_index], best.phy2log)


def test_demo_report_names_files_that_exist_and_commands_that_parse(demo_dir):
    """Every file the report names is in the folder; every launch command is valid shell whose paths exist and
    whose vLLM plugin variable names the recommended plan file."""
    import re
    import shlex

    report = json.loads((demo_dir / "report.json").read_text())
    best = report["recommendation"]["best"]
    md = (demo_dir / "report.md").read_text()
    files = md.split("## Files", 1)[1].split("\n## ", 1)[0]
    spans = re.findall(r"`([^`]+)`", files)
    named = [s for s in spans if " " not in s and re.search(r"\.(json|yaml|npz|md|html)$", s)]
    assert named and all((demo_dir / n).is_file() for n in named), [n for n in named if not (demo_dir / n).is_file()]
    assert any(n.endswith(".expert_maps.json") for n in named)  # the vLLM companion is written and named
    commands = [s for s in spans if " " in s]
    assert len(commands) >= 4
    for cmd in commands:
        words = shlex.split(cmd)  # valid shell: quotes balanced
        for w in words:
            paths = [w.split("=", 1)[1] if w.startswith("MOEPLACE_PLAN=") else w]
            if w.startswith("{"):  # a JSON option (--eplb-config, --additional-config): the paths inside
                paths = re.findall(r'"([^"]+)"', w)
            for path in paths:
                if str(demo_dir) in path:
                    assert Path(path).exists(), (cmd, path)
    plugin = [w for c in commands for w in shlex.split(c) if w.startswith("MOEPLACE_PLAN=")]
    assert plugin == [f"MOEPLACE_PLAN={demo_dir / f'plan-{best}.json'}"]


def test_report_command_recommends_from_the_evaluation_data(tmp_path):
    """The report recommends the plan with the lowest estimated time on the data it evaluates (not a fixed
    solver): here EPLB against contiguous and round-robin, and says whether the margin beats the resampling
    spread."""
    paths = []
    for solver in ("round-robin", "eplb"):
        paths.append(tmp_path / f"{solver}.json")
        r = runner.invoke(app, ["plan", "deepseek-v2-lite-esft:law", "--gpus", "8", "--solver", solver, "--holdout",
                                "0.5", "--out", str(paths[-1])])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["report", *map(str, paths), "--trace", "deepseek-v2-lite-esft:law", "--holdout", "0.5",
                            "--no-plots", "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    times = {n: v["overall"]["est_moe_us_per_token"] for n, v in report["plans"].items()}
    rec = report["recommendation"]
    assert rec["best"] == min(times, key=times.get) == "eplb"
    said = " ".join(r.output.split())
    assert "recommended: eplb" in said and f"faster in {'' if rec['clear'] else 'only '}{rec['wins']} of 200" in said
    assert ("larger than the spread" in said) == rec["clear"]
    assert "**Recommended: eplb**" in (tmp_path / "rep" / "report.md").read_text()


def test_resampled_times_equal_the_evaluator_on_resampled_traces():
    """The fast bootstrap (per-sequence parts, weighted sums) gives exactly what evaluate() gives on a trace built
    by repeating the drawn sequences; two identical plans tie, a balanced plan beats contiguous clearly."""
    from placement.evaluate import evaluate, prepare
    from placement.recommend import recommend, resampled_times, sequence_units
    from solvers.cost import CostModel
    from traces import RoutingTrace

    trace = datasets.load("deepseek-v2-lite-esft:intent")
    plan = _fixed_plan("round-robin", trace)
    ev = prepare(trace)
    units = sequence_units(ev, plan.num_layers, 8)
    assert len(units) == trace.num_sequences
    rng = np.random.default_rng(5)
    weights = np.bincount(rng.integers(0, len(units), len(units)), minlength=len(units))
    fast = resampled_times(plan, ev, CostModel(), weights[None, :], units)[0]
    parts = []
    for u, w in zip(units, weights):
        for copy in range(w):  # a drawn sequence, once per draw, as its own sequence
            part = trace.take(u)
            parts.append(RoutingTrace(expert_ids=part.expert_ids, num_experts=part.num_experts,
                                      seq_id=np.full(part.num_tokens, len(parts)), moe_layer_index=part.moe_layer_index,
                                      num_hidden_layers=part.num_hidden_layers))
    naive_trace = RoutingTrace.concat(parts, renumber_sequences=False)
    # evaluate() sends a token home to GPU (sequence index mod G); keep each copy's original home
    home = np.concatenate([np.full(len(u), ev.sequence_index[u][0]) for u, w in zip(units, weights) for _ in range(w)])
    naive_ev = prepare(naive_trace)
    naive_ev.sequence_index = home
    assert fast == pytest.approx(evaluate(plan, naive_ev)["overall"]["est_moe_us_per_token"], rel=1e-12)
    # the same under DeepEP's normal kernels on two nodes (messages per link class, not copies per GPU)
    from dataclasses import replace

    two_nodes = replace(plan, topology=plan.topology.__class__(num_gpus=8, slots_per_gpu=plan.topology.slots_per_gpu,
                                                                gpus_per_node=4))
    deepep = CostModel(comm="deepep-normal")
    fast = resampled_times(two_nodes, ev, deepep, weights[None, :], units)[0]
    assert fast == pytest.approx(evaluate(two_nodes, naive_ev, deepep)["overall"]["est_moe_us_per_token"], rel=1e-12)
    twin = Plan(plan.phy2log.copy(), plan.num_experts, plan.topology, plan.moe_layer_index, plan.num_hidden_layers,
                solver={"name": "twin"})
    overall = {"a": evaluate(plan, ev)["overall"], "b": evaluate(twin, ev)["overall"]}
    tie = recommend({"a": plan, "b": twin}, ev, overall)
    assert tie["margin"] == 0 and tie["wins"] == 0 and not tie["clear"] and "ties with" in tie["sentence"]
    cont = _fixed_plan("contiguous", trace)
    overall["contiguous"] = evaluate(cont, ev)["overall"]
    clear = recommend({"contiguous": cont, "a": plan}, ev, overall)
    assert clear["best"] == min(("contiguous", "a"), key=lambda n: overall[n]["est_moe_us_per_token"])


def test_one_colour_per_plan_in_every_plot_and_no_overlapping_labels():
    """The balance-vs-affinity scatter used to colour points by position; plans close together had labels on top
    of each other. Each plan now has its solver's colour in every figure, named in a legend beside the axes."""
    import itertools

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_hex
    from matplotlib.text import Text

    from placement import plots as P

    names = ["contiguous", "eplb", "exflow", "joint", "moetuner", "round-robin"]
    rng = np.random.default_rng(0)
    # crowded points, two of them at the same place
    overall = {n: {"load_imbalance": 1.05 + 0.001 * i, "cross_gpu_fraction": 0.80 + 0.001 * (i % 2)}
               for i, n in enumerate(names)}
    overall["moetuner"] = dict(overall["eplb"])
    per_layer = {n: [{"moe_layer": l + 1, "load_imbalance": float(1 + rng.random())} for l in range(26)] for n in names}
    line_fig = P.per_layer_plot(per_layer, "load_imbalance", "imbalance", "t")
    line_colour = {ln.get_label(): to_hex(ln.get_color()) for ln in line_fig.axes[0].get_lines() if ln.get_label() in names}
    scatter_fig = P.tradeoff_plot(overall)
    point_colour = {}
    for coll in scatter_fig.axes[0].collections:
        label = coll.get_label().replace(" (same point)", "")
        colours = coll.get_facecolor() if len(coll.get_facecolor()) else coll.get_edgecolor()
        point_colour[label] = to_hex(colours[0])
    assert line_colour == point_colour == P.plan_colors(names) and len(set(line_colour.values())) == len(names)
    assert P.plan_colors(["joint", "joint #2"])["joint #2"] != P.SOLVER_COLORS["joint"]  # unique within a figure
    for fig in (line_fig, scatter_fig):
        FigureCanvasAgg(fig)
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        texts = [(t.get_text(), t.get_window_extent(r)) for t in fig.findobj(Text)
                 if t.get_visible() and t.get_text().strip() and t not in fig.axes[0].get_xticklabels()
                 and t not in fig.axes[0].get_yticklabels()]
        clashes = [(a[0], b[0]) for a, b in itertools.combinations(texts, 2) if a[1].overlaps(b[1])]
        assert not clashes, clashes


def test_demo_report_shows_the_online_replay_that_its_command_reproduces(demo_dir):
    """The demo's report has the online-rebalancing section (table and plot), and the `moeplace replay` command it
    prints gives the same numbers when run."""
    import shlex

    md = (demo_dir / "report.md").read_text()
    assert "## Online rebalancing" in md and "plots/online_replay.png" in md
    assert _png_ok(demo_dir / "plots" / "online_replay.png")
    online = json.loads((demo_dir / "report.json").read_text())["online"]
    assert set(online) == {"eplb", "static", "moeplace"}
    assert online["static"]["moved_copies"] == 0 and online["eplb"]["moved_copies"] > online["moeplace"]["moved_copies"]
    cmd = next(line for line in md.splitlines() if line.startswith("moeplace replay "))
    res = runner.invoke(app, [*shlex.split(cmd)[1:], "--json", "--workers", "1"])
    assert res.exit_code == 0, res.output
    again = json.loads(res.output[res.output.index("{"):])["policies"]
    for name, o in online.items():
        for key in ("load_imbalance", "moved_copies", "migration_seconds", "est_total_seconds"):
            assert again[name]["overall"][key] == pytest.approx(o[key], rel=1e-9), (name, key)
