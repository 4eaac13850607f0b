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
import subprocess
import sys
from pathlib import Path
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(FIXTURES))

import tensorflow as tf  # noqa: E402

import actswap  # noqa: E402,F401  (registers the Keras objects)

# Property tests: a quick, reproducible profile by default (CI); the thorough
# one with `pytest --hypothesis-profile=thorough` (see the README).
settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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


def assert_user_error(result, *fragments, code: int = 2):
    """A CLI failure as promised: exit ``code``, exactly one ``error:`` line on
    stderr containing every fragment, no traceback anywhere."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def cli_command(*args) -> list[str]:
    """The actswap CLI as a command line running *this checkout* (whatever is installed)."""
    return [sys.executable, "-m", "actswap.cli", *map(str, args)]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def run_cli(*args, prefix=(), timeout=300, cwd=None) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process (``prefix`` wraps it, e.g. in ``unshare``)."""
    return subprocess.run(
        [*prefix, *cli_command(*args)], capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=cwd
    )
