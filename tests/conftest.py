"""Shared test helpers.

The numerical reference for every rewrite is *independent* of actswap: the
original model is run with ``tf.nn.relu`` (what every Keras ReLU form calls on
the TensorFlow backend) patched to ``x * x``. For ``clip:C`` gradients the
patched relu is x² in value with a derivative of clip(2x, -C, C), written with
stop_gradient, not with tf.custom_gradient.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(FIXTURES))

import tensorflow as tf  # noqa: E402

import actswap  # noqa: E402,F401  (registers the Keras objects)


def fake_relu(grad: str = "exact"):
    """x² in value; derivative 2x (exact) or clip(2x, -C, C), written with
    stop_gradient rather than tf.custom_gradient: the independent reference."""
    bound = None if grad == "exact" else float(grad.split(":")[1])

    def fake(features, name=None):
        x = tf.convert_to_tensor(features)
        if bound is None:
            return x * x
        d = tf.stop_gradient(tf.clip_by_value(x + x, -bound, bound))
        return tf.stop_gradient(x * x - d * x) + d * x

    return fake


@contextlib.contextmanager
def relu_as_square(grad: str = "exact"):
    """Inside this block every plain ReLU computes x² (the independent reference)."""
    real = tf.nn.relu
    with mock.patch.object(tf.nn, "relu", fake_relu(grad)):
        yield real


@contextlib.contextmanager
def relu_forbidden():
    """Fail the test if any plain ReLU runs inside this block."""

    def boom(features, name=None):
        raise AssertionError("a plain ReLU was executed")

    with mock.patch.object(tf.nn, "relu", boom):
        yield


def assert_close(actual, expected, rtol=1e-6):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    assert np.all(np.isfinite(expected)), "reference is not finite: the check would be void"
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def weights_bytes(model):
    return [(w.path, np.asarray(w.numpy()).tobytes()) for w in model.weights]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
