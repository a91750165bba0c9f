"""Routing traces: formats, validation, I/O, bundled real datasets (and, lazily, collectors and importers).

This package depends on numpy only; torch/transformers are imported inside collectors and ``.pt`` importers.
"""

from traces.format import (
    LoadProfile,
    RoutingTrace,
    TraceError,
    atomic_write_bytes,
    iter_trace_chunks,
    layer_counts,
    load,
    load_trace,
    save,
)

__all__ = ["LoadProfile", "RoutingTrace", "TraceError", "atomic_write_bytes", "iter_trace_chunks", "layer_counts",
           "load", "load_trace", "save"]
