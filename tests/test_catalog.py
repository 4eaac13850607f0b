"""One catalog record is all a new source activation needs (issue 15).

The sine (SIREN's activation) is not a built-in source. Registering it with
one :class:`actswap.catalog.Source` record, and nothing else, makes site
finding (Keras 3 and tf_keras), the scan, ``inspect --he`` and ``--to approx``
know it. Each check is made against what the model or TensorFlow itself says
(the op the model holds, NumPy's sine), and the unregistered catalog is
checked to behave as before, so the record is what made the difference.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from typer.testing import CliRunner

import actswap
from actswap import catalog, classify, registry, scan
from actswap.cli import app
from actswap.sites import find_sites

SINE = catalog.Source(
    "sine",
    keras_ops=("Sin",),  # keras.ops.sin(x) on a KerasTensor
    tf_ops=("Sin",),  # tf.math.sin in a graph
    tf_keras_symbols=("math.sin",),  # tf.math.sin on a Keras 2 symbolic tensor
    reference=lambda x, params: np.sin(x),
)


@pytest.fixture
def sine():
    """The catalog with the sine registered; restored afterwards, whatever happened."""
    before = {name: dict(getattr(catalog, name)) for name in ("RECORDS", "SOURCES", "OP_ACTIVATIONS")}
    catalog.register_source(SINE)
    try:
        yield SINE
    finally:
        catalog.unregister_source("sine")
        for name, view in before.items():
            assert getattr(catalog, name) == view, name


def sine_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    h = keras.layers.Dense(3, name="fc")(inp)
    return keras.Model(inp, keras.layers.Dense(2, name="out")(keras.ops.sin(h)))


def sin_node(model):
    """The path of the model's Sin operation, as Keras names it."""
    (op,) = [o for o in model.operations if type(o).__name__ == "Sin"]
    return op.name


def test_one_record_updates_every_view(sine):
    assert registry.SOURCES["sine"] == "sine"
    assert registry.OP_ACTIVATIONS["Sin"] == registry.TF_OP_ACTIVATIONS["Sin"] == "sine"
    assert registry.TF_OPS["sine"] == ("Sin",)
    assert classify.TF_OP_ACTIVATIONS["math.sin"] == "sine"
    assert "sine" in registry.resolve_sources("all")
    assert registry.resolve_sources("sine") == frozenset({"sine"})


def test_a_form_cannot_belong_to_two_sources(sine):
    snapshot = dict(registry.TF_OP_ACTIVATIONS)
    with pytest.raises(ValueError, match="Sin"):
        catalog.register_source(catalog.Source("other_sine", tf_ops=("Sin",)))
    assert "other_sine" not in registry.SOURCES and registry.TF_OP_ACTIVATIONS == snapshot


def test_site_finding_knows_it(sine):
    model = sine_model()
    sites = find_sites(model)
    assert [(s.path, s.activation, s.form) for s in sites] == [(sin_node(model), "sine", "keras.ops call")]
    # Keras 2: tf.math.sin on a symbolic tensor is a TFOpLambda naming the symbol.
    found = classify.classify_node("", "TFOpLambda", {"name": "s", "function": "math.sin"}, classify.TF_KERAS)
    assert found == ("sine", "", classify.TF_OP_FORM)


def test_site_finding_does_not_know_it_unregistered():
    assert find_sites(sine_model()) == []


def test_approx_fits_its_reference(sine):
    model = sine_model()
    converted, report = actswap.convert(model, to="approx", sources=["sine"], degree=5, interval=(-2.0, 2.0))
    assert [s.activation for s in report.sites if s.action == "replaced"] == ["sine"]
    # Independent reference: the same Dense layers around NumPy's sine.
    x = np.random.default_rng(1).uniform(-0.5, 0.5, (16, 4)).astype("float32")
    fc, out = model.get_layer("fc"), model.get_layer("out")
    h = fc(x).numpy()
    assert np.abs(h).max() < 2  # inside the fitted interval
    w, b = (v.numpy() for v in out.weights)
    want = np.sin(h) @ w + b
    # A degree-5 fit of sin on [-2, 2] is within 1e-2 of it; x² would be off by O(1).
    np.testing.assert_allclose(converted(x), want, atol=2e-2)


def float16_sin_savedmodel(path):
    m = tf.Module()
    m.f = tf.function(lambda x: {"y": tf.math.sin(x) * tf.constant(2.0, tf.float16)},
                      input_signature=[tf.TensorSpec([None, 2], tf.float16, name="x")])
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.f})
    return path


def numerics(report):
    return [f.message for f in report.findings if f.kind == scan.NUMERICS]


def test_the_scan_knows_its_op(sine, tmp_path):
    """The scan warns when an op a conversion turns into x² computes in float16."""
    src = float16_sin_savedmodel(tmp_path / "sm")
    report = scan.scan(src)
    assert report.errors == []
    assert any(m.startswith("Sin ") and "float16" in m for m in numerics(report)), report.findings
    # ... and the SavedModel's graph sites include it.
    sites = actswap.inspect(src, sources=["sine"]).sites
    assert {s.activation for s in sites} == {"sine"}


def test_the_scan_does_not_know_the_op_unregistered(tmp_path):
    assert numerics(scan.scan(float16_sin_savedmodel(tmp_path / "sm"))) == []


def he_non_polynomial(path):
    r = CliRunner().invoke(app, ["inspect", str(path), "--he", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["he"]["non_polynomial"]


def test_inspect_he_counts_it_as_not_polynomial(sine, tmp_path):
    model = sine_model()
    path = tmp_path / "m.keras"
    model.save(path)
    found = he_non_polynomial(path)
    assert found == [{"path": sin_node(model), "op": "sine (keras.ops call)", "why": "not a polynomial"}]


def test_inspect_he_without_the_record_cannot_tell(tmp_path):
    model = sine_model()
    path = tmp_path / "m.keras"
    model.save(path)
    found = he_non_polynomial(path)
    assert found == [{"path": sin_node(model), "op": "Sin", "why": "unknown to actswap: check it by hand"}]


def test_the_encrypted_compiler_names_it(sine):
    from actswap.he import limits, program

    model = sine_model()
    with pytest.raises(limits.OutOfScopeError, match=f"'{sin_node(model)}': sine is not a polynomial"):
        program.compile_model(model)


def test_own_records_name_what_actswap_registers():
    """Every registered name of an own record is a Keras object actswap registers,
    and its layers are of the record's layer classes."""
    import actswap.recover  # noqa: F401  (registers Blend)

    for reg, source in catalog.OWN_OBJECTS.items():
        obj = keras.saving.get_registered_object(reg)
        assert obj is not None, reg
        if isinstance(obj, type) and issubclass(obj, keras.layers.Layer):
            assert obj.__name__ in catalog.OWN[source].layer_classes, reg
    for source, own in catalog.OWN.items():
        assert catalog.SOURCES[source] in catalog.NOT_CONVERTED_FAMILIES, source
