"""Loading and saving model files.

Invariants:

* a file is scanned (:mod:`actswap.scan`) before any loader sees it, and Keras
  loads it in safe mode;
* :func:`save` is atomic: the model is written to a temporary file beside the
  destination, flushed to disk, then moved over it with ``os.replace``; an
  interrupted or failed save leaves no partial file and never damages an
  existing one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from . import scan
from .errors import LoadError, UnsupportedFormatError
from .formats import Format, detect
from .paths import check_output_path


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_with_notes(path: str | os.PathLike[str], *, trust_code: bool = False) -> tuple[Any, list[str]]:
    """Load a model file safely; also return notes on what could not be restored.

    ``trust_code=True`` (the CLI's loudly-warned ``--trust-code``) skips the scan
    and lets Keras deserialize code (Lambda layers) from the file."""
    p = Path(path)
    fmt = detect(p)
    if fmt in (Format.SAVEDMODEL, Format.GRAPHDEF):
        raise UnsupportedFormatError(
            f"'{p}' is a TF {'SavedModel' if fmt is Format.SAVEDMODEL else 'frozen graph'}, not a "
            "Keras model file; pass its path to actswap.convert or actswap.inspect, which rewrite "
            "its graph"
        )
    if not trust_code:
        scan.check(p, fmt)
    from .keras_setup import keras

    notes: list[str] = []
    safe = not trust_code
    try:
        model = keras.saving.load_model(p, compile=True, safe_mode=safe)
    except Exception as first:  # noqa: BLE001 - any loader failure is the file's
        try:
            model = keras.saving.load_model(p, compile=False, safe_mode=safe)
        except Exception as e:  # noqa: BLE001
            raise LoadError(f"could not load '{p}': {_first_line(e)}") from e
        notes.append(
            f"loaded without its training configuration ({_first_line(first)}); "
            "compile the converted model before training it"
        )
    if not isinstance(model, keras.Model):
        raise LoadError(f"'{p}' holds a {type(model).__name__}, not a Keras model")
    return model, notes


def load(path: str | os.PathLike[str]) -> Any:
    """Load a ``.keras`` or legacy ``.h5`` model safely (scan, then Keras safe mode)."""
    return load_with_notes(path)[0]


def save(model: Any, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``model`` to ``path`` (a ``.keras`` file) atomically; return the path."""
    dest = check_output_path(path, overwrite=overwrite)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp.keras", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        model.save(tmp, overwrite=True)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        # Reached on success (tmp already moved), on error and on KeyboardInterrupt.
        tmp.unlink(missing_ok=True)
    try:
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    return dest
