"""HDF5 containers: ``.h5``/``.hdf5`` model files and the weights inside ``.keras``.

HDF5 can make its reader open other files: external links, external storage
and virtual datasets. :func:`check_h5_links` refuses each of them;
:func:`scan_h5` does that for a whole model file, then walks its
``model_config`` and ``training_config`` as Keras 2 configs
(:mod:`actswap.safety.configs`).

Every read of an untrusted HDF5 file goes through :func:`.h5read.read_h5`: in
a child process bounded in time and memory, since HDF5 can loop forever or
crash on a corrupt file, with h5py's errors on a corrupt structure turned into
one "corrupt HDF5" reason that the callers report as a damaged file (exit 2).

Invariants: h5py only lists links and reads attributes (no dataset data, no
link is followed out of the file); h5py is imported when a file is scanned,
and it does not import TensorFlow; nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LoadError
from .configs import check_config, load_config
from .h5read import read_h5
from .names import check_polyglot, misnamed
from .report import DAMAGED, ERROR, ScanReport

_CONFIG_KEYS = ("model_config", "training_config")


def scan_h5(p: Path, report: ScanReport) -> None:
    """Scan the HDF5 model file ``p``: its name, its links, then its configs."""
    if not p.name.endswith((".h5", ".hdf5")):
        misnamed(p, "an HDF5 file", ".h5", report)
    check_polyglot(p, report)
    attrs = check_h5_links(str(p), p.name, report)
    if report.errors:
        return
    if "model_config" not in attrs:
        report.add(ERROR, DAMAGED, p.name, f"'{p.name}' has no model_config (a weights-only HDF5 file?)")
        return
    for key in _CONFIG_KEYS:
        if key in attrs:
            check_config(attrs[key], key, report, legacy=True)


def check_h5_links(source: Any, label: str, report: ScanReport) -> dict[str, Any]:
    """Refuse HDF5 external links, external storage and virtual datasets, and a
    file HDF5 cannot read (:func:`read_h5`); return the root attributes that
    hold a Keras config.

    ``source`` is a path or a file-like object (a member of a ``.keras``
    archive); ``label`` names it in findings.
    """
    contents = read_h5(source, label)
    for finding in contents.findings:
        report.add(*finding)
    if contents.corrupt is not None:
        report.add(ERROR, DAMAGED, label, contents.corrupt)
        return {}
    report.checked.append(
        f"{label}: {contents.links} HDF5 links checked (no external links, storage or virtual datasets)"
    )
    return {k: contents.attrs[k] for k in _CONFIG_KEYS if k in contents.attrs}


def read_h5_config(path: Path) -> dict[str, Any]:
    """The ``model_config`` of an HDF5 model file, parsed as JSON only (:class:`LoadError` if it is not)."""
    contents = read_h5(path, Path(path).name)
    if contents.corrupt is not None:
        raise LoadError(f"'{path}': {contents.corrupt}")
    if contents.attrs.get("model_config") is None:
        raise LoadError(f"'{path}' has no model_config as text")
    return load_config(contents.attrs["model_config"], "model_config", path)
