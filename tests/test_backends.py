"""Converted `.keras` files under Keras 3's other backends (JAX, PyTorch).

The files are converted here, under TensorFlow; each backend then runs in a
fresh process with KERAS_BACKEND set (the backend is fixed at Keras' import).
The reference is TensorFlow's own run of the same file: outputs, gradients of
the loss with respect to every weight, in exact and clip modes. The in-memory
API is checked against NumPy: W2·(W1·x + b1)² + b2 from the weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import actswap

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(importlib.util.find_spec(b) is None,
                                                     reason=f"{b} not installed (pip install '.[{b}]')"))
            for b in ("jax", "torch")]
RTOL = 1e-5  # outputs: float32, other kernels
# Gradients: float32 sums in other orders, through two squares, differ by up to ~0.2%
# of the tensor's largest entry (measured: the first convolution's kernel); a wrong
# gradient mode is off by far more (checked: exact against clip, below).
GRAD_RTOL, GRAD_SCALE = 1e-2, 1e-2


def _transformer() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Reshape((4, 4))(keras.layers.Conv2D(4, 4, strides=4)(inp))
    n = keras.layers.LayerNormalization()(h)
    h = keras.layers.Add()([h, keras.layers.MultiHeadAttention(2, 2)(n, n)])
    h = keras.layers.Dense(8, activation="gelu")(keras.layers.LayerNormalization()(h))
    return keras.Model(inp, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Converted files, their inputs and labels, and TensorFlow's outputs and gradients."""
    out = tmp_path_factory.mktemp("backends")
    cnn = str(ROOT / "fixtures" / "mnist_cnn.keras")
    x = np.random.default_rng(0).uniform(0, 1, (8, 28, 28, 1)).astype("float32")
    xt = np.random.default_rng(1).uniform(0, 1, (8, 8, 8, 1)).astype("float32")
    cases = {
        "square_exact": (actswap.convert(cnn, to="square")[0], x),
        "square_clip": (actswap.convert(cnn, to="square", grad="clip:1")[0], x),
        "approx": (actswap.convert(cnn, to="approx", calibrate=x)[0], x),
        "quad_trainable": (actswap.convert(cnn, to="quad", trainable=True, per_channel=True, calibrate=x)[0], x),
        "transformer": (actswap.convert(_transformer(), to="approx", sources="all", calibrate=xt)[0], xt),
    }
    index = {}
    for name, (model, inputs) in cases.items():
        classes = int(model.outputs[0].shape[-1])
        labels = np.eye(classes, dtype="float32")[np.arange(len(inputs)) % classes]  # one-hot targets
        with tf.GradientTape() as tape:
            loss = _loss(model, inputs, labels)
        grads = tape.gradient(loss, model.trainable_variables)
        actswap.save(model, out / f"{name}.keras")
        np.savez(out / f"{name}.npz", x=inputs, y=labels, out=model(inputs, training=False).numpy(),
                 **{f"g{i}": g.numpy() for i, g in enumerate(grads)})
        index[name] = len(grads)
    return out, index


def _loss(model, x, targets):
    # Mean squared error: no backend rewrites it (TensorFlow's cross-entropy reads
    # a softmax's logits from the graph; the others do not).
    return keras.ops.mean(keras.ops.square(model(x, training=False) - targets))


CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import keras, actswap
    from keras import ops

    backend = keras.backend.backend()
    assert backend == sys.argv[2], backend
    folder, names = sys.argv[1], json.loads(sys.argv[3])

    def loss_of(model, x, y, tv=None, ntv=None):
        if tv is None:
            out = model(x, training=False)
        else:
            out, _ = model.stateless_call(tv, ntv, x, training=False)
        return ops.mean(ops.square(ops.subtract(out, ops.convert_to_tensor(y))))

    def gradients(model, x, y):
        if backend == "jax":
            import jax
            ntv = [v.value for v in model.non_trainable_variables]
            return jax.grad(lambda tv: loss_of(model, x, y, tv, ntv))([v.value for v in model.trainable_variables])
        loss = loss_of(model, x, y)
        loss.backward()
        return [v.value.grad for v in model.trainable_variables]

    report = {}
    for name, count in names.items():
        d = np.load(f"{folder}/{name}.npz")
        model = keras.saving.load_model(f"{folder}/{name}.keras")
        out = np.asarray(ops.convert_to_numpy(model(d["x"], training=False)))
        np.testing.assert_allclose(out, d["out"], rtol=%(rtol)r, atol=1e-6, err_msg=name)
        grads = [np.asarray(ops.convert_to_numpy(g)) for g in gradients(model, d["x"], d["y"])]
        assert len(grads) == count, (name, len(grads), count)
        for i, g in enumerate(grads):
            assert np.all(np.isfinite(g)), (name, i)
            want = d[f"g{i}"]
            np.testing.assert_allclose(g, want, rtol=%(grad_rtol)r, atol=%(grad_scale)r * np.abs(want).max(),
                                       err_msg=f"{name} g{i}")
        model.compile(optimizer="adam", loss="mse")
        history = model.fit(d["x"], d["y"], epochs=1, batch_size=4, verbose=0)
        report[name] = history.history["loss"][-1]
        assert np.isfinite(report[name]), name
    print(json.dumps(report))
""") % {"rtol": RTOL, "grad_rtol": GRAD_RTOL, "grad_scale": GRAD_SCALE}


def run_child(code: str, backend: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)


def test_the_gradient_tolerance_tells_the_modes_apart(files):
    folder, index = files
    exact, clip = np.load(folder / "square_exact.npz"), np.load(folder / "square_clip.npz")
    worst = max(np.abs(exact[f"g{i}"] - clip[f"g{i}"]).max() / np.abs(exact[f"g{i}"]).max()
                for i in range(index["square_exact"]))
    assert worst > 10 * GRAD_SCALE, worst


@pytest.mark.parametrize("backend", BACKENDS)
def test_converted_files_predict_differentiate_and_train_like_tensorflow(files, backend):
    folder, index = files
    r = run_child(CHILD, backend, str(folder), backend, json.dumps(index))
    assert r.returncode == 0, r.stderr[-3000:]
    losses = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(losses) == set(index)


API_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import keras, actswap
    from keras import ops

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="relu", name="fc"),
                              keras.layers.Dense(3, name="out")])
    before = [w.copy() for w in model.get_weights()]
    report = actswap.inspect(model)
    assert [s.path for s in report.sites] == ["fc"], report.sites
    converted, report = actswap.convert(model, to="square", grad="clip:1")
    assert [s.action for s in report.sites] == ["replaced"]
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # input untouched
    x = np.random.default_rng(0).normal(size=(6, 5)).astype("float32")
    w1, b1, w2, b2 = [w.astype("float64") for w in model.get_weights()]
    reference = ((x @ w1 + b1) ** 2) @ w2 + b2
    np.testing.assert_allclose(ops.convert_to_numpy(converted(x)), reference, rtol=1e-5, atol=1e-5)
    actswap.save(converted, sys.argv[1])
    again = keras.saving.load_model(sys.argv[1])
    np.testing.assert_allclose(ops.convert_to_numpy(again(x)), reference, rtol=1e-5, atol=1e-5)
    try:
        actswap.recover.recover(model, converted, (x, np.zeros(6, "int64")))
    except actswap.ActswapError as e:
        assert "TensorFlow Keras backend" in str(e) and "\\n" not in str(e), str(e)
        print("recover refused:", e)
    else:
        raise AssertionError("recover ran under " + keras.backend.backend())
    for what, call in (("ONNX export", lambda: actswap.export_onnx(converted, sys.argv[1] + ".onnx")),
                       ("the encrypted run", lambda: actswap.he.run(converted, x))):
        try:
            call()
        except actswap.ActswapError as e:
            assert str(e).startswith(what + " needs the TensorFlow Keras backend"), str(e)
        else:
            raise AssertionError(what + " ran under " + keras.backend.backend())
    print("ok")
""")


@pytest.mark.parametrize("backend", BACKENDS)
def test_api_converts_an_in_memory_model_built_under_the_backend(backend, tmp_path):
    r = run_child(API_CHILD, backend, str(tmp_path / "api.keras"))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    assert "recover refused: recover needs the TensorFlow Keras backend" in r.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_command_line_runs_on_tensorflow_and_says_so_in_one_note(backend, tmp_path):
    out = tmp_path / "square.keras"
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run(["actswap", "convert", str(ROOT / "fixtures" / "mnist_cnn.keras"), "--to", "square",
                        "-o", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    notes = [line for line in r.stderr.splitlines() if "runs Keras on TensorFlow" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ") and f"KERAS_BACKEND={backend}" in notes[0], r.stderr
    check = ("import sys, keras, actswap; m = keras.saving.load_model(sys.argv[1]); "
             "print(keras.backend.backend(), type(m.get_layer('relu3')).__name__)")
    r = run_child(check, backend, str(out))
    assert r.returncode == 0 and r.stdout.split() == [backend, "Square"], r.stderr[-2000:]
