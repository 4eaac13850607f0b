"""Every rewrite test checks structure, numbers (against an independent
reference) and gradients, parametrized over the case model factories."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close, relu_as_square, relu_forbidden, weights_bytes

import actswap
from actswap.rewrite import output_layer_names
from cases import CASES, sample_inputs

GRADS = ["exact", "clip:0.5"]


@pytest.fixture(params=sorted(CASES), scope="module")
def case(request):
    model, expected = CASES[request.param]()
    converted, report = actswap.convert(model, to="square")
    return request.param, model, expected, converted, report


def test_report_counts_match_the_architecture(case):
    name, model, expected, converted, report = case
    assert report.replaced == expected["replaced"], [s.to_dict() for s in report.sites]
    assert report.skipped_relu_like == expected["skipped_relu_like"]
    for s in report.sites:
        assert s.action in ("replaced", "skipped") and s.reason
        assert (s.action == "replaced") == (s.activation == "relu")


def test_structure_no_plain_relu_left_and_skipped_sites_kept(case):
    name, model, expected, converted, report = case
    after = actswap.inspect(converted)
    acts = [s.activation for s in after.sites]
    assert "relu" not in acts
    assert acts.count("square") == expected["replaced"]
    before_skipped = sorted((s.path, s.activation) for s in report.sites if s.action == "skipped")
    after_other = sorted((s.path, s.activation) for s in after.sites if s.activation != "square")
    assert after_other == before_skipped
    # Behavioural: running the converted model never calls a plain ReLU.
    with relu_forbidden():
        converted(sample_inputs(model))


def test_nothing_dropped_dense_keeps_an_activation(case):
    name, model, expected, converted, report = case
    for s in report.sites:
        if s.action == "replaced" and s.form == "activation=":
            layer_cfg = json.dumps(keras.saving.serialize_keras_object(converted))
            assert "actswap>SquareActivation" in layer_cfg


def test_outputs_equal_independent_reference(case):
    name, model, expected, converted, report = case
    x = sample_inputs(model)
    with relu_as_square():
        ref = model(x, training=False)
    assert_close(converted(x, training=False), ref, rtol=1e-6)


@pytest.mark.parametrize("grad", GRADS)
def test_gradients_equal_independent_reference(case, grad):
    name, model, expected, _, _ = case
    converted, _ = actswap.convert(model, to="square", grad=grad)
    x = sample_inputs(model)
    xs = [tf.convert_to_tensor(a) for a in (x if isinstance(x, list) else [x])]
    rng = np.random.default_rng(1)

    def grads(m, patch):
        with tf.GradientTape(persistent=True) as tape:
            for t in xs:
                tape.watch(t)
            ctx = relu_as_square(grad) if patch else _null()
            with ctx:
                y = m(xs if len(xs) > 1 else xs[0], training=False)
            w = tf.constant(rng.standard_normal(y.shape).astype("float32")) if not hasattr(grads, "w") else grads.w
            grads.w = w
            loss = tf.reduce_sum(y * w)
        return tape.gradient(loss, xs), tape.gradient(loss, m.trainable_weights)

    ref_in, ref_w = grads(model, True)
    got_in, got_w = grads(converted, False)
    assert len(ref_w) == len(got_w) > 0
    for a, b in zip(got_in + got_w, ref_in + ref_w):
        assert_close(a, b, rtol=1e-5)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_input_model_untouched_and_weights_bit_identical(case):
    name, model, _, _, _ = case
    config_before = json.dumps(keras.saving.serialize_keras_object(model), sort_keys=True)
    w_before = weights_bytes(model)
    converted, _ = actswap.convert(model, to="square")
    assert json.dumps(keras.saving.serialize_keras_object(model), sort_keys=True) == config_before
    assert weights_bytes(model) == w_before
    assert [b for _, b in weights_bytes(converted)] == [b for _, b in w_before]
    assert [w.trainable for w in converted.weights] == [w.trainable for w in model.weights]


def test_names_shapes_dtypes_unchanged(case):
    name, model, _, converted, _ = case
    assert [t.name for t in model.inputs] == [t.name for t in converted.inputs]
    assert output_layer_names(model) == output_layer_names(converted)
    for a, b in zip(model.inputs + model.outputs, converted.inputs + converted.outputs):
        assert tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype
    assert converted.name == model.name


def test_shared_layers_stay_shared():
    model, _ = CASES["shared_layer"]()
    converted, report = actswap.convert(model)
    assert len(converted.get_layer("shared_dense")._inbound_nodes) == 2
    assert len(converted.get_layer("shared_relu")._inbound_nodes) == 2
    assert sorted(s.path for s in report.sites) == ["shared_dense", "shared_relu"]


def test_layer_shared_between_submodels_is_one_site_with_both_paths():
    keras.utils.set_random_seed(0)
    shared = keras.layers.Dense(4, activation="relu", name="shared")
    a = keras.Sequential([keras.Input((4,)), shared], name="a")
    b = keras.Sequential([keras.Input((4,)), shared], name="b")
    inp = keras.Input((4,), name="x")
    model = keras.Model(inp, b(a(inp)), name="top")
    converted, report = actswap.convert(model)
    assert [(s.path, s.also_at) for s in report.sites] == [("a/shared", ["b/shared"])]
    new_a, new_b = converted.get_layer("a"), converted.get_layer("b")
    assert new_a.layers[0] is new_b.layers[0]
    x = sample_inputs(model)
    with relu_as_square():
        ref = model(x)
    assert_close(converted(x), ref)


def test_nested_paths_and_frozen_submodel_kept():
    model, _ = CASES["nested"]()
    converted, report = actswap.convert(model)
    paths = {s.path for s in report.sites if s.action == "replaced"}
    assert paths == {
        "middle/inner/inner_dense", "middle/inner/inner_relu", "middle/middle_dense",
        "frozen/frozen_dense", "top_act",
    }
    assert converted.get_layer("frozen").trainable is False
    assert len(converted.trainable_weights) == len(model.trainable_weights)


def test_original_mutation_does_not_reach_converted():
    model, _ = CASES["sequential_dense"]()
    converted, _ = actswap.convert(model)
    before = weights_bytes(converted)
    model.layers[0].kernel.assign(model.layers[0].kernel + 1.0)
    assert weights_bytes(converted) == before


def test_compiled_model_stays_compiled_with_same_loss():
    model, _ = CASES["sequential_dense"]()
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    converted, report = actswap.convert(model)
    assert converted.compiled
    assert converted.get_compile_config()["loss"] == model.get_compile_config()["loss"]
    assert any("optimizer state" in n for n in report.notes)


@keras.saving.register_keras_serializable(package="actswap_tests")
class CtorNet(keras.Model):
    """Subclassed, its activation a constructor argument kept in get_config: sound."""

    def __init__(self, units=4, activation="relu", **kwargs):
        super().__init__(**kwargs)
        self.units, self.act = units, activation
        self.hidden = keras.layers.Dense(units, activation=activation, name="hidden")
        self.head = keras.layers.Dense(2, name="head")

    def call(self, x):
        return self.head(self.hidden(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units, "activation": self.act}


class HardCodedNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(4, activation="relu", name="hidden")

    def call(self, x):
        return self.hidden(x)


class CallReluNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(4, name="hidden")

    def call(self, x):
        return keras.ops.relu(self.hidden(x))


def _built(model):
    keras.utils.set_random_seed(0)
    model(np.zeros((1, 3), "float32"))
    return model


def test_subclassed_model_with_activation_in_its_config_is_converted(tmp_path):
    net = _built(CtorNet())
    converted, report = actswap.convert(net)
    assert [(s.path, s.form, s.action) for s in report.sites] == [("ctor_net", "activation=", "replaced")]
    assert isinstance(converted, CtorNet) and converted is not net
    assert net.hidden.activation is keras.activations.relu  # input untouched
    assert [w.numpy().tobytes() for w in converted.weights] == [w.numpy().tobytes() for w in net.weights]
    x = np.random.default_rng(0).uniform(-1, 1, (4, 3)).astype("float32")
    with relu_as_square():
        ref = net(x)
    with relu_forbidden():
        assert_close(converted(x), ref)
    path = actswap.save(converted, tmp_path / "ctor.keras")
    reloaded = keras.models.load_model(path)
    with relu_forbidden():  # the square survived saving
        assert_close(reloaded(x), ref)


def test_subclassed_model_inside_a_functional_is_converted():
    net = _built(CtorNet(name="block"))
    inp = keras.Input((3,), name="x")
    model = keras.Model(inp, keras.layers.ReLU(name="after")(net(inp)))
    converted, report = actswap.convert(model)
    assert sorted(s.path for s in report.sites if s.action == "replaced") == ["after", "block"]
    x = sample_inputs(model)
    with relu_as_square():
        ref = model(x)
    with relu_forbidden():
        assert_close(converted(x), ref)


@pytest.mark.parametrize(
    "cls, fragment",
    [(HardCodedNet, "relu at 'hard_coded_net/hidden' is set in its Python code"), (CallReluNet, "its call() still computes 1 Relu op")],
)
def test_subclassed_model_with_relu_in_python_code_is_refused(cls, fragment):
    net = _built(cls())
    with pytest.raises(actswap.ActswapError, match="subclassed model") as e:
        actswap.convert(net)
    assert fragment in str(e.value) and "rebuild the model as Functional/Sequential" in str(e.value)
    assert e.value.exit_code == 2
    report = actswap.inspect(net)
    assert any("convert would refuse" in n for n in report.notes)


def test_grad_mode_is_validated():
    model, _ = CASES["sequential_dense"]()
    with pytest.raises(actswap.ActswapError, match="unknown gradient mode 'steep'"):
        actswap.convert(model, grad="steep")
    with pytest.raises(actswap.ActswapError, match="unknown target 'cube'"):
        actswap.convert(model, to="cube")


@keras.saving.register_keras_serializable(package="actswap_tests")
def zero_grad(x, dy):
    return tf.zeros_like(dy)


def test_user_gradient_function_is_used_and_must_be_registered():
    model, _ = CASES["sequential_dense"]()
    with pytest.raises(actswap.ActswapError, match="not registered"):
        actswap.convert(model, grad=lambda x, dy: dy)
    converted, report = actswap.convert(model, grad=zero_grad)
    x = tf.constant(sample_inputs(model))

    def input_grad(m):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(m(x))
        return tape.gradient(y, x).numpy()

    assert np.all(input_grad(converted) == 0.0)
    assert np.any(input_grad(actswap.convert(model)[0]) != 0.0)


@pytest.mark.parametrize(
    "layer, activation, detail",
    [
        (keras.layers.ReLU(negative_slope=0.1), "leaky_relu", "negative_slope=0.1"),
        (keras.layers.ReLU(threshold=0.5), "relu_variant", "threshold=0.5"),
        (keras.layers.ReLU(max_value=4.0), "relu_variant", "max_value=4"),
        (keras.layers.ReLU(max_value=6.0, negative_slope=0.2), "relu_variant", "max_value=6, negative_slope=0.2"),
    ],
)
def test_relu_variants_are_skipped_with_their_arguments(layer, activation, detail):
    inp = keras.Input((3,))
    model = keras.Model(inp, layer(keras.layers.Dense(3)(inp)))
    converted, report = actswap.convert(model)
    (site,) = report.sites
    assert (site.activation, site.detail, site.action) == (activation, detail, "skipped")
    assert "is not plain ReLU" in site.reason and report.skipped_relu_like == 1


def test_mixed_precision_policies_are_kept():
    keras.utils.set_random_seed(0)
    policy = keras.mixed_precision.DTypePolicy("mixed_float16")
    inp = keras.Input((6,), name="x")
    x = keras.layers.Dense(8, activation="relu", dtype=policy, name="d")(inp)
    x = keras.layers.ReLU(dtype=policy, name="r")(x)
    x = keras.ops.relu(x)  # an op: computes in its input's dtype (float16 here)
    out = keras.layers.Dense(2, dtype="float32", name="out")(x)
    model = keras.Model(inp, out)
    converted, report = actswap.convert(model)
    assert report.replaced == 3
    assert converted.get_layer("r").dtype_policy.name == "mixed_float16"
    assert [t.dtype for t in converted.outputs] == [t.dtype for t in model.outputs]
    x = sample_inputs(model)
    with relu_as_square():
        ref = model(x).numpy()
    np.testing.assert_allclose(converted(x).numpy(), ref, rtol=1e-6)  # same float16 ops on both sides
