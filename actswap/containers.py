"""What a model path holds, judged from content, never from the file name:
a zip archive with a Keras config, an HDF5 file with a Keras config, a
SavedModel directory, a frozen GraphDef. These are *containers*; which
backend reads one is :mod:`actswap.formats`' decision.

Nothing here imports TensorFlow or Keras: detection runs before anything is
deserialized, so that a bad path fails fast with a clear message and
``actswap --help`` stays cheap.

Invariant: :func:`detect` never opens anything that is not a regular file or a
directory (a FIFO named ``x.keras`` would otherwise block forever), and never
writes.
"""

from __future__ import annotations

import enum
import os
import stat
import zipfile
from pathlib import Path

from .errors import UnrecognisedFormatError, UserError, first_line
from .zipmember import OPEN_ERRORS

ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# HDF5 allows a user block of 512 * 2**k bytes before the superblock.
_HDF5_OFFSETS = (0, 512, 1024, 2048, 4096)


class Format(str, enum.Enum):
    KERAS = "keras"  # Keras 3 zip archive (.keras)
    H5 = "h5"  # legacy Keras HDF5 model file
    SAVEDMODEL = "savedmodel"  # TF SavedModel directory
    GRAPHDEF = "graphdef"  # frozen TF1 GraphDef (.pb)

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


def check_kind(path: Path) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"no such file or directory: '{path}'; check the path") from None
    except PermissionError:
        raise UserError(f"cannot read '{path}': permission denied; check its permissions") from None
    except OSError as e:
        raise UserError(f"cannot read '{path}': {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise UnrecognisedFormatError(
            f"'{path}' is not a regular file or a directory (a device, FIFO or socket); "
            "pass a model file"
        )
    return st


def sniff(path: str | os.PathLike[str]) -> Format | None:
    """The container at ``path``, or None when its content is none actswap knows.

    Raises :class:`UserError` (exit 2) for a missing path, a special file, a
    truncated/corrupt ``.keras`` archive or an HDF5 file without a Keras
    model config: content that says what it is but is damaged.
    """
    p = Path(path)
    st = check_kind(p)
    if stat.S_ISDIR(st.st_mode):
        if (p / "saved_model.pb").is_file() or (p / "saved_model.pbtxt").is_file():
            return Format.SAVEDMODEL
        return None
    head, hdf5 = _head(p, st)
    if head[:4] == ZIP_MAGIC:
        _validate_keras_zip(p)
        return Format.KERAS
    if hdf5:
        _validate_h5(p)
        return Format.H5
    if _looks_like_graphdef(p):
        return Format.GRAPHDEF
    return None


def unrecognised(path: str | os.PathLike[str]) -> UnrecognisedFormatError:
    """The error for a path whose content no backend claims."""
    p = Path(path)
    if p.is_dir():
        return UnrecognisedFormatError(
            f"'{p}' is a directory but not a SavedModel (it has no saved_model.pb); "
            "pass a .keras or .h5 model file"
        )
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError:
        head = b""
    shown = head.hex() if head else "empty file"
    return UnrecognisedFormatError(
        f"'{p}' is not a model file actswap can read (first bytes: {shown}); "
        "expected a Keras 3 .keras archive, a legacy .h5 file, a SavedModel directory "
        "or a frozen GraphDef (.pb)"
    )


def detect(path: str | os.PathLike[str]) -> Format:
    """The container at ``path`` (:func:`sniff`); :class:`UnrecognisedFormatError`
    (exit 2) when it is none actswap knows."""
    found = sniff(path)
    if found is None:
        raise unrecognised(path)
    return found


def _head(p: Path, st: os.stat_result) -> tuple[bytes, bool]:
    """The first 8 bytes, and whether an HDF5 superblock is at an allowed offset."""
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            hdf5 = head == HDF5_MAGIC
            for off in _HDF5_OFFSETS[1:]:
                if hdf5 or off >= st.st_size:
                    break
                f.seek(off)
                hdf5 = f.read(8) == HDF5_MAGIC
    except PermissionError:
        raise UserError(f"cannot read '{p}': permission denied; check its permissions") from None
    except OSError as e:
        raise UserError(f"cannot read '{p}': {e.strerror}") from None
    return head, hdf5


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while i < len(data) and shift < 64:
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7
    return -1, i


def _looks_like_graphdef(p: Path) -> bool:
    """Protobuf wire-format sniff, without TensorFlow: a GraphDef starts with a
    ``node`` (field 1) whose first fields are ``name`` (1) and ``op`` (2), both
    printable strings."""
    with open(p, "rb") as f:
        data = f.read(4096)
    if len(data) < 6 or data[0] != 0x0A:
        return False
    _, i = _varint(data, 1)
    fields = {}
    for _ in range(2):
        if i >= len(data):
            return False
        tag = data[i]
        length, j = _varint(data, i + 1)
        if tag not in (0x0A, 0x12) or length <= 0 or j + length > len(data):
            return False
        text = data[j : j + length]
        if not all(32 <= c < 127 for c in text):
            return False
        fields[tag] = text
        i = j + length
    return set(fields) == {0x0A, 0x12}


def _validate_keras_zip(p: Path) -> None:
    try:
        with zipfile.ZipFile(p) as z:
            names = set(z.namelist())
    except OPEN_ERRORS as e:
        raise UnrecognisedFormatError(
            f"'{p}' is a damaged zip archive ({first_line(e)}); the .keras file is probably truncated, "
            "save or copy it again"
        ) from None
    if "config.json" not in names:
        raise UnrecognisedFormatError(
            f"'{p}' is a zip archive but not a Keras model (no config.json inside); "
            "pass a file written by model.save('x.keras')"
        )


def _validate_h5(p: Path) -> None:
    from .safety.h5read import read_h5  # HDF5 read in a bounded child (it can hang on a corrupt file)

    contents = read_h5(p, p.name)
    if contents.corrupt is not None:
        raise UnrecognisedFormatError(f"'{p}' is a damaged HDF5 file ({contents.corrupt})")
    if "model_config" not in contents.attrs:
        raise UnrecognisedFormatError(
            f"'{p}' is an HDF5 file without a Keras model config (a weights-only file?); "
            "pass a file written by model.save('x.h5')"
        )
