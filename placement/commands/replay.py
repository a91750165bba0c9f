"""moeplace replay: online rebalancing policies replayed on a stream, each map judged on the traffic that follows."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from placement.cli_common import (RayAddressOption, UserError, WorkersOption, err, executor_for, fmt, out, print_json,
                                  progress, user_errors)
from placement.commands.plan import (FlopsOption, HardwareOption, InterBandwidthOption, IntermediateOption,
                                     IntraBandwidthOption, ModelOption)


def load_stream(paths: list[str]):
    """Token traces (concatenated in order) or count files (rows stacked in order), files, bundled datasets or
    drift scenarios (``esft-drift:NAME``); returns the stream and its sources."""
    from placement.cli_common import load_data
    from traces import LoadProfile, RoutingTrace, drift

    items = []
    for p in paths:
        if drift.is_scenario(p) and not Path(p).exists():
            items.append(drift.scenario(p))
        else:
            items.append(load_data([p])[0])
    tokens = [i for i in items if isinstance(i, RoutingTrace)]
    if tokens and len(tokens) != len(items):
        raise UserError("give token traces or count files, not both: a stream is one or the other")
    if tokens:
        return (RoutingTrace.concat(tokens) if len(tokens) > 1 else tokens[0]), paths
    return (LoadProfile.concat(items) if len(items) > 1 else items[0]), paths


def replay_table(result: dict, title: str | None = None):
    """A rich table: one row per metric, one column per policy; copies moved and total time also as ratios to the
    EPLB policy with the lower imbalance, where one was replayed. Returns the table and that policy's name."""
    from rich.table import Table

    from placement.replay import COLUMNS, summary_rows

    rows = summary_rows(result)
    eplb = [(n, o) for n, o in rows if n.startswith("eplb")]
    ref = min(eplb, key=lambda x: x[1]["load_imbalance"]) if eplb else None
    table = Table(title=title)
    table.add_column("metric")
    for name, o in rows:
        table.add_column(name + (" (fixed)" if o["fixed"] else ""), justify="right")
    for key, label in COLUMNS:
        cells = []
        for _, o in rows:
            v = o[key]
            text = f"{v:.4g}" if isinstance(v, float) and (abs(v) >= 1e4 or 0 < abs(v) < 1e-3) else fmt(v, 4)
            if ref is not None and key in ("moved_copies", "est_total_seconds") and ref[1][key]:
                text += f" ({v / ref[1][key]:.2f}x)"
            cells.append(text)
        table.add_row(label, *cells)
    return table, (ref[0] if ref else None)


def register(app: typer.Typer) -> None:
    @app.command("replay")
    @user_errors
    def replay_cmd(
        traces: list[str] = typer.Argument(..., help="The stream, in order: token traces (.npz), count windows "
                                           "([N, L, E] files) or bundled names (esft-drift:phases, esft-drift:mix-0.1, "
                                           "esft-drift:mix-0.3, esft-drift:shuffled, esft-drift:counts)."),
        gpus: int = typer.Option(..., "--gpus", "-g", help="GPUs (EP size)."),
        gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help="GPUs per node (default: all in one, "
                                                    "or the --hardware profile's when --gpus fills whole nodes)."),
        redundant: int = typer.Option(0, "--redundant", "-r", help="Redundant expert slots in total (EP-wide)."),
        expert_groups: int = typer.Option(1, "--expert-groups", help="Expert groups (DeepSeek-V3: 8), for EPLB's "
                                          "hierarchical policy and for keeping groups on nodes."),
        window: int = typer.Option(..., "--window", "-w", help="Counts each rebalance sees: the last W tokens (count "
                                   "windows: rows)."),
        interval: int = typer.Option(..., "--interval", "-i", help="Tokens (count windows: rows) between rebalances; "
                                     "each map is judged on the interval after it."),
        policy: Optional[list[str]] = typer.Option(None, "--policy", "-p", help="eplb (as the stacks run it), "
                                                   "eplb-global, eplb-hierarchical, static (keep the first map) or "
                                                   "moeplace (repeatable; default: eplb, static, moeplace)."),
        plan: Optional[list[Path]] = typer.Option(None, "--plan", help="A fixed plan to replay next to the policies "
                                                  "(installed at start-up, never moved; repeatable)."),
        initial: str = typer.Option("eplb", "--initial", help="Placement in service before the first rebalance: eplb "
                                    "(fitted on the first window), identity (slot s holds expert s mod E, as vLLM "
                                    "starts) or a plan file."),
        scale: float = typer.Option(1.0, "--scale", help="Served tokens each stream token stands for (a trace is a "
                                    "sample of the traffic): MoE time grows with it, migration does not."),
        max_moves: Optional[int] = typer.Option(None, "--max-moves", help="moeplace: most expert copies moved per "
                                                "rebalance."),
        move_budget: Optional[float] = typer.Option(None, "--move-budget", help="moeplace: copies moved per rebalance "
                                                    "on average (unused budget is saved for a later rebalance)."),
        move_cost: Optional[float] = typer.Option(None, "--move-cost", help="moeplace: seconds per moved copy (default: "
                                                  "one expert's weights over the intra-node link; 0: free)."),
        history: Optional[int] = typer.Option(None, "--history", help="moeplace: windows kept as profiles (default 4)."),
        model: ModelOption = None,
        expert_intermediate_size: IntermediateOption = None,
        gpu_flops: FlopsOption = None,
        intra_bw: IntraBandwidthOption = None,
        inter_bw: InterBandwidthOption = None,
        hardware: HardwareOption = None,
        workers: WorkersOption = None,
        ray_address: RayAddressOption = None,
        plot: Optional[Path] = typer.Option(None, "--plot", help="Write the replay over time as a PNG (needs "
                                            "matplotlib: the plot extra)."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output: every rebalance of every policy."),
    ):
        """Replay online rebalancing as the serving stacks run it: before each rebalance a policy sees only the
        counts of the last window, and its map is judged on the traffic until the next rebalance. Prints load
        imbalance, expert copies moved and their migration time, estimated MoE time and each policy's own time."""
        from placement.commands.plan import cost_model, link_bandwidths, load_hardware
        from placement.hardware import gpus_per_node as hardware_gpus_per_node
        from placement.plan import Plan
        from placement.replay import POLICIES, PolicySpec, ReplaySetup, make_policy, plot_replay, replay
        from solvers import Topology

        names = list(policy or ["eplb", "static", "moeplace"])
        for n in names:
            if n not in POLICIES:
                raise UserError(f"--policy {n!r} is not one of {', '.join(POLICIES)}")
        if len(set(names)) != len(names):
            raise UserError("a policy is named twice; name each --policy once")
        if plot is not None:
            from placement import plots
            from traces.format import check_output_path

            if not plots.available():
                raise UserError(plots.PLOT_EXTRA_HINT)
            check_output_path(plot)
        for flag, v in (("--window", window), ("--interval", interval)):
            if v < 1:
                raise UserError(f"{flag} must be at least 1, got {v}")
        data, sources = load_stream(traces)
        hw = load_hardware(hardware)
        cost = cost_model(model=model, expert_intermediate_size=expert_intermediate_size, gpu_flops=gpu_flops,
                          hardware=hw)
        bw = {k: v for k, v in zip(("intra_node_bandwidth", "inter_node_bandwidth"),
                                   link_bandwidths(intra_bw, inter_bw, hw)) if v is not None}
        gpus_per_node = hardware_gpus_per_node(hw, gpus, gpus_per_node)
        topo = Topology.for_experts(data.num_experts, gpus, redundant, gpus_per_node, **bw)
        def fitting(path) -> Plan:
            pl = Plan.load(path)
            pl.check_fits(data.num_layers, data.num_experts, source=", ".join(sources))
            if (pl.topology.num_gpus, pl.num_slots) != (topo.num_gpus, topo.num_slots):
                raise UserError(f"{path} is a plan for {pl.topology.num_gpus} GPUs and {pl.num_slots} slots, but this "
                                f"replay has {topo.num_gpus} GPUs and {topo.num_slots} slots; match --gpus and "
                                f"--redundant to the plan")
            if pl.memory is not None:
                raise UserError(f"{path} has a memory budget (empty slots); online rebalancing keeps every expert "
                                f"resident")
            return pl

        init: object = initial
        fixed = {}
        for p in plan or []:
            pl = fitting(p)
            fixed[f"{pl.name} ({p.name})"] = pl.phy2log
        if initial not in ("eplb", "identity"):
            init = fitting(initial).phy2log
        setup = ReplaySetup(topo, window, interval, expert_groups, cost, scale, init)
        opts = {k: v for k, v in (("max_moves", max_moves), ("move_cost", move_cost), ("history", history),
                                  ("move_budget", move_budget)) if v is not None}
        if opts and "moeplace" not in names:
            raise UserError("--max-moves, --move-budget, --move-cost and --history are moeplace options; add "
                            "--policy moeplace or drop them")
        from placement.replay import check_setup

        check_setup(data, setup)
        policies = {}
        for n in names:
            o = opts if n == "moeplace" else {}
            make_policy(n, setup, **o)  # bad options fail here, in one sentence, before any work
            policies[n] = PolicySpec(n, o)
        policies.update(fixed)
        with progress("replaying") as status, executor_for(workers, ray_address) as ex:
            result = replay(data, policies, setup, progress=status.update, executor=ex)
        result["setup"]["sources"] = sources
        if plot is not None:
            plot_replay(result, plot)
            err.print(f"wrote {plot}", markup=False, highlight=False)
        if as_json:
            print_json(result)
            return
        s = result["setup"]
        out.print(f"replayed {', '.join(sources)}: {s['length']} {s['unit']}, {s['rebalances']} rebalances (window "
                  f"{s['window']}, interval {s['interval']}), {gpus} GPUs, {s['slots']} slots, scale {fmt(scale, 3)}",
                  markup=False, highlight=False)
        table, ref = replay_table(result)
        out.print(table)
        if ref:
            out.print(f"ratios (x) are to {ref}, the EPLB policy with the lower imbalance", markup=False,
                      highlight=False)
