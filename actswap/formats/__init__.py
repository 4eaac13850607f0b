"""Model formats as backends: one module per format, one ordered list of them.

:data:`BACKENDS` is the only place that knows which formats exist. A path is
read by the first backend that claims it (:func:`backend_for`); a converted
model is saved by the backend that holds it (:func:`backend_of`). To add a
format: subclass :class:`~actswap.formats.base.Backend` and :func:`register`
an instance (docs/architecture.md).

Importing this package imports neither TensorFlow nor Keras: backends import
their loaders inside their methods, so finding a backend (and refusing a bad
path) stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..containers import Format, detect, sniff, unrecognised
from ..errors import UserError
from .base import Backend, ConvertOptions
from .graphdef import GraphDefBackend
from .keras3 import KerasArchiveBackend, KerasH5Backend
from .savedmodel import SavedModelBackend
from .tfkeras import TfKerasH5Backend, TfKerasSavedModelBackend

# Order matters: a Keras 2 SavedModel is also a SavedModel, and a nested
# Keras 2 .h5 also an HDF5 file Keras 3 would try (and fail) to read.
BACKENDS: list[Backend] = [
    KerasArchiveBackend(),
    TfKerasH5Backend(),
    KerasH5Backend(),
    TfKerasSavedModelBackend(),
    SavedModelBackend(),
    GraphDefBackend(),
]


def register(backend: Backend, *, first: bool = True) -> Backend:
    """Add a backend; ``first`` (default) lets it claim paths before the built-in ones."""
    BACKENDS.insert(0 if first else len(BACKENDS), backend)
    return backend


def unregister(backend: Backend) -> None:
    BACKENDS.remove(backend)


def backend_for(path: str | os.PathLike[str]) -> Backend:
    """The backend that reads ``path``, judged by content.

    Raises :class:`UserError` (exit 2) for a missing path, a special file,
    damaged content or content no backend claims."""
    p = Path(path)
    container = sniff(p)
    for backend in BACKENDS:
        if backend.claims(p, container):
            return backend
    raise unrecognised(p)


def backend_of(converted: Any) -> Backend:
    """The backend whose ``save`` writes ``converted`` (what ``convert`` returned)."""
    for backend in BACKENDS:
        if backend.holds(converted):
            return backend
    raise UserError(f"cannot save a {type(converted).__name__}; pass what actswap.convert returned")


def load_keras_model(path: str | os.PathLike[str], *, trust_code: bool = False) -> tuple[Any, list[str]]:
    """Load a model file that Keras 3 reads, safely (scan, then Keras safe mode);
    also return notes on what could not be restored. Other formats are refused
    (exit 2) with what to do; an unsafe file is refused as unsafe first.

    ``trust_code=True`` (the CLI's loudly-warned ``--trust-code``) lets the
    scan's code findings through and Keras deserialize code (Lambda layers)
    from the file; a malformed file is refused regardless."""
    from ..errors import UnsupportedFormatError
    from .base import KERAS_MODEL

    p = Path(path)
    backend = backend_for(p)
    if not backend.supports(KERAS_MODEL):
        backend.check(p, trust_code)
        raise UnsupportedFormatError(
            f"'{p}' is {backend.description}, not a Keras 3 model file; pass its path to "
            "actswap.convert or actswap.inspect, which rewrite it in its own format"
        )
    return backend.load(p, trust_code)


def backends_with(feature: str) -> list[Backend]:
    return [b for b in BACKENDS if b.supports(feature)]


__all__ = [
    "BACKENDS", "Backend", "ConvertOptions", "Format", "backend_for", "backend_of", "backends_with",
    "detect", "load_keras_model", "register", "unregister",
]
