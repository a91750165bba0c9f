"""Measure the expert GEMM throughput behind the cost model's ``gpu_flops`` on a CUDA GPU.

    PYTHONPATH=. python benchmarks/expert_gemm.py                                  # V2-Lite and V3 experts, 8 per GPU
    PYTHONPATH=. python benchmarks/expert_gemm.py --models deepseek-v3 --local-experts 5 --json out.json

The cost model (``solvers/cost.py``) charges every token-expert assignment ``6 x hidden x intermediate`` FLOPs at
``gpu_flops`` FLOP/s. This script times what a GPU really takes for one MoE layer's local experts (SwiGLU: one
fused gate+up GEMM, SiLU x up, one down GEMM, bf16) at ``m`` tokens per expert, three ways:

- ``loop``: one expert after another (``torch.matmul``), what a simple engine does;
- ``bmm``: the local experts batched in one ``torch.bmm`` (equal loads; an upper bound for a grouped GEMM);
- ``grouped``: ``torch._grouped_mm`` where this PyTorch has it (the grouped GEMM MoE kernels use);
- ``moe``: the whole local expert step of a layer as an engine runs it after the dispatch: the arrived rows in
  arrival order with random expert ids, sorted by expert, gathered, the two grouped GEMMs, and the rows scaled by
  their gate weights and scattered back to arrival order.

Columns: microseconds for the layer's local experts, achieved TFLOP/s (``6 x hidden x intermediate x m x experts``
over the time) and, per implementation, a least-squares fit ``t = fixed + m / marginal`` over ``m >= --fit-from``:
the marginal TFLOP/s is what ``gpu_flops`` should be for that model on that GPU; the fixed microseconds per expert
(the intercept: launches, weight reads; negative where the rate drops at the largest sizes) are the same on every
GPU when every slot is active, so they do not change a plan.
Needs a CUDA GPU; prints one sentence and exits 2 without one.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from solvers.cost import PRESETS


def _ffn(kind: str, x, w13, w2, torch, offs=None, ids=None, gate=None):
    """One layer's local experts. ``x``: [E, m, H]; ``w13``: [E, H, 2I]; ``w2``: [E, I, H]; for ``moe``,
    ``ids``: [E*m] expert of each arrived row, ``gate``: [E*m, 1] its gate weight."""
    F = torch.nn.functional
    if kind == "moe":
        rows = x.reshape(-1, x.shape[-1])
        order = torch.argsort(ids)
        ends = torch.cumsum(torch.bincount(ids, minlength=w13.shape[0]), 0).to(torch.int32)
        gu = torch._grouped_mm(rows.index_select(0, order), w13, offs=ends)
        g, u = gu.chunk(2, dim=-1)
        y = torch._grouped_mm((F.silu(g) * u).contiguous(), w2, offs=ends)
        return torch.empty_like(rows).index_copy_(0, order, y * gate.index_select(0, order))
    if kind == "loop":
        out = []
        for e in range(x.shape[0]):
            gu = x[e] @ w13[e]
            g, u = gu.chunk(2, dim=-1)
            out.append((F.silu(g) * u) @ w2[e])
        return out
    if kind == "bmm":
        gu = torch.bmm(x, w13)
        g, u = gu.chunk(2, dim=-1)
        return torch.bmm(F.silu(g) * u, w2)
    # grouped: tokens of all experts in one [E*m, H] tensor, offsets mark each expert's rows
    flat = x.reshape(-1, x.shape[-1])
    gu = torch._grouped_mm(flat, w13, offs=offs)
    g, u = gu.chunk(2, dim=-1)
    return torch._grouped_mm((F.silu(g) * u).contiguous(), w2, offs=offs)


def _time(fn, torch, reps: int, trials: int) -> float:
    """Median over ``trials`` of the mean seconds of ``reps`` calls, after warm-up, timed with CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / 1e3 / reps)
    return float(np.median(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="deepseek-v2-lite,deepseek-v3",
                    help=f"comma-separated presets ({', '.join(sorted(PRESETS))})")
    ap.add_argument("--local-experts", type=int, default=8, help="experts per GPU in one layer")
    ap.add_argument("--tokens", type=int, nargs="*",
                    default=[16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384], help="tokens per expert")
    ap.add_argument("--fit-from", type=int, default=512, help="smallest tokens per expert in the linear fit")
    ap.add_argument("--impl", default="loop,bmm,grouped,moe")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("expert_gemm.py needs PyTorch with CUDA; install torch on a GPU machine.", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("expert_gemm.py needs a CUDA GPU; none is visible to PyTorch.", file=sys.stderr)
        return 2
    models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in PRESETS]
    if bad:
        print(f"unknown preset {bad[0]!r}; known: {', '.join(sorted(PRESETS))}.", file=sys.stderr)
        return 2
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    if not hasattr(torch, "_grouped_mm"):
        print("torch._grouped_mm is not in this PyTorch; skipping the grouped and moe rows.", file=sys.stderr)
        impls = [i for i in impls if i not in ("grouped", "moe")]
    torch.manual_seed(0)
    dev = torch.device("cuda")
    E = args.local_experts
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16, {E} local experts per layer")
    rows = []
    for name in models:
        H, I = PRESETS[name]["hidden_size"], PRESETS[name]["expert_intermediate_size"]
        w13 = torch.randn(E, H, 2 * I, device=dev, dtype=torch.bfloat16) / H ** 0.5
        w2 = torch.randn(E, I, H, device=dev, dtype=torch.bfloat16) / I ** 0.5
        flops_per_token = 6.0 * H * I
        print(f"\n## {name}: hidden {H}, intermediate {I}, {3 * H * I * 2 / 1e6:.1f} MB of weights per expert")
        print(f"{'tokens/expert':>13} " + " ".join(f"{i + ' us':>12} {i + ' TFLOP/s':>16}" for i in impls))
        per_impl: dict[str, list[tuple[int, float]]] = {i: [] for i in impls}
        for m in args.tokens:
            x = torch.randn(E, m, H, device=dev, dtype=torch.bfloat16)
            offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * m
            ids = torch.randint(0, E, (E * m,), device=dev)
            gate = torch.rand(E * m, 1, device=dev, dtype=torch.bfloat16)
            reps = max(3, min(200, int(2e5 / m)))
            cells = []
            for impl in impls:
                try:
                    t = _time(lambda: _ffn(impl, x, w13, w2, torch, offs, ids, gate), torch, reps, trials=5)
                except RuntimeError as exc:  # a shape or dtype this kernel does not take
                    print(f"{impl} failed at m={m}: {str(exc).splitlines()[0]}", file=sys.stderr)
                    cells.append(f"{'-':>12} {'-':>16}")
                    continue
                tflops = flops_per_token * m * E / t / 1e12
                per_impl[impl].append((m, t))
                rows.append({"model": name, "impl": impl, "tokens_per_expert": m, "local_experts": E,
                             "seconds": t, "tflops": tflops})
                cells.append(f"{t * 1e6:>12.1f} {tflops:>16.1f}")
            print(f"{m:>13} " + " ".join(cells))
            del x
        print(f"fit t = fixed + m x experts x {flops_per_token / 1e9:.3f} GFLOP / marginal, m >= {args.fit_from}:")
        for impl, pts in per_impl.items():
            pts = [(m, t) for m, t in pts if m >= args.fit_from]
            if len(pts) < 2:
                continue
            m_arr = np.array([p[0] for p in pts], dtype=float)
            t_arr = np.array([p[1] for p in pts])
            slope, fixed = np.polyfit(m_arr, t_arr, 1)
            marginal = flops_per_token * E / slope / 1e12
            print(f"  {impl:>8}: marginal {marginal:6.1f} TFLOP/s, fixed {fixed / E * 1e6:6.2f} us per expert")
            rows.append({"model": name, "impl": impl, "fit": True, "marginal_tflops": marginal,
                         "fixed_us_per_expert": fixed / E * 1e6})
        del w13, w2
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
