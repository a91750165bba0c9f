"""Plan v1: the placement file moeplace writes, evaluates and exports (schema: placement/schemas/plan-v1.json).

A plan holds, per MoE layer, the slot map ``phy2log[L, S]`` (logical expert of each physical slot; slot ``s``
on GPU ``s // slots_per_gpu``), the topology it was made for, the decoder-layer index of every MoE layer, how
it was solved (solver, status, seconds, objective, bound, gap), metrics predicted on the traces it was fitted on
(and on held-out traces when given), and provenance (trace files, hashes, token counts, version).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from solvers import Result, SolverInputError, Topology
from solvers.objective import replica_counts
from traces import atomic_write_bytes

FORMAT = "moeplace.plan"
VERSION = 1


class PlanError(ValueError):
    """A plan file is unusable or does not fit the data it is used with (one sentence)."""


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(eq=False)
class Plan:
    """A placement for every MoE layer plus its metadata.

    Attributes:
        phy2log: int ``[L, S]``; -1 marks an empty slot (memory-budget plans only).
        num_experts: E logical experts per layer.
        topology: GPUs, GPUs per node, slots per GPU.
        moe_layer_index: int ``[L]`` decoder-layer index of each MoE layer.
        num_hidden_layers: decoder layers in the model (dense ones included).
    """

    phy2log: np.ndarray
    num_experts: int
    topology: Topology
    moe_layer_index: np.ndarray
    num_hidden_layers: int
    model: str | None = None
    solver: dict = field(default_factory=dict)
    predicted: dict | None = None
    heldout: dict | None = None
    provenance: dict = field(default_factory=dict)
    memory: dict | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.phy2log = np.asarray(self.phy2log, dtype=np.int64)
        self.moe_layer_index = np.asarray(self.moe_layer_index, dtype=np.int64)
        L, S = self.phy2log.shape if self.phy2log.ndim == 2 else (None, None)
        if L is None:
            raise PlanError(f"phy2log must be a list of rows, one per MoE layer; got rank {self.phy2log.ndim}")
        if S != self.topology.num_slots:
            raise PlanError(f"phy2log rows have {S} slots but the topology has {self.topology.num_gpus} GPUs x "
                            f"{self.topology.slots_per_gpu} slots = {self.topology.num_slots}")
        if self.moe_layer_index.shape != (L,):
            raise PlanError(f"moe_layer_index has {self.moe_layer_index.size} entries for {L} MoE layers")
        if L and (self.moe_layer_index.min() < 0 or np.any(np.diff(self.moe_layer_index) <= 0)):
            raise PlanError("moe_layer_index must be non-negative and strictly increasing")
        if L and self.num_hidden_layers <= int(self.moe_layer_index[-1]):
            raise PlanError(f"num_hidden_layers ({self.num_hidden_layers}) must exceed the last MoE layer index "
                            f"({int(self.moe_layer_index[-1])})")
        E = self.num_experts
        lo = -1 if self.memory is not None else 0
        if self.phy2log.size and (self.phy2log.min() < lo or self.phy2log.max() >= E):
            raise PlanError(f"phy2log holds expert ids outside [0, {E})")
        if self.memory is None:
            missing = np.argwhere(replica_counts(self.phy2log, E) == 0)
            if missing.size:
                l, e = missing[0]
                raise PlanError(f"expert {e} of MoE layer {l} has no slot; every expert needs at least one slot "
                                f"unless the plan has a memory budget")

    # shapes ----------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def num_redundant(self) -> int:
        return self.num_slots - self.num_experts

    @property
    def name(self) -> str:
        return str(self.solver.get("name", "plan"))

    def replica_counts(self) -> np.ndarray:
        """``[L, E]`` slots per logical expert."""
        return replica_counts(self.phy2log, self.num_experts)

    def log2phy(self) -> np.ndarray:
        """``[L, E, R]`` physical slots of each logical expert, -1 padded (R = max replicas)."""
        cnt = self.replica_counts()
        R = max(int(cnt.max()), 1)
        out = np.full((self.num_layers, self.num_experts, R), -1, dtype=np.int64)
        for l in range(self.num_layers):
            row = self.phy2log[l]
            order = np.argsort(row, kind="stable")
            order = order[row[order] >= 0]
            experts = row[order]
            starts = np.searchsorted(experts, np.arange(self.num_experts))
            rank = np.arange(order.size) - starts[experts]
            out[l, experts, rank] = order
        return out

    # construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_result(cls, result: Result, num_experts: int, topology: Topology, moe_layer_index, num_hidden_layers: int,
                    model: str | None = None, options: dict | None = None, provenance: dict | None = None) -> "Plan":
        stats = dict(result.stats)
        memory = stats.pop("memory", None)  # kept once, as the plan's own memory record
        solver = {"name": result.solver, "status": result.status, "seconds": result.seconds,
                  "objective": result.objective, "bound": result.bound, "gap": result.gap,
                  "objective_name": result.objective_name, "backend": result.backend,
                  "options": options or {}, "stats": stats}
        return cls(result.phy2log, num_experts, topology, moe_layer_index, num_hidden_layers, model,
                   solver=_jsonable(solver), provenance=provenance or {}, memory=memory)

    # JSON --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        t = self.topology
        return _jsonable({
            "format": FORMAT, "version": VERSION, "model": self.model,
            "num_experts": self.num_experts, "num_hidden_layers": self.num_hidden_layers,
            "moe_layer_index": self.moe_layer_index,
            "topology": {"num_gpus": t.num_gpus, "gpus_per_node": t.gpus_per_node, "slots_per_gpu": t.slots_per_gpu,
                         "num_nodes": t.num_nodes, "num_slots": t.num_slots, "num_redundant": self.num_redundant,
                         "intra_node_bandwidth": t.intra_node_bandwidth, "inter_node_bandwidth": t.inter_node_bandwidth},
            "phy2log": self.phy2log, "solver": self.solver, "predicted": self.predicted, "heldout": self.heldout,
            "memory": self.memory, "provenance": self.provenance, **({"extra": self.extra} if self.extra else {}),
        })

    @classmethod
    def from_dict(cls, d: Any, where: str = "plan") -> "Plan":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PlanError(f"{where} is not a moeplace plan (no \"format\": \"{FORMAT}\"); plans come from "
                            f"'moeplace plan' or 'moeplace import-plan'")
        if d.get("version") != VERSION:
            raise PlanError(f"{where} is plan version {d.get('version')!r}; this moeplace reads version {VERSION}")
        validate_plan_dict(d, where)
        _check_cost_params(d, where)
        missing = [k for k in ("num_experts", "num_hidden_layers", "moe_layer_index", "topology", "phy2log") if k not in d]
        if missing:
            raise PlanError(f"{where} lacks the field {missing[0]!r}")
        try:
            t = d["topology"]
            topo = Topology(num_gpus=int(t["num_gpus"]), slots_per_gpu=int(t["slots_per_gpu"]),
                            gpus_per_node=int(t.get("gpus_per_node") or t["num_gpus"]),
                            intra_node_bandwidth=float(t.get("intra_node_bandwidth", 450e9)),
                            inter_node_bandwidth=float(t.get("inter_node_bandwidth", 50e9)))
            phy2log = np.asarray(d["phy2log"])
            if phy2log.dtype == object or not np.issubdtype(phy2log.dtype, np.integer):
                raise PlanError(f"{where}: phy2log must be rows of equal length holding integer expert ids")
            return cls(phy2log, int(d["num_experts"]), topo, np.asarray(d["moe_layer_index"]),
                       int(d["num_hidden_layers"]), d.get("model"), d.get("solver") or {}, d.get("predicted"),
                       d.get("heldout"), d.get("provenance") or {}, d.get("memory"), d.get("extra") or {})
        except PlanError as exc:
            raise PlanError(f"{where}: {exc}" if not str(exc).startswith(where) else str(exc)) from None
        except SolverInputError as exc:  # the topology's checks speak of CLI flags; here they are the file's fields
            msg = str(exc)
            for flag, field in (("--gpus-per-node", "topology.gpus_per_node"), ("--gpus", "topology.num_gpus"),
                                ("--redundant", "topology.slots_per_gpu")):
                msg = msg.replace(flag, field)
            raise PlanError(f"{where}: {msg}; fix the file or make the plan again with 'moeplace plan'") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{where} has a malformed field ({type(exc).__name__}: {exc})") from None

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON atomically (temp file + rename)."""
        text = json.dumps(self.to_dict(), indent=1)
        atomic_write_bytes(path, lambda f: f.write(text.encode()))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"{p}: no such plan file; create one with 'moeplace plan'")
        from traces.format import note_input

        note_input(p)
        from traces.filekind import kind, mismatch

        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            k = kind(p)
            if k in ("json", "text"):  # JSON (or text) that does not parse: say where
                raise PlanError(f"{p} is not valid JSON ({exc}); was it truncated? Plans come from 'moeplace plan' "
                                f"or 'moeplace import-plan'") from None
            raise PlanError(mismatch(p, "a plan file (JSON)", k)) from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            k = kind(p)
            if k != "json":
                raise PlanError(mismatch(p, "a moeplace plan", k))
        return cls.from_dict(d, where=str(p))

    def check_fits(self, num_layers: int, num_experts: int, source: str = "the trace") -> None:
        """Raise PlanError unless the plan is for ``num_layers`` MoE layers of ``num_experts`` experts."""
        if (self.num_layers, self.num_experts) != (num_layers, num_experts):
            raise PlanError(f"plan {self.name!r} is for {self.num_layers} MoE layers x {self.num_experts} experts but "
                            f"{source} has {num_layers} x {num_experts}; plan and evaluate the same model")


SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "plan-v1.json"


def _check_cost_params(d: dict, where: str) -> None:
    """A PlanError unless the cost-model fields recorded in ``solver.options.params`` pass the cost model's own
    checks (:class:`solvers.cost.CostModel`): the evaluator computes with them."""
    from dataclasses import fields

    from solvers.cost import CostModel

    solver = d.get("solver")
    options = solver.get("options") if isinstance(solver, dict) else None
    params = options.get("params") if isinstance(options, dict) else None
    if not isinstance(params, dict):
        return
    recorded = {f.name: params[f.name] for f in fields(CostModel) if params.get(f.name) is not None}
    try:
        CostModel(**recorded)
    except SolverInputError as exc:
        raise PlanError(f"{where}: solver.options.params: {exc}; fix the field or make the plan again") from None


def plan_schema() -> dict:
    """The Plan v1 JSON Schema (``placement/schemas/plan-v1.json``, draft 2020-12)."""
    return json.loads(SCHEMA_PATH.read_text())


@functools.lru_cache(maxsize=1)
def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(plan_schema())


def validate_plan_dict(d: Any, where: str = "plan", require: bool = False) -> bool:
    """Check a plan dict against the Plan v1 JSON Schema; raise :class:`PlanError` (one sentence) if it fails.

    Uses ``jsonschema`` when it is installed (a development dependency); without it returns False and leaves
    the checks to :meth:`Plan.from_dict`, unless ``require`` is set (then ImportError). Returns True when the
    dict was validated.
    """
    try:
        validator = _validator()
    except ImportError:
        if require:
            raise
        return False
    errors = list(validator.iter_errors(d))
    if errors:
        import jsonschema

        e = jsonschema.exceptions.best_match(errors)
        at = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(e.absolute_path))
        msg = e.message if len(e.message) < 200 else e.message[:200] + "..."
        raise PlanError(f"{where} does not follow the Plan v1 schema" + (f" at {at}" if at else "") + f": {msg}")
    return True


def provenance_of(paths: list[str], tokens: int, sequences: int, extra: dict | None = None) -> dict:
    """Provenance record: trace files with sha256 (or bundled dataset names), token counts, version, time."""
    from placement import __version__

    files = []
    for p in paths:
        if Path(p).is_file():
            files.append({"path": str(p), "sha256": file_sha256(p)})
        else:
            files.append({"dataset": str(p)})
    out = {"traces": files, "tokens": int(tokens), "sequences": int(sequences), "moeplace_version": __version__,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if extra:
        out.update(extra)
    return _jsonable(out)
