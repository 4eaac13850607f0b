"""The ``Blend`` layer: ``(1 - a)·source(x) + a·p(x)``, a site on its way from
its source activation to a polynomial (:mod:`actswap.recover.blend`).

Its own module, importing only Keras, because it is registered
with Keras the moment Keras is imported (the hook in :mod:`actswap`): a model
saved mid-recovery must load after ``import actswap`` alone, and the hook must
not import the engine (:mod:`actswap.sites`, :mod:`actswap.rewrite`), which
may itself be what is importing Keras.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

SQUARE = (0.0, 0.0, 1.0)


@keras.saving.register_keras_serializable(package="actswap", name="Blend")
class Blend(keras.layers.Layer):
    """``(1 - a) * source(x) + a * p(x)``; ``a`` is the weight ``blend`` (starts at 0).

    For x² (``coefficients`` (0, 0, 1)), ``p(x) = scale * (x + shift)²``: the
    shifted square that :func:`finalize` turns into ``Square(scale=scale)``
    with ``shift`` folded into the layer producing x (:mod:`actswap.recover.shifts`);
    both are constants of the config.
    """

    actswap_target = True  # its weight is its own, not a copy of the original's

    def __init__(self, source: Any, coefficients: Any, scale: float = 1.0, shift: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True
        self.source_config = source
        self.source = keras.activations.get(source)
        self.coefficients = tuple(float(c) for c in coefficients)
        self.is_square = self.coefficients == SQUARE
        if not self.is_square and (scale != 1.0 or shift != 0.0):
            raise ValueError(f"scale and shift are for x² only, not the polynomial {self.coefficients}")
        self.scale, self.shift = float(scale), float(shift)
        self.factor = self.add_weight(
            name="blend", shape=(), initializer="zeros", trainable=False,
        )
        # Largest |input| of the last training batch: what the guard watches.
        self.peak = self.add_weight(name="peak", shape=(), initializer="zeros", trainable=False,
                                    aggregation="mean")

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        from ..activations import poly_op

        a = ops.cast(self.factor, inputs.dtype)
        if training:
            self.peak.assign(ops.cast(ops.max(ops.abs(ops.stop_gradient(inputs))), "float32"))
        if self.is_square:
            p = poly_op(inputs + self.shift if self.shift else inputs, SQUARE) * self.scale
        else:
            p = poly_op(inputs, self.coefficients)
        return (1.0 - a) * self.source(inputs) + a * p

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = {**super().get_config(), "source": self.source_config, "coefficients": list(self.coefficients)}
        if self.is_square:
            config.update(scale=self.scale, shift=self.shift)
        return config
