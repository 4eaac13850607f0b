"""Reading an uncompressed zip member in place.

Keras stores a ``.keras`` file's weights as an HDF5 file inside the zip,
uncompressed. Both the safety scan (:mod:`actswap.scan`) and the verification
of a written file (:mod:`actswap.verify`) open that member with h5py; reading
it through a window on the zip file, rather than extracting it, keeps a 100 MB
member out of memory and off the disk.

Invariant: nothing here writes, and no window reads outside its member's bytes.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from typing import Any

_LOCAL_HEADER = 30  # fixed part of a zip local file header

# What zipfile raises when it opens (reads the central directory of) a damaged
# archive: besides BadZipFile, a truncated or unreadable file (EOFError,
# OSError), a member name flagged UTF-8 that is not (UnicodeDecodeError) and a
# "version needed to extract" or compression method it does not know
# (NotImplementedError: "zip file version 8.4"), all found by the fuzzer (issue 29).
OPEN_ERRORS = (zipfile.BadZipFile, EOFError, OSError, UnicodeDecodeError, NotImplementedError)
# What reading a member of a damaged archive raises: as above, a bad deflate
# stream (zlib.error), and a member flagged encrypted (RuntimeError: "File
# 'y.npy' is encrypted, password required for extraction", found by the fuzzer
# in an .npz; zipfile raises RuntimeError for nothing else a read can meet).
MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError)


class FileWindow(io.RawIOBase):
    """Bytes ``[start, start + size)`` of an open file descriptor, read with
    ``pread`` so the descriptor's own offset is never moved: two windows (or a
    window and other readers) on one file do not disturb each other."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        super().__init__()
        self._fd, self._start, self._size, self._pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, pos + (0, self._pos, self._size)[whence])
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        got = os.preadv(self._fd, [memoryview(buffer)[:n]], self._start + self._pos)
        self._pos += got
        return got


def stored_member(fd: int, info: zipfile.ZipInfo, buffer_size: int = 1 << 16) -> io.BufferedReader | None:
    """A buffered reader of the uncompressed zip member ``info`` of the file open
    as ``fd``; None when the member is compressed or its local header is damaged
    (the caller decides what that means: an error for the scan, "cannot tell"
    for verification)."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    header = os.pread(fd, _LOCAL_HEADER, info.header_offset)
    if len(header) < _LOCAL_HEADER or header[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + _LOCAL_HEADER + name_len + extra_len
    return io.BufferedReader(FileWindow(fd, start, info.file_size), buffer_size)
