"""Real routing data bundled with moeplace (see each folder's PROVENANCE.md and licence under traces/data/).

- ``deepseek-v2-lite-esft``: DeepSeek's own per-token routing dumps of ESFT-vanilla-lite (DeepSeek-V2-Lite
  layout: 27 decoder layers, 26 MoE layers, 64 routed experts, top-6) on three tasks (intent, law, summary),
  about 25k tokens in 173 sequences. MIT.
- ``olmoe-mixtral-crosslayer``: counts only, Mixtral-8x7B and OLMoE-1B-7B expert counts and cross-layer pair
  counts for a few layers (allenai/OLMoE, Apache-2.0); see :func:`crosslayer_counts`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from traces.format import RoutingTrace, TraceError, load_trace

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT = "deepseek-v2-lite-esft"
ESFT_TASKS = ("intent", "law", "summary")
_DECODER_LAYERS = {"deepseek-v2-lite-esft": 27}


def available() -> list[str]:
    """Names of the bundled datasets."""
    return sorted(p.name for p in DATA_DIR.iterdir() if p.is_dir())


def path(name: str = DEFAULT) -> Path:
    """Folder of a bundled dataset."""
    p = DATA_DIR / name
    if not p.is_dir():
        raise TraceError(f"no bundled dataset named {name!r}; available: {', '.join(available())}")
    return p


def files(name: str = DEFAULT) -> list[Path]:
    """The ``.npz`` files of a bundled dataset, sorted."""
    return sorted(path(name).glob("*.npz"))


def _tasks(name: str, tasks) -> tuple[str, list[str]]:
    """``(dataset, tasks)`` from ``"name"`` or ``"name:task,task"`` (checked: known, each named once)."""
    if ":" in name:
        name, spec = name.split(":", 1)
        tasks = spec.split(",")
    if name != DEFAULT:
        raise TraceError(f"{name!r} is not a bundled token trace; the bundled token trace is {DEFAULT!r}")
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks or ESFT_TASKS)
    unknown = [t for t in tasks if t not in ESFT_TASKS]
    if unknown:
        raise TraceError(f"unknown task {unknown[0]!r} in {name}; tasks are {', '.join(ESFT_TASKS)}")
    twice = sorted({t for t in tasks if tasks.count(t) > 1})
    if twice:
        raise TraceError(f"task {twice[0]!r} is named twice in {name}; name each task once")
    return name, tasks


def task_files(name: str = DEFAULT, tasks: list[str] | tuple[str, ...] | str | None = None) -> list[Path]:
    """The files of a bundled token trace's tasks (``name`` as in :func:`load`), one shard per task."""
    name, tasks = _tasks(name, tasks)
    return [path(name) / f"esft_{t}.npz" for t in tasks]


def load(name: str = DEFAULT, tasks: list[str] | tuple[str, ...] | str | None = None) -> RoutingTrace:
    """Load a bundled token trace; several tasks are concatenated with distinct sequence ids.

    ``name`` may also be ``"deepseek-v2-lite-esft:law"`` (one task) or ``"...:law,intent"``.
    """
    name, tasks = _tasks(name, tasks)
    parts = []
    for t, f in zip(tasks, task_files(name, tasks)):
        tr = load_trace(f)
        parts.append(RoutingTrace(expert_ids=tr.expert_ids, num_experts=tr.num_experts, gate_weights=tr.gate_weights,
                                  seq_id=tr.seq_id, pos_in_seq=tr.pos_in_seq, moe_layer_index=tr.moe_layer_index,
                                  num_hidden_layers=_DECODER_LAYERS[name], model="DeepSeek-V2-Lite (ESFT-vanilla-lite)",
                                  source=f"{name}:{t}"))
    return RoutingTrace.concat(parts)


def crosslayer_counts(model: str = "olmoe", domain: str = "arxiv", top1: bool = False) -> dict[str, np.ndarray]:
    """Mixtral/OLMoE counts from allenai/OLMoE for one model ("mistral", "olmoe", ...) and domain.

    Returns ``{"expert_counts": [3, E] (layers 0, 7, 15), "crosslayer": [2, E, E] (0->7, 7->15)}``.
    The non-top-1 cross-layer counts pair the k-th choice at one layer with the k-th at the other (rank-aligned),
    not the full k x k product; ``top1=True`` gives exact top-1 transition counts.
    """
    suffix = "_top1" if top1 else ""
    with np.load(path("olmoe-mixtral-crosslayer") / "olmoe_mixtral_counts.npz") as d:
        key_c, key_x = f"{model}__expert_counts{suffix}__{domain}", f"{model}__expert_counts_crosslayer{suffix}__{domain}"
        if key_c not in d.files:
            options = sorted({k.split("__")[0] + ":" + k.split("__")[2] for k in d.files})
            raise TraceError(f"no counts for {model}:{domain}; available: {', '.join(options)}")
        out = {"expert_counts": d[key_c].astype(np.float64), "layers": np.array([0, 7, 15])}
        if key_x in d.files:
            out["crosslayer"] = d[key_x].astype(np.float64)
        return out
