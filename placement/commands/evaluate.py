"""moeplace evaluate: metrics of plans on traces, side by side."""

from __future__ import annotations

from typing import Optional

import typer

from placement.cli_common import (RayAddressOption, UserError, WorkersOption, executor_for, fmt, metrics_table, out,
                                  print_json, user_errors)
from placement.commands.plan import (CommOption, EvalDataflowOption, HbmOption, PhaseOption, TokensPerGpuOption, EvalDtypeOption, EvalHiddenOption, EvalModelConfigOption,
                                     FlopsOption, InterBandwidthOption, IntermediateOption, IntraBandwidthOption,
                                     ModelOption)


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    @user_errors
    def evaluate_cmd(
        plans: list[str] = typer.Argument(..., help="Plan files (Plan v1 JSON)."),
        trace: Optional[list[str]] = typer.Option(None, "--trace", "-t", help="Trace(s) to evaluate on (token trace or "
                                                  "counts; repeatable). Default: the bundled trace."),
        holdout: float = typer.Option(0.0, "--holdout", help="Evaluate only on the held-out share of sequences of "
                                      "the same split 'moeplace plan --holdout F --seed S' used."),
        seed: int = typer.Option(0, "--seed", help="Seed of that split."),
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
        per_layer: bool = typer.Option(False, "--per-layer", help="Also print per-layer imbalance and locality."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
        workers: WorkersOption = None,
        ray_address: RayAddressOption = None,
    ):
        """Evaluate plans on traces: load balance, affinity locality, fan-out, all-to-all bytes, estimated time.

        The time estimate uses the cost model and link bandwidths the plans were made for (recorded in the plan
        file; the defaults above are for new plans) unless options say otherwise."""
        from placement.cli_common import load_data, load_plans
        from placement.commands.plan import with_cost_options
        from placement.evaluate import evaluate, prepare
        from traces import RoutingTrace

        plan_objs = load_plans(plans)
        data, sources = load_data(trace)
        if holdout:
            if not isinstance(data, RoutingTrace):
                raise UserError("--holdout needs a token trace; counts cannot be split by sequence")
            data = data.split_by_sequence(1.0 - holdout, seed=seed)[1]
        ev = prepare(data)
        plan_objs, cost = with_cost_options(plan_objs, hidden_size=hidden_size, dtype=dtype,
                                            dataflow=dataflow, comm=comm, phase=phase, tokens_per_gpu=tokens_per_gpu,
                                            hbm_bandwidth=hbm_bandwidth, model=model, model_config=model_config,
                                            expert_intermediate_size=expert_intermediate_size, gpu_flops=gpu_flops,
                                            intra_bw=intra_bw, inter_bw=inter_bw)
        results = {}
        with executor_for(workers, ray_address) as ex:  # the per-token traffic, block by block
            for path, plan in zip(plans, plan_objs):
                key = plan.name if plan.name not in results else f"{plan.name} ({path})"
                results[key] = evaluate(plan, ev, cost, ex)
                results[key]["plan_file"] = path
        if as_json:
            print_json(results if len(results) > 1 else next(iter(results.values())))
            return
        out.print(f"evaluated on {', '.join(sources)}: {ev.num_tokens or 'counts-only'} tokens")
        out.print(metrics_table({k: v["overall"] for k, v in results.items()}))
        if per_layer:
            from rich.table import Table

            t = Table(title="per MoE layer: load imbalance / locality to next layer")
            t.add_column("layer")
            for k in results:
                t.add_column(k, justify="right")
            for i, row in enumerate(next(iter(results.values()))["per_layer"]):
                t.add_row(str(row["moe_layer"]), *[f"{fmt(r['per_layer'][i]['load_imbalance'], 3)} / "
                                                    f"{fmt(r['per_layer'][i].get('affinity_locality_next'), 3)}"
                                                    for r in results.values()])
            out.print(t)
