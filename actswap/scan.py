"""Pre-load safety scan: the public entry points.

:func:`scan` reports what a model file would do if it were loaded;
:func:`check` refuses a file with an error. Before any loader sees a file,
it is read as data by the scanner for its container (:mod:`actswap.safety`,
whose docstring says what each one checks); this module only picks that
scanner from the detected format and applies the refusal policy.

Invariants: as for :mod:`actswap.safety`: nothing imports TensorFlow or Keras,
runs anything from the file, or writes anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from .errors import LoadError, UnsafeModelError
from .formats import Format, detect
from .safety import scan_graphdef, scan_h5, scan_keras_archive, scan_savedmodel
from .safety.configs import find_unsafe
from .safety.hdf5 import read_h5_config
from .safety.keras_zip import read_keras_config
from .safety.report import (
    CODE, DAMAGED, ERROR, NUMERICS, STRUCTURE, WARNING, Finding, ScanReport, refusal_message,
)

__all__ = [
    "CODE", "DAMAGED", "ERROR", "NUMERICS", "STRUCTURE", "WARNING", "Finding", "ScanReport",
    "check", "find_unsafe", "read_config", "refusal_message", "scan",
]


class _Container(NamedTuple):
    scan: Callable[[Path, ScanReport], None]
    read_config: Callable[[Path], dict[str, Any]] | None  # for formats that hold a Keras config as JSON


# The one place a format picks its scanner (until the format backends own it).
_CONTAINERS = {
    Format.KERAS: _Container(scan_keras_archive, read_keras_config),
    Format.H5: _Container(scan_h5, read_h5_config),
    Format.SAVEDMODEL: _Container(scan_savedmodel, None),
    Format.GRAPHDEF: _Container(scan_graphdef, None),
}


def scan(path: str | os.PathLike[str]) -> ScanReport:
    """Scan the model at ``path`` without loading it; return every finding.

    Raises :class:`~actswap.errors.UserError` (exit 2) only when the path is not
    a model at all (missing, special file, unrecognised content), as
    :func:`actswap.formats.detect` does; everything else is a finding.
    """
    p = Path(path)
    fmt = detect(p)
    report = ScanReport(str(p), fmt.value)
    _CONTAINERS[fmt].scan(p, report)
    return report


def check(path: str | os.PathLike[str], *, trust_code: bool = False) -> ScanReport:
    """Scan, and refuse (:class:`UnsafeModelError`, exit 2) a file with an error.

    With ``trust_code`` (the CLI's loudly-warned ``--trust-code``), findings of
    kind ``code`` are let through (returned in the report, for the caller to
    warn about); ``structure`` findings never are.
    """
    report = scan(path)
    refused = [f for f in report.errors if not (trust_code and f.kind == CODE)]
    if refused and all(f.kind == DAMAGED for f in refused):
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise LoadError(f"cannot read '{report.path}': {refused[0].message}{more}; the file is damaged, save or copy it again")
    if refused:
        raise UnsafeModelError(refusal_message(report.path, refused, report.not_listed))
    return report


def read_config(path: Path, fmt: Format) -> dict[str, Any]:
    """The model config stored in a ``.keras``/``.h5`` file, parsed as JSON only."""
    reader = _CONTAINERS[fmt].read_config
    if reader is None:
        raise LoadError(f"'{path}': a {fmt.value} model has no Keras config file to read")
    return reader(path)
