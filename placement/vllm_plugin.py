"""vLLM general plugin: start vLLM with a moeplace plan as the initial expert placement.

Install moeplace next to vLLM and start the server with the plan named in ``MOEPLACE_PLAN`` and EPLB on::

    MOEPLACE_PLAN=plan.json vllm serve MODEL --tensor-parallel-size 8 --enable-expert-parallel \\
        --enable-eplb --eplb-config '{"num_redundant_experts": R}'

vLLM calls :func:`register` (entry point ``vllm.general_plugins: moeplace``) once in every process before any
work. With ``MOEPLACE_PLAN`` unset it does nothing. Otherwise it wraps vLLM's ``EplbState.add_model`` (vLLM >= 0.13;
``EplbState.build`` on 0.10-0.12) so that, right after vLLM has built its EPLB state for the loaded model, the plan

1. is checked against the model: MoE layers (count, and decoder indices when the layer names carry them), logical
   experts, EP size, physical slots (= experts + ``num_redundant_experts``), no empty slots;
2. is agreed on by every EP rank (one all-reduce on the EP group's CPU group): a rank that cannot read or use the
   plan makes every rank keep vLLM's default, so a plan file missing on one node cannot hang or split the job;
3. is installed with vLLM's own functions: ``rearrange_expert_weights_inplace`` moves the expert weights from
   vLLM's initial layout to the plan's over vLLM's EPLB communicator, then ``_commit_eplb_maps`` (or, on versions
   without it, in-place copies into the same tensors) publishes ``physical_to_logical_map``,
   ``logical_to_physical_map`` and ``logical_replica_count``, which the MoE layers hold as views.

By default the placement then stays fixed: the EPLB rearrangement interval is pushed out of reach. Set
``MOEPLACE_EPLB_REBALANCE=1`` to let vLLM's EPLB keep rebalancing, starting from the plan.

Online rebalancing with moeplace's policy: set ``MOEPLACE_EPLB_POLICY=moeplace`` (with or without a plan) and vLLM's
online EPLB (``--enable-eplb``) calls :class:`placement.online.OnlinePolicy` instead of its default policy at every
rearrangement: the plugin registers it in vLLM's policy registry (``vllm.distributed.eplb.policy.EPLB_POLICIES``,
key ``"moeplace"``) and sets it on the EPLB state right after vLLM has built it (vLLM's ``eplb_config.policy`` accepts
only built-in names, so an environment variable chooses it). Its options come as JSON in
``MOEPLACE_EPLB_POLICY_OPTIONS`` (e.g. ``{"max_moves": 512, "model": "deepseek-v3"}``); its horizon defaults to
vLLM's ``step_interval / window_size``. If the policy fails or returns an unusable map, that rearrangement uses
vLLM's default policy (one warning). Every EP rank runs the same deterministic policy on the same all-reduced counts,
so all ranks compute the same map.

A plan that does not fit, a vLLM without these hooks, or any unexpected error while checking logs one warning
(logger ``vllm.moeplace``) and leaves vLLM's default placement; the server starts either way. The one exception is
a failure inside vLLM's weight transfer after every rank has agreed: weights may then be half moved, and serving
would give wrong answers, so that error is raised.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import re
from types import SimpleNamespace
from typing import Any

import numpy as np

ENV_PLAN = "MOEPLACE_PLAN"
ENV_REBALANCE = "MOEPLACE_EPLB_REBALANCE"
ENV_POLICY = "MOEPLACE_EPLB_POLICY"
ENV_POLICY_OPTIONS = "MOEPLACE_EPLB_POLICY_OPTIONS"
POLICY_NAME = "moeplace"
FROZEN_INTERVAL = 1 << 62  # steps until vLLM's next EPLB rearrangement once the plan is installed
_HOOK_ATTR = "_moeplace_hook"

log = logging.getLogger("vllm.moeplace")
_warned: set[str] = set()
_announced: set[str] = set()
_plans: dict[str, tuple[Any, str | None]] = {}


def _warn(message: str) -> None:
    """Log each distinct warning once per process."""
    if message not in _warned:
        _warned.add(message)
        log.warning("moeplace: %s", message)


# entry point -----------------------------------------------------------------------------------------------

def register() -> None:
    """vLLM general-plugin entry point. Re-entrant; never raises."""
    try:
        _register()
    except Exception as exc:  # noqa: BLE001 - a plugin must not take the server down
        _warn(f"plugin disabled by an unexpected error ({type(exc).__name__}: {exc}); vLLM keeps its default "
              f"expert placement")


def _register() -> None:
    path = os.environ.get(ENV_PLAN)
    policy = os.environ.get(ENV_POLICY)
    if not path and not policy:
        return
    what = f"{ENV_PLAN}={path}" if path else f"{ENV_POLICY}={policy}"
    if policy and policy != POLICY_NAME:
        _warn(f"{ENV_POLICY}={policy!r} is not a moeplace policy (the one policy is {POLICY_NAME!r}); vLLM keeps its "
              f"default EPLB policy")
        if not path:
            return
    try:
        from vllm.distributed.eplb import eplb_state as es
    except Exception as exc:  # noqa: BLE001
        _warn(f"{what} is set but vLLM's EPLB module cannot be imported ({type(exc).__name__}: {exc}); "
              f"moeplace needs vLLM >= 0.10 with EPLB; vLLM keeps its default expert placement")
        return
    cls = getattr(es, "EplbState", None)
    if cls is None:
        _warn(f"this vLLM has no EplbState; {what} is ignored and vLLM keeps its default expert placement")
        return
    if callable(getattr(cls, "add_model", None)):
        if not getattr(cls.add_model, _HOOK_ATTR, False):
            cls.add_model = _wrap_add_model(cls.add_model)
    elif callable(getattr(cls, "build", None)):
        if not getattr(cls.build, _HOOK_ATTR, False):
            cls.build = _wrap_build(cls.build)
    else:
        _warn(f"this vLLM's EplbState has neither add_model nor build; {what} is ignored and vLLM keeps its "
              f"default expert placement")
        return
    if _eplb_enabled_in_caller() is False:
        _warn(f"{what} is set but EPLB is off, so vLLM builds no EPLB state and moeplace is not used; add "
              f"--enable-eplb (and --eplb-config '{{\"num_redundant_experts\": R}}')")
    elif what not in _announced:
        _announced.add(what)
        log.info("moeplace: %s; used when vLLM builds its EPLB state (needs --enable-eplb)", what)


def _eplb_enabled_in_caller(max_depth: int = 16) -> bool | None:
    """Whether the vLLM code that is loading plugins runs with EPLB on, if it can be seen from its frames.

    vLLM loads plugins from ``EngineArgs.__post_init__`` (the object has ``enable_eplb``) and from worker and engine
    initialisation (a local ``vllm_config``). None when neither is found.
    """
    import sys

    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        loc = frame.f_locals
        cfg = loc.get("vllm_config")
        par = getattr(cfg, "parallel_config", None)
        if isinstance(getattr(par, "enable_eplb", None), bool):
            return par.enable_eplb
        owner = loc.get("self")
        if type(owner).__name__ in ("EngineArgs", "AsyncEngineArgs") and isinstance(
                getattr(owner, "enable_eplb", None), bool):
            return owner.enable_eplb
        frame = frame.f_back
    return None


def _guarded(fn, *args) -> None:
    """Run an install step inside vLLM's startup: a failed weight transfer propagates (the model would be half
    moved); any other error leaves vLLM's own placement in place, with a warning."""
    try:
        fn(*args)
    except _TransferError:
        raise
    except Exception as exc:  # noqa: BLE001
        _warn(f"plan not installed: unexpected error ({type(exc).__name__}: {exc}); vLLM keeps its default "
              f"expert placement")


def _wrap_add_model(orig):
    @functools.wraps(orig)
    def add_model(self, model, model_config, *args, **kwargs):
        before = set(getattr(self, "model_states", None) or {})
        result = orig(self, model, model_config, *args, **kwargs)
        if os.environ.get(ENV_PLAN):
            _guarded(_after_add_model, self, model, model_config, before, args, kwargs)
        _guarded(install_policy, self)
        return result

    setattr(add_model, _HOOK_ATTR, True)
    return add_model


def _wrap_build(orig):
    func = orig.__func__ if hasattr(orig, "__func__") else orig

    @functools.wraps(func)
    def build(cls, model, device, parallel_config, *args, **kwargs):
        state = func(cls, model, device, parallel_config, *args, **kwargs)
        load = kwargs.get("global_expert_load", args[0] if args else None)
        if load is None and os.environ.get(ENV_PLAN):  # initial build (a load: an elastic rescale, vLLM's own)
            _guarded(_install, model, state, state)
        _guarded(install_policy, state)
        return state

    setattr(build, _HOOK_ATTR, True)
    return classmethod(build)


def _after_add_model(eplb_state, model, model_config, before: set, args: tuple, kwargs: dict) -> None:
    if getattr(eplb_state, "_moeplace_frozen", False):
        _freeze(eplb_state)  # add_model resets the interval; keep a frozen state frozen
    if kwargs.get("global_expert_load") is not None or (args and args[0] is not None and
                                                        not isinstance(args[0], str)):
        return  # elastic-EP rescale (vLLM 0.13-0.16 signature): not an initial placement
    model_name = kwargs.get("model_name", args[0] if args and isinstance(args[0], str) else None)
    draft = "draft" in (getattr(model_config, "runner_type", None), getattr(model_config, "runner", None))
    if draft or (model_name is not None and model_name != getattr(model_config, "model", None)):
        log.info("moeplace: leaving the EPLB placement of %s (speculative-decoding drafter) to vLLM",
                 model_name or getattr(model_config, "model", "the draft model"))
        return
    added = [k for k in (getattr(eplb_state, "model_states", None) or {}) if k not in before]
    if len(added) != 1:
        _warn("could not find the EPLB state vLLM just built for the model; this vLLM version is not supported, "
              "vLLM keeps its default expert placement")
        return
    _install(model, eplb_state.model_states[added[0]], eplb_state)


# checks ----------------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def decoder_indices(layer_names) -> list[int] | None:
    """Decoder-layer index of each MoE layer from vLLM layer names like ``model.layers.3.mlp.experts``."""
    out = []
    for name in layer_names:
        m = _LAYER_RE.search(str(name or ""))
        if m is None:
            return None
        out.append(int(m.group(1)))
    return out


def check_against_model(plan, *, num_moe_layers: int, num_logical_experts: int, num_physical_experts: int,
                        ep_size: int, layer_names=None) -> str | None:
    """Why ``plan`` cannot be installed on this model (one sentence with the fix), or None if it fits."""
    t = plan.topology
    if plan.memory is not None or (plan.phy2log < 0).any():
        return "the plan has a memory budget (empty slots); vLLM needs every expert resident, plan without one"
    if plan.num_layers != num_moe_layers:
        return (f"the plan has {plan.num_layers} MoE layers but the model has {num_moe_layers}; plan on a trace of "
                f"this model")
    if plan.num_experts != num_logical_experts:
        return (f"the plan has {plan.num_experts} experts per layer but the model has {num_logical_experts}; plan on "
                f"a trace of this model")
    if t.num_gpus != ep_size:
        return (f"the plan is for {t.num_gpus} GPUs but vLLM's EP size is {ep_size}; start vLLM with tensor x data "
                f"parallel size {t.num_gpus} or plan for {ep_size} GPUs")
    if plan.num_slots != num_physical_experts:
        red = num_physical_experts - num_logical_experts
        return (f"the plan has {plan.num_redundant} redundant slots but vLLM runs with {red}; pass --eplb-config "
                f"'{{\"num_redundant_experts\": {plan.num_redundant}}}'")
    if layer_names is not None:
        idx = decoder_indices(layer_names)
        if idx is not None and idx != [int(x) for x in plan.moe_layer_index]:
            return (f"the plan's MoE layers sit at decoder layers {plan.moe_layer_index.tolist()[:4]}... but the "
                    f"model's at {idx[:4]}...; plan on a trace of this model")
    return None


def load_plan(path: str):
    """``(plan, None)`` or ``(None, reason)``; cached per path for the life of the process."""
    if path not in _plans:
        from placement.plan import Plan, PlanError

        try:
            _plans[path] = (Plan.load(path), None)
        except PlanError as exc:
            _plans[path] = (None, str(exc))
        except OSError as exc:
            _plans[path] = (None, f"{path} cannot be read ({exc})")
    return _plans[path]


def plan_digest(plan) -> int:
    """62-bit digest of the placement and its shape, compared across ranks."""
    h = hashlib.sha256(plan.phy2log.astype("<i8").tobytes())
    h.update(f"{plan.num_experts}/{plan.topology.num_gpus}/{plan.moe_layer_index.tolist()}".encode())
    return int.from_bytes(h.digest()[:8], "little") >> 2


# installing ------------------------------------------------------------------------------------------------

class _TransferError(RuntimeError):
    pass


def _vllm_api() -> SimpleNamespace:
    """The vLLM functions the plugin uses, looked up in this vLLM."""
    from vllm.distributed.eplb import eplb_state as es
    from vllm.distributed.parallel_state import get_ep_group

    rearrange = getattr(es, "rearrange_expert_weights_inplace", None)
    if rearrange is None:
        from vllm.distributed.eplb.rebalance_execute import rearrange_expert_weights_inplace as rearrange
    return SimpleNamespace(get_ep_group=get_ep_group, rearrange=rearrange,
                           commit=getattr(es, "_commit_eplb_maps", None))


def _rearrange_kwargs(fn, values: dict) -> dict:
    """Bind vLLM's rearrange function by parameter name (its signature changed across versions)."""
    kwargs = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in values and values[name] is not None:
            kwargs[name] = values[name]
        elif p.default is inspect.Parameter.empty:
            raise LookupError(f"rearrange_expert_weights_inplace wants {name!r}, which this plugin does not know")
    return kwargs


def _agree(ok: bool, digest: int, coord) -> bool:
    """True iff every EP rank is ok with the same plan digest (one MIN all-reduce); True alone if not distributed."""
    import torch
    import torch.distributed as dist

    if coord is None or not dist.is_available() or not dist.is_initialized():
        return ok
    group = getattr(coord, "cpu_group", None)
    device = torch.device("cpu")
    if group is None:
        group = coord.device_group
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else device
    d = digest if ok else 0
    t = torch.tensor([1 if ok else 0, d, -d], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t[0].item() == 1 and t[1].item() == -t[2].item())


def _freeze(eplb_state) -> None:
    if hasattr(eplb_state, "expert_rearrangement_step_interval"):
        eplb_state.expert_rearrangement_step_interval = FROZEN_INTERVAL
        eplb_state.expert_rearrangement_step = 0
    eplb_state._moeplace_frozen = True


def _commit(api, model_state, new, plan) -> None:
    """Publish the new maps in vLLM's EPLB tensors (in place: the MoE layers hold views of them)."""
    import torch

    if api.commit is not None:
        params = list(inspect.signature(api.commit).parameters)
        if params[:2] == ["model_state", "new_physical_to_logical_map"]:
            api.commit(model_state, new)
            return
    p2l = model_state.physical_to_logical_map
    p2l.copy_(new.to(device=p2l.device, dtype=p2l.dtype))
    l2p = model_state.logical_to_physical_map
    log2phy = torch.as_tensor(plan.log2phy())
    pad = l2p.shape[-1] - log2phy.shape[-1]
    log2phy = torch.nn.functional.pad(log2phy, (0, pad), value=-1)
    l2p.copy_(log2phy.to(device=l2p.device, dtype=l2p.dtype))
    cnt = model_state.logical_replica_count
    cnt.copy_(torch.as_tensor(plan.replica_counts()).to(device=cnt.device, dtype=cnt.dtype))


def _check_locally(path: str, model, model_state, coord, api) -> tuple:
    """``(plan, reason, old, new, rearrange_kwargs)``; ``reason`` is None when this rank can install the plan.

    Never raises: every rank must reach the agreement step, or the others would wait for it forever.
    """
    import torch

    plan = old = new = kwargs = None
    try:
        plan, reason = load_plan(path)
        if reason is None:
            try:
                reason = check_against_model(
                    plan, num_moe_layers=int(model.num_moe_layers),
                    num_logical_experts=int(model.num_logical_experts),
                    num_physical_experts=int(model.num_physical_experts),
                    ep_size=int(getattr(coord, "world_size", 1)),
                    layer_names=[getattr(m, "layer_name", None) for m in getattr(model, "moe_layers", [])] or None)
                if reason is None and len(model.expert_weights) != int(model.num_moe_layers):
                    reason = (f"this rank holds {len(model.expert_weights)} of the model's {model.num_moe_layers} "
                              f"MoE layers (pipeline parallelism?); the plugin installs plans only when every rank "
                              f"holds all MoE layers")
            except AttributeError as exc:
                reason = f"the model does not expose vLLM's MixtureOfExperts attributes ({exc})"
        if reason is None:
            old = model_state.physical_to_logical_map
            new = torch.as_tensor(plan.phy2log, dtype=old.dtype)
            try:
                kwargs = _rearrange_kwargs(api.rearrange, {
                    "old_global_expert_indices": old, "new_global_expert_indices": new,
                    "expert_weights": model.expert_weights,
                    "expert_buffer": getattr(model_state, "expert_buffer", None),
                    "ep_group": coord.device_group, "communicator": getattr(model_state, "communicator", None),
                    "is_profile": False})
            except (LookupError, AttributeError, TypeError, ValueError) as exc:
                reason = f"this vLLM version is not supported ({exc})"
    except Exception as exc:  # noqa: BLE001
        reason = f"unexpected error while checking it ({type(exc).__name__}: {exc})"
    return plan, reason, old, new, kwargs


def _install(model, model_state, eplb_state, api: SimpleNamespace | None = None) -> bool:
    """Check, agree on and install the plan named in ``MOEPLACE_PLAN`` for ``model``; True if installed."""
    import torch

    path = os.environ.get(ENV_PLAN)
    if not path:
        return False
    api = api or _vllm_api()
    coord = api.get_ep_group()
    plan, reason, old, new, kwargs = _check_locally(path, model, model_state, coord, api)
    if reason is not None:
        _warn(f"plan {path} not installed: {reason}; vLLM keeps its default expert placement")
    digest = plan_digest(plan) if reason is None else 0
    if not _agree(reason is None, digest, coord):
        if reason is None:
            _warn(f"plan {path} not installed: another EP rank could not use it (see that rank's warning); every "
                  f"rank keeps vLLM's default expert placement")
        return False
    if not torch.equal(old.cpu(), new):
        try:
            api.rearrange(**kwargs)
            _commit(api, model_state, new, plan)
        except Exception as exc:
            raise _TransferError(f"moeplace: vLLM's expert-weight transfer failed while installing {path} "
                                 f"({type(exc).__name__}: {exc}); expert weights may be partly moved, so the server "
                                 f"stops instead of serving wrong results; unset {ENV_PLAN} to start with vLLM's "
                                 f"default placement") from exc
    rebalance = os.environ.get(ENV_REBALANCE, "").lower() in ("1", "true", "yes") or \
        os.environ.get(ENV_POLICY) == POLICY_NAME
    if not rebalance:
        _freeze(eplb_state)
    if int(getattr(coord, "rank_in_group", 0)) == 0:
        log.info("moeplace: installed %s (%s: %d MoE layers x %d slots on %d EP ranks, %d redundant)%s", path,
                 plan.name, plan.num_layers, plan.num_slots, int(getattr(coord, "world_size", 1)),
                 plan.num_redundant, "" if rebalance else f"; EPLB rebalancing is off (set {ENV_REBALANCE}=1 to "
                                                          f"keep it)")
    return True


# online rebalancing policy ------------------------------------------------------------------------------------

def _policy_options() -> dict | None:
    """The policy's options from ``MOEPLACE_EPLB_POLICY_OPTIONS`` (JSON object), or None (with a warning)."""
    import json

    text = os.environ.get(ENV_POLICY_OPTIONS, "").strip()
    if not text:
        return {}
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as exc:
        _warn(f"{ENV_POLICY_OPTIONS} is not JSON ({exc}); vLLM keeps its default EPLB policy")
        return None
    if not isinstance(opts, dict):
        _warn(f"{ENV_POLICY_OPTIONS} must be a JSON object such as {{\"max_moves\": 512}}; vLLM keeps its default "
              f"EPLB policy")
        return None
    return opts


def _returns_tuple(default_cls) -> bool:
    """Whether this vLLM's policies return ``(phy2log, log2phy, logcnt)`` (older) instead of ``phy2log`` alone."""
    ann = inspect.signature(default_cls.rebalance_experts).return_annotation
    return "tuple" in str(ann).lower()


def _maps(phy2log, num_experts: int):
    """``(phy2log, log2phy [L, E, R] -1 padded, logcnt [L, E])`` as vLLM's older policies return them."""
    import torch

    from solvers.objective import replica_counts

    X = phy2log.cpu().numpy()
    cnt = replica_counts(X, num_experts)
    R = max(int(cnt.max()), 1)
    L, S = X.shape
    l2p = np.full((L, num_experts, R), -1, dtype=np.int64)
    fill = np.zeros((L, num_experts), dtype=np.int64)
    for l in range(L):
        for s in range(S):
            e = X[l, s]
            l2p[l, e, fill[l, e]] = s
            fill[l, e] += 1
    return phy2log, torch.as_tensor(l2p), torch.as_tensor(cnt)


def make_policy_class(base_cls, fallback_cls, options: dict):
    """A vLLM EPLB policy class (subclass of ``base_cls``) running :class:`placement.online.OnlinePolicy` with
    ``options``; any failure or unusable map falls back to ``fallback_cls`` for that call, with one warning."""
    from placement.online import OnlinePolicy, check_map

    online = OnlinePolicy(**options)
    as_tuple = _returns_tuple(fallback_cls)

    class MoeplaceEplbPolicy(base_cls):
        moeplace = online
        fallback = fallback_cls

        @classmethod
        def rebalance_experts(cls, weight, num_replicas, num_groups, num_nodes, num_ranks,
                              old_global_expert_indices=None, *args, **kwargs):
            try:
                new = cls.moeplace(weight, num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices)
                L, E = weight.shape[-2:]
                reason = check_map(new.cpu().numpy(), L, E, num_replicas, num_ranks)
                if reason is not None:
                    raise ValueError(reason)
                new = new.cpu()
                return _maps(new, E) if as_tuple else new
            except Exception as exc:  # noqa: BLE001 - the stack's default policy stays in charge
                _warn(f"moeplace's EPLB policy failed ({type(exc).__name__}: {exc}); this rearrangement uses vLLM's "
                      f"default policy")
                return cls.fallback.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_ranks,
                                                      old_global_expert_indices, *args, **kwargs)

    return MoeplaceEplbPolicy


def install_policy(eplb_state) -> bool:
    """Make ``eplb_state`` rearrange with moeplace's policy when ``MOEPLACE_EPLB_POLICY=moeplace``; True if done.
    Never raises for a vLLM it does not know: one warning, vLLM's default policy stays."""
    if os.environ.get(ENV_POLICY) != POLICY_NAME:
        return False
    try:
        from vllm.distributed.eplb import policy as registry
    except Exception as exc:  # noqa: BLE001
        _warn(f"this vLLM has no EPLB policy registry (vllm.distributed.eplb.policy: {type(exc).__name__}: {exc}); "
              f"{ENV_POLICY} is ignored and vLLM keeps its default EPLB policy")
        return False
    base = getattr(registry, "AbstractEplbPolicy", None)
    current = getattr(eplb_state, "policy", None)
    if base is None or current is None or not callable(getattr(current, "rebalance_experts", None)):
        _warn(f"this vLLM's EPLB state has no policy to replace; {ENV_POLICY} is ignored and vLLM keeps its default "
              f"EPLB policy")
        return False
    if getattr(current, "moeplace", None) is not None:
        return True  # already ours
    options = _policy_options()
    if options is None:
        return False
    if "horizon" not in options:
        window = getattr(eplb_state, "expert_load_window_size", 0) or 0
        interval = getattr(eplb_state, "expert_rearrangement_step_interval", 0) or 0
        if window > 0 and interval > 0:
            options["horizon"] = interval / window
    try:
        cls = make_policy_class(base, current, options)
    except Exception as exc:  # noqa: BLE001 - bad options: one sentence
        _warn(f"{ENV_POLICY_OPTIONS} cannot be used ({exc}); vLLM keeps its default EPLB policy")
        return False
    registry.EPLB_POLICIES[POLICY_NAME] = cls
    eplb_state.policy = cls
    if POLICY_NAME not in _announced:
        _announced.add(POLICY_NAME)
        log.info("moeplace: vLLM's EPLB rearrangements use moeplace's online policy (options %s)", options)
    return True
