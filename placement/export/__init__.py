"""Exporters: a plan in the formats serving stacks load at startup. One module per stack, each with
``FORMAT`` (the --format name), ``SUFFIX`` and ``export(plan) -> (text, hints)``: the file content and the
lines telling the user how to start the server with it."""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache


class ExportError(ValueError):
    """The plan cannot be represented in the requested format (one sentence with the reason)."""


@lru_cache(maxsize=1)
def exporters() -> dict:
    import placement.export as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"placement.export.{info.name}")
        if hasattr(mod, "FORMAT") and hasattr(mod, "export"):
            found[mod.FORMAT] = mod
    return found
