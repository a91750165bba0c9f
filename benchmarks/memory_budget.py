"""Memory-budget benchmark (issue 5): hit rate and host->GPU bytes per budget, moeplace vs baselines.

Fits on half the sequences of the bundled DeepSeek-V2-Lite ESFT trace (seed 0) and replays every policy on
the other half, token by token, at the same GPU memory per GPU:

- moeplace: the ``budget`` solver (resident set + LRU swap buffer; split and residents chosen on the fit half);
- moeplace-dyn: the same solver planning for SwapMoE-style re-picking of the resident set every 64 tokens;
- top-frequency: per layer the most frequent experts (an equal share per layer) + a buffer of top_k slots;
- top-frequency-dyn: that set re-picked every 64 tokens from the last 256 (SwapMoE's virtual experts);
- LRU-only: no resident set, the whole budget is an LRU buffer.

Optionally (``--prefetch-study``) the inter-layer prefetch policy on top of moeplace's plan.

Usage::

    PYTHONPATH=. python benchmarks/memory_budget.py --gpus 1 --budgets 10%,25%,50%,75%,90% [--markdown]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--budgets", default="10%,25%,50%,75%,90%")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--search-tokens", type=int, default=4096)
    ap.add_argument("--pcie", type=float, default=50e9, help="host->GPU bytes/s per GPU")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables for docs/benchmarks.md")
    ap.add_argument("--prefetch-study", action="store_true", help="also replay moeplace with inter-layer prefetch")
    args = ap.parse_args()

    from placement.budget import parse_budget, sweep
    from placement.memory_eval import default_expert_bytes
    from traces import datasets

    trace = datasets.load()
    fit, held = trace.split_by_sequence(0.5, seed=args.seed)
    eb = default_expert_bytes()
    specs = [b.strip() for b in args.budgets.split(",")]
    t0 = time.perf_counter()
    rows = sweep(fit, held, args.gpus, specs, eb, args.pcie, seed=args.seed, search_tokens=args.search_tokens)
    secs = time.perf_counter() - t0
    names = ["ours", "ours-dynamic", "top-frequency", "top-frequency-dynamic", "lru-only"]
    short = {"ours": "moeplace", "ours-dynamic": "moeplace-dyn", "top-frequency": "top-frequency",
             "top-frequency-dynamic": "top-freq-dyn", "lru-only": "LRU-only"}
    by = {(r["budget"], r["policy"]): r for r in rows}
    print(f"# bundled DeepSeek-V2-Lite ESFT trace: fit {fit.num_tokens} tokens ({fit.num_sequences} sequences), "
          f"replayed on {held.num_tokens} held-out tokens; {args.gpus} GPU(s); expert {eb / 1e6:.1f} MB; "
          f"PCIe {args.pcie / 1e9:.0f} GB/s; sweep {secs:.0f}s on {platform.processor() or platform.machine()}")
    head = "| budget (slots/GPU) | " + " | ".join(short[n] for n in names) + " |"
    sep = "|---|" + "---:|" * len(names)
    for metric, label, fmt in (("hit_rate", "hit rate in GPU memory (higher is better)", "{:.3f}"),
                               ("fetch_bytes_per_token", "host->GPU MB per token (lower is better)", "{:.0f}"),
                               ("est_fetch_ms_per_token", "estimated PCIe stall, ms per token", "{:.1f}")):
        print(f"\n{label}\n" if args.markdown else f"\n== {label}")
        print(head)
        print(sep)
        for spec in specs:
            b = parse_budget(spec, fit.num_layers, fit.num_experts, args.gpus)
            cells = []
            for n in names:
                r = by.get((spec, n)) or by.get((spec, "all-resident"))
                v = r[metric] * (1e-6 if metric == "fetch_bytes_per_token" else 1)
                cells.append(fmt.format(v))
            print(f"| {spec} ({b.slots_per_gpu}) | " + " | ".join(cells) + " |")
    print("\nsplit chosen by moeplace (resident experts / buffer slots per GPU):")
    for spec in specs:
        r, d = by.get((spec, "ours")), by.get((spec, "ours-dynamic"))
        if r:
            print(f"  {spec}: static {r['resident_experts']} / {r['swap_slots_per_gpu']}, "
                  f"dynamic {d['resident_experts']} / {d['swap_slots_per_gpu']}")
    if args.prefetch_study:
        prefetch_study(fit, held, args, specs, eb)


def prefetch_study(fit, held, args, specs, eb) -> None:
    """moeplace's static plan replayed with top-n inter-layer prefetch, for a few compute overlaps per layer."""
    from placement.affinity import AffinityStats
    from placement.budget import parse_budget
    from placement.memory_eval import policy_metrics
    from placement.problem import build_problem
    from solvers import Options, solve
    from solvers.memsim import access_stream

    stats = AffinityStats.from_trace(fit)
    hs = held.sorted_by_gate()
    stream = access_stream(hs.expert_ids, fit.num_experts)
    print("\nprefetch study (moeplace static plan; prefetch n experts per layer predicted from the previous layer)")
    print("| budget | prefetch n | overlap per layer (us) | hit rate | MB/token | est. ms/token |")
    print("|---|---:|---:|---:|---:|---:|")
    for spec in specs:
        b = parse_budget(spec, fit.num_layers, fit.num_experts, args.gpus)
        if b.holds_model:
            continue
        problem = build_problem(fit, b.topology(), budget_slots=b.total_slots, stats=stats)
        res = solve("budget", problem, Options(seed=args.seed, params={"search_tokens": args.search_tokens}))
        mem = res.stats["memory"]
        resident = np.zeros((fit.num_layers, fit.num_experts), dtype=bool)
        for l, ex in enumerate(mem["resident"]):
            resident[l, ex] = True
        for n in (0, 1, 2):
            for overlap in ((0.0,) if n == 0 else (0.0, 100e-6, 350e-6)):
                s = policy_metrics(None, fit.num_experts, resident, np.asarray(mem["owner"]), args.gpus,
                                   mem["swap_slots_per_gpu"], eb, args.pcie, prefetch=n, transitions=stats.transitions,
                                   prefetch_overlap_s=overlap, stream=stream)
                print(f"| {spec} | {n} | {overlap * 1e6:.0f} | {s['hit_rate']:.3f} | "
                      f"{s['fetch_bytes_per_token'] / 1e6:.0f} | {s['est_fetch_ms_per_token']:.1f} |")


if __name__ == "__main__":
    main()
