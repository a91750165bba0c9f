"""moeplace plan-pd: the two plans of a prefill/decode-disaggregated deployment in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from placement.cli_common import (MAX_GPUS, RayAddressOption, UserError, WorkersOption, default_solver, err,
                                  executor_for, fmt, out, print_json, progress, user_errors)
from placement.commands.plan import (DEFAULT_TIME_LIMIT, PHASES, HardwareOption, ModelOption, cost_model, link_bandwidths,
                                     load_hardware)


def _row(name: str, metrics: dict) -> list[str]:
    return [name, fmt(metrics.get("load_imbalance"), 3), fmt(metrics.get("nvlink_bytes"), 0),
            fmt(metrics.get("rdma_bytes"), 0), fmt(metrics.get("est_moe_us_per_token"), 3)]


def register(app: typer.Typer) -> None:
    @app.command("plan-pd")
    @user_errors
    def plan_pd_cmd(
        trace: Optional[list[str]] = typer.Argument(None, help="Trace files, folders of shards or bundled dataset "
                                                   "names; a trace that records each token's phase gives each plan "
                                                   "its own tokens (default: the bundled trace)."),
        prefill_gpus: int = typer.Option(..., "--prefill-gpus", help=f"GPUs of the prefill cluster (EP size, at most "
                                         f"{MAX_GPUS})."),
        decode_gpus: int = typer.Option(..., "--decode-gpus", help="GPUs of the decode cluster."),
        gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help="GPUs per node in both clusters."),
        prefill_redundant: int = typer.Option(0, "--prefill-redundant", help="Redundant slots in the prefill cluster."),
        decode_redundant: int = typer.Option(0, "--decode-redundant", help="Redundant slots in the decode cluster."),
        solver: Optional[str] = typer.Option(None, "--solver", "-s", help="Solver for both plans (default: joint)."),
        baseline: str = typer.Option("eplb", "--baseline", help="Solver each plan is compared with ('' for none)."),
        expert_groups: int = typer.Option(1, "--expert-groups", help="Expert groups (DeepSeek-V3: 8)."),
        holdout: float = typer.Option(0.5, "--holdout", help="Share of sequences held out to judge both plans."),
        seed: int = typer.Option(0, "--seed", help="Random seed (solver and hold-out split)."),
        model: ModelOption = None,
        model_config: Optional[Path] = typer.Option(None, "--model-config", help="The model's config.json."),
        hardware: HardwareOption = None,
        time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Seconds per plan (default "
                                                   f"{DEFAULT_TIME_LIMIT:g})."),
        work_limit: Optional[int] = typer.Option(None, "--work-limit", help="Joint planner: deterministic work "
                                                 "instead of --time-limit (kicks per layer)."),
        workers: WorkersOption = None,
        ray_address: RayAddressOption = None,
        out_dir: Path = typer.Option(Path("pd-plans"), "--out", "-o", help="Folder for prefill-plan.json, "
                                     "decode-plan.json and pd-summary.md."),
        as_json: bool = typer.Option(False, "--json", help="Print both summaries as JSON."),
    ):
        """Plan a prefill/decode-disaggregated deployment: a prefill plan for DeepEP's normal kernels (16384 tokens
        per GPU) and a decode plan for its low-latency kernels (128 tokens per GPU, memory-bound experts), each on
        its own cluster size and, when the trace records phases, on its own tokens; both judged on held-out
        sequences next to the baseline."""
        from placement.cli_common import load_data
        from placement.commands.plan import make_plan
        from traces.format import atomic_write_bytes, check_output_path

        if work_limit is not None and time_limit is not None:
            raise UserError("give --work-limit (deterministic search) or --time-limit (wall clock), not both")
        if time_limit is None and work_limit is None:
            time_limit = DEFAULT_TIME_LIMIT
        name = solver or default_solver()
        if work_limit is not None and name != "joint":
            raise UserError(f"--work-limit is a joint-planner option and the solver is {name}; use --time-limit")
        for g, flag in ((prefill_gpus, "--prefill-gpus"), (decode_gpus, "--decode-gpus")):
            if not 1 <= g <= MAX_GPUS:
                raise UserError(f"{flag} must be between 1 and {MAX_GPUS}, got {g}")
        hw = load_hardware(hardware)
        bandwidths = link_bandwidths(None, None, hw)
        if gpus_per_node is None and hw is not None and hw.gpus_per_node:
            gpus_per_node = hw.gpus_per_node  # both clusters are whole nodes of the profile's size
        files = {ph: out_dir / f"{ph}-plan.json" for ph in PHASES}
        for f in [*files.values(), out_dir / "pd-summary.md"]:
            check_output_path(f)  # before any long work
        data, sources = load_data(trace)
        by_phase = getattr(data, "phase", None) is not None
        if not by_phase:
            err.print("note: the trace does not record each token's phase, so both plans are fitted on all tokens "
                      "(SGLang's per-token recorder records it)", markup=False)
        summary: dict = {}
        rows = []
        with executor_for(workers, ray_address) as ex:
            for phase, gpus, redundant in (("prefill", prefill_gpus, prefill_redundant),
                                           ("decode", decode_gpus, decode_redundant)):
                cost = cost_model(phase=phase, model=model, model_config=model_config, hardware=hw)
                solvers = [name] + ([baseline] if baseline and baseline != name else [])
                plans = {}
                for s in solvers:
                    with progress(f"{phase}: planning with {s} on {gpus} GPUs ...") as status:
                        plans[s] = make_plan(data, sources, gpus, gpus_per_node, redundant, s, expert_groups,
                                             time_limit if s != name or work_limit is None else None, seed,
                                             params={}, holdout=holdout, cost=cost,
                                             progress=lambda m, s=s: status.update(f"{phase} {s}: {m}"),
                                             work_limit=work_limit if s == name else None, executor=ex,
                                             phase=phase if by_phase else None, bandwidths=bandwidths)
                if hw is not None:
                    plans[name].provenance["hardware"] = hw.record()
                plans[name].save(files[phase])
                held = {s: (p.heldout or p.predicted) for s, p in plans.items()}
                entry = {"plan": str(files[phase]), "gpus": gpus, "redundant": redundant, "comm": cost.comm,
                         "tokens_per_gpu": cost.tokens_per_gpu, "solver": name, "metrics": held[name]}
                if baseline and baseline in held:
                    entry["baseline"] = {"solver": baseline, "metrics": held[baseline],
                                         "time_ratio": held[name]["est_moe_us_per_token"]
                                         / held[baseline]["est_moe_us_per_token"]}
                summary[phase] = entry
                rows += [[phase, *_row(s, held[s])] for s in solvers]
        header = ["phase", "plan", "imbalance", "NVLink B/token", "RDMA B/token", "est. us/token"]
        md = [f"# Prefill/decode plans ({', '.join(sources)})", "",
              f"Judged on held-out sequences (share {holdout:g}, seed {seed}); each phase under its own kernels "
              f"and batch (prefill: {PHASES['prefill']['comm']}, {PHASES['prefill']['tokens_per_gpu']} tokens per "
              f"GPU; decode: {PHASES['decode']['comm']}, {PHASES['decode']['tokens_per_gpu']}).", "",
              "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
        md += ["| " + " | ".join(r) + " |" for r in rows]
        atomic_write_bytes(out_dir / "pd-summary.md", lambda f: f.write(("\n".join(md) + "\n").encode()))
        if as_json:
            print_json(summary)
            return
        from rich.table import Table

        t = Table(title="prefill / decode plans, held-out")
        for h in header:
            t.add_column(h, justify="right" if h not in ("phase", "plan") else "left")
        for r in rows:
            t.add_row(*r)
        out.print(t)
        for phase, entry in summary.items():
            ratio = entry.get("baseline", {}).get("time_ratio")
            out.print(f"{phase}: wrote {entry['plan']} ({entry['gpus']} GPUs, {entry['comm']})"
                      + (f", {ratio:.3f}x the {baseline} plan's estimated time" if ratio else ""), markup=False)
