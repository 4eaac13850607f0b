"""HDF5 containers: ``.h5``/``.hdf5`` model files and the weights inside ``.keras``.

HDF5 can make its reader open other files: external links, external storage
and virtual datasets. :func:`check_h5_links` refuses each of them;
:func:`scan_h5` does that for a whole model file, then walks its
``model_config`` and ``training_config`` as Keras 2 configs
(:mod:`actswap.safety.configs`).

Invariants: h5py only lists links and reads attributes (no dataset data, no
link is followed out of the file); h5py is imported when a file is scanned,
and it does not import TensorFlow; nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import first_line
from .configs import check_config, load_config
from .names import check_polyglot, misnamed
from .report import DAMAGED, ERROR, MAX_H5_LINKS, STRUCTURE, ScanReport

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
    """Refuse HDF5 external links, external storage and virtual datasets; return the root attributes.

    ``source`` is a path or a file-like object (a member of a ``.keras``
    archive); ``label`` names it in findings.
    """
    import h5py  # light: no TensorFlow

    attrs: dict[str, Any] = {}
    try:
        with h5py.File(source, "r") as f:
            count = 0

            def visit(name: str, link: Any) -> Any:
                nonlocal count
                count += 1
                if count > MAX_H5_LINKS:
                    report.add(ERROR, STRUCTURE, label, f"'{label}' has more than {MAX_H5_LINKS} HDF5 objects")
                    return True  # stop
                where = f"{label}:/{name}"
                if isinstance(link, h5py.ExternalLink):
                    report.add(
                        ERROR, STRUCTURE, where,
                        f"HDF5 external link '{where}' -> '{link.filename}:{link.path}' would make the "
                        "loader read another file",
                    )
                elif isinstance(link, h5py.HardLink):
                    obj = f.get(name)
                    if isinstance(obj, h5py.Dataset):
                        if obj.is_virtual:
                            report.add(ERROR, STRUCTURE, where, f"HDF5 virtual dataset '{where}' maps data from other files")
                        if obj.external:
                            report.add(
                                ERROR, STRUCTURE, where,
                                f"HDF5 dataset '{where}' keeps its data in external file(s) "
                                f"{sorted({str(e[0]) for e in obj.external})}",
                            )
                return None

            f.visititems_links(visit)
            for key in _CONFIG_KEYS:
                if key in f.attrs:
                    attrs[key] = f.attrs[key]
            report.checked.append(f"{label}: {count} HDF5 links checked (no external links, storage or virtual datasets)")
    except OSError as e:
        report.add(ERROR, DAMAGED, label, f"'{label}' is a damaged HDF5 file ({first_line(e)})")
    return attrs


def read_h5_config(path: Path) -> dict[str, Any]:
    """The ``model_config`` of an HDF5 model file, parsed as JSON only (:class:`LoadError` if it is not)."""
    import h5py

    with h5py.File(path, "r") as f:
        return load_config(f.attrs["model_config"], "model_config", path)
