"""Communication models: how a layer's tokens cross GPUs under the all-to-all kernels users run.

One interface, one file per model (discovered: a module of this package with a ``NAME`` is a model):

- :mod:`~solvers.comm.nccl` (``nccl``): one copy per distinct remote GPU, what ``placement.runtime``'s
  ``all_to_all`` does and what the planner always assumed.
- :mod:`~solvers.comm.deepep_normal` (``deepep-normal``, DeepEP's normal kernels, prefill and training): NVLink to
  each distinct target GPU in the home node; RDMA once per distinct remote node, to the GPU with the home's local
  index there, which forwards over NVLink to the other target GPUs of its node. Combine mirrors it.
- :mod:`~solvers.comm.deepep_ll` (``deepep-ll``, DeepEP's low-latency kernels, decode): one message per (token,
  expert) copy, no deduplication; same-node peers over NVLink when allowed, others over RDMA; the home GPU itself
  costs nothing.

Every model gives (see :mod:`solvers.comm.base`):

- ``token_messages(dest [t, k], home [t], topology, **options) -> (nvlink [G, G], rdma [G, G])``: the dispatch
  messages src -> dst of one layer's tokens, counted on the tokens (the exact evaluator);
- ``counts_messages(gpu_load [..., G], distinct [..., G], node_distinct [..., Nn], topology, **options)``: the
  expected messages sent and received per GPU and link class with homes spread evenly (the counts model the
  planner optimises);
- ``message_bytes(cost, phase)``: bytes of one dispatch or combine message;
- ``OVERLAP``: whether the NVLink and RDMA parts run concurrently (the phase takes the longer) or one after the
  other (the sum).
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from types import ModuleType

from solvers.base import SolverInputError

__all__ = ["get", "names", "DEFAULT"]

DEFAULT = "nccl"


@lru_cache(maxsize=1)
def _models() -> dict[str, ModuleType]:
    import solvers.comm as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"solvers.comm.{info.name}")
        name = getattr(module, "NAME", None)
        if name:
            found[name] = module
    return found


def names() -> list[str]:
    """The communication models, sorted."""
    return sorted(_models())


def get(name: str) -> ModuleType:
    """The model module called ``name``; :class:`solvers.SolverInputError` names the known ones."""
    try:
        return _models()[name]
    except KeyError:
        raise SolverInputError(f"unknown communication model {name!r}; choose one of: {', '.join(names())}") from None
