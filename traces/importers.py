"""Import routing recorded by serving stacks into the interchange format.

Each importer reads the files exactly as the stack writes them (the structures below were checked against the
stacks' source code; see docs/collect.md) and returns a :class:`RoutingTrace` (per-token routing) or a
:class:`LoadProfile` (counts only).

- SGLang expert-distribution recorder (``--expert-distribution-recorder-mode``, files
  ``expert_distribution_recorder_*.pt`` in ``$SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``), in
  ``python/sglang/srt/eplb/expert_distribution.py``:

  - ``stat`` / ``stat_approx``: rank 0 writes ``{"rank", "logical_count" [steps, layers, E],
    "average_utilization_rate_over_window"}``; counts are already logical and summed over ranks.
  - ``per_token`` / ``per_pass``: every rank writes ``{"records": [...], "last_physical_to_logical_map"
    [layers, physical]}``; a ``per_token`` record holds ``input_ids``, ``positions``, ``extend_seq_lens``,
    ``forward_mode`` and ``topk_ids_of_layer`` int32 ``[layers, tokens, 8]`` of PHYSICAL expert ids (-1 where
    unused: dense layers, and columns past the model's top-k); a ``per_pass`` record holds
    ``global_physical_count`` ``[layers, physical]``. Rows are decoder layers, dense ones included.
    Physical ids are mapped to logical ids with ``last_physical_to_logical_map``; records that tensor-parallel
    ranks recorded identically are kept once.

- vLLM ``--enable-return-routed-experts``: per request, ``routed_experts`` ``[tokens, layers, top_k]`` of
  logical ids (``CompletionOutput.routed_experts``, a numpy array; in HTTP responses
  ``choices[i].routed_experts`` holds the ``np.save`` bytes of that array in base64). ``tokens`` are the
  forwarded tokens (prompt + completion - 1). In ``vllm/model_executor/layers/fused_moe/routed_experts_capturer.py``
  the layer axis has ``num_hidden_layers`` rows indexed by decoder layer, and rows of dense layers stay 0;
  such all-zero layers are dropped and the others kept with their decoder-layer index.

- TensorRT-LLM expert statistics (``EXPERT_STATISTIC_ITER_RANGE``, ``EXPERT_STATISTIC_PATH``), in
  ``tensorrt_llm/_torch/expert_statistic.py``: ``meta_info.json`` ``{"num_experts", "num_experts_per_token"}``
  and ``rank{r}.safetensors`` with one tensor per ``"{iter}_{layer}"`` holding the expert counts ``[E]`` of
  that rank. Ranks are summed, as TensorRT-LLM's own loader does; iterations become profiles.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np

from traces.filekind import kind, mismatch
from traces.format import LoadProfile, RoutingTrace, TraceError, note_input

__all__ = ["import_sglang", "import_vllm", "import_trtllm", "import_dump", "STACKS"]

STACKS = ("sglang", "vllm", "trtllm")


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _existing(paths, what: str) -> list[Path]:
    out = [Path(p) for p in paths]
    if not out:
        raise TraceError(f"no {what} given; pass the dump file(s) to import")
    for p in out:
        if not p.exists():
            raise TraceError(f"{p}: no such file; give the {what}")
        note_input(p)
    return out


# --------------------------------------------------------------------------------------------------------------
# SGLang
# --------------------------------------------------------------------------------------------------------------


def _torch_load(path: Path, allow_pickle: bool):
    k = kind(path)
    if k not in ("torch", "pickle"):
        raise TraceError(mismatch(path, "a torch.save file (SGLang's recorder dumps are)", k))
    try:
        import torch
    except ImportError:  # torch is an optional dependency
        raise TraceError(f"reading {path} needs torch (SGLang dumps are torch.save files), which this Python cannot "
                         f"import; install it with: pip install \"moeplace[torch]\"") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad input
        import pickle

        if path.stat().st_size == 0 or isinstance(exc, (EOFError, OSError)):
            hint = "; it is empty or truncated, copy it again"
        elif not allow_pickle and (isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc)):
            hint = "; it holds objects that only a full unpickling reads: if you trust the file, retry with --allow-pickle"
        else:
            hint = ""
        raise TraceError(f"{path} is not a readable torch.save file ({type(exc).__name__}){hint}") from None


def _sglang_segments(record: dict, n: int) -> list[int]:
    """Token counts of the requests in one forward pass (extend: ``extend_seq_lens``; decode: one each)."""
    lens = record.get("extend_seq_lens")
    if lens is not None:
        lens = [int(x) for x in _as_numpy(lens).reshape(-1)]
        if sum(lens) == n and all(x >= 0 for x in lens):
            return [x for x in lens if x > 0]
    return [1] * n


# SGLang's ForwardMode values as the per_token recorder stores them (``forward_batch.forward_mode.value``;
# python/sglang/srt/model_executor/forward_batch_info.py, IntEnum with auto() since v0.4): EXTEND 1, DECODE 2, MIXED 3
# (chunked prefill with decode requests), IDLE 4, then speculative decoding's TARGET_VERIFY and DRAFT_EXTEND (decode)
_SGLANG_EXTEND, _SGLANG_DECODE, _SGLANG_MIXED = 1, 2, 3


def _sglang_phase(mode, segments: list[int]) -> np.ndarray:
    """int8 phase of each token of one forward pass (0 prefill, 1 decode; -1 unknown): EXTEND prefill, DECODE and
    speculative verify / draft passes decode, MIXED by request (a request of one token is a decode step)."""
    n = int(sum(segments))
    if mode is None:
        return np.full(n, -1, dtype=np.int8)
    mode = int(_as_numpy(mode).reshape(-1)[0]) if not isinstance(mode, int) else mode
    if mode == _SGLANG_EXTEND:
        return np.zeros(n, dtype=np.int8)
    if mode == _SGLANG_MIXED:
        return np.repeat(np.array([1 if x == 1 else 0 for x in segments], dtype=np.int8), segments)
    return np.ones(n, dtype=np.int8) if mode == _SGLANG_DECODE or mode >= 5 else np.full(n, -1, dtype=np.int8)


def import_sglang(paths, *, allow_pickle: bool = False, moe_layer_index=None) -> RoutingTrace | LoadProfile:
    """Import SGLang expert-distribution recorder dumps (``.pt``; see the module docstring).

    ``stat`` and ``per_pass`` dumps give a :class:`LoadProfile` ``[N, L, E]`` (N = recorded steps / passes);
    ``per_token`` dumps give a :class:`RoutingTrace` with logical ids. MoE layers are the decoder layers that
    recorded any routing unless ``moe_layer_index`` names them.
    """
    paths = _existing(paths, "SGLang recorder dump (.pt)")
    dumps = []
    for p in paths:
        if p.is_dir():
            raise TraceError(f"{p} is a folder; give the expert_distribution_recorder_*.pt files in it")
        d = _torch_load(p, allow_pickle)
        if not isinstance(d, dict):
            raise TraceError(f"{p} holds a {type(d).__name__}, not an SGLang recorder dump (a dict)")
        if "logical_count" in d:
            dumps.append(("stat", p, d))
        elif "records" in d and "last_physical_to_logical_map" in d:
            dumps.append(("detail", p, d))
        else:
            raise TraceError(f"{p} is not an SGLang recorder dump: expected 'logical_count' (stat mode) or "
                             f"'records' + 'last_physical_to_logical_map' (per_token mode), found "
                             f"{', '.join(sorted(map(str, d))) or 'no keys'}")
    kinds = {k for k, _, _ in dumps}
    if len(kinds) > 1:
        raise TraceError("these files mix SGLang stat dumps and per_token dumps; import each mode on its own")
    if kinds == {"stat"}:
        return _sglang_stat(dumps, moe_layer_index)
    return _sglang_detail(dumps, moe_layer_index)


def _select_layers(recorded: np.ndarray, moe_layer_index, num_layers: int, what: str) -> np.ndarray:
    if moe_layer_index is not None:
        mli = np.asarray(moe_layer_index, dtype=np.int64)
        if mli.size == 0 or mli.min() < 0 or mli.max() >= num_layers:
            raise TraceError(f"--moe-layer-index must name layers in [0, {num_layers}) of the {what}")
        return mli
    mli = np.flatnonzero(recorded).astype(np.int64)
    if mli.size == 0:
        raise TraceError(f"the {what} recorded no routing at all (every layer is empty); record some traffic first")
    return mli


def _sglang_stat(dumps, moe_layer_index) -> LoadProfile:
    counts, names = [], []
    for _, p, d in dumps:
        c = _as_numpy(d["logical_count"]).astype(np.float64)
        if c.ndim == 2:
            c = c[None]
        if c.ndim != 3:
            raise TraceError(f"{p}: logical_count must be [steps, layers, experts], got shape {list(c.shape)}")
        keep = c.reshape(c.shape[0], -1).sum(axis=1) > 0  # unused slots of the recorder's circular buffer
        counts.append(c[keep])
        names += [f"{p.name}:step{i}" for i in np.flatnonzero(keep)]
    shapes = {c.shape[1:] for c in counts}
    if len(shapes) > 1:
        raise TraceError(f"the stat dumps disagree on [layers, experts]: {sorted(map(list, shapes))}")
    c = np.concatenate(counts)
    if c.shape[0] == 0:
        raise TraceError("the SGLang stat dumps hold no non-zero step; record some traffic before dumping")
    L_all = c.shape[1]
    mli = _select_layers(c.sum(axis=(0, 2)) > 0, moe_layer_index, L_all, "SGLang dump")
    return LoadProfile(c[:, mli], moe_layer_index=mli, num_hidden_layers=L_all,
                       source=" + ".join(str(p) for _, p, _ in dumps), names=names)


def _sglang_detail(dumps, moe_layer_index) -> RoutingTrace | LoadProfile:
    ids_parts, pos_parts, seq_parts, count_parts, names, phase_parts = [], [], [], [], [], []
    seen: dict = {}
    next_seq = 0
    L_all = E = None
    for _, p, d in dumps:
        p2l = _as_numpy(d["last_physical_to_logical_map"]).astype(np.int64)
        if p2l.ndim != 2:
            raise TraceError(f"{p}: last_physical_to_logical_map must be [layers, physical experts], got shape "
                             f"{list(p2l.shape)}")
        if L_all is None:
            L_all, E = p2l.shape[0], int(p2l.max()) + 1
        elif p2l.shape[0] != L_all or int(p2l.max()) + 1 != E:
            raise TraceError(f"{p} comes from another model layout than the first dump ({p2l.shape[0]} layers, "
                             f"{int(p2l.max()) + 1} experts vs {L_all}, {E})")
        P = p2l.shape[1]
        for r_i, rec in enumerate(d["records"]):
            if not isinstance(rec, dict):
                raise TraceError(f"{p}: record {r_i} is not a dict; is this an SGLang per_token dump?")
            if "topk_ids_of_layer" not in rec:
                if "global_physical_count" in rec:  # per_pass mode: counts per pass
                    g = _as_numpy(rec["global_physical_count"]).astype(np.float64)
                    if g.shape != (L_all, P):
                        raise TraceError(f"{p}: record {r_i} global_physical_count has shape {list(g.shape)}, "
                                         f"expected {[L_all, P]}")
                    logical = np.zeros((L_all, E))
                    np.add.at(logical, (np.arange(L_all)[:, None], p2l), g)
                    count_parts.append(logical)
                    names.append(f"{p.name}:pass{rec.get('forward_pass_id', r_i)}")
                    continue
                raise TraceError(f"{p}: record {r_i} has no topk_ids_of_layer; record with "
                                 f"--expert-distribution-recorder-mode per_token")
            topk = _as_numpy(rec["topk_ids_of_layer"]).astype(np.int64)
            input_ids = [int(x) for x in _as_numpy(rec.get("input_ids", [])).reshape(-1)]
            n = len(input_ids) if input_ids else topk.shape[1]
            if topk.ndim != 3 or topk.shape[0] != L_all or topk.shape[1] != n:
                raise TraceError(f"{p}: record {r_i} topk_ids_of_layer has shape {list(topk.shape)}, expected "
                                 f"[{L_all}, {n}, top_k] (layers, tokens, top_k)")
            if n == 0:
                continue
            if topk.max() >= P or topk.min() < -1:
                raise TraceError(f"{p}: record {r_i} holds physical expert ids outside [0, {P}); the dump and "
                                 f"its last_physical_to_logical_map do not match")
            positions = _as_numpy(rec.get("positions", np.arange(n))).astype(np.int64).reshape(-1)
            if positions.shape[0] != n:
                raise TraceError(f"{p}: record {r_i} has {positions.shape[0]} positions for {n} tokens")
            key = (rec.get("forward_pass_id"), np.asarray(input_ids, dtype=np.int64).tobytes(), positions.tobytes())
            digest = topk.tobytes()
            if seen.get(key) == digest:  # the same pass recorded by another tensor-parallel rank
                continue
            seen[key] = digest
            logical = np.where(topk >= 0, p2l[np.arange(L_all)[:, None, None], np.clip(topk, 0, None)], -1)
            ids_parts.append(logical.transpose(1, 0, 2))  # [n, L_all, 8]
            pos_parts.append(positions)
            segs = _sglang_segments(rec, n)
            seq_parts.append(np.repeat(np.arange(next_seq, next_seq + len(segs)), segs))
            phase_parts.append(_sglang_phase(rec.get("forward_mode"), segs))
            next_seq += len(segs)
    source = " + ".join(str(p) for _, p, _ in dumps)
    if count_parts and not ids_parts:
        c = np.stack(count_parts)
        mli = _select_layers(c.sum(axis=(0, 2)) > 0, moe_layer_index, L_all, "SGLang dump")
        return LoadProfile(c[:, mli], moe_layer_index=mli, num_hidden_layers=L_all, source=source, names=names)
    if not ids_parts:
        raise TraceError("the SGLang per_token dumps hold no tokens; record some traffic before dumping")
    ids = np.concatenate(ids_parts)
    mli = _select_layers((ids >= 0).any(axis=(0, 2)), moe_layer_index, L_all, "SGLang dump")
    ids = ids[:, mli]
    valid_cols = np.flatnonzero((ids >= 0).any(axis=(0, 1)))
    k = int(valid_cols.max()) + 1
    ids = ids[:, :, :k]
    keep = (ids >= 0).any(axis=(1, 2))  # tokens that reached no MoE layer (idle padding) are dropped
    try:
        phases = np.concatenate(phase_parts)
        return RoutingTrace(expert_ids=ids[keep], num_experts=E, seq_id=np.concatenate(seq_parts)[keep],
                            pos_in_seq=np.concatenate(pos_parts)[keep], moe_layer_index=mli, num_hidden_layers=L_all,
                            source=source, phase=None if (phases < 0).any() else phases[keep])
    except TraceError as exc:
        raise TraceError(f"SGLang dump {source}: {exc}") from None


# --------------------------------------------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------------------------------------------


def _decode_routed(value, where: str) -> np.ndarray:
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except (binascii.Error, ValueError, OSError, EOFError):
            raise TraceError(f"{where}: routed_experts is a string but not a base64-encoded .npy array (the "
                             f"format vLLM's HTTP server returns)") from None
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError):
            raise TraceError(f"{where}: routed_experts must be a [tokens, layers, top_k] array") from None
    if arr.ndim != 3 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise TraceError(f"{where}: routed_experts must be an integer [tokens, layers, top_k] array, got "
                         f"{arr.dtype} of shape {list(arr.shape)}")
    return arr.astype(np.int64)


def _vllm_from_json(obj, where: str) -> list[tuple[str, np.ndarray]]:
    out = []
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            out += _vllm_from_json(item, f"{where}[{i}]")
        return out
    if not isinstance(obj, dict):
        raise TraceError(f"{where} is not a JSON object holding routed_experts")
    rid = str(obj.get("id", obj.get("request_id", where)))
    if "choices" in obj:
        for c in obj["choices"]:
            if isinstance(c, dict) and c.get("routed_experts") is not None:
                out.append((f"{rid}:{c.get('index', len(out))}", _decode_routed(c["routed_experts"], where)))
    elif "outputs" in obj:  # RequestOutput-like dump: {"outputs": [{"routed_experts": ...}]}
        for j, c in enumerate(obj["outputs"]):
            if isinstance(c, dict) and c.get("routed_experts") is not None:
                out.append((f"{rid}:{j}", _decode_routed(c["routed_experts"], where)))
    elif obj.get("routed_experts") is not None:
        out.append((rid, _decode_routed(obj["routed_experts"], where)))
    return out


def _vllm_requests(path: Path) -> list[tuple[str, np.ndarray]]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return [(path.stem, _decode_routed(np.load(path, allow_pickle=False), str(path)))]
        except (ValueError, OSError, EOFError):
            raise TraceError(f"{path} is not a readable .npy array") from None
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as d:
                return [(f"{path.stem}:{k}", _decode_routed(d[k], f"{path}:{k}")) for k in d.files]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile):
            raise TraceError(f"{path} is not a readable .npz file; it may be truncated") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TraceError(f"{path} is not a UTF-8 text file; give .json/.jsonl responses or .npy/.npz arrays") from None
    out = []
    if suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from None
                out += _vllm_from_json(obj, f"{path}:{lineno}")
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path} is not valid JSON ({exc.msg}); give .json/.jsonl responses or .npy "
                             f"arrays") from None
        out = _vllm_from_json(obj, str(path))
    if not out:
        raise TraceError(f"{path} holds no routed_experts; start vLLM with --enable-return-routed-experts")
    return out


def import_vllm(paths, *, num_experts: int | None = None, moe_layer_index=None,
                num_hidden_layers: int | None = None) -> RoutingTrace:
    """Import vLLM routed experts (``--enable-return-routed-experts``), one sequence per request.

    Inputs: ``.npy`` (one request's ``[tokens, layers, top_k]``), ``.npz`` (one request per member), or
    ``.json`` / ``.jsonl`` holding OpenAI-style responses (``choices[i].routed_experts``, base64 ``.npy``) or
    objects with a ``routed_experts`` field (base64 or nested lists).

    Layers: all-zero layers (dense layers in vLLM's buffer) are dropped; ``moe_layer_index`` overrides.
    ``num_experts`` should be given (vLLM does not write it); otherwise the largest id + 1 is used.
    """
    paths = _existing(paths, "vLLM routed-experts file")
    reqs = []
    for p in paths:
        if p.is_dir():
            raise TraceError(f"{p} is a folder; give the .json/.jsonl/.npy files of routed experts in it")
        reqs += _vllm_requests(p)
    reqs = [(n, a) for n, a in reqs if a.shape[0] > 0]
    if not reqs:
        raise TraceError("the vLLM files hold no tokens")
    shapes = {a.shape[1:] for _, a in reqs}
    if len(shapes) > 1:
        raise TraceError(f"the requests disagree on [layers, top_k]: {sorted(map(list, shapes))}; import one "
                         f"model's output at a time")
    ids = np.concatenate([a for _, a in reqs])
    L_x = ids.shape[1]
    if moe_layer_index is not None:
        mli = np.asarray(moe_layer_index, dtype=np.int64)
        if mli.size == L_x:
            pass  # rows are MoE layers already; mli labels them
        elif mli.size and mli.min() >= 0 and mli.max() < L_x:
            ids = ids[:, mli]
            num_hidden_layers = num_hidden_layers or L_x
        else:
            raise TraceError(f"--moe-layer-index lists {mli.size} layers but the routed experts have {L_x} layer "
                             f"rows; give one index per row or indices of rows to keep")
    else:
        recorded = (ids != 0).any(axis=(0, 2))
        if not recorded.any():
            raise TraceError("every routed_experts entry is 0: nothing was recorded")
        if recorded.all():
            mli = np.arange(L_x, dtype=np.int64)
        else:
            mli = np.flatnonzero(recorded).astype(np.int64)
            ids = ids[:, mli]
            num_hidden_layers = num_hidden_layers or L_x
    if ids.min() < 0:
        raise TraceError("routed_experts contains negative expert ids; vLLM writes logical ids >= 0")
    E = int(num_experts) if num_experts is not None else int(ids.max()) + 1
    seq = np.repeat(np.arange(len(reqs), dtype=np.int64), [a.shape[0] for _, a in reqs])
    pos = np.concatenate([np.arange(a.shape[0], dtype=np.int64) for _, a in reqs])
    try:
        return RoutingTrace(expert_ids=ids, num_experts=E, seq_id=seq, pos_in_seq=pos, moe_layer_index=mli,
                            num_hidden_layers=num_hidden_layers, source=" + ".join(map(str, paths)))
    except TraceError as exc:
        raise TraceError(f"vLLM routed experts: {exc}") from None


# --------------------------------------------------------------------------------------------------------------
# TensorRT-LLM
# --------------------------------------------------------------------------------------------------------------

_TRT_KEY = re.compile(r"^(\d+)_(\d+)$")
_TRT_RANK = re.compile(r"^rank(\d+)\.safetensors$")


def import_trtllm(paths) -> LoadProfile:
    """Import TensorRT-LLM expert statistics: a folder (``EXPERT_STATISTIC_PATH``) or its ``meta_info.json``
    and ``rank*.safetensors`` files. Returns a :class:`LoadProfile` ``[iterations, L, E]`` (ranks summed)."""
    paths = _existing(paths, "TensorRT-LLM expert statistic folder or files")
    files: list[Path] = []
    for p in paths:
        files += sorted(p.iterdir()) if p.is_dir() else [p]
    metas = [f for f in files if f.name == "meta_info.json"]
    ranks = sorted((f for f in files if _TRT_RANK.match(f.name)), key=lambda f: int(_TRT_RANK.match(f.name)[1]))
    if not metas:
        raise TraceError("no meta_info.json among the TensorRT-LLM files; give the EXPERT_STATISTIC_PATH folder")
    if not ranks:
        raise TraceError("no rank*.safetensors among the TensorRT-LLM files; give the EXPERT_STATISTIC_PATH folder")
    try:
        meta = json.loads(metas[0].read_text())
        E = int(meta["num_experts"])
        k = int(meta.get("num_experts_per_token", 0))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise TraceError(f"{metas[0]} is not TensorRT-LLM's meta_info.json (needs num_experts)") from None
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    per_rank = []
    for f in ranks:
        try:
            per_rank.append(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise TraceError(f"{f} is not a readable safetensors file ({type(exc).__name__})") from None
    if len(per_rank) > 1 and all(r.keys() == per_rank[0].keys() and all(np.array_equal(r[x], per_rank[0][x])
                                                                       for x in r) for r in per_rank[1:]):
        per_rank = per_rank[:1]  # identical files: every rank saw the same tokens (tensor parallel); count once
    total: dict[tuple[int, int], np.ndarray] = {}
    for f, r in zip(ranks, per_rank):
        for key, value in r.items():
            m = _TRT_KEY.match(key)
            if m is None:
                raise TraceError(f"{f}: key {key!r} is not '{{iter}}_{{layer}}'; is this a TensorRT-LLM expert "
                                 f"statistic file?")
            v = np.asarray(value, dtype=np.float64).reshape(-1)
            if v.shape[0] != E:
                raise TraceError(f"{f}: {key} holds {v.shape[0]} counts but meta_info.json says {E} experts")
            it = (int(m[1]), int(m[2]))
            total[it] = total.get(it, 0) + v
    if not total:
        raise TraceError("the TensorRT-LLM statistic files hold no counts; check EXPERT_STATISTIC_ITER_RANGE")
    iters = sorted({i for i, _ in total})
    layers = sorted({l for _, l in total})
    c = np.zeros((len(iters), len(layers), E))
    ii = {v: n for n, v in enumerate(iters)}
    ll = {v: n for n, v in enumerate(layers)}
    for (i, l), v in total.items():
        c[ii[i], ll[l]] = v
    if k:
        sums = c.sum(axis=2)
        if np.any(np.abs(sums / k - np.round(sums / k)) > 1e-9):
            raise TraceError(f"counts per layer are not multiples of num_experts_per_token ({k}); the files are "
                             f"inconsistent")
    return LoadProfile(c, moe_layer_index=np.array(layers, dtype=np.int64),
                       source=" + ".join(str(f) for f in ranks), names=[f"iter{i}" for i in iters])


def import_dump(stack: str, paths, **options) -> RoutingTrace | LoadProfile:
    """Dispatch to the importer of ``stack`` ("sglang", "vllm" or "trtllm"). A file whose content is not what
    the stack writes (wrong types, strings where numbers belong, a damaged archive) is a :class:`TraceError`."""
    try:
        return _import_dump(stack, paths, **options)
    except TraceError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, EOFError, zipfile.BadZipFile) as exc:
        names = ", ".join(str(p) for p in paths)
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise TraceError(f"{names} is not a well-formed {stack} dump ({type(exc).__name__}: {first}); check "
                         f"that the file(s) are complete and come from {stack} unchanged") from None


def _import_dump(stack: str, paths, **options) -> RoutingTrace | LoadProfile:
    if stack == "sglang":
        return import_sglang(paths, allow_pickle=options.get("allow_pickle", False),
                             moe_layer_index=options.get("moe_layer_index"))
    if stack == "vllm":
        return import_vllm(paths, num_experts=options.get("num_experts"),
                           moe_layer_index=options.get("moe_layer_index"),
                           num_hidden_layers=options.get("num_hidden_layers"))
    if stack == "trtllm":
        return import_trtllm(paths)
    raise TraceError(f"unknown serving stack {stack!r}; use one of {', '.join(STACKS)}")
