"""Protobuf files (``saved_model.pb``, ``keras_metadata.pb``, frozen GraphDefs) read as data.

Messages are parsed with the schema in :mod:`actswap.tfproto` (TensorFlow's
own field numbers, declared without importing TensorFlow); fields it does not
declare are skipped.

Invariants: a file is read only below protobuf's own size limit; parsing
builds messages and runs nothing; nothing is written. protobuf and
:mod:`actswap.tfproto` are imported when a file is parsed, not before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import first_line
from .report import DAMAGED, ERROR, MAX_PB_BYTES, STRUCTURE, ScanReport


def read_message(name: str, path: Path, report: ScanReport, text: bool = False) -> Any:
    """The file ``path`` parsed as the message ``name`` (binary, or text format); None after a finding."""
    data = _read(path, path.name, report)
    return None if data is None else _parse(name, data, path.name, report, text)


def _read(path: Path, what: str, report: ScanReport) -> bytes | None:
    """The bytes of ``path``; None after a finding (too large, unreadable)."""
    try:
        size = path.stat().st_size
        if size > MAX_PB_BYTES:
            report.add(ERROR, STRUCTURE, what, f"{what} is {size} bytes, more than protobuf can hold")
            return None
        return path.read_bytes()
    except OSError as e:
        report.add(ERROR, DAMAGED, what, f"cannot read {what} ({e.strerror or e})")
        return None


def _parse(name: str, data: bytes, what: str, report: ScanReport, text: bool) -> Any:
    from google.protobuf import message as pb_message
    from google.protobuf import text_format

    from .. import tfproto

    msg = tfproto.message(name)
    try:
        if text:
            text_format.Parse(data.decode("utf-8"), msg, allow_unknown_field=True)
        else:
            msg.ParseFromString(data)
    except (pb_message.DecodeError, text_format.ParseError, UnicodeDecodeError, ValueError, RuntimeError) as e:
        report.add(ERROR, DAMAGED, what, f"{what} is not a valid {name} protobuf ({first_line(e)})")
        return None
    return msg
