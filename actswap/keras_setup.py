"""The one place that imports Keras for the library.

actswap's Keras objects are written with ``keras.ops`` and run on every Keras 3
backend; importing this module also registers them. What needs TensorFlow
itself (TensorFlow graphs, ONNX export through tf2onnx, recovery's training
loop) asks :func:`require_tensorflow` first, which refuses in one line.
"""

from __future__ import annotations

import keras

from . import activations  # noqa: F401  (registers actswap>Square etc.)
from .errors import UserError

__all__ = ["keras", "require_tensorflow"]


def require_tensorflow(what: str) -> None:
    """Raise :class:`UserError` (one line) naming ``what`` when Keras runs on another backend."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise UserError(
            f"{what} needs the TensorFlow Keras backend, but KERAS_BACKEND is '{backend}': run it with "
            "KERAS_BACKEND=tensorflow (the .keras files actswap writes load and train on every backend)"
        )
