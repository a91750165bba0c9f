"""Traces in many files: expand trace arguments (files, folders, globs) and describe shards without reading tokens.

A production routing trace is many ``.npz`` shards (one per rank, per hour, per recorder dump). Every command that
takes traces accepts them as files, a folder (every ``*.npz`` in it, sorted by name) or a glob pattern
(``'dumps/rank*.npz'``, quoted so the shell leaves it to moeplace). :func:`shard_info` reads a shard's size and model
from the zip's headers only, so thousands of shards are checked before any token is read, and
:func:`check_same_model` refuses shards of different models with one sentence.
"""

from __future__ import annotations

import glob
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from traces.format import TraceError, _NpyRows, _open_npz, _scalar

__all__ = ["ShardInfo", "expand", "shard_info", "check_same_model"]

_GLOB_CHARS = set("*?[")


def expand(args: list[str | os.PathLike]) -> list[Path]:
    """Trace arguments as a list of files: a file stays, a folder gives its ``*.npz`` files sorted by name, a glob
    pattern its matches sorted by name; each file once, in the order given. Raises :class:`TraceError` for a folder
    with no ``.npz`` file or a pattern that matches nothing."""
    out: list[Path] = []
    for a in args:
        text = str(a)
        p = Path(text)
        if p.is_dir():
            found = sorted(q for q in p.glob("*.npz") if q.is_file())
            if not found:
                raise TraceError(f"{p} is a folder with no .npz trace in it; give the folder that holds the shards "
                                 f"or the files themselves")
        elif not p.exists() and _GLOB_CHARS & set(text):
            found = sorted(Path(q) for q in glob.glob(text) if Path(q).is_file())
            if not found:
                raise TraceError(f"no file matches {text!r}; check the pattern (quote it so that the shell does not "
                                 f"expand it first)")
        else:
            found = [p]
        for q in found:
            if q not in out:
                out.append(q)
    return out


@dataclass(frozen=True)
class ShardInfo:
    """One trace file, from its headers: path, tokens, layout (experts, top-k, MoE layer indices), model name."""

    path: Path
    tokens: int
    num_experts: int
    top_k: int
    moe_layer_index: tuple[int, ...]
    model: str | None

    @property
    def num_layers(self) -> int:
        return len(self.moe_layer_index)

    def layout(self) -> str:
        return f"{self.num_experts} experts x {self.num_layers} MoE layers, top-{self.top_k}"


def shard_info(path: str | os.PathLike) -> ShardInfo:
    """The :class:`ShardInfo` of a token-trace file, reading only the array headers and the small members."""
    p = Path(path)
    with _open_npz(p) as d:
        files = set(d.files)
        if "expert_ids" not in files:
            raise TraceError(f"{p} holds no token trace (expert_ids); every shard must be a token trace")
        if "num_experts" not in files:
            raise TraceError(f"{p} has no 'num_experts'; add it (the routed experts per MoE layer)")
        E = _scalar(d, "num_experts", int, p)
        mli = d["moe_layer_index"] if "moe_layer_index" in files else None
        model = str(d["model"]) if "model" in files else None
    try:
        with zipfile.ZipFile(p) as zf:
            rows = _NpyRows(zf, "expert_ids.npy")
            shape = rows.shape
            rows.close()
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as exc:
        raise TraceError(f"{p}: cannot read the expert_ids header ({type(exc).__name__}); the file may be "
                         f"truncated") from None
    if len(shape) != 3:
        raise TraceError(f"{p}: expert_ids must be [tokens, layers, top_k], got shape {list(shape)}")
    layers = tuple(int(x) for x in (np.arange(shape[1]) if mli is None else np.asarray(mli).ravel()))
    return ShardInfo(p, int(shape[0]), E, int(shape[2]), layers, model)


def check_same_model(infos: list[ShardInfo]) -> None:
    """Refuse shards of different layouts (experts, top-k, MoE layers) with one sentence naming two of them."""
    if not infos:
        raise TraceError("no trace files given")
    first = infos[0]
    for info in infos[1:]:
        if (info.num_experts, info.top_k, info.moe_layer_index) != (first.num_experts, first.top_k,
                                                                    first.moe_layer_index):
            raise TraceError(f"the shards are of different models: {first.path} has {first.layout()} and "
                             f"{info.path} has {info.layout()}; give the shards of one model")
