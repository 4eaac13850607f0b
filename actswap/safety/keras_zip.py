"""Keras 3 ``.keras`` archives: the zip container, ``config.json`` and the embedded weights.

:func:`scan_keras_archive` checks, in order: the file's name, and that it is
not also an HDF5 file (:mod:`actswap.safety.names`); member names
(no ``..``, absolute paths or duplicates), encryption, declared sizes,
expansion ratios and overlapping members (zip bombs); then, only if none of
those was found, every member's real size and CRC; then ``config.json``
walked against the Keras 3 allow-list (:mod:`actswap.safety.configs`),
``metadata.json`` parsed, and each embedded ``.h5`` checked like an HDF5 file
(:func:`actswap.safety.hdf5.check_h5_links`).

Invariants: nothing is extracted or written; members are read in bounded
chunks (a stored ``.h5`` is read in place, a compressed one only below
``MAX_COMPRESSED_H5_BYTES``), and only after the declared sizes passed.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any

from ..zipmember import MEMBER_ERRORS, OPEN_ERRORS, stored_member
from .configs import check_config, load_config, parse_json
from .hdf5 import check_h5_links
from .names import check_polyglot, misnamed
from .report import (
    DAMAGED, ERROR, EXPANSION_FLOOR, MAX_COMPRESSED_H5_BYTES, MAX_EXPANSION, MAX_ZIP_MEMBERS,
    MAX_ZIP_TOTAL_BYTES, STRUCTURE, ScanReport,
)


def scan_keras_archive(p: Path, report: ScanReport) -> None:
    """Scan the ``.keras`` archive ``p``: its name, the zip container, then what it holds.

    Findings from the name checks also stop the scan before members are read.
    """
    if not p.name.endswith(".keras"):
        misnamed(p, "a Keras 3 zip archive", ".keras", report)
    check_polyglot(p, report)
    try:
        z = zipfile.ZipFile(p)
    except OPEN_ERRORS as e:
        report.add(ERROR, DAMAGED, p.name, f"'{p.name}' is a damaged zip archive ({e})")
        return
    with z:
        infos = z.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            report.add(ERROR, STRUCTURE, p.name, f"the archive has {len(infos)} members, more than {MAX_ZIP_MEMBERS}")
            return
        total = _check_declarations(p, infos, report)
        if report.errors:
            return
        _check_data(z, infos, report)
        report.checked.append(f"zip: {len(infos)} members, {total} bytes, sizes and CRCs verified")
        if report.errors:
            return
        names = {info.filename for info in infos}
        if "config.json" not in names:
            report.add(ERROR, DAMAGED, p.name, "the archive has no config.json (not a Keras model)")
            return
        check_config(z.read("config.json"), "config.json", report, legacy=False)
        if "metadata.json" in names:
            parse_json(z.read("metadata.json"), "metadata.json", report)
        for info in infos:
            if info.filename.endswith(".h5"):
                _scan_embedded_h5(p, z, info, report)


def read_keras_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` of a ``.keras`` archive, parsed as JSON only (:class:`LoadError` if it is not)."""
    with zipfile.ZipFile(path) as z:
        raw = z.read("config.json")
    return load_config(raw, "config.json", path)


def _check_declarations(p: Path, infos: list[zipfile.ZipInfo], report: ScanReport) -> int:
    """What the central directory declares: names, encryption, sizes, overlaps; return the total size."""
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        why = _unsafe_member_name(name)
        if why:
            report.add(ERROR, STRUCTURE, name, f"zip member '{name}' {why}: extracting it would write outside the archive's folder")
        if name in seen:
            report.add(ERROR, STRUCTURE, name, f"zip member '{name}' appears twice; tools disagree about which one counts")
        seen.add(name)
        if info.flag_bits & 0x1:
            report.add(ERROR, STRUCTURE, name, f"zip member '{name}' is encrypted")
        if info.file_size > EXPANSION_FLOOR and info.file_size > MAX_EXPANSION * max(1, info.compress_size):
            report.add(
                ERROR, STRUCTURE, name,
                f"zip member '{name}' declares {info.file_size} bytes from {info.compress_size} "
                f"compressed (more than {MAX_EXPANSION}x): a zip bomb",
            )
    total = sum(i.file_size for i in infos)
    if total > MAX_ZIP_TOTAL_BYTES:
        report.add(ERROR, STRUCTURE, p.name, f"the archive declares {total} bytes uncompressed, more than {MAX_ZIP_TOTAL_BYTES}: a zip bomb")
    # Members whose data overlap are how non-recursive zip bombs expand.
    ordered = sorted(infos, key=lambda i: i.header_offset)
    for a, b in zip(ordered, ordered[1:]):
        if b.header_offset < a.header_offset + 30 + len(a.orig_filename.encode()) + a.compress_size:
            report.add(ERROR, STRUCTURE, b.filename, f"zip members '{a.filename}' and '{b.filename}' overlap: a zip bomb")
            break
    return total


def _check_data(z: zipfile.ZipFile, infos: list[zipfile.ZipInfo], report: ScanReport) -> None:
    """Real sizes and CRCs, with memory bounded by the chunk size."""
    for info in infos:
        n = 0
        try:
            with z.open(info) as f:
                while chunk := f.read(1 << 20):
                    n += len(chunk)
                    if n > info.file_size:
                        break
        except MEMBER_ERRORS as e:
            report.add(ERROR, DAMAGED, info.filename, f"zip member '{info.filename}' is damaged ({e}); the file is probably truncated")
            continue
        if n != info.file_size:
            report.add(ERROR, DAMAGED, info.filename, f"zip member '{info.filename}' holds {n} bytes but declares {info.file_size}")


def _unsafe_member_name(name: str) -> str | None:
    parts = re.split(r"[/\\]", name)
    if "\x00" in name:
        return "contains a NUL byte"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in parts:
        return "contains '..'"
    return None


def _scan_embedded_h5(p: Path, z: zipfile.ZipFile, info: zipfile.ZipInfo, report: ScanReport) -> None:
    label = info.filename
    if info.compress_type == zipfile.ZIP_STORED:
        with open(p, "rb") as raw:
            member = stored_member(raw.fileno(), info)
            if member is None:
                report.add(ERROR, DAMAGED, label, f"zip member '{label}' has a damaged local header")
                return
            check_h5_links(member, label, report)
    elif info.file_size <= MAX_COMPRESSED_H5_BYTES:
        check_h5_links(io.BytesIO(z.read(info)), label, report)
    else:
        report.add(
            ERROR, STRUCTURE, label,
            f"zip member '{label}' is a compressed HDF5 file of {info.file_size} bytes, too large to check "
            "(Keras itself stores it uncompressed)",
        )
