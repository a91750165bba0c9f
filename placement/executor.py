"""Where moeplace's parallel work runs: one small interface, three backends.

An executor maps a module-level function over tasks::

    results = executor.map(fn, tasks, shared=obj)   # == [fn(obj, task) for task in tasks], in task order

``shared`` (read-only arrays: a planner's problem data, a trace's statistics) reaches each worker once per call;
tasks are small (layer indices, file paths, seeds). The caller merges the results in task order and every task
carries its own seed, so a result never depends on the backend or the number of workers
(``tests/test_parallel.py`` checks 1 worker, 2 workers and a Ray cluster give the same statistics and plans).

- :class:`InProcess` (``--workers 1``): the tasks one after another in this process; the reference.
- :class:`LocalProcesses` (``--workers N``, default: the machine's cores): a pool of worker processes started by a
  fork server (cheap starts, no inherited threads); ``shared`` goes through a temporary file that each worker
  loads once. Ctrl-C stops the pool and its processes.
- :class:`RayExecutor` (``--ray-address auto|local|HOST:PORT|ray://HOST:PORT``): tasks on a Ray cluster, one CPU
  each; ``shared`` is put in Ray's object store once (numpy arrays arrive zero-copy and read-only). Ray is
  imported only here (``pip install "moeplace[ray]"``); the cluster's Python must have moeplace installed.

Solvers and trace readers do not import this module: the planner takes an executor through
``solvers.Options.executor`` (any object with this ``map``), so the layering of the packages holds.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["InProcess", "LocalProcesses", "RayExecutor", "ExecutorError", "make_executor", "default_workers"]


class ExecutorError(ValueError):
    """The requested parallel backend cannot be used (one sentence: what is wrong and how to fix it)."""


def default_workers() -> int:
    """The cores this process may use (``os.sched_getaffinity`` where there is one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class InProcess:
    """Run every task here, in order (``--workers 1``)."""

    workers = 1
    name = "in-process"

    def map(self, fn: Callable[[Any, Any], Any], tasks: Sequence, shared: Any = None) -> list:
        return [fn(shared, t) for t in tasks]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- local processes --------------------------------------------------------------------------------------------

_LOADED: dict[str, Any] = {}  # in a worker: the shared object of the current call, by file path


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: the parent handles it and stops the pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _local_call(fn: Callable, path: str | None, task: Any) -> Any:
    shared = None
    if path is not None:
        if path not in _LOADED:
            _LOADED.clear()  # one call's object at a time
            with open(path, "rb") as f:
                _LOADED[path] = pickle.load(f)
        shared = _LOADED[path]
    return fn(shared, task)


class LocalProcesses:
    """A pool of ``workers`` processes on this machine, kept for the executor's life (use it as a context manager
    or call :meth:`close`)."""

    name = "local processes"

    def __init__(self, workers: int):
        if workers < 1:
            raise ExecutorError(f"--workers must be at least 1, got {workers}")
        self.workers = int(workers)
        self._pool = None
        self._tmp = None

    def _ensure(self):
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
            ctx = mp.get_context(method)
            if method == "forkserver":
                ctx.set_forkserver_preload(["numpy", "scipy.optimize", "solvers", "placement.executor"])
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=_worker_init)
            self._tmp = tempfile.TemporaryDirectory(prefix="moeplace-shared-")
        return self._pool

    def map(self, fn: Callable[[Any, Any], Any], tasks: Sequence, shared: Any = None) -> list:
        tasks = list(tasks)
        if not tasks:
            return []
        pool = self._ensure()
        path = None
        if shared is not None:
            fd, path = tempfile.mkstemp(suffix=".pkl", dir=self._tmp.name)
            with os.fdopen(fd, "wb") as f:
                pickle.dump(shared, f, protocol=pickle.HIGHEST_PROTOCOL)
        futures = [pool.submit(_local_call, fn, path, t) for t in tasks]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            self._kill()
            raise
        finally:
            if path is not None:
                Path(path).unlink(missing_ok=True)

    def _kill(self) -> None:
        """Stop the pool now, its running tasks included (Ctrl-C, an error in a task)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        procs = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None:
            self._kill()
        self.close()


# --- Ray ----------------------------------------------------------------------------------------------------------


def _ray_call(fn: Callable, shared: Any, task: Any) -> Any:
    return fn(shared, task)


def _probe(address: str, timeout: float = 3.0) -> None:
    """Fail within ``timeout`` seconds when nothing listens at ``HOST:PORT`` (``ray.init`` would wait much longer)."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(f"--ray-address {address!r} is not auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = (exc.strerror or str(exc) or type(exc).__name__).rstrip(".")
        raise ExecutorError(f"cannot reach a Ray cluster at {address} ({reason}); start one there (ray start --head) "
                            f"or use --ray-address local for a private one on this machine") from None
    if "://" in address:  # Ray Client: the port answering is all we check
        return
    try:  # something answers: ask it for its cluster id as Ray's own client does (one try, about a second)
        from ray._raylet import GcsClient
    except ImportError:  # another Ray version: ray.init will tell
        return
    saved = os.dup(2)  # its C++ client logs the failure on stderr: the one sentence below says it
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            GcsClient(address=target, cluster_id=None)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExecutorError(f"{address} answers but is not a Ray cluster's head ({first}); give the address that "
                            f"'ray start --head' printed, or use --ray-address local") from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class RayExecutor:
    """Tasks on a Ray cluster: an existing one (``auto`` reads ``RAY_ADDRESS``, ``HOST:PORT``, ``ray://HOST:PORT``)
    or a private one on this machine (``local``, stopped by :meth:`close`)."""

    name = "ray"

    def __init__(self, address: str, num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise ExecutorError('--ray-address needs Ray; install it with pip install "moeplace[ray]"') from None
        self._ray = ray
        address = str(address).strip()
        if address == "auto":
            address = os.environ.get("RAY_ADDRESS", "").strip() or "auto"
            if address == "auto":
                raise ExecutorError("--ray-address auto found no RAY_ADDRESS in the environment; set it (e.g. "
                                    "RAY_ADDRESS=head:6379) or give the address, or use --ray-address local")
        if address != "local":
            _probe(address)
        self.address = address
        self._owns = not ray.is_initialized()
        if self._owns:
            kwargs: dict = {"log_to_driver": False, "configure_logging": False}
            if address == "local":
                kwargs.update(include_dashboard=False, num_cpus=num_cpus or default_workers())
            try:
                ray.init(address=address, **kwargs)
            except Exception as exc:  # ConnectionError, RuntimeError, version mismatch ...
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ExecutorError(f"could not join the Ray cluster at {address}: {first}") from None
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote = ray.remote(num_cpus=1, max_retries=0)(_ray_call)

    def map(self, fn: Callable[[Any, Any], Any], tasks: Sequence, shared: Any = None) -> list:
        tasks = list(tasks)
        if not tasks:
            return []
        ray = self._ray
        ref = ray.put(shared)
        refs = [self._remote.remote(fn, ref, t) for t in tasks]
        try:
            return ray.get(refs)
        except BaseException:
            for r in refs:
                ray.cancel(r, force=True)
            raise

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_executor(workers: int | None = None, ray_address: str | None = None):
    """The executor for ``--workers`` / ``--ray-address``: Ray when an address is given, else local processes
    (``workers`` default: the machine's cores), in this process for one worker."""
    if ray_address:  # Ray schedules on the cluster's CPUs; --workers is for local processes
        return RayExecutor(ray_address)
    n = default_workers() if workers is None else int(workers)
    if n < 1:
        raise ExecutorError(f"--workers must be at least 1, got {n}")
    return InProcess() if n == 1 else LocalProcesses(n)
