"""Name checks shared by the single-file containers.

Keras and tf_keras choose their loader from the file name (``.keras`` -> zip,
``.h5``/``.hdf5`` -> HDF5), so a file's name must say what its content is: a
disagreement would load something other than what was scanned. Each
container's scanner applies its own rule with :func:`misnamed`; the zip and
HDF5 ones also call :func:`check_polyglot`.

Invariants: reads only headers (the HDF5 signature offsets, the zip end
record), never a member or a dataset; never writes.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from ..containers import _HDF5_OFFSETS, HDF5_MAGIC
from .report import ERROR, STRUCTURE, ScanReport


def misnamed(p: Path, what: str, suffix: str, report: ScanReport) -> None:
    """Report that ``p`` holds ``what`` under a name that says otherwise; suggest ``suffix``."""
    name = p.name
    report.add(
        ERROR, STRUCTURE, name,
        f"'{name}' holds {what} but its name says otherwise; loaders pick their reader from "
        f"the name, so what would be loaded is not what was scanned; rename it to {_stem(p)}{suffix}",
    )


def check_polyglot(p: Path, report: ScanReport) -> None:
    # A file that is both a zip and an HDF5 file reads differently to each tool.
    name = p.name
    try:
        with open(p, "rb") as f:
            heads = []
            for off in _HDF5_OFFSETS:
                f.seek(off)
                heads.append(f.read(8))
        both = any(h == HDF5_MAGIC for h in heads) and zipfile.is_zipfile(p)
    except OSError:
        both = False
    if both:
        report.add(
            ERROR, STRUCTURE, name,
            f"'{name}' is both a zip archive and an HDF5 file (a polyglot); tools would "
            "disagree about what it contains",
        )


def _stem(p: Path) -> str:
    return p.name[: -len(p.suffix)] if p.suffix else p.name
