"""Mutators for benchmarks/fuzz.py: bytes, zip members, JSON trees, protobuf
messages, HDF5 attributes. Each takes a ``random.Random`` and returns new
bytes (or writes a new file); none reads anything but its input."""

from __future__ import annotations

import copy
import io
import json
import random
import struct
import zipfile
from pathlib import Path
from typing import Any

INTERESTING_INTS = (0, 1, -1, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, 2**64 - 1, 255, 256, 65535, 10**9)


# --- bytes ---------------------------------------------------------------------------

def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """1-20 byte-level edits: flips, random bytes, interesting integers written
    over a field, inserted or deleted runs, a truncation, a copied block."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 20) if rng.random() < 0.7 else 1):
        if not b:
            b.extend(rng.randbytes(rng.randint(1, 16)))
            continue
        op = rng.randrange(8)
        at = rng.randrange(len(b))
        if op == 0:
            b[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[at] = rng.randrange(256)
        elif op == 2:
            value = rng.choice(INTERESTING_INTS)
            fmt = rng.choice(["<I", "<Q", ">I", "<H", "<i", "<q"])
            try:
                packed = struct.pack(fmt, value)
            except struct.error:
                packed = struct.pack(fmt[0] + fmt[1].upper(), value & ((1 << (8 * struct.calcsize(fmt))) - 1))
            b[at:at + len(packed)] = packed
        elif op == 3:
            b[at:at] = rng.randbytes(rng.randint(1, 64))
        elif op == 4:
            del b[at:at + rng.randint(1, 64)]
        elif op == 5 and rng.random() < 0.3:
            del b[at:]
        elif op == 6:
            n = rng.randint(1, 128)
            src = rng.randrange(len(b))
            b[at:at + n] = b[src:src + n]
        else:
            b[at] = 0
    return bytes(b)


# --- JSON trees ------------------------------------------------------------------------

def _nodes(tree: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.extend(_nodes(v, path + (k,)))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.extend(_nodes(v, path + (i,)))
    return out


def _random_value(rng: random.Random, donor: Any) -> Any:
    choices = [
        None, True, 0, -1, rng.choice(INTERESTING_INTS), 1e308, -1e308, float("nan"), "", "relu",
        "x" * rng.randint(1, 300), [], {}, [None], {"class_name": "Lambda", "config": {}},
        {"class_name": "function", "config": "os.system"}, {"module": "os", "class_name": "system"},
        "../" * 5 + "etc/passwd", [[[[[]]]]],
    ]
    nodes = _nodes(donor)
    if nodes:
        choices.append(copy.deepcopy(_get(donor, rng.choice(nodes))))
    return rng.choice(choices)


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def mutate_json(tree: Any, rng: random.Random) -> Any:
    """1-5 edits of a JSON tree: a value replaced (by another type, an extreme
    number, a hostile-looking object, another node of the tree), a key deleted
    or renamed, a list element dropped or duplicated."""
    tree = copy.deepcopy(tree)
    for _ in range(rng.randint(1, 5)):
        nodes = [p for p in _nodes(tree) if p]
        if not nodes:
            return _random_value(rng, tree)
        path = rng.choice(nodes)
        parent = _get(tree, path[:-1])
        key = path[-1]
        op = rng.randrange(4)
        if op == 0 or not isinstance(parent, (dict, list)):
            parent[key] = _random_value(rng, tree)
        elif op == 1:
            del parent[key]
        elif op == 2 and isinstance(parent, dict):
            parent[rng.choice(["class_name", "config", "module", "registered_name", "name", "layers",
                               "inbound_nodes", "build_config", "dtype", "x" + str(key)])] = parent.pop(key)
        elif isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        else:
            parent[key] = _random_value(rng, tree)
    return tree


def json_bytes(tree: Any, rng: random.Random) -> bytes:
    return json.dumps(mutate_json(tree, rng), allow_nan=True).encode()


# --- zip archives ------------------------------------------------------------------

def mutate_zip(data: bytes, rng: random.Random, json_members: tuple[str, ...] = ()) -> bytes:
    """A zip rewritten with valid CRCs and one member changed: a JSON member's
    tree, another member's bytes, or the member list (dropped, duplicated or
    renamed member)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = [(info, z.read(info)) for info in z.infolist()]
    except Exception:  # noqa: BLE001 - not a zip: bytes then
        return mutate_bytes(data, rng)
    if not members:
        return mutate_bytes(data, rng)
    i = rng.randrange(len(members))
    info, content = members[i]
    op = rng.randrange(10)
    if op < 5 and info.filename in json_members:
        try:
            members[i] = (info, json_bytes(json.loads(content), rng))
        except ValueError:
            members[i] = (info, mutate_bytes(content, rng))
    elif op < 8:
        members[i] = (info, mutate_bytes(content, rng))
    elif op == 8:
        del members[i]
    else:
        new = zipfile.ZipInfo(rng.choice([info.filename, "config.json", "../x", "/abs", "a/" * 50 + "b",
                                          info.filename.upper(), "model.weights.h5"]))
        new.compress_type = info.compress_type
        members.append((new, content))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info, content in members:
            fresh = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            fresh.compress_type = info.compress_type
            z.writestr(fresh, content)
    return out.getvalue()


# --- protobuf ----------------------------------------------------------------------

def mutate_proto(message: Any, rng: random.Random) -> bytes:
    """1-5 edits of a parsed protobuf message: a scalar field set to an extreme or
    random value, a repeated element dropped or duplicated, a message cleared."""
    from google.protobuf.descriptor import FieldDescriptor as F

    def repeated(fd: Any) -> bool:  # protobuf 5+ (upb) has is_repeated; older ones, label
        flag = getattr(fd, "is_repeated", None)
        return bool(flag) if flag is not None else fd.label == F.LABEL_REPEATED

    def fields(msg: Any, depth: int = 0) -> list[tuple[Any, Any]]:
        out = []
        for fd, value in msg.ListFields():
            out.append((msg, fd))
            if depth < 40 and fd.type == F.TYPE_MESSAGE:
                if repeated(fd):
                    if fd.message_type.GetOptions().map_entry:
                        continue
                    for item in list(value)[:50]:
                        out.extend(fields(item, depth + 1))
                else:
                    out.extend(fields(value, depth + 1))
        return out

    for _ in range(rng.randint(1, 5)):
        found = fields(message)
        if not found:
            break
        msg, fd = rng.choice(found)
        try:
            if repeated(fd):
                seq = getattr(msg, fd.name)
                if len(seq) and rng.random() < 0.5:
                    del seq[rng.randrange(len(seq))]
                elif len(seq) and fd.type != F.TYPE_MESSAGE and not fd.message_type:
                    seq.append(seq[0])
                elif len(seq) and fd.type == F.TYPE_MESSAGE and not fd.message_type.GetOptions().map_entry:
                    seq.add().CopyFrom(seq[rng.randrange(len(seq))])
            elif fd.type == F.TYPE_MESSAGE:
                if rng.random() < 0.3:
                    msg.ClearField(fd.name)
            elif fd.type in (F.TYPE_STRING,):
                setattr(msg, fd.name, rng.choice(["", "x" * 1000, "../../etc", "WriteFile", "PyFunc", "\u00e9"]))
            elif fd.type == F.TYPE_BYTES:
                setattr(msg, fd.name, mutate_bytes(getattr(msg, fd.name), rng))
            elif fd.type == F.TYPE_BOOL:
                setattr(msg, fd.name, not getattr(msg, fd.name))
            elif fd.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
                setattr(msg, fd.name, rng.choice([0.0, -1.0, 1e38, float("inf"), float("nan")]))
            elif fd.type == F.TYPE_ENUM:
                setattr(msg, fd.name, rng.choice([v.number for v in fd.enum_type.values]))
            else:  # integers
                bits = 32 if fd.type in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32) else 64
                unsigned = fd.type in (F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_FIXED32, F.TYPE_FIXED64)
                lo, hi = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
                setattr(msg, fd.name, max(lo, min(hi, rng.choice(INTERESTING_INTS + (rng.randint(-5, 100),)))))
        except (TypeError, ValueError, AttributeError):
            continue
    return message.SerializeToString()


# --- HDF5 --------------------------------------------------------------------------

def mutate_h5_config(src: Path, dst: Path, rng: random.Random) -> None:
    """``src`` copied to ``dst`` with its ``model_config`` attribute's JSON tree mutated."""
    import shutil

    import h5py

    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        raw = f.attrs["model_config"]
        tree = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        f.attrs["model_config"] = json.dumps(mutate_json(tree, rng), allow_nan=True)
