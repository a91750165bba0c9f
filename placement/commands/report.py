"""moeplace report: the demo's report (tables and plots) for the user's own plans and traces."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from placement.cli_common import (RayAddressOption, UserError, WorkersOption, executor_for, out, print_json, progress,
                                  user_errors)
from placement.commands.plan import (CommOption, EvalDataflowOption, HbmOption, PhaseOption, TokensPerGpuOption, EvalDtypeOption, EvalHiddenOption, EvalModelConfigOption,
                                     FlopsOption, HardwareOption, InterBandwidthOption, IntermediateOption,
                                     IntraBandwidthOption, ModelOption)


def register(app: typer.Typer) -> None:
    @app.command("report")
    @user_errors
    def report_cmd(
        plans: list[str] = typer.Argument(..., help="Plan files (Plan v1 JSON) to compare."),
        trace: Optional[list[str]] = typer.Option(None, "--trace", "-t", help="Trace(s) to evaluate on (token trace or "
                                                  "counts; repeatable). Default: the bundled trace."),
        out_dir: Path = typer.Option(Path("moeplace-report"), "--out", "-o", help="Folder for the report."),
        holdout: float = typer.Option(0.0, "--holdout", help="Evaluate only on the held-out share of sequences of "
                                      "the same split 'moeplace plan --holdout F --seed S' used."),
        seed: int = typer.Option(0, "--seed", help="Seed of that split."),
        baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Add the contiguous placement as the "
                                      "reference column when no plan is contiguous."),
        hidden_size: EvalHiddenOption = None,
        dtype: EvalDtypeOption = None,
        dataflow: EvalDataflowOption = None,
        comm: CommOption = None,
        phase: PhaseOption = None,
        tokens_per_gpu: TokensPerGpuOption = None,
        hbm_bandwidth: HbmOption = None,
        model: ModelOption = None,
        model_config: EvalModelConfigOption = None,
        expert_intermediate_size: IntermediateOption = None,
        gpu_flops: FlopsOption = None,
        intra_bw: IntraBandwidthOption = None,
        inter_bw: InterBandwidthOption = None,
        hardware: HardwareOption = None,
        workers: WorkersOption = None,
        ray_address: RayAddressOption = None,
        title: str = typer.Option("moeplace report", "--title", help="Report title."),
        plots: Optional[bool] = typer.Option(None, "--plots/--no-plots", help="Draw PNG plots (default: when "
                                             "matplotlib is installed; --plots requires it)."),
        as_json: bool = typer.Option(False, "--json", help="Print the written paths and metrics as JSON."),
    ):
        """Compare plans on traces in a report: Markdown, HTML, JSON and PNG plots.

        The report has the side-by-side metrics with ratios to contiguous, solve time and gap,
        affinity heatmaps, mutual information against a shuffled baseline, and per-layer balance
        and cross-GPU transitions per plan."""
        from placement.affinity import AffinityStats
        from placement.cli_common import load_data, load_plans, require
        from placement.commands.plan import load_hardware, with_cost_options
        from placement.report import (build_report, describe_cost, describe_data, describe_topology,
                                      reference_baseline)
        from traces import RoutingTrace

        if plots:
            require("matplotlib", "--plots")
        plan_objs = load_plans(plans)
        data, sources = load_data(trace)
        whole = data
        if holdout:
            if not isinstance(data, RoutingTrace):
                raise UserError("--holdout needs a token trace; counts cannot be split by sequence")
            data = data.split_by_sequence(1.0 - holdout, seed=seed)[1]
        for p in plan_objs:
            p.check_fits(data.num_layers, data.num_experts, source=", ".join(sources))
        labels = [p.name for p in plan_objs]
        if baseline:
            ref = reference_baseline(plan_objs, data.num_experts, data.load_profile().total())
            if ref is not None:
                plan_objs, labels = [ref, *plan_objs], ["contiguous", *labels]
        cost_opts = {"hidden_size": hidden_size, "dtype": dtype, "dataflow": dataflow, "comm": comm, "model": model,
                     "phase": phase, "tokens_per_gpu": tokens_per_gpu, "hbm_bandwidth": hbm_bandwidth,
                     "model_config": model_config, "expert_intermediate_size": expert_intermediate_size,
                     "gpu_flops": gpu_flops, "hardware": hardware}
        plan_objs, cost = with_cost_options(plan_objs, intra_bw=intra_bw, inter_bw=inter_bw, **cost_opts)
        setup = [describe_data("evaluation data", data) + f" from {', '.join(sources)}"
                 + (f" (held-out share {holdout:g} of sequences, split seed {seed})" if holdout else ""),
                 *([describe_topology(plan_objs[0])] if len({(p.topology, p.num_redundant) for p in plan_objs}) == 1
                   else [f"{n}: {describe_topology(p)}" for n, p in zip(labels, plan_objs)]),
                 describe_cost(cost),
                 *([f"hardware {load_hardware(hardware).describe()}"] if hardware else []),
                 "plans: " + ", ".join(f"`{p}`" for p in plans)]
        cmd = "moeplace report " + " ".join(shlex.quote(p) for p in plans)
        cmd += "".join(f" --trace {shlex.quote(t)}" for t in trace or [])
        cmd += f" --out {shlex.quote(str(out_dir))}" + (f" --holdout {holdout:g} --seed {seed}" if holdout else "")
        cmd += "" if baseline else " --no-baseline"
        given = {**cost_opts, "intra_node_bandwidth": intra_bw, "inter_node_bandwidth": inter_bw}
        cmd += "".join(f" --{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in given.items() if v is not None)
        with progress("writing the report ...") as status, executor_for(workers, ray_address) as ex:
            stats = AffinityStats.from_trace(whole, seed=seed) if isinstance(whole, RoutingTrace) else None
            rep = build_report(plan_objs, data, out_dir, labels=labels, affinity=stats, title=title, setup=setup,
                               reproduce=cmd, cost=cost, plots=plots, progress=status.update, seed=seed,
                               executor=ex)
        if as_json:
            print_json({"report": str(rep["markdown"]), "html": str(rep["html"]), "json": str(rep["json"]),
                        "plots": [str(p) for p in rep["plots"]], "recommendation": rep["recommendation"],
                        "overall": {k: v["overall"] for k, v in rep["results"].items()}, "notes": rep["notes"]})
            return
        from placement.commands.demo import plans_table, plans_table_legend

        cols = {k: v["overall"] for k, v in rep["results"].items()}
        solver = {k: p.solver for k, p in zip(labels, plan_objs)}
        out.print(plans_table(cols, solver, title="evaluation data (lower is better in every column)"))
        if "contiguous" in cols:
            out.print(plans_table_legend(), markup=False, style="dim")
        if rep["recommendation"]:
            out.print(rep["recommendation"]["sentence"], markup=False)
        for n in rep["notes"]:
            out.print(n, markup=False)
        out.print(f"wrote {rep['markdown']}, {rep['html']} and {len(rep['plots'])} plots", markup=False)
