"""Collector overhead: forward time of a small MoE model with and without moeplace's routing collector.

For each architecture a small randomly initialised model is built from its config (no download). One padded
batch is run repeatedly; runs with and without the collector alternate (A, B, A, B, ...) so that drift in the
machine's load hits both alike. "with collector" is a whole recorded pass: ``begin`` + forward with the router
hooks + ``end`` (gather of ids and weights, removal of padding, copy to host numpy arrays). Reported: median
seconds of each, and the median over pairs of (with / without - 1), in wall-clock time and in the process's CPU
time (on a CPU shared with other jobs the CPU time is the steadier of the two; on a GPU use wall time), and the
median time of the gather step ``end()`` alone.

    PYTHONPATH=. python benchmarks/collector_overhead.py [--reps 31] [--threads 1] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

ARCHS = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256, head_dim=64),
    "deepseek_v3": dict(n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=32,
                        qk_nope_head_dim=32, v_head_dim=64, n_group=4, topk_group=2, num_key_value_heads=8),
}


def build(model_type: str, hidden: int, layers: int, device: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    common = dict(vocab_size=4096, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=8,
                  num_key_value_heads=4, num_hidden_layers=layers, max_position_embeddings=2048)
    cfg = AutoConfig.for_model(model_type, **{**common, **ARCHS[model_type]})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to(device).eval()


def measure(model_type: str, batch: int, seq_len: int, reps: int, hidden: int, layers: int, device: str) -> dict:
    import torch

    from traces.collect import RoutingRecorder

    model = build(model_type, hidden, layers, device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 4000, (batch, seq_len), generator=g)
    lens = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=g)
    mask = (torch.arange(seq_len)[None, :] < lens[:, None]).long()  # right padding
    ids, mask = ids.to(device), mask.to(device)
    valid = mask.bool()
    recorder = RoutingRecorder(model)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def plain():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        sync()

    end_times = []

    def recorded():
        with torch.inference_mode():
            recorder.begin(valid)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            t = time.perf_counter()
            recorder.end()  # includes the device -> host copy, so no separate sync is needed
            end_times.append(time.perf_counter() - t)

    for _ in range(3):  # warm-up
        plain()
        with recorder:
            recorded()
    end_times.clear()
    times = {clock: ([], [], []) for clock in ("wall", "cpu")}
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    for _ in range(reps):
        t0 = {c: f() for c, f in clocks.items()}
        plain()
        t1 = {c: f() for c, f in clocks.items()}
        with recorder:  # hooks attached only for the recorded run
            t2 = {c: f() for c, f in clocks.items()}
            recorded()
            t3 = {c: f() for c, f in clocks.items()}
        for c, (p, r, q) in times.items():
            p.append(t1[c] - t0[c])
            r.append(t3[c] - t2[c])
            q.append((t3[c] - t2[c]) / (t1[c] - t0[c]) - 1.0)
    row = {"model": model_type, "moe_layers": len(recorder.sites), "experts": recorder.layout["num_experts"],
           "top_k": recorder.layout["top_k"], "tokens": int(valid.sum()), "batch": batch, "seq_len": seq_len,
           "reps": reps, "end_s": statistics.median(end_times)}
    for c, (p, r, q) in times.items():
        row.update({f"plain_{c}_s": statistics.median(p), f"collector_{c}_s": statistics.median(r),
                    f"overhead_{c}": statistics.median(q)})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default=",".join(ARCHS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    rows = [measure(m, args.batch, args.seq_len, args.reps, args.hidden, args.layers, args.device)
            for m in args.models.split(",")]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'cpu'}, " \
          f"{args.threads} thread(s)"
    print(f"device: {dev}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq_len} (right-padded); "
          f"median of {args.reps} alternating runs\n")
    print("| model | MoE layers | experts, top-k | tokens kept | forward (s) | forward + collector (s) | overhead "
          "| overhead, CPU time | gather `end()` (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['moe_layers']} | {r['experts']}, {r['top_k']} | {r['tokens']} | "
              f"{r['plain_wall_s']:.4f} | {r['collector_wall_s']:.4f} | {100 * r['overhead_wall']:+.1f}% | "
              f"{100 * r['overhead_cpu']:+.1f}% | {1000 * r['end_s']:.2f} |")


if __name__ == "__main__":
    main()
