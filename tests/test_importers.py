"""Importers of serving-stack dumps: fixtures written exactly as the stacks write them, built from the bundled real
DeepSeek-V2-Lite routing, must import back to that routing.

The dump structures follow the stacks' source code:
- SGLang ``python/sglang/srt/eplb/expert_distribution.py``: ``_DetailAccumulator.dump`` writes
  ``{"records": [...], "last_physical_to_logical_map"}`` per rank; a per_token record is
  ``dict(forward_pass_id, rank, gatherer_key, input_ids, positions, extend_seq_lens, forward_mode,
  topk_ids_of_layer [layers, tokens, 8] int32 physical ids (-1 unused), misc_objects, global_physical_count)``;
  ``_StatAccumulator.dump`` writes ``{"rank", "logical_count" [buffer, layers, E],
  "average_utilization_rate_over_window"}``.
- vLLM ``routed_experts_capturer.py``: ``[tokens, num_hidden_layers, top_k]`` int32, dense layers' rows 0; HTTP
  responses carry ``choices[i].routed_experts`` = base64 of ``np.save`` bytes.
- TensorRT-LLM ``tensorrt_llm/_torch/expert_statistic.py``: ``meta_info.json`` ``{"num_experts",
  "num_experts_per_token"}``, ``rank{r}.safetensors`` with ``"{iter}_{layer}"`` -> bincount ``[E]``.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from placement.cli import app
from traces import LoadProfile, RoutingTrace, TraceError, datasets, layer_counts, load
from traces.importers import import_sglang, import_trtllm, import_vllm

torch = pytest.importorskip("torch")

runner = CliRunner()
P = 72  # physical slots: 64 logical experts + 8 redundant replicas


@pytest.fixture(scope="module")
def real():
    """A slice of the bundled real trace: whole sequences, sorted by (sequence, position)."""
    tr = datasets.load("deepseek-v2-lite-esft:law")
    seq = tr.sequence_index()
    tr = tr.take(seq < 24)
    order = np.lexsort((tr.pos_in_seq, tr.sequence_index()))
    return tr.take(order)


def _placement(L_all: int, E: int, seed: int) -> np.ndarray:
    """``[L_all, P]`` physical -> logical map with redundant replicas (every logical expert has a slot)."""
    rng = np.random.default_rng(seed)
    rows = [np.concatenate([rng.permutation(E), rng.integers(0, E, P - E)]) for _ in range(L_all)]
    return np.stack(rows).astype(np.int64)


def _to_physical(logical: np.ndarray, p2l_row: np.ndarray, rng) -> np.ndarray:
    """Pick one physical replica of each logical id (as SGLang's dispatch does)."""
    E = int(p2l_row.max()) + 1
    slots = [np.flatnonzero(p2l_row == e) for e in range(E)]
    count = np.array([len(x) for x in slots])
    table = np.full((E, count.max()), -1, dtype=np.int64)
    for e, x in enumerate(slots):
        table[e, : len(x)] = x
    pick = (rng.random(logical.shape) * count[logical]).astype(np.int64)
    return table[logical, pick]


def _sglang_records(tr: RoutingTrace, p2l: np.ndarray, seqs_per_pass: int, rank: int, seed: int,
                    first_pass: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    L_all = p2l.shape[0]
    seq = tr.sequence_index()
    uniq = np.unique(seq)
    records = []
    for i, start in enumerate(range(0, uniq.size, seqs_per_pass)):
        chosen = uniq[start:start + seqs_per_pass]
        sel = np.isin(seq, chosen)
        n = int(sel.sum())
        topk = np.full((L_all, n, 8), -1, dtype=np.int32)  # _TOP_K_NUM = 8; unused columns stay -1
        for j, layer in enumerate(tr.moe_layer_index):
            topk[layer, :, : tr.top_k] = _to_physical(tr.expert_ids[sel, j].astype(np.int64), p2l[layer], rng)
        phys_count = np.zeros((L_all, P), dtype=np.int32)
        for layer in range(L_all):
            v = topk[layer][topk[layer] >= 0]
            phys_count[layer] = np.bincount(v, minlength=P)
        records.append(dict(
            forward_pass_id=first_pass + i, rank=rank, gatherer_key="primary",
            input_ids=rng.integers(0, 1000, n).tolist(), positions=tr.pos_in_seq[sel].tolist(),
            extend_seq_lens=[int((seq[sel] == s).sum()) for s in chosen], forward_mode=1,
            topk_ids_of_layer=torch.from_numpy(topk), misc_objects=[],
            global_physical_count=torch.from_numpy(phys_count)))
    return records


def test_sglang_per_token_maps_physical_back_to_logical(real, tmp_path):
    L_all = real.decoder_layers
    p2l = _placement(L_all, real.num_experts, seed=1)
    seq = real.sequence_index()
    files = []
    for rank in range(2):  # data-parallel attention: each rank records its own requests
        part = real.take(seq % 2 == rank)
        recs = _sglang_records(part, p2l, seqs_per_pass=3, rank=rank, seed=10 + rank)
        f = tmp_path / f"expert_distribution_recorder_1700000000.0_{rank}.pt"
        torch.save(dict(records=recs, last_physical_to_logical_map=torch.from_numpy(p2l)), f)
        files.append(f)
    # a tensor-parallel peer of rank 0 recorded the very same passes: kept once
    tp_copy = tmp_path / "expert_distribution_recorder_1700000000.0_2.pt"
    tp_copy.write_bytes(files[0].read_bytes())
    got = import_sglang(files + [tp_copy])
    assert isinstance(got, RoutingTrace)
    assert got.moe_layer_index.tolist() == real.moe_layer_index.tolist()  # dense layer 0 recognised
    assert got.num_hidden_layers == L_all and got.num_experts == real.num_experts and got.top_k == real.top_k
    assert got.num_tokens == real.num_tokens and got.num_sequences == real.num_sequences
    # same tokens in the same order as the rank files list them: compare by (rank part, sequence, position)
    expect = np.concatenate([real.take(seq % 2 == r).expert_ids for r in range(2)])
    expect_pos = np.concatenate([real.take(seq % 2 == r).pos_in_seq for r in range(2)])
    assert np.array_equal(got.expert_ids, expect) and np.array_equal(got.pos_in_seq, expect_pos)
    # sequences were recovered from extend_seq_lens: each imported sequence is one real sequence
    expect_seq = np.concatenate([real.take(seq % 2 == r).sequence_index() + 1000 * r for r in range(2)])
    for s in np.unique(got.seq_id):
        assert np.unique(expect_seq[got.seq_id == s]).size == 1
    assert np.array_equal(layer_counts(got.expert_ids, 64), layer_counts(real.expert_ids, 64))


def test_sglang_decode_pass_and_per_pass_counts(real, tmp_path):
    p2l = _placement(real.decoder_layers, 64, seed=2)
    rec = _sglang_records(real, p2l, seqs_per_pass=4, rank=0, seed=3)[0]
    n = len(rec["input_ids"])
    decode = dict(rec, extend_seq_lens=None, forward_mode=2)  # decode: one token per request
    f = tmp_path / "d.pt"
    torch.save(dict(records=[decode], last_physical_to_logical_map=torch.from_numpy(p2l)), f)
    got = import_sglang([f])
    assert got.num_tokens == n and got.num_sequences == n
    # per_pass mode: records hold only global_physical_count -> counts per pass, mapped to logical experts
    recs = _sglang_records(real, p2l, seqs_per_pass=5, rank=0, seed=4)
    per_pass = [dict(forward_pass_id=r["forward_pass_id"], rank=0, gatherer_key="primary",
                     global_physical_count=r["global_physical_count"]) for r in recs]
    f2 = tmp_path / "pp.pt"
    torch.save(dict(records=per_pass, last_physical_to_logical_map=torch.from_numpy(p2l)), f2)
    prof = import_sglang([f2])
    assert isinstance(prof, LoadProfile) and prof.num_profiles == len(recs)
    assert prof.moe_layer_index.tolist() == real.moe_layer_index.tolist()
    assert np.array_equal(prof.total(), layer_counts(real.expert_ids, 64))


def test_sglang_forward_mode_becomes_each_tokens_phase(real, tmp_path):
    """An extend pass, a decode pass and a mixed pass (chunked prefill: a 1-token request is a decode step) give
    each token its phase, and the trace keeps it through save, load, take and concatenation."""
    from traces import load, save

    p2l = _placement(real.decoder_layers, 64, seed=5)
    recs = _sglang_records(real, p2l, seqs_per_pass=3, rank=0, seed=6)[:3]
    n0, n1 = len(recs[0]["input_ids"]), len(recs[1]["input_ids"])
    recs[1] = dict(recs[1], extend_seq_lens=None, forward_mode=2)
    lens = recs[2]["extend_seq_lens"]
    n2 = sum(lens)
    mixed_lens = [lens[0] - 2, 1, 1] + lens[1:]  # two of the first request's tokens as two 1-token requests
    recs[2] = dict(recs[2], extend_seq_lens=mixed_lens, forward_mode=3)
    f = tmp_path / "m.pt"
    torch.save(dict(records=recs, last_physical_to_logical_map=torch.from_numpy(p2l)), f)
    got = import_sglang([f])
    expect = np.concatenate([np.zeros(n0), np.ones(n1), np.zeros(lens[0] - 2), [1, 1], np.zeros(n2 - lens[0])])
    assert np.array_equal(got.phase, expect.astype(np.int8))
    save(got, tmp_path / "t.npz")
    back = load(tmp_path / "t.npz")
    assert np.array_equal(back.phase, got.phase)
    assert back.of_phase("decode").num_tokens == n1 + 2
    assert RoutingTrace.concat([back, back]).phase.size == 2 * got.num_tokens


def test_sglang_stat_dump(real, tmp_path):
    L_all, E = real.decoder_layers, real.num_experts
    seq = real.sequence_index()
    buffer = np.zeros((16, L_all, E), dtype=np.int32)  # circular buffer: unused steps stay zero
    for step in range(6):
        part = real.take(seq % 6 == step)
        buffer[step, real.moe_layer_index] = layer_counts(part.expert_ids, E).astype(np.int32)
    f = tmp_path / "expert_distribution_recorder_1700000000.0.pt"
    torch.save({"rank": 0, "logical_count": torch.from_numpy(buffer),
                "average_utilization_rate_over_window": None}, f)
    prof = import_sglang([f])
    assert isinstance(prof, LoadProfile) and prof.num_profiles == 6
    assert prof.moe_layer_index.tolist() == real.moe_layer_index.tolist() and prof.num_hidden_layers == L_all
    assert np.array_equal(prof.total(), layer_counts(real.expert_ids, E))


def _vllm_arrays(tr: RoutingTrace) -> list[np.ndarray]:
    """One ``[tokens, num_hidden_layers, top_k]`` int32 array per request, dense layers' rows left 0."""
    seq = tr.sequence_index()
    out = []
    for s in np.unique(seq):
        part = tr.expert_ids[seq == s]
        a = np.zeros((part.shape[0], tr.decoder_layers, tr.top_k), dtype=np.int32)
        a[:, tr.moe_layer_index] = part
        out.append(a)
    return out


def _b64npy(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def test_vllm_routed_experts(real, tmp_path):
    arrays = _vllm_arrays(real)
    responses = tmp_path / "responses.jsonl"
    with open(responses, "w") as f:
        for i, a in enumerate(arrays[:-1]):
            f.write(json.dumps({"id": f"cmpl-{i}", "object": "text_completion", "model": "ds",
                                "choices": [{"index": 0, "text": "...", "finish_reason": "length",
                                             "routed_experts": _b64npy(a)}],
                                "usage": {"prompt_tokens": a.shape[0], "completion_tokens": 1}}) + "\n")
    last = tmp_path / "req-last.npy"  # offline LLM API: CompletionOutput.routed_experts saved with np.save
    np.save(last, arrays[-1])
    got = import_vllm([responses, last], num_experts=64)
    assert got.moe_layer_index.tolist() == real.moe_layer_index.tolist() and got.num_hidden_layers == 27
    assert np.array_equal(got.expert_ids, real.expert_ids)
    assert got.num_sequences == real.num_sequences and np.array_equal(got.pos_in_seq, real.pos_in_seq)
    # nested JSON lists are accepted too, and --moe-layer-index can name the rows to keep
    small = tmp_path / "one.json"
    small.write_text(json.dumps([{"routed_experts": arrays[0].tolist()}]))
    got2 = import_vllm([small], num_experts=64, moe_layer_index=list(range(1, 27)))
    assert np.array_equal(got2.expert_ids, real.expert_ids[real.sequence_index() == 0])


def test_trtllm_expert_statistic(real, tmp_path):
    from safetensors.numpy import save_file

    E = real.num_experts
    seq = real.sequence_index()
    folder = tmp_path / "expert_statistic"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": E, "num_experts_per_token": real.top_k}))
    for rank in range(2):
        records = {}
        part = real.take(seq % 2 == rank)
        it_of = part.sequence_index() % 4  # four iterations
        for it in range(4):
            counts = layer_counts(part.expert_ids[it_of == it], E).astype(np.int64)
            for j, layer in enumerate(real.moe_layer_index):
                records[f"{100 + it}_{int(layer)}"] = counts[j]
        save_file(records, str(folder / f"rank{rank}.safetensors"))
    prof = import_trtllm([folder])
    assert prof.names == ["iter100", "iter101", "iter102", "iter103"]
    assert prof.moe_layer_index.tolist() == real.moe_layer_index.tolist()
    assert np.array_equal(prof.total(), layer_counts(real.expert_ids, E))
    # tensor parallel: identical rank files count once
    tp = tmp_path / "tp"
    tp.mkdir()
    for name in ("meta_info.json", "rank0.safetensors"):
        (tp / name).write_bytes((folder / name).read_bytes())
    (tp / "rank1.safetensors").write_bytes((folder / "rank0.safetensors").read_bytes())
    assert np.array_equal(import_trtllm([tp]).total(), import_trtllm([folder / "meta_info.json",
                                                                      folder / "rank0.safetensors"]).total())


def test_cli_import_round_trip_and_bad_input(real, tmp_path):
    arrays = _vllm_arrays(real)
    src = tmp_path / "r.jsonl"
    src.write_text("\n".join(json.dumps({"choices": [{"index": 0, "routed_experts": _b64npy(a)}]})
                             for a in arrays) + "\n")
    out = tmp_path / "t.npz"
    r = runner.invoke(app, ["import", "vllm", str(src), "--num-experts", "64", "--model-name", "ds-v2-lite",
                            "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    tr = load(out)
    assert isinstance(tr, RoutingTrace) and tr.model == "ds-v2-lite" and np.array_equal(tr.expert_ids, real.expert_ids)
    garbage = tmp_path / "g.json"
    garbage.write_text(json.dumps({"choices": [{"routed_experts": "not base64 npy"}]}))
    notpt = tmp_path / "x.pt"
    notpt.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    zero = tmp_path / "zero.pt"
    zero.write_bytes(b"")
    import fractions

    import torch

    objects = tmp_path / "objects.pt"  # a class outside torch's safe list needs full unpickling
    torch.save({"records": fractions.Fraction(1, 3)}, objects)
    cases = [
        (["import", "nope", str(src)], "unknown serving stack"),
        (["import", "vllm", str(garbage)], "base64"),
        (["import", "vllm", str(src), "--num-experts", "8"], "outside [0, 8)"),
        (["import", "vllm", str(src), "--moe-layer-index", "1,x"], "comma-separated"),
        (["import", "sglang", str(notpt)], "is not a torch.save file (SGLang's recorder dumps are): it is text"),
        (["import", "sglang", str(zero)], "it is an empty file; copy the file again"),
        (["import", "sglang", str(objects)], "if you trust the file, retry with --allow-pickle"),
        (["import", "trtllm", str(empty)], "meta_info.json"),
        (["import", "vllm", str(tmp_path / "missing.json")], "no such file"),
    ]
    for args, needle in cases:
        r = runner.invoke(app, [*args, "--out", str(tmp_path / "o.npz")])
        text = " ".join(r.output.split())
        assert r.exit_code == 2, (args, r.output)
        assert needle in text and "Traceback" not in text, (args, text)
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.exception)


def test_importers_reject_inconsistent_dumps(real, tmp_path):
    p2l = _placement(real.decoder_layers, 64, seed=5)
    rec = _sglang_records(real, p2l, seqs_per_pass=50, rank=0, seed=6)[0]
    bad = dict(rec, topk_ids_of_layer=rec["topk_ids_of_layer"][:, :-1])  # one token short
    f = tmp_path / "bad.pt"
    torch.save(dict(records=[bad], last_physical_to_logical_map=torch.from_numpy(p2l)), f)
    with pytest.raises(TraceError, match="topk_ids_of_layer has shape"):
        import_sglang([f])
    folder = tmp_path / "trt"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": 64, "num_experts_per_token": 6}))
    from safetensors.numpy import save_file

    save_file({"3_1": np.ones(32, dtype=np.int64)}, str(folder / "rank0.safetensors"))
    with pytest.raises(TraceError, match="32 counts"):
        import_trtllm([folder])
