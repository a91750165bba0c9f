"""Online rebalancing replayed on the bundled drift scenarios: every policy side by side in one run, plus the time
each policy takes per rebalance on one core at ESFT and DeepSeek-V3 size.

    PYTHONPATH=. python benchmarks/online_replay.py [--scale 256] [--window 2000] [--interval 2000] \
        [--max-moves 200] [--joint-time-limit 60] [--skip-v3]

For every scenario of traces/drift.py (held-out ESFT sequences; the counts scenario in rows of 500 tokens) and the
same window and interval for all: EPLB re-fitted at every rebalance (as vLLM and SGLang run it, and its
hierarchical variant), the first window's EPLB map kept (static), moeplace's online policy, and the joint planner
fitted once on the other halves of the sequences (a fixed plan, never moved). Targets checked per scenario: moeplace's
mean next-interval imbalance no worse than the better EPLB policy's, at most 20% of its copies moved, and a lower
estimated MoE + migration time. Then the policy's CPU seconds per rebalance pinned to one core (median and max over
the rebalances; process CPU time, since wall time on a shared machine includes other work), at ESFT size (26 x 64, 8 GPUs + 8 redundant) and at DeepSeek-V3 size (58 x 256, 64 GPUs in 8 nodes, 64
redundant, 8 expert groups kept on nodes; windows of the calibrated synthetic generator, traces.synthetic), next to
EPLB's own time there.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from placement.replay import ReplaySetup, make_policy, replay
from solvers import Topology
from solvers.cost import CostModel
from traces import drift
from traces.format import layer_counts


def joint_plan(topo: Topology, seconds: float) -> np.ndarray:
    from placement.problem import build_problem
    from solvers import Options
    from solvers.registry import solve

    problem = build_problem(drift.fit_trace(), topo)
    return solve("joint", problem, Options(time_limit=seconds, seed=0, threads=1)).phy2log


def one_core() -> None:
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    except (AttributeError, OSError):
        pass


def policy_seconds(windows: np.ndarray, S: int, groups: int, nodes: int, G: int, cost: CostModel,
                   **options) -> tuple[list[float], list[float], list[float]]:
    """CPU seconds per rebalance of moeplace's policy and of EPLB on consecutive windows (EPLB's map of the first
    window in service first), and the policy's wall seconds (which other work on a shared machine inflates)."""
    from placement.online import OnlinePolicy
    from solvers.eplb import rebalance_experts

    pol = OnlinePolicy(cost=cost, **options)
    cur = rebalance_experts(windows[0], S, groups, nodes, G)[0]
    pol(windows[0], S, groups, nodes, G, cur)  # imports and caches warm
    ours, eplb, wall = [], [], []
    for w in windows[1:]:
        t0, c0 = time.perf_counter(), time.process_time()
        cur = pol(w, S, groups, nodes, G, cur)
        ours.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
        c0 = time.process_time()
        rebalance_experts(w, S, groups, nodes, G)
        eplb.append(time.process_time() - c0)
    return ours, eplb, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=256.0, help="served tokens per trace token (see placement.replay)")
    ap.add_argument("--window", type=int, default=2000)
    ap.add_argument("--interval", type=int, default=2000)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--redundant", type=int, default=8)
    ap.add_argument("--max-moves", type=int, default=None, help="moeplace: most copies moved per rebalance")
    ap.add_argument("--move-budget", type=float, default=None, help="moeplace: copies per rebalance on average")
    ap.add_argument("--history", type=int, default=None)
    ap.add_argument("--joint-time-limit", type=float, default=60.0)
    ap.add_argument("--scenarios", nargs="*", default=list(drift.SCENARIOS))
    ap.add_argument("--skip-v3", action="store_true", help="skip the DeepSeek-V3-size timing")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; numpy {np.__version__}")
    topo = Topology.for_experts(64, args.gpus, args.redundant)
    cost = CostModel()
    opts = {k: v for k, v in (("max_moves", args.max_moves), ("move_budget", args.move_budget),
                              ("history", args.history)) if v is not None}
    t0 = time.perf_counter()
    fixed = joint_plan(topo, args.joint_time_limit)
    print(f"joint plan fitted once on the fit halves in {time.perf_counter() - t0:.0f} s")
    held = {}
    for name in args.scenarios:
        data = drift.scenario(name)
        rows = name == "counts"
        W = args.window // drift.COUNTS_ROW_TOKENS if rows else args.window
        I = args.interval // drift.COUNTS_ROW_TOKENS if rows else args.interval
        setup = ReplaySetup(topo, W, I, cost=cost, scale=args.scale)
        policies = {n: make_policy(n, setup, **(opts if n == "moeplace" else {}))
                    for n in ("eplb", "eplb-hierarchical", "static", "moeplace")}
        policies["joint (fixed)"] = fixed
        res = replay(data, policies, setup)
        held[name] = res
        o = {n: p["overall"] for n, p in res["policies"].items()}
        ref = min(("eplb", "eplb-hierarchical"), key=lambda n: o[n]["load_imbalance"])
        print(f"\n## {drift.PREFIX}:{name} ({res['setup']['length']} {res['setup']['unit']}, "
              f"{res['setup']['rebalances']} rebalances, window {W}, interval {I}, scale {args.scale:g})")
        print("| policy | imbalance (mean) | worst layer | copies moved | vs EPLB | MoE + migration s | vs EPLB "
              "| migration s | policy s (max) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for n, v in o.items():
            print(f"| {n} | {v['load_imbalance']:.4f} | {v['load_imbalance_max']:.3f} | {v['moved_copies']} | "
                  f"{v['moved_copies'] / max(o[ref]['moved_copies'], 1):.3f} | {v['est_total_seconds']:.4f} | "
                  f"{v['est_total_seconds'] / o[ref]['est_total_seconds']:.4f} | {v['migration_seconds']:.4f} | "
                  f"{v['policy_seconds_max']:.3f} |")
        m = o["moeplace"]
        checks = {"imbalance <= EPLB": m["load_imbalance"] <= o[ref]["load_imbalance"],
                  "moves <= 20% of EPLB": m["moved_copies"] <= 0.2 * o[ref]["moved_copies"],
                  "MoE + migration < EPLB": m["est_total_seconds"] < o[ref]["est_total_seconds"]}
        print("targets (vs " + ref + "): " + ", ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in checks.items())
              + f" (imbalance ratio {m['load_imbalance'] / o[ref]['load_imbalance']:.4f}, moves ratio "
              f"{m['moved_copies'] / max(o[ref]['moved_copies'], 1):.3f}, time ratio "
              f"{m['est_total_seconds'] / o[ref]['est_total_seconds']:.4f})")

    one_core()
    print(f"\n## CPU seconds per rebalance, pinned to one core (load average {os.getloadavg()[0]:.1f})")
    print("| size | windows | moeplace median | moeplace max | moeplace wall max | EPLB median |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    sc = drift.scenario("phases")
    win = np.stack([layer_counts(sc.expert_ids[i:i + args.window], 64).astype(float)
                    for i in range(0, sc.num_tokens - args.window + 1, args.window)])
    ours, eplb, wall = policy_seconds(win, topo.num_slots, 1, 1, topo.num_gpus, cost,
                                      horizon=args.scale * args.interval / args.window, **opts)
    print(f"| ESFT: 26 x 64, {args.gpus} GPUs + {args.redundant} | {len(ours)} of {args.window} tokens | "
          f"{np.median(ours):.3f} | {max(ours):.3f} | {max(wall):.3f} | {np.median(eplb):.3f} |")
    if not args.skip_v3:
        from traces import synthetic

        n, size = 6, 4000
        tr = synthetic.deepseek_v3(n * size, seed=0)
        win = np.stack([layer_counts(tr.expert_ids[i * size:(i + 1) * size], 256).astype(float) for i in range(n)])
        v3 = dict(opts)
        if "max_moves" in v3:  # the same share of the slots as at ESFT size
            v3["max_moves"] = int(round(v3["max_moves"] * (58 * 320) / (26 * topo.num_slots)))
        ours, eplb, wall = policy_seconds(win, 320, 8, 8, 64, CostModel.preset("deepseek-v3"),
                                          horizon=args.scale * args.interval / args.window, **v3)
        print(f"| DeepSeek-V3: 58 x 256, 64 GPUs in 8 nodes + 64 | {len(ours)} of {size} tokens (synthetic) | "
              f"{np.median(ours):.3f} | {max(ours):.3f} | {max(wall):.3f} | {np.median(eplb):.3f} |")


if __name__ == "__main__":
    main()
