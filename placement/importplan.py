"""Read a placement a serving stack runs today into a :class:`~placement.plan.Plan`, so it can be evaluated
against moeplace's plans on the same traces.

Formats (the same ones ``moeplace export`` writes, plus DeepSeek EPLB's output):

* ``sglang``: ``{"physical_to_logical_map": [num_hidden_layers, S]}`` as ``.json`` or ``.pt``
  (``--init-expert-location``).
  One row per decoder layer; which rows are MoE layers comes from ``moe_layer_index`` (else: all rows).
* ``vllm``: the JSON list of ``eplb_config.initial_expert_map_path`` (vLLM PR #49572): ``[L, S]`` or one shared row.
* ``trtllm``: the ``MoeLoadBalancerConfig`` YAML (``num_slots``, ``initial_global_assignments`` keyed by decoder layer).
* ``vllm-ascend``: ``{"moe_layer_count", "layer_list": [{"layer_id", "device_count", "device_list": [{"device_id",
  "device_expert"}]}]}``.
* ``eplb``: ``phy2log [L, S]`` as returned by DeepSeek EPLB's ``rebalance_experts`` (also vLLM/SGLang's vendored
  copies), saved as ``.npy``, ``.npz`` (key ``phy2log`` or a single array), ``.pt`` (tensor, dict with ``phy2log``
  or the ``(phy2log, log2phy, logcnt)`` tuple) or JSON (list or ``{"phy2log": ...}``).

Every format assumes physical slots contiguous per GPU, so ``S`` slots over ``G`` GPUs give slot ``s`` to GPU
``s // (S / G)``. Files that do not record the EP size (all but vllm-ascend) need ``num_gpus``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from placement.plan import Plan, PlanError, file_sha256
from solvers import SolverInputError, Topology

FORMATS = ("sglang", "vllm", "trtllm", "vllm-ascend", "eplb")


class PlacementImportError(PlanError):
    """A serving-stack placement file cannot be read as a plan (one sentence: what is wrong, how to fix it)."""


# reading files ---------------------------------------------------------------------------------------------

def _read_any(path: Path) -> Any:
    """File content as Python objects / numpy arrays, by suffix (JSON, YAML, .npy, .npz, .pt)."""
    from traces.filekind import kind, mismatch
    from traces.format import note_input

    note_input(path)
    suffix = path.suffix.lower()
    k = kind(path)
    expected = {".npy": ("npy",), ".npz": ("npz",), ".pt": ("torch", "pickle"), ".pth": ("torch", "pickle")}.get(
        suffix, ("json", "text", "sglang-placement", "counts-json", "plan"))
    if k not in expected and k not in ("missing", "folder"):
        what = f"a {suffix} placement file" if suffix in (".npy", ".npz", ".pt", ".pth") else \
            "a placement file (JSON or YAML)"
        raise PlacementImportError(mismatch(path, what, k))
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if suffix in (".pt", ".pth"):
            try:
                import torch
            except ImportError:
                raise PlacementImportError(f"reading {path} needs torch, which this Python cannot import; install "
                                           f"it with: pip install \"moeplace[torch]\"") from None

            obj = torch.load(path, map_location="cpu", weights_only=True)
            return _torch_to_numpy(obj)
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError, PermissionError, PlacementImportError):
        raise
    except UnicodeDecodeError:
        raise PlacementImportError(f"{path} is not a text file; placements come as JSON, YAML, .npy, .npz or .pt") \
            from None
    except Exception as exc:  # noqa: BLE001 - numpy/torch/zip raise many types for a damaged file
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise PlacementImportError(f"{path} could not be read as a {suffix or 'text'} placement file "
                                   f"({type(exc).__name__}: {first})") from None
    if suffix in (".yaml", ".yml"):
        return _yaml(text, path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if suffix == ".json":
            raise PlacementImportError(f"{path} is not valid JSON ({exc})") from None
        return _yaml(text, path)
    if isinstance(obj, dict) and obj.get("format") == "moeplace.plan":
        raise PlacementImportError(f"{path} is already a moeplace plan; give it to evaluate, report or export as it "
                                   "is (import-plan reads serving stacks' placement files)")
    return obj


def _yaml(text: str, path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlacementImportError(f"{path} is neither JSON nor YAML ({str(exc).splitlines()[0]})") from None


def _torch_to_numpy(obj: Any) -> Any:
    if hasattr(obj, "detach") and hasattr(obj, "numpy"):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _torch_to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_torch_to_numpy(v) for v in obj)
    return obj


def detect_format(data: Any) -> str | None:
    """Guess the format from the content; None if it looks like none of them."""
    if isinstance(data, dict):
        if "physical_to_logical_map" in data:
            return "sglang"
        if "initial_global_assignments" in data:
            return "trtllm"
        if "layer_list" in data or "moe_layer_count" in data:
            return "vllm-ascend"
        if "phy2log" in data or len(data) == 1:
            return "eplb"
        return None
    if isinstance(data, np.ndarray) or isinstance(data, tuple):
        return "eplb"
    if isinstance(data, list):
        return "vllm"
    return None


def _int_matrix(value: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except ValueError:
        raise PlacementImportError(f"{what} must be rows of equal length") from None
    if arr.dtype == object:
        raise PlacementImportError(f"{what} must be rows of equal length holding integer expert ids")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise PlacementImportError(f"{what} must hold integer expert ids, got {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise PlacementImportError(f"{what} must be a [layers, slots] matrix, got shape {list(arr.shape)}")
    return arr.astype(np.int64)


# per-format parsers: -> (phy2log [L, S], moe_layer_index or None, num_hidden_layers or None, num_gpus or None) ----

def _parse_sglang(data: Any, mli: np.ndarray | None):
    if not isinstance(data, dict) or "physical_to_logical_map" not in data:
        raise PlacementImportError("an SGLang placement is {\"physical_to_logical_map\": [[...], ...]}; this file has "
                                   "no such key (a {\"logical_count\": ...} file holds counts, not a placement)")
    rows = _int_matrix(data["physical_to_logical_map"], "physical_to_logical_map")
    H = rows.shape[0]
    if mli is None:
        dense = trivial_rows(rows)
        if dense.any() and not dense.all():  # the rows say which layers are dense: they hold the trivial map
            return rows[~dense], np.flatnonzero(~dense), H, None
        return rows, None, H, None
    if mli.max() >= H:
        raise PlacementImportError(f"the file has {H} decoder-layer rows but MoE layer {int(mli.max())} was requested; "
                                   f"is --like/--moe-layers for another model?")
    return rows[mli], None, H, None


def trivial_rows(rows: np.ndarray) -> np.ndarray:
    """``[H]`` bool: rows holding SGLang's trivial map (slot s -> expert s mod E, E = the largest id + 1), which is
    what SGLang and ``moeplace export`` write for dense decoder layers (DeepSeek's first layers)."""
    E = int(rows.max()) + 1 if rows.size else 0
    return (rows == np.arange(rows.shape[1]) % max(E, 1)).all(axis=1)


def _per_layer(rows: np.ndarray, ndim: int, mli: np.ndarray | None, what: str) -> np.ndarray:
    """``[L, S]`` rows: one row given as a list (``ndim`` 1) is shared by every MoE layer, which ``mli`` must count;
    otherwise the row count must match ``mli`` when it is known."""
    if ndim == 1:
        if mli is None:
            raise PlacementImportError(f"{what} is one row shared by all MoE layers; say how many MoE layers the model "
                                       f"has with --like (a trace or plan of the model) or --moe-layers")
        return np.repeat(rows, len(mli), axis=0)
    if mli is not None and len(mli) != rows.shape[0]:
        raise PlacementImportError(f"{what} has {rows.shape[0]} MoE-layer rows but {len(mli)} MoE layers were given; "
                                   f"is --like/--moe-layers for another model?")
    return rows


def _parse_vllm(data: Any, mli: np.ndarray | None):
    if not isinstance(data, (list, np.ndarray)):
        raise PlacementImportError("a vLLM initial expert map is a JSON list: one row of slots per MoE layer, or one "
                                   "shared row")
    rows = _per_layer(_int_matrix(data, "the vLLM expert map"), np.ndim(data), mli, "the vLLM map")
    return rows, None, None, None


def _parse_trtllm(data: Any, mli: np.ndarray | None):
    if not isinstance(data, dict) or "initial_global_assignments" not in data:
        raise PlacementImportError("a TensorRT-LLM load-balancer file needs 'initial_global_assignments' (decoder "
                                   "layer -> logical expert per slot)")
    assign = data["initial_global_assignments"]
    if not isinstance(assign, dict) or not assign:
        raise PlacementImportError("'initial_global_assignments' must map each MoE layer's decoder index to a list")
    try:
        keys = sorted(int(k) for k in assign)
    except (TypeError, ValueError):
        raise PlacementImportError("'initial_global_assignments' keys must be decoder-layer indices (integers)") \
            from None
    by_int = {int(k): v for k, v in assign.items()}
    rows = _int_matrix([by_int[k] for k in keys], "initial_global_assignments")
    slots = data.get("num_slots")
    if slots is not None and int(slots) != rows.shape[1]:
        raise PlacementImportError(f"num_slots is {slots} but the assignments have {rows.shape[1]} entries per layer")
    keys = np.asarray(keys, dtype=np.int64)
    if mli is not None and not np.array_equal(mli, keys):
        raise PlacementImportError(f"the file places MoE layers at decoder indices {keys.tolist()[:6]}... but "
                                   f"{mli.tolist()[:6]}... were given; is --like/--moe-layers for another model?")
    return rows, keys, None, None


def _parse_vllm_ascend(data: Any, mli: np.ndarray | None):
    if not isinstance(data, dict) or not isinstance(data.get("layer_list"), list):
        raise PlacementImportError("a vllm-ascend expert map needs a 'layer_list' of layers with 'device_list'")
    layers = data["layer_list"]
    count = data.get("moe_layer_count", len(layers))
    if int(count) != len(layers):
        raise PlacementImportError(f"moe_layer_count is {count} but layer_list has {len(layers)} layers")
    rows, G = [], None
    for pos, layer in enumerate(layers):
        lid = layer.get("layer_id", pos) if isinstance(layer, dict) else None
        if lid is None or int(lid) != pos:
            raise PlacementImportError(f"layer_list entry {pos} has layer_id {lid}; vllm-ascend reads layers by "
                                       f"position, so layer_id must count MoE layers from 0 in order")
        devices = layer.get("device_list")
        if not isinstance(devices, list) or not devices:
            raise PlacementImportError(f"layer {pos} has no device_list")
        if int(layer.get("device_count", len(devices))) != len(devices):
            raise PlacementImportError(f"layer {pos}: device_count {layer.get('device_count')} but "
                                       f"{len(devices)} devices listed")
        ids = [d.get("device_id", i) if isinstance(d, dict) else None for i, d in enumerate(devices)]
        if ids != list(range(len(devices))):
            raise PlacementImportError(f"layer {pos}: device_id must run 0..{len(devices) - 1} in order")
        lens = {len(d.get("device_expert", [])) for d in devices}
        if len(lens) != 1:
            raise PlacementImportError(f"layer {pos}: devices hold different numbers of experts ({sorted(lens)}); "
                                       f"a plan needs the same number of slots on every GPU")
        if G is not None and len(devices) != G:
            raise PlacementImportError(f"layer {pos} lists {len(devices)} devices, earlier layers {G}")
        G = len(devices)
        rows.append([x for d in devices for x in d["device_expert"]])
    rows = _int_matrix(rows, "device_expert")
    if mli is not None and len(mli) != rows.shape[0]:
        raise PlacementImportError(f"the file has {rows.shape[0]} MoE layers but {len(mli)} were given")
    return rows, None, None, G


def _parse_eplb(data: Any, mli: np.ndarray | None):
    arr = data
    if isinstance(data, dict):
        if "phy2log" in data:
            arr = data["phy2log"]
        elif len(data) == 1:
            arr = next(iter(data.values()))
        else:
            raise PlacementImportError(f"this file holds several arrays ({', '.join(map(str, data))}); name the "
                                       f"placement 'phy2log'")
    elif isinstance(data, (tuple, list)) and len(data) == 3 and all(isinstance(a, np.ndarray) for a in data):
        arr = data[0]  # (phy2log, log2phy, logcnt) as rebalance_experts returns them
    return _per_layer(_int_matrix(arr, "phy2log"), np.ndim(arr), mli, "phy2log"), None, None, None


_PARSERS = {"sglang": _parse_sglang, "vllm": _parse_vllm, "trtllm": _parse_trtllm,
            "vllm-ascend": _parse_vllm_ascend, "eplb": _parse_eplb}


MAX_DECODER_LAYERS = 10_000  # far above any model (DeepSeek-V3: 61); bounds what --moe-layers may expand to


def parse_layers(spec: str) -> np.ndarray:
    """``"1-26"``, ``"3,5,7"`` or ``"1-3,8"`` -> sorted decoder-layer indices (below :data:`MAX_DECODER_LAYERS`)."""
    out: list[int] = []
    try:
        for part in spec.replace(" ", "").split(","):
            if not part:
                raise ValueError("empty part")
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if a > b:
                    raise ValueError("reversed range")
            else:
                a = b = int(part)
            if b >= MAX_DECODER_LAYERS:
                raise PlacementImportError(f"--moe-layers {spec!r} reaches layer {b}; models have fewer than "
                                           f"{MAX_DECODER_LAYERS} decoder layers, give the MoE layers' indices")
            out.extend(range(a, b + 1))
    except PlacementImportError:  # a ValueError too: let it through as it is
        raise
    except ValueError:
        raise PlacementImportError(f"--moe-layers {spec!r} must look like 1-26 or 1,3,5") from None
    arr = np.asarray(sorted(set(out)), dtype=np.int64)
    if arr.size == 0 or arr.min() < 0:
        raise PlacementImportError(f"--moe-layers {spec!r} names no valid decoder layer")
    return arr


def import_placement(path: str | Path, fmt: str | None = None, *, num_gpus: int | None = None,
                     gpus_per_node: int | None = None, num_experts: int | None = None,
                     moe_layer_index=None, num_hidden_layers: int | None = None, model: str | None = None,
                     name: str | None = None) -> Plan:
    """Read a serving stack's placement file into a Plan.

    Args:
        path: the file.
        fmt: one of :data:`FORMATS`, or None to detect it from the content.
        num_gpus: EP size G (required unless the file records it: vllm-ascend).
        gpus_per_node: GPUs per node (default: all in one node).
        num_experts: E logical experts (default: largest id + 1).
        moe_layer_index: int ``[L]`` decoder index of each MoE layer (default: from the file where it is recorded,
            else ``0..L-1``); selects the MoE rows of an SGLang file.
        num_hidden_layers: decoder layers of the model (default: from the file or the last MoE index + 1).
    Returns:
        A Plan whose ``phy2log[L, S]`` keeps the file's slot order; solver ``{"name": name or "imported-<fmt>"}``.
    """
    p = Path(path)
    if not p.is_file():
        raise PlacementImportError(f"{p}: no such file")
    data = _read_any(p)
    fmt = fmt or detect_format(data)
    if fmt is None:
        raise PlacementImportError(f"cannot tell which stack {p} comes from; pass --format ({', '.join(FORMATS)})")
    if fmt not in _PARSERS:
        raise PlacementImportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    mli = None if moe_layer_index is None else np.asarray(moe_layer_index, dtype=np.int64)
    try:
        rows, file_mli, file_hidden, file_gpus = _PARSERS[fmt](data, mli)
    except PlacementImportError as exc:
        raise PlacementImportError(f"{p} ({fmt}): {exc}") from None

    L, S = rows.shape
    if rows.min() < 0:
        raise PlacementImportError(f"{p}: slot map holds negative expert ids; every slot must name an expert")
    E = int(num_experts) if num_experts is not None else int(rows.max()) + 1
    if rows.max() >= E:
        raise PlacementImportError(f"{p}: expert id {int(rows.max())} found but the model has {E} experts")
    G = file_gpus if file_gpus is not None else num_gpus
    if G is None:
        raise PlacementImportError(f"{p}: {fmt} files do not record the EP size; pass --gpus (the EP size the server "
                                   f"runs with, e.g. --gpus 8)")
    if num_gpus is not None and int(num_gpus) != G:
        raise PlacementImportError(f"{p} lists {G} devices but --gpus {num_gpus} was given")
    if S % G:
        raise PlacementImportError(f"{p}: {S} slots per layer do not split evenly over {G} GPUs; is --gpus right?")
    layer_index = file_mli if file_mli is not None else (mli if mli is not None else np.arange(L, dtype=np.int64))
    source = "file" if file_mli is not None else "given" if mli is not None else "assumed 0..L-1"
    note = None
    if fmt == "sglang" and mli is None:
        if file_mli is not None:
            source = "inferred: the other rows hold SGLang's trivial map (dense layers)"
            dense = sorted(set(range(file_hidden)) - set(file_mli.tolist()))
            rows_are = f"row {dense[0]} holds" if len(dense) == 1 else f"rows {_runs(dense)} hold"
            was = "was" if len(dense) == 1 else "were"
            note = (f"{p}: {rows_are} SGLang's trivial map and {was} read as dense layers, so the MoE layers are "
                    f"{_runs(file_mli.tolist())}; if that is wrong, give --moe-layers or --like")
        elif L > 1:
            note = (f"{p}: every row holds the same trivial map, so dense layers cannot be told apart: all {L} rows were "
                    f"read as MoE layers; if the model has dense layers, give --moe-layers (DeepSeek-V2-Lite: 1-26) or "
                    f"--like TRACE")
    hidden = num_hidden_layers if num_hidden_layers is not None else file_hidden
    if hidden is None:
        hidden = int(layer_index[-1]) + 1
    if file_hidden is not None and num_hidden_layers is not None and file_hidden != num_hidden_layers:
        raise PlacementImportError(f"{p} has {file_hidden} decoder-layer rows but the model has {num_hidden_layers}")
    try:
        topo = Topology(num_gpus=int(G), slots_per_gpu=S // int(G), gpus_per_node=gpus_per_node)
        plan = Plan(rows, E, topo, layer_index, int(hidden), model,
                    solver={"name": name or f"imported-{fmt}", "status": "imported", "seconds": 0.0},
                    provenance={"imported_from": {"path": str(p), "sha256": file_sha256(p), "format": fmt},
                                "moe_layer_index_source": source})
    except (SolverInputError, PlanError) as exc:
        raise PlacementImportError(f"{p} ({fmt}): {exc}") from None
    if note:
        plan.extra["note"] = note
    return plan


def _runs(values) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3,7"``."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)
