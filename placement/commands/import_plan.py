"""moeplace import-plan: read the placement a serving stack runs today into a plan file."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from placement.cli_common import UserError, err, out, print_json, user_errors
from placement.importplan import MAX_DECODER_LAYERS


def shape_source(like: str):
    """(moe_layer_index, num_hidden_layers, num_experts, model) from a plan file, a trace file or a bundled name."""
    import json

    from placement.plan import FORMAT, Plan

    p = Path(like)
    if p.is_file() and p.suffix == ".json":
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            d = None
        if isinstance(d, dict) and d.get("format") == FORMAT:
            plan = Plan.from_dict(d, where=str(p))
            return plan.moe_layer_index, plan.num_hidden_layers, plan.num_experts, plan.model
    from placement.cli_common import load_data

    data, _ = load_data([like])
    return data.moe_layer_index, data.decoder_layers, data.num_experts, data.model


def register(app: typer.Typer) -> None:
    @app.command("import-plan")
    @user_errors
    def import_plan_cmd(
        placement: Path = typer.Argument(..., help="Placement file of a serving stack (or DeepSeek EPLB's phy2log)."),
        fmt: Optional[str] = typer.Option(None, "--format", "-f", help="sglang, vllm, trtllm, vllm-ascend or eplb "
                                          "(default: detected from the content)."),
        out_path: Path = typer.Option(Path("imported.json"), "--out", "-o", help="Plan file to write."),
        gpus: Optional[int] = typer.Option(None, "--gpus", "-g", help="EP size; needed by every format except "
                                           "vllm-ascend, which records it."),
        gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help="GPUs per node (default: all in "
                                                    "one)."),
        num_experts: Optional[int] = typer.Option(None, "--num-experts", help="Logical experts per layer (default: "
                                                  "from --like, else the largest id + 1)."),
        like: Optional[str] = typer.Option(None, "--like", help="A trace (file or bundled name) or plan of the same "
                                           "model: gives MoE-layer indices, decoder layers and expert count."),
        moe_layers: Optional[str] = typer.Option(None, "--moe-layers", help="Decoder indices of the MoE layers, e.g. "
                                                 "1-26 (DeepSeek-V2-Lite; indices below "
                                                 f"{MAX_DECODER_LAYERS}); picks the MoE rows of an SGLang file."),
        name: Optional[str] = typer.Option(None, "--name", help="Name shown in evaluations (default: "
                                           "imported-<format>)."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ):
        """Read an existing placement (SGLang, vLLM, TensorRT-LLM, vllm-ascend, EPLB phy2log) into a plan, to
        evaluate what you run today against moeplace's plans."""
        from placement.importplan import import_placement, parse_layers

        mli = hidden = experts = model = None
        if like:
            mli, hidden, experts, model = shape_source(like)
        if moe_layers:
            mli = parse_layers(moe_layers)
            if like and hidden is not None and mli.max() >= hidden:
                raise UserError(f"--moe-layers reaches layer {int(mli.max())} but --like has {hidden} decoder layers")
        if num_experts is not None:
            experts = num_experts
        if gpus is not None and gpus < 1:
            raise UserError(f"--gpus must be >= 1, got {gpus}")
        plan = import_placement(placement, fmt, num_gpus=gpus, gpus_per_node=gpus_per_node, num_experts=experts,
                                moe_layer_index=mli, num_hidden_layers=hidden, model=model, name=name)
        plan.save(out_path)
        t = plan.topology
        summary = {"plan": str(out_path), "format": plan.provenance["imported_from"]["format"],
                   "moe_layers": plan.num_layers, "num_experts": plan.num_experts, "slots": plan.num_slots,
                   "gpus": t.num_gpus, "gpus_per_node": t.gpus_per_node, "redundant": plan.num_redundant,
                   "moe_layer_index": plan.provenance["moe_layer_index_source"]}
        if as_json:
            print_json(summary)
            return
        if plan.extra.get("note"):
            err.print(f"note: {plan.extra['note']}", markup=False, highlight=False)
        out.print(f"wrote {out_path}: {summary['format']} placement, {plan.num_layers} MoE layers x {plan.num_slots} "
                  f"slots on {t.num_gpus} GPUs ({plan.num_redundant} redundant, {plan.num_experts} experts; MoE-layer "
                  f"indices {summary['moe_layer_index']})", highlight=False, markup=False)
        out.print(f"  compare: moeplace evaluate {shlex.quote(str(out_path))} OTHER_PLAN.json --trace TRACE", highlight=False,
                  markup=False)
