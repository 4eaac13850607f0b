"""Encrypted run (issue 9): affine compilation, CKKS evaluation, refusals, CLI.

References are independent of the compiler: the Keras layers and models
themselves, called on fresh random inputs (not the probes the compiler
checks itself on), and for logits a twin model whose last layer has a
linear activation and the same weights.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

ts = pytest.importorskip("tenseal")

from typer.testing import CliRunner  # noqa: E402

from actswap.he import encrypted as he_encrypted  # noqa: E402
from actswap.he import evaluate as he_evaluate  # noqa: E402
from actswap.he import limits as he_limits  # noqa: E402
from actswap.he import params as he_params  # noqa: E402
from actswap.he import tenseal_mm as he_mm  # noqa: E402
from actswap.he import program as he_program  # noqa: E402
from actswap.activations import Polynomial, PolynomialActivation, Square, SquareActivation  # noqa: E402
from actswap.cli import app  # noqa: E402

L = keras.layers
# The compiled stages are float64; the layers are float32 with sums of up to ~100 terms.
PLAIN_TOL = 1e-5


def rand(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype("float32")


def randomize(model, seed=1):
    """Give every weight (BatchNorm statistics included) non-trivial values."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        v = rng.uniform(0.5, 1.5, w.shape) if "variance" in w.path else rng.normal(0, 0.5, w.shape)
        w.assign(v.astype(w.dtype))
    return model


def single(layer, shape):
    inp = keras.Input(shape)
    return randomize(keras.Model(inp, layer(inp)))


def functional(shape, fn):
    inp = keras.Input(shape)
    return randomize(keras.Model(inp, fn(inp)))


AFFINE_CASES = {
    "dense": lambda: single(L.Dense(7), (5,)),
    "conv2d_stride_same": lambda: single(L.Conv2D(3, 3, strides=2, padding="same"), (7, 7, 2)),
    "conv1d": lambda: single(L.Conv1D(2, 3), (8, 3)),
    "conv3d": lambda: single(L.Conv3D(2, 2), (3, 3, 3, 1)),
    "depthwise": lambda: single(L.DepthwiseConv2D(3, depth_multiplier=2), (5, 5, 2)),
    "separable": lambda: single(L.SeparableConv2D(3, 3), (5, 5, 2)),
    "conv2d_transpose": lambda: single(L.Conv2DTranspose(2, 3, strides=2), (3, 3, 2)),
    "avgpool": lambda: single(L.AveragePooling2D(2), (6, 6, 2)),
    "global_avgpool": lambda: single(L.GlobalAveragePooling2D(), (4, 4, 3)),
    "flatten": lambda: single(L.Flatten(), (3, 4, 2)),
    "reshape": lambda: single(L.Reshape((4, 6)), (3, 8)),
    "permute": lambda: single(L.Permute((2, 1)), (3, 5)),
    "batchnorm": lambda: single(L.BatchNormalization(), (4, 3)),
    "rescaling": lambda: single(L.Rescaling(1 / 255.0, offset=-0.5), (4, 2)),
    "zeropad_crop": lambda: functional((4, 4, 1), lambda x: L.Cropping2D(1)(L.ZeroPadding2D(2)(x))),
    "dropout": lambda: single(L.Dropout(0.5), (6,)),
    "add_constant": lambda: functional((5,), lambda x: keras.ops.add(L.Dense(4)(x), 1.5)),
    "times_constant": lambda: functional((5,), lambda x: keras.ops.multiply(x, 3.0) - 2.0),
    "linear_branches": lambda: functional((5,), lambda x: L.Add()([L.Dense(5)(x), x])),
    "concatenate": lambda: functional((4,), lambda x: L.Concatenate()([L.Dense(2)(x), x])),
    "chain": lambda: keras.Sequential(
        [keras.Input((6, 6, 1)), L.Conv2D(2, 3), L.BatchNormalization(), L.AveragePooling2D(2), L.Flatten(),
         L.Dense(3)]
    ),
}


@pytest.mark.parametrize("case", sorted(AFFINE_CASES))
def test_affine_compilation_equals_the_layers(case):
    model = AFFINE_CASES[case]()
    if case == "chain":
        randomize(model)
    program = he_program.compile_model(model)
    assert [type(s) for s in program.stages] == [he_program.Affine]  # one stretch, one matrix
    x = rand((6,) + program.input_shape, seed=7)  # not the compiler's probes
    expected = np.asarray(model(x, training=False), "float64").reshape(len(x), -1)
    got = program.plain(x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=PLAIN_TOL * max(1.0, np.abs(expected).max()))


def test_dense_matrix_is_its_kernel_exactly():
    # Basis vectors through a float64 clone: f(e_i) - f(0) is the kernel row, bit for bit.
    model = single(L.Dense(4), (3,))
    stage = he_program.compile_model(model).stages[0]
    kernel, bias = (np.asarray(w, "float64") for w in model.layers[-1].get_weights())
    assert np.array_equal(stage.matrix, kernel) and np.array_equal(stage.bias, bias)


def per_channel_poly(channels, seed=3):
    p = Polynomial([0.2, 0.5, 0.1], trainable_coefficients=True, per_channel=True, channels=channels)
    p.coefficient_weights.assign(np.random.default_rng(seed).normal(0, 0.3, (3, channels)).astype("float32"))
    return p


POLY_CASES = {
    "square_layer": lambda: keras.Sequential([keras.Input((4,)), L.Dense(3), Square(), L.Dense(2)]),
    "square_activation": lambda: keras.Sequential(
        [keras.Input((4,)), L.Dense(3, activation=SquareActivation("clip:1")), L.Dense(2)]),
    # what recover leaves: s·x² (layer and activation)
    "scaled_square_layer": lambda: keras.Sequential([keras.Input((4,)), L.Dense(3), Square(scale=0.3), L.Dense(2)]),
    "scaled_square_activation": lambda: keras.Sequential(
        [keras.Input((4,)), L.Dense(3, activation=SquareActivation(scale=0.3)), L.Dense(2)]),
    "poly_layer": lambda: keras.Sequential([keras.Input((4,)), L.Dense(3), Polynomial([0.1, -0.5, 0.25, 0.05])]),
    "poly_activation": lambda: keras.Sequential(
        [keras.Input((4,)), L.Dense(3, activation=PolynomialActivation([0, 1, 0.5])), L.Dense(2)]),
    "per_channel": lambda: keras.Sequential([keras.Input((2, 3)), L.Dense(3), per_channel_poly(3), L.Flatten()]),
}


@pytest.mark.parametrize("case", sorted(POLY_CASES))
def test_polynomial_stages_equal_the_model(case):
    model = POLY_CASES[case]()
    program = he_program.compile_model(model)
    assert any(isinstance(s, he_program.Poly) for s in program.stages)
    x = rand((5,) + program.input_shape, seed=11)
    expected = np.asarray(model(x), "float64").reshape(len(x), -1)
    np.testing.assert_allclose(program.plain(x), expected, atol=PLAIN_TOL * max(1.0, np.abs(expected).max()))


class _Drifting(he_evaluate._PlainBackend):
    """Plaintext stand-in that misbehaves like TenSEAL: each rescale into level l
    multiplies the value by drift(l) (TenSEAL resets the scale to 2^s after
    dividing by a prime q != 2^s)."""

    def drift(self, level):
        return 1.0 + 0.01 * level

    def matmul(self, x, m, level):
        return super().matmul(x, m, level) * self.drift(level)

    def mul_scalar(self, x, c, level):
        return super().mul_scalar(x, c, level) * self.drift(level)

    def mul_vector(self, x, v, key, level):
        return super().mul_vector(x, v, key, level) * self.drift(level)

    def mul(self, a, b, level):
        return super().mul(a, b, level) * self.drift(level)


@pytest.mark.parametrize("case", ["square_layer", "poly_layer", "per_channel"])
def test_evaluator_compensates_rescale_drift(case):
    program = he_program.compile_model(POLY_CASES[case]())
    x = rand((4, program.input_size), seed=5).astype("float64")
    _, out = he_evaluate._evaluate(program, _Drifting(), x)
    np.testing.assert_allclose(out.data / out.factor, program.plain(x), rtol=1e-12, atol=1e-12)


def test_depth_counting_rule():
    depth = lambda m: he_params.depth_and_magnitudes(he_program.compile_model(m), rand((1,) + tuple(m.inputs[0].shape[1:])))[0]  # noqa: E731
    # matrix 1 + x² 1 + matrix 1
    assert depth(POLY_CASES["square_layer"]()) == 3
    # matrix 1 + degree 3 with coefficients: ceil(log2 3) + 1 = 3
    assert depth(POLY_CASES["poly_layer"]()) == 4


def test_parameters_fit_security_and_slots():
    for d in range(1, 12):
        for slots in (10, 3000, 7000):
            p = he_params.choose_parameters(d, slots, {d: 100.0})
            assert p.total_bits <= he_limits.MAX_MODULUS_BITS[p.poly_modulus_degree]
            assert p.poly_modulus_degree // 2 >= slots
            assert len(p.coeff_mod_bit_sizes) == d + 2 and max(p.coeff_mod_bit_sizes) <= 60
            assert p.scale_bits >= he_limits.MIN_SCALE_BITS
            assert p.coeff_mod_bit_sizes[0] - p.scale_bits >= np.log2(100.0) + 1


def test_parameters_refused_when_nothing_fits():
    with pytest.raises(he_limits.ParameterError, match="depth 40"):
        he_params.choose_parameters(40, 100, {})
    with pytest.raises(he_limits.ParameterError, match="slots"):
        he_params.choose_parameters(2, 20000, {})


def tiny_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3, 3, 1)), L.Conv2D(2, 2, padding="same"), L.BatchNormalization(), L.Flatten(), Square(),
         L.Dense(4), per_channel_poly(4), L.Dense(3, activation="softmax")]
    )
    randomize(model, seed=2)
    model.layers[-2].coefficient_weights.assign(
        np.random.default_rng(4).normal(0, 0.3, (3, 4)).astype("float32"))
    return model


def logits_of(model, x):
    """Independent reference: the same layers with the final softmax made linear."""
    last = model.layers[-1]
    twin_last = L.Dense(last.units, activation=None)
    twin = keras.Sequential([keras.Input(model.inputs[0].shape[1:])] + model.layers[:-1] + [twin_last])
    twin_last.set_weights(last.get_weights())
    return np.asarray(twin(x, training=False), "float64")


# CKKS at the chosen scale (2^26 here) keeps ~5 significant digits through the
# chain; the logits are O(1), so 1e-3 absolute leaves a wide margin.
HE_TOL = 1e-3


def test_encrypted_run_matches_plaintext():
    model = tiny_model()
    # Two samples keep it fast: each costs one rotation per input of every matrix.
    x = rand((2, 3, 3, 1), seed=9)
    y = np.array([0, 2])
    report = he_encrypted.run(model, x, y)
    reference = logits_of(model, x)
    np.testing.assert_allclose(report.plaintext_logits, reference, atol=1e-5)
    err = np.abs(report.encrypted_logits - reference).max()
    assert err <= HE_TOL * max(1.0, np.abs(reference).max()), err
    assert report.agreement == 1.0
    assert report.encrypted_accuracy == float((reference.argmax(1) == y).mean())
    p = report.parameters
    assert p.depth == 6  # conv+BN 1, x² 1, dense 1, degree 2 per channel 2, dense 1
    assert p.total_bits <= he_limits.MAX_MODULUS_BITS[p.poly_modulus_degree]
    assert set(report.latency) == {"encrypt", "evaluate", "decrypt"}


def test_tenseal_vector_plain_add_breaks_the_next_product():
    """Why biases are added as ciphertexts: TenSEAL's add_plain of a vector zeroes
    the repetition mm relies on (OpenMined/TenSEAL#462). If this starts to fail,
    plain biases would work again and the encrypted constants could go."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[40, 30, 30, 40])
    ctx.global_scale = 2.0**30
    ctx.generate_galois_keys()
    rng = np.random.default_rng(0)
    x, a, b, bias = rng.normal(size=5), rng.normal(size=(5, 3)), rng.normal(size=(3, 4)), rng.normal(size=3)
    want = (x @ a + bias) @ b
    enc = ts.ckks_vector(ctx, x.tolist())
    plain = np.array((enc.mm(a) + bias.tolist()).mm(b).decrypt())
    encrypted = np.array((enc.mm(a) + ts.ckks_vector(ctx, bias.tolist())).mm(b).decrypt())
    assert np.abs(plain - want).max() > 1e-2
    np.testing.assert_allclose(encrypted, want, atol=1e-3)


def test_tenseal_rescale_leaves_a_measurable_factor():
    """Why the evaluator compensates drift: after a rescale TenSEAL resets the scale
    to 2^s although it divided by a prime q != 2^s. If the factors become 1, the
    compensation is a no-op and could go."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[40, 27, 27, 40])
    ctx.global_scale = 2.0**27
    factors = he_mm.measure_drift(ctx, 2)
    assert all(1e-5 < abs(f - 1) < 1e-2 for f in factors), factors


def out_of_scope(name):
    inp = keras.Input((4, 4, 1))
    if name == "maxpool":
        out = L.Dense(3)(L.Flatten()(L.MaxPooling2D(name="pool")(inp)))
        return keras.Model(inp, out), "pool", "--pool avg"
    if name == "relu":
        out = L.Dense(3)(L.Flatten()(L.Conv2D(2, 3, activation="relu", name="conv")(inp)))
        return keras.Model(inp, out), "conv", "actswap convert"
    if name == "relu_layer":
        out = L.Dense(3)(L.ReLU(name="act")(L.Flatten()(inp)))
        return keras.Model(inp, out), "act", "actswap convert"
    if name == "softmax_inside":
        out = L.Dense(3)(L.Dense(4, activation="softmax", name="inner")(L.Flatten()(inp)))
        return keras.Model(inp, out), "inner", "softmax inside"
    if name == "product":
        h = L.Flatten()(inp)
        return keras.Model(inp, L.Multiply(name="mul")([h, h])), "mul", "outside"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["maxpool", "relu", "relu_layer", "softmax_inside", "product"])
def test_out_of_scope_is_refused_naming_the_layer(name):
    model, layer, hint = out_of_scope(name)
    with pytest.raises(he_limits.OutOfScopeError) as info:
        he_program.compile_model(model)
    message = str(info.value)
    assert f"'{layer}'" in message and hint in message, message
    assert info.value.exit_code == 2 and "\n" not in message


runner = CliRunner()


def test_cli_he_run_json(tmp_path):
    model = keras.Sequential([keras.Input((3,)), L.Dense(4), Square(), L.Dense(2, activation="softmax")])
    randomize(model)
    path = tmp_path / "m.keras"
    model.save(path)
    x = rand((3, 3), seed=2)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 1]))
    result = runner.invoke(app, ["he-run", str(path), "--data", str(tmp_path / "d.npz"), "--limit", "2", "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    data = json.loads(result.stdout)
    assert data["samples"] == 2 and data["top1_agreement"] == 1.0
    assert data["parameters"]["depth"] == 3 and data["max_abs_logit_error"] < HE_TOL
    assert data["plaintext_accuracy"] is not None


def test_cli_he_run_refuses_max_pooling(tmp_path):
    model, _, _ = out_of_scope("maxpool")
    path = tmp_path / "pool.keras"
    model.save(path)
    np.savez(tmp_path / "d.npz", x=rand((2, 4, 4, 1)))
    result = runner.invoke(app, ["he-run", str(path), "--data", str(tmp_path / "d.npz")])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'pool'" in lines[0] and "--pool avg" in lines[0]


def test_cli_he_run_needs_x(tmp_path):
    path = tmp_path / "m.keras"
    keras.Sequential([keras.Input((3,)), L.Dense(2)]).save(path)
    np.savez(tmp_path / "d.npz", inputs=rand((2, 3)))
    result = runner.invoke(app, ["he-run", str(path), "--data", str(tmp_path / "d.npz")])
    assert result.exit_code == 2 and "needs 'x'" in result.stderr


def test_cli_he_run_fails_when_the_encrypted_logits_are_off(tmp_path, monkeypatch):
    """A fault in the evaluator (here: every rescale's drift compensated as 0.5
    instead of ~1, so each level halves the values) is a failure, not a report:
    exit 1 and one error line, the figures still printed."""
    from actswap.he import seal

    model = keras.Sequential([keras.Input((3,)), L.Dense(4), Square(), L.Dense(2, activation="softmax")])
    randomize(model)
    model.save(tmp_path / "m.keras")
    np.savez(tmp_path / "d.npz", x=rand((2, 3), seed=2))
    monkeypatch.setattr(seal.Seal, "drift", lambda self, level: 0.5)
    result = runner.invoke(app, ["he-run", str(tmp_path / "m.keras"), "--data", str(tmp_path / "d.npz"), "--json"])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    data = json.loads(result.stdout)
    assert data["max_rel_logit_error"] > 1e-2 and "differ from plaintext" in data["failure"]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: encrypted run failed: "), result.stderr
