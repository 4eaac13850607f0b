"""Output-path checks, done before any work (and before TensorFlow is imported).

Each returns the destination as a Path or raises UserError (exit 2) naming
what was received and what to do. None of them writes anything.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import UserError


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


def check_output_onnx(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """An ``.onnx`` file destination."""
    return _check_file(path, ".onnx", "an ONNX model", overwrite)


def read_arrays(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """The arrays of an .npz (by name) or an .npy (as ``x``); UserError naming ``what``."""
    import numpy as np

    p = Path(path)
    try:
        data = np.load(p)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} '{p}': {e}") from None
    if isinstance(data, np.ndarray):
        return {"x": data}
    return {k: data[k] for k in data.files}


def write_atomically(dest: Path, data: bytes) -> Path:
    """Write ``data`` to ``dest`` via a flushed temporary sibling and ``os.replace``:
    an interrupted write leaves no partial file and never damages an existing one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest
