"""Pre-load safety scan: the public entry points.

:func:`scan` reports what a model file would do if it were loaded;
:func:`check` refuses a file with an error. Before any loader sees a file,
it is read as data by the scanner for its container (:mod:`actswap.safety`,
whose docstring says what each one checks); this module only picks that
scanner through the file's format backend (:mod:`actswap.formats`) and
applies the refusal policy (:func:`actswap.safety.refuse`).

Invariants: as for :mod:`actswap.safety`: nothing imports TensorFlow or Keras,
runs anything from the file, or writes anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .containers import Format
from .errors import LoadError
from .formats import backend_for
from .safety import check_container, refuse
from .safety.configs import find_unsafe
from .safety.hdf5 import read_h5_config
from .safety.keras_zip import read_keras_config
from .safety.report import (
    CODE, DAMAGED, ERROR, NUMERICS, STRUCTURE, WARNING, Finding, ScanReport, refusal_message,
)

__all__ = [
    "CODE", "DAMAGED", "ERROR", "NUMERICS", "STRUCTURE", "WARNING", "Finding", "ScanReport",
    "check", "check_container", "find_unsafe", "read_config", "refusal_message", "scan",
]


def scan(path: str | os.PathLike[str], backend: Any = None) -> ScanReport:
    """Scan the model at ``path`` without loading it; return every finding.

    The backend that reads ``path`` (:func:`actswap.formats.backend_for`, or
    ``backend`` when the caller already holds it) says what to read. Raises
    :class:`~actswap.errors.UserError` (exit 2) only when the path is not a
    model at all (missing, special file, unrecognised content); everything
    else is a finding.
    """
    p = Path(path)
    backend = backend or backend_for(p)
    report = ScanReport(str(p), backend.container.value if backend.container is not None else backend.name)
    backend.scan(p, report)
    return report


def check(path: str | os.PathLike[str], *, trust_code: bool = False, backend: Any = None) -> ScanReport:
    """Scan, and refuse (:class:`UnsafeModelError`, exit 2) a file with an error.

    With ``trust_code`` (the CLI's loudly-warned ``--trust-code``), findings of
    kind ``code`` are let through (returned in the report, for the caller to
    warn about); ``structure`` findings never are.
    """
    return refuse(scan(path, backend), trust_code)


# Compatibility: the stored Keras config of a .keras/.h5 file, read as JSON only.
_CONFIG_READERS: dict[Format, Callable[[Path], dict[str, Any]]] = {
    Format.KERAS: read_keras_config, Format.H5: read_h5_config,
}


def read_config(path: Path, fmt: Format) -> dict[str, Any]:
    """The model config stored in a ``.keras``/``.h5`` file, parsed as JSON only."""
    reader = _CONFIG_READERS.get(fmt)
    if reader is None:
        raise LoadError(f"'{path}': a {fmt.value} model has no Keras config file to read")
    return reader(path)
