"""Collector: the recorded ids are the experts each tiny random Hugging Face MoE model itself routed to.

For every supported architecture a tiny model is built from its config on CPU. Two independent references:
(1) the ``top_k_index`` / ``top_k_weights`` the model passes to its experts module (what was computed), and
(2) the architecture's routing rule re-implemented here from the paper / model card and applied to the
``router_logits`` the model returns (softmax top-k for Mixtral, Qwen-MoE, OLMoE; group-limited greedy for
DeepSeek-V2; sigmoid + bias-corrected group-limited top-k for DeepSeek-V3; top-k of logits with softmax
weights for GPT-OSS). Padding tokens must not be recorded. Sharding, merging and resume are checked too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from placement.affinity import AffinityStats  # noqa: E402
from placement.cli import app  # noqa: E402
from traces import TraceError, datasets, load_trace, save  # noqa: E402
from traces.collect import (  # noqa: E402
    CollectError,
    RoutingRecorder,
    collect,
    find_router_sites,
    record_batch,
)
from traces.merge import merge_files, merge_traces  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=3, max_position_embeddings=64)
ARCHS = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=False,
                      shared_expert_intermediate_size=16, mlp_only_layers=[1]),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, head_dim=8,
                      norm_topk_prob=True),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2, num_key_value_heads=4,
                        topk_method="group_limited_greedy", routed_scaling_factor=2.0),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2, num_key_value_heads=4,
                        norm_topk_prob=True, routed_scaling_factor=2.5),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and the test machine's cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


EXPECTED_MOE_LAYERS = {"qwen2_moe": [0, 2], "deepseek_v2": [1, 2], "deepseek_v3": [1, 2]}


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A tiny random model; router weights get a larger spread so that no two experts tie."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **ARCHS.get(model_type, {}), **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for site in find_router_sites(model) if model_type in ARCHS else []:
            w = site.module.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.3)
            bias = getattr(site.module, "e_score_correction_bias", None)
            if bias is not None:  # DeepSeek-V3: a bias large enough to change choices
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.5)
    return model


SEQS = [[5, 17, 33, 22, 9, 41, 7], [12, 13, 60], [8, 8, 19, 25, 70], [44]]  # no special ids (zero embeddings tie)


def _padded(seqs):
    S = max(map(len, seqs))
    ids = torch.zeros((len(seqs), S), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    return ids, mask


def _experts_of(model, site):
    return model.get_submodule(site.name.rsplit(".", 1)[0] + ".experts")


def _reference_routing(model_type: str, cfg, logits: np.ndarray, router) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [N, k], weights [N, k])`` from router logits by the architecture's published routing rule."""
    k = cfg.num_experts_per_tok
    E = logits.shape[1]

    def topk(scores, kk):
        return np.argsort(-scores, axis=1, kind="stable")[:, :kk]

    def softmax(x):
        z = np.exp(x - x.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    if model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        p = softmax(logits)
        ids = topk(p, k)
        w = np.take_along_axis(p, ids, 1)
        if model_type == "mixtral" or getattr(cfg, "norm_topk_prob", False):
            w = w / w.sum(1, keepdims=True)
        return ids, w
    if model_type == "gpt_oss":
        ids = topk(logits, k)
        return ids, softmax(np.take_along_axis(logits, ids, 1))
    G, TG = cfg.n_group, cfg.topk_group
    if model_type == "deepseek_v2":  # DeepSeek-V2 (arXiv 2405.04434): device/group-limited greedy on softmax
        p = softmax(logits)
        groups = topk(p.reshape(-1, G, E // G).max(axis=2), TG)
        mask = np.zeros((len(p), G), bool)
        np.put_along_axis(mask, groups, True, 1)
        masked = np.where(np.repeat(mask, E // G, axis=1), p, 0.0)
        ids = topk(masked, k)
        return ids, np.take_along_axis(p, ids, 1) * cfg.routed_scaling_factor
    # DeepSeek-V3 (arXiv 2412.19437): sigmoid affinity + bias for selection only, group score = sum of top-2
    s = 1.0 / (1.0 + np.exp(-logits))
    bias = router.e_score_correction_bias.detach().numpy()
    choice = s + bias
    gs = np.sort(choice.reshape(-1, G, E // G), axis=2)[:, :, -2:].sum(axis=2)
    groups = topk(gs, TG)
    mask = np.zeros((len(s), G), bool)
    np.put_along_axis(mask, groups, True, 1)
    ids = topk(np.where(np.repeat(mask, E // G, axis=1), choice, -np.inf), k)
    w = np.take_along_axis(s, ids, 1)
    w = w / (w.sum(1, keepdims=True) + 1e-20) * cfg.routed_scaling_factor
    return ids, w


def _sorted_by_id(ids, w):
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(w, order, -1)


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_collected_ids_are_what_the_model_routed(model_type):
    model = tiny_model(model_type)
    cfg = model.config
    rec = RoutingRecorder(model)
    assert rec.layout["moe_layer_index"].tolist() == EXPECTED_MOE_LAYERS.get(model_type, [0, 1, 2])
    assert all(s.kind == "router-output" and s.fallback is None for s in rec.sites)  # the verified routers
    ids, mask = _padded(SEQS)
    experts_in = {j: [] for j in range(len(rec.sites))}
    router_in = {j: [] for j in range(len(rec.sites))}
    handles = [_experts_of(model, s).register_forward_pre_hook(
        lambda m, a, j=j: experts_in[j].append((a[1].clone(), a[2].clone()))) for j, s in enumerate(rec.sites)]
    handles += [s.module.register_forward_pre_hook(lambda m, a, j=j: router_in[j].append(a[0].clone()))
                for j, s in enumerate(rec.sites)]
    try:
        with rec, torch.no_grad():
            rec.begin(mask.bool())
            out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
            got_ids, got_w = rec.end()
    finally:
        for h in handles:
            h.remove()
    valid = mask.bool().reshape(-1).numpy()
    T = sum(map(len, SEQS))
    assert got_ids.shape == (T, len(rec.sites), cfg.num_experts_per_tok)  # padding not recorded
    logits = getattr(out, "router_logits", None)
    if logits is None:  # transformers versions whose DeepSeek models return no router logits: the router's own
        with torch.no_grad():
            logits = [torch.nn.functional.linear(router_in[j][0].reshape(-1, cfg.hidden_size).float(),  # its map
                                                 s.module.weight.float(), getattr(s.module, "bias", None))
                      for j, s in enumerate(rec.sites)]
    assert len(logits) == len(rec.sites)
    naive_differs = 0
    for j, site in enumerate(rec.sites):
        (ref_ids, ref_w), = experts_in[j]  # (1) what the experts computed with, same order
        assert np.array_equal(got_ids[:, j], ref_ids.numpy()[valid])
        np.testing.assert_allclose(got_w[:, j], ref_w.float().numpy()[valid], rtol=1e-6)
        lg = logits[j].float().numpy()[valid]  # (2) the published routing rule on the model's own logits
        r_ids, r_w = _reference_routing(model_type, cfg, lg, site.module)
        a_ids, a_w = _sorted_by_id(got_ids[:, j], got_w[:, j])
        b_ids, b_w = _sorted_by_id(r_ids, r_w)
        assert np.array_equal(a_ids, b_ids)
        np.testing.assert_allclose(a_w, b_w, rtol=1e-4, atol=1e-6)
        if model_type == "deepseek_v3":
            naive = np.sort(np.argsort(-lg, axis=1)[:, : cfg.num_experts_per_tok], axis=1)
            naive_differs += int((naive != a_ids).any(axis=1).sum())
    if model_type == "deepseek_v3":
        assert naive_differs > 0  # the bias changed choices, and the collector recorded the biased choice


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_record_batch_padding_and_order(model_type):
    """record_batch on a padded batch = each sequence run alone (no padding), tokens ordered by sequence."""
    model = tiny_model(model_type)
    rec = RoutingRecorder(model)
    with rec:
        batch = record_batch(model, rec, SEQS)
        alone = [record_batch(model, rec, [s]) for s in SEQS]
    assert batch["row"].tolist() == [b for b, s in enumerate(SEQS) for _ in s]
    assert batch["pos_in_seq"].tolist() == [p for s in SEQS for p in range(len(s))]
    ref = np.concatenate([a["expert_ids"] for a in alone])
    assert np.array_equal(np.sort(batch["expert_ids"], -1), np.sort(ref, -1))
    np.testing.assert_allclose(np.sort(batch["gate_weights"], -1),
                               np.sort(np.concatenate([a["gate_weights"] for a in alone]), -1), rtol=1e-4, atol=1e-6)


def test_generation_records_decode_steps_and_stops_at_eos():
    model = tiny_model("qwen3_moe")
    rec = RoutingRecorder(model)
    site0 = rec.sites[0]
    seen = []
    h = _experts_of(model, site0).register_forward_pre_hook(lambda m, a: seen.append(a[1].clone()))
    try:
        with rec:
            free = record_batch(model, rec, SEQS[:3], generate=4)
    finally:
        h.remove()
    lens = [len(s) for s in SEQS[:3]]
    # 4 decode passes per sequence, positions continue after the prompt
    for b, n in enumerate(lens):
        assert free["pos_in_seq"][free["row"] == b].tolist() == list(range(n + 4))
    # decode-step routing equals the experts' inputs of those passes (prefill is pass 0, left-padded)
    decode_ids = torch.stack([x.reshape(3, -1)[:, :] for x in seen[1:]], dim=1).numpy()  # [B, steps, k]
    for b, n in enumerate(lens):
        got = free["expert_ids"][(free["row"] == b) & (free["pos_in_seq"] >= n), 0]
        assert np.array_equal(got, decode_ids[b])
    # prefill part equals prefill-only collection (left padding + position ids change nothing)
    with rec:
        pre = record_batch(model, rec, SEQS[:3])
    is_prompt = free["pos_in_seq"] < np.array(lens)[free["row"]]
    assert np.array_equal(np.sort(free["expert_ids"][is_prompt], -1), np.sort(pre["expert_ids"], -1))
    # eos: make sequence 0's first generated token the eos token -> its decode steps are not recorded
    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([SEQS[0]])).logits[0, -1].argmax())
    with rec:
        stop = record_batch(model, rec, SEQS[:3], generate=4, eos_token_id=first)
    assert (stop["row"] == 0).sum() == lens[0]
    assert (stop["row"] == 1).sum() + (stop["row"] == 2).sum() >= lens[1] + lens[2]


def test_generic_fallback_router_and_experts_input():
    # GLM-4.5 MoE is not in the verified list: its 'gate' returns (logits, weights, ids) -> generic router tap
    glm = tiny_model("glm4_moe", n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                     n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=8)
    # DBRX's router returns logits only: the ids are read from the experts module's arguments
    dbrx = tiny_model("dbrx", d_model=32, n_heads=4, n_layers=3, max_seq_len=64,
                      ffn_config={"moe_num_experts": 8, "moe_top_k": 2, "ffn_hidden_size": 16},
                      attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0})
    for model, moe_layers in ((glm, [1, 2]), (dbrx, [0, 1, 2])):
        rec = RoutingRecorder(model)
        assert rec.layout["moe_layer_index"].tolist() == moe_layers
        seen = {j: [] for j in range(len(rec.sites))}
        hs = [_experts_of(model, s).register_forward_pre_hook(lambda m, a, j=j: seen[j].append(a[1].clone()))
              for j, s in enumerate(rec.sites)]
        try:
            with rec:
                got = record_batch(model, rec, SEQS)
        finally:
            for h in hs:
                h.remove()
        valid = _padded(SEQS)[1].bool().reshape(-1).numpy()
        for j in range(len(rec.sites)):
            assert np.array_equal(got["expert_ids"][:, j], seen[j][0].numpy()[valid])


def test_dense_model_is_refused_by_name():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**COMMON))
    with pytest.raises(CollectError, match="LlamaForCausalLM"):
        RoutingRecorder(model)


# --------------------------------------------------------------------------------------------------------------
# Streaming: shards, exact merge, resume
# --------------------------------------------------------------------------------------------------------------


def _data(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return [(i, rng.integers(0, 96, size=int(rng.integers(2, 12))).tolist()) for i in range(n)]


def _same_trace(a, b):
    assert np.array_equal(a.expert_ids, b.expert_ids)
    assert np.array_equal(a.seq_id, b.seq_id) and np.array_equal(a.pos_in_seq, b.pos_in_seq)
    np.testing.assert_array_equal(a.gate_weights, b.gate_weights)
    assert np.array_equal(a.moe_layer_index, b.moe_layer_index) and a.num_hidden_layers == b.num_hidden_layers


def _assert_stats_equal(a: AffinityStats, b: AffinityStats):
    for name in ("tokens", "load", "transitions", "coactivation", "transitions_top1"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for name in ("load_gate", "transitions_gate"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9)


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen2_moe")


def test_shards_merge_exactly(qwen, tmp_path):
    data = _data()
    one = collect(qwen, data, tmp_path / "one.npz", batch_size=4, shard_tokens=10**9)
    many = collect(qwen, data, tmp_path / "many.npz", batch_size=4, shard_tokens=25, keep_shards=True)
    assert one.shards == 1 and many.shards > 3 and many.tokens == one.tokens == sum(len(s) for _, s in data)
    a, b = load_trace(tmp_path / "one.npz"), load_trace(tmp_path / "many.npz")
    _same_trace(a, b)
    assert a.moe_layer_index.tolist() == [0, 2] and a.num_hidden_layers == 3
    shards = sorted((tmp_path / "many.npz.shards").glob("shard-*.npz"))
    assert len(shards) == many.shards
    per_shard = [AffinityStats.from_trace(load_trace(s)) for s in shards]
    _assert_stats_equal(sum(per_shard[1:], per_shard[0]), AffinityStats.from_trace(a))


def test_merge_of_real_trace_parts_is_exact(tmp_path):
    """A bundled DeepSeek-V2-Lite trace split into 'ranks' (by sequence) and shards merges back exactly."""
    full = datasets.load("deepseek-v2-lite-esft:intent")
    seq = full.sequence_index()
    parts = []
    for r in range(3):
        for i in range(2):  # shards hold whole sequences, as the collector writes them
            p = tmp_path / f"rank{r}-shard{i}.npz"
            save(full.take((seq % 3 == r) & ((seq // 3) % 2 == i)), p)
            parts.append(p)
    s = merge_files(parts, tmp_path / "merged.npz")
    assert not s.renumbered and s.tokens == full.num_tokens
    merged = load_trace(tmp_path / "merged.npz")
    assert merged.num_sequences == full.num_sequences
    _assert_stats_equal(AffinityStats.from_trace(merged), AffinityStats.from_trace(full))
    # in memory, same result; two separate runs with overlapping ids get distinct sequences
    again = merge_traces([full, full])
    assert again.num_sequences == 2 * full.num_sequences
    s2 = merge_files([tmp_path / "merged.npz", tmp_path / "merged.npz"], tmp_path / "twice.npz")
    assert s2.renumbered and load_trace(tmp_path / "twice.npz").num_sequences == 2 * full.num_sequences


def test_merge_refuses_other_layouts(tmp_path):
    full = datasets.load("deepseek-v2-lite-esft:law")
    save(full, tmp_path / "a.npz")
    from dataclasses import replace

    save(replace(full, num_experts=80), tmp_path / "b.npz")
    with pytest.raises(TraceError, match="num_experts"):
        merge_files([tmp_path / "a.npz", tmp_path / "b.npz"], tmp_path / "m.npz")


class _Killed(Exception):
    pass


def _dying(data, after):
    for i, item in enumerate(data):
        if i == after:
            raise _Killed()
        yield item


def test_killed_run_resumes_from_last_shard(qwen, tmp_path):
    data = _data(40, seed=3)
    ref = collect(qwen, data, tmp_path / "ref.npz", batch_size=3, shard_tokens=20)
    out = tmp_path / "run.npz"
    with pytest.raises(_Killed):
        collect(qwen, _dying(data, 25), out, batch_size=3, shard_tokens=20)
    shard_dir = tmp_path / "run.npz.shards"
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    k = len(manifest["shards"])
    assert k >= 2 and not out.exists()
    # a shard written just before the kill but not yet listed in the manifest must be redone, not duplicated
    from shutil import copy

    copy(shard_dir / manifest["shards"][0]["file"], shard_dir / f"shard-{k:06d}.npz")
    resumed = collect(qwen, data, out, batch_size=3, shard_tokens=20)
    assert resumed.resumed_from_shard == k and resumed.tokens == ref.tokens
    _same_trace(load_trace(out), load_trace(tmp_path / "ref.npz"))
    assert not shard_dir.exists()
    # a different run refuses the shard folder of another one
    with pytest.raises(_Killed):
        collect(qwen, _dying(data, 10), out, batch_size=3, shard_tokens=20)
    with pytest.raises(CollectError, match="different run"):
        collect(qwen, data, out, batch_size=5, shard_tokens=20)


_KILL_SCRIPT = """
import os, signal, sys, json
sys.path[:0] = [{root!r}, {tests!r}]
import torch
torch.set_num_threads(1)
from test_collect import tiny_model, _data
from traces.collect import collect

def dying(data, shard_dir):
    for item in data:
        m = shard_dir + "/manifest.json"
        if os.path.exists(m) and len(json.load(open(m))["shards"]) >= 2:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs
        yield item

collect(tiny_model("qwen2_moe"), dying(_data(40, seed=3), {shard_dir!r}), {out!r}, batch_size=3, shard_tokens=20)
"""


def test_sigkilled_process_resumes(qwen, tmp_path):
    import subprocess
    import sys

    out, shard_dir = tmp_path / "k.npz", tmp_path / "k.npz.shards"
    code = _KILL_SCRIPT.format(root=str(Path(__file__).resolve().parents[1]), tests=str(Path(__file__).parent),
                               shard_dir=str(shard_dir), out=str(out))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == -9, res.stderr[-2000:]
    assert not out.exists() and len(json.loads((shard_dir / "manifest.json").read_text())["shards"]) == 2
    resumed = collect(qwen, _data(40, seed=3), out, batch_size=3, shard_tokens=20)
    assert resumed.resumed_from_shard == 2
    ref = collect(qwen, _data(40, seed=3), tmp_path / "ref.npz", batch_size=3, shard_tokens=20)
    assert resumed.tokens == ref.tokens
    _same_trace(load_trace(out), load_trace(tmp_path / "ref.npz"))


def test_max_tokens_cuts_exactly(qwen, tmp_path):
    s = collect(qwen, _data(), tmp_path / "m.npz", batch_size=4, max_tokens=37)
    tr = load_trace(tmp_path / "m.npz")
    assert s.tokens == tr.num_tokens == 37


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------

runner = CliRunner()


def _save_checkpoint(model, folder: Path, with_tokenizer: bool = True) -> Path:
    model.save_pretrained(folder)
    if with_tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {w: i for i, w in enumerate(["<pad>", "<unk>"] + [f"w{i}" for i in range(90)])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    return folder


def test_cli_collect_text_and_token_jsonl(qwen, tmp_path):
    ckpt = _save_checkpoint(qwen, tmp_path / "ckpt")
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 90}" for j in range(3 + i % 5))})
                              for i in range(12)) + "\n")
    r = runner.invoke(app, ["collect", "--model", str(ckpt), "--data", str(text), "--out", str(tmp_path / "t.npz"),
                            "--batch-size", "5", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    tr = load_trace(tmp_path / "t.npz")
    assert info["tokens"] == tr.num_tokens == sum(3 + i % 5 for i in range(12))
    assert tr.num_sequences == 12 and tr.moe_layer_index.tolist() == [0, 2]
    toks = tmp_path / "ids.jsonl"
    toks.write_text("\n".join(json.dumps({"input_ids": s}) for _, s in _data(10)) + "\n")
    r = runner.invoke(app, ["collect", "--model", str(ckpt), "--data", str(toks), "--out", str(tmp_path / "i.npz"),
                            "--max-tokens", "30", "--generate", "2"])
    assert r.exit_code == 0, r.output
    assert load_trace(tmp_path / "i.npz").num_tokens == 30


def test_cli_collect_bad_input_is_one_sentence(qwen, tmp_path):
    ckpt = _save_checkpoint(qwen, tmp_path / "ckpt", with_tokenizer=False)
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    badjson = tmp_path / "bad.jsonl"
    badjson.write_text('{"input_ids": [1, 2]}\n{oops\n')
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "hello"}) + "\n")
    oov = tmp_path / "oov.jsonl"
    oov.write_text(json.dumps({"input_ids": [1, 5000]}) + "\n")
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = _save_checkpoint(LlamaForCausalLM(LlamaConfig(**COMMON)), tmp_path / "dense", with_tokenizer=False)
    rejected = tmp_path / "rejected"  # a config.json transformers' own validation refuses (not a ValueError)
    rejected.mkdir()
    (rejected / "config.json").write_text(json.dumps({"model_type": "deepseek_v2", "hidden_size": 16}))
    cases = [
        (["--model", str(rejected), "--data", str(good)], "attention heads"),
        (["--model", str(tmp_path / "nope"), "--data", str(good)], "not a model folder"),
        (["--model", str(ckpt), "--data", str(tmp_path / "missing.jsonl")], "no such data file"),
        (["--model", str(ckpt), "--data", str(badjson)], "bad.jsonl:2"),
        (["--model", str(ckpt), "--data", str(text)], "no tokenizer"),
        (["--model", str(ckpt), "--data", str(oov)], "vocabulary"),
        (["--model", str(dense), "--data", str(good)], "LlamaForCausalLM"),
        (["--model", str(ckpt), "--data", str(good), "--batch-size", "0"], "batch size"),
    ]
    for args, needle in cases:
        r = runner.invoke(app, ["collect", *args, "--out", str(tmp_path / "x.npz")])
        text = " ".join(r.output.split())  # the console wraps long lines
        assert r.exit_code == 2, (args, r.output)
        assert needle in text and "Traceback" not in text, text
        assert text.startswith("error:") and text.count("error:") == 1, text
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.exception)
        # a failed collection leaves neither the trace nor a shard folder (manifest) behind
        assert not (tmp_path / "x.npz").exists() and not (tmp_path / "x.npz.shards").exists(), args


def test_cli_merge(tmp_path):
    full = datasets.load("deepseek-v2-lite-esft:intent")
    a, b = full.split_by_sequence(0.5, seed=1)
    save(a, tmp_path / "a.npz")
    save(b, tmp_path / "b.npz")
    r = runner.invoke(app, ["merge", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--out",
                            str(tmp_path / "m.npz"), "--json"])
    assert r.exit_code == 0, r.output
    m = load_trace(tmp_path / "m.npz")
    assert m.num_tokens == full.num_tokens and m.num_sequences == full.num_sequences
    r = runner.invoke(app, ["merge", str(tmp_path / "a.npz"), str(tmp_path / "nope.npz"), "--out",
                            str(tmp_path / "m2.npz")])
    assert r.exit_code == 2 and "nope.npz" in " ".join(r.output.split())
