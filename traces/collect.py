"""Record the routing of a Hugging Face transformers MoE model, token by token, into a :class:`RoutingTrace`.

How it works: a forward hook on each MoE layer's router reads the top-k expert ids and gate weights the router
returned, i.e. exactly what the model then hands to its experts (for DeepSeek-V3-style grouped routing with
``e_score_correction_bias`` this is the biased, group-limited choice, not a re-derived top-k of the logits).
Where a router returns logits only, the ids and weights are read from the arguments the model passes to its
``experts`` module instead. Hooks keep references on the device during a forward pass; one gather per pass
moves ``[tokens, L, k]`` ids and weights to the host, so the collector costs little next to the forward.

Supported and verified (transformers 5.x, tiny random models in ``tests/test_collect.py``): Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, DeepSeek-V2, DeepSeek-V3, GPT-OSS. Other models are handled by a generic fallback: a module
named ``gate`` or ``router`` inside a decoder layer that returns top-k ids and weights, or an ``experts``
module called with ``(hidden_states, top_k_index, top_k_weights)`` (the transformers 5 convention). A model
with neither gets :class:`CollectError` naming its class.

Padding tokens are never recorded. Sequence ids and positions come from the caller (the JSONL record index
and the token position, prefill and generated tokens alike).

Streaming (:func:`collect`): tokens are written to ``shard-NNNNNN.npz`` files of bounded size in a shard folder
next to the output, with a ``manifest.json`` rewritten atomically after every shard; a killed run started again
with the same arguments resumes after the last complete shard. The shards are merged exactly into the output
(:func:`traces.merge.merge_files`).

torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from traces.format import RoutingTrace, TraceError, atomic_write_bytes, make_output_dir, note_input, save

__all__ = [
    "CollectError",
    "RouterSite",
    "RoutingRecorder",
    "SUPPORTED_MODEL_TYPES",
    "find_router_sites",
    "model_layout",
    "record_batch",
    "read_jsonl_sequences",
    "collect",
    "collect_from_checkpoint",
    "CollectSummary",
]


class CollectError(TraceError):
    """The model or the data cannot be collected from; the message is one sentence saying why and what to do."""


# Router modules whose forward returns ``(router_logits [N, E], top_k_weights [N, k], top_k_index [N, k])``
# in transformers 5.x, checked in each ``modeling_*.py``: model_type -> (router class name, weights_at, ids_at).
_KNOWN_ROUTERS: dict[str, tuple[str, int, int]] = {
    "mixtral": ("MixtralTopKRouter", 1, 2),
    "qwen2_moe": ("Qwen2MoeTopKRouter", 1, 2),
    "qwen3_moe": ("Qwen3MoeTopKRouter", 1, 2),
    "olmoe": ("OlmoeTopKRouter", 1, 2),
    "deepseek_v2": ("DeepseekV2TopkRouter", 1, 2),
    "deepseek_v3": ("DeepseekV3TopkRouter", 1, 2),
    "gpt_oss": ("GptOssTopKRouter", 1, 2),
}
SUPPORTED_MODEL_TYPES = tuple(_KNOWN_ROUTERS)

_EXPERT_COUNT_KEYS = ("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts", "num_routed_experts")
_TOPK_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "top_k", "moe_k")
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")


# --------------------------------------------------------------------------------------------------------------
# Finding the routers
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RouterSite:
    """One MoE layer's routing tap.

    Attributes:
        layer: decoder-layer index of the MoE layer.
        name: qualified module name of the router (or of the experts module for ``experts-input``).
        kind: ``"router-output"`` (forward hook on the router's return value) or ``"experts-input"`` (forward
            pre-hook on the experts module's ``(hidden, top_k_index, top_k_weights)`` arguments).
        ids_at, weights_at: positions in the output tuple / argument list; None: found by dtype and shape.
        fallback: an ``experts-input`` site of the same layer used when the router output has no top-k ids.
    """

    layer: int
    name: str
    module: Any
    kind: str
    ids_at: int | None = None
    weights_at: int | None = None
    fallback: "RouterSite | None" = None


def _text_config(model):
    cfg = model.config
    get = getattr(cfg, "get_text_config", None)
    if callable(get):
        try:
            return get()
        except TypeError:
            return cfg
    return cfg


def _config_int(cfg, keys, nested: bool = False) -> int | None:
    """First positive integer among ``keys`` of ``cfg`` (then of its sub-configs, e.g. DBRX's ``ffn_config``)."""
    get = (lambda c, k: c.get(k)) if isinstance(cfg, dict) else (lambda c, k: getattr(c, k, None))
    for key in keys:
        value = get(cfg, key)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
            return int(value)
    if nested:
        subs = cfg.values() if isinstance(cfg, dict) else [v for k, v in vars(cfg).items() if not k.startswith("_")]
        for sub in subs:
            if isinstance(sub, dict) or hasattr(sub, "to_dict"):
                value = _config_int(sub, keys)
                if value is not None:
                    return value
    return None


def _decoder_layers(model):
    """``(prefix, ModuleList)`` of the decoder layers: the ModuleList with num_hidden_layers entries holding the
    most parameters (so an audio/vision tower with as many blocks loses to the text decoder)."""
    import torch

    cfg = _text_config(model)
    n_layers = _config_int(cfg, _LAYER_KEYS)
    best, best_size = None, -1
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers):
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = (name, mod), size
    return best


def _is_plain_linear(mod) -> bool:
    import torch

    return type(mod) in (torch.nn.Linear,)


def _generic_sites(cls: str, prefix: str, layers) -> list[RouterSite]:
    """Per decoder layer: a ``gate``/``router`` module (not a bare Linear), else an ``experts`` module."""
    sites = []
    for i, layer in enumerate(layers):
        named = list(layer.named_modules())
        routers = [(n, m) for n, m in named if n and n.rsplit(".", 1)[-1] in ("gate", "router")
                   and not _is_plain_linear(m)]
        experts = [(n, m) for n, m in named if n and n.rsplit(".", 1)[-1] == "experts"
                   and type(m).__name__ != "ModuleList"]
        exp_site = None
        if len(experts) == 1:
            n, m = experts[0]
            exp_site = RouterSite(i, f"{prefix}.{i}.{n}", m, "experts-input")
        if len(routers) == 1:
            n, m = routers[0]
            sites.append(RouterSite(i, f"{prefix}.{i}.{n}", m, "router-output", fallback=exp_site))
        elif exp_site is not None:
            sites.append(exp_site)
        elif len(routers) > 1:
            raise CollectError(f"{cls} decoder layer {i} has several router-like modules "
                               f"({', '.join(n for n, _ in routers)}); moeplace cannot tell which one routes")
    return sites


def find_router_sites(model) -> list[RouterSite]:
    """The routing taps of ``model``, one per MoE layer, in decoder-layer order.

    Raises:
        CollectError: naming the model class when no router can be found.
    """
    cls = type(model).__name__
    cfg = _text_config(model)
    model_type = str(getattr(cfg, "model_type", "") or getattr(model.config, "model_type", ""))
    found = _decoder_layers(model)
    if found is None:
        raise CollectError(f"{cls} has no list of decoder layers that moeplace can find (looked for a ModuleList "
                           f"with num_hidden_layers entries); it cannot record its routing")
    prefix, layers = found
    sites: list[RouterSite] = []
    known = _KNOWN_ROUTERS.get(model_type)
    if known is not None:
        cls_name, w_at, i_at = known
        for i, layer in enumerate(layers):
            routers = [(n, m) for n, m in layer.named_modules() if type(m).__name__ == cls_name]
            if len(routers) > 1:
                raise CollectError(f"{cls} decoder layer {i} holds {len(routers)} {cls_name} modules; moeplace "
                                   f"expects one router per MoE layer")
            if routers:
                n, m = routers[0]
                sites.append(RouterSite(i, f"{prefix}.{i}.{n}", m, "router-output", i_at, w_at))
    if not sites:  # generic fallback (also if a known model's router class was renamed)
        sites = _generic_sites(cls, prefix, layers)
    if not sites:
        raise CollectError(
            f"found no MoE router in {cls} (model_type {model_type!r}): moeplace knows the routers of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} and, for other models, a module named 'gate' or 'router' that "
            f"returns top-k expert ids or an 'experts' module called with top-k ids; is this a dense model?")
    return sites


def model_layout(model, sites: list[RouterSite] | None = None) -> dict:
    """``{"num_experts", "top_k", "moe_layer_index", "num_hidden_layers", "model"}`` from the config and sites."""
    cfg = _text_config(model)
    sites = find_router_sites(model) if sites is None else sites
    E = _config_int(cfg, _EXPERT_COUNT_KEYS, nested=True)
    if E is None:
        mods = [getattr(m, "num_experts", None) for s in sites for m in (s.module, s.fallback and s.fallback.module)]
        mods = [m for m in mods if isinstance(m, int) and m > 0]
        E = mods[0] if mods else None
    if E is None:
        raise CollectError(f"{type(model).__name__}'s config names no expert count (looked for "
                           f"{', '.join(_EXPERT_COUNT_KEYS)}); moeplace cannot size the trace")
    name = getattr(model.config, "_name_or_path", None) or getattr(cfg, "model_type", None) or type(model).__name__
    return {"num_experts": int(E), "top_k": _config_int(cfg, _TOPK_KEYS, nested=True),
            "moe_layer_index": np.array([s.layer for s in sites], dtype=np.int64),
            "num_hidden_layers": _config_int(cfg, _LAYER_KEYS), "model": str(name)}


# --------------------------------------------------------------------------------------------------------------
# Recording one forward pass
# --------------------------------------------------------------------------------------------------------------


def _parse_topk(values, ids_at, weights_at):
    """``(ids [N, k] int, weights [N, k] float | None)`` from a router output / argument tuple, or None."""
    import torch

    if isinstance(values, torch.Tensor) or not isinstance(values, (tuple, list)):
        values = (values,)
    if ids_at is not None:
        ids = values[ids_at]
        w = values[weights_at] if weights_at is not None else None
        return ids, w
    ints = [v for v in values if isinstance(v, torch.Tensor) and v.dim() >= 2 and not v.is_floating_point()
            and v.dtype != torch.bool]
    if not ints:
        return None
    ids = ints[0]
    floats = [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == ids.shape]
    return ids, (floats[0] if floats else None)


class RoutingRecorder:
    """Hooks on a model's routers; use as a context manager around forward passes.

    Per pass: ``begin(valid)`` with the ``[B, S]`` bool mask of tokens to keep (padding False), run the model,
    then ``end()`` returns ``expert_ids`` int ``[T, L, k]`` and ``gate_weights`` float32 ``[T, L, k]`` (numpy)
    for the kept tokens in row-major ``[B, S]`` order. Every MoE layer must route exactly once per pass.
    """

    def __init__(self, model, sites: list[RouterSite] | None = None):
        self.model = model
        self.sites = find_router_sites(model) if sites is None else sites
        self.layout = model_layout(model, self.sites)
        self._handles: list = []
        self._active = False
        self._calls: list[list] = [[] for _ in self.sites]
        self._fallback_calls: list[list] = [[] for _ in self.sites]
        self._valid = None

    # hooks -------------------------------------------------------------------------------------------------
    def _out_hook(self, j: int):
        site = self.sites[j]

        def hook(module, args, output):
            if self._active:
                self._calls[j].append(_parse_topk(output, site.ids_at, site.weights_at))
        return hook

    def _pre_hook(self, j: int, store: list):
        def hook(module, args, kwargs):
            if self._active:
                values = list(args) + [kwargs[k] for k in ("top_k_index", "top_k_weights", "router_indices",
                                                           "routing_weights") if k in kwargs]
                parsed = _parse_topk(tuple(values[1:]), None, None) if len(values) > 1 else None
                store[j].append(parsed)
        return hook

    def attach(self) -> "RoutingRecorder":
        if self._handles:
            return self
        for j, site in enumerate(self.sites):
            if site.kind == "router-output":
                self._handles.append(site.module.register_forward_hook(self._out_hook(j)))
                if site.fallback is not None:
                    self._handles.append(site.fallback.module.register_forward_pre_hook(
                        self._pre_hook(j, self._fallback_calls), with_kwargs=True))
            else:
                self._handles.append(site.module.register_forward_pre_hook(self._pre_hook(j, self._calls),
                                                                           with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = False

    def __enter__(self) -> "RoutingRecorder":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # passes ------------------------------------------------------------------------------------------------
    def begin(self, valid) -> None:
        """Start a pass; ``valid`` is a bool tensor ``[B, S]`` (True = record this token)."""
        for c in self._calls:
            c.clear()
        for c in self._fallback_calls:
            c.clear()
        self._valid = valid
        self._active = True

    def end(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Finish a pass: ``(expert_ids [T, L, k] int64, gate_weights [T, L, k] float32 or None)``."""
        import torch

        self._active = False
        valid = self._valid.reshape(-1)
        N = int(valid.numel())
        cls = type(self.model).__name__
        ids_l, w_l = [], []
        for j, site in enumerate(self.sites):
            calls = [c for c in self._calls[j] if c is not None]
            if not calls and self._fallback_calls[j]:
                calls = [c for c in self._fallback_calls[j] if c is not None]
            if not calls:
                if self._calls[j] or self._fallback_calls[j]:
                    raise CollectError(f"{site.name} in {cls} returned no top-k expert ids (only logits?); "
                                       f"moeplace cannot tell which experts it chose")
                raise CollectError(f"{site.name} in {cls} was not called during the forward pass (a fused kernel "
                                   f"may have replaced the MoE block); load the model without custom kernels")
            if len(calls) != 1:
                raise CollectError(f"{site.name} in {cls} routed {len(calls)} times in one forward pass; moeplace "
                                   f"records one routing per MoE layer and pass (disable gradient checkpointing)")
            ids, w = calls[0]
            k = int(ids.shape[-1])
            ids = ids.reshape(-1, k)
            if ids.shape[0] != N:
                raise CollectError(f"{site.name} in {cls} routed {ids.shape[0]} tokens but the batch holds {N}; "
                                   f"moeplace expects one routing row per input token")
            ids_l.append(ids)
            w_l.append(None if w is None else w.reshape(-1, k))
        k = max(int(x.shape[1]) for x in ids_l)
        if any(int(x.shape[1]) != k for x in ids_l):  # heterogeneous top-k: pad with -1 / 0
            ids_l = [torch.nn.functional.pad(x, (0, k - x.shape[1]), value=-1) for x in ids_l]
            w_l = [None if w is None else torch.nn.functional.pad(w, (0, k - w.shape[1]), value=0.0) for w in w_l]
        dev = ids_l[0].device  # layers may sit on different devices (device_map): gather on the first one
        keep = valid.to(dev)
        ids = torch.stack([x.to(dev) for x in ids_l], dim=1)[keep]
        ids_np = ids.to("cpu", torch.int64).numpy()
        if any(w is None for w in w_l):
            return ids_np, None
        w = torch.stack([x.to(dev, torch.float32) for x in w_l], dim=1)[keep]
        return ids_np, w.to("cpu").numpy()


def _position_ids(mask):
    pos = mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def record_batch(model, recorder: RoutingRecorder, sequences: list[list[int]], *, pad_token_id: int = 0,
                 generate: int = 0, eos_token_id: int | list[int] | None = None, device=None) -> dict:
    """Run one batch (prefill, then ``generate`` greedy decode steps) and return its routing.

    Args:
        sequences: B token-id lists (non-empty).
        generate: greedy decode steps after the prefill (0: prefill only). A sequence stops being recorded
            after it produces ``eos_token_id``; the eos token itself is not fed back, as in a serving engine.

    Returns:
        ``{"expert_ids" [T, L, k], "gate_weights" [T, L, k] | None, "row" [T] (index into ``sequences``),
        "pos_in_seq" [T]}`` with tokens ordered by (sequence, position).
    """
    import torch

    B = len(sequences)
    lens = [len(s) for s in sequences]
    S = max(lens)
    left = generate > 0  # decoding appends at the right end, so pad prompts on the left
    ids = torch.full((B, S), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    for b, s in enumerate(sequences):
        sl = slice(S - len(s), S) if left else slice(0, len(s))
        ids[b, sl] = torch.tensor(s, dtype=torch.long)
        mask[b, sl] = 1
    dev = device if device is not None else model.get_input_embeddings().weight.device
    ids, mask = ids.to(dev), mask.to(dev)
    pos = _position_ids(mask)
    parts_ids, parts_w, parts_row, parts_pos = [], [], [], []
    rows = torch.arange(B, device=dev)[:, None].expand(B, S)

    def run(input_ids, attn, position_ids, valid, past=None):
        recorder.begin(valid)
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, past_key_values=past,
                    use_cache=generate > 0)
        e, w = recorder.end()
        parts_ids.append(e)
        parts_w.append(w)
        parts_row.append(rows[:, : valid.shape[1]][valid].cpu().numpy())
        parts_pos.append(position_ids[valid].cpu().numpy())
        return out

    with torch.inference_mode():
        valid = mask.bool()
        out = run(ids, mask, pos, valid)
        if generate > 0:
            eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
            finished = torch.zeros(B, dtype=torch.bool, device=dev)
            past = out.past_key_values
            next_pos = pos[:, -1:] + 1
            for _ in range(generate):
                nxt = out.logits[:, -1, :].argmax(-1)
                if eos:
                    finished |= torch.isin(nxt, torch.tensor(sorted(eos), device=dev))
                if bool(finished.all()):
                    break
                mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
                out = run(nxt[:, None], mask, next_pos, (~finished)[:, None], past)
                past = out.past_key_values
                next_pos = next_pos + 1
    e = np.concatenate(parts_ids)
    w = None if any(x is None for x in parts_w) else np.concatenate(parts_w)
    row = np.concatenate(parts_row)
    p = np.concatenate(parts_pos)
    order = np.lexsort((p, row))
    return {"expert_ids": e[order], "gate_weights": None if w is None else w[order], "row": row[order],
            "pos_in_seq": p[order]}


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def read_jsonl_sequences(path: str | os.PathLike, tokenizer=None, max_seq_len: int | None = None,
                         rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, list[int]]]:
    """Yield ``(record_index, token_ids)`` from a JSONL file, lazily.

    Each line is ``{"text": "..."}`` (tokenised with ``tokenizer``) or ``{"input_ids": [...]}``. The record
    index (0-based, blank lines skipped) is the sequence id. With ``world_size > 1`` only the records with
    ``index % world_size == rank`` are read, so ranks split the data without overlap. Sequences longer than
    ``max_seq_len`` are truncated; empty ones are skipped.
    """
    p = Path(path)
    if not p.is_file():
        raise CollectError(f"{p}: no such data file; give a JSONL file with one {{\"text\": ...}} or "
                           f"{{\"input_ids\": [...]}} per line")
    note_input(p)
    index = -1
    with open(p, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            index += 1
            if index % world_size != rank:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CollectError(f"{p}:{lineno} is not valid JSON ({exc.msg}); each line must be one JSON "
                                   f"object") from None
            if not isinstance(rec, dict):
                raise CollectError(f"{p}:{lineno} is not a JSON object; write {{\"text\": ...}} or "
                                   f"{{\"input_ids\": [...]}}")
            if "input_ids" in rec:
                toks = rec["input_ids"]
                if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                         for t in toks):
                    raise CollectError(f"{p}:{lineno}: input_ids must be a list of non-negative integers")
            elif "text" in rec:
                if not isinstance(rec["text"], str):
                    raise CollectError(f"{p}:{lineno}: text must be a string")
                if tokenizer is None:
                    raise CollectError(f"{p}:{lineno} holds text but the model folder has no tokenizer; add the "
                                       f"tokenizer files or give pre-tokenised {{\"input_ids\": [...]}} lines")
                toks = list(tokenizer(rec["text"])["input_ids"])
                if rec["text"].strip() and not toks:
                    raise CollectError(f"{p}:{lineno}: the tokenizer turned the text into no tokens; check the "
                                       f"tokenizer files in the model folder")
            else:
                raise CollectError(f"{p}:{lineno} has neither 'text' nor 'input_ids' (keys: "
                                   f"{', '.join(sorted(rec)) or 'none'})")
            if max_seq_len is not None:
                toks = toks[:max_seq_len]
            if toks:
                yield index, toks


# --------------------------------------------------------------------------------------------------------------
# Streaming collection with shards and resume
# --------------------------------------------------------------------------------------------------------------

_MANIFEST = "manifest.json"
_MANIFEST_VERSION = 1


@dataclass
class CollectSummary:
    """What a collection run did."""

    out: Path
    tokens: int
    sequences: int
    shards: int
    resumed_from_shard: int
    seconds: float
    num_experts: int
    top_k: int
    moe_layer_index: list[int]
    notes: list[str] = field(default_factory=list)


def _write_manifest(shard_dir: Path, manifest: dict) -> None:
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    atomic_write_bytes(shard_dir / _MANIFEST, lambda f: f.write(data))


def _load_manifest(shard_dir: Path, fingerprint: dict) -> dict | None:
    path = shard_dir / _MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise CollectError(f"{path} is unreadable; delete the folder {shard_dir} to start the collection "
                           f"afresh") from None
    old = manifest.get("fingerprint", {})
    diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if diff and not manifest.get("shards") and not manifest.get("next_index"):
        return None  # a run that stopped before its first shard: nothing to keep, start afresh
    if diff:
        raise CollectError(f"the shard folder {shard_dir} belongs to a different run (it differs in "
                           f"{', '.join(diff)}); delete it or give another --shard-dir")
    return manifest


def _shard_name(i: int) -> str:
    return f"shard-{i:06d}.npz"


class _ShardWriter:
    """Buffers whole sequences and writes a shard when ``shard_tokens`` are buffered."""

    def __init__(self, shard_dir: Path, manifest: dict, layout: dict, shard_tokens: int):
        self.dir, self.manifest, self.layout, self.shard_tokens = shard_dir, manifest, layout, shard_tokens
        self.parts: list[dict] = []
        self.buffered = 0

    def add(self, part: dict) -> None:
        self.parts.append(part)
        self.buffered += len(part["seq_id"])

    def flush(self, next_index: int, done: bool = False) -> bool:
        """Write the buffer as one shard (if non-empty) and record progress; returns True if a shard was written."""
        wrote = False
        if self.parts:
            arrays = {k: np.concatenate([p[k] for p in self.parts]) for k in ("expert_ids", "seq_id", "pos_in_seq")}
            gates = [p["gate_weights"] for p in self.parts]
            tr = RoutingTrace(expert_ids=arrays["expert_ids"], num_experts=self.layout["num_experts"],
                              gate_weights=None if any(g is None for g in gates) else np.concatenate(gates),
                              seq_id=arrays["seq_id"], pos_in_seq=arrays["pos_in_seq"],
                              moe_layer_index=self.layout["moe_layer_index"],
                              num_hidden_layers=self.layout["num_hidden_layers"], model=self.layout["model"])
            name = _shard_name(len(self.manifest["shards"]))
            save(tr, self.dir / name)
            self.manifest["shards"].append({"file": name, "tokens": tr.num_tokens,
                                            "sequences": int(np.unique(tr.seq_id).size)})
            self.manifest["tokens"] += tr.num_tokens
            self.parts, self.buffered, wrote = [], 0, True
        self.manifest["next_index"] = int(next_index)
        self.manifest["done"] = bool(done)
        _write_manifest(self.dir, self.manifest)
        return wrote


def collect(model, sequences: Iterable[tuple[int, list[int]]], out: str | os.PathLike, *, batch_size: int = 8,
            max_tokens: int | None = None, generate: int = 0, shard_dir: str | os.PathLike | None = None,
            shard_tokens: int = 262144, fingerprint: dict | None = None, keep_shards: bool = False,
            pad_token_id: int = 0, eos_token_id: int | list[int] | None = None,
            progress: Callable[[int, int], None] | None = None, compress: bool = True) -> CollectSummary:
    """Record the routing of ``model`` on ``sequences`` into the trace file ``out``, streaming through shards.

    Args:
        model: a transformers causal LM in eval mode on its device.
        sequences: ``(seq_id, token_ids)`` pairs in a deterministic order (a rerun must yield the same order
            for resume to be exact), e.g. :func:`read_jsonl_sequences`.
        batch_size: sequences per forward pass (right-padded; left-padded when ``generate`` > 0).
        max_tokens: stop after this many recorded tokens (the last batch is cut in (sequence, position) order).
        shard_dir: shard folder (default ``<out>.shards``); it holds ``manifest.json`` and ``shard-*.npz``.
        shard_tokens: tokens per shard; memory is bounded by one shard plus one batch.
        fingerprint: JSON-able description of the run; a resume with a different fingerprint is refused.
        progress: called as ``progress(tokens_done, sequences_done)`` after each batch.

    Returns:
        :class:`CollectSummary`. The output is written atomically; shards are removed unless ``keep_shards``.
    """
    from traces.merge import merge_files

    t0 = time.perf_counter()
    out = Path(out)
    shard_dir = Path(shard_dir) if shard_dir is not None else out.with_name(out.name + ".shards")
    if batch_size < 1:
        raise CollectError(f"batch size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise CollectError(f"--max-tokens must be >= 1, got {max_tokens}")
    if shard_tokens < 1:
        raise CollectError(f"shard size must be >= 1 token, got {shard_tokens}")
    recorder = RoutingRecorder(model)
    layout = recorder.layout
    fingerprint = dict(fingerprint or {})
    fingerprint.update({"batch_size": batch_size, "max_tokens": max_tokens, "generate": generate,
                        "num_experts": layout["num_experts"],
                        "moe_layer_index": [int(x) for x in layout["moe_layer_index"]]})
    make_output_dir(shard_dir)
    manifest = _load_manifest(shard_dir, fingerprint)
    notes: list[str] = []
    if manifest is None:
        manifest = {"version": _MANIFEST_VERSION, "fingerprint": fingerprint, "shards": [], "tokens": 0,
                    "next_index": 0, "done": False}
        _write_manifest(shard_dir, manifest)
    listed = {s["file"] for s in manifest["shards"]}
    for stray in shard_dir.glob("shard-*.npz"):  # written after the last manifest update: redo its sequences
        if stray.name not in listed:
            stray.unlink()
    for s in manifest["shards"]:
        if not (shard_dir / s["file"]).is_file():
            raise CollectError(f"shard {s['file']} listed in {shard_dir / _MANIFEST} is missing; delete "
                               f"{shard_dir} to start afresh")
    resumed_from = len(manifest["shards"])
    if resumed_from or manifest["next_index"]:
        notes.append(f"resumed after {resumed_from} shard(s), {manifest['tokens']} tokens")
    writer = _ShardWriter(shard_dir, manifest, layout, shard_tokens)
    tokens = manifest["tokens"]
    consumed = manifest["next_index"]
    budget_left = None if max_tokens is None else max_tokens - tokens
    done = bool(manifest["done"]) or (budget_left is not None and budget_left <= 0)

    def batches():
        it = iter(sequences)
        for _ in range(consumed):  # skip what the shards already hold
            if next(it, None) is None:
                return
        batch = []
        for item in it:
            batch.append(item)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    seqs_done = sum(s["sequences"] for s in manifest["shards"])
    if not done:
        with recorder:
            for batch in batches():
                rec = record_batch(model, recorder, [s for _, s in batch], pad_token_id=pad_token_id,
                                   generate=generate, eos_token_id=eos_token_id)
                sid = np.array([batch[r][0] for r in rec["row"]], dtype=np.int64)
                part = {"expert_ids": rec["expert_ids"], "gate_weights": rec["gate_weights"], "seq_id": sid,
                        "pos_in_seq": rec["pos_in_seq"].astype(np.int64)}
                n = len(sid)
                if budget_left is not None and n >= budget_left:
                    part = {k: (None if v is None else v[:budget_left]) for k, v in part.items()}
                    n = budget_left
                    done = True
                writer.add(part)
                tokens += n
                consumed += len(batch)
                seqs_done += int(np.unique(part["seq_id"]).size)
                if budget_left is not None:
                    budget_left -= n
                if progress is not None:
                    progress(tokens, seqs_done)
                if done:
                    break
                if writer.buffered >= shard_tokens:
                    writer.flush(consumed)
        writer.flush(consumed, done=True)
    if not manifest["shards"]:
        raise CollectError("no tokens were recorded: the data yielded no non-empty sequence")
    files = [shard_dir / s["file"] for s in manifest["shards"]]
    merged = merge_files(files, out, renumber="never", compress=compress)
    n_shards = len(files)
    if not keep_shards:
        for f in files:
            f.unlink()
        (shard_dir / _MANIFEST).unlink()
        try:
            shard_dir.rmdir()
        except OSError:
            pass
    return CollectSummary(out=out, tokens=int(manifest["tokens"]), sequences=int(seqs_done), shards=n_shards,
                          resumed_from_shard=resumed_from, seconds=time.perf_counter() - t0,
                          num_experts=layout["num_experts"], top_k=int(merged.top_k),
                          moe_layer_index=[int(x) for x in layout["moe_layer_index"]], notes=notes)


# --------------------------------------------------------------------------------------------------------------
# From a checkpoint folder (what `moeplace collect` runs)
# --------------------------------------------------------------------------------------------------------------


def _file_digest(path: Path, head: int = 1 << 20) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        h.update(f.read(head))
        if size > head:
            f.seek(max(size - head, head))
            h.update(f.read(head))
    h.update(str(size).encode())
    return h.hexdigest()[:16]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model", "tiktoken.model")


def _config_errors() -> tuple:
    """huggingface_hub's strict-dataclass errors (a config.json transformers rejects) are not ValueErrors."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


def load_checkpoint(model_dir: str | os.PathLike, device: str = "cpu", dtype: str = "auto",
                    trust_remote_code: bool = False):
    """``(model, tokenizer or None)`` from a local checkpoint folder; never touches the hub."""
    import torch

    p = Path(model_dir)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise CollectError(f"{p} is not a model folder with a config.json; give the local checkpoint folder "
                           f"(moeplace does not download models)")
    if not (device in ("cpu", "auto") or re.fullmatch(r"cuda(:\d+)?", device)):
        raise CollectError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto (spread over all GPUs)")
    if device != "cpu" and not torch.cuda.is_available():
        raise CollectError(f"--device {device} was given but no CUDA GPU is visible; use --device cpu")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dtypes = {"auto": (torch.float32 if device == "cpu" else torch.bfloat16), "float32": torch.float32,
              "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise CollectError(f"unknown dtype {dtype!r}; use one of {', '.join(dtypes)}")
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # moeplace shows its own progress
    try:
        try:
            placement = {"device_map": "auto"} if device == "auto" else {}
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dtypes[dtype], local_files_only=True,
                                                         trust_remote_code=trust_remote_code, **placement)
        except ImportError as exc:
            raise CollectError(f"loading {p} needs a package that is not installed ({exc}); --device auto needs "
                               f"accelerate") from None
        except (OSError, ValueError, KeyError, *_config_errors()) as exc:
            # huggingface_hub's config validation errors say what is wrong in their cause, on a second line
            shown = exc.__cause__ if exc.__cause__ is not None and not isinstance(exc, (OSError, KeyError)) else exc
            msg = str(shown).strip().splitlines()[0] if str(shown).strip() else type(shown).__name__
            raise CollectError(f"transformers could not load {p} ({msg.rstrip('.')}); check the folder holds a "
                               f"complete checkpoint (a valid config.json and weights)") from None
        tokenizer = None
        if any((p / name).is_file() for name in _TOKENIZER_FILES):
            try:
                tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True,
                                                          trust_remote_code=trust_remote_code)
            except (OSError, ValueError, KeyError, TypeError):
                tokenizer = None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if device != "auto":
        model.to(device)
    model.eval()
    return model, tokenizer


def collect_from_checkpoint(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                            batch_size: int = 8, max_tokens: int | None = None, device: str = "cpu",
                            dtype: str = "auto", generate: int = 0, max_seq_len: int | None = None,
                            shard_dir: str | os.PathLike | None = None, shard_tokens: int = 262144,
                            keep_shards: bool = False, rank: int = 0, world_size: int = 1,
                            trust_remote_code: bool = False,
                            progress: Callable[[int, int], None] | None = None) -> CollectSummary:
    """Load a local checkpoint, read JSONL data and :func:`collect` its routing into ``out``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise CollectError(f"rank must be in [0, world size), got rank {rank} of {world_size}")
    data = Path(data)
    if not data.is_file():
        raise CollectError(f"{data}: no such data file; give a JSONL file with one {{\"text\": ...}} or "
                           f"{{\"input_ids\": [...]}} per line")
    model, tokenizer = load_checkpoint(model_dir, device, dtype, trust_remote_code)
    cfg = _text_config(model)
    limit = max_seq_len or getattr(cfg, "max_position_embeddings", None)
    if limit is not None and generate > 0:  # leave room for the decoded tokens
        limit = max(1, limit - generate)
    vocab = getattr(cfg, "vocab_size", None)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    if not isinstance(pad, int) or pad < 0 or (vocab is not None and pad >= vocab):
        pad = 0  # padded positions are masked out; any id inside the vocabulary will do
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)

    def seqs():
        for sid, toks in read_jsonl_sequences(data, tokenizer, limit, rank, world_size):
            if vocab is not None and max(toks) >= vocab:
                raise CollectError(f"{data}: sequence {sid} holds token id {max(toks)} but the model's vocabulary "
                                   f"has {vocab} entries; tokenise with this model's tokenizer")
            yield sid, toks

    config_path = Path(model_dir) / "config.json"
    fingerprint = {"model_dir": str(Path(model_dir).resolve()), "config_sha": _file_digest(config_path),
                   "data": str(data.resolve()), "data_sha": _file_digest(data), "max_seq_len": limit,
                   "rank": rank, "world_size": world_size, "device": device, "dtype": dtype}
    return collect(model, seqs(), out, batch_size=batch_size, max_tokens=max_tokens, generate=generate,
                   shard_dir=shard_dir, shard_tokens=shard_tokens, fingerprint=fingerprint,
                   keep_shards=keep_shards, pad_token_id=int(pad), eos_token_id=eos, progress=progress)
