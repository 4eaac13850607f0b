"""Recovery that must not look like success when it fails (issue 14): the
finite-explosion guard, the post-recovery check, the one-command recover,
and the shifted square s·(x + b)² that recovery fits at each site and
finalizes as s·x² with b folded into the layer before it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from typer.testing import CliRunner

import actswap
from actswap import recover as R
from actswap.activations import Square, SquareActivation
from actswap.cli import app
from actswap.errors import RecoveryFailedError


def small_cnn(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Activation("relu", name="r1")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="out")(x))


def own_labels(model, n=128, seed=0):
    """Inputs and the model's own predictions: the original is 100% accurate on them."""
    x = np.random.default_rng(seed).uniform(-1, 1, (n, 8, 8, 1)).astype("float32")
    return x, model.predict(x, verbose=0).argmax(-1)


def test_scaled_square_is_s_times_x_squared_saves_and_counts_a_scalar_in_he(tmp_path):
    x = np.linspace(-3, 3, 13, dtype="float32").reshape(1, 13)
    s = 0.3125  # exact in float32
    np.testing.assert_array_equal(Square(scale=s)(x).numpy(), s * x * x)
    np.testing.assert_array_equal(SquareActivation(scale=s)(x).numpy(), s * x * x)
    inp = keras.Input((13,))
    h = keras.layers.Dense(13, activation=SquareActivation(scale=s), name="d")(inp)
    m = keras.Model(inp, Square(scale=s, name="sq")(h))
    path = actswap.save(m, tmp_path / "scaled.keras")
    back = keras.models.load_model(path)
    np.testing.assert_array_equal(back.predict(x, verbose=0), m.predict(x, verbose=0))
    assert actswap.inspect(back).counts() == {"square": 2}
    # Two squares, each one ct_ct plus one plaintext scalar (s != 1), plus the Dense.
    depth = actswap.inspect(back, he=True).he["multiplicative_depth"]
    assert (depth["ct_ct"], depth["ct_pt"]) == (2, 3)
    plain = keras.Model(inp, Square(name="sq")(keras.layers.Dense(13, activation="relu")(inp)))
    assert "scale" not in plain.get_layer("sq").get_config()  # plain squares keep their config


def residual_net(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 2))
    a = keras.layers.BatchNormalization(name="bn_a")(keras.layers.Conv2D(2, 3, padding="same", name="ca")(inp))
    x = keras.layers.Activation("relu", name="r_a")(a)                   # shift -> bn_a.beta
    b = keras.layers.BatchNormalization(name="bn_b")(keras.layers.Conv2D(2, 3, padding="same", name="cb")(x))
    x = keras.layers.Activation("relu", name="r_add")(keras.layers.Add(name="add")([x, b]))  # -> bn_b.beta
    c = keras.layers.Conv2D(2, 1, use_bias=False, name="nobias")(x)
    x = keras.layers.ReLU(name="r_nobias")(c)                               # no bias: no shift
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(4, activation="relu", name="d")(x)              # -> d.bias
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="out")(x))


def test_producers_are_the_single_consumer_bias_or_beta_before_each_site():
    from actswap.recover.shifts import producers

    # Every activation whose input can take a shift (the final softmax's too); not r_nobias.
    assert producers(residual_net()) == {
        "r_a": ("bn_a", "beta"), "r_add": ("bn_b", "beta"), "d": ("d", "bias"), "out": ("out", "bias"),
    }


def test_fitted_shifted_squares_are_the_least_squares_quadratic_and_finalize_folds_the_shift(tmp_path):
    model = residual_net()
    x = np.random.default_rng(0).standard_normal((64, 6, 6, 2)).astype("float32")
    converted, _ = actswap.convert(model)
    squares = R.fit_squares(model, R.polynomials_of(converted), x)
    assert set(squares) == {"r_a", "r_add", "r_nobias", "d"} and squares["r_nobias"][1] == 0.0
    # Independent reference: numpy's own least-squares quadratic to ReLU on [-R, R], R the
    # largest |input| of the site (read here with a Keras sub-model, not actswap's calibration).
    z = keras.Model(model.input, model.get_layer("add").output).predict(x, verbose=0)
    bound = float(np.abs(z).max())
    grid = np.linspace(-bound, bound, 20001)
    c2, c1, _ = np.polyfit(grid, np.maximum(grid, 0), 2)
    s, b = squares["r_add"]
    assert s == pytest.approx(c2, rel=1e-3) and 2 * s * b == pytest.approx(c1, rel=1e-3)
    blended = R.blend_model(model, polynomials=R.polynomials_of(converted), squares=squares)
    for bl in R.blends(blended):
        bl.factor.assign(1.0)
    final = R.finalize(blended)
    # Structure: exactly s·x² at every site; the shift is now in the producer's weight.
    assert actswap.inspect(final).counts() == {"softmax": 1, "square": 4}
    assert final.get_layer("r_add").scale == pytest.approx(s)
    np.testing.assert_array_equal(final.get_layer("bn_b").beta.numpy(),
                                  model.get_layer("bn_b").beta.numpy() + np.float32(b))
    np.testing.assert_array_equal(final.get_layer("d").bias.numpy(),
                                  model.get_layer("d").bias.numpy() + np.float32(squares["d"][1]))
    # Numbers: the final model computes what the blended one did at a = 1.
    np.testing.assert_allclose(final.predict(x, verbose=0), blended.predict(x, verbose=0), rtol=1e-4, atol=1e-6)
    # The original is untouched.
    assert float(model.get_layer("bn_b").beta.numpy()[0]) == float(residual_net().get_layer("bn_b").beta.numpy()[0])


def test_guard_fires_on_a_finite_explosion_and_restores_good_weights():
    model = small_cnn()
    converted, _ = actswap.convert(model)
    x, y = own_labels(model, 256)

    class BlowUp(keras.callbacks.Callback):
        """At batch 12 the second conv's kernel is multiplied by 1e4: finite, but
        the input of its activation grows by 1e4 and its square by 1e8."""
        def on_train_batch_end(self, batch, logs=None):
            if batch == 12:
                w = self.model.student.get_layer("c2").kernel
                w.assign(w * 1e4)

    _, history = R.recover(model, converted, (x, y), epochs=1, batch_size=8, ramp_epochs=0.1,
                           learning_rate=1e-3, max_drop=None, callbacks=[BlowUp()])
    assert history.explosions >= 1 and history.nan_restores >= 1
    assert history.check["nonfinite_outputs"] == 0


def test_a_collapsed_recovery_raises_names_sites_and_the_cli_exits_1_writing_nothing(tmp_path):
    model = small_cnn(1)  # its plain x² twin agrees with it on ~30% of these inputs
    x, y = own_labels(model, 200)
    converted, _ = actswap.convert(model)
    # lr ~ 0 and plain x²: the result is the swapped model, far from the original.
    with pytest.raises(RecoveryFailedError, match="recovery failed: its top-1 accuracy on the check data") as e:
        R.recover(model, converted, (x, y), epochs=1, batch_size=50, learning_rate=1e-12,
                  fit=False, max_drop=1.0)
    assert e.value.result["original_accuracy"] == 1.0 and e.value.result["recovered_accuracy"] < 0.99
    assert "'r1'" in str(e.value) or "'c2'" in str(e.value)
    src = actswap.save(model, tmp_path / "m.keras")
    np.savez(tmp_path / "train.npz", x=x, y=y)
    out = tmp_path / "rec.keras"
    args = ["recover", str(src), "--to", "square", "--data", str(tmp_path / "train.npz"), "--epochs", "1",
            "--batch-size", "50", "--lr", "1e-12", "--plain", "-o", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.stdout + r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "recovery failed" in err[0] and "nothing written" in err[0]
    assert not out.exists() and "wrote" not in r.stdout
    r = CliRunner().invoke(app, [*args, "--force", "--json"])  # written on request, still exit 1
    assert r.exit_code == 1 and out.is_file()
    assert "recovery failed" in json.loads(r.stdout)["error"]


def test_one_command_recover_equals_convert_then_recover(tmp_path):
    model = small_cnn()
    x, y = own_labels(model, 160)
    src = actswap.save(model, tmp_path / "m.keras")
    np.savez(tmp_path / "train.npz", x=x, y=y)
    conv = actswap.save(actswap.convert(model)[0], tmp_path / "m.square.keras")
    common = ["--data", str(tmp_path / "train.npz"), "--epochs", "2", "--batch-size", "16", "--json",
              "--max-drop", "100"]
    # Each run in its own process with the same seed: the same training, op by op.
    code = textwrap.dedent("""
        import sys, keras, tensorflow as tf
        keras.utils.set_random_seed(0); tf.config.experimental.enable_op_determinism()
        from actswap.cli import main
        main(sys.argv[1:])
    """)
    outs = []
    for extra in ([str(src), "--to", "square"], [str(src), str(conv)]):
        out = tmp_path / f"r{len(outs)}.keras"
        p = subprocess.run([sys.executable, "-c", code, "recover", *extra, *common, "-o", str(out)],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        outs.append(keras.models.load_model(out))
    a, b = outs
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy(), err_msg=wa.path)
    # Only the target at the replaced sites: squares (times a fitted constant), the softmax kept.
    assert actswap.inspect(a).counts() == {"softmax": 1, "square": 2}
    scales = [layer.scale for layer in a.layers if isinstance(layer, Square)]
    scales += [layer.activation.scale for layer in a.layers if isinstance(getattr(layer, "activation", None), SquareActivation)]
    assert len(scales) == 2 and all(s > 0 for s in scales)
    # Numbers: the recovered model equals its own weights run with s·x·x put in by hand.
    ref = reference_forward(a, x[:16])
    np.testing.assert_allclose(a.predict(x[:16], verbose=0), ref, rtol=1e-4, atol=1e-6)


def reference_forward(m, x):
    """The small CNN evaluated layer by layer with numpy-side s·x·x (independent of actswap's ops)."""
    h = tf.constant(x)
    for layer in m.layers[1:]:
        if isinstance(layer, Square):
            h = layer.scale * h * h
        elif isinstance(getattr(layer, "activation", None), SquareActivation):
            s = layer.activation.scale
            saved, layer.activation = layer.activation, keras.activations.linear
            try:
                h = layer(h)
            finally:
                layer.activation = saved
            h = s * h * h
        else:
            h = layer(h, training=False) if isinstance(layer, keras.layers.BatchNormalization) else layer(h)
    return h.numpy()


def test_recover_usage_errors_are_one_line_before_tensorflow_is_imported(tmp_path, fixtures_dir):
    code = textwrap.dedent("""
        import sys
        from actswap.cli import main
        try:
            main(sys.argv[1:])
        finally:
            print("tensorflow imported:", "tensorflow" in sys.modules)
    """)
    model = str(fixtures_dir / "mnist_cnn.keras")
    for args, fragment in [
        (["--data", "t.npz", "--epochs", "0"], "--epochs must be >= 1"),
        (["--data", "t.npz", "--max-drop", "-1"], "--max-drop must be >= 0"),
        ([model, "--to", "square", "--data", "t.npz"], "either CONVERTED or --to"),
    ]:
        p = subprocess.run([sys.executable, "-c", code, "recover", model, *args, "-o", str(tmp_path / "o.keras")],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"})
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and fragment in lines[0], p.stderr
        assert p.stdout.strip().endswith("tensorflow imported: False")


def test_a_blended_model_reloads_after_import_actswap_alone(tmp_path):
    model = residual_net()
    converted, _ = actswap.convert(model)
    blended = R.blend_model(model, polynomials=R.polynomials_of(converted),
                            squares={"r_add": (0.25, 1.5)})
    path = actswap.save(blended, tmp_path / "blended.keras")
    code = textwrap.dedent("""
        import sys, numpy as np
        import actswap, keras  # nothing of actswap.recover imported by hand
        m = keras.models.load_model(sys.argv[1])
        blends = [l for l in m.layers if type(l).__name__ == "Blend"]
        print(len(blends), [(b.scale, b.shift) for b in blends if b.name == "r_add"])
    """)
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "3 [(0.25, 1.5)]"
