"""Hardware profiles: the link bandwidths and GPU rates the cost model prices a plan with.

A profile is a small JSON file (``moeplace calibrate`` writes one from measurements on the user's machines) or one
of the presets below, from published figures::

    {"format": "moeplace.hardware", "version": 1, "name": "h100", "source": "...",
     "intra_node_bandwidth": 450e9, "inter_node_bandwidth": 50e9,      # bytes/s per GPU and direction
     "gpu_flops": 400e12, "hbm_bandwidth": 3.35e12,                    # expert GEMM FLOP/s, weight-read bytes/s
     "expert_overhead": 0.0,                                           # seconds per active expert per step
     "gpus_per_node": 8,                                               # optional
     "gemm_rate": [[16, 3.1e13], [512, 3.9e14], ...],                  # optional: measured [tokens/expert, FLOP/s]
     "measured": {...}}                                                # optional: how the figures were obtained

``--hardware FILE|h100|h200|b200`` on ``plan``, ``evaluate``, ``report`` and ``replay`` sets the links
(:class:`solvers.Topology` bandwidths) and the cost model's ``gpu_flops``, ``hbm_bandwidth`` and
``expert_overhead`` (:class:`solvers.cost.CostModel`); explicit options win. Users' documentation:
docs/hardware.md.

Preset sources (checked 2026; per GPU, bandwidths per direction):

- NVLink: H100 SXM and H200 SXM 900 GB/s bidirectional = 450 GB/s each way (NVIDIA H100 and H200 product pages,
  https://www.nvidia.com/en-us/data-center/h100/, https://www.nvidia.com/en-us/data-center/h200/); B200 1.8 TB/s
  = 900 GB/s each way (DGX B200: two NVLink 5 switches, 14.4 TB/s aggregate for 8 GPUs,
  https://docs.nvidia.com/dgx/dgxb200-user-guide/introduction-to-dgxb200.html).
- NICs: one 400 Gb/s ConnectX-7 per GPU = 50 GB/s in DGX H100, DGX H200 and DGX B200 (the DGX BasePOD reference
  architecture, https://docs.nvidia.com/dgx-basepod/reference-architecture-infrastructure-foundation-enterprise-ai/latest/core-components.html,
  and the DGX B200 user guide above; NVIDIA's HGX AI Factory reference architecture for H100, H200 and B200 is
  "2-8-9-400": 400 Gb/s per GPU). 800 Gb/s per GPU (ConnectX-8) is the HGX B300 configuration, not B200's: a B200
  cluster with 800 Gb/s NICs passes ``--inter-node-bandwidth 100GB``.
- HBM: H100 SXM 3.35 TB/s, H200 4.8 TB/s, B200 8 TB/s (the product pages above; HGX B200 64 TB/s for 8 GPUs,
  https://www.nvidia.com/en-us/data-center/hgx/).
- gpu_flops: the effective rate of an H100's grouped expert GEMMs that moeplace measured, 400 TFLOP/s
  (docs/benchmarks.md, "Expert compute on an H100"), not the datasheet peak; other GPUs scale it by the published
  dense BF16 Tensor Core peaks: H100 SXM and H200 989.4 TFLOP/s (1,979 with sparsity), HGX B200 2,250 TFLOP/s
  (36 PFLOP/s with sparsity for 8 GPUs). H200 has the H100's compute, so the same 400 TFLOP/s.
- expert_overhead: 0 (no published figure; ``moeplace calibrate`` measures it).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "moeplace.hardware"
VERSION = 1

# (field, what it is, may it be zero)
RATES = (("intra_node_bandwidth", "bytes/s per GPU and direction inside a node", False),
         ("inter_node_bandwidth", "bytes/s per GPU and direction between nodes", False),
         ("gpu_flops", "FLOP/s of the expert GEMMs", False),
         ("hbm_bandwidth", "bytes/s a GPU reads expert weights at", False),
         ("expert_overhead", "seconds per active expert per step", True))

H100_BF16_DENSE = 989.4e12  # H100 SXM BF16 Tensor Core, dense (1,979 TFLOP/s with sparsity)
H100_EFFECTIVE_FLOPS = 400e12  # moeplace's measured grouped-GEMM rate on an H100 SXM (docs/benchmarks.md)

_NVIDIA_DGX_NETWORK = ("NICs: one 400 Gb/s ConnectX-7 per GPU = 50 GB/s (NVIDIA DGX BasePOD reference architecture, "
                       "https://docs.nvidia.com/dgx-basepod/reference-architecture-infrastructure-foundation-"
                       "enterprise-ai/latest/core-components.html)")
_FLOPS_NOTE = ("gpu_flops: moeplace's measured H100 grouped-GEMM rate, 400 TFLOP/s (docs/benchmarks.md, \"Expert "
               "compute on an H100\")")


class HardwareError(ValueError):
    """An unusable hardware profile or name (one sentence naming the field and how to fix it)."""


@dataclass(frozen=True)
class Hardware:
    """A hardware profile (see the module docstring for the fields and their units)."""

    name: str
    source: str
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    gpu_flops: float
    hbm_bandwidth: float
    expert_overhead: float = 0.0
    gpus_per_node: int | None = None
    gemm_rate: tuple[tuple[float, float], ...] | None = None
    measured: dict = field(default_factory=dict)
    path: str | None = field(default=None, compare=False)  # the file it was read from, if any

    def cost_fields(self) -> dict[str, float]:
        """The :class:`solvers.cost.CostModel` fields this profile sets."""
        return {"gpu_flops": float(self.gpu_flops), "hbm_bandwidth": float(self.hbm_bandwidth),
                "expert_overhead": float(self.expert_overhead)}

    def bandwidths(self) -> tuple[float, float]:
        """``(intra-node, inter-node)`` bytes/s per GPU and direction, for :meth:`solvers.Topology.with_bandwidths`."""
        return float(self.intra_node_bandwidth), float(self.inter_node_bandwidth)

    def record(self) -> dict:
        """What a plan records about the profile it was made for (its provenance)."""
        rec: dict[str, Any] = {"name": self.name, "source": self.source}
        if self.path is not None:
            from placement.plan import file_sha256

            rec.update(file=self.path, sha256=file_sha256(self.path))
        return rec

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"format": FORMAT, "version": VERSION, "name": self.name, "source": self.source}
        d.update({k: float(getattr(self, k)) for k, _, _ in RATES})
        if self.gpus_per_node is not None:
            d["gpus_per_node"] = int(self.gpus_per_node)
        if self.gemm_rate is not None:
            d["gemm_rate"] = [[float(m), float(r)] for m, r in self.gemm_rate]
        d["measured"] = self.measured
        return d

    def describe(self) -> str:
        """One line for reports and progress output."""
        return (f"{self.name}: NVLink {self.intra_node_bandwidth / 1e9:.4g} GB/s, network "
                f"{self.inter_node_bandwidth / 1e9:.4g} GB/s per GPU and direction, {self.gpu_flops / 1e12:.4g} TFLOP/s, "
                f"HBM {self.hbm_bandwidth / 1e12:.4g} TB/s, {self.expert_overhead * 1e6:.3g} us per active expert")


def _preset(name: str, source: str, intra: float, inter: float, bf16_dense: float, hbm: float) -> Hardware:
    return Hardware(name=name, source=source, intra_node_bandwidth=intra, inter_node_bandwidth=inter,
                    gpu_flops=H100_EFFECTIVE_FLOPS * (bf16_dense / H100_BF16_DENSE), hbm_bandwidth=hbm,
                    expert_overhead=0.0, gpus_per_node=8)


PRESETS: dict[str, Hardware] = {
    "h100": _preset(
        "h100", "published figures: NVIDIA H100 SXM (https://www.nvidia.com/en-us/data-center/h100/): NVLink 900 GB/s "
        "= 450 GB/s per direction, HBM3 3.35 TB/s; " + _NVIDIA_DGX_NETWORK + "; " + _FLOPS_NOTE + "; 8 GPUs per "
        "node (DGX/HGX H100)", 450e9, 50e9, 989.4e12, 3.35e12),
    "h200": _preset(
        "h200", "published figures: NVIDIA H200 SXM (https://www.nvidia.com/en-us/data-center/h200/): NVLink 900 GB/s "
        "= 450 GB/s per direction, HBM3e 4.8 TB/s, the H100's BF16 peak (989.4 TFLOP/s dense); "
        + _NVIDIA_DGX_NETWORK + "; " + _FLOPS_NOTE + " (same compute as H100); 8 GPUs per node (DGX/HGX H200)",
        450e9, 50e9, 989.4e12, 4.8e12),
    "b200": _preset(
        "b200", "published figures: NVIDIA DGX B200 (https://docs.nvidia.com/dgx/dgxb200-user-guide/introduction-to-"
        "dgxb200.html): NVLink 5 14.4 TB/s aggregate for 8 GPUs = 1.8 TB/s per GPU = 900 GB/s per direction, eight "
        "400 Gb/s ConnectX-7 = 50 GB/s per GPU; HGX B200 (https://www.nvidia.com/en-us/data-center/hgx/): HBM3e "
        "8 TB/s per GPU, BF16 36 PFLOP/s with sparsity for 8 GPUs = 2,250 TFLOP/s dense per GPU; " + _FLOPS_NOTE
        + " scaled by 2,250 / 989.4 (dense BF16, B200 / H100) = 909.6 TFLOP/s; 8 GPUs per node", 900e9, 50e9,
        2250e12, 8e12),
}


def _number(d: dict, key: str, where: str, what: str, zero_ok: bool) -> float:
    if key not in d:
        raise HardwareError(f"{where} has no field '{key}' ({what}); add it or write the profile with moeplace "
                            f"calibrate")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
        need = "a number >= 0" if zero_ok else "a positive number"
        raise HardwareError(f"{where}: field '{key}' ({what}) must be {need}, got {v!r}")
    return float(v)


def from_dict(d: Any, where: str = "the hardware profile", path: str | None = None) -> Hardware:
    """A validated :class:`Hardware` from a profile's JSON object; a :class:`HardwareError` naming the first bad
    field otherwise."""
    if not isinstance(d, dict):
        raise HardwareError(f"{where} is not a JSON object; a hardware profile is an object with \"format\": "
                            f"\"{FORMAT}\"")
    if d.get("format") != FORMAT:
        raise HardwareError(f"{where}: field 'format' must be \"{FORMAT}\", got {d.get('format')!r}; is this a "
                            f"hardware profile (moeplace calibrate --out)?")
    if d.get("version") != VERSION or isinstance(d.get("version"), bool):
        raise HardwareError(f"{where}: field 'version' must be {VERSION}, got {d.get('version')!r}; this moeplace "
                            f"reads version {VERSION} profiles")
    for key in ("name", "source"):
        if not isinstance(d.get(key), str) or not d[key].strip():
            raise HardwareError(f"{where}: field '{key}' must be a non-empty string, got {d.get(key)!r}")
    rates = {k: _number(d, k, where, what, zero_ok) for k, what, zero_ok in RATES}
    gpn = d.get("gpus_per_node")
    if gpn is not None and (isinstance(gpn, bool) or not isinstance(gpn, int) or gpn < 1):
        raise HardwareError(f"{where}: field 'gpus_per_node' must be a positive integer, got {gpn!r}")
    gemm = d.get("gemm_rate")
    if gemm is not None:
        ok = isinstance(gemm, list) and all(
            isinstance(p, list) and len(p) == 2 and all(not isinstance(x, bool) and isinstance(x, (int, float))
                                                        and math.isfinite(x) and x > 0 for x in p) for p in gemm)
        if not ok:
            raise HardwareError(f"{where}: field 'gemm_rate' must be a list of [tokens per expert, FLOP/s] pairs of "
                                f"positive numbers")
        gemm = tuple((float(m), float(r)) for m, r in gemm)
    measured = d.get("measured", {})
    if not isinstance(measured, dict):
        raise HardwareError(f"{where}: field 'measured' must be an object, got {type(measured).__name__}")
    return Hardware(name=d["name"], source=d["source"], gpus_per_node=gpn, gemm_rate=gemm, measured=measured,
                    path=path, **rates)


def load(spec: str | os.PathLike) -> Hardware:
    """A profile file, or a preset name (``h100``, ``h200``, ``b200``) when no file of that name exists."""
    text = os.fspath(spec)
    p = Path(text)
    if not p.exists() and text.lower() in PRESETS:
        return PRESETS[text.lower()]
    if not p.exists():
        raise HardwareError(f"--hardware {text!r} is neither a file nor a preset; give a profile written by "
                            f"moeplace calibrate or one of {', '.join(PRESETS)}")
    if p.is_dir():
        raise HardwareError(f"--hardware {text} is a folder; give a hardware profile JSON file")
    try:
        d = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HardwareError(f"{text} is not valid JSON ({exc}); give a hardware profile written by moeplace "
                            f"calibrate") from None
    return from_dict(d, where=text, path=text)


def save(hw: Hardware, path: str | os.PathLike) -> None:
    """Write ``hw`` as a profile JSON file, atomically."""
    from traces.format import atomic_write_bytes

    data = (json.dumps(hw.to_dict(), indent=1) + "\n").encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def gpus_per_node(hw: Hardware | None, gpus: int, given: int | None) -> int | None:
    """``--gpus-per-node`` for a plan on ``gpus`` GPUs: ``given`` when given, else the profile's GPUs per node when
    ``gpus`` fills whole nodes of it (None, one node, when ``gpus`` fits in one)."""
    if given is not None or hw is None or hw.gpus_per_node is None or gpus <= hw.gpus_per_node:
        return given
    if gpus % hw.gpus_per_node:
        raise HardwareError(f"--gpus {gpus} does not fill whole nodes of {hw.gpus_per_node} GPUs (hardware "
                            f"{hw.name}); give --gpus-per-node")
    return hw.gpus_per_node
