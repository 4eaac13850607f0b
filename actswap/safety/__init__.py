"""Pre-load safety checks: read a model file as data and report what would run code.

A model file is untrusted input: TensorFlow's security policy treats models as
programs, Keras safe mode has had bypasses, ``tf_keras`` runs Lambda bytecode
even with ``safe_mode=True``, and a SavedModel can write files while it is
being *loaded*. So before any loader sees a file, it is read the way an
archive tool or a protobuf parser would, one scanner per container, each with
the same shape ``scan_...(path, report)``:

* :func:`scan_keras_archive` (:mod:`.keras_zip`): a ``.keras`` zip archive,
  its ``config.json`` and embedded ``model.weights.h5``;
* :func:`scan_h5` (:mod:`.hdf5`): an ``.h5``/``.hdf5`` model file, its links
  and its ``model_config``/``training_config``;
* :func:`scan_savedmodel` (:mod:`.savedmodel`): a SavedModel directory, its
  graphs and its ``keras_metadata.pb``;
* :func:`scan_graphdef` (:mod:`.graphdef`): a frozen GraphDef.

The single-file scanners also check the file's name against its content
(:mod:`.names`), since Keras picks its loader from the name. What they share:
:mod:`.report` (findings, severities, kinds, limits), :mod:`.configs` (Keras
configs walked against :mod:`.allowlists`), :mod:`.graph_ops` (TensorFlow ops
against the op allow-list) and :mod:`.pbfiles` (protobuf files as data).
Which scanner runs is the caller's choice: each format backend
(:mod:`actswap.formats`) names its container, and :data:`SCANNERS` maps a
container to its scanner; nothing here detects formats. The public entry
points are in :mod:`actswap.scan`.

Each finding has a severity (``error`` refuses the file, ``warning`` informs)
and a kind: ``code`` (the file asks to run or import code: what
``--trust-code`` lets through), ``structure`` (the container itself is
hostile: bombs, escaping paths, links to other files; never let through),
``damaged`` (it cannot be parsed: truncated, corrupt; never let through) or
``numerics`` (a warning about precision).

Invariants of every module here: nothing imports TensorFlow or Keras (h5py,
protobuf and :mod:`actswap.tfproto` are imported only when a file is read),
executes anything from the file, follows a symlink out of a SavedModel, opens
a special file, or writes anything. Memory and time are bounded by the limits
in :mod:`.report`, not by the file's declarations.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..containers import Format
from .graphdef import scan_graphdef
from .hdf5 import scan_h5
from .keras_zip import scan_keras_archive
from .report import ScanReport, refuse
from .savedmodel import scan_savedmodel

# One scanner per container.
SCANNERS: dict[Format, Callable[[Path, ScanReport], None]] = {
    Format.KERAS: scan_keras_archive,
    Format.H5: scan_h5,
    Format.SAVEDMODEL: scan_savedmodel,
    Format.GRAPHDEF: scan_graphdef,
}


def check_container(path: str | os.PathLike[str], container: Format, trust_code: bool = False) -> ScanReport:
    """Scan ``path`` as ``container`` and refuse it (:func:`refuse`) on an error.

    For code that loads a path whose container it already knows (a backend's
    loader, the read-back of a temporary output)."""
    p = Path(path)
    report = ScanReport(str(p), container.value)
    SCANNERS[container](p, report)
    return refuse(report, trust_code)


__all__ = [
    "SCANNERS", "ScanReport", "check_container", "refuse", "scan_graphdef", "scan_h5", "scan_keras_archive",
    "scan_savedmodel",
]
