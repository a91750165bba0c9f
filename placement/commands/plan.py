"""moeplace plan: traces -> solver -> plan.json (with predicted and, optionally, held-out metrics)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from placement.cli_common import UserError, err, fmt, out, print_json, user_errors

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}


def default_solver() -> str:
    from solvers import names

    return "joint" if "joint" in names() else "contiguous"


def parse_params(items: list[str] | None) -> dict:
    """``KEY=VALUE`` strings to a dict; values parsed as JSON when they look like it (numbers, true, lists)."""
    import json

    params = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--param {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def cost_model(hidden_size: int | None, dtype: str, dataflow: str = "standard", **kw):
    from solvers.cost import CostModel

    if dtype not in DTYPE_BYTES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    base = CostModel()
    return CostModel(hidden_size=hidden_size or base.hidden_size, dtype_bytes=DTYPE_BYTES[dtype], dataflow=dataflow,
                     **{k: v for k, v in kw.items() if v is not None})


def make_plan(data, sources: list[str], gpus: int, gpus_per_node: int | None, redundant: int, solver: str,
              expert_groups: int = 1, time_limit: float | None = 60.0, seed: int = 0, backend: str = "cp-sat",
              threads: int | None = None, params: dict | None = None, holdout: float = 0.0,
              current=None, cost=None, progress=None, memory_budget: str | None = None,
              expert_bytes: str | None = None, model_config: str | None = None):
    """Fit a plan on ``data`` (minus a held-out share of sequences) and evaluate it; returns the Plan."""
    from placement.evaluate import evaluate
    from placement.plan import Plan, provenance_of
    from placement.problem import build_problem
    from solvers import Options, Topology, solve
    from traces import RoutingTrace

    fit, held = data, None
    if holdout:
        if not isinstance(data, RoutingTrace):
            raise UserError("--holdout needs a token trace (it splits by sequence); counts cannot be split")
        fit, held = data.split_by_sequence(1.0 - holdout, seed=seed)
    E = fit.num_experts
    budget = note = None
    if memory_budget is not None:  # GPU memory budget: docs/memory-budget.md
        from placement.budget import resolve_plan_budget

        budget, note, solver = resolve_plan_budget(memory_budget, fit, gpus, redundant, solver, expert_bytes,
                                                   model_config)
    topo = budget.topology(gpus_per_node) if budget else Topology.for_experts(E, gpus, redundant, gpus_per_node)
    problem = build_problem(fit, topo, expert_groups=expert_groups, current=current,
                            budget_slots=budget.total_slots if budget else None)
    params = dict(params or {})
    if cost is not None:  # the planner optimises the same cost model the plan is evaluated with
        for key in ("dataflow", "hidden_size", "dtype_bytes"):
            params.setdefault(key, getattr(cost, key))
    options = Options(time_limit=time_limit, seed=seed, backend=backend, threads=threads, params=params,
                      progress=progress)
    result = solve(solver, problem, options)
    n_seq = getattr(fit, "num_sequences", 0)
    prov = provenance_of(sources, getattr(fit, "num_tokens", 0), n_seq,
                         {"holdout": holdout, "split_seed": seed, "expert_groups": expert_groups})
    plan = Plan.from_result(result, E, topo, fit.moe_layer_index, fit.decoder_layers, fit.model,
                            options={"time_limit": time_limit, "seed": seed, "backend": backend, "params": params or {},
                                     "redundant": redundant, "expert_groups": expert_groups},
                            provenance=prov)
    if budget is not None:
        plan.memory.update(budget.memory_record())
        plan.solver["options"]["memory_budget"] = memory_budget
    if note:
        plan.extra["note"] = note
    plan.predicted = evaluate(plan, fit, cost)["overall"]
    if held is not None:
        plan.heldout = evaluate(plan, held, cost)["overall"]
    return plan


def register(app: typer.Typer) -> None:
    @app.command("plan")
    @user_errors
    def plan_cmd(
        trace: Optional[list[str]] = typer.Argument(None, help="Trace files (.npz token traces or counts) or bundled "
                                                   "dataset names; default: the bundled DeepSeek-V2-Lite trace."),
        gpus: int = typer.Option(..., "--gpus", "-g", help="GPUs (EP size)."),
        gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help="GPUs per node (default: all in one)."),
        redundant: int = typer.Option(0, "--redundant", "-r", help="Redundant expert slots in total (EP-wide)."),
        solver: Optional[str] = typer.Option(None, "--solver", "-s", help="Solver (default: joint when available). "
                                             "See 'moeplace solvers'."),
        expert_groups: int = typer.Option(1, "--expert-groups", help="Expert groups (DeepSeek-V3: 8), for EPLB's "
                                          "hierarchical policy and node-limited routing."),
        time_limit: float = typer.Option(60.0, "--time-limit", help="Solver time limit in seconds."),
        seed: int = typer.Option(0, "--seed", help="Random seed (solver and hold-out split)."),
        backend: str = typer.Option("cp-sat", "--backend", help="MIP backend: cp-sat, highs or cbc."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Solver threads (default: all cores)."),
        param: Optional[list[str]] = typer.Option(None, "--param", help="Solver-specific KEY=VALUE (repeatable)."),
        holdout: float = typer.Option(0.0, "--holdout", help="Share of sequences held out of the fit and used to "
                                      "report out-of-sample metrics (e.g. 0.5)."),
        current: Optional[Path] = typer.Option(None, "--current", help="Plan in service now (migration cost)."),
        hidden_size: Optional[int] = typer.Option(None, "--hidden-size", help="Model hidden size for bytes/time "
                                                  "(default 2048, DeepSeek-V2-Lite)."),
        dtype: str = typer.Option("bf16", "--dtype", help="Activation dtype on the wire: bf16, fp16, fp8, fp32."),
        dataflow: str = typer.Option("standard", "--dataflow", help="Expert-parallel dataflow the joint planner "
                                     "optimises: standard (dispatch + combine) or coherent (ExFlow: a token goes on "
                                     "from the GPU of its highest-gate expert, so inter-layer affinity pays)."),
        memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="GPU memory for expert weights, per "
                                                    "GPU: expert slots (416), a share of all experts (25%) or bytes "
                                                    "(6GiB); other experts stay in host memory (docs/memory-budget.md)."),
        expert_bytes: Optional[str] = typer.Option(None, "--expert-bytes", help="Size of one expert (e.g. 17.3MB), for "
                                                   "byte budgets and host->GPU bytes."),
        model_config: Optional[Path] = typer.Option(None, "--model-config", help="The model's config.json, to derive "
                                                    "the expert size."),
        out_path: Path = typer.Option(Path("plan.json"), "--out", "-o", help="Plan file to write."),
        as_json: bool = typer.Option(False, "--json", help="Print the plan summary as JSON."),
    ):
        """Solve for a placement and write a plan file (Plan v1 JSON)."""
        from placement.cli_common import load_data
        from placement.plan import Plan

        if not 0.0 <= holdout < 1.0:
            raise UserError(f"--holdout must be in [0, 1), got {holdout}")
        data, sources = load_data(trace)
        name = solver or ("budget" if memory_budget else default_solver())
        cur = Plan.load(current) if current else None
        with err.status(f"planning with {name} on {gpus} GPUs ...") as status:
            plan = make_plan(data, sources, gpus, gpus_per_node, redundant, name, expert_groups, time_limit, seed,
                             backend, threads, parse_params(param), holdout, cur, cost_model(hidden_size, dtype, dataflow),
                             progress=lambda m: status.update(f"{name}: {m}"), memory_budget=memory_budget,
                             expert_bytes=expert_bytes, model_config=model_config)
        plan.save(out_path)
        summary = {"plan": str(out_path), "solver": plan.solver, "predicted": plan.predicted, "heldout": plan.heldout}
        if as_json:
            print_json(summary)
            return
        s = plan.solver
        out.print(f"wrote {out_path}: {plan.num_layers} MoE layers x {plan.num_slots} slots on {gpus} GPUs "
                  f"({plan.num_redundant} redundant), solver {s['name']} [{s['status']}] in {s['seconds']:.2f}s"
                  + (f", objective {fmt(s['objective'])} bound {fmt(s['bound'])} gap {fmt(s['gap'])}"
                     if s.get("objective") is not None else ""), markup=False)
        if plan.memory is not None:
            from placement.budget import describe_plan_memory

            out.print(describe_plan_memory(plan), markup=False)
        if plan.extra.get("note"):
            err.print(f"note: {plan.extra['note']}", markup=False)
        from placement.commands.evaluate import metrics_table

        cols = {"fitted (in-sample)": plan.predicted}
        if plan.heldout is not None:
            cols["held-out"] = plan.heldout
        out.print(metrics_table(cols))

    @app.command("solvers")
    def solvers_cmd():
        """List the available solvers."""
        from solvers import names

        for n in names():
            out.print(n)
