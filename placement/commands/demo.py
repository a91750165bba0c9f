"""moeplace demo: bundled real trace -> plans with every solver -> held-out evaluation, side by side."""

from __future__ import annotations

from pathlib import Path

import typer

from placement.cli_common import err, out, print_json, user_errors

DEMO_TIME_LIMIT = 20.0


def run_demo(out_dir: Path, gpus: int = 8, gpus_per_node: int = 8, time_limit: float = DEMO_TIME_LIMIT,
             seed: int = 0, solvers: list[str] | None = None, progress=None) -> dict:
    """Fit every solver on half the bundled sequences, evaluate on the other half; write plans and an export."""
    from placement.evaluate import evaluate, prepare
    from placement.export import sglang
    from placement.plan import Plan, provenance_of
    from placement.problem import build_problem
    from solvers import Options, Topology, names, solve
    from traces import atomic_write_bytes, datasets

    say = progress or (lambda m: None)
    trace = datasets.load()
    fit, held = trace.split_by_sequence(0.5, seed=seed)
    topo = Topology.for_experts(trace.num_experts, gpus, 0, gpus_per_node)
    problem = build_problem(fit, topo)
    ev_held, ev_fit = prepare(held), prepare(fit)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = solvers or names()
    results = {}
    for name in chosen:
        say(f"planning with {name} ...")
        res = solve(name, problem, Options(time_limit=time_limit, seed=seed, threads=2))
        plan = Plan.from_result(res, trace.num_experts, topo, trace.moe_layer_index, trace.decoder_layers, trace.model,
                                options={"time_limit": time_limit, "seed": seed},
                                provenance=provenance_of([datasets.DEFAULT], fit.num_tokens, fit.num_sequences,
                                                         {"holdout": 0.5, "split_seed": seed}))
        plan.predicted = evaluate(plan, ev_fit)["overall"]
        plan.heldout = evaluate(plan, ev_held)["overall"]
        plan.save(out_dir / f"plan-{name}.json")
        results[name] = plan
    best = "joint" if "joint" in results else chosen[0]
    text, _ = sglang.export(results[best])
    atomic_write_bytes(out_dir / f"sglang-{best}.json", lambda f: f.write(text.encode()))
    return {"trace": {"tokens": trace.num_tokens, "fit_tokens": fit.num_tokens, "heldout_tokens": held.num_tokens,
                      "sequences": trace.num_sequences},
            "gpus": gpus, "plans": results, "out_dir": str(out_dir)}


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @user_errors
    def demo_cmd(
        out_dir: Path = typer.Option(Path("moeplace-demo"), "--out", "-o", help="Folder for plans and exports."),
        gpus: int = typer.Option(8, "--gpus", "-g", help="GPUs."),
        gpus_per_node: int = typer.Option(8, "--gpus-per-node", help="GPUs per node."),
        time_limit: float = typer.Option(DEMO_TIME_LIMIT, "--time-limit", help="Seconds per solver."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ):
        """Run the whole pipeline on the bundled real DeepSeek-V2-Lite trace: fit on half the sequences, plan with
        every solver, evaluate on the other half, write plans and an SGLang export."""
        from placement.commands.evaluate import metrics_table

        with err.status("moeplace demo ...") as status:
            res = run_demo(out_dir, gpus, gpus_per_node, time_limit, progress=status.update)
        if as_json:
            print_json({k: v.heldout for k, v in res["plans"].items()})
            return
        t = res["trace"]
        out.print(f"bundled DeepSeek-V2-Lite ESFT trace: {t['tokens']} tokens in {t['sequences']} sequences; fitted on "
                  f"{t['fit_tokens']} tokens, evaluated on the other {t['heldout_tokens']} (held-out sequences), "
                  f"{gpus} GPUs")
        cols = {k: v.heldout for k, v in res["plans"].items()}
        out.print(metrics_table(cols, title="held-out metrics (ratio to contiguous)",
                                ratios_to="contiguous" if "contiguous" in cols else None))
        secs = ", ".join(f"{k} {v.solver['seconds']:.1f}s" for k, v in res["plans"].items())
        out.print(f"solve times: {secs}")
        out.print(f"plans and SGLang export written to {res['out_dir']}/")
