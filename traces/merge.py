"""Merge routing traces exactly: collector shards, ranks of a data-parallel run, or traces of several runs.

Merging concatenates tokens; it changes no routing value, so every statistic that sums over tokens (loads,
k x k transitions, co-activation; :class:`placement.affinity.AffinityStats`) of the merged trace equals the sum
over the inputs. Inputs must describe the same model layout (experts, top-k, MoE layers).

Sequence ids: inputs from one collection (shards, ranks that split the data by record index) have disjoint ids
and keep them. Inputs whose ids overlap (two separate runs) are renumbered by offsetting each later input above
the ids used before it (``renumber="auto"``), so two sequences never share an id.

:func:`merge_files` streams: it reads each input in row chunks and writes the ``.npz`` members directly, so the
memory used is one chunk, whatever the total size. Count files (``logical_count``) are stacked as profiles.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from traces.format import (
    LoadProfile,
    RoutingTrace,
    TraceError,
    _NpyRows,
    _open_npz,
    _scalar,
    atomic_write_bytes,
    load,
    save,
)

__all__ = ["MergeSummary", "merge_traces", "merge_files"]

_ROW_KEYS = ("expert_ids", "gate_weights", "seq_id", "pos_in_seq", "phase")
_CHUNK_ROWS = 1 << 16


@dataclass
class MergeSummary:
    """What a merge wrote."""

    out: Path
    kind: str  # "trace" or "counts"
    inputs: int
    tokens: int
    top_k: int
    num_experts: int
    renumbered: bool = False
    notes: list[str] = field(default_factory=list)


def _offsets(seq_sets: list[np.ndarray], renumber: str) -> tuple[list[int], bool]:
    """Per-input offsets added to seq ids; ``renumber`` is "auto", "always" or "never"."""
    if renumber not in ("auto", "always", "never"):
        raise TraceError(f"renumber must be 'auto', 'always' or 'never', got {renumber!r}")
    overlap = False
    if renumber == "auto":
        seen = np.zeros(0, dtype=np.int64)
        for s in seq_sets:
            if np.intersect1d(seen, s, assume_unique=True).size:
                overlap = True
                break
            seen = np.union1d(seen, s)
    if renumber == "never" or (renumber == "auto" and not overlap):
        return [0] * len(seq_sets), False
    offsets, base = [], 0
    for s in seq_sets:
        offsets.append(base)
        if s.size:
            base = base + int(s.max()) + 1
    return offsets, True


def layer_summary(moe_layer_index, max_runs: int = 4) -> str:
    """``"26 MoE layers (decoder layers 1-26)"``: a count and the index runs, at most ``max_runs`` of them shown."""
    idx = [int(x) for x in np.asarray(moe_layer_index).reshape(-1)]
    runs: list[list[int]] = []
    for x in idx:
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    shown = ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:max_runs])
    more = f",... ({len(runs) - max_runs} more runs)" if len(runs) > max_runs else ""
    return f"{len(idx)} MoE layer{'s' if len(idx) != 1 else ''} (decoder layers {shown}{more})"


def _check_layouts(metas: list[dict], names: list[str]) -> None:
    first = metas[0]
    for m, name in zip(metas[1:], names[1:]):
        for key, label in (("num_experts", "num_experts"), ("top_k", "top_k")):
            if m[key] != first[key]:
                raise TraceError(f"{name} has {label} {m[key]} but {names[0]} has {first[key]}; merge traces of one "
                                 f"model layout only")
        if not np.array_equal(m["moe_layer_index"], first["moe_layer_index"]):
            raise TraceError(f"{name} records {layer_summary(m['moe_layer_index'])} but {names[0]} records "
                             f"{layer_summary(first['moe_layer_index'])}; merge traces of one model layout only")
        a, b = m.get("num_hidden_layers"), first.get("num_hidden_layers")
        if a is not None and b is not None and a != b:
            raise TraceError(f"{name} has {a} decoder layers but {names[0]} has {b}; merge traces of one model only")


def merge_traces(traces: list[RoutingTrace], renumber: str = "auto") -> RoutingTrace:
    """Concatenate in-memory traces (same layout) into one; see the module docstring for sequence ids."""
    if not traces:
        raise TraceError("nothing to merge: give at least one trace")
    metas = [{"num_experts": t.num_experts, "top_k": t.top_k, "moe_layer_index": t.moe_layer_index,
              "num_hidden_layers": t.num_hidden_layers} for t in traces]
    _check_layouts(metas, [str(t.source or f"trace {i}") for i, t in enumerate(traces)])
    has = {k: all(getattr(t, k) is not None for t in traces) for k in ("gate_weights", "seq_id", "pos_in_seq", "phase")}
    offsets = [0] * len(traces)
    if has["seq_id"]:
        offsets, _ = _offsets([np.unique(t.seq_id) for t in traces], renumber)
    first = traces[0]
    nhl = next((t.num_hidden_layers for t in traces if t.num_hidden_layers is not None), None)
    return replace(
        first,
        expert_ids=np.concatenate([t.expert_ids for t in traces]),
        gate_weights=np.concatenate([t.gate_weights for t in traces]) if has["gate_weights"] else None,
        seq_id=np.concatenate([t.seq_id + o for t, o in zip(traces, offsets)]) if has["seq_id"] else None,
        pos_in_seq=np.concatenate([t.pos_in_seq for t in traces]) if has["pos_in_seq"] else None,
        phase=np.concatenate([t.phase for t in traces]) if has["phase"] else None,
        num_hidden_layers=nhl,
        source=" + ".join(str(t.source) for t in traces),
    )


def _npy_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple, np.dtype]:
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(shape), dtype


def _file_meta(path: Path) -> dict:
    """Layout and row-member headers of a trace file, reading no token rows."""
    with _open_npz(path) as d:
        files = set(d.files)
        if "expert_ids" not in files:
            if "logical_count" in files:
                return {"kind": "counts"}
            raise TraceError(f"{path} has neither 'expert_ids' (token trace) nor 'logical_count' (counts)")
        if "num_experts" not in files:
            raise TraceError(f"{path} has no 'num_experts'; add it (the routed experts per MoE layer)")
        meta = {"kind": "trace", "num_experts": _scalar(d, "num_experts", int, path),
                "num_hidden_layers": _scalar(d, "num_hidden_layers", int, path) if "num_hidden_layers" in files
                else None, "model": str(d["model"]) if "model" in files else None}
        mli = d["moe_layer_index"] if "moe_layer_index" in files else None
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        heads = {k: _npy_header(zf, k + ".npy") for k in _ROW_KEYS if k + ".npy" in names}
    shape = heads["expert_ids"][0]
    if len(shape) != 3:
        raise TraceError(f"{path}: expert_ids must have rank 3 [tokens, moe_layers, top_k], got shape {list(shape)}")
    for k, (s, _) in heads.items():
        if s[:1] != shape[:1]:
            raise TraceError(f"{path}: {k} has {s[0] if s else 0} rows but expert_ids has {shape[0]} tokens")
    meta.update({"tokens": int(shape[0]), "top_k": int(shape[2]), "num_layers": int(shape[1]),
                 "moe_layer_index": np.arange(shape[1]) if mli is None else np.asarray(mli, dtype=np.int64),
                 "members": set(heads)})
    return meta


def _stream_rows(path: Path, key: str):
    with zipfile.ZipFile(path) as zf:
        reader = _NpyRows(zf, key + ".npy")
        try:
            total = reader.shape[0]
            for start in range(0, total, _CHUNK_ROWS):
                yield reader.read(min(_CHUNK_ROWS, total - start))
        finally:
            reader.close()


def _unique_seq_ids(path: Path) -> np.ndarray:
    parts = [np.unique(chunk) for chunk in _stream_rows(path, "seq_id")]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def merge_files(paths: list[str | os.PathLike], out: str | os.PathLike, renumber: str = "auto",
                compress: bool = True) -> MergeSummary:
    """Merge trace files (or count files) into ``out``, streaming; written atomically.

    Every input is validated chunk by chunk as it is copied (ids in range, distinct per token, weights finite).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise TraceError("nothing to merge: give at least one trace file")
    out = Path(out)
    if any(p.resolve() == out.resolve() for p in paths if p.exists()):
        raise TraceError(f"{out} is also an input; write the merged trace to a new file")
    metas = [_file_meta(p) for p in paths]
    kinds = {m["kind"] for m in metas}
    if kinds == {"counts"}:
        profiles = [load(p) for p in paths]
        merged = LoadProfile.concat(profiles)
        save(merged, out, compress=compress)
        return MergeSummary(out, "counts", len(paths), 0, 0, merged.num_experts)
    if kinds != {"trace"}:
        raise TraceError("cannot merge token traces with count files; merge each kind on its own")
    _check_layouts(metas, [str(p) for p in paths])
    notes: list[str] = []
    present = {k: all(k in m["members"] for m in metas) for k in _ROW_KEYS}
    for k in ("gate_weights", "seq_id", "pos_in_seq", "phase"):
        if not present[k] and any(k in m["members"] for m in metas):
            notes.append(f"{k} dropped: not every input has it")
    offsets, renumbered = [0] * len(paths), False
    if present["seq_id"]:
        offsets, renumbered = _offsets([_unique_seq_ids(p) for p in paths], renumber)
        if renumbered:
            notes.append("sequence ids overlapped between inputs and were renumbered")
    first = metas[0]
    E = first["num_experts"]
    T = sum(m["tokens"] for m in metas)
    L, k = first["num_layers"], first["top_k"]
    dtypes = {"expert_ids": np.dtype(np.int16 if E < 32767 else np.int32), "gate_weights": np.dtype(np.float32),
              "seq_id": np.dtype(np.int64), "pos_in_seq": np.dtype(np.int64), "phase": np.dtype(np.int8)}
    shapes = {"expert_ids": (T, L, k), "gate_weights": (T, L, k), "seq_id": (T,), "pos_in_seq": (T,), "phase": (T,)}
    nhl = next((m["num_hidden_layers"] for m in metas if m["num_hidden_layers"] is not None), None)
    model = next((m["model"] for m in metas if m["model"] is not None), None)

    def check_chunk(path: Path, key: str, chunk: np.ndarray) -> None:
        if key == "expert_ids":
            try:
                RoutingTrace(expert_ids=chunk, num_experts=E, moe_layer_index=first["moe_layer_index"])
            except TraceError as exc:
                raise TraceError(f"{path}: {exc}") from None
        elif key == "gate_weights" and not np.all(np.isfinite(chunk)):
            raise TraceError(f"{path}: gate_weights contains NaN or infinite values; re-record the trace")
        elif key in ("seq_id", "pos_in_seq") and chunk.size and chunk.min() < 0:
            raise TraceError(f"{path}: {key} contains negative values")
        elif key == "phase" and chunk.size and not np.isin(chunk, (0, 1)).all():
            raise TraceError(f"{path}: phase must be 0 (prefill) or 1 (decode) per token")

    def write(f) -> None:
        comp = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        with zipfile.ZipFile(f, "w", compression=comp, allowZip64=True) as zf:
            for key in _ROW_KEYS:
                if not present[key]:
                    continue
                with zf.open(key + ".npy", "w", force_zip64=True) as m:
                    np.lib.format.write_array_header_1_0(
                        m, {"descr": np.lib.format.dtype_to_descr(dtypes[key]), "fortran_order": False,
                            "shape": shapes[key]})
                    for path, off in zip(paths, offsets):
                        for chunk in _stream_rows(path, key):
                            check_chunk(path, key, chunk)
                            if key == "seq_id" and off:
                                chunk = chunk.astype(np.int64) + off
                            m.write(np.ascontiguousarray(chunk, dtype=dtypes[key]).tobytes())
            small = {"num_experts": np.int64(E), "top_k": np.int64(k), "moe_layer_index": first["moe_layer_index"]}
            if nhl is not None:
                small["num_hidden_layers"] = np.int64(nhl)
            if model is not None:
                small["model"] = np.array(model)
            for key, value in small.items():
                with zf.open(key + ".npy", "w") as m:
                    np.lib.format.write_array(m, np.asarray(value), allow_pickle=False)

    atomic_write_bytes(out, write)
    return MergeSummary(out, "trace", len(paths), T, k, E, renumbered, notes)
