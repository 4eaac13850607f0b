"""Polynomial stand-ins for the non-polynomial parts of a transformer.

:class:`PolySoftmax` (and the activation :class:`PolySoftmaxActivation`),
:class:`PolyMultiHeadAttention` and :class:`PolyAttention` replace a softmax
and the softmax inside ``MultiHeadAttention`` / ``Attention`` by functions a
CKKS scheme evaluates; the normalisation layers are in
:mod:`actswap.normalization`, on the helpers here (:class:`Blendable`,
:func:`as_numpy`; :func:`~actswap.activations.horner`).

Invariants, relied on by conversion, recovery and encrypted inference:

* The forward pass never divides by data: the polynomial branch is additions,
  multiplications by constants and multiplications of tensors (squares are
  written ``t * t``, so an ONNX export shows ``Mul``, never ``Pow``, ``Exp``,
  ``Sqrt`` or ``Div``). Means are sums times the constant ``1 / n``.
* Every constant (``shift``, ``scale``, ``coefficients``) is a Python float of
  the config, never a weight: the encrypted runtime reads it from the config.
* In blend mode (``blend=True``) the output is ``(1 - a) * exact(x) + a * poly(x)``
  with ``a`` the non-trainable weight ``blend``; it and ``peak`` (largest
  |input| of the last training batch, read by recovery's guard) are the
  layer's OWN weights (:meth:`actswap_own_weights`). Every other weight is a
  copy of the original Keras layer's, created by the Keras parent class in the
  same order and shapes, so the original's weights can be set as they are.
* Only ``keras.ops`` is used (no TensorFlow import), so the layers run on every
  Keras backend.

Calibration: set ``layer.calibrating = True`` (a plain attribute, not
config), call the model EAGERLY on real data (in calibration the layer outputs
the exact function, so downstream layers see what the original model computes),
then ``layer.finish_calibration()`` sets the constants from the statistics and
resets them. Calls on symbolic or traced tensors (``model.predict``, a
``tf.function``) record nothing, and ``finish_calibration`` then raises rather
than keep the default constants silently. The ``calibrating`` flag is the
caller's: ``finish_calibration`` leaves it as it is.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import keras
import numpy as np
from keras import ops

from .activations import PACKAGE


def shifted_square(x: Any, shift: float, scale: float) -> Any:
    """``scale * (x + shift)**2``, the square written as a product (Mul, not Pow)."""
    t = x + shift
    return (t * t) * scale


def _default_scale(n: int | None, shift: float, what: str) -> float:
    # Zero scores give the uniform distribution 1/n, as a softmax would.
    if n is None:
        raise ValueError(f"scale=None needs the {what} length known when the layer is built; pass scale=")
    if shift == 0.0:
        raise ValueError("scale=None needs a nonzero shift (the default scale is 1 / (n * shift**2))")
    return 1.0 / (n * shift * shift)


def as_numpy(x: Any) -> np.ndarray | None:
    """The float64 value of an eager tensor, None for a symbolic or traced one."""
    if x is None or isinstance(x, keras.KerasTensor):
        return None
    try:
        return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)
    except Exception:  # a graph/jit tracer: calibration records eager calls only
        return None


def _bool_mask(mask: Any) -> Any:
    # keras.layers.Softmax keeps positions where the mask is True or > 0.5.
    if keras.backend.standardize_dtype(mask.dtype) == "bool":
        return mask
    return ops.greater(mask, ops.cast(0.5, mask.dtype))


def _numpy_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    m = np.asarray(ops.convert_to_numpy(mask))
    return np.broadcast_to(m if m.dtype == bool else m > 0.5, shape)


class _SquareSum:
    """Running mean over rows of ``sum_axes (x + shift)**2`` (masked entries count 0;
    fully masked rows are left out): the row sum that ``1 / scale`` must equal."""

    def __init__(self) -> None:
        self.total, self.rows = 0.0, 0

    def record(self, x: Any, mask: Any, axes: tuple[int, ...], shift: float) -> None:
        xs = as_numpy(x)
        if xs is None:
            return
        axes = tuple(a % xs.ndim for a in axes)
        sq = (xs + shift) ** 2
        keep = np.ones(xs.shape, dtype=bool) if mask is None else _numpy_mask(mask, xs.shape)
        live = keep.any(axis=axes)
        self.total += float(np.where(keep, sq, 0.0).sum(axis=axes)[live].sum())
        self.rows += int(live.sum())

    def scale(self, name: str) -> float:
        if self.rows == 0:
            raise RuntimeError(f"'{name}': no calibration data was recorded: set calibrating = True and call "
                               "the model eagerly (model(x), not model.predict) before finish_calibration()")
        mean = self.total / self.rows
        self.total, self.rows = 0.0, 0
        return 1.0 / mean


class Blendable:
    """Blend-mode plumbing shared by the three layers (a mixin on a keras Layer)."""

    actswap_blend_capable = True
    blend: bool

    def _init_blendable(self, blend: bool) -> None:
        # Blend weights come at build, and only in blend mode; calibration is the caller's flag.
        self.blend = bool(blend)
        self.calibrating = False
        self.factor = self.peak = None

    def _add_blend_weights(self) -> None:
        # Created after the parent's weights, and only in blend mode: the rest of
        # the weight list stays that of the original layer.
        if not self.blend or getattr(self, "factor", None) is not None:
            return
        self.factor = self.add_weight(name="blend", shape=(), initializer="zeros", trainable=False)
        self.peak = self.add_weight(name="peak", shape=(), initializer="zeros", trainable=False,
                                    aggregation="mean")

    def actswap_own_weights(self) -> list:
        return [self.factor, self.peak] if self.blend else []

    def _watch(self, x: Any, training: Any) -> None:
        if self.blend and training:
            self.peak.assign(ops.cast(ops.max(ops.abs(ops.stop_gradient(x))), "float32"))

    def _mix(self, exact: Any, poly: Any) -> Any:
        a = ops.cast(self.factor, poly.dtype)
        return (1.0 - a) * exact + a * poly


@keras.saving.register_keras_serializable(package=PACKAGE, name="PolySoftmax")
class PolySoftmax(Blendable, keras.layers.Layer):
    """``scale * (x + shift)**2`` along ``axis``: a softmax normalised by a calibrated
    constant instead of a division (MPCFormer's 2Quad without its division).

    ``scale=None`` becomes ``1 / (n * shift**2)`` at build (n: the size along
    ``axis``), i.e. a uniform distribution for zero inputs. Masked positions
    (mask False) output 0, as keras.layers.Softmax does.
    """

    def __init__(self, axis: int | Sequence[int] = -1, shift: float = 5.0, scale: float | None = None,
                 blend: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.axis = tuple(int(a) for a in axis) if isinstance(axis, (list, tuple)) else int(axis)
        self.shift = float(shift)
        self.scale = None if scale is None else float(scale)
        self._init_blendable(blend)
        self.supports_masking = True
        self._stats = _SquareSum()
        # The exact branch is Keras' own softmax layer (it has no weights).
        self._softmax = keras.layers.Softmax(axis=self.axis, dtype=self.dtype_policy)

    @property
    def _axes(self) -> tuple[int, ...]:
        return self.axis if isinstance(self.axis, tuple) else (self.axis,)

    def build(self, input_shape: Any) -> None:
        if self.scale is None:
            dims = [input_shape[a] for a in self._axes]
            n = None if any(d is None for d in dims) else math.prod(dims)
            self.scale = _default_scale(n, self.shift, "softmax axis")
        self._add_blend_weights()

    def call(self, inputs: Any, mask: Any = None, training: Any = None) -> Any:
        if self.calibrating:
            self._stats.record(inputs, mask, self._axes, self.shift)
            return self._softmax(inputs, mask=mask)
        self._watch(inputs, training)
        poly = shifted_square(inputs, self.shift, self.scale)
        if mask is not None:
            poly = ops.where(_bool_mask(mask), poly, ops.zeros_like(poly))
        return self._mix(self._softmax(inputs, mask=mask), poly) if self.blend else poly

    def finish_calibration(self) -> None:
        self.scale = self._stats.scale(self.name)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        axis = list(self.axis) if isinstance(self.axis, tuple) else self.axis
        return {**super().get_config(), "axis": axis, "shift": self.shift, "scale": self.scale,
                "blend": self.blend}


@keras.saving.register_keras_serializable(package=PACKAGE, name="PolySoftmaxActivation")
class PolySoftmaxActivation:
    """``scale * (x + shift)**2`` as an activation object, for ``Dense(..., activation=softmax)``
    sites (a softmax over the last axis); ``scale`` (the calibrated 1 / row sum) is required."""

    def __init__(self, shift: float = 5.0, *, scale: float) -> None:
        self.shift, self.scale = float(shift), float(scale)
        self.__name__ = "poly_softmax"  # Keras and repr look for a function-like name

    def __call__(self, x: Any) -> Any:
        return shifted_square(x, self.shift, self.scale)

    def get_config(self) -> dict[str, Any]:
        return {"shift": self.shift, "scale": self.scale}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PolySoftmaxActivation:
        return cls(**config)

    def __repr__(self) -> str:
        return f"PolySoftmaxActivation(shift={self.shift!r}, scale={self.scale!r})"


@keras.saving.register_keras_serializable(package=PACKAGE, name="PolyMultiHeadAttention")
class PolyMultiHeadAttention(Blendable, keras.layers.MultiHeadAttention):
    """MultiHeadAttention whose attention probabilities are ``scale * (scores + shift)**2``.

    Always the explicit einsum path (never ``ops.dot_product_attention`` or flash
    attention, which hide the softmax). ``scale=None`` becomes ``1 / (S * shift**2)``
    with S the number of key positions. The weights are the parent's, built by
    the parent's ``build``; ``blend``/``peak`` are added only in blend mode.
    """

    def __init__(self, num_heads: int, key_dim: int, shift: float = 5.0, scale: float | None = None,
                 blend: bool = False, **kwargs: Any) -> None:
        super().__init__(num_heads, key_dim, **kwargs)
        self.shift = float(shift)
        self.scale = None if scale is None else float(scale)
        self._init_blendable(blend)
        self._stats = _SquareSum()

    def build(self, query_shape: Any, value_shape: Any, key_shape: Any = None) -> None:
        super().build(query_shape, value_shape, key_shape)
        # The projected key is value_shape[:-1] + (heads, key_dim): its attention
        # axes index the same dims of value_shape. Unknown here: set on first call.
        self._set_default_scale(value_shape, strict=False)
        self._add_blend_weights()

    def _set_default_scale(self, key_shape: Any, strict: bool) -> None:
        if self.scale is not None:
            return
        dims = [key_shape[a] for a in self._attention_axes]
        if any(d is None for d in dims) and not strict:
            return
        self.scale = _default_scale(None if None in dims else math.prod(dims), self.shift, "key")

    def _compute_attention(self, query: Any, key: Any, value: Any, attention_mask: Any = None,
                           training: Any = None, return_attention_scores: bool = False,
                           use_causal_mask: bool = False) -> Any:
        # The parent's explicit path, with the softmax swapped.
        if use_causal_mask:
            causal_mask = self._compute_causal_mask(query, value)
            attention_mask = (causal_mask if attention_mask is None
                              else ops.logical_and(ops.cast(attention_mask, "bool"), causal_mask))
        self._set_default_scale(key.shape, strict=True)
        query = ops.multiply(query, ops.cast(self._inverse_sqrt_key_dim, query.dtype))
        scores = ops.einsum(self._dot_product_equation, key, query)
        if attention_mask is not None:
            # Broadcast from the heads axis on, as the parent's _masked_softmax does.
            attention_mask = ops.cast(attention_mask, "bool")
            for _ in range(len(scores.shape) - len(attention_mask.shape)):
                attention_mask = ops.expand_dims(attention_mask, axis=-len(self._attention_axes) * 2 - 1)
        key_axes = tuple(range(len(scores.shape) - len(self._attention_axes), len(scores.shape)))
        if self.calibrating:
            self._stats.record(scores, attention_mask, key_axes, self.shift)
            probs = self._masked_softmax(scores, attention_mask)
        else:
            self._watch(scores, training)
            probs = shifted_square(scores, self.shift, self.scale)
            if attention_mask is not None:
                probs = ops.where(attention_mask, probs, ops.zeros_like(probs))
            if self.blend:
                probs = self._mix(self._masked_softmax(scores, attention_mask), probs)
        final = self._dropout_layer(probs, training=training) if self._dropout > 0.0 else probs
        attention_output = ops.einsum(self._combine_equation, final, value)
        return attention_output, probs

    def finish_calibration(self) -> None:
        self.scale = self._stats.scale(self.name)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "shift": self.shift, "scale": self.scale, "blend": self.blend}


@keras.saving.register_keras_serializable(package=PACKAGE, name="PolyAttention")
class PolyAttention(Blendable, keras.layers.Attention):
    """``keras.layers.Attention`` (dot-product scores) whose attention weights are
    ``square_scale * (scores + shift)**2``. (``scale`` is the parent's own
    trainable score scale, kept as it is.) ``score_mode="concat"`` has no
    polynomial form: its scores pass through tanh. ``square_scale=None``
    becomes ``1 / (Tv * shift**2)``, Tv the number of value positions."""

    def __init__(self, shift: float = 5.0, square_scale: float | None = None, blend: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.score_mode != "dot":
            raise ValueError(f"score_mode={self.score_mode!r}: its scores pass through tanh, not a polynomial")
        self.shift = float(shift)
        self.square_scale = None if square_scale is None else float(square_scale)
        self._init_blendable(blend)
        self._stats = _SquareSum()

    def build(self, input_shape: Any) -> None:
        super().build(input_shape)  # the parent's weights (its score scale) exactly as Keras makes them
        if self.square_scale is None and input_shape[1][1] is not None:
            self.square_scale = _default_scale(input_shape[1][1], self.shift, "value")
        self._add_blend_weights()

    def _apply_scores(self, scores: Any, value: Any, scores_mask: Any = None, training: Any = False) -> Any:
        if self.square_scale is None:
            self.square_scale = _default_scale(scores.shape[-1], self.shift, "value")
        mask = None
        if scores_mask is not None:  # (batch, 1, Tv) or (batch, Tq, Tv), as the parent takes it
            mask = ops.cast(scores_mask if len(scores_mask.shape) == 3 else ops.expand_dims(scores_mask, -2), "bool")
        if self.calibrating:
            self._stats.record(scores, mask, (-1,), self.shift)
            return super()._apply_scores(scores, value, scores_mask, training)
        self._watch(scores, training)
        weights = shifted_square(scores, self.shift, self.square_scale)
        if mask is not None:
            weights = ops.where(mask, weights, ops.zeros_like(weights))
        if self.blend:
            weights = self._mix(super()._apply_scores(scores, value, scores_mask, False)[1], weights)
        if training and self.dropout > 0:
            weights = keras.random.dropout(weights, self.dropout, seed=self.seed_generator)
        return ops.matmul(weights, value), weights

    def finish_calibration(self) -> None:
        self.square_scale = self._stats.scale(self.name)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "shift": self.shift, "square_scale": self.square_scale, "blend": self.blend}


__all__ = ["PolySoftmax", "PolySoftmaxActivation", "PolyMultiHeadAttention", "PolyAttention",
           "shifted_square"]
