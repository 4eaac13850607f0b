"""Reading a just-written output back as data, before it is moved into place.

:func:`actswap.io.save` (Keras files), the SavedModel writer and the
convert pipeline's output check use these to confirm what was written
without a full load: the activation sites from ``config.json``, the weights
by shape, dtype and CRC-32, a SavedModel's signatures, variables and op
counts from its protobuf and checkpoint. Each returns "cannot confirm"
(None/False) on anything unexpected, and the caller then loads the file to
decide.

Invariant: nothing is deserialized as code, and nothing is written.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import InvariantError
from .registry import POOL_SOURCE
from .report import REPLACED, Report
from .zipmember import stored_member


WEIGHTS_MEMBER = "model.weights.h5"


def _digest(array: Any) -> tuple[Any, ...]:
    import numpy as np  # here: readback is on the CLI's import path, numpy is not needed for --help

    a = np.ascontiguousarray(array)
    return a.shape, a.dtype.str, zlib.crc32(a.reshape(-1).view(np.uint8))


def _stored_digests(path: Path, info: zipfile.ZipInfo) -> Counter[tuple[Any, ...]] | None:
    """(shape, dtype, CRC-32 of the bytes) of every dataset in the zip member
    ``info`` (an HDF5 file); None if the member is compressed."""
    import h5py

    digests: Counter[tuple[Any, ...]] = Counter()
    with open(path, "rb") as f:
        member = stored_member(f.fileno(), info)
        if member is None:
            return None
        with h5py.File(member, "r") as h5:
            def visit(_: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset):
                    digests[_digest(obj[()])] += 1

            h5.visititems(visit)
    return digests


def read_back(model: Any, path: str | os.PathLike[str], verify: bool = True) -> list[Any] | None:
    """The activation sites of the ``.keras`` file at ``path`` that ``model`` was
    just saved to, read as data (``config.json``; nothing is deserialized).

    With ``verify``, returns them only if they are ``model``'s sites (path, form,
    activation) and every weight of ``model`` is stored in the file bit for bit
    (compared by shape, dtype and CRC-32); otherwise, or if the file cannot be
    read this way, returns None and the caller reloads the file to decide.
    This costs a read of the file instead of a Keras load (which rebuilds every
    layer): it is how :func:`actswap.io.save` verifies what it wrote.
    """
    from .sites import config_sites, find_sites

    try:
        with zipfile.ZipFile(path) as z:
            sites = config_sites(json.loads(z.read("config.json")))
            if not verify:
                return sites
            want = {(p, s.form): s.activation for s in find_sites(model) for p in (s.path, *s.also_at)}
            if {(s.path, s.form): s.activation for s in sites} != want:
                return None
            stored = _stored_digests(Path(path), z.getinfo(WEIGHTS_MEMBER))
        if stored is None:
            return None
        needed = Counter(_digest(v.numpy()) for v in model.weights)
    except Exception:  # noqa: BLE001 - anything unexpected: the reload decides
        return None
    return sites if not needed - stored else None



def saved_op_counts(path: str | os.PathLike[str]) -> Counter[str]:
    """How many ops of each type the SavedModel directory ``path`` holds, in its
    graph and every function of its library, read from ``saved_model.pb`` as
    protobuf (nothing is loaded)."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    counts: Counter[str] = Counter()
    for meta in saved.meta_graphs:
        counts.update(node.op for node in meta.graph_def.node)
        for fn in meta.graph_def.library.function:
            counts.update(node.op for node in fn.node_def)
    return counts


def read_back_savedmodel(path: str | os.PathLike[str], signatures: Any, variables: list[Any]) -> bool:
    """Whether the SavedModel directory ``path`` that a converted SavedModel was
    just saved to has exactly the ``signatures`` (names) and stores every one
    of ``variables`` bit for bit (by shape, dtype and CRC-32), read as data: ``saved_model.pb`` as protobuf and
    the variables from the checkpoint, without loading the SavedModel (which
    would restore and re-trace every function). False if that cannot be
    confirmed this way: the caller then loads it to decide."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    try:
        saved = saved_model_pb2.SavedModel()
        saved.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
        if len(saved.meta_graphs) != 1:
            return False
        names = sorted(k for k in saved.meta_graphs[0].signature_def if not k.startswith("__"))
        if names != sorted(signatures):
            return False
        reader = tf.train.load_checkpoint(str(Path(path) / "variables" / "variables"))
        stored = Counter(
            _digest(reader.get_tensor(key)) for key in reader.get_variable_to_shape_map()
            if key.endswith("/.ATTRIBUTES/VARIABLE_VALUE")
        )
        needed = Counter(_digest(v.numpy()) for v in variables)
    except Exception:  # noqa: BLE001 - anything unexpected: the load decides
        return False
    return not needed - stored


def replaced_sites_check(report: Report) -> Callable[[list[Any]], None]:
    """A check of the sites read back from a written Keras model: every site the
    report replaced holds the target ("square" or "poly") at its path."""
    from . import rules

    replaced = [s for s in report.sites if s.action == REPLACED and s.activation != POOL_SOURCE]
    default = "square" if report.target == "square" else "poly"

    def expected(site: Any) -> str:
        rule = rules.rule_for(site.activation, report.target or "")
        return rule.emits[0].source if rule is not None and rule.emits else default

    def check(after: list[Any]) -> None:
        # A layer can hold several sites (activation=, recurrent_activation=).
        got = Counter((s.path, s.activation) for s in after)
        for (path, act), n in Counter((s.path, expected(s)) for s in replaced).items():
            if got[(path, act)] < n:
                found = sorted({s.activation for s in after if s.path == path}) or ["no activation"]
                raise InvariantError(
                    f"the written model has {', '.join(found)} at '{path}' where {act} was put; "
                    "nothing written"
                )

    return check
