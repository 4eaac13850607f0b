"""Polynomial targets (poly:..., approx), other source activations (--from)."""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import actswap
from actswap import registry
from actswap.activations import poly_op
from actswap.cli import app

runner = CliRunner()
coefficients = st.lists(st.floats(-3, 3, allow_nan=False), min_size=2, max_size=5).filter(
    lambda c: any(abs(v) > 1e-3 for v in c[1:])
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(coefficients, st.lists(st.floats(-2, 2), min_size=1, max_size=8))
@example([0.0, 0.0, 0.0, 1.0], [1.0, -0.5])  # p' has no linear term: its slope is not constant
@example([0.0, 0.5, 0.0, -0.1], [1.5, 0.2])  # an odd fit, as tanh's
@example([0.2, 0.7], [-1.0, 2.0])  # linear: the constant slope
def test_poly_op_values_and_gradients_match_numpy(coeffs, xs):
    x = tf.constant(np.array(xs, "float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = poly_op(x, coeffs)
    g = tape.gradient(y, x).numpy()
    p = np.polynomial.Polynomial(np.trim_zeros(np.array(coeffs, "float64"), "b"))
    np.testing.assert_allclose(y.numpy(), p(np.array(xs)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g, p.deriv()(np.array(xs)), rtol=1e-4, atol=1e-4)


def test_clip_mode_clips_the_polynomial_derivative():
    x = tf.constant([-3.0, 0.1, 3.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = poly_op(x, [0.0, 1.0, 1.0], "clip:2")  # p' = 1 + 2x: -5, 1.2, 7
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), [-2.0, 1.2, 2.0], rtol=1e-6)


@pytest.mark.parametrize(
    "activation, fn, interval, degree, bound",
    [
        ("tanh", np.tanh, (-2.0, 2.0), 3, 0.06),
        ("sigmoid", lambda x: 1 / (1 + np.exp(-x)), (-4.0, 4.0), 3, 0.03),
        ("relu", lambda x: np.maximum(x, 0), (-4.0, 4.0), 2, 0.45),
    ],
)
def test_approx_fits_are_close_on_their_interval(activation, fn, interval, degree, bound):
    coef = registry.fit_coefficients(activation, "", degree, interval)
    xs = np.linspace(*interval, 1001)
    err = np.max(np.abs(np.polynomial.Polynomial(coef)(xs) - fn(xs)))
    assert err < bound, err
    assert len(coef) == degree + 1


def acts_model():
    keras.utils.set_random_seed(0)
    i = keras.Input((6,), name="x")
    h = keras.layers.Dense(8, activation="gelu", name="g")(i)
    h = keras.layers.Dense(8, activation="silu", name="s")(h)
    h = keras.layers.Activation("tanh", name="t")(h)
    h = keras.ops.sigmoid(keras.layers.Dense(4, name="d")(h))
    return keras.Model(i, keras.layers.Dense(3, activation="softmax", name="out")(h))


def test_approx_from_all_replaces_every_elementwise_activation_with_parity(tmp_path):
    model = acts_model()
    converted, report = actswap.convert(model, to="approx", sources=registry.resolve_sources("all"), degree=3)
    # keras.ops.sigmoid's op gets an automatic name (sigmoid, sigmoid_1, ...): keyed by activation.
    actions = {s.activation: (s.path if s.activation != "sigmoid" else "op", s.action) for s in report.sites}
    assert actions == {
        "gelu": ("g", "replaced"), "silu": ("s", "replaced"), "tanh": ("t", "replaced"),
        "sigmoid": ("op", "replaced"), "softmax": ("out", "skipped"),
    }
    left = {s.activation for s in actswap.inspect(converted).sites}
    assert left == {"poly", "softmax"}
    # Independent reference: a NumPy forward pass evaluating the reported polynomials.
    coef = {s.activation: np.polynomial.Polynomial(s.coefficients) for s in report.sites if s.action == "replaced"}
    gelu, silu, tanh, sigm = coef["gelu"], coef["silu"], coef["tanh"], coef["sigmoid"]
    w = {layer.name: [v.numpy().astype("float64") for v in layer.weights] for layer in model.layers}
    x = np.random.default_rng(0).uniform(-1, 1, (5, 6))
    h = gelu(x @ w["g"][0] + w["g"][1])
    h = tanh(silu(h @ w["s"][0] + w["s"][1]))
    h = sigm(h @ w["d"][0] + w["d"][1])
    logits = h @ w["out"][0] + w["out"][1]
    ref = np.exp(logits - logits.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(converted(x.astype("float32")).numpy(), ref, rtol=1e-4, atol=1e-5)
    # Saved and reloaded in a fresh process after `import actswap` only.
    path = actswap.save(converted, tmp_path / "approx.keras")
    code = (
        "import sys, numpy as np, actswap, keras; m = keras.models.load_model(sys.argv[1]);"
        "print(np.asarray(m(np.asarray(sys.argv[2].split(','), 'float32').reshape(1, 6))).tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), ",".join(map(str, x[0].astype("float32")))],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_allclose(json.loads(out.stdout.strip().splitlines()[-1])[0], ref[0], rtol=1e-4, atol=1e-5)


def test_polynomials_export_as_mul_and_add_only(tmp_path):
    from actswap.export import export_onnx

    converted, _ = actswap.convert(acts_model(), to="approx", sources={"gelu", "silu", "tanh", "sigmoid"})
    r = export_onnx(converted, tmp_path / "p.onnx")
    assert set(r.op_counts) <= {"MatMul", "Add", "Mul", "Softmax"} and r.parity.ok


def test_fixed_poly_on_relu_equals_square_when_it_is_x_squared():
    from cases import CASES, sample_inputs

    model, expected = CASES["functional_forms"]()
    sq, _ = actswap.convert(model, to="square")
    poly, report = actswap.convert(model, to="poly:0,0,1")
    assert report.replaced == expected["replaced"]
    x = sample_inputs(model)
    np.testing.assert_array_equal(poly(x).numpy(), sq(x).numpy())


def test_poly_in_a_savedmodel_graph(tmp_path):
    from conftest import assert_close, relu_as_square
    from tf_cases import ControlFlowModule

    m = ControlFlowModule()
    src = tmp_path / "sm"
    tf.saved_model.save(m, str(src), signatures=m.signatures())
    converted, report = actswap.convert(src, to="poly:0,0,1", grad="clip:0.5")
    # 5 in the signatures, 1 in the module's own function `inner` (carried over too: issue 16)
    assert report.replaced == 6
    out = actswap.save(converted, tmp_path / "sm.poly")
    loaded = tf.saved_model.load(str(out))
    x = np.random.default_rng(0).uniform(-0.2, 1.0, (3, 4)).astype("float32")
    ref_module = ControlFlowModule()
    with relu_as_square("clip:0.5"):
        ref = ref_module.main(tf.constant(x))
    assert_close(loaded.signatures["serving_default"](x=tf.constant(x))["y"], ref["y"])


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--to", "square", "--from", "sigmoid"], "use --to approx"),
        (["--to", "poly:1"], "needs coefficients"),
        (["--to", "poly:a,b"], "needs coefficients"),
        (["--to", "approx", "--degree", "0"], "--degree"),
        (["--to", "approx", "--range", "3,1"], "LO < HI"),
        (["--to", "square", "--from", "nosuch"], "unknown source"),
    ],
)
def test_bad_target_and_source_options_are_exit_2(fixtures_dir, tmp_path, args, fragment):
    r = runner.invoke(app, ["convert", str(fixtures_dir / "no_relu.keras"), "-o", str(tmp_path / "o.keras"), *args])
    assert r.exit_code == 2 and fragment in r.stderr, (r.stdout, r.stderr)
    assert not (tmp_path / "o.keras").exists()


# --- calibration ----------------------------------------------------------------


def test_calibrated_ranges_are_the_pre_activation_ranges():
    model = acts_model()
    x = np.random.default_rng(0).uniform(-1, 1, (100, 6)).astype("float32")
    _, report = actswap.convert(model, to="approx", sources={"gelu"}, calibrate=x, margin=0.25)
    site = next(s for s in report.sites if s.path == "g")
    w, b = (v.numpy().astype("float64") for v in model.get_layer("g").weights)
    pre = x.astype("float64") @ w + b  # independent: the Dense before its activation
    assert site.input_range["min"] == pytest.approx(pre.min(), rel=1e-5)
    assert site.input_range["max"] == pytest.approx(pre.max(), rel=1e-5)
    assert site.input_range["count"] == pre.size
    width = pre.max() - pre.min()
    assert site.fit_interval == pytest.approx((pre.min() - 0.25 * width, pre.max() + 0.25 * width), rel=1e-5)
    assert report.to_dict()["sites"][0]["input_range"]["min"] == site.input_range["min"]


REFERENCE = {
    "relu": lambda x: np.maximum(x, 0.0),
    "relu6": lambda x: np.clip(x, 0.0, 6.0),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.2 * x),
    "elu": lambda x: np.where(x > 0, x, np.exp(x) - 1.0),
    "gelu": lambda x: 0.5 * x * (1.0 + np.vectorize(__import__("math").erf)(x / np.sqrt(2.0))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "softplus": lambda x: np.log1p(np.exp(x)),
}


@pytest.mark.parametrize("degree", [2, 3, 4, 8])
@pytest.mark.parametrize("activation", sorted(REFERENCE))
def test_fit_is_no_worse_than_numpys_least_squares(activation, degree):
    lo, hi = -3.0, 7.0  # a calibrated-style, asymmetric range reaching relu6's cap
    ours = np.polynomial.Polynomial(registry.fit_coefficients(activation, "", degree, (lo, hi)))
    grid = np.linspace(lo, hi, 2001)
    f = REFERENCE[activation]
    theirs = np.polynomial.Polynomial.fit(grid, f(grid), degree)
    dense = np.linspace(lo, hi, 20001)
    err_ours = np.max(np.abs(ours(dense) - f(dense)))
    err_numpy = np.max(np.abs(theirs(dense) - f(dense)))
    assert err_ours <= 1.01 * err_numpy, (err_ours, err_numpy)


def test_calibrated_conversion_equals_numpy_evaluation_of_the_fits():
    model = acts_model()
    x = np.random.default_rng(1).uniform(-1, 1, (50, 6)).astype("float32")
    sources = {"gelu", "silu", "tanh", "sigmoid"}
    converted, report = actswap.convert(model, to="approx", sources=sources, degree=4, calibrate=x)
    intervals = {s.activation: s.fit_interval for s in report.sites if s.action == "replaced"}
    assert set(intervals) == sources

    coef = {s.activation: s.coefficients for s in report.sites if s.action == "replaced"}
    for name in sources:
        # The reported polynomial is the fit of that activation on that site's range.
        assert coef[name] == registry.fit_coefficients(name, "", 4, intervals[name])

    def fit(name, _path):
        return np.polynomial.Polynomial(coef[name])

    w = {layer.name: [v.numpy().astype("float64") for v in layer.weights] for layer in model.layers}
    h = fit("gelu", "g")(x @ w["g"][0] + w["g"][1])
    h = fit("tanh", "t")(fit("silu", "s")(h @ w["s"][0] + w["s"][1]))
    h = fit("sigmoid", "sigmoid")(h @ w["d"][0] + w["d"][1])
    logits = h @ w["out"][0] + w["out"][1]
    ref = np.exp(logits - logits.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(converted(x).numpy(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name, scale", [("MobileNetV2", 1.0), ("EfficientNetB0", 255.0)])
def test_mobilenetv2_and_efficientnet_become_polynomial(name, scale):
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), include_top=False, pooling="avg")
    x = np.random.default_rng(0).uniform(0, scale, (4, 32, 32, 3)).astype("float32")
    converted, report = actswap.convert(
        model, to="approx", sources=registry.resolve_sources("all"), calibrate=x
    )
    assert report.replaced > 0 and report.skipped == 0
    assert set(actswap.inspect(converted).counts()) == {"poly"}
    assert np.all(np.isfinite(converted(x).numpy()))


def test_cli_calibrate_puts_ranges_in_the_json(tmp_path, fixtures_dir):
    x = np.random.default_rng(0).uniform(0, 1, (16, 28, 28, 1)).astype("float32")
    np.savez(tmp_path / "cal.npz", x=x)
    r = runner.invoke(app, [
        "convert", str(fixtures_dir / "mnist_cnn.keras"), "--to", "approx", "--calibrate", str(tmp_path / "cal.npz"),
        "-o", str(tmp_path / "a.keras"), "--json",
    ])
    assert r.exit_code == 0, r.stderr
    sites = json.loads(r.stdout)["sites"]
    assert all("input_range" in s and "fit_interval" in s for s in sites if s["action"] == "replaced")


# --- HE-readiness ---------------------------------------------------------------


def test_inspect_he_on_the_fixture_before_and_after_matches_a_hand_count(tmp_path, fixtures_dir):
    # mnist_cnn: conv1(relu) pool1 conv2 relu2 pool2 flatten fc1 relu3 probs(softmax).
    # Before: 3 ReLUs, softmax and 2 MaxPools are not polynomial; multiplications:
    # conv1, conv2, fc1, probs = 4 ciphertext x plaintext, no ciphertext x ciphertext.
    # After --to square: 3 squares (1 ct x ct each) on the one path -> depth 3 + 4 = 7.
    def he(path):
        r = runner.invoke(app, ["inspect", str(path), "--he", "--json"])
        assert r.exit_code == 0, r.stderr
        return json.loads(r.stdout)["he"]

    before = he(fixtures_dir / "mnist_cnn.keras")
    # The output softmax is the client's (applied after decryption): listed apart, not blocking.
    assert sorted(i["path"] for i in before["non_polynomial"]) == [
        "conv1", "pool1", "pool2", "relu2", "relu3",
    ]
    assert [i["path"] for i in before["client_side"]] == ["probs"]
    assert before["multiplicative_depth"] == {"depth": 4, "ct_ct": 0, "ct_pt": 4}
    out = tmp_path / "sq.keras"
    assert runner.invoke(app, ["convert", str(fixtures_dir / "mnist_cnn.keras"), "--to", "square", "-o", str(out)]).exit_code == 0
    after = he(out)
    assert sorted(i["path"] for i in after["non_polynomial"]) == ["pool1", "pool2"]
    assert after["multiplicative_depth"] == {"depth": 7, "ct_ct": 3, "ct_pt": 4}
    assert after["he_ready"] is False
    # Degree 4 fits: ceil(log2 4) = 2 ct x ct each, and their coefficients scale (+1 ct x pt each).
    approx, _ = actswap.convert(fixtures_dir / "mnist_cnn.keras", to="approx", degree=4)
    from actswap.he import he_report

    assert he_report(approx).to_dict()["multiplicative_depth"] == {"depth": 13, "ct_ct": 6, "ct_pt": 7}


def test_fit_command_reports_errors_and_plots(tmp_path):
    png = tmp_path / "fit.png"
    r = runner.invoke(app, ["fit", "gelu", "--degree", "4", "--range", "-4,4", "--plot", str(png), "--json"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["coefficients"] == list(registry.fit_coefficients("gelu", "", 4, (-4.0, 4.0)))
    assert data["max_error"] <= 1.01 * data["numpy_lstsq_max_error"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert runner.invoke(app, ["fit", "softmax"]).exit_code == 2


# --- quad: trainable coefficients ------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
def test_quad_coefficients_train_and_survive_reload(tmp_path, fixtures_dir, per_channel):
    converted, report = actswap.convert(fixtures_dir / "mnist_cnn.keras", to="quad", per_channel=per_channel)
    assert report.replaced == 3
    coeffs = [w for w in converted.weights if w.path.endswith("coefficients")]
    assert len(coeffs) == 3  # conv1 (activation=), relu2 (Activation), relu3 (ReLU)
    if per_channel:
        assert sorted(tuple(w.shape) for w in coeffs) == [(3, 8), (3, 16), (3, 32)]
    # Initialised to the degree-2 fit of ReLU on the default range.
    init = np.asarray(registry.fit_coefficients("relu", "", 2, registry.APPROX_DEFAULT_INTERVAL), "float32")
    for w in coeffs:
        values = w.numpy().reshape(3, -1)
        np.testing.assert_allclose(values, np.broadcast_to(init[:, None], values.shape), rtol=1e-6)
    # The original weights are all there, bit-identical (the coefficients are new).
    original = actswap.load(fixtures_dir / "mnist_cnn.keras")
    from actswap.rewrite import copied_weights

    assert [w.numpy().tobytes() for w in copied_weights(converted)] == [w.numpy().tobytes() for w in original.weights]
    before = [w.numpy().copy() for w in coeffs]
    x = np.random.default_rng(0).uniform(0, 1, (32, 28, 28, 1)).astype("float32")
    y = np.random.default_rng(1).integers(0, 10, 32)
    converted.compile(optimizer=keras.optimizers.SGD(1e-3), loss="sparse_categorical_crossentropy")
    converted.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert all(not np.array_equal(b, w.numpy()) for b, w in zip(before, coeffs))
    path = actswap.save(converted, tmp_path / "quad.keras")
    code = (
        "import sys, json, numpy as np, actswap, keras; m = keras.models.load_model(sys.argv[1]);"
        "print(json.dumps([w.numpy().tolist() for w in m.weights if w.path.endswith('coefficients')]))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    reloaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(reloaded) == len(coeffs)
    for r, w in zip(reloaded, coeffs):  # the trained values, not the initial fit
        np.testing.assert_array_equal(np.asarray(r, "float32"), w.numpy())


def test_quad_calibrated_starts_from_the_fit_on_the_measured_range(fixtures_dir):
    """--to quad --calibrate: the activation= site holds a Polynomial *layer* (its
    coefficients are weights); calibration probed it like any activation= value
    (it raised KeyError before)."""
    x = np.random.default_rng(0).uniform(0, 1, (16, 28, 28, 1)).astype("float32")
    converted, report = actswap.convert(fixtures_dir / "mnist_cnn.keras", to="quad", calibrate=x)
    site = {s.path: s for s in report.sites}["conv1"]
    assert site.input_range is not None and site.input_range["count"] > 0
    lo, hi = site.fit_interval
    expected = np.asarray(registry.fit_coefficients("relu", "", 2, (lo, hi)), "float32")
    coeffs = [w for w in converted.weights if w.path.endswith("coefficients")]
    np.testing.assert_allclose(coeffs[0].numpy(), expected, rtol=1e-5)


def test_quad_exports_to_onnx_as_mul_and_add(tmp_path, fixtures_dir):
    from actswap.export import export_onnx

    converted, _ = actswap.convert(fixtures_dir / "mnist_cnn.keras", to="quad")
    r = export_onnx(converted, tmp_path / "q.onnx")
    assert r.op_counts.get("Relu", 0) == 0 and r.op_counts.get("Pow", 0) == 0 and r.parity.ok


def test_trainable_options_are_refused_for_fixed_targets(fixtures_dir, tmp_path):
    r = runner.invoke(app, ["convert", str(fixtures_dir / "mnist_cnn.keras"), "--to", "square", "--trainable",
                            "-o", str(tmp_path / "o.keras")])
    assert r.exit_code == 2 and "--trainable" in r.stderr


# --- --pool avg and overflow warnings --------------------------------------------


def test_pool_avg_swaps_max_pooling_with_parity(fixtures_dir):
    from conftest import assert_close, relu_as_square

    original = actswap.load(fixtures_dir / "mnist_cnn.keras")
    converted, report = actswap.convert(original, pool="avg")
    pools = [(s.path, s.action) for s in report.sites if s.activation == "max_pool"]
    assert pools == [("pool1", "replaced"), ("pool2", "replaced")]
    assert [type(converted.get_layer(n)).__name__ for n in ("pool1", "pool2")] == ["AveragePooling2D"] * 2
    # Independent reference: Keras rebuilds the same config with AveragePooling2D.
    config = json.loads(json.dumps(original.get_config()).replace('"MaxPooling2D"', '"AveragePooling2D"'))
    reference = keras.Sequential.from_config(config)
    reference.set_weights(original.get_weights())
    x = np.random.default_rng(0).uniform(0, 1, (4, 28, 28, 1)).astype("float32")
    with relu_as_square():
        ref = reference(x)
    assert_close(converted(x), ref, rtol=1e-5)


def test_overflow_after_the_swap_is_warned_with_calibration():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    h = keras.layers.Dense(4, activation="relu", kernel_initializer=keras.initializers.Constant(100.0))(inp)
    model = keras.Model(inp, keras.layers.Dense(1)(h))
    x = np.ones((8, 4), "float32")  # pre-activations 400: x² = 160000 > float16's 65504
    _, report = actswap.convert(model, calibrate=x)
    (site,) = report.sites
    assert site.output_max == pytest.approx(160000.0, rel=1e-5)
    assert any("overflows float16" in n and "float32" not in n for n in report.notes)


def test_fit_command_on_a_calibrated_site_plots_its_histogram(tmp_path, fixtures_dir):
    x = np.random.default_rng(0).uniform(0, 1, (32, 28, 28, 1)).astype("float32")
    np.savez(tmp_path / "cal.npz", x=x)
    png = tmp_path / "site.png"
    r = runner.invoke(app, [
        "fit", "relu", "--model", str(fixtures_dir / "mnist_cnn.keras"), "--calibrate", str(tmp_path / "cal.npz"),
        "--site", "relu3", "--margin", "0", "--plot", str(png), "--json",
    ])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    # The interval is relu3's measured input range (margin 0), an independent check of which:
    model = actswap.load(fixtures_dir / "mnist_cnn.keras")
    pre = keras.Model(model.inputs, model.get_layer("fc1").output)(x).numpy()
    assert data["interval"] == pytest.approx([pre.min(), pre.max()], rel=1e-5)
    assert png.read_bytes()[:4] == b"\x89PNG"
    r = runner.invoke(app, ["fit", "relu", "--model", str(fixtures_dir / "mnist_cnn.keras")])
    assert r.exit_code == 2 and "go together" in r.stderr


def test_calibration_takes_a_tf_data_dataset_like_arrays():
    model = acts_model()
    x = np.random.default_rng(2).uniform(-1, 1, (40, 6)).astype("float32")
    y = np.zeros((40,), "int64")
    _, from_arrays = actswap.convert(model, to="approx", sources={"gelu"}, calibrate=x)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)  # (inputs, labels) batches
    _, from_dataset = actswap.convert(model, to="approx", sources={"gelu"}, calibrate=ds)
    a = {s.path: s.input_range for s in from_arrays.sites}
    b = {s.path: s.input_range for s in from_dataset.sites}
    assert a["g"]["min"] == b["g"]["min"] and a["g"]["max"] == b["g"]["max"] and a["g"]["count"] == b["g"]["count"]


def test_approx_trainable_of_higher_degree_trains():
    model = acts_model()
    converted, report = actswap.convert(model, to="approx", sources={"tanh", "sigmoid"}, degree=3, trainable=True)
    coeffs = [w for w in converted.trainable_weights if w.path.endswith("coefficients")]
    assert sorted(tuple(w.shape) for w in coeffs) == [(4,), (4,)]
    before = [w.numpy().copy() for w in coeffs]
    converted.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).uniform(-1, 1, (16, 6)).astype("float32")
    converted.fit(x, np.arange(16) % 3, epochs=1, batch_size=16, verbose=0)
    assert all(not np.array_equal(b, w.numpy()) for b, w in zip(before, coeffs))
