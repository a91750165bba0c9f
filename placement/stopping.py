"""Stopping a command cleanly: SIGTERM is handled like Ctrl-C (a :class:`KeyboardInterrupt` at the next Python
instruction, so the command's files are rolled back), and on either, the processes the command started (a HiGHS or
CBC back end, bench ranks) are killed, so none outlives it. CP-SAT, which runs in this process, is stopped by
:mod:`solvers.mip` itself."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

__all__ = ["Terminated", "stoppable", "descendants", "kill"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated


@contextlib.contextmanager
def stoppable():
    """For one command: SIGTERM stops it like Ctrl-C (an exception at the next Python instruction, so files are
    rolled back), and on either, the processes it started (solver back ends, bench ranks) are killed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = set(descendants())
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except KeyboardInterrupt:
        kill(pid for pid in descendants() if pid not in before)
        raise
    finally:
        signal.signal(signal.SIGTERM, old)


def descendants(root: int | None = None) -> list[int]:
    """Process ids of every descendant of ``root`` (default: this process), from /proc or ``ps``."""
    import subprocess

    root = os.getpid() if root is None else root
    parent: dict[int, int] = {}
    if os.path.isdir("/proc"):
        for name in os.listdir("/proc"):
            if name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{name}/stat", "rb") as f:
                        parent[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
    else:
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
            ps = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True, timeout=5)
            for line in ps.stdout.splitlines():
                pid, ppid = (int(x) for x in line.split())
                parent[pid] = ppid
    found, frontier = [], [root]
    while frontier:
        kids = [pid for pid, ppid in parent.items() if ppid in frontier and pid not in found]
        found += kids
        frontier = kids
    return found


def kill(pids, grace: float = 2.0) -> None:
    """SIGTERM ``pids``, then SIGKILL those still running after ``grace`` seconds."""
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while pids and time.monotonic() < end:
        for pid in list(pids):
            with contextlib.suppress(ChildProcessError, OSError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    pids.remove(pid)
                    continue
            try:
                os.kill(pid, 0)
            except OSError:
                pids.remove(pid)
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
