"""Best-effort control of the BLAS thread pool for solvers that do many small matrix products.

Multi-threaded OpenBLAS on small matrices spends its time synchronising threads; on a busy machine a
``[8192, 16] x [16, 64]`` product can be 20x slower with the default pool than with one thread. The joint planner
runs under :func:`blas_threads` so its many small products use ``Options.threads`` (default 1) threads.
Environment variables (``OPENBLAS_NUM_THREADS``) still win when set before numpy is imported. Does nothing where
the BLAS library cannot be found (other BLAS builds, non-Linux systems).
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from functools import lru_cache

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
            "openblas_set_num_threads")
_GETTERS = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads", "openblas_get_num_threads64_",
            "openblas_get_num_threads")


@lru_cache(maxsize=1)
def _libraries() -> tuple:
    found = []
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and line.split()[-1].startswith("/")}
    except OSError:
        return ()
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        setter = next((getattr(lib, n) for n in _SETTERS if hasattr(lib, n)), None)
        getter = next((getattr(lib, n) for n in _GETTERS if hasattr(lib, n)), None)
        if setter is not None and getter is not None:
            getter.restype = ctypes.c_int
            found.append((setter, getter))
    return tuple(found)


@contextmanager
def blas_threads(n: int | None):
    """Run the block with ``n`` BLAS threads (None: leave as is), restoring the previous count afterwards."""
    if n is None or n < 1:
        yield
        return
    libs = _libraries()
    before = []
    for setter, getter in libs:
        try:
            before.append(int(getter()))
            setter(int(n))
        except Exception:  # pragma: no cover - foreign BLAS builds
            before.append(None)
    try:
        yield
    finally:
        for (setter, _), old in zip(libs, before):
            if old:
                try:
                    setter(old)
                except Exception:  # pragma: no cover
                    pass
