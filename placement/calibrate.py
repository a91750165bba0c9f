"""``moeplace calibrate``: measure the figures of a hardware profile (:mod:`placement.hardware`) on the user's
machines with torch.distributed.

Every rank measures at once, as in serving (docs/hardware.md):

- **all-to-all bandwidth** at the model's message size (one token's hidden state, ``hidden x dtype`` bytes, a range
  of tokens per peer): inside each node, every node at the same time (NVLink); and between nodes among the ranks
  with the same local index, every local index at the same time (one NIC per GPU, DeepEP's RDMA peers). Bytes per
  GPU and direction are the ``(group size - 1) x tokens x hidden x dtype`` a rank sends to its peers; the time is the
  slowest rank's. The profile takes the highest rate over the sizes (the cost model has no latency term).
- **grouped GEMM rate** of one layer's local experts (SwiGLU: a fused gate+up GEMM and a down GEMM,
  ``6 x hidden x intermediate`` FLOPs per token, as ``benchmarks/expert_gemm.py``) over a range of tokens per
  expert: ``torch._grouped_mm`` on a GPU where PyTorch has it, else ``torch.bmm``.
- **HBM bandwidth**: a large device-to-device copy (bytes read plus bytes written over the time).

:func:`fit_gemm` turns the GEMM points into ``gpu_flops`` (the marginal rate: the slope of a least-squares line
through the times at >= 512 tokens per expert, as docs/benchmarks.md defines it) and ``expert_overhead`` (the
median time per expert left over after the roofline ``max(FLOPs / gpu_flops, weight bytes / hbm_bandwidth)``).

Torch is imported inside the functions; ranks are local processes (:func:`placement.runtime.launch`) or a
torchrun job.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass

import numpy as np

DTYPES = {"bf16": ("bfloat16", 2), "fp16": ("float16", 2), "fp32": ("float32", 4)}
GPU_TOKENS_PER_EXPERT = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
CPU_TOKENS_PER_EXPERT = (16, 32, 64, 128, 256)  # CPU matmuls are slow; gloo runs are for the mechanics
TOKENS_PER_PEER = (8, 64, 512, 4096)
GPU_COPY_BYTES = 1 << 30
CPU_COPY_BYTES = 64 << 20
FIT_FROM = 512


@dataclass
class CalibrationSpec:
    """What every rank of ``moeplace calibrate`` measures (picklable)."""

    hidden_size: int
    intermediate_size: int
    dtype: str  # on the wire and in the GEMMs (the GEMMs run in float32 on a CPU)
    local_experts: int
    tokens_per_expert: tuple
    tokens_per_peer: tuple
    copy_bytes: int
    backend: str
    ranks_per_node: int | None = None  # None: torchrun's LOCAL_WORLD_SIZE, else all ranks in one node
    seconds_per_point: float = 0.25
    seed: int = 0


def flops_per_token(hidden: int, intermediate: int) -> float:
    """FLOPs of one token through one SwiGLU expert (gate, up and down projections)."""
    return 6.0 * hidden * intermediate


def fit_gemm(points, local_experts: int, flops_token: float, expert_bytes: float, hbm_bandwidth: float,
             fit_from: int = FIT_FROM) -> dict:
    """``gpu_flops`` and ``expert_overhead`` from GEMM timings.

    Args:
        points: ``[(tokens per expert m, seconds for the layer's local experts)]``.
        local_experts: experts timed together; flops_token: FLOPs per token and expert; expert_bytes: one expert's
            weight bytes; hbm_bandwidth: bytes/s.
    Returns ``{"gpu_flops", "expert_overhead", "fit_points"}``: the marginal rate is ``1 / slope`` of the
    least-squares line ``t = a + slope x m x local_experts x flops_token`` through the points with
    ``m >= fit_from`` (the larger half of the points, at least two, when fewer than two qualify; the best achieved
    rate when the slope is not positive or there is one point); the overhead is ``max(0, median_i(t_i / local_experts - max(m_i flops_token /
    gpu_flops, expert_bytes / hbm_bandwidth)))``.
    """
    pts = sorted((int(m), float(t)) for m, t in points)
    if not pts:
        raise ValueError("no GEMM timings to fit")
    m = np.array([p[0] for p in pts], dtype=np.float64)
    t = np.array([p[1] for p in pts], dtype=np.float64)
    work = m * local_experts * flops_token
    sel = m >= fit_from
    if sel.sum() < 2:  # the larger half of the points, at least two
        sel = np.zeros(m.size, dtype=bool)
        sel[min(m.size // 2, max(m.size - 2, 0)):] = True
    best = float((work / t).max())
    rate = best
    if sel.sum() >= 2 and np.ptp(work[sel]) > 0:
        slope = float(np.polyfit(work[sel], t[sel], 1)[0])
        if slope > 0 and np.isfinite(1.0 / slope):
            rate = 1.0 / slope
    roof = np.maximum(m * flops_token / rate, expert_bytes / hbm_bandwidth)
    overhead = max(0.0, float(np.median(t / local_experts - roof)))
    return {"gpu_flops": rate, "expert_overhead": overhead, "fit_points": [int(x) for x in m[sel]]}


# ---------------------------------------------------------------------------------------------------------------
# the measurements (one process per rank)
# ---------------------------------------------------------------------------------------------------------------

def group_layout(world: int, ranks_per_node: int) -> dict[str, list[list[int]]]:
    """The process groups of the all-to-all measurements: ``intra_node``, the ranks of each node (torchrun numbers
    a node's ranks contiguously), and ``inter_node``, the ranks with the same local index on every node (DeepEP's
    RDMA peers: one NIC per GPU)."""
    n, nodes = ranks_per_node, world // ranks_per_node
    return {"intra_node": [[k * n + i for i in range(n)] for k in range(nodes)],
            "inter_node": [[k * n + i for k in range(nodes)] for i in range(n)]}


def _say(rank: int, text: str) -> None:
    if rank == 0:
        print(f"calibrate: {text}", file=sys.stderr, flush=True)


def _layout(world: int, ranks_per_node: int | None) -> int:
    n = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if n < 1 or world % n:
        raise ValueError(f"{n} ranks per node do not divide the world of {world} ranks")
    return n


def _time_local(fn, sync, target: float, trials: int = 3, max_reps: int = 200) -> float:
    """Median over ``trials`` of the mean seconds per call, after a warm-up, reps sized to about ``target``."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = max(time.perf_counter() - t0, 1e-9)
    reps = int(max(1, min(max_reps, target / trials / one)))
    out = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        out.append((time.perf_counter() - t0) / reps)
    return float(np.median(out))


def _time_collective(fn, sync, target: float, device, trials: int = 3, max_reps: int = 100) -> float:
    """Like :func:`_time_local` for a collective every rank runs: the same reps everywhere, the slowest rank's time
    per call (median over trials)."""
    import torch
    import torch.distributed as dist

    def slowest(x: float) -> float:
        v = torch.tensor([x], dtype=torch.float64, device=device)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return float(v.item())

    fn()
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    sync()
    one = slowest(max(time.perf_counter() - t0, 1e-9))
    reps = int(max(1, min(max_reps, target / trials / one)))
    out = []
    for _ in range(trials):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        out.append(slowest((time.perf_counter() - t0) / reps))
    return float(np.median(out))


def _ffn(x, w13, w2, offs, grouped: bool):
    """One layer's local experts, SwiGLU. ``x``: [E, m, H]; ``w13``: [E, H, 2I]; ``w2``: [E, I, H]."""
    import torch
    import torch.nn.functional as F

    if grouped:
        flat = x.reshape(-1, x.shape[-1])
        gu = torch._grouped_mm(flat, w13, offs=offs)
        g, u = gu.chunk(2, dim=-1)
        return torch._grouped_mm((F.silu(g) * u).contiguous(), w2, offs=offs)
    gu = torch.bmm(x, w13)
    g, u = gu.chunk(2, dim=-1)
    return torch.bmm(F.silu(g) * u, w2)


def _measure_a2a(rank: int, kind: str, groups: list[list[int]], spec: CalibrationSpec, device, sync) -> dict:
    """All-to-all among each group's ranks, every group at once, at each size of ``spec.tokens_per_peer``."""
    import torch
    import torch.distributed as dist

    mine = None
    for members in groups:  # every rank creates every group, in the same order
        g = dist.new_group(members)
        if rank in members:
            mine = g
    wire, dbytes = getattr(torch, DTYPES[spec.dtype][0]), DTYPES[spec.dtype][1]
    H, size = spec.hidden_size, len(groups[0])
    rows = []
    for t in spec.tokens_per_peer:
        send = torch.randn(size * t, H, device=device).to(wire)
        recv = torch.empty_like(send)
        sec = _time_collective(lambda: dist.all_to_all_single(recv, send, group=mine), sync, spec.seconds_per_point,
                               device)
        per_gpu = (size - 1) * t * H * dbytes
        rows.append({"tokens_per_peer": t, "bytes_per_peer": t * H * dbytes, "bytes_per_gpu": per_gpu,
                     "seconds": sec, "bandwidth": per_gpu / sec})
        where = "inside each node" if kind == "intra_node" else "between nodes"
        _say(rank, f"all-to-all {where} ({size} ranks per group), {t} tokens x {H} x {spec.dtype} per peer "
                   f"({t * H * dbytes / 2**20:.3g} MiB): {per_gpu / sec / 1e9:.4g} GB/s per GPU and direction")
    return {"group_size": size, "groups": len(groups), "points": rows}


def _measure_copy(rank: int, spec: CalibrationSpec, device, sync) -> dict:
    """HBM bandwidth from a device copy: bytes read plus bytes written over the time."""
    import torch
    import torch.distributed as dist

    numel = max(1, spec.copy_bytes // 4)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    dist.barrier()
    sec = _time_local(lambda: dst.copy_(src), sync, spec.seconds_per_point)
    out = {"bytes": numel * 4, "seconds": sec, "bandwidth": 2 * numel * 4 / sec}
    _say(rank, f"device copy of {numel * 4 / 2**20:.4g} MiB: {out['bandwidth'] / 1e12:.4g} TB/s (rank 0)")
    return out


def _measure_gemm(rank: int, spec: CalibrationSpec, device, sync, dtype,
                  grouped: bool) -> tuple[list[tuple[int, float]], bool]:
    """``([(tokens per expert, seconds)], grouped)``: the local experts' SwiGLU GEMMs at each size of
    ``spec.tokens_per_expert``, with ``torch._grouped_mm`` when ``grouped`` and it takes this shape and dtype, else
    ``torch.bmm`` (the second value says which ran)."""
    import torch
    import torch.distributed as dist

    E, H, I = spec.local_experts, spec.hidden_size, spec.intermediate_size
    w13 = (torch.randn(E, H, 2 * I, device=device) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, I, H, device=device) / I ** 0.5).to(dtype)
    if grouped:  # the grouped GEMM kernels need aligned shapes and 16-bit dtypes: fall back to bmm otherwise
        x = torch.randn(E, 16, H, device=device).to(dtype)
        try:
            _ffn(x, w13, w2, torch.arange(1, E + 1, device=device, dtype=torch.int32) * 16, True)
        except RuntimeError as exc:
            _say(rank, f"torch._grouped_mm does not take this shape ({str(exc).splitlines()[0]}); timing torch.bmm")
            grouped = False
    out = []
    for m in spec.tokens_per_expert:
        x = torch.randn(E, m, H, device=device).to(dtype)
        offs = torch.arange(1, E + 1, device=device, dtype=torch.int32) * m
        dist.barrier()
        sec = _time_local(lambda: _ffn(x, w13, w2, offs, grouped), sync, spec.seconds_per_point)
        out.append((m, sec))
        _say(rank, f"grouped GEMM, {E} experts of {H} x {I} at {m} tokens per expert: "
                   f"{flops_per_token(H, I) * m * E / sec / 1e12:.4g} TFLOP/s (rank 0)")
    return out, grouped


def calibrate_rank(rank: int, world: int, spec: CalibrationSpec, device) -> dict | None:
    """Run every measurement on this rank; rank 0 returns the results (:func:`placement.calibrate.build_profile`
    reads them), the others None."""
    import torch
    import torch.distributed as dist

    torch.manual_seed(spec.seed + rank)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    wire = getattr(torch, DTYPES[spec.dtype][0])
    n = _layout(world, spec.ranks_per_node)
    nodes = world // n
    hosts: list = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    H = spec.hidden_size
    res: dict = {"world_size": world, "ranks_per_node": n, "nodes": nodes, "hosts": sorted(set(hosts)),
                 "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
                 "backend": spec.backend, "a2a": {}}

    # all-to-all: inside every node at once, then across nodes among the same local index at once
    for kind, groups in group_layout(world, n).items():
        if len(groups[0]) >= 2:
            res["a2a"][kind] = _measure_a2a(rank, kind, groups, spec, device, sync)
    mine_hbm = _measure_copy(rank, spec, device, sync)
    gemm_dtype = wire if cuda else torch.float32  # bf16 matmuls are emulated (very slow) on most CPUs
    grouped = cuda and hasattr(torch, "_grouped_mm")
    mine_gemm, grouped = _measure_gemm(rank, spec, device, sync, gemm_dtype, grouped)
    E, I = spec.local_experts, spec.intermediate_size
    fpt = flops_per_token(H, I)

    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"hbm": mine_hbm, "gemm": mine_gemm})
    if rank != 0:
        return None
    hbm = [g["hbm"]["bandwidth"] for g in gathered]
    res["hbm"] = {"bytes": mine_hbm["bytes"], "bandwidth": float(np.median(hbm)), "per_rank": hbm}
    times = np.array([[t for _, t in g["gemm"]] for g in gathered])  # [ranks, points]
    med = np.median(times, axis=0)
    res["gemm"] = {"kernel": "torch._grouped_mm" if grouped else "torch.bmm", "dtype": str(gemm_dtype).replace(
        "torch.", ""), "local_experts": E, "hidden_size": H, "intermediate_size": I,
        "points": [{"tokens_per_expert": int(m), "seconds": float(s), "flops_rate": fpt * m * E / float(s),
                    "seconds_per_rank": times[:, j].tolist()} for j, (m, s) in enumerate(zip(spec.tokens_per_expert,
                                                                                             med))]}
    return res


def _spawned(rank: int, world: int, spec: CalibrationSpec, result_path: str) -> None:
    import json

    from placement.runtime import device_for

    res = calibrate_rank(rank, world, spec, device_for(spec.backend, rank))
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(res, f)


def run_calibration(spec: CalibrationSpec, world_size: int, threads: int | None = None) -> dict | None:
    """Measure on ``world_size`` local processes, or on this torchrun job's ranks. Returns the results on rank 0
    (the launching process), None on the other torchrun ranks."""
    import json
    import tempfile

    from placement.runtime import device_for, launch, under_torchrun

    if under_torchrun():
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(spec.backend)
        try:
            if threads:
                torch.set_num_threads(threads)
            device = device_for(spec.backend, int(os.environ.get("LOCAL_RANK", 0)))
            return calibrate_rank(dist.get_rank(), dist.get_world_size(), spec, device)
        finally:
            dist.destroy_process_group()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        launch(_spawned, world_size, (spec, path), backend=spec.backend, threads=threads)
        with open(path) as f:
            return json.load(f)


# ---------------------------------------------------------------------------------------------------------------
# from measurements to a profile
# ---------------------------------------------------------------------------------------------------------------

def build_profile(results: dict, base, name: str, host: str, date: str, weight_dtype_bytes: int = 2):
    """The :class:`placement.hardware.Hardware` profile from :func:`calibrate_rank`'s results; what was not
    measured (the inter-node bandwidth on one node, an intra-node one with one rank per node) comes from ``base``
    (a preset) and ``measured["kept"]`` says so."""
    from placement.hardware import Hardware

    kept = {}
    bw = {}
    for kind, field in (("intra_node", "intra_node_bandwidth"), ("inter_node", "inter_node_bandwidth")):
        rows = (results.get("a2a") or {}).get(kind)
        if rows:
            bw[field] = max(r["bandwidth"] for r in rows["points"])
        else:
            bw[field] = getattr(base, field)
            why = "one node" if kind == "inter_node" else "one rank per node"
            kept[field] = f"not measured ({why}): {base.name}'s {getattr(base, field) / 1e9:.4g} GB/s kept"
    g = results["gemm"]
    hbm = results["hbm"]["bandwidth"]
    fpt = flops_per_token(g["hidden_size"], g["intermediate_size"])
    expert_bytes = 3.0 * g["hidden_size"] * g["intermediate_size"] * weight_dtype_bytes
    fit = fit_gemm([(p["tokens_per_expert"], p["seconds"]) for p in g["points"]], g["local_experts"], fpt,
                   expert_bytes, hbm)
    simulated = results["nodes"] > 1 and len(results["hosts"]) < results["nodes"]
    measured = {**results, "kept": kept, "base": base.name,
                "fit": {"gpu_flops": f"marginal rate: 1 / slope of a least-squares line through the times at "
                                     f"{fit['fit_points']} tokens per expert",
                        "expert_overhead": "median time per expert beyond max(FLOPs / gpu_flops, weight bytes / "
                                           "hbm_bandwidth) over the points",
                        "bandwidths": "highest rate over the message sizes, the slowest rank's time"}}
    if simulated:
        measured["note"] = (f"{results['nodes']} nodes of {results['ranks_per_node']} ranks on "
                            f"{len(results['hosts'])} host(s): the inter-node figure crossed no network")
    gpn = results["ranks_per_node"] if results["backend"] == "nccl" else None
    source = (f"measured by moeplace calibrate on {host} {date} ({results['backend']}, {results['world_size']} ranks, "
              f"{results['device']})")
    return Hardware(name=name, source=source, gpu_flops=fit["gpu_flops"], hbm_bandwidth=hbm,
                    expert_overhead=fit["expert_overhead"], gpus_per_node=gpn,
                    gemm_rate=tuple((float(p["tokens_per_expert"]), float(p["flops_rate"])) for p in g["points"]),
                    measured=measured, **bw)
