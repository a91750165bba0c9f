"""Synthetic routing traces calibrated on a real one, for planning at sizes no bundled trace has.

The generative model (a latent-factor router):

- every sequence has a topic vector, every token a type (one of ``num_types`` prototype vectors, drawn
  independently of its sequence) and a latent state ``h`` in ``R^d`` that mixes its sequence's topic
  (``topic_share`` of the variance), its type (``type_share``) and its own noise; from one MoE layer to the next,
  ``h`` keeps a share ``persistence`` of itself and refreshes the rest around the same topic and type (an AR(1)
  walk), which is what makes adjacent layers' experts predictable;
- layer l scores expert e as ``load_skew x b[l, e] + affinity x <w[l, e], h> + noise`` (Gaussian noise with
  the spread of a Gumbel, so top-k is close to sampling from a softmax), with fixed random popularity ``b`` and
  expert directions ``w``; experts with similar directions are chosen together (within-layer co-activation) and
  by the same tokens at the next layer (adjacent-layer affinity);
- the token takes the top-k scores; with ``groups`` and ``topk_groups`` it first keeps the ``topk_groups`` groups
  with the best sum of their top-2 scores (DeepSeek-V3's node-limited routing), then the top-k inside them;
- ``workload_skew`` (a Dirichlet concentration) gives each workload (``seed``) its own mix of token types, so two
  seeds are two different workloads of one model (``model_seed``);
- optionally a *planted* block structure: experts of every layer are split into ``planted`` blocks and a token of
  block c picks its experts in block c (with probability ``1 - planted_noise`` per expert), so the ideal
  placement is known.

:func:`calibrate` fits ``load_skew``, ``affinity``, ``type_share`` and ``topic_share`` so that a synthetic trace of
the real trace's shape reproduces its statistics (:func:`routing_stats`: expert-load spread, adjacent-layer mutual
information above the shuffled baseline, within-layer co-activation information above the shuffled baseline,
information between a token's sequence and its experts above the shuffled baseline);
:func:`deepseek_v3` then generates DeepSeek-V3-sized traces (58 MoE layers x 256 experts, top-8, 8 groups,
4 groups per token) with those parameters. Transfer from 64 to 256 experts is an assumption: the latent
strengths are kept, the statistics of the result are reported next to the calibration target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from traces.format import RoutingTrace, TraceError, pair_counts

__all__ = ["SyntheticSpec", "generate", "routing_stats", "calibrate", "ESFT_CALIBRATED", "deepseek_v3",
           "model_trace", "planted"]


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape and strengths of a synthetic router (see the module docstring)."""

    num_layers: int
    num_experts: int
    top_k: int
    load_skew: float = 0.5
    affinity: float = 1.0
    persistence: float = 0.8
    latent_dim: int = 16
    topic_share: float = 0.5
    type_share: float = 0.0
    num_types: int = 128
    workload_skew: float | None = None
    groups: int = 1
    topk_groups: int | None = None
    planted: int = 0
    planted_noise: float = 0.05
    model: str = "synthetic"

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.top_k > self.num_experts:
            raise TraceError(f"top_k must be between 1 and num_experts ({self.num_experts}), got {self.top_k}")
        if self.num_experts % max(self.groups, 1):
            raise TraceError(f"groups ({self.groups}) must divide num_experts ({self.num_experts})")
        if self.topk_groups is not None and (self.topk_groups < 1 or self.topk_groups > self.groups
                                             or self.topk_groups * self.num_experts // self.groups < self.top_k):
            raise TraceError("topk_groups must leave at least top_k experts to choose from")
        if not 0.0 <= self.persistence <= 1.0 or not 0.0 <= self.topic_share <= 1.0 \
                or not 0.0 <= self.type_share <= 1.0 - self.topic_share:
            raise TraceError("persistence, topic_share and type_share must be between 0 and 1 "
                             "(topic_share + type_share at most 1)")
        if self.planted and self.num_experts % self.planted:
            raise TraceError(f"planted blocks ({self.planted}) must divide num_experts ({self.num_experts})")


def generate(spec: SyntheticSpec, num_tokens: int, seq_len: int = 128, seed: int = 0, model_seed: int = 0,
             chunk_tokens: int = 8192) -> RoutingTrace:
    """A synthetic :class:`RoutingTrace` ``[T, L, k]`` with gate weights and sequence ids.

    ``model_seed`` fixes the router (popularity and expert directions: the "model"); ``seed`` the tokens (the
    "workload"): two traces with the same model_seed and different seeds are two workloads of one model.
    """
    if num_tokens < 1:
        raise TraceError("num_tokens must be >= 1")
    L, E, k, d = spec.num_layers, spec.num_experts, spec.top_k, spec.latent_dim
    mrng = np.random.default_rng(model_seed)
    b = mrng.standard_normal((L, E)).astype(np.float32)
    w = (mrng.standard_normal((L, E, d)) / np.sqrt(d)).astype(np.float32)
    rng = np.random.default_rng(seed)
    n_seq = max(1, -(-num_tokens // seq_len))
    seq_id = np.repeat(np.arange(n_seq), seq_len)[:num_tokens]
    pos = np.tile(np.arange(seq_len), n_seq)[:num_tokens]
    topics = rng.standard_normal((n_seq, d)).astype(np.float32)
    ids = np.empty((num_tokens, L, k), dtype=np.int16 if E < 32767 else np.int32)
    gates = np.empty((num_tokens, L, k), dtype=np.float32)
    protos = mrng.standard_normal((max(spec.num_types, 1), d)).astype(np.float32)
    type_p = None  # uniform over types, or a workload's own mix (Dirichlet, drawn from ``seed``)
    if spec.workload_skew:
        type_p = rng.dirichlet(np.full(protos.shape[0], float(spec.workload_skew)))
    a_t, a_p = np.sqrt(spec.topic_share), np.sqrt(spec.type_share)
    a_n = np.sqrt(max(1.0 - spec.topic_share - spec.type_share, 0.0))
    rho, fresh = spec.persistence, np.sqrt(max(1.0 - spec.persistence ** 2, 0.0))
    per_block = E // spec.planted if spec.planted else 0
    for s in range(0, num_tokens, chunk_tokens):
        sl = slice(s, min(s + chunk_tokens, num_tokens))
        n = sl.stop - sl.start
        kind = protos[rng.choice(protos.shape[0], size=n, p=type_p)]  # each token's type (prototype state)
        base = a_t * topics[seq_id[sl]] + a_p * kind
        h = base + a_n * rng.standard_normal((n, d), dtype=np.float32)
        block = rng.integers(spec.planted, size=n) if spec.planted else None
        for l in range(L):
            if l:
                h = rho * h + fresh * (base + a_n * rng.standard_normal((n, d), dtype=np.float32))
            logits = spec.load_skew * b[l][None, :] + spec.affinity * (h @ w[l].T)
            score = logits + 1.28 * rng.standard_normal((n, E), dtype=np.float32)
            if spec.planted:
                inside = (np.arange(E)[None, :] // per_block) == block[:, None]
                outside_top = np.argsort(-np.where(inside, -np.inf, score), axis=1)[:, :k]
                score = np.where(inside, score + 1000.0, score)
            if spec.topk_groups is not None and spec.groups > 1:
                gs = score.reshape(n, spec.groups, E // spec.groups)
                top2 = -np.partition(-gs, 1, axis=2)[:, :, :2].sum(axis=2)
                keep_g = np.argpartition(-top2, spec.topk_groups - 1, axis=1)[:, :spec.topk_groups]
                gmask = np.zeros((n, spec.groups), dtype=bool)
                np.put_along_axis(gmask, keep_g, True, axis=1)
                score = np.where(np.repeat(gmask, E // spec.groups, axis=1), score, -np.inf)
            top = np.argpartition(-score, k - 1, axis=1)[:, :k]
            if spec.planted:
                noisy = rng.random((n, k)) < spec.planted_noise
                top = np.where(noisy, outside_top, top)
            tl = np.take_along_axis(logits, top, axis=1)
            order = np.argsort(-np.take_along_axis(score, top, axis=1), axis=1)
            top = np.take_along_axis(top, order, axis=1)
            tl = np.take_along_axis(tl, order, axis=1)
            g = np.exp(tl - tl.max(axis=1, keepdims=True))
            ids[sl, l] = top
            gates[sl, l] = g / g.sum(axis=1, keepdims=True)
    return RoutingTrace(expert_ids=ids, num_experts=E, gate_weights=gates, seq_id=seq_id.astype(np.int64),
                        pos_in_seq=pos.astype(np.int64), model=spec.model,
                        source=f"synthetic:{spec.model}:seed{seed}")


# ----------------------------------------------------------------------------------------------------------------
# Statistics (self-contained: traces never imports placement)
# ----------------------------------------------------------------------------------------------------------------


def _mi(pairs: np.ndarray) -> np.ndarray:
    tot = pairs.sum(axis=(1, 2), keepdims=True)
    j = pairs / np.maximum(tot, 1e-300)
    pa, pb = j.sum(axis=2, keepdims=True), j.sum(axis=1, keepdims=True)
    ratio = np.divide(j, pa * pb, out=np.ones_like(j), where=(j > 0) & (pa * pb > 0))
    return (j * np.log(ratio)).sum(axis=(1, 2))


def routing_stats(trace: RoutingTrace, seed: int = 0, max_tokens: int = 20000) -> dict[str, float]:
    """Statistics the calibration matches (means over layers / boundaries).

    - ``load_cv``: coefficient of variation of the expert loads in a layer; ``load_max_over_mean``.
    - ``transition_mi`` / ``transition_mi_shuffled``: mutual information (nats) of the adjacent-layer k x k pairs,
      and of the same pairs after shuffling the tokens of layer l+1 (same marginals, no affinity);
      ``transition_mi_excess`` = the difference.
    - ``coactivation_mi_excess``: the same for pairs of distinct experts of one token within a layer, against
      pairs drawn from two different tokens.
    - ``sequence_mi_excess``: information between a token's sequence and its experts at a layer, above the same
      with tokens shuffled across sequences (how topical a sequence's routing is; needs seq_id).
    """
    rng = np.random.default_rng(seed)
    ids = trace.expert_ids
    if ids.shape[0] > max_tokens:
        ids = ids[np.sort(rng.choice(ids.shape[0], max_tokens, replace=False))]
    T, L, k = ids.shape
    E = trace.num_experts
    lay = np.broadcast_to(np.arange(L)[None, :, None], ids.shape)
    ok = ids >= 0
    load = np.bincount((lay * E + ids.astype(np.int64))[ok], minlength=L * E).reshape(L, E).astype(float)
    mean = load.mean(axis=1)
    out = {"load_cv": float((load.std(axis=1) / np.maximum(mean, 1e-300)).mean()),
           "load_max_over_mean": float((load.max(axis=1) / np.maximum(mean, 1e-300)).mean())}
    if L > 1:
        tr = pair_counts(ids[:, :-1], ids[:, 1:], E)
        sh = pair_counts(ids[:, :-1], ids[rng.permutation(T), 1:], E)
        mi, mis = _mi(tr), _mi(sh)
        out.update(transition_mi=float(mi.mean()), transition_mi_shuffled=float(mis.mean()),
                   transition_mi_excess=float((mi - mis).mean()))
    if trace.seq_id is not None:
        seq = trace.sequence_index()
        if trace.num_tokens > max_tokens:
            seq = seq[np.sort(np.random.default_rng(seed).choice(trace.num_tokens, max_tokens, replace=False))]
        _, seq = np.unique(seq, return_inverse=True)
        S = int(seq.max()) + 1
        pairs_s = np.zeros((L, S, E))
        pairs_x = np.zeros((L, S, E))
        perm = rng.permutation(T)
        for l in range(L):
            e = ids[:, l].astype(np.int64)
            okl = e >= 0
            s_rep = np.broadcast_to(seq[:, None], e.shape)
            pairs_s[l] = np.bincount((s_rep * E + e)[okl], minlength=S * E).reshape(S, E)
            s_sh = np.broadcast_to(seq[perm][:, None], e.shape)
            pairs_x[l] = np.bincount((s_sh * E + e)[okl], minlength=S * E).reshape(S, E)
        out["sequence_mi_excess"] = float((_mi(pairs_s) - _mi(pairs_x)).mean())
    if k > 1:
        co = pair_counts(ids, ids, E, exclude_diagonal=True)
        shifted = np.roll(ids, 1, axis=2)  # another token's experts at the same slot order
        other = shifted[rng.permutation(T)]
        cs = pair_counts(ids, other, E)
        out["coactivation_mi_excess"] = float((_mi(co) - _mi(cs)).mean())
    return out


# ----------------------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------------------

_TARGETS = ("load_cv", "transition_mi_excess", "coactivation_mi_excess", "sequence_mi_excess")


def _loss(stats: dict, target: dict) -> float:
    return float(sum(((stats[key] - target[key]) / max(abs(target[key]), 1e-9)) ** 2 for key in _TARGETS))


def calibrate(trace: RoutingTrace, num_tokens: int | None = None, seed: int = 0, iterations: int = 60,
              start: SyntheticSpec | None = None) -> tuple[SyntheticSpec, dict]:
    """Fit ``load_skew``, ``affinity``, ``type_share`` and ``topic_share`` to ``trace``, the rest as in ``start``.

    Nelder-Mead on the relative errors of :func:`routing_stats` (load CV, transition, co-activation and sequence
    information above their shuffled baselines), with common random numbers. Returns the spec and
    ``{"target", "fitted", "loss"}``.
    """
    from scipy.optimize import minimize

    target = routing_stats(trace, seed=seed)
    n = num_tokens or min(trace.num_tokens, 12000)
    base = start or SyntheticSpec(trace.num_layers, trace.num_experts, trace.top_k,
                                  model=f"calibrated on {trace.model or trace.source}")
    seq_len = max(1, int(round(trace.num_tokens / max(trace.num_sequences, 1))))

    def spec_of(x):
        topic = float(np.clip(x[3], 0.0, 0.9))
        return replace(base, load_skew=float(abs(x[0])), affinity=float(abs(x[1])),
                       type_share=float(np.clip(x[2], 0.0, 1.0 - topic)), topic_share=topic)

    def f(x):
        st = routing_stats(generate(spec_of(x), n, seq_len=seq_len, seed=seed + 1), seed=seed)
        return _loss(st, target)

    x0 = np.array([base.load_skew, base.affinity, base.type_share, base.topic_share])
    res = minimize(f, x0, method="Nelder-Mead", options={"maxfev": iterations, "xatol": 1e-3, "fatol": 1e-4})
    spec = spec_of(res.x)
    fitted = routing_stats(generate(spec, n, seq_len=seq_len, seed=seed + 1), seed=seed)
    return spec, {"target": target, "fitted": fitted, "loss": _loss(fitted, target)}


# Fitted with calibrate(traces.datasets.load(), start=<64 types, persistence 0.9>) on the bundled DeepSeek-V2-Lite
# ESFT trace (all 25,028 tokens): load CV 0.486 vs 0.468, transition MI excess 0.430 vs 0.436 nats, co-activation
# 0.493 vs 0.482, sequence 0.137 vs 0.137 (loss 0.002). benchmarks/joint_scale.py --calibrate refits it.
ESFT_CALIBRATED = SyntheticSpec(num_layers=26, num_experts=64, top_k=6, load_skew=0.7919, affinity=8.6437,
                                persistence=0.9, topic_share=0.0725, type_share=0.7001, num_types=64,
                                model="synthetic, calibrated on DeepSeek-V2-Lite ESFT")


def model_trace(name: str, num_tokens: int, seed: int = 0, model_seed: int = 0, seq_len: int = 145,
                **overrides) -> RoutingTrace:
    """A trace of one of today's models (:data:`traces.models.MODELS`: DeepSeek-V3, Kimi-K2, Qwen3-235B-A22B,
    GLM-4.5, GPT-OSS-120B, ...) with its layout (MoE layers, experts, top-k, node-limited groups) and the strengths
    calibrated on the bundled trace (:data:`ESFT_CALIBRATED`); ``overrides`` replace spec fields. The transfer to
    other expert counts keeps the latent strengths (an assumption; see the module docstring)."""
    from traces.models import model_shape

    m = model_shape(name)
    kw = {"num_layers": m.num_moe_layers, "num_experts": m.num_experts, "top_k": m.top_k,
          "groups": m.groups if m.topk_groups else 1, "topk_groups": m.topk_groups,
          "model": f"synthetic {m.name} (calibrated on DeepSeek-V2-Lite ESFT)", **overrides}
    spec = replace(ESFT_CALIBRATED, **kw)
    tr = generate(spec, num_tokens, seq_len=seq_len, seed=seed, model_seed=model_seed)
    return replace(tr, moe_layer_index=m.moe_layer_index, num_hidden_layers=m.num_hidden_layers)


def deepseek_v3(num_tokens: int, seed: int = 0, model_seed: int = 0, seq_len: int = 145, **overrides) -> RoutingTrace:
    """A DeepSeek-V3-sized trace (58 MoE layers x 256 experts, top-8, 8 groups, 4 groups per token) with the
    strengths calibrated on the bundled trace. Decoder layers: 61 (the first 3 dense)."""
    overrides.setdefault("model", "synthetic DeepSeek-V3 (calibrated on DeepSeek-V2-Lite ESFT)")
    return model_trace("deepseek-v3", num_tokens, seed=seed, model_seed=model_seed, seq_len=seq_len, **overrides)


def planted(num_layers: int, num_experts: int, top_k: int, blocks: int, num_tokens: int, noise: float = 0.05,
            seed: int = 0) -> RoutingTrace:
    """A trace with a planted block affinity: a token of block c picks (almost) only experts
    ``c x E/blocks .. (c+1) x E/blocks - 1`` at every layer, with mild popularity skew inside blocks."""
    spec = SyntheticSpec(num_layers, num_experts, top_k, load_skew=0.3, affinity=0.0, planted=blocks,
                         planted_noise=noise, model="planted blocks")
    return generate(spec, num_tokens, seed=seed)


def spec_dict(spec: SyntheticSpec) -> dict:
    """The spec as a plain dict (for provenance in benchmark output)."""
    return asdict(spec)
