"""moeplace budget: sweep GPU memory budgets and show what each costs (the tunable-budget curve)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from placement.cli_common import MAX_GPUS, UserError, err, out, print_json, progress, user_errors

DEFAULT_BUDGETS = "10%,25%,50%,75%"

SHORT = {"ours": "moeplace", "ours-dynamic": "moeplace-dyn", "top-frequency": "topfreq",
         "top-frequency-dynamic": "topfreq-dyn", "lru-only": "lru-only", "all-resident": "all-resident"}
LABELS = {"ours": "moeplace (resident set + LRU buffer)", "ours-dynamic": "moeplace planned for re-picking every 64 tokens",
          "top-frequency": "per-layer top-frequency", "top-frequency-dynamic": "top-frequency re-picked (SwapMoE-style)",
          "lru-only": "LRU only (no resident set)", "all-resident": "every expert resident"}


def plot_curve(rows: list[dict], path: Path, title: str) -> None:
    """Hit rate, host->GPU bytes and estimated stall per token against memory per GPU, one line per policy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError('--plot needs matplotlib: pip install "moeplace[plot]"') from None
    from traces import atomic_write_bytes

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    policies = [p for p in dict.fromkeys(r["policy"] for r in rows) if p != "all-resident"]
    full = [r for r in rows if r["policy"] == "all-resident"]
    for p in policies:
        pts = sorted([r for r in rows if r["policy"] == p] + full, key=lambda r: r["share"])
        x = [100 * r["share"] for r in pts]
        for ax, key, scale in zip(axes, ("hit_rate", "fetch_bytes_per_token", "est_fetch_ms_per_token"), (1, 1e-6, 1)):
            ax.plot(x, [r[key] * scale for r in pts], marker="o", label=LABELS.get(p, p))
    for ax, label in zip(axes, ("hit rate in GPU memory", "host->GPU MB per token", "est. PCIe stall (ms/token)")):
        ax.set_xlabel("GPU memory budget (% of all routed experts)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))


def register(app: typer.Typer) -> None:
    @app.command("budget")
    @user_errors
    def budget_cmd(
        trace: Optional[list[str]] = typer.Argument(None, help="Token traces (.npz) or bundled dataset names; default: "
                                                   "the bundled DeepSeek-V2-Lite trace."),
        gpus: int = typer.Option(..., "--gpus", "-g", help=f"GPUs (EP size, at most {MAX_GPUS}; 1 = a single GPU)."),
        budgets: str = typer.Option(DEFAULT_BUDGETS, "--budgets", "-b", help="Comma-separated budgets per GPU: expert "
                                    "slots (416), shares of all experts (25%) or bytes (6GiB)."),
        holdout: float = typer.Option(0.5, "--holdout", help="Share of sequences held out: plans are fitted on the "
                                      "rest and replayed on these (0 = in-sample)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the hold-out split and the solver."),
        expert_bytes: Optional[str] = typer.Option(None, "--expert-bytes", help="Size of one expert (e.g. 17.3MB)."),
        model_config: Optional[Path] = typer.Option(None, "--model-config", help="The model's config.json, to derive "
                                                    "the expert size."),
        pcie: str = typer.Option("50GB", "--pcie-bandwidth", help="Host->GPU bytes per second per GPU (default 50GB: "
                                 "PCIe Gen5 x16 effective)."),
        batch: int = typer.Option(1, "--batch", help="Tokens per step (1 = one token at a time, as in decoding)."),
        prefetch: int = typer.Option(0, "--prefetch", help="Also prefetch this many experts per layer, predicted "
                                     "from the previous layer's experts (inter-layer affinity)."),
        overlap_us: float = typer.Option(0.0, "--prefetch-overlap-us", help="Microseconds of work per layer that a "
                                         "prefetch can hide behind."),
        search_tokens: int = typer.Option(4096, "--search-tokens", help="Fitted tokens simulated per candidate split "
                                          "of the budget into resident slots and buffer."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Write the curve to this PNG (needs matplotlib)."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ):
        """Sweep memory budgets: hit rate, host->GPU bytes and estimated PCIe stall per token against GPU memory,
        for moeplace's plan and the baselines (per-layer top-frequency, SwapMoE-style re-picking, LRU only)."""
        from rich.table import Table

        from placement.budget import monotone, parse_size, resolve_expert_bytes, sweep
        from placement.cli_common import load_data, require
        from placement.memory_eval import default_expert_bytes
        from traces import RoutingTrace

        if plot is not None:
            require("matplotlib", "--plot")
        if batch < 1 or prefetch < 0 or not 0 <= overlap_us < float("inf") or search_tokens < 1:
            raise UserError("--batch and --search-tokens must be >= 1, --prefetch and --prefetch-overlap-us >= 0")
        data, sources = load_data(trace)
        if not isinstance(data, RoutingTrace):
            raise UserError("the budget sweep replays token routing, so it needs token traces, not counts")
        if prefetch > data.num_experts:
            raise UserError(f"--prefetch {prefetch} is more than the {data.num_experts} experts of a layer; give at "
                            f"most {data.num_experts}")
        specs = [b.strip() for b in budgets.split(",") if b.strip()]
        if not specs:
            raise UserError("--budgets is empty; give e.g. 10%,25%,50%")
        eb = resolve_expert_bytes(expert_bytes, model_config, data.num_experts)
        if eb is None:
            eb = default_expert_bytes()
            err.print(f"note: expert size {eb / 1e6:.1f} MB assumed (DeepSeek-V2-Lite, bf16); give --expert-bytes "
                      f"or --model-config for another model", highlight=False)
        bandwidth = float(parse_size(pcie, "--pcie-bandwidth"))
        if holdout:
            fit, held = data.split_by_sequence(1.0 - holdout, seed=seed)
        else:
            fit = held = data
            err.print("note: --holdout 0 replays the plans on the tokens they were fitted on (in-sample)")
        with progress("sweeping budgets ...") as status:
            rows = sweep(fit, held, gpus, specs, eb, bandwidth, seed=seed, search_tokens=search_tokens, batch=batch,
                         prefetch=prefetch, prefetch_overlap_s=overlap_us * 1e-6, progress=status.update)
        ok = monotone(rows)
        title = (f"{held.num_tokens} {'held-out ' if holdout else ''}tokens, {gpus} GPU(s), expert "
                 f"{eb / 1e6:.1f} MB, PCIe {bandwidth / 1e9:.0f} GB/s, batch {batch}")
        if plot is not None:
            plot_curve(rows, plot, title)
        if as_json:
            print_json({"rows": rows, "expert_bytes": eb, "pcie_bandwidth": bandwidth, "gpus": gpus,
                        "fit_tokens": fit.num_tokens, "eval_tokens": held.num_tokens, "monotone": ok,
                        "plot": str(plot) if plot else None})
            return
        from rich import box

        table = Table(title=f"memory budget sweep ({title})", box=box.SIMPLE_HEAD, pad_edge=False,
                      collapse_padding=True)
        for col in ("budget", "slots", "GiB", "policy", "res.", "buf", "hit", "gate", "MB/tok", "ms/tok"):
            table.add_column(col, justify="left" if col in ("budget", "policy") else "right")
        last = None
        for r in rows:
            first = r["budget"] != last
            last = r["budget"]
            gate = r.get("gate_hit_rate")
            table.add_row(r["budget"] if first else "", str(r["slots_per_gpu"]) if first else "",
                          f"{r['slots_per_gpu'] * eb / 2 ** 30:.2f}" if first else "", SHORT.get(r["policy"], r["policy"]),
                          str(r.get("resident_experts", "all")), str(r.get("swap_slots_per_gpu", "-")),
                          f"{r['hit_rate']:.4f}", "-" if gate is None else f"{gate:.4f}",
                          f"{r['fetch_bytes_per_token'] / 1e6:.1f}", f"{r['est_fetch_ms_per_token']:.2f}",
                          end_section=False)
        out.print(table)
        out.print("policies: " + "; ".join(f"{SHORT[p]} = {LABELS[p]}" for p in dict.fromkeys(r["policy"] for r in rows))
                  + ". slots, GiB: budget per GPU; res.: experts resident in GPU memory (all GPUs); buf: LRU swap "
                  "slots per GPU; hit: share of token-expert activations found in GPU memory (gate: weighted by gate "
                  "weight); MB/tok: host->GPU copies per token; ms/tok: estimated PCIe stall per token.", markup=False)
        if not ok:
            out.print("note: moeplace's hit rate fell between two budgets on these held-out tokens (the split was chosen "
                      "on the fitted tokens); compare the neighbouring rows")
        if plot is not None:
            out.print(f"curve written to {plot}")
