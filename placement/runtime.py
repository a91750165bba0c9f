"""torch.distributed runtime: expert-parallel MoE layers that apply a plan to real expert weights.

Each rank (one GPU, or one CPU process with gloo) holds exactly the experts the plan puts on it (replicas
included; two slots of one expert on the same rank share one copy of its weights) and exchanges token hidden
states with ``torch.distributed.all_to_all_single`` with variable split sizes. The bytes reported are counted
from the split sizes actually exchanged.

Dataflows (per MoE layer, G ranks, a token with top-k experts):

- ``standard`` (expert parallelism as in GShard / DeepEP / SGLang / vLLM): the token lives on its home rank,
  ``sequence index mod G`` (data-parallel attention keeps a sequence on one rank). The serving rank of each of
  its k experts is :func:`solvers.objective.dispatch_table` ``[l, e, home]`` (the same static rule the
  evaluator uses, so measured bytes equal predicted bytes). **Dispatch**: one copy of the hidden state to each
  distinct remote serving rank (deduplicated per destination, as DeepEP does). Each serving rank runs its
  experts and sums their gate-weighted outputs. **Combine**: one copy per distinct remote serving rank comes
  back home, where the partial sums are added. Bytes = ``2 x remote ranks x hidden_size x dtype_bytes`` per
  token and layer: the evaluator's ``a2a_bytes`` exactly.

- ``coherent`` (ExFlow's context-coherent expert parallelism, Yao et al., "Exploiting Inter-Layer Expert
  Affinity for Accelerating Mixture-of-Experts Model Inference", IPDPS 2024, arXiv 2401.08383): attention can
  run on any rank (ExFlow keeps contexts coherent with an all-gather, which this runtime does not model), so a
  token does not go home after its experts ran. A token is *at* a position rank p (its home before the first
  MoE layer). At layer l it is dispatched from p to the distinct serving ranks ``dispatch_table[l, e, p]`` of
  its experts (one copy per remote rank), and it **moves to its anchor**: the rank serving its highest-gate
  expert (without gate weights: its first listed expert). The other serving ranks send their partial sums to
  the anchor (which already holds the token's state from the dispatch) and the next layer starts there.
  Per token and layer: ``|D \\ {p}|`` dispatch copies plus ``|D \\ {anchor}|`` combine copies, D = distinct
  serving ranks. With top-1 routing this is one all-to-all per layer and none when the token stays on its rank
  (ExFlow's case); with top-k > 1 the combine goes to the anchor instead of home. The prediction for this
  dataflow is :func:`coherent_traffic` (the evaluator's ``a2a_bytes`` is the standard dataflow).

Protocols of the standard dataflow (:class:`Comm` ``protocol``; each reproduces the messages of the
:mod:`solvers.comm` model of the same name, so measured bytes per link class equal the evaluator's under that
model; G ranks in nodes of ``gpus_per_node`` consecutive ranks, NVLink inside a node, RDMA across):

- ``nccl``: as above, one ``all_to_all_single`` over all ranks each way.
- ``deepep-normal`` (DeepEP's normal kernels, ``internode.cu``): over the same-local-index subgroup (one rank per
  node, :func:`node_groups`) one copy per distinct remote node to its relay (the rank with the home's local index),
  then over the node subgroup one copy to each distinct serving rank of the home's node and, from each relay, to
  each distinct serving rank of its node; combine mirrors it (partial sums to the relay, summed there, one copy per
  node back over RDMA), in bf16.
- ``deepep-ll`` (DeepEP's low-latency kernels, ``internode_ll.cu``): one message per (token, expert) copy on a
  remote rank, the hidden state and a 16-byte header in one row; combine returns each expert's output in bf16.

Tokens that did not reach a layer (all ids -1) stay where they are and cost nothing. Routing metadata (expert
ids, gate weights, token ids, anchors; float64 rows) travels in separate all-to-alls and is reported as
``metadata_bytes``, apart from ``a2a_bytes`` (hidden states only, the quantity the evaluator predicts).

Weights come from a Hugging Face MoE model, its state dict, or a safetensors checkpoint folder
(:class:`ExpertSource`); each rank reads only its experts' slices. Re-planning (:func:`plan_moves`,
:func:`apply_moves`) sends only the experts that appear on a rank which did not hold them before.

torch is imported inside functions so importing this module (and ``moeplace --help``) stays fast.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from solvers import Topology
from placement.coherent import anchor_column, coherent_traffic, serving_ranks  # noqa: F401 (re-exported)
from solvers.objective import dispatch_table, replica_counts

DATAFLOWS = ("standard", "coherent")
PROTOCOLS = ("nccl", "deepep-normal", "deepep-ll")  # the all-to-all protocols, named as solvers.comm's models
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


class RuntimeInputError(ValueError):
    """Input the runtime cannot use (one sentence: what is wrong and how to fix it)."""


def _torch():
    import torch

    return torch


# ---------------------------------------------------------------------------------------------------------------
# pure array functions (numpy): who holds what, where tokens go, what it costs
# ---------------------------------------------------------------------------------------------------------------

def rank_experts(phy2log: np.ndarray, num_gpus: int) -> list[list[np.ndarray]]:
    """``[L][G]`` sorted distinct logical experts held by each rank (empty slots, -1, skipped).

    Args:
        phy2log: int ``[L, S]``, slot ``s`` on rank ``s // (S / G)``.
    """
    L, S = phy2log.shape
    per = phy2log.reshape(L, num_gpus, S // num_gpus)
    return [[np.unique(row[row >= 0]).astype(np.int64) for row in per[l]] for l in range(L)]


def check_protocol(protocol: str, dataflow: str = "standard") -> None:
    """Raise RuntimeInputError unless the runtime runs ``protocol`` (:data:`PROTOCOLS`) in ``dataflow``."""
    if protocol not in PROTOCOLS:
        raise RuntimeInputError(f"communication protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if dataflow == "coherent" and protocol != "nccl":
        raise RuntimeInputError(f"the coherent dataflow runs with the nccl protocol only, not {protocol}; use the "
                                f"standard dataflow with DeepEP's protocols")


def check_runnable(phy2log: np.ndarray, num_experts: int, where: str = "the plan") -> None:
    """Raise RuntimeInputError unless every expert of every layer has a slot (the runtime needs them resident)."""
    missing = np.argwhere(replica_counts(phy2log, num_experts) == 0)
    if missing.size:
        l, e = missing[0]
        raise RuntimeInputError(f"{where} leaves expert {e} of MoE layer {l} without a slot; the runtime needs every "
                                f"expert resident on some rank (plan without a memory budget)")


def predict_a2a(plan, trace, token_bytes: int, dataflow: str = "standard") -> dict:
    """Predicted all-to-all bytes of ``plan`` replaying ``trace`` (hidden states only) with the ``nccl`` protocol:
    :func:`predict_traffic` with a message of ``token_bytes`` in both phases."""
    return predict_traffic(plan, trace, token_bytes, 1, dataflow)


def predict_traffic(plan, trace, hidden_size: int, dtype_bytes: int, dataflow: str = "standard", comm: str = "nccl",
                    ll_nvlink: bool = True) -> dict:
    """Predicted bytes of ``plan`` replaying ``trace`` (hidden states only) per phase and link class.

    standard: the evaluator's messages (:func:`placement.evaluate.token_traffic` under the communication model
    ``comm``; combine = dispatch transposed) times :func:`solvers.comm` ``message_bytes`` of each phase; coherent
    (nccl only): :func:`coherent_traffic`. A message between ranks of one node (``plan.topology``) is NVLink,
    across nodes RDMA (deepep-ll with ``ll_nvlink`` False: RDMA always).

    Returns:
        ``a2a_bytes``, ``dispatch_bytes``, ``combine_bytes``, ``nvlink_bytes``, ``rdma_bytes`` and the four
        ``{nvlink,rdma}_{dispatch,combine}_bytes`` (totals over layers), ``per_layer_a2a_bytes`` ``[L]``.
    """
    from placement.evaluate import token_traffic
    from solvers import comm as comm_models

    if dataflow not in DATAFLOWS:
        raise RuntimeInputError(f"dataflow {dataflow!r} is not one of {', '.join(DATAFLOWS)}")
    check_protocol(comm, dataflow)
    topo = plan.topology
    seq = trace.sequence_index()
    if dataflow == "standard":
        tr = token_traffic(plan.phy2log, plan.num_experts, topo, trace.expert_ids, seq, comm=comm, ll_nvlink=ll_nvlink)
        links = {(k, "dispatch"): tr[k] for k in ("nvlink", "rdma")}
        links.update({(k, "combine"): np.swapaxes(tr[k], 1, 2) for k in ("nvlink", "rdma")})
    else:
        tr = coherent_traffic(plan.phy2log, plan.num_experts, topo, trace.expert_ids, trace.gate_weights, seq)
        node = topo.node_of_gpu()
        same = node[:, None] == node[None, :]
        links = {(k, ph): np.where(same if k == "nvlink" else ~same, tr[f"{ph}_pairs"], 0.0)
                 for k in ("nvlink", "rdma") for ph in ("dispatch", "combine")}
    model = comm_models.get(comm)
    size = {ph: model.message_bytes(hidden_size, dtype_bytes, ph) for ph in ("dispatch", "combine")}
    per = {key: m.sum(axis=(1, 2)) * size[key[1]] for key, m in links.items()}  # [L] bytes
    out = {f"{k}_{ph}_bytes": float(per[(k, ph)].sum()) for k, ph in per}
    for ph in ("dispatch", "combine"):
        out[f"{ph}_bytes"] = out[f"nvlink_{ph}_bytes"] + out[f"rdma_{ph}_bytes"]
    for k in ("nvlink", "rdma"):
        out[f"{k}_bytes"] = out[f"{k}_dispatch_bytes"] + out[f"{k}_combine_bytes"]
    out["a2a_bytes"] = out["dispatch_bytes"] + out["combine_bytes"]
    out["per_layer_a2a_bytes"] = sum(per.values()).tolist()
    return out


@dataclass(frozen=True)
class Move:
    """Expert ``expert`` of MoE layer ``layer`` is copied from rank ``src`` (held it before) to ``dst``."""

    layer: int
    expert: int
    src: int
    dst: int


def plan_moves(old: np.ndarray, new: np.ndarray, topology: Topology) -> list[Move]:
    """Expert copies needed to go from placement ``old [L, S_old]`` to ``new [L, S_new]`` on the same ranks.

    One move per (layer, expert, rank) where the rank holds the expert in ``new`` but not in ``old``; experts
    that stay on a rank (even in another slot) do not move, and the slot counts may differ (adding redundant
    slots). The source is an old holder, preferring one on the destination's node (``topology``), then the
    ``(dst mod n)``-th of the n candidates (spreads the sends).
    """
    G = topology.num_gpus
    if old.shape[0] != new.shape[0] or old.shape[1] % G or new.shape[1] % G:
        raise RuntimeInputError(f"cannot move experts from a plan of shape {list(old.shape)} to one of shape "
                                f"{list(new.shape)} on {G} ranks; re-planning needs the same MoE layers and ranks")
    node = topology.node_of_gpu()
    before, after = rank_experts(old, G), rank_experts(new, G)
    moves = []
    for l in range(old.shape[0]):
        holders: dict[int, list[int]] = {}
        for g, exps in enumerate(before[l]):
            for e in exps:
                holders.setdefault(int(e), []).append(g)
        for g, exps in enumerate(after[l]):
            for e in np.setdiff1d(exps, before[l][g]):
                cands = holders.get(int(e), [])
                if not cands:
                    raise RuntimeInputError(f"expert {int(e)} of MoE layer {l} has no slot in the old plan, so no rank "
                                            f"can send it; load it from the checkpoint instead")
                near = [c for c in cands if node[c] == node[g]] or cands
                moves.append(Move(l, int(e), near[g % len(near)], g))
    return moves


# ---------------------------------------------------------------------------------------------------------------
# expert weights: Hugging Face models, state dicts, safetensors checkpoints
# ---------------------------------------------------------------------------------------------------------------

_FUSED = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.+\.)?experts\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.+\.)?experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)"
                         r"\.weight$")
_ROUTER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.+\.)?gate\.weight$")
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_ACTS = {"silu", "swish"}


class ExpertSource:
    """Routed-expert weights of a Hugging Face MoE model, read expert by expert.

    Two layouts are recognised by key name: per-expert linears (``...layers.{i}.<block>.experts.{e}.w1|w3|w2``
    or ``gate_proj|up_proj|down_proj .weight``: Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek checkpoints on disk)
    and fused tensors (``...layers.{i}.<block>.experts.gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``:
    transformers 5 modules in memory). Shared experts are not routed and are left to the caller. The expert MLP
    is SwiGLU: ``down(silu(gate(x)) * up(x))``.

    Build with :meth:`from_model`, :meth:`from_state_dict` or :meth:`from_checkpoint` (safetensors: only the
    requested slices are read from disk).
    """

    def __init__(self, getter: Callable[[str, int | None], Any], keys: list[str], shapes: Mapping[str, tuple],
                 hidden_act: str = "silu", where: str = "the weights"):
        self._get = getter  # (key, expert index in a fused tensor or None) -> tensor
        self.where = where
        if hidden_act not in _ACTS:
            raise RuntimeInputError(f"{where} uses hidden_act {hidden_act!r}; the runtime's expert MLP is SwiGLU (silu)")
        self.hidden_act = hidden_act
        fused: dict[int, dict[str, str]] = {}
        per: dict[int, dict[int, dict[str, str]]] = {}
        self._router: dict[int, str] = {}
        for key in keys:
            m = _ROUTER.search(key)
            if m and ".experts." not in key:
                self._router[int(m.group(1))] = key
                continue
            m = _FUSED.search(key)
            if m:
                fused.setdefault(int(m.group(1)), {})[m.group(2)] = key
                continue
            m = _PER_EXPERT.search(key)
            if m:
                per.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), {})[_ROLE[m.group(3)]] = key
        self._fused = {l: d for l, d in fused.items() if len(d) == 2}
        self._per = per
        self.layers = sorted(set(self._fused) | set(self._per))
        if not self.layers:
            raise RuntimeInputError(f"{where} holds no routed-expert weights (no keys like "
                                    f"'model.layers.0.mlp.experts.0.gate_proj.weight' or '...experts.gate_up_proj')")
        first = self.layers[0]
        if first in self._fused:
            gu, dn = shapes[self._fused[first]["gate_up_proj"]], shapes[self._fused[first]["down_proj"]]
            self.num_experts, self.hidden_size, self.intermediate_size = int(dn[0]), int(dn[1]), int(dn[2])
            if tuple(gu) != (self.num_experts, 2 * self.intermediate_size, self.hidden_size):
                raise RuntimeInputError(f"{where}: gate_up_proj has shape {list(gu)}, expected [E, 2 x intermediate, "
                                        f"hidden] = {[self.num_experts, 2 * self.intermediate_size, self.hidden_size]}")
        else:
            experts = self._per[first]
            self.num_experts = len(experts)
            dn = shapes[experts[min(experts)]["down"]]
            self.hidden_size, self.intermediate_size = int(dn[0]), int(dn[1])
        for l in self._per:
            if sorted(self._per[l]) != list(range(self.num_experts)) or any(len(r) != 3 for r in self._per[l].values()):
                raise RuntimeInputError(f"{where}: decoder layer {l} does not hold gate, up and down weights for "
                                        f"experts 0..{self.num_experts - 1}")

    # constructors ------------------------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], hidden_act: str = "silu",
                        where: str = "the state dict") -> "ExpertSource":
        def get(key, e):
            t = state_dict[key]
            return t if e is None else t[e]

        return cls(get, list(state_dict), {k: tuple(v.shape) for k, v in state_dict.items()}, hidden_act, where)

    @classmethod
    def from_model(cls, model) -> "ExpertSource":
        """From a Hugging Face model instance (its state dict; no copies are made)."""
        act = getattr(getattr(model, "config", None), "hidden_act", "silu")
        return cls.from_state_dict(model.state_dict(), act, where=f"model {type(model).__name__}")

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "ExpertSource":
        """From a safetensors checkpoint: a folder (``model.safetensors`` or sharded with its index) or one file."""
        from safetensors import safe_open

        p = Path(path)
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
        if not files or not files[0].is_file():
            raise RuntimeInputError(f"{p}: no .safetensors files; save the model with save_pretrained(safe_serialization"
                                    f"=True) or give the folder that holds them")
        key_file: dict[str, Path] = {}
        shapes: dict[str, tuple] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    key_file[k] = f
                    if _FUSED.search(k) or _PER_EXPERT.search(k) or _ROUTER.search(k):
                        shapes[k] = tuple(h.get_slice(k).get_shape())
        act = "silu"
        cfg = (p if p.is_dir() else p.parent) / "config.json"
        if cfg.is_file():
            act = json.loads(cfg.read_text()).get("hidden_act", "silu")

        def get(key, e):
            with safe_open(str(key_file[key]), framework="pt") as h:
                return h.get_tensor(key) if e is None else h.get_slice(key)[e]

        return cls(get, list(shapes), shapes, act, where=str(p))

    # reading -----------------------------------------------------------------------------------------------
    def check_plan(self, plan) -> None:
        """Raise RuntimeInputError unless ``plan`` fits these weights (experts and MoE layers)."""
        if plan.num_experts != self.num_experts:
            raise RuntimeInputError(f"plan {plan.name!r} is for {plan.num_experts} experts but {self.where} has "
                                    f"{self.num_experts}; plan the same model")
        missing = [int(i) for i in plan.moe_layer_index if int(i) not in self.layers]
        if missing:
            raise RuntimeInputError(f"plan {plan.name!r} places experts on decoder layer {missing[0]}, which has no "
                                    f"routed experts in {self.where} (MoE layers there: {self.layers})")

    def router_weight(self, layer: int):
        """``[E, H]`` router (gate) weight of decoder ``layer``."""
        if layer not in self._router:
            raise RuntimeInputError(f"{self.where} has no router weight for decoder layer {layer} (a key like "
                                    f"'model.layers.{layer}.mlp.gate.weight')")
        return self._get(self._router[layer], None).detach()

    def get(self, layer: int, experts) -> tuple:
        """``(gate [n, I, H], up [n, I, H], down [n, H, I])`` of ``experts`` (logical ids) of decoder ``layer``."""
        torch = _torch()
        experts = [int(e) for e in experts]
        if layer in self._fused:
            keys = self._fused[layer]
            gu = [self._get(keys["gate_up_proj"], e) for e in experts]
            I = self.intermediate_size
            gate = [t[:I] for t in gu]
            up = [t[I:] for t in gu]
            down = [self._get(keys["down_proj"], e) for e in experts]
        else:
            keys = self._per[layer]
            gate = [self._get(keys[e]["gate"], None) for e in experts]
            up = [self._get(keys[e]["up"], None) for e in experts]
            down = [self._get(keys[e]["down"], None) for e in experts]
        H, I = self.hidden_size, self.intermediate_size
        if not experts:
            return (torch.empty(0, I, H), torch.empty(0, I, H), torch.empty(0, H, I))
        return (torch.stack([t.detach() for t in gate]), torch.stack([t.detach() for t in up]),
                torch.stack([t.detach() for t in down]))


@dataclass(eq=False)
class LayerExperts:
    """The experts one rank holds for one MoE layer.

    Attributes:
        experts: int ``[n]`` sorted logical ids; gate, up: ``[n, I, H]``; down: ``[n, H, I]`` (torch tensors).
        num_experts: E logical experts of the layer.
    """

    experts: np.ndarray
    gate: Any
    up: Any
    down: Any
    num_experts: int
    _index: Any = field(default=None, repr=False)

    def index(self):
        """torch int64 ``[E + 1]``: local row of each logical expert, -1 where not held (last entry for id -1)."""
        if self._index is None or self._index.device != self.gate.device:
            torch = _torch()
            idx = torch.full((self.num_experts + 1,), -1, dtype=torch.int64)
            idx[torch.as_tensor(self.experts, dtype=torch.int64)] = torch.arange(len(self.experts))
            self._index = idx.to(self.gate.device)
        return self._index

    def to(self, dtype=None, device=None) -> "LayerExperts":
        return LayerExperts(self.experts, self.gate.to(device=device, dtype=dtype), self.up.to(device=device, dtype=dtype),
                            self.down.to(device=device, dtype=dtype), self.num_experts)


@dataclass(eq=False)
class RankExperts:
    """Everything one rank holds under a plan: ``layers[l]`` for every MoE layer l of ``phy2log``."""

    rank: int
    phy2log: np.ndarray  # [L, S] the plan these weights follow
    topology: Topology
    layers: list[LayerExperts]


def load_rank_experts(source: ExpertSource, plan, rank: int, dtype=None, device=None) -> RankExperts:
    """Read exactly the experts ``plan`` puts on ``rank`` (per MoE layer) from ``source``."""
    source.check_plan(plan)
    held = rank_experts(plan.phy2log, plan.topology.num_gpus)
    layers = []
    for l, dec in enumerate(plan.moe_layer_index):
        gate, up, down = source.get(int(dec), held[l][rank])
        layers.append(LayerExperts(held[l][rank], gate.to(device=device, dtype=dtype), up.to(device=device, dtype=dtype),
                                   down.to(device=device, dtype=dtype), plan.num_experts))
    return RankExperts(rank, plan.phy2log.copy(), plan.topology, layers)


def random_expert(layer: int, expert: int, num_experts: int, hidden_size: int, intermediate_size: int,
                  seed: int = 0) -> tuple:
    """Deterministic random SwiGLU weights of one expert (any rank can make exactly its own): gate, up, down."""
    torch = _torch()
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + layer * num_experts + expert)
    s_in, s_out = hidden_size ** -0.5, intermediate_size ** -0.5
    return (torch.randn(intermediate_size, hidden_size, generator=g) * s_in,
            torch.randn(intermediate_size, hidden_size, generator=g) * s_in,
            torch.randn(hidden_size, intermediate_size, generator=g) * s_out)


def random_rank_experts(plan, rank: int, hidden_size: int, intermediate_size: int, dtype=None, device=None,
                        seed: int = 0) -> RankExperts:
    """The experts ``plan`` puts on ``rank``, with :func:`random_expert` weights (for byte and time benchmarks)."""
    torch = _torch()
    held = rank_experts(plan.phy2log, plan.topology.num_gpus)
    layers = []
    for l in range(plan.num_layers):
        ws = [random_expert(l, int(e), plan.num_experts, hidden_size, intermediate_size, seed) for e in held[l][rank]]
        stack = [torch.stack([w[i] for w in ws]) if ws else torch.empty((0,) + ((intermediate_size, hidden_size) if i < 2
                 else (hidden_size, intermediate_size))) for i in range(3)]
        layers.append(LayerExperts(held[l][rank], *[t.to(device=device, dtype=dtype) for t in stack], plan.num_experts))
    return RankExperts(rank, plan.phy2log.copy(), plan.topology, layers)


@dataclass
class MoveStats:
    """What :func:`apply_moves` did on this rank and in total."""

    moves: int  # expert copies in the whole group (= len(plan_moves(...)))
    sent: int  # experts this rank sent
    received: int  # experts this rank received
    bytes_sent: int  # weight bytes this rank sent
    dropped: int  # experts this rank no longer holds


def apply_moves(held: RankExperts, new_plan, group=None) -> tuple[RankExperts, MoveStats]:
    """Re-plan without reloading: every rank calls this (collective); only the experts that change rank travel.

    The :class:`Move` list of :func:`plan_moves` (the same on every rank) becomes one ``all_to_all_single`` of
    flattened expert weights (gate, up, down), split by destination; experts a rank keeps are reused (re-ordered
    locally) and experts it no longer needs are dropped. Returns the new :class:`RankExperts` and
    :class:`MoveStats` (``bytes_sent`` counted from the split sizes exchanged).
    """
    torch = _torch()
    import torch.distributed as dist

    topo = new_plan.topology
    rank, world = held.rank, topo.num_gpus
    if held.topology.num_gpus != world:
        raise RuntimeInputError(f"plan {new_plan.name!r} is for {world} ranks but the experts are spread over "
                                f"{held.topology.num_gpus}; re-planning keeps the number of ranks")
    new_phy2log = new_plan.phy2log
    moves = plan_moves(held.phy2log, new_phy2log, topo)
    after = rank_experts(new_phy2log, world)
    ref = held.layers[0].gate
    dtype, device = ref.dtype, ref.device
    I, H = ref.shape[1], ref.shape[2]
    size = 3 * I * H
    outgoing = [[] for _ in range(world)]
    incoming = [[] for _ in range(world)]
    for mv in moves:  # same order on every rank
        if mv.src == rank:
            lay = held.layers[mv.layer]
            row = int(np.searchsorted(lay.experts, mv.expert))
            outgoing[mv.dst].append(torch.cat([lay.gate[row].reshape(-1), lay.up[row].reshape(-1),
                                               lay.down[row].reshape(-1)]))
        if mv.dst == rank:
            incoming[mv.src].append((mv.layer, mv.expert))
    send_counts = [len(o) * size for o in outgoing]
    recv_counts = [len(i) * size for i in incoming]
    send = torch.cat([t for o in outgoing for t in o]) if any(outgoing) else torch.empty(0, dtype=dtype, device=device)
    recv = torch.empty(sum(recv_counts), dtype=dtype, device=device)
    dist.all_to_all_single(recv, send, recv_counts, send_counts, group=group)
    got = {key: recv[i * size:(i + 1) * size] for i, key in enumerate(k for inc in incoming for k in inc)}
    layers, dropped = [], 0
    for l, lay in enumerate(held.layers):
        mats = [[], [], []]
        for e in after[l][rank]:
            if (l, int(e)) in got:
                buf = got[(l, int(e))]
                parts = (buf[:I * H].view(I, H), buf[I * H:2 * I * H].view(I, H), buf[2 * I * H:].view(H, I))
            else:
                row = int(np.searchsorted(lay.experts, e))
                parts = (lay.gate[row], lay.up[row], lay.down[row])
            for m, p in zip(mats, parts):
                m.append(p)
        dropped += int(np.setdiff1d(lay.experts, after[l][rank]).size)
        stacked = [torch.stack(m) if m else torch.empty((0,) + s, dtype=dtype, device=device)
                   for m, s in zip(mats, ((I, H), (I, H), (H, I)))]
        layers.append(LayerExperts(after[l][rank], *stacked, lay.num_experts))
    stats = MoveStats(moves=len(moves), sent=sum(len(o) for o in outgoing), received=len(got),
                      bytes_sent=sum(send_counts) * recv.element_size(), dropped=dropped)
    return RankExperts(rank, new_phy2log.copy(), topo, layers), stats


# ---------------------------------------------------------------------------------------------------------------
# the distributed MoE layer
# ---------------------------------------------------------------------------------------------------------------

def experts_forward(layer: LayerExperts, x, ids, weights):
    """Gate-weighted sum of the held experts' SwiGLU outputs: ``y[t] = sum_j w[t, j] expert_{ids[t, j]}(x[t])``.

    Args:
        x: ``[n, H]``; ids: int64 ``[n, k]`` logical ids (-1 or experts not held here are skipped);
        weights: float ``[n, k]``.
    Returns:
        float32 ``[n, H]``.
    """
    torch = _torch()
    F = torch.nn.functional
    n, H = x.shape
    y = torch.zeros(n, H, dtype=torch.float32, device=x.device)
    if n == 0 or len(layer.experts) == 0:
        return y
    idx = layer.index()
    local = idx[torch.where(ids >= 0, ids, layer.num_experts)]  # [n, k], -1 = not here
    sel = (local >= 0).nonzero()  # [m, 2] (row, column)
    if sel.numel() == 0:
        return y
    rows, cols = sel[:, 0], sel[:, 1]
    which = local[rows, cols]
    order = torch.argsort(which, stable=True)
    rows, cols, which = rows[order], cols[order], which[order]
    counts = torch.bincount(which, minlength=len(layer.experts)).tolist()
    start = 0
    for j, c in enumerate(counts):
        if c == 0:
            continue
        r = rows[start:start + c]
        xs = x[r]
        h = F.silu(xs @ layer.gate[j].T) * (xs @ layer.up[j].T)
        out = (h @ layer.down[j].T).float() * weights[r, cols[start:start + c]].float()[:, None]
        y.index_add_(0, r, out)
        start += c
    return y


@dataclass
class CommStats:
    """Bytes and seconds of the all-to-alls one rank took part in (hidden states apart from metadata).

    Hidden-state bytes are also split by link class: ``nvlink_*`` to ranks of the sender's node, ``rdma_*`` to other
    nodes (deepep-ll with ``ll_nvlink`` False: every remote rank is RDMA), as :func:`predict_traffic` counts them.
    """

    dispatch_bytes: int = 0
    combine_bytes: int = 0
    metadata_bytes: int = 0
    seconds: float = 0.0
    nvlink_dispatch_bytes: int = 0
    rdma_dispatch_bytes: int = 0
    nvlink_combine_bytes: int = 0
    rdma_combine_bytes: int = 0

    @property
    def a2a_bytes(self) -> int:
        return self.dispatch_bytes + self.combine_bytes

    @property
    def nvlink_bytes(self) -> int:
        return self.nvlink_dispatch_bytes + self.nvlink_combine_bytes

    @property
    def rdma_bytes(self) -> int:
        return self.rdma_dispatch_bytes + self.rdma_combine_bytes


_NODE_GROUPS: list[tuple] = []  # (default process group, gpus_per_node, intra groups, inter groups), made once


def node_groups(gpus_per_node: int) -> tuple[list, list]:
    """The process subgroups of DeepEP's two-hop exchange (collective: every rank calls it, in the same order).

    With G ranks in ``G / n`` nodes of ``n = gpus_per_node`` (rank r on node ``r // n``, local index ``r % n``):
    ``intra[N]`` holds node N's ranks ``N n .. N n + n - 1`` (the NVLink exchange), ``inter[i]`` the ranks with
    local index i, one per node, ``i, n + i, 2n + i, ...`` (the RDMA exchange: DeepEP's same-local-index peers).
    Made once per process group and n (``torch.distributed.new_group``), then reused.
    """
    import torch.distributed as dist

    world_pg = dist.distributed_c10d._get_default_group()
    for pg, n, intra, inter in _NODE_GROUPS:
        if pg is world_pg and n == gpus_per_node:
            return intra, inter
    G, n = dist.get_world_size(), gpus_per_node
    if n < 1 or G % n:
        raise RuntimeInputError(f"gpus per node ({n}) must divide the world size ({G})")
    intra = [dist.new_group(list(range(N * n, (N + 1) * n))) for N in range(G // n)]
    inter = [dist.new_group(list(range(i, G, n))) for i in range(n)]
    _NODE_GROUPS.append((world_pg, n, intra, inter))
    return intra, inter


class Comm:
    """``all_to_all_single`` with variable splits over a process group, counting what it sends.

    Bytes are counted from the send split sizes to other ranks (the split to oneself is always 0: local tokens
    never enter the all-to-all), per link class: a destination on the sender's node (``gpus_per_node``
    consecutive ranks form a node) is NVLink, another node RDMA.

    Args:
        group: the process group (None: the default group; the DeepEP protocols need the default group).
        device: where the tensors live (times are taken after a CUDA synchronise there).
        protocol: how :meth:`ExpertParallelMoE.standard` moves tokens (:data:`PROTOCOLS`, named as the
            :mod:`solvers.comm` models whose bytes it reproduces): ``nccl`` (one copy per distinct remote rank),
            ``deepep-normal`` (two hops over the :func:`node_groups` subgroups), ``deepep-ll`` (one message per
            token-expert copy with a 16-byte header).
        gpus_per_node: ranks per node (None: all in one node); the plan's ``topology.gpus_per_node``.
        ll_nvlink: deepep-ll only: same-node copies count as NVLink (DeepEP's
            ``allow_nvlink_for_low_latency_mode``), else as RDMA.
        combine_dtype: torch dtype of the combine messages (None: bf16 for the DeepEP protocols, as their kernels
            combine, else the activation dtype).
    """

    def __init__(self, group=None, device=None, protocol: str = "nccl", gpus_per_node: int | None = None,
                 ll_nvlink: bool = True, combine_dtype=None, _root: "Comm | None" = None):
        import torch.distributed as dist

        check_protocol(protocol)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.device = device
        self.stats = CommStats()
        self._root = _root or self
        root = self._root
        if _root is None:
            self.protocol, self.ll_nvlink = protocol, bool(ll_nvlink)
            world = dist.get_world_size()
            self.gpus_per_node = world if gpus_per_node is None else int(gpus_per_node)
            if self.gpus_per_node < 1 or world % self.gpus_per_node:
                raise RuntimeInputError(f"gpus per node ({self.gpus_per_node}) must divide the world size ({world})")
            if protocol != "nccl" and group is not None:
                raise RuntimeInputError(f"the {protocol} protocol runs over the default process group; pass group=None")
            if combine_dtype is None and protocol != "nccl":
                combine_dtype = _torch().bfloat16
            self.combine_dtype = combine_dtype
        ranks = list(range(self.world)) if group is None else dist.get_process_group_ranks(group)
        self.global_rank = ranks[self.rank]
        n = root.gpus_per_node
        nvlink_ok = root.protocol != "deepep-ll" or root.ll_nvlink
        self.links = ["nvlink" if nvlink_ok and g // n == self.global_rank // n else "rdma" for g in ranks]
        self._intra = self._inter = None

    @classmethod
    def for_plan(cls, plan, device=None, protocol: str = "nccl", ll_nvlink: bool = True, combine_dtype=None) -> "Comm":
        """A Comm over the default group with ``plan``'s nodes (collective for the DeepEP protocols' subgroups)."""
        return cls(None, device, protocol, plan.topology.gpus_per_node, ll_nvlink, combine_dtype)

    def subgroups(self) -> tuple["Comm", "Comm"]:
        """``(intra, inter)``: this rank's node exchange and its same-local-index exchange (:func:`node_groups`),
        counting into this Comm's ``stats``; collective the first time."""
        if self._intra is None:
            intra, inter = node_groups(self.gpus_per_node)
            r, n = self.global_rank, self.gpus_per_node
            self._intra = Comm(intra[r // n], self.device, _root=self)
            self._inter = Comm(inter[r % n], self.device, _root=self)
        return self._intra, self._inter

    def _sync(self) -> None:
        torch = _torch()
        if self.device is not None and torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)

    def exchange(self, send, send_counts: list[int], recv_counts: list[int], kind: str):
        """One ``all_to_all_single``: ``send`` rows are grouped by destination (``send_counts[d]`` rows for rank d),
        ``recv_counts[s]`` rows arrive from rank s. Adds the bytes sent to other ranks to ``stats.<kind>_bytes``
        (and, for dispatch and combine, to the link class of each destination)."""
        torch = _torch()
        import torch.distributed as dist

        stats = self._root.stats
        recv = torch.empty((sum(recv_counts),) + tuple(send.shape[1:]), dtype=send.dtype, device=send.device)
        row_bytes = send.element_size() * (int(np.prod(send.shape[1:])) if send.dim() > 1 else 1)
        sent = [c * row_bytes if d != self.rank else 0 for d, c in enumerate(send_counts)]
        setattr(stats, f"{kind}_bytes", getattr(stats, f"{kind}_bytes") + sum(sent))
        if kind in ("dispatch", "combine"):
            for link, b in zip(self.links, sent):
                setattr(stats, f"{link}_{kind}_bytes", getattr(stats, f"{link}_{kind}_bytes") + b)
        if self.world == 1:  # nothing leaves a group of one
            return recv
        self._sync()
        t0 = time.perf_counter()
        dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=self.group)
        self._sync()
        stats.seconds += time.perf_counter() - t0
        return recv

    def counts(self, send_counts):
        """Exchange per-destination row counts (metadata); returns the per-source receive counts."""
        torch = _torch()
        if self.world == 1:
            return [0]
        send = torch.as_tensor(send_counts, dtype=torch.int64, device=self.device or "cpu")
        recv = self.exchange(send, [1] * self.world, [1] * self.world, "metadata")
        return recv.tolist()


def _group_by_dest(dest, world: int, rank: int):
    """Distinct (token, destination) pairs, destination != rank, sorted by destination then token.

    Args:
        dest: int64 ``[T, k]`` serving rank per chosen expert (-1 = none).
    Returns:
        rows ``[n]`` (token rows), dst ``[n]``, counts per destination (list of G ints).
    """
    torch = _torch()
    T = dest.shape[0]
    key = dest * T + torch.arange(T, device=dest.device)[:, None]
    keep = (dest >= 0) & (dest != rank)
    pairs = torch.unique(key[keep])  # sorted: destination-major
    rows, dst = pairs % T, pairs // T
    counts = torch.bincount(dst, minlength=world).tolist()
    return rows, dst, counts


class ExpertParallelMoE:
    """One MoE layer spread over a process group by a plan.

    Args:
        layer: the experts this rank holds for the layer.
        table: int ``[E]`` serving rank of each expert for tokens on this rank
            (``dispatch_table(plan)[l, :, rank]``).
        comm: the :class:`Comm` to exchange through (accumulates bytes and seconds).
    """

    def __init__(self, layer: LayerExperts, table: np.ndarray, comm: Comm):
        torch = _torch()
        self.layer = layer
        self.comm = comm
        self.table = torch.as_tensor(np.append(np.asarray(table, dtype=np.int64), -1), device=layer.gate.device)

    def _dest(self, ids):
        return self.table[torch_where_neg(ids, len(self.table) - 1)]

    def _meta(self, ids, weights, dest_row):
        """float64 rows: ids masked to the destination (k), gate weights (k)."""
        torch = _torch()
        masked = torch.where(dest_row, ids, torch.full_like(ids, -1))
        return torch.cat([masked.double(), weights.double()], dim=1)

    def standard(self, x, ids, weights):
        """Standard dataflow: dispatch to serving ranks, experts, combine home, with the protocol of ``comm``.
        ``x [T, H]`` -> ``y [T, H]``.

        Args:
            x: ``[T, H]`` tokens whose home is this rank; ids: int64 ``[T, k]`` (-1 = none); weights: ``[T, k]``.
        """
        protocol = self.comm.protocol
        if protocol == "deepep-normal":
            return self._standard_deepep_normal(x, ids, weights)
        if protocol == "deepep-ll":
            return self._standard_deepep_ll(x, ids, weights)
        return self._standard_nccl(x, ids, weights)

    def _standard_nccl(self, x, ids, weights):
        """One copy per distinct remote serving rank over one all-to-all, each way."""
        torch = _torch()
        comm, rank, k = self.comm, self.comm.rank, ids.shape[1]
        dest = self._dest(ids)  # [T, k]
        rows, dst, send_counts = _group_by_dest(dest, comm.world, rank)
        recv_counts = comm.counts(send_counts)
        meta = self._meta(ids[rows], weights[rows], dest[rows] == dst[:, None])
        r_meta = comm.exchange(meta, send_counts, recv_counts, "metadata")
        r_x = comm.exchange(x[rows], send_counts, recv_counts, "dispatch")
        here = dest == rank
        y = experts_forward(self.layer, x, torch.where(here, ids, torch.full_like(ids, -1)), weights)
        r_y = experts_forward(self.layer, r_x, r_meta[:, :k].long(), r_meta[:, k:])
        back = comm.exchange(r_y.to(comm.combine_dtype or x.dtype), recv_counts, send_counts, "combine")
        y.index_add_(0, rows, back.float())
        return y.to(x.dtype)

    def _standard_deepep_normal(self, x, ids, weights):
        """DeepEP's normal kernels (``internode.cu``) over two subgroups (:meth:`Comm.subgroups`).

        Dispatch: (1) RDMA, over the same-local-index exchange: one copy per distinct remote node among the token's
        serving ranks, to that node's *relay* (its rank with this rank's local index), with the serving ranks of
        all k experts; (2) NVLink, over the node exchange: one copy to each distinct serving rank of this node
        (but this rank), and each relay forwards what it received to each distinct serving rank of its node (but
        itself). Combine mirrors it: partial sums go back over the node exchange (to the home, or to the relay,
        which adds them to its own), then one sum per remote node goes back to the home over RDMA.
        """
        torch = _torch()
        comm, k = self.comm, ids.shape[1]
        intra, inter = comm.subgroups()
        n, me = comm.gpus_per_node, comm.global_rank
        my_node, my_local = me // n, me % n
        wire = comm.combine_dtype or x.dtype
        dest = self._dest(ids)  # [T, k] global serving ranks
        node = torch.where(dest >= 0, dest // n, torch.full_like(dest, -1))
        # (1) one copy per distinct remote node, to the relay (inter-group rank = node index)
        far = torch.where((dest >= 0) & (node != my_node), node, torch.full_like(node, -1))
        f_rows, _, f_counts = _group_by_dest(far, inter.world, inter.rank)
        f_recv = inter.counts(f_counts)
        f_meta = torch.cat([dest[f_rows].double(), ids[f_rows].double(), weights[f_rows].double()], dim=1)
        r_meta = inter.exchange(f_meta, f_counts, f_recv, "metadata")
        r_x = inter.exchange(x[f_rows], f_counts, f_recv, "dispatch")
        r_dest, r_ids, r_w = r_meta[:, :k].long(), r_meta[:, k:2 * k].long(), r_meta[:, 2 * k:]
        # (2) NVLink: own tokens and relayed tokens to the serving ranks of this node (but this rank)
        def local(d):  # serving ranks in this node as local indices, others -1
            return torch.where((d >= 0) & (d // n == my_node), d % n, torch.full_like(d, -1))

        T = x.shape[0]
        pool_x, pool_dest = torch.cat([x, r_x]), torch.cat([dest, r_dest])  # own tokens, then relayed ones
        pool_ids, pool_w = torch.cat([ids, r_ids]), torch.cat([weights.double(), r_w])
        rows, dst, n_counts = _group_by_dest(local(pool_dest), n, my_local)
        n_recv = intra.counts(n_counts)
        n_meta = intra.exchange(self._meta(pool_ids[rows], pool_w[rows], pool_dest[rows] == (my_node * n + dst)[:, None]),
                                n_counts, n_recv, "metadata")
        n_x = intra.exchange(pool_x[rows], n_counts, n_recv, "dispatch")
        # experts on what this rank serves: own tokens, relayed tokens (as a target itself), NVLink copies
        pool_y = experts_forward(self.layer, pool_x, torch.where(pool_dest == me, pool_ids, torch.full_like(pool_ids, -1)),
                                 pool_w)
        n_y = experts_forward(self.layer, n_x, n_meta[:, :k].long(), n_meta[:, k:])
        # combine: NVLink back to the sender (the home, or the relay, which adds it to its sum), then relay -> home
        pool_y.index_add_(0, rows, intra.exchange(n_y.to(wire), n_recv, n_counts, "combine").float())
        y = pool_y[:T]
        y.index_add_(0, f_rows, inter.exchange(pool_y[T:].to(wire), f_recv, f_counts, "combine").float())
        return y.to(x.dtype)

    def _standard_deepep_ll(self, x, ids, weights):
        """DeepEP's low-latency kernels (``internode_ll.cu``): one message per (token, expert) copy on a remote
        rank, no deduplication, over one all-to-all each way.

        A dispatch message is one row: the hidden state followed by a 16-byte header, four int32 stored bit for bit
        in the row's last ``16 / element size`` elements (the token's row here, the expert id, its top-k column,
        this rank), so a message is ``16 + hidden x dtype_bytes`` bytes, as DeepEP's ``num_bytes_per_msg``. The
        serving rank runs the one expert on it and sends the expert's output back unweighted in bf16 (the combine
        message, ``hidden x 2`` bytes); the home applies the gate weights and sums.
        """
        torch = _torch()
        comm, rank = self.comm, self.comm.rank
        T, k = ids.shape
        H = x.shape[1]
        wire = comm.combine_dtype or x.dtype
        dest = self._dest(ids)
        remote = (dest >= 0) & (dest != rank)
        t_idx, col = remote.nonzero(as_tuple=True)  # token-major
        order = torch.argsort(dest[t_idx, col], stable=True)
        t_idx, col = t_idx[order], col[order]
        send_counts = torch.bincount(dest[t_idx, col], minlength=comm.world).tolist()
        recv_counts = comm.counts(send_counts)
        header = torch.stack([t_idx, ids[t_idx, col], col, torch.full_like(t_idx, rank)], dim=1).to(torch.int32)
        per = 16 // x.element_size()
        msg = torch.cat([x[t_idx], header.contiguous().view(x.dtype).reshape(-1, per)], dim=1)
        r_msg = comm.exchange(msg, send_counts, recv_counts, "dispatch")
        r_head = r_msg[:, H:].contiguous().view(torch.int32).reshape(-1, 4)
        r_y = experts_forward(self.layer, r_msg[:, :H], r_head[:, 1:2].long(),
                              torch.ones(r_msg.shape[0], 1, device=x.device))
        back = comm.exchange(r_y.to(wire), recv_counts, send_counts, "combine").float()
        here = dest == rank
        y = experts_forward(self.layer, x, torch.where(here, ids, torch.full_like(ids, -1)), weights)
        y.index_add_(0, t_idx, back * weights[t_idx, col].float()[:, None])
        return y.to(x.dtype)

    def coherent(self, h, token_id, ids, weights, pre: Callable | None = None):
        """Context-coherent dataflow: dispatch from here, experts, combine onto each token's anchor rank.

        Args:
            h: ``[T, H]`` states of the tokens now on this rank; token_id: int64 ``[T]`` global ids;
            ids: int64 ``[T, k]``; weights: ``[T, k]``; pre: applied to a state before the experts (e.g. a norm).
        Returns:
            ``(token_id [T'], h [T', H], y [T', H])`` for the tokens whose anchor is this rank, sorted by id: their
            state before the layer and the MoE output (the caller adds them).
        """
        torch = _torch()
        comm, rank, k = self.comm, self.comm.rank, ids.shape[1]
        pre = pre or (lambda z: z)
        T = h.shape[0]
        dest = self._dest(ids)
        col = torch.where(ids >= 0, weights.float(), torch.full_like(weights, float("-inf"), dtype=torch.float32))
        active = (ids >= 0).any(dim=1)
        first = col.argmax(dim=1)
        anchor = torch.where(active, dest[torch.arange(T, device=h.device), first], torch.full_like(first, rank))
        rows, dst, send_counts = _group_by_dest(dest, comm.world, rank)
        recv_counts = comm.counts(send_counts)
        meta = torch.cat([self._meta(ids[rows], weights[rows], dest[rows] == dst[:, None]),
                          token_id[rows, None].double(), anchor[rows, None].double()], dim=1)
        r_meta = comm.exchange(meta, send_counts, recv_counts, "metadata")
        r_h = comm.exchange(h[rows], send_counts, recv_counts, "dispatch")
        r_ids, r_w = r_meta[:, :k].long(), r_meta[:, k:2 * k]
        r_tok, r_anchor = r_meta[:, 2 * k].long(), r_meta[:, 2 * k + 1].long()
        # partial sums of the experts held here, for local rows and received rows
        here = dest == rank
        has_local = here.any(dim=1)
        y_loc_ids = torch.where(here[has_local], ids[has_local], torch.full_like(ids[has_local], -1))
        y_loc = experts_forward(self.layer, pre(h[has_local]), y_loc_ids, weights[has_local])
        y_rcv = experts_forward(self.layer, pre(r_h), r_ids, r_w)
        p_tok = torch.cat([token_id[has_local], r_tok])
        p_anchor = torch.cat([anchor[has_local], r_anchor])
        p_y = torch.cat([y_loc, y_rcv])
        # residents after the layer: local tokens anchored here + received tokens anchored here
        stay = anchor == rank
        res_tok = torch.cat([token_id[stay], r_tok[r_anchor == rank]])
        res_h = torch.cat([h[stay], r_h[r_anchor == rank]])
        order = torch.argsort(res_tok)
        res_tok, res_h = res_tok[order], res_h[order]
        y = torch.zeros(res_tok.shape[0], h.shape[1], dtype=torch.float32, device=h.device)
        mine = p_anchor == rank
        y.index_add_(0, torch.searchsorted(res_tok, p_tok[mine]), p_y[mine])
        # combine: partial sums to their anchors
        away = (~mine).nonzero()[:, 0]
        away = away[torch.argsort(p_anchor[away], stable=True)]
        c_counts = torch.bincount(p_anchor[away], minlength=comm.world).tolist()
        c_recv = comm.counts(c_counts)
        c_tok = comm.exchange(p_tok[away, None].double(), c_counts, c_recv, "metadata")[:, 0].long()
        c_y = comm.exchange(p_y[away].to(h.dtype), c_counts, c_recv, "combine")
        y.index_add_(0, torch.searchsorted(res_tok, c_tok), c_y.float())
        return res_tok, res_h, y.to(h.dtype)


def torch_where_neg(ids, fill: int):
    """``ids`` with -1 replaced by ``fill`` (index of a -1 sentinel)."""
    torch = _torch()
    return torch.where(ids >= 0, ids, torch.full_like(ids, fill))


def rms_norm(x, eps: float = 1e-6):
    """Parameter-free RMSNorm (float32 inside): the stand-in for the block between two MoE layers."""
    torch = _torch()
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# a stack of MoE layers (what a replay runs), distributed and single-process reference
# ---------------------------------------------------------------------------------------------------------------

Router = Callable[[int, Any, Any], tuple]  # (layer, u [n, H], token ids [n]) -> (ids int64 [n, k], weights [n, k])


def run_stack(moes: list[ExpertParallelMoE], h, token_id, router: Router, dataflow: str = "standard",
              norm: bool = True, timer: Callable[[int, float], None] | None = None):
    """Run ``h <- h + moe_l(u)`` with ``u = rms_norm(h)`` (or ``u = h`` when ``norm`` is False) through the layers.

    Args:
        moes: one :class:`ExpertParallelMoE` per MoE layer; h: ``[T, H]`` tokens on this rank (their homes);
        token_id: int64 ``[T]``; router: gives each token's experts and gate weights from ``u`` at a layer.
        timer: called with (layer, seconds) after each layer.
    Returns:
        ``(token_id, h)`` of the tokens on this rank at the end (standard: the same tokens; coherent: the tokens
        whose last anchor is this rank, sorted by id).
    """
    pre = rms_norm if norm else (lambda z: z)
    if moes:
        check_protocol(moes[0].comm.protocol, dataflow)
    for l, moe in enumerate(moes):
        moe.comm._sync()
        t0 = time.perf_counter()
        if dataflow == "standard":
            u = pre(h)
            ids, w = router(l, u, token_id)
            h = h + moe.standard(u, ids, w)
        elif dataflow == "coherent":
            ids, w = router(l, pre(h), token_id)
            token_id, h_in, y = moe.coherent(h, token_id, ids, w, pre=pre)
            h = h_in + y
        else:
            raise RuntimeInputError(f"dataflow {dataflow!r} is not one of {', '.join(DATAFLOWS)}")
        moe.comm._sync()
        if timer is not None:
            timer(l, time.perf_counter() - t0)
    return token_id, h


def reference_stack(layers: list[LayerExperts], h, router: Router, norm: bool = True):
    """Single-process reference of :func:`run_stack`: every expert in one place (``layers[l]`` holds all E)."""
    torch = _torch()
    pre = rms_norm if norm else (lambda z: z)
    token_id = torch.arange(h.shape[0])
    for l, lay in enumerate(layers):
        u = pre(h)
        ids, w = router(l, u, token_id)
        h = h + experts_forward(lay, u, ids, w).to(h.dtype)
    return h


def build_layers(held: RankExperts, plan, comm: Comm) -> list[ExpertParallelMoE]:
    """One :class:`ExpertParallelMoE` per MoE layer of ``plan`` for the rank of ``held`` (plan = held's plan).
    ``comm`` must see the plan's nodes (``Comm(gpus_per_node=plan.topology.gpus_per_node)``, or
    :meth:`Comm.for_plan`), so that its link classes are the plan's."""
    if comm.group is None and comm.gpus_per_node != plan.topology.gpus_per_node:
        raise RuntimeInputError(f"plan {plan.name!r} has {plan.topology.gpus_per_node} GPUs per node but the Comm "
                                f"{comm.gpus_per_node}; make it with Comm.for_plan(plan, ...)")
    table = dispatch_table(plan.phy2log, plan.num_experts, plan.topology)  # [L, E, G]
    return [ExpertParallelMoE(held.layers[l], table[l, :, held.rank], comm) for l in range(plan.num_layers)]


def trace_router(expert_ids: np.ndarray, gate_weights: np.ndarray | None, device=None) -> Router:
    """Router that replays recorded routing: token ``t`` at layer ``l`` takes ``expert_ids[t, l]``.

    Args:
        expert_ids: ``[T, L, k]`` (-1 = none); gate_weights: ``[T, L, k]`` or None (then 1/k each).
    """
    torch = _torch()
    ids_t = torch.as_tensor(expert_ids.astype(np.int64), device=device)
    if gate_weights is None:
        w_t = torch.full(ids_t.shape, 1.0 / ids_t.shape[2], device=device)
    else:
        w_t = torch.as_tensor(gate_weights.astype(np.float32), device=device)

    def route(l, u, token_id):
        return ids_t[token_id, l], w_t[token_id, l]

    return route


def softmax_topk_router(gate_weights: list, top_k: int, normalize: bool = True) -> Router:
    """The router of Mixtral, Qwen-MoE and OLMoE: softmax over the E logits (float32), top-k, renormalised over
    the k chosen when ``normalize`` (Mixtral; Qwen/OLMoE's ``norm_topk_prob``).

    Args:
        gate_weights: one ``[E, H]`` router weight per MoE layer (e.g. :meth:`ExpertSource.router_weight`).
    """
    torch = _torch()

    def route(l, u, token_id):
        probs = torch.softmax(torch.nn.functional.linear(u, gate_weights[l].to(u.dtype)).float(), dim=-1)
        w, ids = torch.topk(probs, top_k, dim=-1)
        if normalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return ids.long(), w

    return route


# ---------------------------------------------------------------------------------------------------------------
# launching: local processes (forkserver with torch preloaded) or an existing torchrun job
# ---------------------------------------------------------------------------------------------------------------

def under_torchrun() -> bool:
    """True when the environment describes a torch.distributed job (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn, world_size: int, backend: str, port: int, threads: int, args: tuple) -> None:
    import datetime

    torch = _torch()
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=300))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, world_size: int, args: tuple = (), backend: str = "gloo", threads: int | None = None) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` local processes joined in a process group.

    ``fn`` must be a module-level function. Processes start from a fork server with torch preloaded (about 0.2 s
    per launch after the first). Threads per process default to ``cpu_count // world_size`` (at least 1).
    """
    import multiprocessing

    import torch.multiprocessing as tmp

    if backend == "nccl":
        torch = _torch()
        n = torch.cuda.device_count()
        if n < world_size:
            raise RuntimeInputError(f"--backend nccl with {world_size} local ranks needs {world_size} GPUs on this "
                                    f"machine, found {n}; use torchrun across nodes or --backend gloo")
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "placement.runtime"])
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    tmp.start_processes(_entry, args=(fn, world_size, backend, _free_port(), threads, args), nprocs=world_size,
                        join=True, start_method="forkserver")


def device_for(backend: str, local_rank: int):
    """Device of a rank: ``cuda:LOCAL_RANK`` for nccl, cpu for gloo."""
    torch = _torch()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# the benchmark: replay a trace through the plans' layers, count bytes, time layers
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class BenchSpec:
    """What every rank of ``moeplace bench`` needs (picklable)."""

    plans: list[dict]  # Plan.to_dict() of each plan
    names: list[str]
    expert_ids: np.ndarray  # [T, L, k]
    gate_weights: np.ndarray | None  # [T, L, k]
    sequence_index: np.ndarray  # [T]
    hidden_size: int
    intermediate_size: int
    dtype: str
    repeats: int
    warmup: int
    dataflows: tuple
    backend: str
    seed: int = 0
    comm: str = "nccl"  # the protocol of the standard dataflow (PROTOCOLS)
    ll_nvlink: bool = True  # deepep-ll: same-node copies are NVLink (else RDMA)


def select_tokens(trace, tokens: int | None, seed: int = 0):
    """At most ``tokens`` tokens made of whole sequences (visited in a random order with ``seed``, each added if
    it still fits), so that the homes ``sequence index mod G`` spread over the ranks; all when None or 0 or more.
    If no sequence fits, the shortest one."""
    if not tokens or tokens >= trace.num_tokens:
        return trace
    seq = trace.sequence_index()
    sizes = np.bincount(seq)
    chosen, total = [], 0
    for s in np.random.default_rng(seed).permutation(sizes.size):
        if total + sizes[s] <= tokens:
            chosen.append(s)
            total += int(sizes[s])
    if not chosen:
        chosen = [int(np.argmin(sizes))]
    return trace.take(np.isin(seq, chosen))


def _summary(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    med = float(np.median(v))
    return {"median": med, "min": float(v.min()), "max": float(v.max()), "p25": float(np.percentile(v, 25)),
            "p75": float(np.percentile(v, 75)), "spread": float((v.max() - v.min()) / med) if med > 0 else 0.0,
            "repeats": int(v.size)}


_LINK_FIELDS = ("nvlink_dispatch_bytes", "rdma_dispatch_bytes", "nvlink_combine_bytes", "rdma_combine_bytes")


def bench_rank(rank: int, world_size: int, spec: BenchSpec, device=None) -> list[dict] | None:
    """One rank of the benchmark (collective). Returns the measurements on rank 0, None elsewhere."""
    torch = _torch()
    import torch.distributed as dist

    from placement.plan import Plan

    dtype = getattr(torch, DTYPES[spec.dtype])
    device = device or torch.device("cpu")
    G = world_size
    home = spec.sequence_index % G
    mine = np.nonzero(home == rank)[0]
    router = trace_router(spec.expert_ids, spec.gate_weights, device)
    gen = torch.Generator().manual_seed(spec.seed * 7919 + rank)
    x0 = torch.randn(len(mine), spec.hidden_size, generator=gen).to(device=device, dtype=dtype)
    tok0 = torch.as_tensor(mine, dtype=torch.int64, device=device)
    out = []
    for name, pd in zip(spec.names, spec.plans):
        plan = Plan.from_dict(pd)
        held = random_rank_experts(plan, rank, spec.hidden_size, spec.intermediate_size, dtype, device, spec.seed)
        L = plan.num_layers
        for dataflow in spec.dataflows:
            comm = Comm.for_plan(plan, device, spec.comm, spec.ll_nvlink)
            moes = build_layers(held, plan, comm)
            per_pass = []
            times = np.zeros((spec.repeats, L))
            comm_s = np.zeros(spec.repeats)
            for rep in range(spec.warmup + spec.repeats):
                comm.stats = CommStats()
                layer_bytes: list[tuple] = []

                def timer(l, s, rep=rep, layer_bytes=layer_bytes):
                    layer_bytes.append(tuple(getattr(comm.stats, f) for f in _LINK_FIELDS))
                    if rep >= spec.warmup:
                        times[rep - spec.warmup, l] = s

                dist.barrier()
                run_stack(moes, x0, tok0, router, dataflow, norm=True, timer=timer)
                if rep >= spec.warmup:
                    comm_s[rep - spec.warmup] = comm.stats.seconds
                cum = np.array(layer_bytes, dtype=np.float64)  # [L, 4] cumulative
                per_layer = np.diff(np.vstack([np.zeros(len(_LINK_FIELDS)), cum]), axis=0)
                per_pass.append((per_layer, comm.stats.metadata_bytes))
            if any(not np.array_equal(p[0], per_pass[0][0]) for p in per_pass):
                raise RuntimeError("bytes differed between repetitions of the same routing")
            counts = torch.tensor(np.concatenate([per_pass[0][0].ravel(), [per_pass[0][1]]]), dtype=torch.float64,
                                  device=device)
            dist.all_reduce(counts)  # sum over ranks
            t = torch.tensor(np.concatenate([times.ravel(), comm_s]), dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
            counts, t = counts.cpu(), t.cpu()
            if rank == 0:
                c = counts.numpy()
                per_layer = c[:-1].reshape(L, len(_LINK_FIELDS))
                link = dict(zip(_LINK_FIELDS, per_layer.sum(axis=0).tolist()))
                tt = t.numpy()
                times_max = tt[:spec.repeats * L].reshape(spec.repeats, L)
                layer_mean = times_max.mean(axis=1)
                out.append({
                    "plan": name, "dataflow": dataflow, "comm": spec.comm,
                    "measured": {
                        "a2a_bytes": float(per_layer.sum()),
                        "dispatch_bytes": link["nvlink_dispatch_bytes"] + link["rdma_dispatch_bytes"],
                        "combine_bytes": link["nvlink_combine_bytes"] + link["rdma_combine_bytes"],
                        "nvlink_bytes": link["nvlink_dispatch_bytes"] + link["nvlink_combine_bytes"],
                        "rdma_bytes": link["rdma_dispatch_bytes"] + link["rdma_combine_bytes"],
                        **link, "metadata_bytes": float(c[-1]),
                        "per_layer_a2a_bytes": per_layer.sum(axis=1).tolist(),
                        "seconds_per_layer": _summary(layer_mean),
                        "seconds_per_pass": _summary(times_max.sum(axis=1)),
                        "a2a_seconds_per_pass_slowest_rank": _summary(tt[spec.repeats * L:]),
                        "per_layer_seconds_median": np.median(times_max, axis=0).tolist(),
                    }})
    return out if rank == 0 else None


def _bench_spawned(rank: int, world_size: int, spec: BenchSpec, result_path: str) -> None:
    device = device_for(spec.backend, rank)
    res = bench_rank(rank, world_size, spec, device)
    if rank == 0:
        Path(result_path).write_text(json.dumps(res))


def run_bench(spec: BenchSpec, world_size: int, threads: int | None = None) -> list[dict] | None:
    """Run the benchmark on ``world_size`` local processes, or in this process when under torchrun.

    Returns the measurements (rank 0 / the launching process) or None (other torchrun ranks).
    """
    if under_torchrun():
        torch = _torch()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(spec.backend)
        try:
            device = device_for(spec.backend, int(os.environ.get("LOCAL_RANK", 0)))
            if threads:
                torch.set_num_threads(threads)
            return bench_rank(dist.get_rank(), dist.get_world_size(), spec, device)
        finally:
            dist.destroy_process_group()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        launch(_bench_spawned, world_size, (spec, path), backend=spec.backend, threads=threads)
        return json.loads(Path(path).read_text())
