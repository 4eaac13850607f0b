"""The one place that imports Keras for the library, and checks its backend.

actswap's activations are TensorFlow code (``tf.custom_gradient``), so the
Keras backend must be TensorFlow. Importing this module also registers
actswap's Keras objects.
"""

from __future__ import annotations

import keras

from .errors import UserError

if keras.backend.backend() != "tensorflow":
    raise UserError(
        f"actswap needs the TensorFlow Keras backend, but KERAS_BACKEND is "
        f"'{keras.backend.backend()}'; unset it or set KERAS_BACKEND=tensorflow"
    )

from . import activations  # noqa: E402,F401  (registers actswap>Square etc.)

__all__ = ["keras"]
