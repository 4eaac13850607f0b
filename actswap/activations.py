"""actswap's square and polynomials as Keras objects, written with ``keras.ops``
so that they run, differentiate and train on every Keras 3 backend
(TensorFlow, JAX, PyTorch); the gradient override is ``keras.ops.custom_gradient``.

Three faces of the square, all registered with Keras under the ``actswap``
package so that a converted model reloads after ``import actswap`` with no
``custom_objects``:

* :func:`square` -- a plain activation function (exact gradient), usable as
  ``Dense(..., activation=actswap.activations.square)``;
* :class:`SquareActivation` -- a callable object carrying a gradient mode,
  usable as ``activation=SquareActivation("clip:1")``; serialized with its mode;
* :class:`Square` -- a layer carrying a gradient mode; what ``Activation('relu')``,
  ``ReLU()`` and ``keras.ops.relu(x)`` sites become.

And the polynomials: :class:`PolynomialActivation` (fixed coefficients) and
:class:`Polynomial` (a layer; fixed or trainable coefficients).

Invariants: the forward value is always ``x * x`` (``keras.ops.square``: the
graph's ``Square``, exported to ONNX as ``Mul(x, x)``, never ``Pow``) or the
polynomial in Horner form (multiplications and additions only); the gradient
mode changes only the backward pass. A user gradient function ``grad(x, dy)``
receives backend tensors: write it with ``keras.ops`` to keep it portable.
TensorFlow graphs (SavedModels, GraphDefs, tf_keras) use :mod:`actswap.tf_ops`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import keras
import numpy as np
from keras import ops

from . import gradients

GradFn = Callable[[Any, Any], Any]
Grad = Union[str, GradFn]

PACKAGE = "actswap"


# Every op of the square's backward pass reads dy: an op that read only x could
# be scheduled in a graph's forward pass and keep one more activation-sized
# tensor alive until the backward pass reached it (issue 8; TensorFlow graphs
# use a control dependency for this, keras.ops has none). The values are those
# of dy * 2x and dy * clip(2x, -c, c) bit for bit: scaling by 2 is exact, and
# clip(dy·2x, -c|dy|, c|dy|) rounds the one product dy·c (or dy·2x) that the
# other form rounds.


def _exact(x: Any, dy: Any) -> Any:
    return ops.multiply(ops.multiply(dy, x), 2.0)


def _clipped(bound: float) -> GradFn:
    def grad(x: Any, dy: Any) -> Any:
        limit = ops.multiply(ops.abs(dy), bound)
        return ops.minimum(ops.maximum(ops.multiply(ops.multiply(dy, x), 2.0), -limit), limit)

    return grad


def grad_function(grad: Grad) -> GradFn:
    """Resolve a gradient mode string, or a user ``grad(x, dy) -> dx``, to a function."""
    return gradients.resolve(grad, _exact, _clipped)


def _upstream(args: tuple, upstream: Any) -> Any:
    # TensorFlow and JAX pass the upstream gradient positionally; PyTorch as upstream=.
    return args[0] if upstream is None else upstream


def square_op(x: Any, grad: Grad = "exact") -> Any:
    """x * x with the backward pass given by ``grad`` (a mode string or a function).

    Always a ``keras.ops.custom_gradient``, the exact mode included: the
    gradient is actswap's to define (and a user's to override), in every mode.
    The forward returns its gradient function on every path (PyTorch's
    ``custom_gradient`` silently gives a NaN gradient to a forward that does not).
    """
    backward = grad_function(grad)

    @ops.custom_gradient
    def _square(t: Any) -> tuple[Any, Callable[..., Any]]:
        def _grad(*args: Any, upstream: Any = None) -> Any:
            return backward(t, _upstream(args, upstream))

        return ops.square(t), _grad

    return _square(ops.convert_to_tensor(x))


def scaled_square(x: Any, backward: Any, scale: float) -> Any:
    """``scale * x²``: the square (its gradient mode kept), then a constant.

    ``scale`` is what accuracy recovery leaves at a site of a deep network
    (:mod:`actswap.recover`): x² times a per-site constant, one ciphertext
    multiplication plus one plaintext scalar under HE. 1 is the plain square."""
    y = square_op(x, backward)
    return y if scale == 1.0 else ops.multiply(y, ops.cast(scale, y.dtype))


# --- polynomials -----------------------------------------------------------


def polynomial_coefficients(coeffs: Any) -> tuple[float, ...]:
    """Ascending coefficients as floats, trailing zeros dropped; degree >= 1 (ValueError)."""
    c = tuple(float(v) for v in coeffs)
    while len(c) > 1 and c[-1] == 0.0:
        c = c[:-1]
    if len(c) < 2:
        raise ValueError(f"a polynomial activation needs degree >= 1, got coefficients {coeffs!r}")
    return c


def derivative(coeffs: tuple[float, ...]) -> tuple[float, ...]:
    """The derivative's ascending coefficients (at least two: a constant is (c, 0))."""
    d = tuple(k * c for k, c in enumerate(coeffs))[1:]
    return d if len(d) > 1 else d + (0.0,)


def horner(x: Any, coeffs: Any) -> Any:
    """sum(c_k x^k) in Horner form: degree-many multiplications by x, and only
    the additions and coefficient multiplications that are not by 0 or 1, so
    an exporter sees Mul/Add only (x² is exactly ``Mul(x, x)``). A single
    coefficient (degree 0) is returned as it is, a constant for the caller to
    broadcast."""
    coeffs = tuple(float(c) for c in coeffs)
    if len(coeffs) == 1:
        return coeffs[0]
    y = x if coeffs[-1] == 1.0 else x * coeffs[-1]
    for c in reversed(coeffs[1:-1]):
        if c != 0.0:
            y = y + c
        y = y * x
    if coeffs[0] != 0.0:
        y = y + coeffs[0]
    return y


def _poly_grad(coeffs: tuple[float, ...], grad: Grad) -> GradFn:
    if callable(grad):
        return grad
    bound = gradients.clip_bound(gradients.normalize(grad))
    slope_coeffs = derivative(coeffs)

    def backward(x: Any, dy: Any) -> Any:
        # A constant slope (p linear) needs no Horner pass; only then. A zero
        # linear term alone (x³, or the odd fits of tanh: c1·x + c3·x³) is not it.
        constant = all(s == 0.0 for s in slope_coeffs[1:])
        slope = ops.zeros_like(x) + slope_coeffs[0] if constant else horner(x, slope_coeffs)
        if bound is not None:
            slope = ops.clip(slope, -bound, bound)
        return ops.multiply(dy, slope)

    return backward


def poly_op(x: Any, coeffs: Any, grad: Grad = "exact") -> Any:
    """p(x) = sum(coeffs[k] * x**k), Horner form, backward p'(x)*dy (or clipped, or ``grad``)."""
    c = polynomial_coefficients(coeffs)
    backward = _poly_grad(c, grad)

    @ops.custom_gradient
    def _poly(t: Any) -> tuple[Any, Callable[..., Any]]:
        def _grad(*args: Any, upstream: Any = None) -> Any:
            return backward(t, _upstream(args, upstream))

        return horner(t, c), _grad

    return _poly(ops.convert_to_tensor(x))


def trainable_poly_op(x: Any, coeffs: Any, grad: Grad = "exact") -> Any:
    """p(x) with coefficient *tensors* (ascending; shape (n,) or (n, channels)).

    Backward: the gradient mode applies to x (p'(x), exact or clipped); the
    coefficients get their exact gradient, sum(dy * x**k) over every axis they
    are broadcast along.
    """
    clip = None if callable(grad) else gradients.clip_bound(gradients.normalize(grad))
    n = int(coeffs.shape[0])

    @ops.custom_gradient
    def _poly(t: Any, c: Any) -> tuple[Any, Callable[..., Any]]:
        y = t * c[n - 1]
        for k in range(n - 2, 0, -1):
            y = (y + c[k]) * t
        y = y + c[0]

        def _grad(*args: Any, upstream: Any = None) -> tuple[Any, Any]:
            dy = _upstream(args, upstream)
            if callable(grad):
                dx = grad(t, dy)
            else:
                slope = ops.zeros_like(t) + c[n - 1] * (n - 1)
                for k in range(n - 2, 0, -1):
                    slope = slope * t + c[k] * k
                if clip is not None:
                    slope = ops.clip(slope, -clip, clip)
                dx = dy * slope
            axes = tuple(range(len(t.shape) - (len(c.shape) - 1)))
            powers = [ops.ones_like(t)]
            for _ in range(1, n):
                powers.append(powers[-1] * t)
            dc = ops.stack([ops.sum(dy * p, axis=axes) for p in powers])
            return dx, dc

        return y, _grad

    return _poly(ops.convert_to_tensor(x), ops.convert_to_tensor(coeffs))


def _with_grad(config: dict[str, Any]) -> dict[str, Any]:
    """A layer's config with its gradient mode deserialized (a copy)."""
    return {**config, "grad": _deserialize_grad(config.get("grad", "exact"))}


@keras.saving.register_keras_serializable(package=PACKAGE, name="PolynomialActivation")
class PolynomialActivation:
    """A fixed polynomial (ascending coefficients) as an ``activation=`` object."""

    def __init__(self, coefficients: Any, grad: Grad = "exact") -> None:
        self.coefficients = polynomial_coefficients(coefficients)
        self.grad = gradients.normalize(grad) if isinstance(grad, str) else grad
        self.__name__ = "polynomial"

    def __call__(self, x: Any) -> Any:
        return poly_op(x, self.coefficients, self.grad)

    def get_config(self) -> dict[str, Any]:
        return {"coefficients": list(self.coefficients), "grad": _serialize_grad(self.grad)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PolynomialActivation:
        return cls(config["coefficients"], _deserialize_grad(config.get("grad", "exact")))


@keras.saving.register_keras_serializable(package=PACKAGE, name="Polynomial")
class Polynomial(keras.layers.Layer):
    """Layer computing a polynomial of its input, ascending ``coefficients``.

    Fixed by default. ``trainable_coefficients=True`` makes the coefficients a
    weight (initialised to ``coefficients``; per channel of the last axis with
    ``per_channel=True``) that a ``fit`` trains; ``Dense(activation=Polynomial(...))``
    works too, the weight then belonging to the Dense layer's activation.
    """

    # Weights a target layer creates are its own, not copies of the original
    # model's; the rewriting engine leaves them out of its copy and checks.
    actswap_target = True

    def __init__(
        self,
        coefficients: Any,
        grad: Grad = "exact",
        cast_inputs: bool = True,
        trainable_coefficients: bool = False,
        per_channel: bool = False,
        channels: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True
        self.coefficients = polynomial_coefficients(coefficients)
        self.grad = gradients.normalize(grad) if isinstance(grad, str) else grad
        self.cast_inputs = bool(cast_inputs)
        self._convert_input_args = self.cast_inputs
        self.trainable_coefficients = bool(trainable_coefficients)
        self.per_channel = bool(per_channel)
        self.coefficient_weights = None
        self.channels = channels
        if self.trainable_coefficients and (not self.per_channel or channels):
            # Built now: as another layer's activation= it must own its weight
            # before that layer is built and locks its state.
            self.build((None, channels or 1))

    def build(self, input_shape: Any) -> None:
        if self.trainable_coefficients and self.coefficient_weights is None:
            n = len(self.coefficients)
            shape = (n, int(input_shape[-1])) if self.per_channel else (n,)
            init = np.broadcast_to(np.asarray(self.coefficients, "float32").reshape((n,) + (1,) * (len(shape) - 1)), shape)
            self.coefficient_weights = self.add_weight(
                name="coefficients", shape=shape, initializer=keras.initializers.Constant(init.copy()),
                trainable=True,
            )

    def call(self, inputs: Any, mask: Any = None) -> Any:
        if self.coefficient_weights is not None:
            c = ops.cast(self.coefficient_weights, inputs.dtype)
            return trainable_poly_op(inputs, c, self.grad)
        return poly_op(inputs, self.coefficients, self.grad)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            coefficients=list(self.coefficients), grad=_serialize_grad(self.grad), cast_inputs=self.cast_inputs,
            trainable_coefficients=self.trainable_coefficients, per_channel=self.per_channel,
            channels=self.channels,
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Polynomial:
        return cls(**_with_grad(config))


def _serialize_grad(grad: Grad) -> Any:
    if isinstance(grad, str):
        return gradients.normalize(grad)
    # A user function must be registered with keras.saving.register_keras_serializable
    # for the model to save; Keras raises a clear error otherwise.
    return keras.saving.serialize_keras_object(grad)


def _deserialize_grad(value: Any) -> Grad:
    if isinstance(value, str):
        return gradients.normalize(value)
    return keras.saving.deserialize_keras_object(value)


def _scale_config(scale: float) -> dict[str, float]:
    # Written only when it is not 1, so plain squares keep the configs they always had.
    return {} if scale == 1.0 else {"scale": scale}


@keras.saving.register_keras_serializable(package=PACKAGE, name="square")
def square(x: Any) -> Any:
    """x², exact gradient. A Keras activation: ``Dense(4, activation=square)``."""
    return square_op(x, "exact")


@keras.saving.register_keras_serializable(package=PACKAGE, name="SquareActivation")
class SquareActivation:
    """x² as an activation object carrying its gradient mode.

    ``Dense(4, activation=SquareActivation("clip:1"))`` saves the mode in the
    layer's config and reloads with it.
    """

    def __init__(self, grad: Grad = "exact", scale: float = 1.0) -> None:
        self.grad = gradients.normalize(grad) if isinstance(grad, str) else grad
        self._backward = grad_function(self.grad)
        self.scale = float(scale)
        self.__name__ = "square"  # Keras and repr look for a function-like name

    def __call__(self, x: Any) -> Any:
        return scaled_square(x, self._backward, self.scale)

    def get_config(self) -> dict[str, Any]:
        return {"grad": _serialize_grad(self.grad), **_scale_config(self.scale)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SquareActivation:
        return cls(grad=_deserialize_grad(config.get("grad", "exact")), scale=config.get("scale", 1.0))

    def __repr__(self) -> str:
        return f"SquareActivation(grad={self.grad!r}" + (f", scale={self.scale!r})" if self.scale != 1.0 else ")")


@keras.saving.register_keras_serializable(package=PACKAGE, name="Square")
class Square(keras.layers.Layer):
    """Layer computing x², with gradient mode ``grad`` ("exact", "clip:C" or a function).

    Accepts and propagates a mask, like the ``ReLU``/``Activation`` layers it
    replaces, so it can stand in any node they stood in. ``cast_inputs=False``
    makes it compute in its input's dtype, as the ``keras.ops.relu`` operation it
    may replace did (a layer would otherwise cast to its dtype policy).
    """

    def __init__(self, grad: Grad = "exact", cast_inputs: bool = True, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True
        self.cast_inputs = bool(cast_inputs)
        self._convert_input_args = self.cast_inputs
        self.grad = gradients.normalize(grad) if isinstance(grad, str) else grad
        self._backward = grad_function(self.grad)
        self.scale = float(scale)

    def call(self, inputs: Any, mask: Any = None) -> Any:
        return scaled_square(inputs, self._backward, self.scale)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["grad"] = _serialize_grad(self.grad)
        config["cast_inputs"] = self.cast_inputs
        config.update(_scale_config(self.scale))
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Square:
        return cls(**_with_grad(config))
