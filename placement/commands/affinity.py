"""moeplace affinity: the affinity model of traces (load, transitions, mutual information, concentration)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from placement.cli_common import (RayAddressOption, UserError, WorkersOption, executor_for, fmt, out, print_json,
                                  user_errors)


def register(app: typer.Typer) -> None:
    @app.command("affinity")
    @user_errors
    def affinity_cmd(
        trace: Optional[list[str]] = typer.Argument(None, help="Token traces: files, folders of shards or glob "
                                                    "patterns (default: the bundled trace)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the token-shuffled baseline."),
        plots: Optional[Path] = typer.Option(None, "--plots", help="Also write PNG plots (conditional heatmaps, mutual "
                                             "information vs shuffled, expert load) into this folder."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
        workers: WorkersOption = None,
        ray_address: RayAddressOption = None,
    ):
        """Summarise inter-layer affinity: mutual information vs a token-shuffled baseline, concentration, skew.

        The trace is streamed shard by shard (one task per file, in parallel; memory: the statistics plus one chunk
        per worker), so traces larger than memory work; the shuffled baseline shuffles tokens within chunks."""
        from rich.table import Table

        from placement.cli_common import require, trace_files
        from placement.reduce import reduce_stats
        from traces import TraceError

        if plots is not None:
            require("matplotlib", "--plots")
        files = trace_files(trace)
        with executor_for(workers, ray_address) as ex:
            try:
                stats = reduce_stats(files, ex, seed=seed)
            except TraceError as exc:
                if "no token trace" in str(exc):
                    raise UserError("affinity needs token traces (expert_ids); counts-only files have no "
                                    "transitions") from None
                raise
        summary = stats.summary()
        summary["sources"] = [str(f) for f in files]
        if plots is not None:
            from placement import plots as P

            summary["plots"] = [str(p) for p in P.write_affinity_plots(stats, plots)]
        if as_json:
            print_json(summary)
            return
        o = summary["overall"]
        out.print(f"{o['tokens']} tokens, {o['layers']} MoE layers, {o['experts']} experts: mean mutual information "
                  f"{o['mutual_information_mean']:.3f} nats vs {o['mutual_information_shuffled_mean']:.3f} shuffled; "
                  f"hottest 10% of experts take {o['hot10_share_mean']:.1%} of the load")
        t = Table(title="adjacent-layer affinity")
        for c in ("boundary", "MI (nats)", "MI shuffled", "cond. entropy", "top-1 P(next|e)", "successors for 50%"):
            t.add_column(c, justify="right")
        for b in summary["per_boundary"]:
            t.add_row(f"{b['from_moe_layer']}->{b['to_moe_layer']}", fmt(b["mutual_information"], 3),
                      fmt(b["mutual_information_shuffled"], 3), fmt(b["conditional_entropy"], 3),
                      fmt(b["top1_conditional"], 3), fmt(b["successors_for_half"], 1))
        out.print(t)
        if plots is not None:
            out.print(f"wrote {len(summary['plots'])} plots to {plots}/", markup=False)
