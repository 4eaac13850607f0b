"""The polynomial transformer layers of actswap.transformer and actswap.normalization.

Every expected value comes from a NumPy reference written here (float64), not
from the module: the shifted square, Keras' LayerNormalization formulas
(including its rms_scaling, which divides by the variance) and multi-head
attention written out with einsum from the layer's kernels.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from actswap.normalization import PolyLayerNormalization
from actswap.transformer import PolyMultiHeadAttention, PolySoftmax, PolySoftmaxActivation


def central_differences(f, at, h):
    """d f / d at, entry by entry, by central differences (f: array -> float)."""
    out = np.zeros_like(at)
    for i in np.ndindex(at.shape):
        e = np.zeros_like(at)
        e[i] = h
        out[i] = (f(at + e) - f(at - e)) / (2 * h)
    return out

RTOL, ATOL = 1e-5, 1e-5
FORBIDDEN_OPS = {"Exp", "Sqrt", "Rsqrt", "Div", "RealDiv", "DivNoNan", "Pow", "Reciprocal", "Softmax", "Log"}


def rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------- references
def np_softmax(x, axis, mask=None):
    x = np.asarray(x, np.float64)
    if mask is not None:
        x = np.where(mask, x, -1e9)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    out = e / e.sum(axis=axis, keepdims=True)
    return out if mask is None else np.where(mask, out, 0.0)


def np_poly(x, shift, scale, mask=None):
    out = scale * (np.asarray(x, np.float64) + shift) ** 2
    return out if mask is None else np.where(mask, out, 0.0)


def np_layer_norm(x, gamma, beta, axis, eps, rms=False, coefficients=None):
    """Keras' formula; with ``coefficients``, 1/sqrt(var + eps) replaced by q(var)."""
    x, axis = np.asarray(x, np.float64), tuple(axis)
    shape = [1] * x.ndim
    for i, a in enumerate(axis):
        shape[a] = x.shape[a]
    var = x.var(axis=axis, keepdims=True)
    if coefficients is None:
        inv = 1.0 / np.sqrt(var + eps)
    elif len(coefficients) == 1:
        inv = coefficients[0]
    else:
        inv = np.polynomial.polynomial.polyval(var, coefficients)
    y = (x if rms else x - x.mean(axis=axis, keepdims=True)) * inv
    if gamma is not None:
        y = y * np.reshape(gamma, shape)
    if beta is not None and not rms:
        y = y + np.reshape(beta, shape)
    return y


def mha_weights(layer):
    return {w.path.split("/", 1)[1]: np.asarray(w.numpy(), np.float64) for w in layer.weights}


def np_scores(layer, q_in, v_in):
    w = mha_weights(layer)
    q = np.einsum("btd,dnh->btnh", q_in, w["query/kernel"]) + w["query/bias"]
    k = np.einsum("bsd,dnh->bsnh", v_in, w["key/kernel"]) + w["key/bias"]
    return np.einsum("bsnh,btnh->bnts", k, q / np.sqrt(layer.key_dim)), w


def np_mha(layer, q_in, v_in, probs_fn, mask=None):
    """Returns (output, probabilities); mask is (B, T, S), True = attend."""
    scores, w = np_scores(layer, q_in, v_in)
    m = None if mask is None else np.broadcast_to(mask[:, None], scores.shape)
    probs = probs_fn(scores, m)
    v = np.einsum("bsd,dnh->bsnh", v_in, w["value/kernel"]) + w["value/bias"]
    out = np.einsum("bnts,bsnh->btnh", probs, v)
    return np.einsum("btnh,nhd->btd", out, w["attention_output/kernel"]) + w["attention_output/bias"], probs


def randomise(layer, seed=1):
    r = rng(seed)
    layer.set_weights([r.normal(0, 0.5, w.shape).astype("float32") for w in layer.get_weights()])


def copy_into(target, source):
    """The parent's weights into the converted layer's copies (not its own blend/peak)."""
    own = {id(w) for w in target.actswap_own_weights()}
    copies = [w for w in target.weights if id(w) not in own]
    assert [(w.path.split("/", 1)[1], w.shape) for w in copies] == \
        [(w.path.split("/", 1)[1], w.shape) for w in source.weights]
    for t, s in zip(copies, source.weights):
        t.assign(s)


def op_types(fn, *specs):
    graph = tf.function(fn).get_concrete_function(*specs).graph
    return {op.type for op in graph.get_operations()}


# ---------------------------------------------------------------- PolySoftmax
def test_poly_softmax_values_default_scale_and_mask():
    x = rng().normal(0, 2, (3, 4, 5)).astype("float32")
    layer = PolySoftmax(shift=3.0)
    np.testing.assert_allclose(layer(x), np_poly(x, 3.0, 1 / (5 * 9.0)), rtol=RTOL, atol=ATOL)
    assert layer.get_config()["scale"] == pytest.approx(1 / 45) and layer.weights == []
    assert np.allclose(PolySoftmax()(np.zeros((2, 5), "float32")).numpy().sum(-1), 1.0)  # uniform for 0

    both = PolySoftmax(axis=(1, 2), shift=2.0)
    np.testing.assert_allclose(both(x), np_poly(x, 2.0, 1 / (20 * 4.0)), rtol=RTOL, atol=ATOL)

    mask = rng(1).random((3, 4, 5)) > 0.4
    for m in (mask, mask.astype("float32")):
        got = PolySoftmax(shift=1.0, scale=0.5)(x, mask=m)
        np.testing.assert_allclose(got, np_poly(x, 1.0, 0.5, mask), rtol=RTOL, atol=ATOL)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.floats(-8, 8), st.floats(1e-3, 10), st.integers(1, 6), st.integers(0, 2**31))
def test_poly_softmax_equals_reference_for_any_shift_and_scale(shift, scale, n, seed):
    x = rng(seed).normal(0, 3, (2, n)).astype("float32")
    got = PolySoftmax(shift=shift, scale=scale)(x)
    np.testing.assert_allclose(got, np_poly(x, shift, scale), rtol=RTOL, atol=1e-6 * scale)


def test_poly_softmax_gradient_and_no_forbidden_ops():
    x = rng().normal(0, 2, (3, 6)).astype("float32")
    mask = rng(2).random((3, 6)) > 0.3
    dy = rng(3).normal(size=(3, 6)).astype("float32")
    layer = PolySoftmax(shift=2.0, scale=0.1)
    t = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(t)
        y = layer(t, mask=tf.constant(mask))
    grad = tape.gradient(y, t, output_gradients=tf.constant(dy))
    np.testing.assert_allclose(grad, np.where(mask, 2 * 0.1 * (x + 2.0) * dy, 0.0), rtol=RTOL, atol=ATOL)
    assert not op_types(layer, tf.TensorSpec((None, 6))) & FORBIDDEN_OPS


def test_poly_softmax_blend_mix_and_peak():
    x = rng().normal(0, 2, (4, 5)).astype("float32")
    mask = rng(4).random((4, 5)) > 0.3
    layer = PolySoftmax(shift=1.5, blend=True)
    layer(x)
    assert [w.name for w in layer.weights] == ["blend", "peak"] == [w.name for w in layer.actswap_own_weights()]
    assert PolySoftmax.actswap_blend_capable and PolySoftmax().actswap_own_weights() == []
    exact, poly = np_softmax(x, -1, mask), np_poly(x, 1.5, layer.scale, mask)
    np.testing.assert_allclose(layer(x, mask=mask), exact, rtol=RTOL, atol=1e-6)
    layer.factor.assign(0.5)
    np.testing.assert_allclose(layer(x, mask=mask, training=True), 0.5 * exact + 0.5 * poly, rtol=RTOL, atol=1e-6)
    assert layer.peak.dtype == "float32" and float(layer.peak.numpy()) == pytest.approx(np.abs(x).max())


def test_poly_softmax_calibration():
    batches = [rng(i).normal(0, 2, (3, 4, 5)).astype("float32") for i in range(2)]
    mask = rng(9).random((3, 4, 5)) > 0.3
    mask[0, 0] = False  # a fully masked row: no row sum to match, left out
    layer = PolySoftmax(shift=2.0)
    layer.calibrating = True
    for x in batches:
        np.testing.assert_allclose(layer(x, mask=mask), np_softmax(x, -1, mask), rtol=RTOL, atol=1e-6)
    layer.finish_calibration()
    sums = np.concatenate([np.where(mask, (x.astype(np.float64) + 2.0) ** 2, 0).sum(-1)[mask.any(-1)]
                           for x in batches])
    assert layer.scale == pytest.approx(1 / sums.mean(), rel=1e-9)
    with pytest.raises(RuntimeError, match="no calibration data"):
        layer.finish_calibration()  # the statistics were reset
    inp = keras.Input((5,))
    model = keras.Model(inp, PolySoftmax()(inp))
    model.layers[-1].calibrating = True
    model.predict(batches[0][0], verbose=0)  # traced: records nothing, and says so
    with pytest.raises(RuntimeError, match="eagerly"):
        model.layers[-1].finish_calibration()


# ----------------------------------------------------- PolyLayerNormalization
LN_CASES = [
    dict(coefficients=(0.7,)),
    dict(coefficients=(1.9, -1.2, 0.35)),
    dict(coefficients=(0.7,), rms_scaling=True),
    dict(coefficients=(1.9, -1.2, 0.35), rms_scaling=True),
    dict(coefficients=(1.9, -1.2, 0.35), axis=(1, 2)),
    dict(coefficients=(0.5, 0.1), axis=1, center=False),
    dict(coefficients=(0.7,), scale=False),
]


@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
@pytest.mark.parametrize("case", LN_CASES, ids=str)
def test_layer_norm_values_weights_and_exact_branch(case):
    x = rng().normal(0.3, 1.2, (3, 4, 5)).astype("float32")
    kwargs = {k: v for k, v in case.items() if k != "coefficients"}
    parent = keras.layers.LayerNormalization(epsilon=1e-3, **kwargs)
    parent(x)
    randomise(parent)
    layer = PolyLayerNormalization(coefficients=case["coefficients"], epsilon=1e-3, **kwargs)
    layer(x)
    copy_into(layer, parent)
    axis = kwargs.get("axis", -1)
    axis = sorted(a % 3 for a in (axis if isinstance(axis, tuple) else (axis,)))
    gamma = None if parent.gamma is None else parent.gamma.numpy()
    beta = None if parent.beta is None else parent.beta.numpy()
    ref = np_layer_norm(x, gamma, beta, axis, 1e-3, kwargs.get("rms_scaling", False), case["coefficients"])
    np.testing.assert_allclose(layer(x), ref, rtol=RTOL, atol=ATOL)
    exact = np_layer_norm(x, gamma, beta, axis, 1e-3, kwargs.get("rms_scaling", False))
    np.testing.assert_allclose(parent(x), exact, rtol=1e-4, atol=1e-5)  # the reference is Keras'

    blended = PolyLayerNormalization(coefficients=case["coefficients"], epsilon=1e-3, blend=True, **kwargs)
    blended(x)
    assert [w.name for w in blended.actswap_own_weights()] == ["blend", "peak"]
    copy_into(blended, parent)
    np.testing.assert_allclose(blended(x), parent(x), rtol=0, atol=0)  # factor 0: the parent's own op
    blended.factor.assign(0.5)
    np.testing.assert_allclose(blended(x), 0.5 * parent(x).numpy() + 0.5 * ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("coefficients", [(0.7,), (1.9, -1.2, 0.35)])
def test_layer_norm_gradients_match_finite_differences(coefficients):
    x = rng().normal(0.3, 1.2, (2, 5)).astype("float32")
    dy = rng(1).normal(size=(2, 5))
    layer = PolyLayerNormalization(coefficients=coefficients)
    layer(x)
    randomise(layer)
    gamma, beta = layer.gamma.numpy().astype(np.float64), layer.beta.numpy().astype(np.float64)
    t = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(t)
        y = layer(t)
    gx, gg = tape.gradient(y, [t, layer.gamma], output_gradients=tf.constant(dy, tf.float32))

    def loss(x_, g_):
        return float((np_layer_norm(x_, g_, beta, [1], 1e-3, coefficients=coefficients) * dy).sum())

    def numeric(f, at):
        return central_differences(f, at, h=1e-5)

    x64 = x.astype(np.float64)
    np.testing.assert_allclose(gx, numeric(lambda a: loss(a, gamma), x64), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gg, numeric(lambda a: loss(x64, a), gamma), rtol=1e-4, atol=1e-4)
    forbidden = op_types(layer, tf.TensorSpec((None, 5))) & FORBIDDEN_OPS
    assert not forbidden, forbidden


def test_layer_norm_calibration():
    batches = [rng(i).normal(0.5, 1 + i, (4, 6, 8)).astype("float32") for i in range(2)]
    var = np.concatenate([x.astype(np.float64).var(-1).ravel() for x in batches])
    fixed = PolyLayerNormalization(epsilon=1e-3)
    quad = PolyLayerNormalization(coefficients=(1.0, 0.0, 0.0), epsilon=1e-3)
    parent = keras.layers.LayerNormalization(epsilon=1e-3)
    for layer in (fixed, quad):
        layer.calibrating = True
        for x in batches:
            np.testing.assert_allclose(layer(x), parent(x), rtol=0, atol=0)
        layer.finish_calibration()
    assert fixed.coefficients == pytest.approx((1 / np.sqrt(var.mean() + 1e-3),), rel=1e-9)
    # The refit keeps the degree and approximates 1/sqrt(v + eps) over the data's variances.
    assert len(quad.coefficients) == 3
    # A degree-2 q cannot be close over a 30x range of variances: judge it
    # against a plain least-squares fit on evenly spaced points of the range.
    v = np.linspace(max(var.min(), 1e-3 * var.max()), var.max(), 200)
    target = 1 / np.sqrt(v + 1e-3)
    plain = np.polynomial.Polynomial.fit(v, target, 2)(v)
    q = np.polynomial.polynomial.polyval(v, quad.coefficients)
    assert np.max(np.abs(q - target)) < 1.5 * np.max(np.abs(plain - target))
    assert np.max(np.abs(q - target) / target) < 0.4
    assert quad.get_config()["coefficients"] == list(quad.coefficients)


# ----------------------------------------------------- PolyMultiHeadAttention
def built_pair(q, v, seed=1, **kwargs):
    parent = keras.layers.MultiHeadAttention(**kwargs)
    parent(q, v)
    randomise(parent, seed)
    return parent


def test_attention_values_mask_causal_and_scores():
    r = rng()
    q, v = r.normal(size=(2, 3, 4)).astype("float32"), r.normal(size=(2, 5, 4)).astype("float32")
    mask = r.random((2, 3, 5)) > 0.3
    parent = built_pair(q, v, num_heads=2, key_dim=3)
    layer = PolyMultiHeadAttention(num_heads=2, key_dim=3, shift=4.0)
    layer(q, v)
    copy_into(layer, parent)
    assert layer.scale == pytest.approx(1 / (5 * 16.0))  # S = 5 keys, not the 3 queries
    poly = lambda s, m: np_poly(s, 4.0, layer.scale, m)  # noqa: E731
    out, scores = layer(q, v, attention_mask=mask, return_attention_scores=True)
    ref_out, ref_probs = np_mha(layer, q, v, poly, mask)
    np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(scores, ref_probs, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(layer(q, v), np_mha(layer, q, v, poly)[0], rtol=RTOL, atol=ATOL)
    causal = np.broadcast_to(np.tril(np.ones((3, 3), bool)), (2, 3, 3))
    np.testing.assert_allclose(layer(q, q, use_causal_mask=True), np_mha(layer, q, q, poly, causal)[0],
                               rtol=RTOL, atol=ATOL)
    spec = [tf.TensorSpec((None, 3, 4)), tf.TensorSpec((None, 5, 4))]
    assert not op_types(lambda a, b: layer(a, b), *spec) & FORBIDDEN_OPS


def test_attention_weights_equal_parent_and_blend():
    r = rng(5)
    q, v = r.normal(size=(2, 3, 4)).astype("float32"), r.normal(size=(2, 5, 4)).astype("float32")
    mask = r.random((2, 3, 5)) > 0.3
    kwargs = dict(num_heads=2, key_dim=3, value_dim=2, output_shape=6)
    parent = built_pair(q, v, **kwargs)
    plain = PolyMultiHeadAttention(**kwargs)
    plain(q, v)
    assert [(w.path.split("/", 1)[1], w.shape) for w in plain.weights] == \
        [(w.path.split("/", 1)[1], w.shape) for w in parent.weights]
    layer = PolyMultiHeadAttention(blend=True, **kwargs)
    layer(q, v)
    assert PolyMultiHeadAttention.actswap_blend_capable
    assert [w.name for w in layer.actswap_own_weights()] == ["blend", "peak"]
    copy_into(layer, parent)
    p_out, p_scores = parent(q, v, attention_mask=mask, return_attention_scores=True)
    out, scores = layer(q, v, attention_mask=mask, return_attention_scores=True)
    np.testing.assert_allclose(out, p_out, rtol=RTOL, atol=ATOL)  # factor 0: the softmax
    np.testing.assert_allclose(scores, p_scores, rtol=RTOL, atol=1e-6)
    layer.factor.assign(0.5)
    mix = lambda s, m: 0.5 * np_softmax(s, -1, m) + 0.5 * np_poly(s, 5.0, layer.scale, m)  # noqa: E731
    out = layer(q, v, attention_mask=mask, training=True)
    np.testing.assert_allclose(out, np_mha(layer, q, v, mix, mask)[0], rtol=RTOL, atol=ATOL)
    assert float(layer.peak.numpy()) == pytest.approx(np.abs(np_scores(layer, q, v)[0]).max(), rel=1e-5)


def test_attention_gradients_match_finite_differences():
    r = rng(7)
    q, v = r.normal(size=(1, 2, 3)).astype("float32"), r.normal(size=(1, 3, 3)).astype("float32")
    layer = PolyMultiHeadAttention(num_heads=2, key_dim=2, shift=3.0)
    layer(q, v)
    randomise(layer, 8)
    dy = r.normal(size=(1, 2, 3))
    kernel = next(w for w in layer.weights if w.path.endswith("query/kernel"))
    t = tf.constant(q)
    with tf.GradientTape() as tape:
        tape.watch(t)
        y = layer(t, tf.constant(v))
    gq, gk = tape.gradient(y, [t, kernel], output_gradients=tf.constant(dy, tf.float32))
    base = kernel.numpy().astype(np.float64)

    def loss(q_, k_):
        kernel.assign(k_.astype("float32"))  # the reference reads the kernel from the layer
        try:
            return float((np_mha(layer, q_, v, lambda s, m: np_poly(s, 3.0, layer.scale))[0] * dy).sum())
        finally:
            kernel.assign(base.astype("float32"))

    def numeric(f, at):  # the reference is quadratic in each entry: central differences are exact
        return central_differences(f, at, h=1e-3)

    np.testing.assert_allclose(gq, numeric(lambda a: loss(a, base), q.astype(np.float64)), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(gk, numeric(lambda a: loss(q, a), base), rtol=1e-3, atol=1e-3)


def test_attention_calibration():
    r = rng(11)
    q, v = r.normal(size=(3, 4, 4)).astype("float32"), r.normal(size=(3, 5, 4)).astype("float32")
    mask = r.random((3, 4, 5)) > 0.3
    parent = built_pair(q, v, num_heads=2, key_dim=3)
    layer = PolyMultiHeadAttention(num_heads=2, key_dim=3, shift=2.0)
    layer(q, v)
    copy_into(layer, parent)
    layer.calibrating = True
    np.testing.assert_allclose(layer(q, v, attention_mask=mask), parent(q, v, attention_mask=mask),
                               rtol=RTOL, atol=ATOL)
    layer.finish_calibration()
    scores = np_scores(layer, q, v)[0]
    m = np.broadcast_to(mask[:, None], scores.shape)
    sums = np.where(m, (scores + 2.0) ** 2, 0).sum(-1)[m.any(-1)]
    assert layer.scale == pytest.approx(1 / sums.mean(), rel=1e-5)
    assert layer.get_config()["scale"] == layer.scale


# ------------------------------------------------------------ save and train
def test_save_reload_and_fit(tmp_path):
    r = rng(13)
    x = r.normal(size=(4, 3, 4)).astype("float32")
    inp = keras.Input((3, 4))
    h = PolyMultiHeadAttention(num_heads=2, key_dim=2, blend=True, name="mha")(inp, inp)
    h = PolyLayerNormalization(coefficients=(1.5, -0.4, 0.05), blend=True, name="ln")(h + inp)
    h = PolySoftmax(shift=3.0, blend=True, name="sm")(h)
    h = PolyLayerNormalization(rms_scaling=False, name="ln_fixed")(h)
    out = keras.layers.Dense(4, activation=PolySoftmaxActivation(2.0, scale=0.05), name="dense")(h)
    model = keras.Model(inp, out)
    for name in ("mha", "ln", "sm"):
        model.get_layer(name).factor.assign(0.3)
    path = tmp_path / "t.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # safe mode
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6, atol=1e-6)
    for name in ("mha", "ln", "sm", "ln_fixed"):
        assert loaded.get_layer(name).get_config() == model.get_layer(name).get_config()
    assert float(loaded.get_layer("mha").factor.numpy()) == pytest.approx(0.3)
    assert loaded.get_layer("dense").activation.get_config() == {"shift": 2.0, "scale": 0.05}
    loaded.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    history = loaded.fit(x, r.normal(size=(4, 3, 4)), epochs=1, batch_size=4, verbose=0).history
    assert np.isfinite(history["loss"][0])
    assert all(np.all(np.isfinite(w.numpy())) for w in loaded.weights)
    assert float(loaded.get_layer("sm").peak.numpy()) > 0  # the guard's reading, set in training
