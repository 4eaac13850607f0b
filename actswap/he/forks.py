"""Forked processes and the shared memory they write into (batch mode, :mod:`.batch_rns`).

SEAL's binding holds the GIL, so batch mode shares each operation's elements out
among forked processes (:func:`parallel`); they write their results into
anonymous shared memory, which this process then reads.

Memory is reused, not reallocated (:class:`Arena`): on this kind of machine a
fresh page costs more than the arithmetic done on it (measured: writing 616 MB
of new memory takes 0.4-0.9 s of system time, a batch's input), while a page
already in a shared mapping costs a forked process only a cheap mapping on
first touch. Every batch allocates the same sizes in the same order, so after
the first batch the arena holds what one batch needs at its peak and nothing
is faulted in again.
"""

from __future__ import annotations

import mmap
import os
import resource
import sys
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np


# Arrays start on page boundaries: processes writing neighbouring arrays never share a page.
PAGE = 4096


class Arena:
    """Arrays in anonymous shared memory, reused. Arrays are cut one after another
    from mappings; a mapping is free again when the last array or view on it is
    gone (its reference count falls back to the arena's own), and then its pages
    leave this process's page tables (``MADV_DONTNEED``: on a shared mapping the
    data stays in memory, to be mapped again cheaply). A request goes to the
    mapping with the least room that holds it, else to a new one. Invariant: no
    byte some live array uses is ever handed out again."""

    def __init__(self) -> None:
        self._maps: list[mmap.mmap] = [mmap.mmap(-1, 8)]  # held by the list alone, as a free one is
        self._free_refs = _refs_in_loop(self._maps)  # what a free mapping's count reads as
        self._maps.clear()
        self._used: list[int] = []

    def empty(self, shape: tuple[int, ...], dtype: Any = np.uint64) -> np.ndarray:
        """An array of ``shape`` (contents undefined) in shared memory."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        size = -(-max(8, count * dtype.itemsize) // PAGE) * PAGE
        best = None
        for i, m in enumerate(self._maps):
            if self._used[i] and sys.getrefcount(m) <= self._free_refs:
                m.madvise(mmap.MADV_DONTNEED)
                self._used[i] = 0
            room = len(m) - self._used[i]
            if room >= size and (best is None or room < len(self._maps[best]) - self._used[best]):
                best = i
        if best is None:
            self._maps.append(mmap.mmap(-1, size))
            self._used.append(0)
            best = len(self._maps) - 1
        offset = self._used[best]
        self._used[best] += size
        return np.frombuffer(self._maps[best], dtype, count=count, offset=offset).reshape(shape)

    @property
    def nbytes(self) -> int:
        """The shared memory the arena holds (its mappings' sizes)."""
        return sum(len(m) for m in self._maps)


def _refs_in_loop(maps: list[mmap.mmap]) -> int:
    """The reference count a mapping held only by ``maps`` shows inside
    :meth:`Arena.empty`'s loop (the same loop: the list, enumerate's tuple, the
    loop variable, the call's argument)."""
    for _, m in enumerate(maps):
        return sys.getrefcount(m)
    raise AssertionError("no mapping")


def parallel(n: int, work: Callable[[int, int, int], None], processes: int) -> None:
    """``work(lo, hi, slot)`` over [0, n) in ``processes`` contiguous shares (slot 0
    here, the others in forked children, which must write their results into
    :class:`Arena` arrays). Raises ``RuntimeError`` if a child failed."""
    processes = max(1, min(processes, n))
    bounds = shares(n, processes)
    if processes == 1:
        work(0, n, 0)
        return
    children = []
    for slot in range(1, processes):
        pid = os.fork()
        if pid == 0:  # the child: its share, then leave without Python's exit handlers
            code = 1
            try:
                work(int(bounds[slot]), int(bounds[slot + 1]), slot)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        children.append(pid)
    try:
        work(int(bounds[0]), int(bounds[1]), 0)
    finally:
        failed = sum(os.waitpid(pid, 0)[1] != 0 for pid in children)
    if failed:
        raise RuntimeError(f"{failed} of the {processes} processes sharing a batch operation failed")


def shares(n: int, processes: int) -> np.ndarray:
    """The bounds of :func:`parallel`'s shares: slot k gets [bounds[k], bounds[k + 1])."""
    return np.linspace(0, n, max(1, min(processes, n)) + 1).astype(int)


def proc_bytes(path: str, key: str) -> int | None:
    """A "key: N kB" figure of a Linux /proc file, in bytes; None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def own_peak_rss() -> int:
    """This process's peak RSS in bytes since it started (VmHWM: unlike ru_maxrss,
    not carried over from the process that started it)."""
    peak = proc_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def children_peak_rss() -> int:
    """The largest peak RSS (bytes) of any finished forked child of this process."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


class single_threaded_blas:
    """BLAS on one thread while forked processes share a product (each is one core's
    work; more threads than cores would only contend). A no-op without
    threadpoolctl."""

    def __init__(self, active: bool) -> None:
        self.active, self.limits = active, None

    def __enter__(self) -> None:
        if self.active:
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:
                return
            self.limits = threadpool_limits(1, user_api="blas")

    def __exit__(self, *exc: Any) -> None:
        if self.limits is not None:
            self.limits.restore_original_limits()
