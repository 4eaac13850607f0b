"""The shortcuts the performance work (issue 8) took, and that they change no result.

* ``actswap.convert(path)`` moves the unchanged layers of the model it loaded
  into the result (``rewrite(consume=True)``) instead of rebuilding them: the
  result must equal the conversion of the same model passed as an object.
* Written outputs are verified by reading them back as data
  (:func:`actswap.readback.read_back`, :func:`actswap.readback.read_back_savedmodel`)
  rather than by a Keras/TF load; when that reading cannot confirm the output,
  the load decides, as before.
* The square's custom gradient computes its local derivative only once the
  incoming gradient exists (a control dependency, as TF's own ``Square``
  gradient has), so a graph does not compute it during the forward pass.
"""

from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import FIXTURES, weights_bytes
from tf_cases import ControlFlowModule

import actswap
from actswap import activations, readback, tf_ops
from actswap.formats import keras_file as io
from actswap.formats import tf_graphs
from actswap.errors import InvariantError
from actswap.sites import config_sites, find_sites

KERAS_FIXTURES = sorted(p.name for p in FIXTURES.glob("*.keras"))


def _keyed(sites, with_also_at=False):
    return {(p, s.form): s.activation for s in sites for p in ((s.path, *s.also_at) if with_also_at else (s.path,))}


@pytest.mark.parametrize("name", KERAS_FIXTURES)
def test_config_sites_read_from_the_file_equal_find_sites(name):
    path = FIXTURES / name
    model = actswap.load(path)
    config = json.loads(zipfile.ZipFile(path).read("config.json"))
    assert _keyed(config_sites(config)) == _keyed(find_sites(model), with_also_at=True)


@pytest.mark.parametrize("name", ["mnist_cnn.keras", "nested.keras", "shared_layer.keras", "recurrent_wrappers.keras"])
def test_convert_from_a_path_equals_convert_of_the_model_object(name):
    path = FIXTURES / name
    original = actswap.load(path)
    from_object, report_object = actswap.convert(original, to="square")
    from_path, report_path = actswap.convert(path, to="square")  # layers moved, not rebuilt

    # As saved (JSON): a moved layer keeps its loaded build_config, lists where a rebuilt one has tuples.
    assert json.loads(json.dumps(from_path.get_config())) == json.loads(json.dumps(from_object.get_config()))
    def values(m):  # variable paths differ (a rebuilt layer's carry the model name), not values
        return [b for _, b in weights_bytes(m)]

    assert values(from_path) == values(from_object) == values(original)
    assert [s.to_dict() for s in report_path.sites] == [s.to_dict() for s in report_object.sites]
    x = [np.random.default_rng(0).uniform(0, 1, (2, *t.shape[1:])).astype("float32") for t in original.inputs]
    x = x[0] if len(x) == 1 else x
    for a, b in zip(keras.tree.flatten(from_path(x)), keras.tree.flatten(from_object(x))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The moved layers belong to the new graph only, as rebuilt ones do.
    assert [len(layer._inbound_nodes) for layer in from_path.layers] == [
        len(layer._inbound_nodes) for layer in from_object.layers
    ]


def test_read_back_confirms_a_written_file_and_rejects_a_different_model(tmp_path):
    model, _ = actswap.convert(FIXTURES / "mnist_cnn.keras", to="square")
    path = tmp_path / "m.keras"
    model.save(path)
    sites = readback.read_back(model, path)
    assert sites is not None and sorted(s.activation for s in sites) == ["softmax", "square", "square", "square"]

    other, _ = actswap.convert(FIXTURES / "mnist_cnn.keras", to="poly:0,0.5,0.25")
    assert readback.read_back(other, path) is None  # other sites
    w = model.weights[0]
    w.assign(w.numpy() + 1.0)
    assert readback.read_back(model, path) is None  # a weight not in the file
    assert readback.read_back(model, path, verify=False) is not None  # the sites alone


def test_save_falls_back_to_the_reload_when_reading_cannot_confirm(tmp_path, monkeypatch):
    model, _ = actswap.convert(FIXTURES / "mnist_cnn.keras", to="square")
    monkeypatch.setattr(readback, "read_back", lambda *a, **k: None)
    seen = []
    io.save_keras(model, tmp_path / "ok.keras", verify=True, check=seen.append)
    assert (tmp_path / "ok.keras").exists()
    assert sorted(s.activation for s in seen[0]) == ["softmax", "square", "square", "square"]

    # The reload finds what the reading could not confirm: nothing is written.
    monkeypatch.setattr(io, "same_model", lambda *a, **k: (_ for _ in ()).throw(InvariantError("differs")))
    with pytest.raises(InvariantError):
        io.save_keras(model, tmp_path / "bad.keras", verify=True)
    assert not (tmp_path / "bad.keras").exists()


def test_read_back_savedmodel(tmp_path):
    src = tmp_path / "module"
    module = ControlFlowModule()
    tf.saved_model.save(module, str(src), signatures={"serving_default": module.main, "second": module.second})
    converted, _ = actswap.convert(src, to="square")
    done = tf_graphs.REWRITTEN[converted]
    out = tmp_path / "out"
    tf.saved_model.save(converted, str(out), signatures=done.signatures)
    assert readback.read_back_savedmodel(out, done.signatures, done.variables)
    counts = readback.saved_op_counts(out)
    assert counts["Relu"] == 0 and counts["Relu6"] == 1  # every plain Relu replaced, the Relu6 kept
    v = done.variables[0]
    v.assign(v + 1.0)
    assert not readback.read_back_savedmodel(out, done.signatures, done.variables)


def _op_types(fn, *args):
    graph = tf.function(fn).get_concrete_function(*args).graph
    return {op.type for op in graph.get_operations()}


def test_exact_square_is_a_custom_gradient_with_tf_squares_gradient_bits():
    spec = tf.TensorSpec([None], tf.float32)
    assert "IdentityN" in _op_types(lambda x: activations.square_op(x, "exact"), spec)  # custom gradient
    assert "IdentityN" in _op_types(lambda x: activations.square_op(x, "clip:1"), spec)  # custom gradient

    rng = np.random.default_rng(0)
    x = tf.constant((rng.standard_normal(10_000) * 10.0 ** rng.integers(-30, 30, 10_000)).astype("float32"))
    dy = tf.constant(rng.standard_normal(10_000).astype("float32"))

    @tf.custom_gradient
    def reference(t):
        return tf.math.square(t), lambda d: d * (t + t)

    grads = []
    for fn in (lambda t: activations.square_op(t, "exact"), reference):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        grads.append(tape.gradient(y, x, output_gradients=dy).numpy())
    assert grads[0].tobytes() == grads[1].tobytes()


@pytest.mark.parametrize("grad", ["exact", "clip:1"])
def test_the_local_derivative_waits_for_the_incoming_gradient(grad):
    # TensorFlow graphs (SavedModel, GraphDef): a control dependency on dy.
    backward = tf_ops.grad_function(grad)
    spec = tf.TensorSpec([None], tf.float32)
    graph = tf.function(backward).get_concrete_function(spec, spec).graph
    doubled = [op for op in graph.get_operations() if op.type == "AddV2"]
    assert len(doubled) == 1 and doubled[0].inputs[0].name == doubled[0].inputs[1].name  # x + x
    # computed once dy exists (a control input), not as soon as x does
    assert [c.name for c in doubled[0].control_inputs] == [graph.inputs[1].op.name]
    # Keras layers (keras.ops, every backend): every op that computes reads dy.
    graph = tf.function(activations.grad_function(grad)).get_concrete_function(spec, spec).graph
    x_op, dy_op = graph.inputs[0].op, graph.inputs[1].op
    reads_dy = {dy_op.name}
    for op in graph.get_operations():  # topological order
        if any(t.op.name in reads_dy for t in op.inputs):
            reads_dy.add(op.name)
    computing = [op for op in graph.get_operations()
                 if op not in (x_op, dy_op) and op.type not in ("Const", "Identity", "NoOp")]
    assert computing and all(op.name in reads_dy for op in computing), [
        op.type for op in computing if op.name not in reads_dy]


@pytest.mark.parametrize("grad", ["exact", "clip:1"])
def test_the_keras_backward_passes_equal_tensorflows_bit_for_bit(grad):
    rng = np.random.default_rng(0)
    x = tf.constant((rng.standard_normal(10_000) * 10.0 ** rng.integers(-18, 18, 10_000)).astype("float32"))
    dy = tf.constant((rng.standard_normal(10_000) * 10.0 ** rng.integers(-18, 18, 10_000)).astype("float32"))
    mine = activations.grad_function(grad)(x, dy).numpy()
    theirs = tf_ops.grad_function(grad)(x, dy).numpy()
    assert mine.tobytes() == theirs.tobytes()