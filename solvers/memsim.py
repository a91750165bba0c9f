"""Expert memory simulation under a GPU memory budget: which token-expert activations find their expert in GPU
memory, and how many experts must be copied from host memory.

The model (documented for users in docs/memory-budget.md):

- Every expert (l, e) has an owner GPU ``owner[L, E]``: the GPU that computes it (expert parallelism). Its
  weights are either resident on that GPU (static set ``resident[L, E]``) or in host memory.
- Each GPU has a swap buffer of ``swap_slots`` expert slots shared by all MoE layers, managed LRU. An access
  to a non-resident expert that is in its owner's buffer is a hit; otherwise it is a miss: the expert is
  copied host -> GPU over PCIe into the buffer (fetch-on-miss), evicting the least recently used one.
- Tokens are processed in trace order, ``batch`` consecutive tokens per step (1 = one token at a time, as in
  single-stream decoding); a step needs, at each layer, the union of its tokens' experts (one access each).
- Optional dynamic residency (SwapMoE's virtual experts, arXiv 2308.15030): every ``interval`` steps each GPU
  re-picks its resident experts (same count) as the ones it owns that were used most in the last ``window``
  steps; experts that become resident are copied from host (swap traffic) unless already in the buffer.
- Optional prefetch (inter-layer affinity): before a step runs layer l, the experts predicted for l from the
  step's experts at l-1 (``prefetch[steps, L, n]``) are copied into the buffer if not already in GPU memory.

Shapes: ``resident[L, E]`` bool, ``owner[L, E]`` int, routes ``[T, L, k]`` (-1 = none). Keys are ``l * E + e``.
Pure numpy plus one Python loop over accesses (an ``OrderedDict`` per GPU is the LRU).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

__all__ = ["AccessStream", "SimResult", "access_stream", "simulate", "summarize", "prefetch_table",
           "STATIC", "BUFFER", "MISS", "PREFETCHED"]

# what served an access
STATIC, BUFFER, MISS, PREFETCHED = 0, 1, 2, 3


@dataclass(frozen=True, eq=False)
class AccessStream:
    """Expert accesses in processing order.

    key: int ``[N]`` ``l * E + e``, ordered by step, then layer; weight: int ``[N]`` token activations behind each
    access (1 when batch == 1); group: int ``[N]`` ``step * L + l``; gates: float ``[N]`` summed gate weight of
    the activations behind each access, or None.
    """

    key: np.ndarray
    weight: np.ndarray
    group: np.ndarray
    gates: np.ndarray | None
    num_layers: int
    num_experts: int
    num_tokens: int
    num_steps: int
    batch: int

    @property
    def size(self) -> int:
        return int(self.key.size)

    @property
    def activations(self) -> int:
        return int(self.weight.sum())

    def counts(self) -> np.ndarray:
        """``[L, E]`` token-expert activations per expert."""
        n = self.num_layers * self.num_experts
        return np.bincount(self.key, weights=self.weight, minlength=n).reshape(self.num_layers, self.num_experts)

    def steps(self) -> np.ndarray:
        """``[N]`` step of each access."""
        return self.group // self.num_layers


def access_stream(routes: np.ndarray, num_experts: int, batch: int = 1, gates: np.ndarray | None = None) -> AccessStream:
    """The access stream of ``routes[T, L, k]`` (trace order) in steps of ``batch`` tokens.

    ``gates[T, L, k]`` (optional) are carried along to report the share of router gate mass served from GPU memory.
    """
    routes = np.asarray(routes)
    T, L, k = routes.shape
    E = int(num_experts)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    ids = routes.astype(np.int64)
    valid = ids >= 0
    layer = np.broadcast_to(np.arange(L, dtype=np.int64)[None, :, None], ids.shape)
    step = np.broadcast_to((np.arange(T, dtype=np.int64) // batch)[:, None, None], ids.shape)
    flat = ((step * L + layer) * E + ids)[valid]
    g = None if gates is None else np.asarray(gates, dtype=np.float64)[valid]
    srt = np.sort(ids, axis=2)
    repeated = bool(np.any((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)))
    if batch == 1 and not repeated:
        # the k experts of one token-layer are distinct (every router we know); keep the token order as it is
        uniq, weight, gsum = flat, np.ones(flat.size, dtype=np.int64), g
    else:
        uniq, inv, weight = np.unique(flat, return_inverse=True, return_counts=True)
        gsum = None if g is None else np.bincount(inv, weights=g, minlength=uniq.size)
    group = uniq // E
    key = (group % L) * E + uniq % E
    return AccessStream(key=key, weight=np.asarray(weight, dtype=np.int64), group=group, gates=gsum,
                        num_layers=L, num_experts=E, num_tokens=T, num_steps=int(-(-T // batch)), batch=int(batch))


@dataclass(frozen=True, eq=False)
class SimResult:
    """What happened to every access.

    kind: uint8 ``[N]`` STATIC / BUFFER / MISS / PREFETCHED (a buffer hit on an expert that a prefetch brought in);
    prefetch_group, prefetch_gpu: int ``[P]`` one entry per prefetch copy; swap_group, swap_gpu, swap_count:
    int ``[W]`` dynamic re-picks (experts copied in at the start of that group); repicks: number of re-picks.
    """

    kind: np.ndarray
    owner_of_access: np.ndarray
    prefetch_group: np.ndarray
    prefetch_gpu: np.ndarray
    swap_group: np.ndarray
    swap_gpu: np.ndarray
    swap_count: np.ndarray
    repicks: int = 0

    def misses_per_key(self, stream: AccessStream) -> np.ndarray:
        """``[L, E]`` demand fetches per expert."""
        n = stream.num_layers * stream.num_experts
        m = self.kind == MISS
        return np.bincount(stream.key[m], minlength=n).reshape(stream.num_layers, stream.num_experts)


def _lru_pass(keys: list[int], capacity: int) -> bytearray:
    """1 where an access misses an LRU cache of ``capacity`` entries that starts empty."""
    cache: OrderedDict = OrderedDict()
    miss = bytearray(len(keys))
    move = cache.move_to_end
    pop = cache.popitem
    for i, x in enumerate(keys):
        if x in cache:
            move(x)
        else:
            miss[i] = 1
            cache[x] = None
            if len(cache) > capacity:
                pop(last=False)
    return miss


def simulate(stream: AccessStream, resident: np.ndarray, owner: np.ndarray, num_gpus: int, swap_slots: int,
             dynamic: tuple[int, int] | None = None, dynamic_prior: np.ndarray | None = None,
             prefetch: np.ndarray | None = None) -> SimResult:
    """Run the miss policy over ``stream``.

    Args:
        resident: bool ``[L, E]`` static resident set (the initial set when dynamic).
        owner: int ``[L, E]`` GPU that serves each expert.
        swap_slots: LRU buffer slots per GPU; 0 = no buffer (every non-resident access is fetched).
        dynamic: ``(interval_steps, window_steps)`` to re-pick each GPU's resident set from the last window.
        dynamic_prior: float ``[L, E]`` tie-breaker for re-picks (e.g. fit counts); default: the static set.
        prefetch: int ``[steps, L, n]`` experts to prefetch for (step, layer), -1 = none (see :func:`prefetch_table`).
    """
    L, E = stream.num_layers, stream.num_experts
    G = int(num_gpus)
    if swap_slots < 0:
        raise ValueError(f"swap_slots must be >= 0, got {swap_slots}")
    resident = np.asarray(resident, dtype=bool).reshape(L * E)
    owner_flat = np.asarray(owner, dtype=np.int64).reshape(L * E)
    own_acc = owner_flat[stream.key]
    empty = np.zeros(0, dtype=np.int64)
    if dynamic is None and prefetch is None:
        kind = np.where(resident[stream.key], STATIC, BUFFER).astype(np.uint8)
        for g in range(G):
            idx = np.flatnonzero(~resident[stream.key] & (own_acc == g))
            if idx.size:
                miss = np.frombuffer(_lru_pass(stream.key[idx].tolist(), swap_slots), dtype=np.uint8)
                kind[idx] = np.where(miss == 1, MISS, BUFFER)
        return SimResult(kind, own_acc, empty, empty, empty, empty, empty)
    return _simulate_general(stream, resident, owner_flat, own_acc, G, swap_slots, dynamic, dynamic_prior, prefetch)


def _simulate_general(stream, resident, owner_flat, own_acc, G, C, dynamic, prior, prefetch) -> SimResult:
    L, E = stream.num_layers, stream.num_experts
    N = stream.size
    res = bytearray(resident.astype(np.uint8).tobytes())
    own = owner_flat.tolist()
    caches = [OrderedDict() for _ in range(G)]
    kind = bytearray(N)
    keys = stream.key.tolist()
    group = stream.group
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if N else np.zeros(0, dtype=np.int64)
    bounds = np.r_[starts, N].tolist()
    groups = group[starts].tolist() if N else []
    pf_group: list[int] = []
    pf_gpu: list[int] = []
    sw_group: list[int] = []
    sw_gpu: list[int] = []
    sw_count: list[int] = []
    repicks = 0
    if dynamic is not None:
        interval, window = int(dynamic[0]), int(dynamic[1])
        if interval < 1 or window < 1:
            raise ValueError("dynamic interval and window must be >= 1 step")
        acc_step = stream.steps()
        per_gpu_keys = [np.flatnonzero(owner_flat == g) for g in range(G)]
        quota = [int(resident[k].sum()) for k in per_gpu_keys]
        base = resident.astype(np.float64) if prior is None else np.asarray(prior, dtype=np.float64).reshape(L * E)
        base = base / max(float(base.max()), 1e-300) * 1e-6  # tie-breaker only
        next_pick = interval
    last_step = -1
    for gi, grp in enumerate(groups):
        step, layer = divmod(grp, L)
        if dynamic is not None and step != last_step and step >= next_pick:
            while next_pick <= step:
                next_pick += interval
            a, b = np.searchsorted(acc_step, [step - window, step])
            cnt = np.bincount(stream.key[a:b], weights=stream.weight[a:b], minlength=L * E) + base
            for g in range(G):
                cand = per_gpu_keys[g]
                q = quota[g]
                if q == 0:
                    continue
                top = cand[np.argpartition(-cnt[cand], q - 1)[:q]] if q < cand.size else cand
                new = np.zeros(L * E, dtype=bool)
                new[top] = True
                cur = np.frombuffer(bytes(res), dtype=np.uint8).astype(bool)
                mine = np.zeros(L * E, dtype=bool)
                mine[cand] = True
                came = np.flatnonzero(new & ~cur & mine).tolist()
                went = np.flatnonzero(cur & ~new & mine).tolist()
                cache = caches[g]
                loaded = 0
                for x in went:
                    res[x] = 0
                for x in came:
                    res[x] = 1
                    if x in cache:
                        del cache[x]  # already on the GPU: moved from the buffer, no copy
                    else:
                        loaded += 1
                if loaded:
                    sw_group.append(grp)
                    sw_gpu.append(g)
                    sw_count.append(loaded)
            repicks += 1
        last_step = step
        if prefetch is not None and layer > 0:
            for b_ in prefetch[step, layer]:
                if b_ < 0:
                    continue
                x = layer * E + int(b_)
                if res[x]:
                    continue
                g = own[x]
                cache = caches[g]
                if x in cache:
                    continue
                cache[x] = 1
                pf_group.append(grp)
                pf_gpu.append(g)
                if len(cache) > C:
                    cache.popitem(last=False)
        for i in range(bounds[gi], bounds[gi + 1]):
            x = keys[i]
            if res[x]:
                continue  # kind 0 = STATIC
            cache = caches[own[x]]
            if x in cache:
                kind[i] = PREFETCHED if cache[x] else BUFFER
                cache[x] = 0
                cache.move_to_end(x)
            else:
                kind[i] = MISS
                cache[x] = 0
                if len(cache) > C:
                    cache.popitem(last=False)
    as_arr = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return SimResult(np.frombuffer(bytes(kind), dtype=np.uint8).copy(), own_acc, as_arr(pf_group), as_arr(pf_gpu),
                     as_arr(sw_group), as_arr(sw_gpu), as_arr(sw_count), repicks)


def prefetch_table(stream: AccessStream, transitions: np.ndarray, per_layer: int = 1) -> np.ndarray:
    """int ``[steps, L, n]``: for each step and layer l >= 1, the ``n`` experts most likely at l given the step's
    experts at l-1 (sum of ``P(b at l | a at l-1)`` over them, from ``transitions[L-1, E, E]`` pair counts;
    ExFlow's inter-layer affinity, arXiv 2401.08383). Row 0 and steps without a layer l-1 access are -1.
    """
    L, E = stream.num_layers, stream.num_experts
    n = int(per_layer)
    out = np.full((stream.num_steps, L, n), -1, dtype=np.int64)
    if n < 1 or L < 2:
        return out
    cond = transitions / np.maximum(transitions.sum(axis=2, keepdims=True), 1e-300)  # [L-1, E, E]
    step = stream.steps()
    layer = stream.key // E
    expert = stream.key % E
    for l in range(L - 1):
        idx = np.flatnonzero(layer == l)  # accesses of layer l, in step order
        if not idx.size:
            continue
        st = step[idx]
        first = np.flatnonzero(np.r_[True, st[1:] != st[:-1]])
        scores = np.add.reduceat(cond[l, expert[idx]], first, axis=0)  # [steps with layer l, E]
        top = np.argsort(-scores, axis=1, kind="stable")[:, :n]
        out[st[first], l + 1] = top
    return out


def summarize(stream: AccessStream, sim: SimResult, num_gpus: int, expert_bytes: float, pcie_bandwidth: float,
              prefetch_overlap_s: float = 0.0) -> dict:
    """Headline numbers of one simulation.

    Latency model: each GPU copies over its own PCIe link; a demand miss and a dynamic swap-in stall the step
    for their transfer time; prefetch copies for a layer overlap the previous layer's work for
    ``prefetch_overlap_s`` seconds and stall only beyond that. The step-layer takes the slowest GPU's stall.
    Returns hit rates (share of token-expert activations), fetches and bytes per token, estimated stall seconds.
    """
    G = int(num_gpus)
    w = stream.weight.astype(np.float64)
    total = float(w.sum())
    kind = sim.kind
    served = kind != MISS
    out = {
        "activations": total,
        "hit_rate": float(w[served].sum() / total) if total else 1.0,
        "static_hit_rate": float(w[kind == STATIC].sum() / total) if total else 1.0,
        "prefetch_hit_rate": float(w[kind == PREFETCHED].sum() / total) if total else 0.0,
        "gate_hit_rate": None,
    }
    if stream.gates is not None and stream.gates.sum() > 0:
        out["gate_hit_rate"] = float(stream.gates[served].sum() / stream.gates.sum())
    demand = int((kind == MISS).sum())
    pf = int(sim.prefetch_group.size)
    sw = int(sim.swap_count.sum())
    T = max(stream.num_tokens, 1)
    out.update(demand_fetches=demand, prefetch_fetches=pf, swap_fetches=sw,
               fetches_per_token=(demand + pf + sw) / T,
               fetch_bytes_per_token=(demand + pf + sw) * expert_bytes / T,
               swap_bytes_per_token=sw * expert_bytes / T,
               prefetch_bytes_per_token=pf * expert_bytes / T)
    n_groups = stream.num_steps * stream.num_layers
    sec = expert_bytes / pcie_bandwidth
    stall = np.zeros(n_groups * G)
    miss = kind == MISS
    stall += np.bincount(stream.group[miss] * G + sim.owner_of_access[miss], minlength=n_groups * G) * sec
    if sw:
        stall += np.bincount(sim.swap_group * G + sim.swap_gpu, weights=sim.swap_count, minlength=n_groups * G) * sec
    if pf:
        pft = np.bincount(sim.prefetch_group * G + sim.prefetch_gpu, minlength=n_groups * G) * sec
        stall += np.maximum(pft - prefetch_overlap_s, 0.0)
    seconds = float(stall.reshape(n_groups, G).max(axis=1).sum())
    out["est_fetch_seconds"] = seconds
    out["est_fetch_ms_per_token"] = seconds / T * 1e3
    return out
