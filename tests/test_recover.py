"""Accuracy recovery pieces: blend schedule, NaN guard, distillation, recover()."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import actswap
from actswap import recover as R


@pytest.fixture(scope="module")
def pair(fixtures_dir):
    original = actswap.load(fixtures_dir / "mnist_cnn.keras")
    converted, _ = actswap.convert(original)
    return original, converted


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, 28, 28, 1)).astype("float32"), rng.integers(0, 10, n)


def test_blend_starts_as_the_original_and_moves_on_schedule_then_finalizes(pair, tmp_path):
    original, converted = pair
    blended = R.blend_model(original, polynomials=R.polynomials_of(converted))
    assert len(R.blends(blended)) == 3
    x, y = data()
    np.testing.assert_array_equal(blended.predict(x, verbose=0), original.predict(x, verbose=0))
    blended.compile(keras.optimizers.SGD(1e-4), "sparse_categorical_crossentropy")
    schedule = R.BlendSchedule(ramp_epochs=2)
    blended.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[schedule])
    assert schedule.history == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0])
    assert all(float(b.factor.numpy()) == 1.0 for b in R.blends(blended))
    # The factor is state: it saves and reloads with the model.
    path = actswap.save(blended, tmp_path / "blended.keras")
    assert all(float(b.factor.numpy()) == 1.0 for b in R.blends(keras.models.load_model(path)))
    final = R.finalize(blended)
    assert actswap.inspect(final).counts() == {"softmax": 1, "square": 3}
    np.testing.assert_allclose(final.predict(x, verbose=0), blended.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_progressive_schedule_moves_sites_one_after_another(pair):
    original, converted = pair
    blended = R.blend_model(original, polynomials=R.polynomials_of(converted))
    order = R.blends(blended)
    assert len(order) == 3
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append([float(b.factor.numpy()) for b in order])

    blended.compile(keras.optimizers.SGD(1e-4), "sparse_categorical_crossentropy")
    x, y = data()
    # 4 steps per epoch, ramp 1 epoch, 3 sites: each site's window is 2/(3+1) = 0.5
    # epoch, starting 0.25 epoch after the previous one (independent arithmetic).
    blended.fit(x, y, batch_size=16, epochs=2, verbose=0,
                callbacks=[R.BlendSchedule(ramp_epochs=1, progressive=True), Record()])
    expected = [[0.5, 0.0, 0.0], [1.0, 0.5, 0.0], [1.0, 1.0, 0.5], [1.0, 1.0, 1.0]] + [[1.0] * 3] * 4
    assert seen == [pytest.approx(e) for e in expected]


def test_finalize_refuses_an_unfinished_blend(pair):
    original, converted = pair
    blended = R.blend_model(original, polynomials=R.polynomials_of(converted))
    with pytest.raises(ValueError, match="not 1"):
        R.finalize(blended)


def test_nan_guard_restores_the_last_good_weights_and_lowers_the_learning_rate():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1), "mse")

    class Poison(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                self.good = [w.numpy().copy() for w in self.model.weights]
                w = self.model.layers[0].kernel
                w.assign(np.full(w.shape, np.nan, "float32"))

    poison, guard = Poison(), R.NaNGuard(lr_factor=0.5)
    x = np.random.default_rng(0).uniform(-1, 1, (16, 4)).astype("float32")
    model.fit(x, np.zeros((16, 2)), batch_size=4, epochs=1, verbose=0, callbacks=[poison, guard])
    assert guard.restores == 1
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.05)


def test_distillation_loss_equals_a_hand_computation():
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    y = np.array([0, 3, 1, 2, 3])
    T, a = 3.0, 0.3

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    pt, ps = softmax(t / T), softmax(s / T)
    kl = np.sum(pt * (np.log(pt) - np.log(ps)), axis=1)
    ce = -np.log(softmax(s)[np.arange(5), y])
    expected = np.mean(a * T * T * kl + (1 - a) * ce)
    got = R.distillation_loss(tf.constant(y), tf.constant(s, tf.float32), tf.constant(t, tf.float32), T, a)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_recover_returns_a_polynomial_model_that_reloads_and_trains(pair, tmp_path):
    original, converted = pair
    x, y = data(96)
    before = [(w.path, w.trainable, w.numpy().tobytes()) for w in original.weights]
    recovered, history = R.recover(original, converted, (x, y), val=(x[:32], y[:32]), epochs=1, batch_size=32,
                                   max_drop=None)  # random labels: accuracy means nothing
    assert [(w.path, w.trainable, w.numpy().tobytes()) for w in original.weights] == before  # untouched
    assert original.trainable
    assert actswap.inspect(recovered).counts() == {"softmax": 1, "square": 3}
    assert history.nan_restores == 0 and history.blend_factors[-1] == 1.0
    assert np.isfinite(history.history["loss"][-1])
    path = actswap.save(recovered, tmp_path / "recovered.keras")
    code = textwrap.dedent("""
        import sys, numpy as np, actswap, keras
        m = keras.models.load_model(sys.argv[1])
        m.compile(keras.optimizers.SGD(1e-4), "sparse_categorical_crossentropy")
        before = [w.numpy().copy() for w in m.trainable_weights]
        x = np.random.default_rng(0).uniform(0, 1, (8, 28, 28, 1)).astype("float32")
        m.fit(x, np.arange(8), epochs=1, verbose=0)
        print(any(not np.array_equal(b, w.numpy()) for b, w in zip(before, m.trainable_weights)))
    """)
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]


def test_recover_runs_under_mirrored_strategy(fixtures_dir):
    code = textwrap.dedent(f"""
        import os; os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import numpy as np, actswap
        from actswap import recover as R
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            original = actswap.load({str(fixtures_dir / "mnist_cnn.keras")!r})
            converted, _ = actswap.convert(original)
        x = np.random.default_rng(0).uniform(0, 1, (64, 28, 28, 1)).astype("float32")
        y = np.random.default_rng(1).integers(0, 10, 64)
        rec, hist = R.recover(original, converted, (x, y), epochs=1, batch_size=32, strategy=strategy)
        print(strategy.num_replicas_in_sync, actswap.inspect(rec).counts(), np.isfinite(hist.history["loss"][-1]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "2 {'softmax': 1, 'square': 3} True"


def test_distiller_step_averages_over_replicas():
    """One SGD step of the Distiller on a batch split over two replicas moves the
    weights as the same step on one device does (the replicas' gradients are
    summed by the optimizer, so each must be its share of the mean; summing
    whole means moved them twice as far). Reference: the step without a strategy."""
    code = textwrap.dedent("""
        import os; os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import contextlib, keras, numpy as np
        from actswap.recover.training import Distiller
        x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
        y = np.random.default_rng(1).integers(0, 3, 32)
        def step(strategy):
            with strategy.scope() if strategy else contextlib.nullcontext():
                keras.utils.set_random_seed(0)
                teacher = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
                student = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
                d = Distiller(student, teacher)
                d.compile(optimizer=keras.optimizers.SGD(0.5))
            before = student.get_weights()[0].copy()
            d.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
            return student.get_weights()[0] - before
        one = step(None)
        two = step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
        print(float(np.abs(one).max()), float(np.abs(two - one).max()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    moved, diff = map(float, out.stdout.split()[-2:])
    assert moved > 1e-3 and diff <= 1e-5 * moved * 10, (moved, diff)  # float32 sums in another order


def test_cli_recover_json_and_output(pair, tmp_path, fixtures_dir):
    import json

    from typer.testing import CliRunner

    from actswap.cli import app

    original, converted = pair
    conv_path = actswap.save(converted, tmp_path / "sq.keras")
    x, y = data(64)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    r = CliRunner().invoke(app, [
        "recover", str(fixtures_dir / "mnist_cnn.keras"), str(conv_path), "--data", str(tmp_path / "train.npz"),
        "--epochs", "1", "--batch-size", "32", "--json", "--max-drop", "100",  # random labels: no accuracy
    ])
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["output"].endswith("sq.recovered.keras") and len(result["epochs"]) == 1
    assert 0 <= result["recovered_accuracy"] <= 1 and result["nan_restores"] == 0
    assert actswap.inspect(result["output"]).counts() == {"softmax": 1, "square": 3}
    np.savez(tmp_path / "bad.npz", inputs=x)
    r = CliRunner().invoke(app, ["recover", str(fixtures_dir / "mnist_cnn.keras"), str(conv_path),
                                 "--data", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "o.keras")])
    assert r.exit_code == 2 and "needs 'x'" in r.stderr


def test_recover_refuses_to_return_a_diverged_model(pair):
    original, converted = pair
    x, y = data(64)

    class AlwaysNaN(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            w = self.model.trainable_weights[0]
            w.assign(np.full(w.shape, np.nan, "float32"))

    with pytest.raises(actswap.ActswapError, match="recovery diverged"):
        R.recover(
            original, converted, (x, y), epochs=1, batch_size=8, distill=False, max_restores=1,
            callbacks=[AlwaysNaN()],
        )


def test_cli_recover_defaults_are_the_api_defaults():
    # The CLI repeats the defaults (it must not import TensorFlow to show --help);
    # the benchmark measures the API's, so they must not drift apart.
    import inspect

    from actswap.cli import recover as cli_recover

    api = inspect.signature(R.recover).parameters
    options = {p.name: p.default.default for p in inspect.signature(cli_recover.recover).parameters.values()
               if hasattr(p.default, "default")}
    pairs = {"epochs": "epochs", "ramp": "ramp_epochs", "batch_size": "batch_size", "learning_rate": "learning_rate",
             "max_drop": "max_drop", "max_disagreement": "max_disagreement", "max_error": "max_error"}
    assert {k: options[k] for k in pairs} == {k: api[v].default for k, v in pairs.items()}
