"""The square activation itself: values, gradient modes, XLA, serialization."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import actswap
from actswap import gradients
from actswap.activations import Square, SquareActivation, square, square_op

finite = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
    elements=st.floats(-100, 100, width=32),
)


def value_and_grad(fn, x, dy):
    t = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(t)
        y = fn(t)
    return y.numpy(), tape.gradient(y, t, output_gradients=tf.constant(dy)).numpy()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(finite, st.floats(0.01, 50))
def test_forward_is_x_times_x_and_gradients_follow_the_mode(x, c):
    dy = np.linspace(-2, 2, x.size, dtype=np.float32).reshape(x.shape)
    y, g = value_and_grad(lambda t: square_op(t, "exact"), x, dy)
    np.testing.assert_allclose(y, x * x, rtol=0, atol=1e-30)  # exact but for FTZ denormals
    # atol: TensorFlow flushes float32 denormals to zero on CPU; numpy does not.
    np.testing.assert_allclose(g, 2 * x * dy, rtol=1e-6, atol=1e-30)
    mode = gradients.normalize(f"clip:{c}")
    _, gc = value_and_grad(lambda t: square_op(t, mode), x, dy)
    bound = np.float32(gradients.clip_bound(mode))
    np.testing.assert_allclose(gc, np.clip(2 * x, -bound, bound) * dy, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", ["", "clip", "clip:", "clip:0", "clip:-1", "clip:nan", "clip:inf", "relu", 3])
def test_bad_gradient_modes_are_user_errors(spec):
    with pytest.raises(actswap.ActswapError) as e:
        gradients.normalize(spec)
    assert e.value.exit_code == 2


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.floats(1e-3, 1e6))
def test_clip_mode_round_trips(c):
    mode = gradients.normalize(f"clip:{c}")
    assert gradients.normalize(mode) == mode
    assert gradients.clip_bound(mode) == pytest.approx(c, rel=1e-5)


def _dense_model(activation):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation=activation), Square("clip:1")])


@pytest.mark.parametrize("activation", [square, SquareActivation("clip:2")])
def test_activation_and_layer_save_and_load_without_custom_objects(tmp_path, activation):
    model = _dense_model(activation)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: registered by import actswap
    x = np.linspace(-1, 1, 6, dtype="float32").reshape(2, 3)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    assert loaded.layers[-1].grad == "clip:1"
    act = loaded.layers[0].activation
    assert (act is square) if activation is square else act.grad == "clip:2"


def test_works_under_jit_compile():
    model = _dense_model(SquareActivation("exact"))
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    before = [w.numpy().copy() for w in model.trainable_weights]
    x = np.random.default_rng(0).uniform(-1, 1, (8, 3)).astype("float32")
    model.fit(x, np.zeros((8, 4), "float32"), epochs=1, verbose=0)
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))

    @tf.function(jit_compile=True)
    def grad(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = square_op(t, "clip:1")
        return tape.gradient(y, t)

    np.testing.assert_allclose(grad(tf.constant([-3.0, 0.25, 3.0])).numpy(), [-1.0, 0.5, 1.0])


def test_square_layer_propagates_mask():
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, 2))
    masked = keras.layers.Masking(mask_value=5.0)(inp)
    model = keras.Model(inp, keras.layers.LSTM(2)(Square()(masked)))
    x = np.array([[[5, 5], [0.1, 0.2], [0.3, 0.4]]], "float32")
    # With the mask carried through Square, the LSTM skips the masked step
    # (which would otherwise enter as 25s).
    np.testing.assert_allclose(model(x).numpy(), model(x[:, 1:]).numpy(), rtol=1e-6)
    masked_x = keras.layers.Masking(mask_value=5.0)(x)
    out_mask = keras.src.backend.get_keras_mask(Square()(masked_x))
    assert out_mask is not None
    np.testing.assert_array_equal(out_mask.numpy(), [[False, True, True]])


def test_import_actswap_is_light_and_registers_when_keras_loads():
    import subprocess
    import sys

    code = (
        "import sys, actswap; assert 'tensorflow' not in sys.modules, 'tf imported';"
        "import keras; from keras.saving import get_registered_object as g;"
        "assert g('actswap>Square') is not None and g('actswap>square') is not None; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
