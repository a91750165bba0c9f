"""moeplace bench: replay a trace's routing through real expert-parallel MoE layers on torch.distributed and
report measured all-to-all bytes and layer times next to the evaluator's prediction, per plan."""

from __future__ import annotations

from typing import Optional

import typer

from placement.cli_common import UserError, err, out, print_json, user_errors


def _check_plans(plans, files, world_size: int, trace) -> None:
    from placement.runtime import check_runnable

    for path, plan in zip(files, plans):
        G = plan.topology.num_gpus
        if G != world_size:
            raise UserError(f"plan {path} is for {G} GPUs but the world size is {world_size}; make the plan with "
                            f"--gpus {world_size} or bench it with --world-size {G}")
        plan.check_fits(trace.num_layers, trace.num_experts, source=trace.source or "the trace")
        try:
            check_runnable(plan.phy2log, plan.num_experts, where=f"plan {path}")
        except ValueError as exc:
            raise UserError(str(exc)) from None


def predictions(plan, trace, hidden_size: int, dtype_bytes: int, dataflow: str, comm: str = "nccl",
                ll_nvlink: bool = True) -> dict:
    """What the evaluator (standard) or :func:`placement.runtime.predict_traffic` (coherent) expects for the replay,
    in all and per link class (``nvlink_bytes``, ``rdma_bytes``)."""
    from placement.evaluate import evaluate
    from placement.runtime import predict_traffic
    from solvers.cost import CostModel

    pred = predict_traffic(plan, trace, hidden_size, dtype_bytes, dataflow, comm, ll_nvlink)
    if dataflow == "standard":
        cost = CostModel(hidden_size=hidden_size, dtype_bytes=dtype_bytes, comm=comm, ll_nvlink=ll_nvlink)
        ev = evaluate(plan, trace, cost)["overall"]
        pred.update(a2a_bytes=ev["a2a_bytes"], nvlink_bytes=ev["nvlink_bytes_total"], rdma_bytes=ev["rdma_bytes_total"],
                    source="placement.evaluate.evaluate", est_seconds_per_layer_h100=ev["est_moe_seconds"] / plan.num_layers,
                    load_imbalance=ev["load_imbalance"], dispatch_gpus=ev["dispatch_gpus"],
                    dispatch_nodes=ev["dispatch_nodes"])
    else:
        pred["source"] = "placement.coherent.coherent_traffic"
    return pred


def _rel(measured: float, predicted: float):
    return (measured - predicted) / predicted if predicted else (0.0 if measured == 0 else None)


def _with_nodes(plans, gpus_per_node: int, world_size: int):
    """The plans with ``gpus_per_node`` GPUs per node (same placement, other link classes)."""
    from placement.plan import Plan

    if gpus_per_node < 1 or world_size % gpus_per_node:
        raise UserError(f"--gpus-per-node {gpus_per_node} must divide the world size {world_size}")
    out = []
    for plan in plans:
        d = plan.to_dict()
        d["topology"]["gpus_per_node"] = gpus_per_node
        out.append(Plan.from_dict(d))
    return out


def register(app: typer.Typer) -> None:
    @app.command("bench")
    @user_errors
    def bench_cmd(
        plans: list[str] = typer.Argument(..., help="Plan files (Plan v1 JSON), all for the same number of GPUs."),
        trace: Optional[list[str]] = typer.Option(None, "--trace", "-t", help="Token trace(s) whose routing is "
                                                  "replayed. Default: the bundled DeepSeek-V2-Lite trace."),
        world_size: Optional[int] = typer.Option(None, "--world-size", "-w", help="Ranks to launch (default: the "
                                                 "plans' GPUs). Under torchrun: its WORLD_SIZE."),
        backend: str = typer.Option("gloo", "--backend", help="gloo (CPU processes) or nccl (one GPU per rank)."),
        hidden_size: Optional[int] = typer.Option(None, "--hidden-size", help="Hidden size of the tokens sent "
                                                  "(default 2048, DeepSeek-V2-Lite). Bytes scale with it."),
        intermediate_size: Optional[int] = typer.Option(None, "--intermediate-size", help="Expert MLP width of the "
                                                        "random expert weights (compute only; bytes do not depend on "
                                                        "it). Default: 1408 (DeepSeek-V2-Lite) with nccl, 16 with gloo, "
                                                        "where CPU matmuls would otherwise hide the all-to-all."),
        dtype: str = typer.Option("bf16", "--dtype", help="Activation dtype on the wire and in the experts: bf16, "
                                  "fp16 or fp32."),
        dataflow: str = typer.Option("standard", "--dataflow", help="standard (dispatch + combine home), coherent "
                                     "(ExFlow: tokens stay where their top expert ran) or both."),
        repeats: int = typer.Option(5, "--repeats", "-n", help="Timed passes over all layers (after --warmup)."),
        warmup: int = typer.Option(1, "--warmup", help="Untimed passes first."),
        tokens: int = typer.Option(4096, "--tokens", help="Replay about this many tokens (whole sequences, chosen "
                                   "at random with --seed); 0 = all."),
        holdout: float = typer.Option(0.0, "--holdout", help="Replay only the held-out share of sequences of the "
                                      "split 'moeplace plan --holdout F --seed S' used."),
        seed: int = typer.Option(0, "--seed", help="Seed of the split, the token choice and the random weights."),
        threads: Optional[int] = typer.Option(None, "--threads", help="torch threads per rank (default: cores / ranks)."),
        comm: str = typer.Option("nccl", "--comm", help="All-to-all protocol of the standard dataflow: nccl (one copy "
                                 "per distinct remote rank), deepep-normal (DeepEP normal kernels: RDMA once per remote "
                                 "node to the same-local-index rank, then NVLink in the node) or deepep-ll (DeepEP "
                                 "low-latency: one message per token-expert copy, 16-byte header; combine in bf16)."),
        gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help="Ranks per node, which decides "
                                                    "NVLink vs RDMA (default: the plans')."),
        no_ll_nvlink: bool = typer.Option(False, "--no-ll-nvlink", help="deepep-ll: count same-node copies as RDMA "
                                          "(DeepEP's allow_nvlink_for_low_latency_mode=False); default NVLink."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ):
        """Run the plans on torch.distributed: measured all-to-all bytes and layer times vs the prediction."""

        from placement.cli_common import load_data, load_plans, require, torchrun_world

        require("torch", "moeplace bench")
        from placement.runtime import DTYPE_BYTES, PROTOCOLS, BenchSpec, run_bench, select_tokens
        from traces import RoutingTrace

        ll_nvlink = not no_ll_nvlink
        if backend not in ("gloo", "nccl"):
            raise UserError(f"--backend {backend!r} is not one of gloo, nccl")
        if comm not in PROTOCOLS:
            raise UserError(f"--comm {comm!r} is not one of {', '.join(PROTOCOLS)}")
        if dtype not in DTYPE_BYTES:
            raise UserError(f"--dtype {dtype!r} is not one the runtime computes in; use bf16, fp16 or fp32")
        flows = {"standard": ("standard",), "coherent": ("coherent",), "both": ("standard", "coherent")}.get(dataflow)
        if flows is None:
            raise UserError(f"--dataflow {dataflow!r} is not one of standard, coherent, both")
        if comm != "nccl" and "coherent" in flows:
            raise UserError(f"the coherent dataflow runs with --comm nccl only, not {comm}; use --dataflow standard "
                            f"with --comm {comm}")
        if repeats < 1 or warmup < 0 or tokens < 0:
            raise UserError("--repeats must be >= 1, --warmup >= 0 and --tokens >= 0")
        intermediate_size = intermediate_size or (1408 if backend == "nccl" else 16)
        if intermediate_size < 1 or (hidden_size is not None and hidden_size < 1):
            raise UserError("--hidden-size and --intermediate-size must be positive")
        torchrun, rank, world_size = torchrun_world(world_size)
        plan_objs = load_plans(plans)
        world_size = plan_objs[0].topology.num_gpus if world_size is None else world_size
        if world_size < 1:
            raise UserError(f"--world-size must be >= 1, got {world_size}")
        data, sources = load_data(trace)
        if not isinstance(data, RoutingTrace):
            raise UserError("bench replays per-token routing; give a token trace (.npz with expert_ids), not counts")
        if holdout:
            data = data.split_by_sequence(1.0 - holdout, seed=seed)[1]
        _check_plans(plan_objs, plans, world_size, data)
        if gpus_per_node is not None:
            plan_objs = _with_nodes(plan_objs, gpus_per_node, world_size)
        sub = select_tokens(data, tokens, seed=seed)
        H = hidden_size or 2048
        names = []
        for path, p in zip(plans, plan_objs):
            names.append(p.name if p.name not in names else f"{p.name} ({path})")
        spec = BenchSpec(plans=[p.to_dict() for p in plan_objs], names=names, expert_ids=sub.expert_ids,
                         gate_weights=sub.gate_weights, sequence_index=sub.sequence_index(), hidden_size=H,
                         intermediate_size=intermediate_size, dtype=dtype, repeats=repeats, warmup=warmup,
                         dataflows=flows, backend=backend, seed=seed, comm=comm, ll_nvlink=ll_nvlink)
        if rank == 0 and not as_json:
            err.print(f"replaying {sub.num_tokens} tokens x {sub.num_layers} MoE layers on {world_size} {backend} ranks "
                      f"({'torchrun' if torchrun else 'local processes'}) ...")
        results = run_bench(spec, world_size, threads)
        if results is None:  # a non-zero torchrun rank
            return
        by_file = dict(zip(names, plans))
        plan_of = dict(zip(names, plan_objs))
        rows = []
        for r in results:
            pred = predictions(plan_of[r["plan"]], sub, H, DTYPE_BYTES[dtype], r["dataflow"], comm, ll_nvlink)
            m = r["measured"]
            rows.append({**r, "plan_file": by_file[r["plan"]], "gpus_per_node": plan_of[r["plan"]].topology.gpus_per_node,
                         "predicted": pred, "bytes_rel_diff": _rel(m["a2a_bytes"], pred["a2a_bytes"]),
                         "nvlink_rel_diff": _rel(m["nvlink_bytes"], pred["nvlink_bytes"]),
                         "rdma_rel_diff": _rel(m["rdma_bytes"], pred["rdma_bytes"])})
        report = {"world_size": world_size, "backend": backend, "launcher": "torchrun" if torchrun else "local",
                  "comm": comm, "ll_nvlink": ll_nvlink,
                  "trace": {"sources": sources, "tokens": sub.num_tokens, "sequences": sub.num_sequences,
                            "layers": sub.num_layers, "holdout": holdout, "seed": seed},
                  "hidden_size": H, "intermediate_size": intermediate_size, "dtype": dtype,
                  "dtype_bytes": DTYPE_BYTES[dtype], "repeats": repeats, "warmup": warmup, "plans": rows}
        if as_json:
            print_json(report)
            return
        from rich.table import Table

        per_node = sorted({r["gpus_per_node"] for r in rows})
        nodes = (f"{world_size // per_node[0]} node(s) of {per_node[0]}" if len(per_node) == 1 else
                 "nodes as each plan says")
        t = Table(title=f"{world_size} {backend} ranks in {nodes}, --comm {comm}, {sub.num_tokens} tokens "
                        f"({sub.num_sequences} sequences) x {sub.num_layers} MoE layers, hidden {H} {dtype}")
        for c in ("plan", "dataflow", "NVLink MB", "RDMA MB", "diff", "ms/layer (min-max)"):
            t.add_column(c, justify="left" if c in ("plan", "dataflow") else "right", min_width=10 if c == "plan" else None,
                         overflow="fold" if c == "plan" else "ellipsis", no_wrap=c != "plan")
        for r in rows:
            sp = r["measured"]["seconds_per_layer"]
            m, p = r["measured"], r["predicted"]
            diffs = [d for d in (r["nvlink_rel_diff"], r["rdma_rel_diff"]) if d is not None]
            t.add_row(r["plan"], r["dataflow"], f"{m['nvlink_bytes'] / 1e6:.2f} / {p['nvlink_bytes'] / 1e6:.2f}",
                      f"{m['rdma_bytes'] / 1e6:.2f} / {p['rdma_bytes'] / 1e6:.2f}",
                      f"{max(diffs, key=abs) * 100:+.2f}%" if diffs else "-",
                      f"{sp['median'] * 1e3:.1f} ({sp['min'] * 1e3:.1f}-{sp['max'] * 1e3:.1f})")
        out.print(t)
        out.print(f"MB: measured / predicted hidden-state bytes sent between ranks (dispatch + combine; routing "
                  f"metadata in --json) inside a node (NVLink) and across nodes (RDMA) with the {comm} protocol; "
                  f"predicted: the evaluator ('evaluate --comm {comm}', standard) or coherent_traffic (coherent); diff: "
                  f"the larger relative difference of the two; ms/layer: slowest rank per layer, mean over layers, "
                  f"median and min-max over {repeats} passes", highlight=False)
        if backend == "gloo":
            out.print("gloo runs every rank as a CPU process on this machine: bytes are exact, times are only rough",
                      highlight=False)
