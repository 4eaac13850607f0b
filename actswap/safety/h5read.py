"""Reading an untrusted HDF5 file as data, in a bounded child process.

Every read of an HDF5 file actswap has not written (format detection in
:mod:`actswap.containers`, the tf_keras backend's claim, the scan in
:mod:`.hdf5`, the weights inside a ``.keras`` archive) goes through
:func:`read_h5`: HDF5 can loop forever or crash on a corrupt file (the fuzzer
found both kinds of file, issue 29), and C code cannot be interrupted, so the
file is read in a forked child bounded in time and memory (:mod:`.bounded`),
and h5py's errors on a corrupt structure (:data:`H5_CORRUPT`) become one
"corrupt HDF5" reason that the callers report as a damaged file (exit 2).

Invariants: only links are listed and attributes read (no dataset data, no
link followed out of the file); h5py is imported in the child, and it does not
import TensorFlow; nothing is written. Imports nothing of actswap's but
:mod:`.bounded`, :mod:`.report` and the errors, so that format detection can
use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import first_line
from .bounded import ChildError, ReaderFailed, bounded
from .report import ERROR, MAX_H5_LINKS, STRUCTURE


# What h5py raises when the file's structure is corrupt: HDF5's own failures
# arrive as OSError, as RuntimeError from an iteration ("B-tree iteration
# failed", "Link visitation failed"), as KeyError for an object a link names
# but the file lacks, and as ValueError for impossible types or shapes.
H5_CORRUPT = (OSError, RuntimeError, KeyError, ValueError)


@dataclass(frozen=True)
class H5Contents:
    """What :func:`read_h5` read: the root attributes' values (text ones; others
    as None), the number of links visited, the findings (severity, kind,
    where, message), and ``corrupt``: why the file could not be read (None: it
    could)."""

    attrs: dict[str, Any]
    links: int
    findings: tuple[tuple[str, str, str, str], ...]
    corrupt: str | None = None


def read_h5(source: Any, label: str) -> H5Contents:
    """Read an HDF5 file as data, in a child process bounded in time and memory
    (:mod:`.bounded`: HDF5 can loop forever or crash on a corrupt file).

    Every link is listed (external links, virtual datasets and external storage
    become findings) and every attribute of every object is read once, so that
    a loader reading this file afterwards meets no part of its metadata that
    was not read here within the bounds. ``source`` is a path or a file-like
    object (a member of a ``.keras`` archive); ``label`` names it."""
    key = _cache_key(source)
    if key is not None and key in _READ:
        return _READ[key]
    try:
        contents = bounded(_read_h5, source, label)
    except ReaderFailed as e:
        contents = H5Contents({}, 0, (), f"corrupt HDF5 '{label}': {e.reason}")
    except ChildError as e:
        raise RuntimeError(f"reading '{label}' as HDF5 failed: {e}\n{e.trace}") from None
    if key is not None:
        _READ.clear()  # one file at a time is what the pipeline reads twice (detect, then scan)
        _READ[key] = contents
    return contents


_READ: dict[tuple[Any, ...], H5Contents] = {}


def _cache_key(source: Any) -> tuple[Any, ...] | None:
    """A path's identity and version (a changed file is read again); None for a file object."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        st = os.stat(source)
    except OSError:
        return None
    return (os.fspath(source), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_h5(source: Any, label: str) -> H5Contents:
    """:func:`read_h5`'s work, in the child."""
    import h5py  # light: no TensorFlow

    findings: list[tuple[str, str, str, str]] = []
    count = 0
    try:
        with h5py.File(source, "r") as f:

            def visit(name: str, link: Any) -> Any:
                nonlocal count
                count += 1
                if count > MAX_H5_LINKS:
                    findings.append((ERROR, STRUCTURE, label, f"'{label}' has more than {MAX_H5_LINKS} HDF5 objects"))
                    return True  # stop
                where = f"{label}:/{name}"
                if isinstance(link, h5py.ExternalLink):
                    findings.append((
                        ERROR, STRUCTURE, where,
                        f"HDF5 external link '{where}' -> '{link.filename}:{link.path}' would make the "
                        "loader read another file",
                    ))
                elif isinstance(link, h5py.HardLink):
                    obj = f.get(name)
                    if isinstance(obj, h5py.Dataset):
                        if obj.is_virtual:
                            findings.append((ERROR, STRUCTURE, where, f"HDF5 virtual dataset '{where}' maps data from other files"))
                        if obj.external:
                            findings.append((
                                ERROR, STRUCTURE, where,
                                f"HDF5 dataset '{where}' keeps its data in external file(s) "
                                f"{sorted({str(e[0]) for e in obj.external})}",
                            ))
                    if obj is not None:
                        for _ in obj.attrs.values():  # read once, within the bounds
                            pass
                return None

            f.visititems_links(visit)
            attrs = {k: (v if isinstance(v, (str, bytes)) else None) for k, v in f.attrs.items()}
    except (*H5_CORRUPT, TypeError, SystemError) as e:
        cause = _corruption(e)
        if cause is None:
            raise
        return H5Contents({}, count, tuple(findings), f"corrupt HDF5 '{label}': {first_line(cause)}")
    return H5Contents(attrs, count, tuple(findings))


def _corruption(e: BaseException) -> BaseException | None:
    """The error that says the file is corrupt, if ``e`` is one (None: a bug).

    Besides :data:`H5_CORRUPT`: a TypeError raised inside h5py itself (a string
    type with an unknown encoding), and a SystemError, which is how h5py's lock
    reports such an error raised inside a visit callback (a link name that is
    not UTF-8)."""
    if isinstance(e, SystemError):
        cause = e.__cause__ or e.__context__
        return _corruption(cause) if cause is not None else None
    if isinstance(e, H5_CORRUPT):
        return e
    if isinstance(e, TypeError) and _raised_in_h5py(e):
        return e
    return None


def _raised_in_h5py(e: BaseException) -> bool:
    tb, last = e.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and "h5py" in last.tb_frame.f_code.co_filename
