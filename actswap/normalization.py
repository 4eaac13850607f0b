"""Polynomial stand-ins for Keras' normalisation layers: :class:`PolyLayerNormalization`
and :class:`PolyRMSNormalization` (``keras.layers.RMSNormalization``).

Each divides by no statistic of its input: ``1/sqrt(v + epsilon)`` (v the
variance, or the mean square) becomes a polynomial ``q(v)``; with one
coefficient ("fixed" normalisation, as in PolyTransformer) the layer is affine
in x, one ciphertext x plaintext product. The invariants of
:mod:`actswap.transformer` hold here too (only ``keras.ops``; constants are
Python floats of the config; in blend mode ``blend``/``peak`` are the layer's
own weights and every other weight is the Keras parent's, in its order;
calibration mode computes the exact function and records v).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import keras
import numpy as np
from keras import ops

from .activations import horner
from .transformer import PACKAGE, Blendable, as_numpy


@contextmanager
def _rms_warning_silenced() -> Iterator[None]:
    # Keras warns that rms_scaling=True is deprecated each time such a layer is
    # made or called. The user's own layer had it (and its load reported it);
    # the layer standing in for it repeats the user's config, not a new choice.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*rms_scaling=True.*")
        yield


def inverse_sqrt_polynomial(mean_v: float, lo: float, hi: float, epsilon: float, degree: int) -> tuple[float, ...]:
    """Ascending coefficients of q(v) ≈ 1/sqrt(v + epsilon) for variances seen in
    [lo, hi] with mean ``mean_v``: the constant at the mean for degree 0 (or
    one variance), else a least-squares fit on Chebyshev nodes (near-minimax)."""
    inverse = 1.0 / math.sqrt(mean_v + epsilon)
    # Below 1e-3 of the largest variance, 1/sqrt(v + eps) is steep and rare:
    # fitting it there would spoil the fit where the data is.
    lo = max(lo, 1e-3 * hi)
    if degree == 0 or not hi > lo * (1 + 1e-6):
        return (inverse,) + (0.0,) * degree  # one variance: the constant is exact
    n = max(64, 8 * (degree + 1))
    v = lo + (hi - lo) * (1 + np.cos(np.pi * (np.arange(n) + 0.5) / n)) / 2
    fit = np.polynomial.Chebyshev.fit(v, 1.0 / np.sqrt(v + epsilon), degree, domain=[lo, hi])
    coef = fit.convert(kind=np.polynomial.Polynomial).coef
    return tuple(float(c) for c in np.pad(coef, (0, degree + 1 - len(coef))))


class _PolyNormalization(Blendable):
    """What both normalisations share (a mixin before the Keras parent): the
    coefficients, the statistic v recorded in calibration, the call."""

    def _init_poly(self, coefficients: Sequence[float], blend: bool) -> None:
        self.coefficients = tuple(float(c) for c in coefficients)
        if not self.coefficients:
            raise ValueError("coefficients must hold at least one number")
        self._init_blendable(blend)
        self._reset_statistics()

    def _reset_statistics(self) -> None:
        self._v_sum, self._v_count, self._v_min, self._v_max = 0.0, 0, math.inf, -math.inf

    def build(self, input_shape: Any) -> None:
        super().build(input_shape)  # the parent's weights exactly as Keras makes them
        self._add_blend_weights()

    def _broadcast(self, w: Any, ndims: int, x: Any) -> Any:
        # The weights span the normalised axes; put them where those axes are.
        shape = [1] * ndims
        for i, a in enumerate(self.axis):  # build sorted self.axis and made w in that order
            shape[a] = w.shape[i]
        return ops.reshape(ops.cast(w, x.dtype), shape)

    def _statistic(self, xs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _exact(self, inputs: Any) -> Any:
        return super().call(inputs)

    def call(self, inputs: Any, training: Any = None) -> Any:
        if self.calibrating:
            self._record(inputs)
            return self._exact(inputs)
        self._watch(inputs, training)
        poly = self._poly(inputs)
        return self._mix(self._exact(inputs), poly) if self.blend else poly

    def _record(self, inputs: Any) -> None:
        xs = as_numpy(inputs)
        if xs is None:
            return
        v = self._statistic(xs)
        self._v_sum += float(v.sum())
        self._v_count += int(v.size)
        self._v_min, self._v_max = min(self._v_min, float(v.min())), max(self._v_max, float(v.max()))

    def finish_calibration(self) -> None:
        if self._v_count == 0:
            raise RuntimeError(f"'{self.name}': no calibration data was recorded: set calibrating = True "
                               "and call the model eagerly (model(x), not model.predict) first")
        mean_v, lo, hi = self._v_sum / self._v_count, self._v_min, self._v_max
        self._reset_statistics()
        self.coefficients = inverse_sqrt_polynomial(mean_v, lo, hi, self.epsilon, len(self.coefficients) - 1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "coefficients": list(self.coefficients), "blend": self.blend}


@keras.saving.register_keras_serializable(package=PACKAGE, name="PolyLayerNormalization")
class PolyLayerNormalization(_PolyNormalization, keras.layers.LayerNormalization):
    """LayerNormalization with ``1/sqrt(v + epsilon)`` replaced by a polynomial ``q(v)``.

    ``coefficients`` are q's, ascending powers. With one coefficient ("fixed"
    normalisation, as in PolyTransformer) the layer is affine in x and costs no
    ciphertext-by-ciphertext product: ``(x - mean) * c0``. With more,
    ``v`` is the variance over ``axis`` and the output ``(x - mean) * q(v)``.

    ``rms_scaling=True`` follows the parent's semantics, not the name's: Keras
    computes ``x * rsqrt(var(x) + epsilon) * gamma`` (the *variance*, uncentred
    x, no beta), so here ``x * q(var(x)) * gamma``; q must stand in for what the
    exact branch computes.
    """

    def __init__(self, coefficients: Sequence[float] = (1.0,), blend: bool = False, **kwargs: Any) -> None:
        with _rms_warning_silenced():
            super().__init__(**kwargs)
        self._init_poly(coefficients, blend)

    def _statistic(self, xs: np.ndarray) -> np.ndarray:
        return xs.var(axis=tuple(self.axis))  # the parent's v, for rms_scaling too

    def _exact(self, inputs: Any) -> Any:
        with _rms_warning_silenced():
            return super()._exact(inputs)

    def _poly(self, inputs: Any) -> Any:
        # At least float32, as the parent computes (half precision loses the variance).
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        ndims = len(x.shape)
        centred = x - ops.mean(x, axis=self.axis, keepdims=True)
        base = x if self.rms_scaling else centred
        if len(self.coefficients) == 1:
            y = base * self.coefficients[0]
        else:
            v = ops.mean(centred * centred, axis=self.axis, keepdims=True)
            y = base * horner(v, self.coefficients)
        if self.gamma is not None:
            y = y * self._broadcast(self.gamma, ndims, x)
        if self.beta is not None:
            y = y + self._broadcast(self.beta, ndims, x)
        return ops.cast(y, self.compute_dtype)


@keras.saving.register_keras_serializable(package=PACKAGE, name="PolyRMSNormalization")
class PolyRMSNormalization(_PolyNormalization, keras.layers.RMSNormalization):
    """RMSNormalization, ``x * rsqrt(mean(x²) + epsilon) * scale``, with the reciprocal
    square root a polynomial ``q`` of the mean square; one coefficient: ``x * c0 * scale``."""

    def __init__(self, coefficients: Sequence[float] = (1.0,), blend: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_poly(coefficients, blend)

    def _statistic(self, xs: np.ndarray) -> np.ndarray:
        return (xs * xs).mean(axis=tuple(self.axis))

    def _poly(self, inputs: Any) -> Any:
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        if len(self.coefficients) == 1:
            y = x * self.coefficients[0]
        else:
            y = x * horner(ops.mean(x * x, axis=self.axis, keepdims=True), self.coefficients)
        y = y * self._broadcast(self.scale, len(x.shape), x)
        return ops.cast(y, self.compute_dtype)
