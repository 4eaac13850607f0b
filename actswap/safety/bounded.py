"""Running a parser of untrusted bytes in a child process, bounded in time and memory.

Some containers are parsed by C libraries that a hostile or corrupt file can
send into an endless loop or a crash: HDF5 loops forever on a corrupt global
heap (seen by the fuzzer, issue 29: reading one attribute of a Keras 2 ``.h5``
with flipped bytes never returned), and a segmentation fault would take
actswap down with no message. A signal cannot interrupt C code, so such reads
run in a forked child: :func:`bounded` returns what the child returned, or
raises :class:`ReaderFailed` saying why it did not (too slow, out of memory,
killed by a signal), and the caller names the file and refuses it.

Invariants: the child only computes and sends its result back (pickled,
through a pipe; nothing of the file is unpickled: the child builds the result
from plain values); it never writes a file and leaves with ``os._exit``, so no
exit handler of this process runs twice; the parent waits at most ``seconds``
and always reaps the child. Without ``os.fork`` (Windows) the function runs
in this process, unbounded.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Generous for a real file (reading a model file's metadata takes well under a
# second, even for large models); the fuzzer lowers them.
SECONDS = 60.0
MEMORY_BYTES = 4 * 1024**3  # address space the child may add to what it inherits


class ReaderFailed(Exception):
    """The child did not return a result: ``reason`` says why, in words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChildError(Exception):
    """The function raised in the child: its type name, message and traceback."""

    def __init__(self, kind: str, message: str, trace: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind, self.message, self.trace = kind, message, trace


def bounded(fn: Callable[..., T], *args: Any, seconds: float | None = None, memory: int | None = None) -> T:
    """``fn(*args)`` computed in a forked child within ``seconds`` (default
    :data:`SECONDS`) and ``memory`` more bytes of address space (default
    :data:`MEMORY_BYTES`). Raises :class:`ChildError` if ``fn`` raised and
    :class:`ReaderFailed` if the child ran out of time or memory or died."""
    if not hasattr(os, "fork"):
        return fn(*args)
    seconds = SECONDS if seconds is None else seconds
    memory = MEMORY_BYTES if memory is None else memory
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, send, leave
        os.close(read_end)
        code = 0
        try:
            _limit_memory(memory)
            try:
                result: Any = ("ok", fn(*args))
            except MemoryError:
                result = ("memory", None)
            except BaseException as e:  # noqa: BLE001 - sent to the parent, which decides
                result = ("raised", (type(e).__name__, str(e), traceback.format_exc()))
            data = pickle.dumps(result)
            view = memoryview(data)
            while view:
                view = view[os.write(write_end, view):]
        except BaseException:  # noqa: BLE001 - e.g. the result did not pickle
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        data, finished = _read_until(read_end, time.monotonic() + seconds)
    finally:
        os.close(read_end)
        if not finished:
            _kill(pid)
        _, status = os.waitpid(pid, 0)
    if not finished:
        raise ReaderFailed(f"reading it did not finish within {seconds:g} s")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        raise ReaderFailed(f"the reader was killed by signal {sig} ({_signal_name(sig)})")
    if not data:
        raise ReaderFailed(f"the reader exited with status {os.waitstatus_to_exitcode(status)} and no result")
    kind, value = pickle.loads(data)  # written by our own child, above
    if kind == "memory":
        raise ReaderFailed(f"reading it needed more than {memory / 1024**3:g} GB of memory")
    if kind == "raised":
        raise ChildError(*value)
    return value


def _read_until(fd: int, deadline: float) -> tuple[bytes, bool]:
    """Everything written to ``fd`` until EOF, and whether EOF came before ``deadline``."""
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), False
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _limit_memory(extra: int) -> None:
    """Cap the child's address space at what it inherited plus ``extra`` bytes."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = current + extra
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError):
        pass  # no /proc or no limits here: time still bounds the child


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return "unknown"
