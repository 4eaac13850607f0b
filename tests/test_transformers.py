"""Transformers made polynomial: the attention softmax, LayerNormalization and a
hidden softmax as sources, their rules, the HE report, ONNX and he-run.

The reference is independent of actswap: a NumPy forward pass of the same tiny
ViT with the polynomial forms written out, its constants measured by NumPy on
the original's own statistics."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

import actswap
from actswap.cli import app

runner = CliRunner()
TRANSFORMER = frozenset({"softmax", "layernorm", "attention_softmax"})
SHIFT = 5.0  # c of the attention's s·(x + c)² (MPCFormer's 2Quad constant)


def tiny_vit(seed: int = 0, blocks: int = 1, dim: int = 8, heads: int = 2, hidden_softmax: bool = False):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((28, 28, 1), name="image")
    h = keras.layers.Conv2D(dim, 7, strides=7, name="patches")(inp)
    h = keras.layers.Reshape((16, dim), name="tokens")(h)
    for b in range(blocks):
        n = keras.layers.LayerNormalization(name=f"ln{b}a")(h)
        a = keras.layers.MultiHeadAttention(heads, dim // heads, name=f"mha{b}")(n, n)
        h = keras.layers.Add(name=f"res{b}a")([h, a])
        n = keras.layers.LayerNormalization(name=f"ln{b}b")(h)
        m = keras.layers.Dense(16, activation="gelu", name=f"mlp{b}")(n)
        h = keras.layers.Add(name=f"res{b}b")([h, keras.layers.Dense(dim, name=f"proj{b}")(m)])
    if hidden_softmax:
        h = keras.layers.Softmax(name="gate")(h)
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    return keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="probs")(h))


def _digits(n: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 28, 28, 1)).astype("float32")


# --- the NumPy reference ---------------------------------------------------------


def _w(model, name):
    return [np.asarray(v, "float64") for v in model.get_layer(name).get_weights()]


def _ln_exact(x, gamma, beta, eps=1e-3):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps) * gamma + beta


def _scores(model, name, x):
    qk, qb, kk, kb, vk, vb, ok, ob = _w(model, name)
    q = np.einsum("btd,dnh->btnh", x, qk) + qb
    k = np.einsum("bsd,dnh->bsnh", x, kk) + kb
    v = np.einsum("bsd,dnh->bsnh", x, vk) + vb
    scores = np.einsum("btnh,bsnh->bnts", q / math.sqrt(qk.shape[-1]), k)
    return scores, v, ok, ob


def _attend(probs, v, ok, ob):
    return np.einsum("btnh,nhe->bte", np.einsum("bnts,bsnh->btnh", probs, v), ok) + ob


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _forward(model, x, polynomial: bool, constants: dict | None = None, record: dict | None = None):
    """The tiny ViT (1 block) in NumPy; ``polynomial``: LayerNorm as (x - mean)·c·gamma + beta and
    attention weights s·(scores + 5)² with ``constants``; ``record`` collects the statistics
    those constants are measured from (the exact model's)."""
    pk, pb = _w(model, "patches")
    patches = x.astype("float64").reshape(len(x), 4, 7, 4, 7).transpose(0, 1, 3, 2, 4).reshape(len(x), 16, 49)
    h = patches @ pk.reshape(49, -1) + pb

    def ln(name, t):
        gamma, beta = _w(model, name)
        if record is not None:
            record.setdefault(name, []).append(t.var(-1).mean())
        if not polynomial:
            return _ln_exact(t, gamma, beta)
        return (t - t.mean(-1, keepdims=True)) * constants[name] * gamma + beta

    n = ln("ln0a", h)
    scores, v, ok, ob = _scores(model, "mha0", n)
    if record is not None:
        record.setdefault("mha0", []).append(((scores + SHIFT) ** 2).sum(-1).mean())
    if polynomial:
        probs = constants["mha0"] * (scores + SHIFT) ** 2
    else:
        e = np.exp(scores - scores.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
    h = h + _attend(probs, v, ok, ob)
    n = ln("ln0b", h)
    mk, mb = _w(model, "mlp0")
    rk, rb = _w(model, "proj0")
    h = h + _gelu(n @ mk + mb) @ rk + rb
    dk, db = _w(model, "probs")
    z = h.mean(1) @ dk + db
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _constants(model, x):
    record: dict = {}
    _forward(model, x, polynomial=False, record=record)
    c = {name: 1.0 / math.sqrt(float(np.mean(v)) + 1e-3) for name, v in record.items() if name.startswith("ln")}
    c["mha0"] = 1.0 / float(np.mean(record["mha0"]))
    return c


# --- tests -------------------------------------------------------------------------


def test_reference_forward_is_the_original_model():
    """The NumPy reference computes what Keras does (so it can judge the converted model)."""
    model, x = tiny_vit(), _digits(8)
    np.testing.assert_allclose(_forward(model, x, polynomial=False), model(x), rtol=2e-4, atol=2e-6)


def test_convert_from_all_makes_a_transformer_polynomial(tmp_path):
    model, x = tiny_vit(), _digits(32)
    converted, report = actswap.convert(model, to="approx", sources=TRANSFORMER, calibrate=x)
    # Structure: each site is the rule's layer; the output softmax stays, as client-side work.
    actions = {s.path: (s.activation, s.action) for s in report.sites}
    assert actions == {
        "ln0a": ("layernorm", "replaced"), "mha0": ("attention_softmax", "replaced"),
        "ln0b": ("layernorm", "replaced"), "mlp0": ("gelu", "skipped"), "probs": ("softmax", "skipped"),
    }
    assert "client-side" in [s for s in report.sites if s.path == "probs"][0].reason
    kinds = {n: type(converted.get_layer(n)).__name__ for n in ("ln0a", "mha0", "ln0b")}
    assert kinds == {"ln0a": "PolyLayerNormalization", "mha0": "PolyMultiHeadAttention",
                     "ln0b": "PolyLayerNormalization"}
    # Numbers: against the NumPy reference with constants NumPy measured on the same data.
    reference = _forward(model, x, polynomial=True, constants=_constants(model, x))
    np.testing.assert_allclose(converted(x), reference, rtol=1e-4, atol=1e-6)
    # Weights: the original's, bit for bit.
    for name in ("ln0a", "mha0", "ln0b"):
        for a, b in zip(model.get_layer(name).get_weights(), converted.get_layer(name).get_weights()):
            assert a.tobytes() == b.tobytes()
    # Round trip: save, reload in a fresh process after `import actswap`, equal outputs, one training step.
    actswap.save(converted, tmp_path / "vit.keras")
    np.savez(tmp_path / "x.npz", x=x, y=converted(x).numpy())
    child = textwrap.dedent(f"""
        import numpy as np, keras, actswap
        m = keras.saving.load_model({str(tmp_path / 'vit.keras')!r})
        d = np.load({str(tmp_path / 'x.npz')!r})
        np.testing.assert_allclose(m(d["x"]), d["y"], rtol=1e-5, atol=1e-7)
        assert type(m.get_layer("mha0")).__name__ == "PolyMultiHeadAttention"
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        h = m.fit(d["x"], np.arange(len(d["x"])) % 10, epochs=1, batch_size=16, verbose=0)
        assert np.isfinite(h.history["loss"][-1])
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_from_selects_softmax_and_layernorm_one_by_one():
    model = tiny_vit(hidden_softmax=True)
    _, only_ln = actswap.convert(model, to="approx", sources={"layernorm"})
    assert sorted(s.path for s in only_ln.sites if s.action == "replaced") == ["ln0a", "ln0b"]
    converted, only_softmax = actswap.convert(model, to="approx", sources={"softmax"})
    # The hidden Softmax layer is replaced; the output softmax is not (client-side); MHA's is another source.
    assert [s.path for s in only_softmax.sites if s.action == "replaced"] == ["gate"]
    assert type(converted.get_layer("gate")).__name__ == "PolySoftmax"


def test_square_refuses_transformer_sources_with_a_hint(tmp_path):
    path = tmp_path / "vit.keras"
    tiny_vit().save(path)
    r = runner.invoke(app, ["convert", str(path), "--to", "square", "--from", "layernorm", "-o",
                            str(tmp_path / "o.keras")])
    assert r.exit_code == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "layernorm" in lines[0] and "--to approx" in lines[0]
    assert not (tmp_path / "o.keras").exists()


def test_output_softmax_is_client_side_and_does_not_block_he_ready(fixtures_dir):
    # Today's CNNs: the fixture's only non-polynomial op after --to square --pool avg is its output softmax.
    cnn, _ = actswap.convert(actswap.load(fixtures_dir / "mnist_cnn.keras"), pool="avg")
    he = actswap.inspect(cnn, he=True).he
    assert he["non_polynomial"] == [] and he["he_ready"]
    assert [c["path"] for c in he["client_side"]] == ["probs"]
    # A hidden softmax is not client-side work: it blocks.
    hidden = actswap.inspect(tiny_vit(hidden_softmax=True), he=True).he
    assert "gate" in [n["path"] for n in hidden["non_polynomial"]]
    assert [c["path"] for c in hidden["client_side"]] == ["probs"]


def test_he_report_counts_attention_products():
    model = tiny_vit()
    before = actswap.inspect(model, he=True).he
    converted, _ = actswap.convert(model, to="approx", sources=TRANSFORMER | {"gelu"})
    after = actswap.inspect(converted, he=True).he
    assert not before["he_ready"] and after["he_ready"]
    parts = {p["part"]: (p["ct_ct"], p["ct_pt"]) for p in after["parts"] if p["path"] == "mha0"}
    assert parts["QKᵀ"] == (1, 0) and parts["weights × V"] == (1, 0) and parts["softmax s·(x + c)²"] == (1, 1)
    # The chain through the block, counted by hand: patches 1 pt; LN 1 pt; attention: query 1 pt,
    # QKᵀ 1 ct, softmax 1 ct + 1 pt, weights × V 1 ct, output 1 pt; LN 1 pt; mlp 1 pt + GELU's
    # quadratic 1 ct + 1 pt; proj 1 pt; pool 1 pt; probs 1 pt.
    d = after["multiplicative_depth"]
    assert (d["ct_ct"], d["ct_pt"]) == (4, 11)
    # Before conversion the attention's two products are counted already (its softmax is listed).
    assert before["multiplicative_depth"]["ct_ct"] == 2


def test_onnx_export_of_the_polynomial_transformer_keeps_only_the_output_softmax(tmp_path):
    pytest.importorskip("tf2onnx")
    model, x = tiny_vit(), _digits(16)
    converted, _ = actswap.convert(model, to="approx", sources=TRANSFORMER | {"gelu"}, calibrate=x)
    np.savez(tmp_path / "x.npz", x=x)
    report = actswap.export_onnx(converted, tmp_path / "vit.onnx", sample=tmp_path / "x.npz")
    assert report.parity.ok and report.non_polynomial == []
    counts = report.op_counts
    assert counts.get("Softmax") == 1 and not any(counts.get(op) for op in ("LayerNormalization", "Erf", "Tanh"))


def test_he_run_refuses_an_unconverted_transformer_in_one_line(tmp_path):
    """Not yet polynomial: the first such op is named, with the command that converts it.
    (The encrypted run of a converted transformer, and the depth and memory
    refusals: tests/test_he_graph.py.)"""
    pytest.importorskip("tenseal")
    np.savez(tmp_path / "x.npz", x=_digits(4), y=np.zeros(4, "int64"))
    raw = tmp_path / "vit.keras"
    tiny_vit().save(raw)
    r = runner.invoke(app, ["he-run", str(raw), "--data", str(tmp_path / "x.npz")])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "--to approx" in lines[0], r.stderr


def test_recover_brings_a_transformer_to_polynomials_without_blend_weights(tmp_path):
    """recover: the rule layers blend in (factor 0 -> 1), are calibrated on the training
    inputs, and end as plain polynomial layers holding the original's weights' shapes."""
    from actswap.recover import recover

    model = tiny_vit(seed=1)
    x = _digits(384, seed=3)
    y = np.argmax(model(x), -1)  # the original's own labels: it is right on all of them
    converted, _ = actswap.convert(model, to="approx", sources=TRANSFORMER | {"gelu"})
    recovered, history = recover(model, converted, (x, y), epochs=2, ramp_epochs=1.0, max_drop=None,
                                 lr_schedule="cosine", batch_size=64)
    kinds = {n: type(recovered.get_layer(n)).__name__ for n in ("ln0a", "mha0", "ln0b", "mlp0")}
    assert kinds == {"ln0a": "PolyLayerNormalization", "mha0": "PolyMultiHeadAttention",
                     "ln0b": "PolyLayerNormalization", "mlp0": "Dense"}
    assert not recovered.get_layer("mha0").blend and not recovered.get_layer("ln0a").blend
    # No blend/peak weights are left: the weight shapes are the original's.
    assert [w.shape for w in recovered.weights] == [w.shape for w in model.weights]
    # The blends reached 1 and the constants were measured, not the data-free defaults.
    assert history.blend_factors[-1] == 1.0
    assert recovered.get_layer("mha0").scale != converted.get_layer("mha0").scale
    assert np.all(np.isfinite(recovered(x))) and history.check["recovered_accuracy"] > 0.5
    assert actswap.inspect(recovered, he=True).he["he_ready"]


def test_cosine_learning_rate_schedule(tmp_path):
    from actswap.recover.run import cosine_learning_rate

    schedule = cosine_learning_rate(2e-3, 4).schedule
    assert [schedule(e, 0.0) for e in range(4)] == pytest.approx([2e-3, 1.7071e-3, 1e-3, 0.29289e-3], rel=1e-4)
    tiny_vit().save(tmp_path / "m.keras")
    np.savez(tmp_path / "d.npz", x=_digits(4), y=np.zeros(4, "int64"))
    r = runner.invoke(app, ["recover", str(tmp_path / "m.keras"), "--to", "approx", "--data", str(tmp_path / "d.npz"),
                            "--lr-schedule", "step"])
    assert r.exit_code == 2 and "--lr-schedule" in r.stderr


def test_recover_keeps_a_hidden_activation_softmax_polynomial():
    """A softmax as a hidden Dense's activation= becomes the polynomial at once (it has no
    weight to blend with) and stays one through recovery: nothing falls back to softmax."""
    from actswap.recover import recover

    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    h = keras.layers.Dense(4, activation="softmax", name="gate")(inp)
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="out")(h))
    x = np.random.default_rng(0).normal(size=(128, 6)).astype("float32")
    converted, report = actswap.convert(model, to="approx", sources={"softmax"})
    assert [s.path for s in report.sites if s.action == "replaced"] == ["gate"]
    recovered, _ = recover(model, converted, (x, np.argmax(model(x), -1)), epochs=1, max_drop=None)
    act = recovered.get_layer("gate").activation
    assert type(act).__name__ == "PolySoftmaxActivation" and act.scale == pytest.approx(1 / (4 * SHIFT**2))
    # An independent reference of what the layer computes now.
    k, b = (np.asarray(w, "float64") for w in recovered.get_layer("gate").get_weights())
    z = x.astype("float64") @ k + b
    gate = keras.Model(recovered.inputs, recovered.get_layer("gate").output)
    np.testing.assert_allclose(gate(x), act.scale * (z + SHIFT) ** 2, rtol=1e-5)


def test_rmsnormalization_is_a_source_with_a_fixed_polynomial_form(tmp_path):
    keras.utils.set_random_seed(2)
    inp = keras.Input((5, 6))
    h = keras.layers.Dense(6, name="fc")(inp)
    h = keras.layers.RMSNormalization(name="rms")(h)
    model = keras.Model(inp, keras.layers.Dense(2, name="out")(h))
    model.get_layer("rms").scale.assign(np.linspace(0.5, 1.5, 6).astype("float32"))
    x = np.random.default_rng(1).normal(size=(16, 5, 6)).astype("float32")
    converted, report = actswap.convert(model, to="approx", sources={"rmsnorm"}, calibrate=x)
    assert [(s.path, s.action) for s in report.sites] == [("rms", "replaced")]
    assert type(converted.get_layer("rms")).__name__ == "PolyRMSNormalization"
    # NumPy: c = 1/sqrt(mean of mean(z²) + eps) measured on z = fc(x), then x·c·scale.
    k, b = (np.asarray(w, "float64") for w in model.get_layer("fc").get_weights())
    z = x.astype("float64") @ k + b
    c = 1.0 / math.sqrt(float((z * z).mean(-1).mean()) + 1e-6)
    ok, ob = (np.asarray(w, "float64") for w in model.get_layer("out").get_weights())
    expected = (z * c * np.linspace(0.5, 1.5, 6)) @ ok + ob
    np.testing.assert_allclose(converted(x), expected, rtol=1e-4, atol=1e-6)
    he = actswap.inspect(converted, he=True).he
    assert he["he_ready"] and he["multiplicative_depth"]["ct_ct"] == 0
    actswap.save(converted, tmp_path / "rms.keras")
    np.testing.assert_allclose(keras.saving.load_model(tmp_path / "rms.keras")(x), converted(x), rtol=1e-6)


def test_keras_attention_layer_fits_the_same_rule_and_concat_is_refused(tmp_path):
    keras.utils.set_random_seed(4)
    inp = keras.Input((6, 5))
    q = keras.layers.Dense(4, name="q")(inp)
    v = keras.layers.Dense(4, name="v")(inp)
    a = keras.layers.Attention(use_scale=True, name="att")([q, v])
    c = keras.layers.Attention(score_mode="concat", name="cat")([q, v])
    out = keras.layers.Dense(3, name="out")(keras.layers.GlobalAveragePooling1D(name="pool")(
        keras.layers.Add(name="sum")([a, c])))
    model = keras.Model(inp, out)
    model.get_layer("att").scale.assign(0.7)
    x = np.random.default_rng(5).normal(size=(8, 6, 5)).astype("float32")
    converted, report = actswap.convert(model, to="approx", sources={"attention_softmax"}, calibrate=x)
    decided = {s.path: (s.action, s.reason) for s in report.sites}
    assert decided["att"][0] == "replaced" and decided["cat"][0] == "skipped" and "tanh" in decided["cat"][1]
    assert type(converted.get_layer("att")).__name__ == "PolyAttention"
    # NumPy: scores = 0.7·q·vᵀ; s measured on the original's scores; weights s·(scores + 5)²; times v.
    sub = keras.Model(model.inputs, [model.get_layer("q").output, model.get_layer("v").output,
                                     model.get_layer("cat").output])
    qv, vv, cat = (np.asarray(t, "float64") for t in sub(x))
    scores = 0.7 * qv @ vv.transpose(0, 2, 1)
    s = 1.0 / float(((scores + SHIFT) ** 2).sum(-1).mean())
    att = (s * (scores + SHIFT) ** 2) @ vv
    ok, ob = (np.asarray(w, "float64") for w in model.get_layer("out").get_weights())
    np.testing.assert_allclose(converted(x), (att + cat).mean(1) @ ok + ob, rtol=1e-4, atol=1e-6)
    parts = [p["part"] for p in actswap.inspect(converted, he=True).he["parts"] if p["path"] == "att"]
    assert parts == ["QKᵀ", "softmax s·(x + c)²", "weights × V"]
    # Blend mode (recovery's) at factor 0 is the original layer; the saved model reloads.
    from actswap.recover.blend import blend_model, rule_layers_of

    blended = blend_model(model, polynomials={}, rule_layers=rule_layers_of(converted))
    np.testing.assert_allclose(blended(x), model(x), rtol=1e-5, atol=1e-6)
    path = tmp_path / "att.keras"
    actswap.save(converted, path)
    np.testing.assert_allclose(keras.saving.load_model(path)(x), converted(x), rtol=1e-6)


def test_keras_ops_softmax_in_a_functional_graph_becomes_a_polysoftmax():
    inp = keras.Input((4, 6))
    h = keras.ops.softmax(keras.layers.Dense(6, name="fc")(inp), axis=-1)
    model = keras.Model(inp, keras.layers.Dense(2, name="out")(keras.layers.Flatten()(h)))
    x = np.random.default_rng(0).normal(size=(5, 4, 6)).astype("float32")
    converted, report = actswap.convert(model, to="approx", sources={"softmax"}, calibrate=x)
    (site,) = report.sites
    assert (site.form, site.action) == ("keras.ops call", "replaced")
    layer = converted.get_layer(site.path)
    assert type(layer).__name__ == "PolySoftmax"
    # NumPy: s = 1 / mean row sum of (z + 5)² over the calibration inputs, z = fc(x).
    k, b = (np.asarray(w, "float64") for w in model.get_layer("fc").get_weights())
    z = x.astype("float64") @ k + b
    assert layer.scale == pytest.approx(1.0 / float(((z + SHIFT) ** 2).sum(-1).mean()), rel=1e-5)
