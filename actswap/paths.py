"""Output paths: checks done before any work (and before TensorFlow is
imported), and the temporary files atomic writes go through.

The ``check_*`` functions return the destination as a Path or raise UserError
(exit 2) naming what was received and what to do; none of them writes
anything.

Temporary files and directories are siblings of their destination named
``.<dest name>.actswap-<pid>-<random>.tmp...``: hidden, clearly actswap's, and
carrying the writer's process id, so that a run killed mid-write (SIGKILL
leaves no chance to clean up) is cleaned up by the next write to the same
destination (:func:`remove_stale_temps`) while a concurrent writer's files are
left alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import DiskSpaceError, OutOfMemoryError, UserError, first_line

TEMP_TAG = "actswap"
# Headroom above the estimated output size: archive headers, metadata, and
# what the filesystem itself needs.
SPACE_MARGIN = 16 * 1024 * 1024


def _common(dest: Path, overwrite: bool) -> None:
    if not dest.parent.is_dir():
        raise UserError(f"output folder '{dest.parent}' does not exist; create it first")
    if (dest.exists() or dest.is_symlink()) and not overwrite:
        raise UserError(f"output '{dest}' already exists; pass --force to overwrite it")


def _check_file(path: str | os.PathLike[str], suffix: str, what: str, overwrite: bool) -> Path:
    dest = Path(path)
    if dest.suffix != suffix:
        raise UserError(f"output '{dest}' must end in {suffix} ({what}); try -o {dest.with_suffix(suffix)}")
    if dest.is_dir():
        raise UserError(f"output '{dest}' is a directory; give a file name ending in {suffix}")
    _common(dest, overwrite)
    return dest


def check_output_path(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """A ``.keras`` file destination."""
    return _check_file(path, ".keras", "Keras 3 writes only .keras archives", overwrite)


def check_output_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """A SavedModel directory destination."""
    dest = Path(path)
    if dest.suffix in (".keras", ".h5", ".pb"):
        raise UserError(
            f"output '{dest}' names a file, but a SavedModel converts to a SavedModel directory; "
            "give a directory path"
        )
    if dest.exists() and not dest.is_dir():
        raise UserError(f"output '{dest}' exists and is not a directory")
    _common(dest, overwrite)
    return dest


def check_output_pb(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """A frozen GraphDef (``.pb``) destination."""
    return _check_file(path, ".pb", "a frozen graph", overwrite)


def check_output_h5(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """A Keras 2 ``.h5``/``.hdf5`` destination (tf_keras picks its writer from the name)."""
    dest = Path(path)
    if dest.suffix.lower() not in (".h5", ".hdf5"):
        return _check_file(path, ".h5", "tf_keras reads the format from the name", overwrite)
    if dest.is_dir():
        raise UserError(f"output '{dest}' is a directory; give a file name ending in .h5")
    _common(dest, overwrite)
    return dest


def check_output_onnx(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """An ``.onnx`` file destination."""
    return _check_file(path, ".onnx", "an ONNX model", overwrite)


def read_arrays(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """The arrays of an .npz (by name) or an .npy (as ``x``); UserError naming ``what``."""
    import tokenize

    from .zipmember import MEMBER_ERRORS

    import numpy as np

    p = Path(path)
    # Every array is read here, inside the try: an .npz reads its members lazily,
    # and a corrupt member (bad CRC, bad .npy header, short data) fails only then
    # (what the fuzzer found, issue 29). allow_pickle stays off: no object arrays.
    try:
        data = np.load(p)
        if isinstance(data, np.ndarray):
            return {"x": data}
        with data:
            return {k: data[k] for k in data.files}
    except (*MEMBER_ERRORS, ValueError, KeyError, SyntaxError, tokenize.TokenError) as e:  # np.load and zipfile on corrupt bytes
        raise UserError(f"cannot read {what} '{p}': a damaged .npz/.npy file ({first_line(e)})") from None
    except MemoryError:
        raise UserError(f"cannot read {what} '{p}': its arrays do not fit in memory") from None


def temp_prefix(dest: Path) -> str:
    """The name prefix of ``dest``'s temporary siblings written by this process."""
    return f".{dest.name}.{TEMP_TAG}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temps(dest: Path) -> list[Path]:
    """Remove temporary siblings of ``dest`` left by writers that no longer run
    (a killed run); return what was removed. A live writer's files are kept."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.{TEMP_TAG}-(\d+)-[^/]*\.(tmp|old)")
    removed = []
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def ensure_space(directory: Path, needed: int, what: str, elsewhere: str = "(-o)") -> None:
    """Raise DiskSpaceError (exit 1) if ``directory``'s filesystem has less than
    ``needed`` bytes (plus a margin) free; nothing has been written yet."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return  # cannot tell; the write itself will say
    if free < needed + SPACE_MARGIN:
        raise DiskSpaceError(
            f"not enough free space in '{directory}' for {what}: it needs about "
            f"{megabytes(needed + SPACE_MARGIN)}, {megabytes(free)} is free; free some space or write elsewhere {elsewhere}; "
            "nothing was written"
        )


def available_memory() -> int | None:
    """Bytes of memory the kernel says can be had without swapping (MemAvailable);
    None where that cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def ensure_memory(needed: int, what: str) -> None:
    """Raise OutOfMemoryError (exit 1) if less than ``needed`` more bytes of memory
    are available: said before the work starts, where running out later would
    end in the kernel's OOM killer, which lets nothing be said or cleaned up."""
    free = available_memory()
    if free is not None and free < needed:
        raise OutOfMemoryError(
            f"{what} needs about {megabytes(needed)} more memory, {megabytes(free)} is available; nothing was written; "
            "close other programs or run it on a machine with more memory"
        )


def megabytes(n: int) -> str:
    """``n`` bytes as the messages say it: "12.3 MB"."""
    return f"{n / 1e6:.1f} MB"


def is_disk_full(e: BaseException | None) -> bool:
    """Whether ``e`` (or what caused it) is ENOSPC/EDQUOT, however a library wrapped it."""
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def disk_full(dest: Path, e: BaseException, elsewhere: str = "(-o)") -> DiskSpaceError:
    """The error to raise after a write ran out of space (its temporary file removed)."""
    err = DiskSpaceError(
        f"ran out of disk space while writing '{dest}'; the partial temporary file was removed and "
        f"nothing was written; free some space or write elsewhere {elsewhere}"
    )
    err.__cause__ = e
    return err


# A test hook, not an option (issue 26): tests that interrupt a write need the writer
# at a known point, not a race with a polled file. When this variable names a file,
# a writer whose temporary output is complete (and read back) writes that file, then
# waits for a signal, for at most HOLD_SECONDS, before moving its output into place.
HOLD_ENV = "ACTSWAP_TEST_HOLD_BEFORE_RENAME"
HOLD_SECONDS = 120.0


def hold_before_rename(tmp: Path) -> None:
    """The test hook above; a no-op unless ``ACTSWAP_TEST_HOLD_BEFORE_RENAME`` is set."""
    marker = os.environ.get(HOLD_ENV)
    if not marker:
        return
    Path(marker).write_text(str(tmp))
    deadline = time.monotonic() + HOLD_SECONDS
    while time.monotonic() < deadline and Path(marker).exists():
        time.sleep(0.01)


def write_atomically(dest: Path, data: bytes, check: Callable[[Path], None] | None = None) -> Path:
    """Write ``data`` to ``dest`` via a flushed temporary sibling and ``os.replace``:
    an interrupted write leaves no partial file and never damages an existing one.
    ``check(tmp)`` runs on the complete temporary file before the rename; if it
    raises, nothing is written."""
    remove_stale_temps(dest)
    ensure_space(dest.parent, len(data), f"'{dest.name}'")
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dest), suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
        hold_before_rename(Path(tmp))
        os.replace(tmp, dest)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(dest, e) from e
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


@contextlib.contextmanager
def staging_dir(dest: Path) -> Iterator[Path]:
    """A temporary directory beside ``dest`` (the same filesystem, so moving out
    of it is a rename), removed on exit whatever happened. Named like every
    temporary sibling, so a killed run's is removed by the next writer."""
    remove_stale_temps(dest)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest), suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(moves: list[tuple[Path, Path]]) -> None:
    """Rename each ``(staged, dest)`` in order, as one change: the destinations
    that exist are first moved aside, and if any rename fails, what was moved
    in is removed and they are put back. Order the file that names the others
    (an .onnx naming its data file) last: it appears only once they are there."""
    aside: list[tuple[Path, Path]] = []
    done: list[Path] = []
    try:
        for _, dest in moves:
            if dest.exists():
                old = dest.with_name(f"{temp_prefix(dest)}x.old")
                os.replace(dest, old)
                aside.append((old, dest))
        for staged, dest in moves:
            os.replace(staged, dest)
            done.append(dest)
    except BaseException:
        for dest in done:
            dest.unlink(missing_ok=True)
        for old, dest in aside:
            os.replace(old, dest)
        raise
    for old, _ in aside:
        old.unlink(missing_ok=True)
