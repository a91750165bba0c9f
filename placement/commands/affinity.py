"""moeplace affinity: the affinity model of traces (load, transitions, mutual information, concentration)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from placement.cli_common import UserError, fmt, out, print_json, user_errors


def register(app: typer.Typer) -> None:
    @app.command("affinity")
    @user_errors
    def affinity_cmd(
        trace: Optional[list[str]] = typer.Argument(None, help="Token traces (default: the bundled trace)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the token-shuffled baseline."),
        plots: Optional[Path] = typer.Option(None, "--plots", help="Also write PNG plots (conditional heatmaps, mutual "
                                             "information vs shuffled, expert load) into this folder."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ):
        """Summarise inter-layer affinity: mutual information vs a token-shuffled baseline, concentration, skew."""
        from rich.table import Table

        from placement.affinity import AffinityStats
        from placement.cli_common import load_data, require
        from traces import RoutingTrace

        if plots is not None:
            require("matplotlib", "--plots")
        data, sources = load_data(trace)
        if not isinstance(data, RoutingTrace):
            raise UserError("affinity needs token traces (expert_ids); counts-only files have no transitions")
        stats = AffinityStats.from_trace(data, seed=seed)
        summary = stats.summary()
        summary["sources"] = sources
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
