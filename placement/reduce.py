"""Trace reduction in parallel: the statistics of many shard files, one task per shard, merged exactly.

Each task streams one shard in chunks (:func:`traces.iter_trace_chunks`) and returns its
:class:`placement.affinity.AffinityStats` (counts in float64: integers below 2**53, so sums are exact in any order);
the parts are merged in the order of the shard list, which also fixes the order of the gate-weighted sums. Memory
is bounded by the statistics plus one chunk per worker: no task holds a whole trace. The result is the same with
``--workers 1``, any other number and a Ray cluster (``tests/test_parallel.py``); a task receives a file path, so
on a Ray cluster every node must see the files at that path (a shared file system).

The token-shuffled baseline of the affinity summary is shuffled within each chunk, seeded by the shard's position
in the list and the chunk's in the shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from placement.affinity import AffinityStats
from traces import iter_trace_chunks
from traces.shards import ShardInfo, check_same_model, expand, shard_info

__all__ = ["ShardTask", "shard_stats", "reduce_stats", "shard_infos"]

CHUNK_TOKENS = 65536


@dataclass(frozen=True)
class ShardTask:
    """One shard to reduce: its path, its place in the list (seeds its shuffled baseline), the chunk size and
    whether to compute the affinity summary's baselines."""

    path: str
    index: int
    chunk_tokens: int = CHUNK_TOKENS
    baselines: bool = True
    seed: int = 0


def shard_stats(_shared, task: ShardTask) -> AffinityStats:
    """Statistics of one shard, streamed chunk by chunk (runs in any worker)."""
    total = None
    for i, chunk in enumerate(iter_trace_chunks(task.path, task.chunk_tokens)):
        part = AffinityStats.from_trace(chunk, seed=_seed((task.seed, task.index, i)), chunk_tokens=task.chunk_tokens,
                                        baselines=task.baselines)
        total = part if total is None else total + part
    return total


def _seed(parts: tuple[int, int, int]) -> int:
    """A 32-bit seed from (run seed, shard, chunk), the same in every process."""
    a, b, c = parts
    return (a * 1_000_003 + b * 10_007 + c) % (2 ** 32)


def shard_infos(args: list[str]) -> list[ShardInfo]:
    """The shards behind trace arguments (files, folders, globs), checked to be of one model."""
    infos = [shard_info(p) for p in expand(args)]
    check_same_model(infos)
    return infos


def reduce_stats(args: list[str] | list[Path], executor=None, *, chunk_tokens: int = CHUNK_TOKENS,
                 baselines: bool = True, seed: int = 0, batch: int | None = None) -> AffinityStats:
    """The merged statistics of every shard behind ``args``, one task per shard on ``executor`` (None: here).

    Tasks go out ``batch`` at a time (default: twice the executor's workers) and each batch's parts are merged
    before the next is sent, so the driver holds at most the total and one batch of parts, however many shards
    there are. The merge order is the shard list's either way."""
    infos = shard_infos([str(a) for a in args])
    tasks = [ShardTask(str(info.path), i, chunk_tokens, baselines, seed) for i, info in enumerate(infos)]
    total = None
    if executor is None:
        for t in tasks:
            part = shard_stats(None, t)
            total = part if total is None else total + part
        return total
    n = batch or 2 * max(1, int(getattr(executor, "workers", 1)))
    for i in range(0, len(tasks), n):
        for part in executor.map(shard_stats, tasks[i:i + n]):
            total = part if total is None else total + part
    return total
