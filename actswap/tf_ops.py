"""TensorFlow forms of actswap's square and polynomials, for TensorFlow graphs.

The SavedModel and GraphDef rewrites (:mod:`actswap.formats.tf_graphs`,
:mod:`actswap.formats.tf_graphdef`) and the tf_keras objects
(:mod:`actswap.legacy.objects`) put these ops into graphs that only
TensorFlow runs: ``tf.custom_gradient`` where a graph keeps it, and a
``stop_gradient`` form where it does not (``tf.cond`` branches of a reloaded
SavedModel). Keras 3 layers use :mod:`actswap.activations` instead, written
with ``keras.ops`` for every backend.

Invariants: the forward value is ``x * x`` (``Mul``/``Square``, never
``Pow``) or the polynomial in Horner form; the gradient mode changes only the
backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import tensorflow as tf

from . import gradients
from .activations import polynomial_coefficients as _coefficients
from .activations import derivative as _derivative

GradFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
Grad = Union[str, GradFn]


# The local derivative (2x, clipped or not) is computed only once ``dy`` has
# arrived, as TensorFlow's own gradient of Square does: without that control
# dependency a graph computes it as soon as ``x`` exists, during the forward
# pass, and keeps one more activation-sized tensor per site alive until the
# backward pass reaches it (issue 8: the training step's overhead over
# ``tf.square``). Eagerly the dependency is a no-op.


def _exact(x: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    with tf.control_dependencies([dy]):
        slope = x + x
    return dy * slope


def _clipped(bound: float) -> GradFn:
    def grad(x: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
        with tf.control_dependencies([dy]):
            c = tf.cast(bound, x.dtype)
            slope = tf.clip_by_value(x + x, -c, c)
        return dy * slope

    return grad


def grad_function(grad: Grad) -> GradFn:
    """Resolve a gradient mode string, or a user ``grad(x, dy) -> dx``, to a function."""
    return gradients.resolve(grad, _exact, _clipped)


def square_op(x: Any, grad: Grad = "exact") -> tf.Tensor:
    """x * x with the backward pass given by ``grad`` (a mode string or a function).

    Always a ``tf.custom_gradient``, the exact mode included: the gradient is
    actswap's to define (and a user's to override), in every mode. Issue 8's
    profile shows what that costs: an ``IdentityN`` per site that changes how
    grappler fuses the ops around it, and a gradient function per site that
    a SavedModel traces and stores.
    """
    backward = grad_function(grad)

    @tf.custom_gradient
    def _square(t: tf.Tensor) -> tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
        # The gradient closure must not rely on the op (it is not there after a
        # SavedModel reload), only on the captured input.
        def _grad(dy: tf.Tensor) -> tf.Tensor:
            return backward(t, dy)

        return tf.math.square(t), _grad

    return _square(tf.convert_to_tensor(x))


def square_op_without_custom_gradient(x: Any, grad: str = "exact") -> tf.Tensor:
    """x * x with the same backward pass as :func:`square_op`, written with stop_gradient.

    For places where a ``tf.custom_gradient`` does not survive a SavedModel
    reload (ops inside ``tf.cond`` branches in TF 2.21). The forward value is
    ``x * x`` plus an exact zero (``a - a``), so it equals ``x * x`` for every
    finite x. Only the mode strings are supported: a user gradient function
    needs ``tf.custom_gradient``.
    """
    mode = gradients.normalize(grad)
    x = tf.convert_to_tensor(x)
    bound = gradients.clip_bound(mode)
    if bound is None:
        return tf.math.square(x)  # Square's own gradient: dy * 2x, the exact one
    slope = tf.stop_gradient(tf.clip_by_value(x + x, -bound, bound))
    linear = slope * x
    return tf.stop_gradient(tf.math.square(x)) + (linear - tf.stop_gradient(linear))


# --- polynomials -----------------------------------------------------------


def horner(x: tf.Tensor, coeffs: tuple[float, ...]) -> tf.Tensor:
    """sum(c_k x^k) in Horner form: degree-many multiplications by x, and only
    the additions and coefficient multiplications that are not by 0 or 1, so
    an exporter sees Mul/Add only (x² is exactly ``Mul(x, x)``)."""
    y = x if coeffs[-1] == 1.0 else x * tf.cast(coeffs[-1], x.dtype)
    for c in reversed(coeffs[1:-1]):
        if c != 0.0:
            y = y + tf.cast(c, x.dtype)
        y = y * x
    if coeffs[0] != 0.0:
        y = y + tf.cast(coeffs[0], x.dtype)
    return y


def _poly_grad(coeffs: tuple[float, ...], grad: Grad) -> GradFn:
    if callable(grad):
        return grad
    bound = gradients.clip_bound(gradients.normalize(grad))
    slope_coeffs = _derivative(coeffs)

    def backward(x: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
        with tf.control_dependencies([dy]):  # not during the forward pass (see _exact)
            slope = _horner_any(x, slope_coeffs)
            if bound is not None:
                c = tf.cast(bound, x.dtype)
                slope = tf.clip_by_value(slope, -c, c)
        return dy * slope

    return backward


def _horner_any(x: tf.Tensor, coeffs: tuple[float, ...]) -> tf.Tensor:
    # Derivatives may be constant (degree 0): broadcast that constant.
    if len(coeffs) == 2 and coeffs[1] == 0.0:
        return tf.zeros_like(x) + tf.cast(coeffs[0], x.dtype)
    return horner(x, coeffs)


def poly_op(x: Any, coeffs: Any, grad: Grad = "exact") -> tf.Tensor:
    """p(x) = sum(coeffs[k] * x**k), Horner form, backward p'(x)*dy (or clipped, or ``grad``)."""
    c = _coefficients(coeffs)
    backward = _poly_grad(c, grad)

    @tf.custom_gradient
    def _poly(t: tf.Tensor) -> tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
        def _grad(dy: tf.Tensor) -> tf.Tensor:
            return backward(t, dy)

        return horner(t, c), _grad

    return _poly(tf.convert_to_tensor(x))


def poly_op_without_custom_gradient(x: Any, coeffs: Any, grad: str = "exact") -> tf.Tensor:
    """:func:`poly_op` written with stop_gradient, for tf.cond/while bodies of SavedModels."""
    c = _coefficients(coeffs)
    x = tf.convert_to_tensor(x)
    mode = gradients.normalize(grad)
    if gradients.clip_bound(mode) is None:
        return horner(x, c)
    slope = tf.stop_gradient(_poly_grad(c, mode)(x, tf.ones_like(x)))
    linear = slope * x
    return tf.stop_gradient(horner(x, c)) + (linear - tf.stop_gradient(linear))
