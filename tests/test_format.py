"""Trace format: any valid trace round-trips; each listed corruption gives one clear TraceError."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import traces
from traces import LoadProfile, RoutingTrace, TraceError, iter_trace_chunks


@st.composite
def valid_traces(draw):
    T = draw(st.integers(1, 40))
    L = draw(st.integers(1, 5))
    E = draw(st.integers(2, 12))
    k = draw(st.integers(1, min(4, E)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((T, L, E)), axis=2)[:, :, :k]  # k distinct experts per token-layer
    skip = rng.random((T, L)) < 0.1
    ids[skip] = -1
    gates = rng.random((T, L, k)).astype(np.float32) if draw(st.booleans()) else None
    seq = np.sort(rng.integers(0, 5, T)) if draw(st.booleans()) else None
    pos = rng.integers(0, 100, T) if draw(st.booleans()) else None
    start = draw(st.integers(0, 3))
    mli = start + np.cumsum(rng.integers(1, 3, L)) - 1
    nhl = int(mli[-1]) + 1 + draw(st.integers(0, 2)) if draw(st.booleans()) else None
    model = draw(st.one_of(st.none(), st.text(alphabet="abcXYZ-_.0123", min_size=1, max_size=12)))
    return RoutingTrace(expert_ids=ids, num_experts=E, gate_weights=gates, seq_id=seq, pos_in_seq=pos,
                        moe_layer_index=mli, num_hidden_layers=nhl, model=model)


def _same(a: RoutingTrace, b: RoutingTrace) -> None:
    assert np.array_equal(a.expert_ids, b.expert_ids)
    assert a.num_experts == b.num_experts and a.top_k == b.top_k
    for key in ("gate_weights", "seq_id", "pos_in_seq"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None) == (y is None)
        if x is not None:
            assert np.array_equal(x, y)
    assert np.array_equal(a.moe_layer_index, b.moe_layer_index)
    assert a.num_hidden_layers == b.num_hidden_layers and a.model == b.model


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trace=valid_traces(), chunk=st.integers(1, 17))
def test_valid_traces_round_trip_and_stream(tmp_path_factory, trace, chunk):
    path = tmp_path_factory.mktemp("rt") / "t.npz"
    traces.save(trace, path)
    back = traces.load(path)
    _same(trace, back)
    chunks = list(iter_trace_chunks(path, chunk_tokens=chunk))
    assert sum(c.num_tokens for c in chunks) == trace.num_tokens
    _same(trace, RoutingTrace.concat(chunks, renumber_sequences=False))


def _arrays(trace: RoutingTrace) -> dict:
    d = {"expert_ids": trace.expert_ids, "num_experts": trace.num_experts, "top_k": trace.top_k,
         "moe_layer_index": trace.moe_layer_index, "seq_id": np.zeros(trace.num_tokens, dtype=np.int64)}
    if trace.gate_weights is not None:
        d["gate_weights"] = trace.gate_weights
    return d


def _write(path: Path, arrays: dict) -> Path:
    np.savez(path, **arrays)
    return path


def _corrupt(kind: str, arrays: dict, rng) -> tuple[dict, str]:
    a = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in arrays.items()}
    T, L, k = a["expert_ids"].shape
    t, l = rng.integers(T), rng.integers(L)
    if kind == "missing_key":
        del a["expert_ids"]
        return a, "neither 'expert_ids'"
    if kind == "missing_num_experts":
        del a["num_experts"]
        return a, "no 'num_experts'"
    if kind == "wrong_rank":
        a["expert_ids"] = a["expert_ids"].reshape(T, L * k)
        return a, "rank 3"
    if kind == "id_too_large":
        a["expert_ids"][t, l, 0] = a["num_experts"] + int(rng.integers(0, 5))
        return a, "outside [0,"
    if kind == "id_negative":
        a["expert_ids"][t, l, 0] = -2 - int(rng.integers(0, 5))
        return a, "outside [0,"
    if kind == "repeat":
        a["expert_ids"][t, l, :] = np.arange(k)
        a["expert_ids"][t, l, 1] = a["expert_ids"][t, l, 0]
        return a, "repeats an expert"
    if kind == "gate_nan":
        a["expert_ids"][t, l, :] = np.arange(k)
        a["gate_weights"][t, l, 0] = np.nan
        return a, "NaN"
    if kind == "gate_negative":
        a["expert_ids"][t, l, :] = np.arange(k)
        a["gate_weights"][t, l, 0] = -0.5
        return a, "negative"
    if kind == "gate_shape":
        a["gate_weights"] = a["gate_weights"][:, :, :1] if k > 1 else a["gate_weights"][:-1]
        return a, "gate_weights must match"
    if kind == "seq_len":
        a["seq_id"] = np.zeros(T + 1 + int(rng.integers(0, 3)), dtype=np.int64)
        return a, "one entry per token"
    raise AssertionError(kind)


KINDS = ["missing_key", "missing_num_experts", "wrong_rank", "id_too_large", "id_negative", "repeat", "gate_nan",
         "gate_negative", "gate_shape", "seq_len"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trace=valid_traces(), kind=st.sampled_from(KINDS), seed=st.integers(0, 1000))
def test_each_corruption_gives_its_clear_error(tmp_path_factory, trace, kind, seed):
    if kind.startswith("gate") and trace.gate_weights is None:
        trace = RoutingTrace(expert_ids=trace.expert_ids, num_experts=trace.num_experts,
                             gate_weights=np.ones(trace.expert_ids.shape, np.float32),
                             moe_layer_index=trace.moe_layer_index)
    if kind == "repeat" and trace.top_k < 2:
        kind = "id_too_large"
    arrays, phrase = _corrupt(kind, _arrays(trace), np.random.default_rng(seed))
    path = _write(tmp_path_factory.mktemp("bad") / "bad.npz", arrays)
    with pytest.raises(TraceError) as info:
        traces.load(path)
    message = str(info.value)
    assert phrase in message, message
    assert "\n" not in message and str(path) in message


def test_not_an_npz_and_truncated(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("this is not a zip file")
    with pytest.raises(TraceError, match="not a NumPy .npz trace or counts file: it is text that is not JSON"):
        traces.load(text)
    plan_json = tmp_path / "plan.json"
    plan_json.write_text('{"format": "moeplace.plan"}')
    with pytest.raises(TraceError, match="it is a moeplace plan .JSON.; a plan goes to evaluate"):
        traces.load(plan_json)  # numpy itself would speak of pickled data
    good = tmp_path / "good.npz"
    traces.save(datasets_slice(), good)
    blob = good.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(TraceError, match="damaged or truncated zip archive; copy the file again"):
        traces.load(cut)
    with pytest.raises(TraceError, match="no such file"):
        traces.load(tmp_path / "missing.npz")


def datasets_slice() -> RoutingTrace:
    from traces import datasets

    return datasets.load("deepseek-v2-lite-esft:law").take(np.arange(300))


def test_counts_profiles_kept_apart_and_validated(tmp_path):
    counts = np.random.default_rng(0).integers(0, 50, (3, 4, 8))
    p = tmp_path / "counts.npz"
    np.savez(p, logical_count=counts)
    prof = traces.load(p)
    assert isinstance(prof, LoadProfile) and prof.num_profiles == 3
    assert np.array_equal(prof.logical_count, counts)
    np.savez(p, logical_count=counts[0])
    assert traces.load(p).num_profiles == 1
    np.savez(p, logical_count=-counts)
    with pytest.raises(TraceError, match="negative"):
        traces.load(p)
    np.savez(p, logical_count=counts[0, 0])
    with pytest.raises(TraceError, match=r"\[L, E\] or \[N, L, E\]"):
        traces.load(p)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous file intact and no temp file behind."""
    path = tmp_path / "t.npz"
    first = datasets_slice()
    traces.save(first, path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(RuntimeError):
        traces.save(first.take(np.arange(10)), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]


def test_bundled_dataset_is_real_and_complete():
    from traces import datasets

    tr = datasets.load()
    assert (tr.num_layers, tr.top_k, tr.num_experts) == (26, 6, 64)
    assert tr.num_sequences == 127 + 33 + 13 and tr.num_tokens == 8222 + 8327 + 8479
    assert tr.decoder_layers == 27 and list(tr.moe_layer_index) == list(range(1, 27))
    fit, held = tr.split_by_sequence(0.5, seed=0)
    assert not set(np.unique(fit.seq_id)) & set(np.unique(held.seq_id))
    assert fit.num_tokens + held.num_tokens == tr.num_tokens
    for name in ("deepseek-v2-lite-esft", "olmoe-mixtral-crosslayer"):
        folder = datasets.path(name)
        assert (folder / "PROVENANCE.md").is_file() and list(folder.glob("LICENSE*"))
