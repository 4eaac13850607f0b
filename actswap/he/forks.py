"""Processes that share batch mode's operations, and the shared memory they write
into (:mod:`.batch_rns`).

SEAL's binding holds the GIL, so batch mode shares each operation's elements out
among processes (:class:`Workers`): this one and children forked at the first
operation that shares, which stay until the run ends and take their share of
every operation. An operation is a closure; it goes to a child pickled by value
(cloudpickle), except what the child has already: arrays in the :class:`Arena`
go as their place in it, and the backend the closure belongs to as the child's
own copy of it (forked with its SEAL objects, which do not pickle). Children
write their results into the arena, which this process then reads.

Why children that stay, not one fork per operation: a page of shared memory
enters a process's page tables on first touch, and a fresh child touches every
page again. Measured on the fixture (10,000 MNIST images, 2 processes): a fork
per operation took 1.1 M page faults and 2.6 s of system time in the children per
run, children that stay 0.5 M, nearly all in the first batch; whole runs,
interleaved on a shared machine whose speed drifts, took 23.0, 27.2 and 25.4 s
against 21.6, 22.5 and 24.9 s.

Memory is reused, not reallocated (:class:`Arena`): on this kind of machine a
fresh page costs more than the arithmetic done on it (measured: writing 616 MB
of new memory takes 0.4-0.9 s of system time, a batch's input). Every batch
allocates the same sizes in the same order, so after the first batch the arena
holds what one batch needs at its peak, every process has its pages mapped,
and nothing is faulted in again. The pages stay mapped in every process that
touched them (they count in its RSS): unmapping them from this process would
only fault them in again at the next batch.
"""

from __future__ import annotations

import ctypes
import io
import mmap
import os
import pickle
import resource
import struct
import sys
import traceback
import weakref
from collections.abc import Callable
from typing import Any

import cloudpickle
import numpy as np


# Arrays start on page boundaries: processes writing neighbouring arrays never share a page.
PAGE = 4096

# A region reserves this much address space (64 GiB) and nothing else: pages are
# allocated when first touched (MAP_NORESERVE: no commit charge for the rest).
RESERVE = 1 << 36
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python 3.11's mmap lacks it


class Arena:
    """Arrays in anonymous shared memory, reused. An array is cut from a chunk, a
    chunk from a region (a reserved stretch of shared address space). A chunk is
    free again when the last array or view on it is gone (its reference count
    falls back to the arena's own). A request goes to the chunk with the least
    room that holds it, else to a new chunk at the end of the last region, else
    to a new region.

    Invariants: no byte some live array uses is ever handed out again; only the
    process that made the arena allocates from it (a forked child's copy of the
    bookkeeping would hand out the same bytes twice); an array is visible at the
    same place to every process forked after its region was made (:attr:`regions`
    counts them, so a process forked earlier can be replaced)."""

    def __init__(self, reserve: int = RESERVE) -> None:
        self.reserve = reserve
        self._pid = os.getpid()
        self._regions: list[list[Any]] = []  # [mapping, its address, bytes cut from it]
        self._chunks: list[Any] = []  # ctypes arrays over a region: their count tells if used
        self._used: list[int] = []
        self._free_refs = _refs_in_loop([(ctypes.c_char * 8)()])  # what a free chunk's count reads as

    def empty(self, shape: tuple[int, ...], dtype: Any = np.uint64) -> np.ndarray:
        """An array of ``shape`` (contents undefined) in shared memory."""
        if os.getpid() != self._pid:
            raise AssertionError("a forked process allocated from its copy of the arena")
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        size = -(-max(8, count * dtype.itemsize) // PAGE) * PAGE
        best = None
        for i, chunk in enumerate(self._chunks):
            if self._used[i] and sys.getrefcount(chunk) <= self._free_refs:
                self._used[i] = 0
            room = len(chunk) - self._used[i]
            if room >= size and (best is None or room < len(self._chunks[best]) - self._used[best]):
                best = i
        if best is None:
            if not self._regions or self._regions[-1][2] + size > len(self._regions[-1][0]):
                self._new_region(size)
            region = self._regions[-1]
            self._chunks.append((ctypes.c_char * size).from_buffer(region[0], region[2]))
            region[2] += size
            self._used.append(0)
            best = len(self._chunks) - 1
        offset = self._used[best]
        self._used[best] += size
        return np.frombuffer(self._chunks[best], dtype, count=count, offset=offset).reshape(shape)

    def _new_region(self, size: int) -> None:
        want = max(size, self.reserve)
        while True:
            try:
                m = mmap.mmap(-1, want, flags=mmap.MAP_SHARED | MAP_NORESERVE)
                break
            except OSError:  # strict overcommit charges the whole reservation: ask for less
                if want == size:
                    raise
                want = max(size, want // 4)
        self._regions.append([m, ctypes.addressof(ctypes.c_char.from_buffer(m)), 0])

    @property
    def regions(self) -> int:
        """How many regions there are (a process forked before the last one cannot see it)."""
        return len(self._regions)

    @property
    def nbytes(self) -> int:
        """The shared memory the arena holds (its chunks' sizes)."""
        return sum(region[2] for region in self._regions)

    def locate(self, a: np.ndarray) -> tuple[Any, ...] | None:
        """Where ``a`` (an array or a view) lies in the arena, as :meth:`view` takes
        it; None if it is not in the arena."""
        address = a.__array_interface__["data"][0]
        for r, (_, start, used) in enumerate(self._regions):
            if start <= address < start + used:
                return (r, address - start, a.shape, a.strides, a.dtype.str)
        return None

    def view(self, region: int, offset: int, shape: tuple[int, ...], strides: tuple[int, ...],
             dtype: str) -> np.ndarray:
        """The array :meth:`locate` described, in this process's mapping of the region."""
        return np.ndarray(shape, np.dtype(dtype), buffer=self._regions[region][0], offset=offset,
                          strides=strides)


def _refs_in_loop(chunks: list[Any]) -> int:
    """The reference count a chunk held only by ``chunks`` shows inside
    :meth:`Arena.empty`'s loop (the same loop: the list, enumerate's tuple, the
    loop variable, the call's argument)."""
    for _, chunk in enumerate(chunks):
        return sys.getrefcount(chunk)
    raise AssertionError("no chunk")


class Workers:
    """``processes`` processes sharing operations: this one and ``processes - 1``
    children, forked at the first operation that shares and kept until
    :meth:`close` (see the module docstring). ``owner`` is the object operations
    belong to (the backend): it goes to a child as the child's own copy.

    Invariants: a child runs one share at a time and only what it is sent, on one
    BLAS thread, and never shares out work of its own; it writes only into arena
    arrays it is given; a child forked before the arena's
    last region was made is replaced before the next operation; a child that
    failed is not sent another operation (all are replaced)."""

    def __init__(self, processes: int, arena: Arena, owner: Any) -> None:
        self.processes, self.arena = max(1, processes), arena
        # Weak: the owner holds these workers, and a cycle would keep the arena's
        # memory until the garbage collector found it.
        self._owner = weakref.ref(owner) if owner is not None else lambda: None
        self._pid = os.getpid()
        self._children: list[tuple[int, Any]] = []  # (pid, this end of its pipe)
        self._regions = 0  # the arena's regions when the children were forked
        self._peak = 0  # the largest peak RSS of children already gone

    def parallel(self, n: int, work: Callable[[int, int, int], None], processes: int | None = None) -> None:
        """``work(lo, hi, slot)`` over [0, n) in ``processes`` (default all) contiguous
        shares (:func:`shares`): slot 0 here, slot k in child k, which must write its
        results into arena arrays. Raises ``RuntimeError`` with the first failure's
        last line if a child failed (its traceback goes to stderr)."""
        if os.getpid() != self._pid:
            raise AssertionError("a forked process tried to share out an operation of its own")
        count = max(1, min(processes or self.processes, self.processes, n))
        bounds = shares(n, count)
        if count == 1:
            work(0, n, 0)
            return
        if self._children and self._regions != self.arena.regions:
            self.close()  # they cannot see the new region
        if not self._children:
            self._start()
        payload = self._dumps(work)
        failed: list[str] = []
        asked = []
        for slot in range(1, count):
            conn = self._children[slot - 1][1]
            try:
                conn.send_bytes(payload)
                conn.send_bytes(struct.pack("3q", bounds[slot], bounds[slot + 1], slot))
                asked.append(conn)
            except OSError:
                failed.append(f"process {slot} is gone")
        try:
            work(int(bounds[0]), int(bounds[1]), 0)
        finally:
            for conn in asked:  # every share finished before anything reads the results
                try:
                    reply = conn.recv_bytes()
                except (EOFError, OSError):
                    reply = b"a process ended without answering"
                if reply:
                    failed.append(reply.decode(errors="replace"))
        if failed:
            self.close()
            raise RuntimeError(f"{len(failed)} of the {count} processes sharing a batch operation "
                               f"failed: {failed[0]}")

    @property
    def owner(self) -> Any:
        return self._owner()

    def _dumps(self, work: Any) -> bytes:
        f = io.BytesIO()
        _Pickler(f, self.arena, self.owner).dump(work)
        return f.getvalue()

    def _start(self) -> None:
        from multiprocessing.connection import Pipe

        self._regions = self.arena.regions
        for slot in range(1, self.processes):
            here, there = Pipe()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                here.close()
                for _, other in self._children:  # so that only this process holds its siblings' pipes
                    other.close()
                self._serve(there)
            there.close()
            self._children.append((pid, here))

    def _serve(self, conn: Any) -> None:
        """A child's loop: operations until this process closes the pipe. Never returns."""
        code = 0
        try:
            with single_threaded_blas(True):  # a child always shares the cores with the others
                while True:
                    try:
                        payload = conn.recv_bytes()
                        lo, hi, slot = struct.unpack("3q", conn.recv_bytes())
                    except EOFError:
                        break
                    try:
                        _Unpickler(io.BytesIO(payload), self.arena, self.owner).load()(lo, hi, slot)
                        reply = b""
                    except BaseException as e:
                        traceback.print_exc()
                        reply = (traceback.format_exception_only(e)[-1].strip() or type(e).__name__).encode()
                    conn.send_bytes(reply)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)  # not Python's exit handlers: they belong to the parent

    def peak_rss(self) -> int:
        """The largest peak RSS (bytes) any child has reached (VmHWM); 0 without children."""
        live = [proc_bytes(f"/proc/{pid}/status", "VmHWM") or 0 for pid, _ in self._children]
        return max([self._peak] + live)

    def close(self) -> None:
        """The children told to leave (their pipes closed) and waited for."""
        if os.getpid() != self._pid or not self._children:
            return
        self._peak = self.peak_rss()
        for _, conn in self._children:
            conn.close()
        for pid, _ in self._children:
            os.waitpid(pid, 0)
        self._children = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the children see their pipes close anyway
            pass


class _Pickler(cloudpickle.Pickler):
    """Pickles an operation by value, but arena arrays by their place and the owner by name."""

    def __init__(self, f: Any, arena: Arena, owner: Any) -> None:
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.arena, self.owner = arena, owner

    def persistent_id(self, obj: Any) -> Any:
        if obj is self.owner:
            return "owner"
        if isinstance(obj, np.ndarray):
            return self.arena.locate(obj)
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, f: Any, arena: Arena, owner: Any) -> None:
        super().__init__(f)
        self.arena, self.owner = arena, owner

    def persistent_load(self, pid: Any) -> Any:
        return self.owner if pid == "owner" else self.arena.view(*pid)


def shares(n: int, processes: int) -> np.ndarray:
    """The bounds of :meth:`Workers.parallel`'s shares: slot k gets [bounds[k], bounds[k + 1])."""
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
    """The largest peak RSS (bytes) of any forked child of this process that has
    been waited for."""
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
