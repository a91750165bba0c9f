"""moeplace demo: bundled real trace -> plans with every solver -> held-out evaluation -> report with plots."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Optional

import typer

from placement.cli_common import (RayAddressOption, UserError, WorkersOption, err, executor_for, out, print_json,
                                  user_errors)

DEMO_TIME_LIMIT = 15.0  # seconds per solver; with every solver the demo finishes in about two minutes on 2 cores
DEMO_THREADS = 2


def _progress_fn(progress):
    return progress or (lambda message, advance=0: None)


DEMO_BUDGETS = ("10%", "25%", "50%")  # GPU memory per GPU, as shares of all routed experts
DEMO_BUDGET_POLICIES = ("ours", "top-frequency", "lru-only")


def memory_curve(fit, held, gpus: int, time_limit: float, seed: int = 0, progress=None) -> dict | None:
    """The memory-budget curve for the report, when this install has the memory-budget planner; else None.

    Feature-detected: ``placement.budget.sweep`` (the sweep behind ``moeplace budget``) plans at each budget of
    :data:`DEMO_BUDGETS` on ``fit`` and replays the miss policies on ``held``. Returns the report's
    ``memory_curve`` dict (rows, axes, a table).
    """
    import inspect

    try:
        budget = importlib.import_module("placement.budget")
        mem = importlib.import_module("placement.memory_eval")
    except ImportError:
        return None
    sweep = getattr(budget, "sweep", None)
    if sweep is None or not hasattr(mem, "default_expert_bytes"):
        return None
    expert_bytes = mem.default_expert_bytes()
    wanted = {"time_limit": time_limit, "seed": seed, "search_tokens": 2048, "policies": DEMO_BUDGET_POLICIES,
              "progress": progress}
    accepted = inspect.signature(sweep).parameters
    rows = sweep(fit, held, gpus, list(DEMO_BUDGETS), expert_bytes,
                 **{k: v for k, v in wanted.items() if k in accepted})
    try:
        labels = importlib.import_module("placement.commands.budget").LABELS
    except (ImportError, AttributeError):
        labels = {}
    for r in rows:
        r["share_pct"] = 100.0 * r["share"]
        r["fetch_mb_per_token"] = r["fetch_bytes_per_token"] / 1e6
        r["policy_label"] = labels.get(r["policy"], r["policy"])
    header = ["budget (share of experts)", "slots per GPU", "policy", "hit rate", "host->GPU MB/token",
              "est. stall ms/token"]
    table = [[r["budget"], str(r["slots_per_gpu"]), r["policy_label"], f"{r['hit_rate']:.4f}",
              f"{r['fetch_mb_per_token']:.2f}", f"{r['est_fetch_ms_per_token']:.3f}"] for r in rows]
    return {"rows": rows, "x": "share_pct", "x_label": "GPU memory budget (% of all routed experts)",
            "series": [("hit_rate", "hit rate in GPU memory (higher is better)"),
                       ("fetch_mb_per_token", "host->GPU MB per token"),
                       ("est_fetch_ms_per_token", "est. PCIe stall (ms per token)")],
            "group": "policy_label", "table": (header, table),
            "note": (f"Memory budget: with only part of the experts in GPU memory, the rest are fetched from host "
                     f"memory on a miss. Fitted on the fit sequences, replayed token by token on the held-out ones "
                     f"({gpus} GPUs, expert {expert_bytes / 1e6:.1f} MB, PCIe "
                     f"{getattr(mem, 'PCIE_BANDWIDTH', 50e9) / 1e9:.0f} GB/s). More budgets and policies: "
                     f"`moeplace budget --gpus {gpus} --budgets 10%,25%,50%,75%`.")}


DEMO_MODEL = "deepseek-ai/DeepSeek-V2-Lite"  # the model id in the demo's launch commands (the trace's layout)


ONLINE = {"scenario": "esft-drift:phases", "window": 2000, "interval": 2000, "scale": 256.0, "max_moves": 200}


def online_replay(gpus: int, gpus_per_node: int | None, redundant: int, executor=None, progress=None) -> dict | None:
    """EPLB re-fitted per window, the first map kept, and moeplace's online policy replayed on the bundled drift
    scenario (:data:`ONLINE`, as docs/benchmarks.md's table), on the demo's GPUs; None when it cannot run there."""
    from placement.replay import PolicySpec, ReplayError, ReplaySetup, replay
    from solvers import Topology
    from solvers.cost import CostModel
    from traces import drift

    data = drift.scenario(ONLINE["scenario"])
    topo = Topology.for_experts(data.num_experts, gpus, redundant, gpus_per_node)
    setup = ReplaySetup(topo, ONLINE["window"], ONLINE["interval"], cost=CostModel(), scale=ONLINE["scale"])
    policies = {"eplb": PolicySpec("eplb"), "static": PolicySpec("static"),
                "moeplace": PolicySpec("moeplace", {"max_moves": ONLINE["max_moves"]})}
    try:
        result = replay(data, policies, setup, progress=progress, executor=executor)
    except (ReplayError, ValueError):
        return None
    result["command"] = (f"moeplace replay {ONLINE['scenario']} --gpus {gpus}"
                         + (f" --gpus-per-node {gpus_per_node}" if gpus_per_node else "")
                         + f" --redundant {redundant} --window {ONLINE['window']} --interval {ONLINE['interval']} "
                         f"--scale {ONLINE['scale']:g} --policy eplb --policy static --policy moeplace "
                         f"--max-moves {ONLINE['max_moves']}")
    return result


def distinct_plans(plans: dict) -> tuple[dict, dict[str, str]]:
    """Plans with identical placements shown once: ``({name: plan} of the first of each distinct placement,
    {name of a duplicate: name of the plan it equals})`` (on one node EPLB's global and hierarchical policies give
    the same plan as its default)."""
    import numpy as np

    kept: dict = {}
    same: dict[str, str] = {}
    for name, plan in plans.items():
        twin = next((k for k, p in kept.items() if p.topology == plan.topology
                     and np.array_equal(p.phy2log, plan.phy2log)), None)
        if twin is None:
            kept[name] = plan
        else:
            same[name] = twin
    return kept, same


def demo_redundant(gpus: int, redundant: int | None) -> int:
    """Redundant slots of the demo: ``redundant``, else one per GPU (what EPLB deployments run)."""
    return gpus if redundant is None else redundant


def run_demo(out_dir: Path, gpus: int = 8, gpus_per_node: int | None = None, time_limit: float = DEMO_TIME_LIMIT,
             seed: int = 0, solvers: list[str] | None = None, plots: bool | None = None,
             progress: Callable[..., None] | None = None, redundant: int | None = None, executor=None) -> dict:
    """Fit every solver on half the bundled sequences, evaluate on the other half; write plans, exports, report.

    ``redundant``: redundant slots in total (default: one per GPU). Plans with identical placements are shown once
    (:func:`distinct_plans`). The recommended plan is the lowest estimated MoE time on the held-out sequences
    (:func:`placement.recommend.recommend`); it is exported for every serving stack. The output folder is written
    as a whole when everything is computed (:func:`traces.outputs.output_folder`).
    ``progress(message, advance)`` is called with a description and the number of finished steps (see
    :func:`demo_steps`). ``executor`` (:mod:`placement.executor`): where the joint planner's per-layer steps and
    the held-out evaluation run (None: here).
    """
    import shlex

    from placement.affinity import AffinityStats
    from placement.cli_common import check_redundant
    from placement.export import ExportError, exporters, render
    from placement.plan import Plan, provenance_of
    from placement.problem import build_problem
    from placement.recommend import recommend
    from placement.report import build_report, comparable_solvers, describe_cost, describe_data, describe_topology
    from solvers import Options, SolverInputError, Topology, names, solve
    from traces import atomic_write_bytes, datasets
    from traces.outputs import output_folder

    say = _progress_fn(progress)
    available = names()
    chosen = list(solvers or comparable_solvers())
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise UserError(f"unknown solver {unknown[0]!r}; choose from {', '.join(available)}")
    say("loading the bundled trace ...")
    trace = datasets.load()
    R = demo_redundant(gpus, redundant)
    check_redundant(R, trace.num_experts, gpus)
    if (trace.num_experts + R) % gpus:
        fit_r = (-trace.num_experts) % gpus or gpus
        raise UserError(f"the demo trace's {trace.num_experts} experts + {R} redundant slots cannot be split evenly "
                        f"over {gpus} GPUs; choose --redundant so that {trace.num_experts} + redundant is a multiple "
                        f"of {gpus}, e.g. --redundant {fit_r}")
    fit, held = trace.split_by_sequence(0.5, seed=seed)
    topo = Topology.for_experts(trace.num_experts, gpus, R, gpus_per_node)
    stats_fit = AffinityStats.from_trace(fit, seed=seed)
    problem = build_problem(fit, topo, stats=stats_fit)
    say("affinity model fitted", 1)
    solved: dict[str, Plan] = {}
    skipped: dict[str, str] = {}
    for name in chosen:
        say(f"planning with {name} (limit {time_limit:g}s) ...")
        try:
            res = solve(name, problem, Options(time_limit=time_limit, seed=seed, threads=DEMO_THREADS,
                                                progress=lambda m, n=name: say(f"{n}: {m}"), executor=executor))
        except SolverInputError as exc:
            skipped[name] = str(exc)
            say(f"{name}: skipped", 1)
            continue
        plan = Plan.from_result(res, trace.num_experts, topo, trace.moe_layer_index, trace.decoder_layers, trace.model,
                                options={"time_limit": time_limit, "seed": seed, "threads": DEMO_THREADS,
                                         "redundant": R},
                                provenance=provenance_of([datasets.DEFAULT], fit.num_tokens, fit.num_sequences,
                                                         {"holdout": 0.5, "split_seed": seed}))
        solved[name] = plan
        say(f"{name}: {res.status} in {res.seconds:.1f}s", 1)
    solved = {n: solved[n] for n in sorted(solved, key=lambda n: n != "contiguous")}  # the baseline first
    if not solved:
        raise UserError("no solver could plan the demo request: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    plans, same = distinct_plans(solved)

    say("memory-budget sweep ...")
    curve = memory_curve(fit, held, gpus, time_limit, seed, progress=lambda m: say(f"memory budget: {m}"))
    say("memory-budget sweep done" if curve else "no memory-budget planner in this install", 1)

    online = online_replay(gpus, gpus_per_node, R, executor, progress=lambda m: say(f"online replay: {m}"))
    say("online rebalancing replayed" if online else "online replay skipped (this topology)", 1)

    say("evaluating on held-out sequences ...")
    from placement.evaluate import evaluate, prepare

    ev_fit, ev_held = prepare(fit), prepare(held)
    for name, plan in plans.items():
        plan.predicted = evaluate(plan, ev_fit, None, executor)["overall"]
        plan.heldout = evaluate(plan, ev_held, None, executor)["overall"]
    rec = recommend(plans, ev_held, {n: p.heldout for n, p in plans.items()}, seed=seed, what="held-out")
    best = rec["best"] if rec else next(iter(plans))

    say("writing plans, exports and the report ...")
    cmd = f"moeplace demo --out {shlex.quote(str(out_dir))} --gpus {gpus}" + (
        f" --gpus-per-node {gpus_per_node}" if gpus_per_node else "")
    cmd += (f" --redundant {R}" if redundant is not None else "") + f" --time-limit {time_limit:g}"
    cmd += (f" --seed {seed}" if seed else "") + ("".join(f" --solver {s}" for s in chosen) if solvers else "")
    setup = [describe_data("bundled trace", trace) + f" ({trace.model}; ESFT tasks intent, law, summary)",
             f"split by sequence (seed {seed}): fitted on {fit.num_tokens:,} tokens in {fit.num_sequences} sequences, "
             f"evaluated on the other {held.num_tokens:,} tokens in {held.num_sequences} sequences",
             describe_topology(plans[next(iter(plans))]),
             f"solvers: {', '.join(solved)}; time limit {time_limit:g}s each, {DEMO_THREADS} threads",
             describe_cost(None)]
    if same:
        setup.append("shown once: " + "; ".join(f"{d} gave the same plan as {k}" for d, k in same.items()))
    exports: dict[str, str] = {}
    with output_folder(out_dir, "moeplace demo") as stage:
        files = []
        for name, plan in plans.items():
            plan.save(stage / f"plan-{name}.json")
            files.append(f"`plan-{name}.json`: plan of {name}" + (f" (also {', '.join(d for d, k in same.items() if k == name)})"
                                                                 if name in same.values() else "")
                         + " (Plan v1; `moeplace evaluate`, `moeplace export` read it)")
        mods = exporters()
        plan_file = out_dir / f"plan-{best}.json"
        for fmt in ["sglang"] + sorted(f for f in mods if f != "sglang"):
            name = f"{fmt}-{best}{getattr(mods[fmt], 'SUFFIX', '.json')}"
            try:
                written, hints = render(mods[fmt], plans[best], out_dir / name, plan_path=plan_file, model=DEMO_MODEL)
            except ExportError as exc:
                files.append(f"no {fmt} export: {exc}")
                continue
            for path, text in written:
                atomic_write_bytes(stage / Path(path).name, lambda f, t=text: f.write(t.encode()))
            exports[fmt] = str(out_dir / name)
            also = [f"`{Path(p).name}`" for p, _ in written[1:]]
            launch: list[str] = []
            for h in hints:  # commands in code spans, each followed by its notes in parentheses
                if h.startswith("(") and launch:
                    launch[-1] += f" {h}"
                else:
                    launch.append(f"`{h}`")
            files.append(f"`{name}`" + (f" (and {', '.join(also)})" if also else "") + f": plan {best} for {fmt}; "
                         f"start the server with " + "; or ".join(launch))
        rep = build_report([plans[n] for n in plans], ev_held, out_dir, labels=list(plans), affinity=stats_fit,
                           affinity_extra={"held-out sequences": AffinityStats.from_trace(held, seed=seed)
                                           .mutual_information()},
                           title="moeplace demo: DeepSeek-V2-Lite, held-out sequences", setup=setup, reproduce=cmd,
                           memory_curve=curve, files=files, skipped=skipped, recommendation=rec, plots=plots,
                           progress=lambda m: say(m), staging=stage, same=same, executor=executor, online=online)
    say("report written", 1)
    return {"trace": {"tokens": trace.num_tokens, "fit_tokens": fit.num_tokens, "heldout_tokens": held.num_tokens,
                      "sequences": trace.num_sequences},
            "gpus": gpus, "redundant": R, "plans": plans, "same": same, "recommended": best, "recommendation": rec,
            "exports": exports, "skipped": skipped, "report": rep, "out_dir": str(out_dir)}


def demo_steps(solvers: list[str]) -> int:
    """Progress steps of :func:`run_demo`: affinity, one per solver, memory sweep, online replay, report."""
    return len(solvers) + 4


SUMMARY_COLUMNS = [("load_imbalance", "imbal", False), ("load_imbalance_max", "worst", False),
                   ("cross_gpu_fraction", "xGPU", True), ("dispatch_gpus", "GPUs", True),
                   ("a2a_bytes_per_token", "a2a", True), ("est_moe_us_per_token", "time", True)]


def plans_table(overall: dict[str, dict], solver: dict[str, dict], baseline: str = "contiguous",
                title: str | None = None):
    """A compact rich table, one row per plan: headline metrics (ratios to ``baseline`` where marked) and how the
    plan was solved. The full table is in the report."""
    from rich import box
    from rich.table import Table

    from placement.cli_common import fmt

    base = overall.get(baseline)
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, show_edge=False,
              title_justify="left")
    t.add_column("plan", no_wrap=True)
    for key, label, ratio in SUMMARY_COLUMNS:
        if any(o.get(key) is not None for o in overall.values()):
            t.add_column(label, justify="right", no_wrap=True)
    for c in ("status", "s", "gap"):
        t.add_column(c, justify="right", no_wrap=True)
    for name, o in overall.items():
        cells = [name]
        for key, label, ratio in SUMMARY_COLUMNS:
            if not any(x.get(key) is not None for x in overall.values()):
                continue
            v = o.get(key)
            if v is None:
                cells.append("-")
            elif ratio and base and base.get(key):
                cells.append(f"{v / base[key]:.2f}")
            else:
                cells.append(fmt(v, 3))
        s = solver.get(name, {})
        cells += [str(s.get("status", "-")), f"{s.get('seconds') or 0:.1f}", fmt(s.get("gap"), 3)]
        t.add_row(*cells)
    return t


def plans_table_legend(baseline: str = "contiguous") -> str:
    return (f"imbal: load imbalance (mean over MoE layers of max/mean GPU load); worst: the worst layer; ratios to "
            f"{baseline}: xGPU cross-GPU transitions, GPUs per token-layer, a2a bytes per token, estimated MoE time; "
            f"s: solve seconds; gap: (objective - bound) / objective")


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @user_errors
    def demo_cmd(
        out_dir: Path = typer.Option(Path("moeplace-demo"), "--out", "-o", help="Folder for plans, exports, report "
                                     "(written as a whole)."),
        gpus: int = typer.Option(8, "--gpus", "-g", help="GPUs."),
        gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help="GPUs per node (default: all in "
                                                    "one node)."),
        redundant: Optional[int] = typer.Option(None, "--redundant", "-r", help="Redundant expert slots in total "
                                                "(default: one per GPU, as EPLB deployments run; 0: none)."),
        time_limit: float = typer.Option(DEMO_TIME_LIMIT, "--time-limit", help="Seconds per solver."),
        solver: Optional[list[str]] = typer.Option(None, "--solver", "-s", help="Only these solvers (repeatable; "
                                                   "default: every solver that keeps all experts resident, see "
                                                   "'moeplace solvers')."),
        seed: int = typer.Option(0, "--seed", help="Seed of the sequence split and the solvers."),
        plots: Optional[bool] = typer.Option(None, "--plots/--no-plots", help="Draw PNG plots (default: when "
                                             "matplotlib is installed; --plots requires it)."),
        workers: WorkersOption = None,
        ray_address: RayAddressOption = None,
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ):
        """Run the whole pipeline on the bundled real trace and write plans, an SGLang export and a report.

        Fits every solver on half the sequences of the bundled DeepSeek-V2-Lite trace,
        evaluates the plans on the other half, and writes the plans (JSON), the recommended
        plan (lowest estimated MoE time on the held-out half) for each serving stack, and a
        report (Markdown, HTML) with the side-by-side table and plots."""
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from placement.cli_common import require
        from placement.report import comparable_solvers

        if plots:
            require("matplotlib", "--plots")
        chosen = list(solver or comparable_solvers())
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=err, transient=True) as bar, executor_for(workers, ray_address) as ex:
            task = bar.add_task("moeplace demo", total=demo_steps(chosen))

            def progress(message: str, advance: int = 0) -> None:
                bar.update(task, description=message, advance=advance)
                if advance:
                    err.print(f"  [green]done[/] {message}", highlight=False)

            res = run_demo(out_dir, gpus, gpus_per_node, time_limit, seed, list(solver) if solver else None, plots,
                           progress=progress, redundant=redundant, executor=ex)
        rep = res["report"]
        rec = res["recommendation"]
        if as_json:
            print_json({"heldout": {k: v.heldout for k, v in res["plans"].items()},
                        "solver": {k: {f: v.solver.get(f) for f in ("status", "seconds", "objective", "bound", "gap")}
                                   for k, v in res["plans"].items()},
                        "same_plan_as": res["same"], "redundant": res["redundant"],
                        "recommended": res["recommended"], "recommendation": rec, "exports": res["exports"],
                        "skipped": res["skipped"], "report": str(rep["markdown"]), "html": str(rep["html"]),
                        "plots": [str(p) for p in rep["plots"]]})
            return
        t = res["trace"]
        out.print(f"bundled DeepSeek-V2-Lite ESFT trace: {t['tokens']} tokens in {t['sequences']} sequences; fitted on "
                  f"{t['fit_tokens']} tokens, evaluated on the other {t['heldout_tokens']} (held-out sequences), "
                  f"{gpus} GPUs, {res['redundant']} redundant slots")
        out.print(plans_table({k: v.heldout for k, v in res["plans"].items()},
                              {k: v.solver for k, v in res["plans"].items()},
                              title="held-out sequences (lower is better in every column)"))
        out.print(plans_table_legend(), markup=False, style="dim")
        for dup, twin in res["same"].items():
            out.print(f"{dup}: the same plan as {twin}", markup=False)
        out.print(rec["sentence"] if rec else f"recommended plan: {res['recommended']}", markup=False)
        for k, why in res["skipped"].items():
            out.print(f"skipped {k}: {why}", markup=False)
        for n in rep["notes"]:
            out.print(n, markup=False)
        out.print(f"plans, exports and the report written to {res['out_dir']}/: open {rep['html']} "
                  f"({len(rep['plots'])} plots)", markup=False)
