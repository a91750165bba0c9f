"""moeplace collect / merge / import: record routing from a Hugging Face MoE model, merge traces, import
serving-stack dumps (SGLang, vLLM, TensorRT-LLM). torch/transformers are imported only when collecting."""

from __future__ import annotations

from typing import Optional

import typer

from placement.cli_common import UserError, err, out, print_json, user_errors


def _parse_layers(spec: Optional[str]) -> Optional[list[int]]:
    if spec is None:
        return None
    try:
        items = [int(x) for x in spec.replace(" ", "").split(",") if x]
    except ValueError:
        raise UserError(f"--moe-layer-index must be comma-separated integers like 1,2,3, got {spec!r}") from None
    if not items:
        raise UserError("--moe-layer-index is empty; give comma-separated decoder-layer indices")
    return items


def register(app: typer.Typer) -> None:
    @app.command("collect")
    @user_errors
    def collect_cmd(
        model: str = typer.Option(..., "--model", help="Local checkpoint folder (config.json, weights, tokenizer)."),
        data: str = typer.Option(..., "--data", help='JSONL: one {"text": ...} or {"input_ids": [...]} per line.'),
        out_path: str = typer.Option(..., "--out", help="Trace file to write (.npz)."),
        max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Stop after this many recorded tokens."),
        batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, or auto (spread a large model over "
                                                           "all GPUs)."),
        dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on cuda, fp32 on cpu), float32, bfloat16, "
                                                          "float16."),
        generate: int = typer.Option(0, "--generate", help="Greedy decode steps after each prefill (0: prefill "
                                                           "only); decoded tokens are recorded too."),
        max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", help="Truncate sequences to this many "
                                                                              "tokens (default: the model's limit)."),
        shard_dir: Optional[str] = typer.Option(None, "--shard-dir", help="Shard folder (default: OUT.shards)."),
        shard_tokens: int = typer.Option(262144, "--shard-tokens", help="Tokens per shard (bounds memory)."),
        keep_shards: bool = typer.Option(False, "--keep-shards", help="Keep the shards after the final merge."),
        rank: int = typer.Option(0, "--rank", help="This process's rank: it records lines i with i % world == rank."),
        world_size: int = typer.Option(1, "--world-size", help="Processes splitting the data (merge them after)."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the checkpoint's own code."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable summary."),
    ):
        """Record per-token routing (expert ids and gate weights per MoE layer) of a local Hugging Face MoE model.

        Resumable: run the same command again after an interruption and it continues after the last shard.
        """
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from placement.cli_common import require
        from traces.collect import collect_from_checkpoint

        for module in ("torch", "transformers"):
            require(module, "moeplace collect")

        if generate < 0:
            raise UserError(f"--generate must be >= 0, got {generate}")
        if max_seq_len is not None and max_seq_len < 1:
            raise UserError(f"--max-seq-len must be >= 1, got {max_seq_len}")
        columns = [TextColumn("[bold]collect[/]"), BarColumn(), TextColumn("{task.completed:,} tokens"),
                   TextColumn("{task.fields[seqs]:,} sequences"), TimeElapsedColumn()]
        try:
            with Progress(*columns, console=err, transient=True, disable=as_json) as progress:
                task = progress.add_task("collect", total=max_tokens, seqs=0)
                summary = collect_from_checkpoint(
                    model, data, out_path, batch_size=batch_size, max_tokens=max_tokens, device=device,
                    dtype=dtype, generate=generate, max_seq_len=max_seq_len, shard_dir=shard_dir,
                    shard_tokens=shard_tokens, keep_shards=keep_shards, rank=rank, world_size=world_size,
                    trust_remote_code=trust_remote_code,
                    progress=lambda t, s: progress.update(task, completed=t, seqs=s))
        except KeyboardInterrupt:
            err.print("interrupted: run the same command again to resume after the last complete shard")
            raise typer.Exit(130) from None
        result = {"out": str(summary.out), "tokens": summary.tokens, "sequences": summary.sequences,
                  "moe_layers": len(summary.moe_layer_index), "moe_layer_index": summary.moe_layer_index,
                  "num_experts": summary.num_experts, "top_k": summary.top_k, "shards": summary.shards,
                  "resumed_from_shard": summary.resumed_from_shard, "seconds": round(summary.seconds, 3),
                  "notes": summary.notes}
        if as_json:
            print_json(result)
            return
        for note in summary.notes:
            err.print(f"note: {note}")
        out.print(f"wrote {summary.out}: {summary.tokens:,} tokens in {summary.sequences:,} sequences, "
                  f"{len(summary.moe_layer_index)} MoE layers x top-{summary.top_k} of {summary.num_experts} experts "
                  f"({summary.seconds:.1f} s)")

    @app.command("merge")
    @user_errors
    def merge_cmd(
        inputs: list[str] = typer.Argument(..., help="Trace files (.npz) to merge: shards, ranks or runs."),
        out_path: str = typer.Option(..., "--out", help="Merged trace file to write (.npz)."),
        renumber: str = typer.Option("auto", "--renumber", help="Sequence ids: auto (offset only if they "
                                                                "overlap), always, never."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable summary."),
    ):
        """Merge traces (or count files) of one model exactly: tokens are concatenated, nothing is resampled."""
        from traces.merge import merge_files

        if renumber not in ("auto", "always", "never"):
            raise UserError(f"--renumber must be auto, always or never, got {renumber!r}")
        s = merge_files(inputs, out_path, renumber=renumber)
        result = {"out": str(s.out), "kind": s.kind, "inputs": s.inputs, "tokens": s.tokens,
                  "num_experts": s.num_experts, "top_k": s.top_k, "renumbered": s.renumbered, "notes": s.notes}
        if as_json:
            print_json(result)
            return
        for note in s.notes:
            err.print(f"note: {note}")
        what = f"{s.tokens:,} tokens" if s.kind == "trace" else "count profiles"
        out.print(f"wrote {s.out}: {what} from {s.inputs} inputs")

    @app.command("import")
    @user_errors
    def import_cmd(
        stack: str = typer.Argument(..., help="Serving stack that wrote the dump: sglang, vllm or trtllm."),
        dumps: list[str] = typer.Argument(..., help="Dump files (or the TensorRT-LLM EXPERT_STATISTIC_PATH folder)."),
        out_path: str = typer.Option(..., "--out", help="Trace or counts file to write (.npz)."),
        num_experts: Optional[int] = typer.Option(None, "--num-experts", help="vLLM: routed experts per layer "
                                                                              "(vLLM does not record it)."),
        moe_layer_index: Optional[str] = typer.Option(None, "--moe-layer-index", help="Decoder-layer index of each "
                                                      "MoE layer, e.g. 1,2,3 (default: the layers that recorded "
                                                      "routing)."),
        num_hidden_layers: Optional[int] = typer.Option(None, "--num-hidden-layers", help="vLLM: decoder layers."),
        model_name: Optional[str] = typer.Option(None, "--model-name", help="Model name stored in the trace."),
        allow_pickle: bool = typer.Option(False, "--allow-pickle", help="SGLang: load .pt files with full "
                                                                         "unpickling (only for files you trust)."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable summary."),
    ):
        """Import routing recorded by SGLang (recorder dumps), vLLM (routed experts) or TensorRT-LLM (statistics)."""
        from dataclasses import replace

        from traces import RoutingTrace, save
        from traces.importers import STACKS, import_dump

        if stack not in STACKS:
            raise UserError(f"unknown serving stack {stack!r}; use one of {', '.join(STACKS)}")
        if num_experts is not None and num_experts < 1:
            raise UserError(f"--num-experts must be >= 1, got {num_experts}")
        obj = import_dump(stack, dumps, num_experts=num_experts, moe_layer_index=_parse_layers(moe_layer_index),
                          num_hidden_layers=num_hidden_layers, allow_pickle=allow_pickle)
        if model_name is not None:
            obj = replace(obj, model=model_name)
        save(obj, out_path)
        if isinstance(obj, RoutingTrace):
            result = {"out": out_path, "kind": "trace", "tokens": obj.num_tokens, "sequences": obj.num_sequences,
                      "moe_layer_index": obj.moe_layer_index.tolist(), "num_experts": obj.num_experts,
                      "top_k": obj.top_k}
            text = (f"wrote {out_path}: token trace, {obj.num_tokens:,} tokens in {obj.num_sequences:,} sequences, "
                    f"{obj.num_layers} MoE layers x top-{obj.top_k} of {obj.num_experts} experts")
        else:
            result = {"out": out_path, "kind": "counts", "profiles": obj.num_profiles,
                      "moe_layer_index": obj.moe_layer_index.tolist(), "num_experts": obj.num_experts}
            text = (f"wrote {out_path}: counts, {obj.num_profiles} profile(s), {obj.num_layers} MoE layers x "
                    f"{obj.num_experts} experts")
        if as_json:
            print_json(result)
        else:
            out.print(text)
