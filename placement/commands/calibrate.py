"""moeplace calibrate: measure all-to-all bandwidth, the expert GEMM rate and HBM bandwidth on the user's machines
and write a hardware profile that plan, evaluate, report and replay read with --hardware."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from placement.cli_common import UserError, err, out, print_json, user_errors
from placement.commands.plan import EvalModelConfigOption, ModelOption

TORCH_HINT = 'moeplace calibrate needs PyTorch; install it with pip install "moeplace[torch]"'


def parse_counts(text: str | None, flag: str) -> tuple[int, ...] | None:
    """``16,64,512`` to a tuple of positive integers (sorted, unique), or None."""
    if text is None:
        return None
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise UserError(f"{flag} {text!r} must be a comma-separated list of positive integers, e.g. 16,128,1024")
    return tuple(values)


def torch_available() -> bool:
    """Whether PyTorch imports (a missing, broken or hidden install: False)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    @user_errors
    def calibrate_cmd(
        backend: Optional[str] = typer.Option(None, "--backend", help="nccl (one GPU per rank) or gloo (CPU processes: "
                                              "the mechanics, not GPU figures). Default: nccl when PyTorch sees a "
                                              "GPU, else gloo."),
        world_size: Optional[int] = typer.Option(None, "--world-size", "-w", help="Ranks to launch on this machine "
                                                 "(default: its GPUs with nccl, 2 with gloo). Under torchrun: its "
                                                 "WORLD_SIZE."),
        ranks_per_node: Optional[int] = typer.Option(None, "--ranks-per-node", help="Ranks per node (default: "
                                                     "torchrun's LOCAL_WORLD_SIZE, or all ranks in one node). Smaller "
                                                     "on one machine only exercises the inter-node measurement."),
        model: ModelOption = None,
        model_config: EvalModelConfigOption = None,
        dtype: str = typer.Option("bf16", "--dtype", help="Activation dtype of the messages and GEMMs: bf16, fp16 or "
                                  "fp32 (GEMMs run in fp32 on a CPU)."),
        local_experts: int = typer.Option(8, "--local-experts", help="Experts per GPU in one layer, timed together."),
        tokens_per_expert: Optional[str] = typer.Option(None, "--tokens-per-expert", help="GEMM sizes, comma-separated "
                                                        "(default 16,32,...,8192 on a GPU; 16,...,256 on a CPU)."),
        tokens_per_peer: Optional[str] = typer.Option(None, "--tokens-per-peer", help="All-to-all sizes in tokens sent "
                                                      "to each peer, comma-separated (default 8,64,512,4096)."),
        copy_size: Optional[str] = typer.Option(None, "--copy-size", help="Bytes of the device copy that measures HBM "
                                                "bandwidth (default 1GiB on a GPU, 64MiB on a CPU)."),
        seconds_per_point: float = typer.Option(0.25, "--seconds-per-point", help="Time spent on each measurement "
                                                "(more is steadier)."),
        preset: Optional[str] = typer.Option(None, "--preset", help="h100, h200 or b200: where the figures not "
                                             "measured come from (one node: the inter-node bandwidth). Default: from "
                                             "the GPU's name, else h100."),
        name: Optional[str] = typer.Option(None, "--name", help="Profile name (default: calibrated-HOST)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="torch threads per rank (default: cores / ranks)."),
        out_path: Path = typer.Option(Path("hardware.json"), "--out", "-o", help="Profile file to write."),
        as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON."),
    ):
        """Measure this cluster's all-to-all bandwidth (inside and across nodes, at the model's message size), its
        grouped expert GEMM rate and HBM bandwidth, and write a hardware profile for --hardware.

        On one machine it starts a process per GPU; across nodes, run it under torchrun (docs/hardware.md)."""
        import os
        import socket
        from datetime import datetime, timezone

        from placement import hardware
        from placement.budget import parse_size
        from placement.commands.plan import cost_model
        from placement.cli_common import torchrun_world
        from traces.format import check_output_path

        if backend is not None and backend not in ("nccl", "gloo"):
            raise UserError(f"--backend {backend!r} is not one of nccl, gloo")
        if dtype not in ("bf16", "fp16", "fp32"):
            raise UserError(f"--dtype {dtype!r} is not one calibrate measures; use bf16, fp16 or fp32")
        if local_experts < 1:
            raise UserError(f"--local-experts must be at least 1, got {local_experts}")
        if not (seconds_per_point > 0 and seconds_per_point <= 600):
            raise UserError(f"--seconds-per-point must be a positive number of seconds (at most 600), got "
                            f"{seconds_per_point}")
        if preset is not None and preset.lower() not in hardware.PRESETS:
            raise UserError(f"--preset {preset!r} is not one of {', '.join(hardware.PRESETS)}")
        if name is not None and not name.strip():
            raise UserError("--name must not be empty")
        cost = cost_model(model=model, model_config=model_config)  # the model's sizes (errors before any launch)
        per_expert = parse_counts(tokens_per_expert, "--tokens-per-expert")
        per_peer = parse_counts(tokens_per_peer, "--tokens-per-peer")
        copy_bytes = int(parse_size(copy_size, "--copy-size")) if copy_size is not None else None
        if copy_bytes is not None and copy_bytes < 4:
            raise UserError(f"--copy-size must be at least 4 bytes, got {copy_size}")
        check_output_path(out_path)
        if not torch_available():
            raise UserError(TORCH_HINT)
        import torch

        from placement.calibrate import (CPU_COPY_BYTES, CPU_TOKENS_PER_EXPERT, GPU_COPY_BYTES, GPU_TOKENS_PER_EXPERT,
                                         TOKENS_PER_PEER, CalibrationSpec, build_profile, run_calibration)

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        backend = backend or ("nccl" if gpus else "gloo")
        if backend == "nccl" and not gpus:
            raise UserError("--backend nccl needs CUDA GPUs and PyTorch sees none; use --backend gloo to run the "
                            "calibration on CPU processes")
        torchrun, rank, world_size = torchrun_world(world_size)
        world_size = world_size if world_size is not None else (gpus if backend == "nccl" else 2)
        if world_size < 1:
            raise UserError(f"--world-size must be >= 1, got {world_size}")
        if ranks_per_node is not None and (ranks_per_node < 1 or world_size % ranks_per_node):
            raise UserError(f"--ranks-per-node {ranks_per_node} must divide the world size {world_size}")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if torchrun else world_size
        if ranks_per_node is None and world_size % local:
            raise UserError(f"torchrun's LOCAL_WORLD_SIZE={local} does not divide WORLD_SIZE={world_size}; give "
                            f"--ranks-per-node")
        on_gpu = backend == "nccl"
        base_name = (preset or (_guess_preset(torch) if on_gpu else "h100")).lower()
        base = hardware.PRESETS[base_name]
        spec = CalibrationSpec(hidden_size=cost.hidden_size, intermediate_size=cost.expert_intermediate_size,
                               dtype=dtype, local_experts=local_experts,
                               tokens_per_expert=per_expert or (GPU_TOKENS_PER_EXPERT if on_gpu
                                                                else CPU_TOKENS_PER_EXPERT),
                               tokens_per_peer=per_peer or TOKENS_PER_PEER,
                               copy_bytes=copy_bytes or (GPU_COPY_BYTES if on_gpu else CPU_COPY_BYTES),
                               backend=backend, ranks_per_node=ranks_per_node, seconds_per_point=seconds_per_point)
        if rank == 0:
            err.print(f"calibrating on {world_size} {backend} ranks ({'torchrun' if torchrun else 'local processes'}) "
                      f"at hidden {spec.hidden_size} x expert intermediate {spec.intermediate_size}, {dtype}; "
                      f"unmeasured figures from {base.name}", markup=False, highlight=False)
        results = run_calibration(spec, world_size, threads)
        if results is None:  # a non-zero torchrun rank
            return
        host = socket.gethostname()
        date = datetime.now(timezone.utc).isoformat(timespec="seconds")
        profile = build_profile(results, base, name or f"calibrated-{host}", host, date)
        hardware.save(profile, out_path)
        if as_json:
            print_json(profile.to_dict())
        else:
            out.print(f"wrote {out_path}: {profile.describe()}", markup=False, highlight=False)
        for field, why in profile.measured["kept"].items():
            err.print(f"note: {field} {why}", markup=False, highlight=False)
        if profile.measured.get("note"):
            err.print(f"note: {profile.measured['note']}", markup=False, highlight=False)
        if backend == "gloo":
            err.print("note: gloo measures CPU processes, not GPUs: use the profile to check the mechanics, and "
                      "--backend nccl on GPU machines for real figures", markup=False, highlight=False)


def _guess_preset(torch) -> str:
    """The preset named in the GPU's name (``NVIDIA H200``, ``NVIDIA B200``, ...), else h100."""
    from placement.hardware import PRESETS

    gpu = torch.cuda.get_device_name(0).lower()
    return next((k for k in PRESETS if k in gpu), "h100")
