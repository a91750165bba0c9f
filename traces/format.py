"""Trace formats: token-level routing traces and counts-only load profiles.

The interchange format is a ``.npz`` file (see docs/formats.md):

- ``expert_ids`` int ``[T, L, k]`` (-1 where a token did not reach a layer), required for a token trace
- ``gate_weights`` float ``[T, L, k]``, optional; ``seq_id`` int ``[T]``, optional; ``pos_in_seq`` int ``[T]``,
  optional
- ``moe_layer_index`` int ``[L]``, ``num_experts`` int, ``top_k`` int; optional ``num_hidden_layers``, ``model``
- counts-only input: ``logical_count`` ``[L, E]`` or ``[N, L, E]`` (as SGLang's recorder writes it)

Everything is validated once, at load/construction time (:func:`validate_routing`), with one sentence per
problem raised as :class:`TraceError`. Code inside the project trusts a constructed object.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from traces.filekind import kind, mismatch, what_to_do
from traces.outputs import (OutputPathError, atomic_write_bytes, check_output_path, command_files,  # noqa: F401
                            make_output_dir, note_input)

__all__ = [
    "TraceError",
    "RoutingTrace",
    "LoadProfile",
    "load",
    "load_trace",
    "save",
    "iter_trace_chunks",
    "atomic_write_bytes",
    "OutputPathError",
    "note_input",
    "command_files",
    "make_output_dir",
]


class TraceError(ValueError):
    """A trace or counts file is unusable; the message is one sentence saying what and how to fix it."""


# --------------------------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------------------------


def _default_layer_index(num_layers: int) -> np.ndarray:
    return np.arange(num_layers, dtype=np.int64)


PHASES = ("prefill", "decode")  # the values 0 and 1 of RoutingTrace.phase


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """Per-token routing of an MoE model.

    Attributes:
        expert_ids: int ``[T, L, k]``, logical expert ids, -1 where the token did not reach the layer.
        num_experts: E, logical routed experts per MoE layer.
        gate_weights: float32 ``[T, L, k]`` or None; the router weight of each chosen expert.
        seq_id: int64 ``[T]`` or None; the sequence (request) each token belongs to.
        pos_in_seq: int64 ``[T]`` or None; position of the token inside its sequence.
        moe_layer_index: int64 ``[L]``: decoder-layer index of each MoE layer (strictly increasing).
        num_hidden_layers: decoder layers of the model (dense ones included), or None if unknown.
        model: free-form model name.
        source: where the trace came from (file path or dataset name), for provenance.
        phase: int8 ``[T]`` or None; the serving phase of each token's forward pass: 0 prefill (or extend), 1 decode
            (:data:`PHASES`).
    """

    expert_ids: np.ndarray
    num_experts: int
    gate_weights: np.ndarray | None = None
    seq_id: np.ndarray | None = None
    pos_in_seq: np.ndarray | None = None
    moe_layer_index: np.ndarray | None = None
    num_hidden_layers: int | None = None
    model: str | None = None
    source: str | None = None
    phase: np.ndarray | None = None

    def __post_init__(self) -> None:
        validate_routing(
            self.expert_ids, self.num_experts, self.gate_weights, self.seq_id, self.pos_in_seq,
            self.moe_layer_index, self.num_hidden_layers,
        )
        if self.phase is not None:
            ph = np.asarray(self.phase)
            if ph.shape != (self.expert_ids.shape[0],) or (ph.size and not np.isin(ph, (0, 1)).all()):
                raise TraceError(f"phase must be [T] = [{self.expert_ids.shape[0]}] with 0 (prefill) or 1 (decode) per "
                                 f"token, got shape {list(ph.shape)}")
            object.__setattr__(self, "phase", ph.astype(np.int8))
        ids = self.expert_ids
        dtype = np.int16 if self.num_experts < 32767 else np.int32
        if ids.dtype != dtype:
            object.__setattr__(self, "expert_ids", ids.astype(dtype))
        if self.moe_layer_index is None:
            object.__setattr__(self, "moe_layer_index", _default_layer_index(ids.shape[1]))
        else:
            object.__setattr__(self, "moe_layer_index", np.asarray(self.moe_layer_index, dtype=np.int64))
        if self.gate_weights is not None and self.gate_weights.dtype != np.float32:
            object.__setattr__(self, "gate_weights", self.gate_weights.astype(np.float32))
        for name in ("seq_id", "pos_in_seq"):
            value = getattr(self, name)
            if value is not None and value.dtype != np.int64:
                object.__setattr__(self, name, value.astype(np.int64))
        object.__setattr__(self, "num_experts", int(self.num_experts))

    # shapes -------------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    @property
    def decoder_layers(self) -> int:
        """Decoder layer count: given, or inferred as the last MoE layer's index + 1."""
        if self.num_hidden_layers is not None:
            return int(self.num_hidden_layers)
        return int(self.moe_layer_index[-1]) + 1

    @property
    def num_sequences(self) -> int:
        return int(np.unique(self.seq_id).size) if self.seq_id is not None else 0

    # derived views ------------------------------------------------------------------------------------------
    def sequence_index(self) -> np.ndarray:
        """Dense sequence index ``[T]`` (0..n_seq-1 in order of first seq_id value), or the token index if no
        seq_id is recorded. The evaluator's home GPU of a token is this index mod G."""
        if self.seq_id is None:
            return np.arange(self.num_tokens, dtype=np.int64)
        _, inverse = np.unique(self.seq_id, return_inverse=True)
        return inverse.astype(np.int64)

    def top1_ids(self) -> np.ndarray:
        """``[T, L]`` the highest-gate expert per token and layer (-1 if none). Needs gate weights."""
        if self.gate_weights is None:
            raise TraceError("this trace has no gate_weights, so its top-1 expert is unknown; record gate weights "
                             "or use the k x k metrics")
        w = np.where(self.expert_ids >= 0, self.gate_weights, -np.inf)
        arg = np.argmax(w, axis=2)
        return np.take_along_axis(self.expert_ids, arg[..., None], axis=2)[..., 0]

    def sorted_by_gate(self) -> "RoutingTrace":
        """The same trace with each token's k experts sorted by gate weight, highest first (no-op without gates)."""
        if self.gate_weights is None:
            return self
        w = np.where(self.expert_ids >= 0, self.gate_weights, -np.inf)
        order = np.argsort(-w, axis=2, kind="stable")
        return replace(self, expert_ids=np.take_along_axis(self.expert_ids, order, axis=2),
                       gate_weights=np.take_along_axis(self.gate_weights, order, axis=2))

    def take(self, index: np.ndarray) -> "RoutingTrace":
        """Sub-trace of the tokens selected by a boolean mask or integer index ``[T']``."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return replace(self, expert_ids=self.expert_ids[index], gate_weights=pick(self.gate_weights),
                       seq_id=pick(self.seq_id), pos_in_seq=pick(self.pos_in_seq), phase=pick(self.phase))

    def of_phase(self, phase: str) -> "RoutingTrace":
        """The tokens of one serving phase (``"prefill"`` or ``"decode"``); :class:`TraceError` when the trace does
        not record phases or has no token of that phase."""
        if phase not in PHASES:
            raise TraceError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
        if self.phase is None:
            raise TraceError("this trace does not record each token's phase (prefill or decode); record it (SGLang's "
                             "per-token recorder does) or plan on all tokens")
        mask = self.phase == PHASES.index(phase)
        if not mask.any():
            raise TraceError(f"this trace has no {phase} token; plan another phase or on all tokens")
        return self.take(mask)

    def split_by_sequence(self, fit_fraction: float = 0.5, seed: int = 0) -> tuple["RoutingTrace", "RoutingTrace"]:
        """Split into (fit, held-out) by whole sequences, chosen at random with ``seed``.

        Without seq_id the first ``fit_fraction`` of tokens is the fit part. Both parts are non-empty.
        """
        if not 0.0 < fit_fraction < 1.0:
            raise TraceError(f"fit fraction must be strictly between 0 and 1, got {fit_fraction}")
        if self.seq_id is None:
            cut = min(max(int(round(self.num_tokens * fit_fraction)), 1), self.num_tokens - 1)
            mask = np.arange(self.num_tokens) < cut
        else:
            seqs = np.unique(self.seq_id)
            if seqs.size < 2:
                raise TraceError("the trace holds a single sequence, so it cannot be split by sequence; "
                                 "give separate fit and evaluation traces")
            rng = np.random.default_rng(seed)
            n_fit = min(max(int(round(seqs.size * fit_fraction)), 1), seqs.size - 1)
            fit_seqs = rng.permutation(seqs)[:n_fit]
            mask = np.isin(self.seq_id, fit_seqs)
        return self.take(mask), self.take(~mask)

    def bootstrap_weights(self, resamples: int, seed: int = 0) -> np.ndarray:
        """int ``[resamples, T]`` token weights of bootstrap resamples of the sequences: each resample draws as many
        sequences as the trace has, with replacement (``seed``), and a token weighs how often its sequence was
        drawn (Efron's bootstrap over sequences; without seq_id every token is its own sequence)."""
        if resamples < 1:
            raise TraceError(f"resamples must be >= 1, got {resamples}")
        if self.seq_id is None:
            inv, n = np.arange(self.num_tokens), self.num_tokens
        else:
            seqs, inv = np.unique(self.seq_id, return_inverse=True)
            n = seqs.size
        rng = np.random.default_rng(seed)
        draws = np.stack([np.bincount(rng.integers(n, size=n), minlength=n) for _ in range(resamples)])
        return draws[:, inv.ravel()]

    def load_profile(self) -> "LoadProfile":
        """Token-expert assignment counts per layer as a one-profile :class:`LoadProfile`."""
        return LoadProfile(logical_count=layer_counts(self.expert_ids, self.num_experts)[None],
                           moe_layer_index=self.moe_layer_index, num_hidden_layers=self.num_hidden_layers,
                           model=self.model, source=self.source, names=[str(self.source or "trace")])

    @staticmethod
    def concat(traces: list["RoutingTrace"], renumber_sequences: bool = True) -> "RoutingTrace":
        """Concatenate traces of the same model layout along tokens; sequence ids are made distinct."""
        if not traces:
            raise TraceError("no traces given to concatenate")
        first = traces[0]
        for t in traces[1:]:
            if (t.num_layers, t.top_k, t.num_experts) != (first.num_layers, first.top_k, first.num_experts):
                raise TraceError(
                    f"traces do not share a layout: [L={first.num_layers}, k={first.top_k}, E={first.num_experts}] "
                    f"vs [L={t.num_layers}, k={t.top_k}, E={t.num_experts}] ({t.source}); plan one model at a time")
            if not np.array_equal(t.moe_layer_index, first.moe_layer_index):
                raise TraceError(f"traces disagree on moe_layer_index ({t.source}); plan one model at a time")
        if len(traces) == 1:
            return first
        gates = None
        if all(t.gate_weights is not None for t in traces):
            gates = np.concatenate([t.gate_weights for t in traces])
        seq = None
        if all(t.seq_id is not None for t in traces):
            parts, offset = [], 0
            for t in traces:
                s = t.sequence_index() if renumber_sequences else t.seq_id
                parts.append(s + offset)
                offset += int(s.max()) + 1 if renumber_sequences and s.size else 0
            seq = np.concatenate(parts)
        pos = None
        if all(t.pos_in_seq is not None for t in traces):
            pos = np.concatenate([t.pos_in_seq for t in traces])
        phase = None
        if all(t.phase is not None for t in traces):
            phase = np.concatenate([t.phase for t in traces])
        return RoutingTrace(
            expert_ids=np.concatenate([t.expert_ids for t in traces]), num_experts=first.num_experts,
            gate_weights=gates, seq_id=seq, pos_in_seq=pos, moe_layer_index=first.moe_layer_index,
            num_hidden_layers=first.num_hidden_layers, model=first.model,
            source=" + ".join(str(t.source) for t in traces), phase=phase,
        )


_PAIRS_PER_BLOCK = 1 << 22  # k x k pairs per bincount in pair_counts


def pair_counts(a: np.ndarray, b: np.ndarray, num_experts: int, wa: np.ndarray | None = None,
                 wb: np.ndarray | None = None, exclude_diagonal: bool = False) -> np.ndarray:
    """``[P, E, E]`` counts of the k x k pairs (a[t, p, i], b[t, p, j]) over tokens.

    Args:
        a, b: int ``[T, P, k]`` expert ids (-1 ignored); P = planes (layers or boundaries).
        wa, wb: optional float ``[T, P, k]`` weights; the pair weight is ``wa * wb``.
        exclude_diagonal: skip i == j (co-activation within one layer).

    One plane at a time (its E x E bins stay in cache: 3 to 4 times faster than one bincount over all planes at
    DeepSeek-V3 size), in blocks of tokens; the mask of ignored ids only where a block has one.
    """
    T, P, k = a.shape
    E = num_experts
    itype = np.int32 if E * E < 2 ** 31 else np.int64
    out = np.zeros((P, E * E))
    off_diag = ~np.eye(k, dtype=bool)[None] if exclude_diagonal else None
    step = max(1, _PAIRS_PER_BLOCK // max(k * k, 1))
    for p in range(P):
        for s in range(0, T, step):
            ai = a[s:s + step, p].astype(itype)
            bj = b[s:s + step, p].astype(itype)
            idx = ai[:, :, None] * E + bj[:, None, :]
            weights = None
            if wa is not None:
                weights = wa[s:s + step, p, :, None].astype(np.float64) * wb[s:s + step, p, None, :]
            valid = None
            if (ai < 0).any() or (bj < 0).any():
                valid = (ai[:, :, None] >= 0) & (bj[:, None, :] >= 0)
            if off_diag is not None:
                valid = off_diag if valid is None else valid & off_diag
            if valid is not None:
                valid = np.broadcast_to(valid, idx.shape)
                idx = idx[valid]
                weights = None if weights is None else weights[valid]
            out[p] += np.bincount(idx.ravel(), weights=None if weights is None else weights.ravel(),
                                  minlength=E * E)
    return out.reshape(P, E, E)


def layer_counts(expert_ids: np.ndarray, num_experts: int, weights: np.ndarray | None = None,
                 block: int = 8192) -> np.ndarray:
    """``[L, E]`` token-expert assignment counts from ``[T, L, k]`` ids (-1 ignored); one bincount. With token
    ``weights [K, T]``: ``[K, L, E]`` weighted counts, in blocks of ``block`` tokens."""
    T, L, k = expert_ids.shape
    if weights is not None:
        out = np.zeros((weights.shape[0], L * num_experts))
        lay = np.arange(L, dtype=np.int64)[None, :, None] * num_experts
        for t0 in range(0, T, block):
            ids = expert_ids[t0:t0 + block].astype(np.int64)
            ok = ids >= 0
            flat = (lay + ids)[ok]
            tok = np.broadcast_to(np.arange(ids.shape[0])[:, None, None], ids.shape)[ok]
            for i, w in enumerate(weights[:, t0:t0 + block]):
                out[i] += np.bincount(flat, weights=w[tok], minlength=L * num_experts)
        return out.reshape(-1, L, num_experts)
    ids = expert_ids.astype(np.int64)
    flat = np.arange(L, dtype=np.int64)[None, :, None] * num_experts + ids
    flat = flat[ids >= 0]
    return np.bincount(flat, minlength=L * num_experts).reshape(L, num_experts).astype(np.float64)


@dataclass(frozen=True, eq=False)
class LoadProfile:
    """Counts-only routing statistics: token-expert assignments per MoE layer and logical expert.

    Attributes:
        logical_count: float64 ``[N, L, E]``; N profiles (workloads, windows, ranks) kept apart.
            A 2-D ``[L, E]`` input is stored as N = 1.
        moe_layer_index: int64 ``[L]``.
        names: one label per profile.
    """

    logical_count: np.ndarray
    moe_layer_index: np.ndarray | None = None
    num_hidden_layers: int | None = None
    model: str | None = None
    source: str | None = None
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        c = np.asarray(self.logical_count)
        if c.ndim == 2:
            c = c[None]
        if c.ndim != 3:
            raise TraceError(f"logical_count must be [L, E] or [N, L, E], got shape {list(np.shape(self.logical_count))}")
        if c.size == 0 or min(c.shape) == 0:
            raise TraceError(f"logical_count is empty (shape {list(c.shape)}); record some traffic first")
        if not np.issubdtype(c.dtype, np.number):
            raise TraceError("logical_count must be numeric counts")
        c = c.astype(np.float64)
        if not np.all(np.isfinite(c)):
            raise TraceError("logical_count contains NaN or infinite values; re-export the counts")
        if np.any(c < 0):
            raise TraceError("logical_count contains negative counts; counts must be >= 0")
        object.__setattr__(self, "logical_count", c)
        L = c.shape[1]
        mli = _default_layer_index(L) if self.moe_layer_index is None else np.asarray(self.moe_layer_index, np.int64)
        _check_layer_index(mli, L, self.num_hidden_layers)
        object.__setattr__(self, "moe_layer_index", mli)
        names = list(self.names) if self.names else [f"profile{i}" for i in range(c.shape[0])]
        if len(names) != c.shape[0]:
            raise TraceError(f"{len(names)} profile names given for {c.shape[0]} profiles")
        object.__setattr__(self, "names", names)

    @property
    def num_profiles(self) -> int:
        return int(self.logical_count.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.logical_count.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.logical_count.shape[2])

    @property
    def decoder_layers(self) -> int:
        if self.num_hidden_layers is not None:
            return int(self.num_hidden_layers)
        return int(self.moe_layer_index[-1]) + 1

    def mean(self) -> np.ndarray:
        """``[L, E]`` mean counts over profiles."""
        return self.logical_count.mean(axis=0)

    def total(self) -> np.ndarray:
        """``[L, E]`` summed counts over profiles."""
        return self.logical_count.sum(axis=0)

    def load_profile(self) -> "LoadProfile":
        return self

    @staticmethod
    def concat(profiles: list["LoadProfile"]) -> "LoadProfile":
        """Stack the profiles of several files as separate profiles (N adds up)."""
        first = profiles[0]
        for p in profiles[1:]:
            if p.logical_count.shape[1:] != first.logical_count.shape[1:]:
                raise TraceError(f"count files disagree on [L, E]: {list(first.logical_count.shape[1:])} vs "
                                 f"{list(p.logical_count.shape[1:])} ({p.source}); plan one model at a time")
        return LoadProfile(np.concatenate([p.logical_count for p in profiles]), first.moe_layer_index,
                           first.num_hidden_layers, first.model, " + ".join(str(p.source) for p in profiles),
                           [n for p in profiles for n in p.names])


# --------------------------------------------------------------------------------------------------------------
# Validation (the boundary)
# --------------------------------------------------------------------------------------------------------------


def _check_layer_index(mli: np.ndarray, num_layers: int, num_hidden_layers: int | None) -> None:
    if mli.ndim != 1 or mli.shape[0] != num_layers:
        raise TraceError(f"moe_layer_index must list one decoder-layer index per MoE layer ({num_layers}), "
                         f"got shape {list(mli.shape)}")
    if num_layers and (mli.min() < 0 or np.any(np.diff(mli) <= 0)):
        raise TraceError("moe_layer_index must be non-negative and strictly increasing")
    if num_hidden_layers is not None and num_layers and int(num_hidden_layers) <= int(mli[-1]):
        raise TraceError(f"num_hidden_layers ({num_hidden_layers}) must exceed the last MoE layer index ({int(mli[-1])})")


def validate_routing(expert_ids, num_experts, gate_weights=None, seq_id=None, pos_in_seq=None,
                     moe_layer_index=None, num_hidden_layers=None) -> None:
    """Raise :class:`TraceError` with one sentence for the first problem found; return None if valid."""
    if not isinstance(expert_ids, np.ndarray) or not np.issubdtype(expert_ids.dtype, np.integer):
        raise TraceError("expert_ids must be an integer array [T, L, k]")
    if expert_ids.ndim != 3:
        raise TraceError(f"expert_ids must have rank 3 [tokens, moe_layers, top_k], got shape {list(expert_ids.shape)}")
    T, L, k = expert_ids.shape
    if T == 0 or L == 0 or k == 0:
        raise TraceError(f"expert_ids is empty (shape {[T, L, k]}); record at least one token, layer and expert")
    try:
        E = int(num_experts)
    except (TypeError, ValueError):
        raise TraceError(f"num_experts must be an integer, got {num_experts!r}") from None
    if E < 1:
        raise TraceError(f"num_experts must be >= 1, got {E}")
    if k > E:
        raise TraceError(f"top_k ({k}) exceeds num_experts ({E})")
    lo, hi = int(expert_ids.min()), int(expert_ids.max())
    if lo < -1 or hi >= E:
        bad = lo if lo < -1 else hi
        raise TraceError(f"expert_ids contains {bad}, outside [0, {E}) (only -1 may mark a layer the token skipped); "
                         f"check num_experts or map physical ids back to logical ids")
    srt = np.sort(expert_ids, axis=2)
    dup = (srt[:, :, 1:] == srt[:, :, :-1]) & (srt[:, :, 1:] >= 0)
    if dup.any():
        t, l, _ = np.argwhere(dup)[0]
        raise TraceError(f"token {t} repeats an expert within its top-{k} at MoE layer {l}; a token's k experts "
                         f"must be distinct (were physical replica ids recorded instead of logical ids?)")
    if gate_weights is not None:
        if not isinstance(gate_weights, np.ndarray) or gate_weights.shape != expert_ids.shape:
            raise TraceError(f"gate_weights must match expert_ids' shape {[T, L, k]}, got "
                             f"{list(np.shape(gate_weights))}")
        if not np.issubdtype(gate_weights.dtype, np.floating) and not np.issubdtype(gate_weights.dtype, np.integer):
            raise TraceError("gate_weights must be numeric")
        g = gate_weights[expert_ids >= 0]
        if np.isnan(g).any():
            raise TraceError("gate_weights contains NaN; re-record the trace (the router produced NaN)")
        if (g < 0).any() or np.isinf(g).any():
            raise TraceError("gate_weights contains negative or infinite values; gate weights must be finite and >= 0")
    for name, arr in (("seq_id", seq_id), ("pos_in_seq", pos_in_seq)):
        if arr is None:
            continue
        if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.shape[0] != T:
            raise TraceError(f"{name} must have one entry per token ({T}), got shape {list(np.shape(arr))}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TraceError(f"{name} must be integers")
        if (arr < 0).any():
            raise TraceError(f"{name} contains negative values")
    mli = _default_layer_index(L) if moe_layer_index is None else np.asarray(moe_layer_index)
    if not np.issubdtype(mli.dtype, np.integer):
        raise TraceError("moe_layer_index must be integers")
    _check_layer_index(mli, L, num_hidden_layers)


# --------------------------------------------------------------------------------------------------------------
# I/O
# --------------------------------------------------------------------------------------------------------------

_TRACE_KEYS = ("expert_ids", "gate_weights", "seq_id", "pos_in_seq", "moe_layer_index", "num_experts", "top_k",
               "num_hidden_layers", "model", "phase")


def _scalar(d, key, cast, path):
    try:
        return cast(np.asarray(d[key]).reshape(()).item())
    except (ValueError, TypeError):
        raise TraceError(f"{path}: '{key}' must be a single {cast.__name__}, got shape {list(np.shape(d[key]))}") from None


def _open_npz(path: str | os.PathLike):
    p = Path(path)
    if not p.exists():
        raise TraceError(f"{p}: no such file; give the path of a trace (.npz) or counts file")
    note_input(p)
    if p.is_dir():
        raise TraceError(f"{p} is a folder; give a trace file (.npz) or merge shards first with 'moeplace merge'")
    k = kind(p)
    if k not in ("npz", "empty"):
        raise TraceError(mismatch(p, "a NumPy .npz trace or counts file", k)
                         + ("" if what_to_do(k) else "; traces come from 'moeplace collect' or 'moeplace import'"))
    try:
        return np.load(p, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise TraceError(f"{p} is not a readable .npz file ({type(exc).__name__}: {exc}); it may be truncated or "
                         f"of another format") from None


def load(path: str | os.PathLike) -> RoutingTrace | LoadProfile:
    """Load a ``.npz`` trace: a :class:`RoutingTrace` if it has ``expert_ids``, else a :class:`LoadProfile`
    from ``logical_count``. Raises :class:`TraceError` (one sentence) for anything unusable."""
    p = Path(path)
    with _open_npz(p) as d:
        try:
            files = set(d.files)
            if "expert_ids" in files:
                return _trace_from_npz(d, p, files)
            if "logical_count" in files:
                return _profile_from_npz(d, p, files)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
            if isinstance(exc, TraceError):
                raise
            raise TraceError(f"{p} could not be read completely ({type(exc).__name__}); the file is probably "
                             f"truncated, copy it again") from None
    raise TraceError(f"{p} has neither 'expert_ids' (token trace) nor 'logical_count' (counts); keys found: "
                     f"{sorted(files) or 'none'}")


def load_trace(path: str | os.PathLike) -> RoutingTrace:
    """Like :func:`load` but requires a token-level trace."""
    obj = load(path)
    if not isinstance(obj, RoutingTrace):
        raise TraceError(f"{path} holds counts only; this step needs a token trace (expert_ids)")
    return obj


def _trace_from_npz(d, p: Path, files: set) -> RoutingTrace:
    if "num_experts" not in files:
        raise TraceError(f"{p} has no 'num_experts'; add it (the routed experts per MoE layer)")
    ids = d["expert_ids"]
    E = _scalar(d, "num_experts", int, p)
    if "top_k" in files:
        k = _scalar(d, "top_k", int, p)
        if ids.ndim == 3 and k != ids.shape[2]:
            raise TraceError(f"{p}: top_k is {k} but expert_ids has {ids.shape[2]} experts per token")
    opt = {key: d[key] for key in ("gate_weights", "seq_id", "pos_in_seq", "moe_layer_index", "phase") if key in files}
    nhl = _scalar(d, "num_hidden_layers", int, p) if "num_hidden_layers" in files else None
    model = str(d["model"]) if "model" in files else None
    try:
        return RoutingTrace(expert_ids=ids, num_experts=E, num_hidden_layers=nhl, model=model, source=str(p), **opt)
    except TraceError as exc:
        raise TraceError(f"{p}: {exc}") from None


def _profile_from_npz(d, p: Path, files: set) -> LoadProfile:
    c = d["logical_count"]
    mli = d["moe_layer_index"] if "moe_layer_index" in files else None
    nhl = _scalar(d, "num_hidden_layers", int, p) if "num_hidden_layers" in files else None
    names = [str(x) for x in d["profile_names"]] if "profile_names" in files else []
    model = str(d["model"]) if "model" in files else None
    try:
        return LoadProfile(c, mli, nhl, model, str(p), names)
    except TraceError as exc:
        raise TraceError(f"{p}: {exc}") from None


def save(obj: RoutingTrace | LoadProfile, path: str | os.PathLike, compress: bool = True) -> None:
    """Write a trace or profile in the interchange format, atomically."""
    if isinstance(obj, RoutingTrace):
        arrays = {"expert_ids": obj.expert_ids, "num_experts": np.int64(obj.num_experts),
                  "top_k": np.int64(obj.top_k), "moe_layer_index": obj.moe_layer_index}
        for key in ("gate_weights", "seq_id", "pos_in_seq", "phase"):
            if getattr(obj, key) is not None:
                arrays[key] = getattr(obj, key)
    elif isinstance(obj, LoadProfile):
        arrays = {"logical_count": obj.logical_count if obj.num_profiles > 1 else obj.logical_count[0],
                  "moe_layer_index": obj.moe_layer_index, "profile_names": np.array(obj.names)}
    else:
        raise TypeError(f"cannot save {type(obj).__name__}")
    if obj.num_hidden_layers is not None:
        arrays["num_hidden_layers"] = np.int64(obj.num_hidden_layers)
    if obj.model is not None:
        arrays["model"] = np.array(obj.model)
    saver = np.savez_compressed if compress else np.savez
    atomic_write_bytes(path, lambda f: saver(f, **arrays))


# --------------------------------------------------------------------------------------------------------------
# Streaming: read a trace larger than memory chunk by chunk
# --------------------------------------------------------------------------------------------------------------


class _NpyRows:
    """Sequential row reader for one ``.npy`` member of a zip (compressed or not) without loading it whole."""

    def __init__(self, zf: zipfile.ZipFile, member: str):
        self._f = zf.open(member)
        version = np.lib.format.read_magic(self._f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._f)
        if fortran:
            raise TraceError(f"{member} is stored in Fortran order; re-save it in C order to stream it")
        self.shape, self.dtype = shape, dtype
        self._row_items = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1

    def read(self, rows: int) -> np.ndarray:
        nbytes = rows * self._row_items * self.dtype.itemsize
        buf = self._f.read(nbytes)
        if len(buf) != nbytes:
            raise TraceError("the trace ended early while streaming; the file is truncated")
        return np.frombuffer(buf, dtype=self.dtype).reshape((rows,) + tuple(self.shape[1:]))

    def close(self) -> None:
        self._f.close()


def iter_trace_chunks(path: str | os.PathLike, chunk_tokens: int = 65536) -> Iterator[RoutingTrace]:
    """Yield a trace file as consecutive :class:`RoutingTrace` chunks of at most ``chunk_tokens`` tokens.

    Memory stays bounded by the chunk: arrays are decoded from the zip member stream, never loaded whole.
    Each chunk is validated on its own. Statistics built per chunk merge exactly (see placement.affinity).
    """
    p = Path(path)
    with _open_npz(p) as d:
        files = set(d.files)
        if "expert_ids" not in files:
            raise TraceError(f"{p} holds no token trace (expert_ids) to stream")
        meta = {"num_experts": _scalar(d, "num_experts", int, p) if "num_experts" in files else None,
                "moe_layer_index": d["moe_layer_index"] if "moe_layer_index" in files else None,
                "num_hidden_layers": _scalar(d, "num_hidden_layers", int, p) if "num_hidden_layers" in files else None,
                "model": str(d["model"]) if "model" in files else None}
    if meta["num_experts"] is None:
        raise TraceError(f"{p} has no 'num_experts'; add it (the routed experts per MoE layer)")
    with zipfile.ZipFile(p) as zf:
        readers = {key: _NpyRows(zf, key + ".npy") for key in ("expert_ids", "gate_weights", "seq_id", "pos_in_seq",
                                                               "phase")
                   if key + ".npy" in zf.namelist()}
        try:
            T = readers["expert_ids"].shape[0]
            for start in range(0, T, chunk_tokens):
                rows = min(chunk_tokens, T - start)
                arrays = {key: r.read(rows).copy() for key, r in readers.items()}
                try:
                    yield RoutingTrace(num_experts=meta["num_experts"], moe_layer_index=meta["moe_layer_index"],
                                       num_hidden_layers=meta["num_hidden_layers"], model=meta["model"],
                                       source=str(p), **arrays)
                except TraceError as exc:
                    raise TraceError(f"{p} (tokens {start}..{start + rows}): {exc}") from None
        finally:
            for r in readers.values():
                r.close()
