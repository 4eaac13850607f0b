"""Keras 3 model files: loading (after the scan) and atomic, verified saving.

Invariants:

* a file is scanned (:mod:`actswap.scan`) before any loader sees it, and Keras
  loads it in safe mode (:func:`actswap.formats.keras3.load_keras`);
  ``trust_code`` lets code findings through (and turns safe mode off), never
  malformed containers;
* :func:`save` is atomic: the model is written to a temporary file beside the
  destination (named as :mod:`actswap.paths` describes), flushed to disk, then
  moved over it with ``os.replace``; an interrupted or failed save leaves no
  partial file and never damages an existing one; running out of disk space
  is checked before writing and reported as :class:`DiskSpaceError`;
* with ``verify``, the temporary file is reloaded (scanned, safe mode) and
  must hold the same activation sites and bit-identical weights as the model
  in memory before it is moved into place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from collections.abc import Callable

from ..containers import Format
from ..errors import InvariantError, LoadError, first_line
from ..report import warnings_as_notes
from ..paths import (
    check_output_path, disk_full, ensure_space, hold_before_rename, is_disk_full, remove_stale_temps, temp_prefix,
)


def load_keras(
    path: str | os.PathLike[str], trust_code: bool = False, container: Format = Format.KERAS
) -> tuple[Any, list[str]]:
    """Load a Keras 3 model file: scan first, then Keras in safe mode.

    ``trust_code=True`` (the CLI's loudly-warned ``--trust-code``) lets the
    scan's code findings through and Keras deserialize code (Lambda layers)
    from the file; a malformed file is refused regardless. A file whose
    training configuration cannot be restored loads without it, with a note."""
    from ..keras_setup import keras
    from ..safety import check_container

    check_container(Path(path), container, trust_code)
    notes: list[str] = []
    safe = not trust_code
    with warnings_as_notes(notes, "Keras, loading the file,"):
        try:
            model = keras.saving.load_model(path, compile=True, safe_mode=safe)
        except Exception as first:  # noqa: BLE001 - any loader failure is the file's
            try:
                model = keras.saving.load_model(path, compile=False, safe_mode=safe)
            except Exception as e:  # noqa: BLE001
                raise LoadError(f"could not load '{path}': {first_line(e)}") from e
            notes.append(
                f"loaded without its training configuration ({first_line(first)}); "
                "compile the converted model before training it"
            )
    if not isinstance(model, keras.Model):
        raise LoadError(f"'{path}' holds a {type(model).__name__}, not a Keras model")
    return model, notes


def nbytes(model: Any) -> int:
    """Bytes of a model's variables: what its file will at least hold."""
    total = 0
    for v in model.variables:
        n = 1
        for d in v.shape:
            n *= int(d or 1)
        total += n * _itemsize(v.dtype)
    return total


def _itemsize(dtype: Any) -> int:
    import numpy as np

    try:
        return np.dtype(str(dtype)).itemsize
    except TypeError:
        return 4  # bfloat16 and other types numpy does not name: 2 to 4 bytes


def same_model(expected: Any, reloaded: Any, what: str) -> None:
    """Raise InvariantError unless ``reloaded`` has the sites (path -> activation)
    and bit-identical weights of ``expected``."""
    from ..sites import find_sites

    # A layer can hold several sites (activation=, recurrent_activation=): keyed by form too.
    want = {(s.path, s.form): s.activation for s in find_sites(expected)}
    got = {(s.path, s.form): s.activation for s in find_sites(reloaded)}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))
        raise InvariantError(
            f"{what} does not reload with the sites that were written (first difference {diff[0]}); nothing written"
        )
    a, b = expected.weights, reloaded.weights
    if len(a) != len(b):
        raise InvariantError(f"{what} reloads with {len(b)} weights, {len(a)} were written; nothing written")
    for x, y in zip(a, b):
        if x.numpy().tobytes() != y.numpy().tobytes():
            raise InvariantError(f"{what}: weight '{x.path}' does not reload bit-identically; nothing written")


def save_keras(
    model: Any,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    verify: bool = False,
    check: Callable[[Any], None] | None = None,
    trust_code: bool = False,
) -> Path:
    """Write ``model`` to ``path`` (a ``.keras`` file) atomically; return the path.

    With ``verify``, the written file is read back before the rename and must
    equal ``model`` (sites and weights, :func:`same_model`); ``check(sites)``
    may add checks on the sites read back. Either failing raises and writes
    nothing. The read-back reads the file as data (:func:`actswap.readback.read_back`:
    ``config.json`` and the stored weights, no Keras load, which would rebuild
    every layer); only when that cannot confirm the model is the file reloaded
    (scanned, safe mode) to decide. ``trust_code`` lets such a reload through
    the scan's code findings (the model carries the code its input had)."""
    dest = check_output_path(path, overwrite=overwrite)
    remove_stale_temps(dest)
    ensure_space(dest.parent, nbytes(model), f"'{dest.name}'")
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(dest), suffix=".tmp.keras", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        model.save(tmp, overwrite=True)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if verify or check is not None:
            from ..readback import read_back

            written = read_back(model, tmp, verify)
            if written is None:  # not confirmed by reading: reload, which decides
                from ..sites import find_sites

                reloaded = load_keras(tmp, trust_code)[0]
                if verify:
                    same_model(model, reloaded, f"the written '{dest.name}'")
                written = find_sites(reloaded)
            if check is not None:
                check(written)
        hold_before_rename(tmp)
        os.replace(tmp, dest)
    except Exception as e:
        if is_disk_full(e):
            raise disk_full(dest, e) from e
        raise
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
