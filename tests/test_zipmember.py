"""actswap.zipmember: the window on an uncompressed zip member that the scan and
the write verification both open with h5py. Reference: zipfile's own reading."""

from __future__ import annotations

import os
import zipfile

import pytest

from actswap.zipmember import stored_member


def _zip(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_reads_exactly_the_member_bytes_and_seeks_within_it(tmp_path):
    members = {"a.txt": b"first" * 1000, "model.weights.h5": bytes(range(256)) * 300, "z": b"last"}
    path = tmp_path / "m.zip"
    _zip(path, members)
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            reader = stored_member(f.fileno(), info, buffer_size=64)
            assert reader.read() == z.read(info)  # never runs into the next member
            reader.seek(-10, os.SEEK_END)
            assert reader.read() == members[info.filename][-10:]
            reader.seek(3)
            assert reader.read(5) == members[info.filename][3:8]
        # pread: the descriptor's own offset is untouched, so other readers are not disturbed
        assert f.tell() == 0


def test_compressed_member_is_not_windowed(tmp_path):
    path = tmp_path / "c.zip"
    _zip(path, {"w.h5": b"x" * 5000}, compression=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        assert stored_member(f.fileno(), z.getinfo("w.h5")) is None


@pytest.mark.parametrize("damage", [b"XXXX", b""])
def test_damaged_local_header_gives_none(tmp_path, damage):
    path = tmp_path / "d.zip"
    _zip(path, {"w.h5": b"y" * 100})
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("w.h5")
    data = bytearray(path.read_bytes())
    if damage:
        data[info.header_offset: info.header_offset + 4] = damage
    else:
        del data[info.header_offset + 10:]  # header cut short
    path.write_bytes(bytes(data))
    with open(path, "rb") as f:
        assert stored_member(f.fileno(), info) is None
