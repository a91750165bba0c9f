"""moeplace plan: traces -> solver -> plan.json (with predicted and, optionally, held-out metrics)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from placement.cli_common import (MAX_GPUS, MAX_REDUNDANT, MIN_FIT_SEQUENCES, RayAddressOption, UserError,
                                  WorkersOption, check_redundant, default_solver, err, executor_for, fmt,
                                  metrics_table, out, print_json, progress, user_errors)

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}
DEFAULT_TIME_LIMIT = 60.0


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


COST_FIELDS = ("hidden_size", "expert_intermediate_size", "dtype_bytes", "gpu_flops", "dataflow", "comm",
               "tokens_per_gpu", "hbm_bandwidth", "expert_overhead")

# what each serving phase runs (every value can be overridden by its own option): DeepSeek's published deployment
# profiles (deepseek-ai/profile-data: prefill 16K tokens per GPU at EP32, decode 128 requests per GPU at EP128) and
# their kernels (DeepEP normal in prefill, low-latency in decode)
PHASES = {"prefill": {"comm": "deepep-normal", "tokens_per_gpu": 16384},
          "decode": {"comm": "deepep-ll", "tokens_per_gpu": 128}}

# cost-model options shared by plan, evaluate and report (evaluate and report default to what the plans were made
# for; the defaults in the help texts are for new plans)
ModelOption = Annotated[Optional[str], typer.Option(
    "--model", help="Model sizes for the cost model: deepseek-v2-lite (default), deepseek-v2, deepseek-v3, "
    "kimi-k2, qwen3-235b-a22b, qwen3-30b-a3b, glm-4.5, gpt-oss-120b, mixtral-8x7b, olmoe-1b-7b; --model-config "
    "reads them from config.json instead.")]
IntermediateOption = Annotated[Optional[int], typer.Option(
    "--expert-intermediate-size", help="Routed experts' FFN width, for FLOPs (default 1408).")]
FlopsOption = Annotated[Optional[str], typer.Option(
    "--gpu-flops", help="Effective GPU throughput of the expert GEMMs, FLOP/s (default 400T: H100 bf16 grouped "
    "GEMMs).")]
IntraBandwidthOption = Annotated[Optional[str], typer.Option(
    "--intra-node-bandwidth", help="GPU-to-GPU bytes/s per GPU and direction inside a node (default 450GB: NVLink "
    "4; PCIe Gen5 x16 is about 50GB).")]
InterBandwidthOption = Annotated[Optional[str], typer.Option(
    "--inter-node-bandwidth", help="Bytes/s per GPU and direction between nodes (default 50GB: one 400 Gb/s NIC "
    "per GPU).")]
# evaluate and report only: where unset, the value the plans were made for
EvalHiddenOption = Annotated[Optional[int], typer.Option(
    "--hidden-size", help="Hidden size for bytes and time (default: the plans').")]
EvalDtypeOption = Annotated[Optional[str], typer.Option(
    "--dtype", help="bf16, fp16, fp8 or fp32 (default: the plans').")]
EvalDataflowOption = Annotated[Optional[str], typer.Option(
    "--dataflow", help="Dataflow of the time estimate: standard or coherent (ExFlow) (default: the plans').")]
EvalModelConfigOption = Annotated[Optional[Path], typer.Option(
    "--model-config", help="The model's config.json, for the cost model's sizes.")]
PhaseOption = Annotated[Optional[str], typer.Option(
    "--phase", help="Serving phase: prefill (DeepEP normal kernels, 16384 tokens per GPU) or decode (DeepEP "
    "low-latency kernels, 128 tokens per GPU, memory-bound experts); --comm and --tokens-per-gpu override.")]
TokensPerGpuOption = Annotated[Optional[float], typer.Option(
    "--tokens-per-gpu", help="Tokens each GPU holds per forward step: expert compute becomes the roofline of FLOPs "
    "and the weight reads of the active experts (default: none, compute linear in tokens; --phase sets it).")]
HbmOption = Annotated[Optional[str], typer.Option(
    "--hbm-bandwidth", help="Bytes/s a GPU reads expert weights at, for the roofline (default 3.35TB: H100 SXM).")]
HardwareOption = Annotated[Optional[str], typer.Option(
    "--hardware", help="Hardware profile: h100, h200, b200 (published figures) or a JSON file written by 'moeplace "
    "calibrate'; sets the link bandwidths, GPU FLOP/s, HBM bandwidth and the cost per active expert (explicit "
    "options win; docs/hardware.md).")]
CommOption = Annotated[Optional[str], typer.Option(
    "--comm", help="All-to-all kernels: nccl (one copy per distinct remote GPU; the default for new plans), "
    "deepep-normal (prefill: RDMA once per remote node, then NVLink) or deepep-ll (decode: one message per "
    "token-expert copy); evaluate and report default to the plans'.")]


def parse_rate(text, what: str) -> float:
    """A positive number with an optional decimal prefix: ``400T``, ``400e12``, ``1.5P`` (FLOP/s)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtTpP]?)(?:flops|FLOPS|FLOP/s|flop/s)?\s*",
                     str(text))
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"{what} {text!r} is not a positive rate; write e.g. 400T or 4e14")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}[m.group(2).lower()]
    if not math.isfinite(value):
        raise UserError(f"{what} {text!r} is too large to be a rate; write e.g. 400T or 4e14")
    return value


def recorded_cost(plans) -> tuple[dict, list[str]]:
    """Cost-model fields the plans were made for (``solver.options.params``) where they all agree, and the names
    of the fields on which they disagree."""
    seen: dict[str, set] = {}
    for plan in plans:
        params = ((plan.solver or {}).get("options") or {}).get("params") or {}
        for key in COST_FIELDS:
            if isinstance(params.get(key), (int, float, str)):  # anything else is not ours: ignored
                seen.setdefault(key, set()).add(params[key])
    agreed = {k: next(iter(v)) for k, v in seen.items() if len(v) == 1}
    return agreed, sorted(k for k, v in seen.items() if len(v) > 1)


def cost_model(hidden_size: int | None = None, dtype: str | None = None, dataflow: str | None = None, *,
               model: str | None = None, model_config=None, expert_intermediate_size: int | None = None,
               gpu_flops: str | float | None = None, base: dict | None = None, comm: str | None = None,
               phase: str | None = None, tokens_per_gpu: float | None = None, hbm_bandwidth: str | None = None,
               hardware=None):
    """The cost model from the CLI's options, in this order (later wins): defaults (DeepSeek-V2-Lite sizes, H100),
    ``base`` (fields a plan was made for), the ``hardware`` profile's GPU fields (a name, file or
    :class:`placement.hardware.Hardware`), the ``phase`` defaults (:data:`PHASES`), the ``model`` preset, the sizes
    in ``model_config`` (config.json), the explicit options."""
    from solvers.cost import PRESETS, CostModel

    if dtype is not None and dtype not in DTYPE_BYTES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    if phase is not None and phase not in PHASES:
        raise UserError(f"--phase {phase!r} is not one of {', '.join(PHASES)}")
    fields = {k: v for k, v in (base or {}).items() if k in COST_FIELDS}
    hw = load_hardware(hardware)
    if hw is not None:
        fields.update(hw.cost_fields())
    fields.update(PHASES.get(phase, {}))
    if model is not None:
        if str(model).lower() not in PRESETS:
            raise UserError(f"--model {model!r} is not a known model size; known: {', '.join(sorted(PRESETS))}")
        fields.update(PRESETS[str(model).lower()])
    if model_config is not None:
        from placement.budget import model_sizes_from_config

        fields["hidden_size"], fields["expert_intermediate_size"] = model_sizes_from_config(model_config)
    explicit = {"hidden_size": hidden_size, "expert_intermediate_size": expert_intermediate_size,
                "dtype_bytes": DTYPE_BYTES[dtype] if dtype is not None else None, "dataflow": dataflow, "comm": comm,
                "tokens_per_gpu": tokens_per_gpu,
                "hbm_bandwidth": parse_bandwidth(hbm_bandwidth, "--hbm-bandwidth") if hbm_bandwidth else None,
                "gpu_flops": parse_rate(gpu_flops, "--gpu-flops") if gpu_flops is not None else None}
    fields.update({k: v for k, v in explicit.items() if v is not None})
    return CostModel(**fields)


def load_hardware(spec):
    """The :class:`placement.hardware.Hardware` for ``--hardware`` (a preset name or a profile file), or None."""
    if spec is None:
        return None
    from placement.hardware import Hardware, load

    return spec if isinstance(spec, Hardware) else load(spec)


def link_bandwidths(intra_bw: str | None, inter_bw: str | None, hardware=None) -> tuple[float | None, float | None]:
    """``(intra, inter)`` bytes/s from ``--intra-node-bandwidth`` / ``--inter-node-bandwidth``, else the hardware
    profile's, else None (keep the topology's)."""
    hw = load_hardware(hardware)
    hw_bw = hw.bandwidths() if hw is not None else (None, None)
    given = (parse_bandwidth(intra_bw, "--intra-node-bandwidth"), parse_bandwidth(inter_bw, "--inter-node-bandwidth"))
    return tuple(g if g is not None else h for g, h in zip(given, hw_bw))


def parse_bandwidth(text: str | None, flag: str) -> float | None:
    """Bytes per second from ``450GB`` (per GPU and direction), or None."""
    from placement.budget import parse_size

    return None if text is None else float(parse_size(text, flag))


def with_cost_options(plans: list, *, intra_bw: str | None = None, inter_bw: str | None = None, hardware=None,
                      **options) -> tuple[list, object]:
    """Plans to evaluate and the cost model to evaluate them with, from the CLI's cost options (``options`` are
    :func:`cost_model`'s keywords): where an option is not given, the value the plans were made for (when they all
    agree; else the default, with a note on stderr). Bandwidth options (else the ``hardware`` profile's links) replace
    the link bandwidths of every plan's topology."""
    from dataclasses import replace

    hardware = load_hardware(hardware)
    agreed, differ = recorded_cost(plans)
    flag = {"dtype_bytes": "dtype"}
    unset = [k for k in differ if options.get(flag.get(k, k)) is None
             and not (hardware is not None and k in hardware.cost_fields())]
    if unset:
        err.print(f"note: the plans were made for different {', '.join(unset)}; all are evaluated with the default "
                  f"(--{flag.get(unset[0], unset[0]).replace('_', '-')} chooses)", markup=False)
    cost = cost_model(base=agreed, hardware=hardware, **options)
    bw = link_bandwidths(intra_bw, inter_bw, hardware)
    if bw != (None, None):
        plans = [replace(p, topology=p.topology.with_bandwidths(*bw)) for p in plans]
    return plans, cost


RESAMPLES = 8


def default_resamples(fit, solver: str, asked: int | None) -> int:
    """How many bootstrap resamples of the fitted sequences the joint planner takes as workload profiles:
    ``asked``, else ``RESAMPLES`` for the joint planner on one token trace with at least 16 sequences, else 1
    (docs/concepts.md, "Inputs it uses"). Other solvers do not read profiles, so asking them for resamples is an
    error."""
    from traces import RoutingTrace

    if asked is not None:
        if asked < 1:
            raise UserError(f"--resamples must be >= 1, got {asked}")
        if asked > 1 and solver != "joint":
            raise UserError(f"--resamples is a joint-planner option and the solver is {solver}; drop it or use "
                            "--solver joint")
        if asked > 1 and not isinstance(fit, RoutingTrace):
            raise UserError("--resamples needs a token trace (counts cannot be resampled by sequence); drop it")
        return asked
    if solver != "joint" or not isinstance(fit, RoutingTrace) or fit.num_sequences < 16:
        return 1
    return RESAMPLES


def make_plan(data, sources: list[str], gpus: int, gpus_per_node: int | None, redundant: int, solver: str,
              expert_groups: int = 1, time_limit: float | None = 60.0, seed: int = 0, backend: str = "cp-sat",
              threads: int | None = None, params: dict | None = None, holdout: float = 0.0,
              current=None, cost=None, progress=None, memory_budget: str | None = None,
              expert_bytes: str | None = None, model_config: str | None = None,
              bandwidths: tuple[float | None, float | None] = (None, None), resamples: int | None = None,
              work_limit: int | None = None, executor=None, phase: str | None = None):
    """Fit a plan on ``data`` (minus a held-out share of sequences) and evaluate it; returns the Plan.

    The solver optimises, and the plan is evaluated with, one cost model: ``cost`` updated by any cost fields or
    ``model`` preset in ``params``; the plan records all its fields in ``solver.options.params`` and the link
    ``bandwidths`` (intra-, inter-node bytes/s; None keeps the H100 defaults) in its topology. ``resamples``:
    the joint planner's profiles from bootstrap resamples of the fitted trace's sequences (:func:`default_resamples`).
    ``work_limit``: a deterministic amount of search instead of ``time_limit``; ``executor``: where the solver's
    independent tasks run (:mod:`placement.executor`; None: in this process); ``phase``: fit and evaluate on that
    serving phase's tokens when the trace records them."""
    from placement.evaluate import evaluate
    from placement.plan import Plan, provenance_of
    from placement.problem import build_problem
    from solvers import Options, Topology, solve
    from traces import RoutingTrace

    if phase is not None and isinstance(data, RoutingTrace):  # plan for one serving phase on its own tokens
        if data.phase is not None:
            data = data.of_phase(phase)
        else:
            err.print(f"note: the trace does not record each token's phase, so the {phase} plan is fitted on all "
                      f"tokens (SGLang's per-token recorder records it)", markup=False)
    fit, held = data, None
    if holdout:
        if not isinstance(data, RoutingTrace):
            raise UserError("--holdout needs a token trace (it splits by sequence); counts cannot be split")
        fit, held = data.split_by_sequence(1.0 - holdout, seed=seed)
        if fit.seq_id is not None and fit.num_sequences < MIN_FIT_SEQUENCES:
            err.print(f"warning: --holdout {holdout:g} leaves {fit.num_sequences} of {data.num_sequences} sequences to "
                      f"fit on (fewer than {MIN_FIT_SEQUENCES}): the plan follows the noise of so few requests; use a "
                      f"smaller --holdout or a longer trace", markup=False, highlight=False)
    E = fit.num_experts
    if memory_budget is None:
        check_redundant(redundant, E, gpus)
    budget = note = None
    if memory_budget is not None:  # GPU memory budget: docs/memory-budget.md
        from placement.budget import resolve_plan_budget

        budget, note, solver = resolve_plan_budget(memory_budget, fit, gpus, redundant, solver, expert_bytes,
                                                   model_config)
    topo = budget.topology(gpus_per_node) if budget else Topology.for_experts(E, gpus, redundant, gpus_per_node)
    topo = topo.with_bandwidths(*bandwidths)
    resamples = default_resamples(fit, solver, resamples)
    problem = build_problem(fit, topo, expert_groups=expert_groups, current=current,
                            budget_slots=budget.total_slots if budget else None, resamples=resamples, seed=seed)
    from solvers.cost import CostModel

    params = dict(params or {})
    # the planner optimises the same cost model the plan is evaluated with
    cost = CostModel.from_params(params, base=cost or CostModel())
    params.pop("model", None)
    params.update({key: getattr(cost, key) for key in COST_FIELDS})
    if work_limit is not None and solver != "joint":
        raise UserError(f"--work-limit is a joint-planner option and the solver is {solver}; use --time-limit")
    options = Options(time_limit=time_limit, seed=seed, backend=backend, threads=threads, params=params,
                      progress=progress, work_limit=work_limit, executor=executor)
    result = solve(solver, problem, options)
    n_seq = getattr(fit, "num_sequences", 0)
    prov = provenance_of(sources, getattr(fit, "num_tokens", 0), n_seq,
                         {"holdout": holdout, "split_seed": seed, "expert_groups": expert_groups})
    plan = Plan.from_result(result, E, topo, fit.moe_layer_index, fit.decoder_layers, fit.model,
                            options={"time_limit": None if work_limit is not None else time_limit,
                                     "work_limit": work_limit, "seed": seed, "backend": backend, "params": params or {},
                                     "redundant": redundant, "expert_groups": expert_groups,
                                     "resamples": resamples},
                            provenance=prov)
    if budget is not None:
        plan.memory.update(budget.memory_record())
        plan.solver["options"]["memory_budget"] = memory_budget
    if note:
        plan.extra["note"] = note
    plan.predicted = evaluate(plan, fit, cost, executor)["overall"]
    if held is not None:
        plan.heldout = evaluate(plan, held, cost, executor)["overall"]
    return plan


def register(app: typer.Typer) -> None:
    @app.command("plan")
    @user_errors
    def plan_cmd(
        trace: Optional[list[str]] = typer.Argument(None, help="Trace files (.npz token traces or counts) or bundled "
                                                   "dataset names; default: the bundled DeepSeek-V2-Lite trace."),
        gpus: int = typer.Option(..., "--gpus", "-g", help=f"GPUs (EP size, at most {MAX_GPUS})."),
        gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help="GPUs per node (default: all in one, "
                                                    "or the --hardware profile's when --gpus fills whole nodes)."),
        redundant: int = typer.Option(0, "--redundant", "-r", help="Redundant expert slots in total (EP-wide, at most "
                                       f"{MAX_REDUNDANT})."),
        solver: Optional[str] = typer.Option(None, "--solver", "-s", help="Solver (default: joint when available). "
                                             "See 'moeplace solvers'."),
        expert_groups: int = typer.Option(1, "--expert-groups", help="Expert groups (DeepSeek-V3: 8), for EPLB's "
                                          "hierarchical policy and node-limited routing."),
        time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Solver time limit in seconds, default "
                                                   f"{DEFAULT_TIME_LIMIT:g} (reading the trace, its statistics and "
                                                   "evaluating the plan come on top: about 1 min at 262k V3 tokens)."),
        work_limit: Optional[int] = typer.Option(None, "--work-limit", help="Joint planner: a deterministic amount "
                                                 "of search instead of --time-limit, in iterated-search kicks per "
                                                 "layer (every descent runs to its end); the same plan for the same "
                                                 "--seed with any --workers or on Ray."),
        workers: WorkersOption = None,
        ray_address: RayAddressOption = None,
        seed: int = typer.Option(0, "--seed", help="Random seed (solver and hold-out split)."),
        backend: str = typer.Option("cp-sat", "--backend", help="MIP backend: cp-sat, highs or cbc."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Solver threads (default: all cores)."),
        param: Optional[list[str]] = typer.Option(None, "--param", help="Solver-specific KEY=VALUE (repeatable)."),
        holdout: float = typer.Option(0.0, "--holdout", help="Share of sequences held out of the fit and used to "
                                      "report out-of-sample metrics (e.g. 0.5)."),
        current: Optional[Path] = typer.Option(None, "--current", help="Plan in service now (migration cost)."),
        hidden_size: Optional[int] = typer.Option(None, "--hidden-size", help="Model hidden size for bytes/time "
                                                  "(default 2048, DeepSeek-V2-Lite)."),
        model: ModelOption = None,
        expert_intermediate_size: IntermediateOption = None,
        gpu_flops: FlopsOption = None,
        intra_bw: IntraBandwidthOption = None,
        inter_bw: InterBandwidthOption = None,
        hardware: HardwareOption = None,
        dtype: str = typer.Option("bf16", "--dtype", help="Activation dtype on the wire: bf16, fp16, fp8, fp32."),
        comm: CommOption = None,
        phase: PhaseOption = None,
        tokens_per_gpu: TokensPerGpuOption = None,
        hbm_bandwidth: HbmOption = None,
        dataflow: str = typer.Option("standard", "--dataflow", help="Expert-parallel dataflow the joint planner "
                                     "optimises: standard (dispatch + combine) or coherent (ExFlow: a token goes on "
                                     "from the GPU of its highest-gate expert, so inter-layer affinity pays)."),
        resamples: Optional[int] = typer.Option(None, "--resamples", help="Joint planner: minimise the expected time "
                                                "over this many bootstrap resamples of the trace's sequences, for "
                                                "plans robust to how load varies (default 8 with at least 16 "
                                                "sequences; 1 fits the trace as the one sample)."),
        affinity_weight: Optional[float] = typer.Option(None, "--affinity-weight", help="Joint planner: trade "
                                                        "estimated time for inter-layer locality; one point of "
                                                        "cross-GPU transitions is worth this many percent of the "
                                                        "balanced compute time (default 0; docs/concepts.md)."),
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
        from placement.hardware import gpus_per_node as hardware_gpus_per_node
        from placement.plan import Plan

        hw = load_hardware(hardware)
        cost = cost_model(hidden_size, dtype, dataflow, model=model, model_config=model_config,
                          expert_intermediate_size=expert_intermediate_size, gpu_flops=gpu_flops, comm=comm,
                          phase=phase, tokens_per_gpu=tokens_per_gpu, hbm_bandwidth=hbm_bandwidth, hardware=hw)
        bandwidths = link_bandwidths(intra_bw, inter_bw, hw)
        gpus_per_node = hardware_gpus_per_node(hw, gpus, gpus_per_node)
        data, sources = load_data(trace)
        name = solver or ("budget" if memory_budget else default_solver())
        params = parse_params(param)
        if affinity_weight is not None:
            if name != "joint":
                raise UserError(f"--affinity-weight is a joint-planner option and the solver is {name}; drop it or "
                                "use --solver joint")
            params["affinity_weight"] = affinity_weight
        cur = Plan.load(current) if current else None
        if work_limit is not None and time_limit is not None:
            raise UserError("give --work-limit (deterministic search) or --time-limit (wall clock), not both")
        if work_limit is not None and name != "joint":
            raise UserError(f"--work-limit is a joint-planner option and the solver is {name}; use --time-limit")
        if time_limit is None and work_limit is None:
            time_limit = DEFAULT_TIME_LIMIT
        with executor_for(workers, ray_address) as ex, progress(f"planning with {name} on {gpus} GPUs ...") as status:
            plan = make_plan(data, sources, gpus, gpus_per_node, redundant, name, expert_groups, time_limit, seed,
                             backend, threads, params, holdout, cur, cost,
                             progress=lambda m: status.update(f"{name}: {m}"), memory_budget=memory_budget,
                             expert_bytes=expert_bytes, model_config=model_config, bandwidths=bandwidths,
                             resamples=resamples, work_limit=work_limit, executor=ex, phase=phase)
        if hw is not None:
            plan.provenance["hardware"] = hw.record()
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
