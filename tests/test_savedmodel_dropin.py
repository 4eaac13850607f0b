"""Issue 16: a converted SavedModel is a drop-in replacement for the original.

The converted directory is reloaded in a fresh process that cannot import
actswap (``dropin_child.py``) and used as its owner's code would use it: the
module's own functions (``serve``, ``other``, the nested ``block``, ``__call__``)
and its signatures by name, its variables by attribute, gradients and one
training step. The reference is independent of actswap: the same module built
again here with ``tf.nn.relu`` patched to x·x (conftest), so every number is
compared with what the original computes with ReLU put to x·x by other means.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from typer.testing import CliRunner

import actswap
from actswap.cli import app
from conftest import assert_close, relu_as_square

CHILD = Path(__file__).with_name("dropin_child.py")
runner = CliRunner()
RTOL = 1e-5  # float32 through three squares and a loop: same ops, rounding only


class DropInNet(tf.Module):
    """Two signatures, a nested tf.function, tf.cond, tf.while_loop, __call__,
    and a non-trainable variable; the weights come from fixed seeds."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = tf.Variable(tf.random.stateless_normal((4, 8), seed=(1, 2)) * 0.5, name="w1")
        self.b1 = tf.Variable(tf.zeros(8) + 0.1, name="b1")
        self.w2 = tf.Variable(tf.random.stateless_normal((8, 3), seed=(3, 4)) * 0.5, name="w2")
        self.w3 = tf.Variable(tf.random.stateless_normal((4, 3), seed=(5, 6)), name="w3")
        self.steps = tf.Variable(0, trainable=False, name="steps")
        self.scale = tf.Variable(0.9, trainable=False, name="scale")

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def block(self, h):
        return tf.nn.relu(h) * 0.5

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def serve(self, x):
        h = tf.nn.relu(tf.matmul(x, self.w1) + self.b1)
        h = tf.cond(tf.reduce_sum(x) > 0.0, lambda: self.block(h), lambda: tf.nn.relu(-h))

        def body(i, h):
            return i + 1, tf.nn.relu(h) * self.scale

        _, h = tf.while_loop(lambda i, h: i < 2, body, [tf.constant(0), h])
        return {"y": tf.matmul(h, self.w2)}

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def other(self, x):
        return {"z": tf.nn.relu(tf.matmul(x, self.w3))}

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def __call__(self, x):
        return self.serve(x)["y"]


SPEC = {
    "calls": [["serve", "x", "y"], ["other", "x", "z"], ["block", "h", None], ["__call__", "x", None]],
    "signature_input": "x",
    "train": ["serve", "x", "y"],
}


def _child(directory: Path, spec: dict, inputs: Path, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(directory), json.dumps(spec), str(inputs), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["actswap_imported"] is False
    return summary


def _inputs(tmp_path: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    data = {
        "x": rng.uniform(-0.2, 1.0, (3, 4)).astype("float32"),  # sum > 0: the then-branch
        "h": rng.standard_normal((3, 8)).astype("float32"),
        "w": rng.standard_normal((3, 3)).astype("float32"),
    }
    path = tmp_path / "inputs.npz"
    np.savez(path, **data)
    return path, data


def _reference(data: dict) -> dict:
    """The original module with x·x where tf.nn.relu was, traced inside the patch."""
    net = DropInNet()
    x = tf.constant(data["x"])
    with relu_as_square():
        ref = {
            "call/serve": net.serve(x)["y"].numpy(),
            "call/other": net.other(x)["z"].numpy(),
            "call/block": net.block(tf.constant(data["h"])).numpy(),
            "call/__call__": net(x).numpy(),
        }
        floats = {"w1": net.w1, "b1": net.b1, "w2": net.w2, "w3": net.w3, "scale": net.scale}
        with tf.GradientTape() as tape:
            tape.watch(list(floats.values()))
            loss = tf.reduce_sum(net.serve(x)["y"] * data["w"])
        for name, g in zip(floats, tape.gradient(loss, list(floats.values()))):
            ref[f"grad/{name}"] = np.zeros(floats[name].shape) if g is None else g.numpy()
    relu_net = DropInNet()  # held: a tf.function method keeps its instance weakly
    plain = relu_net.serve(x)["y"].numpy()
    assert np.abs(plain - ref["call/serve"]).max() > 1e-3, "the reference equals the ReLU module: void check"
    ref["sig/serving_default"], ref["sig/other"] = ref["call/serve"], ref["call/other"]
    return ref


@pytest.fixture(scope="module")
def module_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dropin")
    net = DropInNet()
    src = d / "module"
    tf.saved_model.save(net, str(src), signatures={"serving_default": net.serve, "other": net.other})
    out = d / "converted"
    r = runner.invoke(app, ["convert", str(src), "--to", "square", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    return src, out, json.loads(r.stdout)


def test_converted_module_offers_the_originals_functions_and_variables(module_dirs, tmp_path):
    src, out, report = module_dirs
    inputs, data = _inputs(tmp_path)
    before = _child(src, SPEC, inputs, tmp_path / "original.npz")
    after = _child(out, SPEC, inputs, tmp_path / "converted.npz")
    # Structure: the same public attributes, variables (attribute, name, dtype, trainable flag).
    assert after["public"] == before["public"]
    assert {"serve", "other", "block", "w1", "b1", "w2", "w3", "steps", "signatures"} <= set(after["public"])
    assert not [a for a in after["public"] if "actswap" in a]
    assert after["variables"] == before["variables"]
    assert ["steps", "steps:0", "int32", False] in after["variables"]
    # Numbers: every function and signature equals the x·x reference, and so do the gradients.
    got, ref = dict(np.load(tmp_path / "converted.npz")), _reference(data)
    for key in ref:
        assert_close(got[key], ref[key], rtol=RTOL)
    # One SGD step through serve changes exactly the trainable variables it reads.
    assert after["changed"] == ["b1", "w1", "w2"]
    # Every carried-over function is in the report; nothing named after actswap in the file.
    assert any("carried over" in n and "block" in n and "__call__" in n for n in report["notes"])
    assert b"actswap" not in (out / "saved_model.pb").read_bytes()


def test_functions_are_reported_once(module_dirs):
    _, _, report = module_dirs
    paths = [s["path"] for s in report["sites"] if s["action"] == "replaced"]
    # serve (with block, the cond and the loop) under its signature, other under its
    # own, __call__ (a function of its own in the file) under its attribute.
    assert sum(p.startswith("serving_default/") for p in paths) == 4
    assert sum(p.startswith("other/") for p in paths) == 1
    assert sum(p.startswith("__call__/") for p in paths) == 4
    assert len(paths) == 9


@pytest.mark.parametrize("writer", ["model.export", "tf.saved_model.save"])
def test_keras_savedmodels_keep_their_endpoints(tmp_path, writer):
    inp = tf.keras.Input((6,), name="features")
    h = tf.keras.layers.Dense(5, activation="relu", name="d1")(inp)
    h = tf.keras.layers.ReLU(name="r")(tf.keras.layers.Dense(4, name="d2")(h))
    model = tf.keras.Model(inp, tf.keras.layers.Dense(3, name="out")(h))
    src, out = tmp_path / "exported", tmp_path / "exported.square"
    if writer == "model.export":
        model.export(str(src), verbose=False)
        spec = {"calls": [["serve", "x", None]], "signature_input": "x", "train": ["serve", "x", None]}
    else:
        tf.saved_model.save(model, str(src))
        spec = {"calls": [], "signature_input": "x", "train": None}
    converted, report = actswap.convert(src, to="square")
    assert report.replaced >= 2
    actswap.save(converted, out)
    rng = np.random.default_rng(3)
    data = {"x": rng.standard_normal((5, 6)).astype("float32"), "w": rng.standard_normal((5, 3)).astype("float32")}
    np.savez(tmp_path / "in.npz", **data)
    before = _child(src, spec, tmp_path / "in.npz", tmp_path / "a.npz")
    after = _child(out, spec, tmp_path / "in.npz", tmp_path / "b.npz")
    assert after["public"] == before["public"]
    assert after["variables"] == before["variables"]
    with relu_as_square():
        expected = model(tf.constant(data["x"])).numpy()
    got = dict(np.load(tmp_path / "b.npz"))
    assert any(key.startswith("sig/") for key in got)
    for key in got:
        if key.startswith(("sig/", "call/")):
            assert_close(got[key], expected, rtol=RTOL)


ASSET_CHILD = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import no_actswap  # actswap cannot be imported from here on
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
words = tf.constant(json.loads(sys.argv[2]))
np.save(sys.argv[3], loaded.serve(words).numpy())
print(json.dumps(sorted(a for a in dir(loaded) if not a.startswith("_"))))
"""


def _vocabulary_model(tmp_path: Path):
    import keras

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\ndog\nbird\nfish\n")
    inp = keras.Input((3,), dtype="string", name="words")
    ids = keras.layers.StringLookup(vocabulary=str(vocab), name="lookup")(inp)
    h = keras.layers.Flatten()(keras.layers.Embedding(6, 4, name="emb")(ids))
    h = keras.layers.Dense(5, activation="relu", name="d1")(h)
    return keras.Model(inp, keras.layers.Dense(2, name="out")(h))


def test_vocabulary_assets_and_tables_are_carried_over(tmp_path):
    model = _vocabulary_model(tmp_path)
    src, out = tmp_path / "sm", tmp_path / "sm.square"
    model.export(str(src), verbose=False)
    r = runner.invoke(app, ["convert", str(src), "--to", "square", "--json"])
    assert r.exit_code == 0, r.stderr
    assert (out / "assets" / "vocab.txt").read_text() == (src / "assets" / "vocab.txt").read_text()
    words = [["cat", "dog", "fish"], ["bird", "unknown", "cat"]]
    with relu_as_square():
        expected = model(tf.constant(words)).numpy()
    plain = model(tf.constant(words)).numpy()
    assert np.abs(expected - plain).max() > 1e-6, "reference equals the ReLU model: void check"
    proc = subprocess.run(
        [sys.executable, "-c", ASSET_CHILD, str(out), json.dumps(words), str(tmp_path / "got.npy")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(np.load(tmp_path / "got.npy"), expected, rtol=RTOL)


def test_a_table_reading_a_file_outside_the_savedmodel_is_still_refused(tmp_path):
    """The vocabulary asset's name edited to point out of the directory: the
    table would read another file, so the scan refuses the model."""
    from tensorflow.core.protobuf import saved_model_pb2

    model = _vocabulary_model(tmp_path)
    src = tmp_path / "sm"
    model.export(str(src), verbose=False)
    (tmp_path / "elsewhere.txt").write_text("cat\ndog\n")
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((src / "saved_model.pb").read_bytes())
    saved.meta_graphs[0].asset_file_def[0].filename = "../../elsewhere.txt"
    (src / "saved_model.pb").write_bytes(saved.SerializeToString())
    r = runner.invoke(app, ["convert", str(src), "--to", "square"])
    assert r.exit_code == 2, r.stderr
    assert "InitializeTableFromTextFile" in r.stderr and "reads a file" in r.stderr
    assert not (tmp_path / "sm.square").exists()


class SeveralTraces(tf.Module):
    """A function saved with several traces (shapes, a Python default argument)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = tf.Variable(tf.random.stateless_normal((4, 2), seed=(7, 8)), name="w")

    @tf.function
    def f(self, x, training=False):
        y = tf.nn.relu(tf.matmul(x, self.w))
        return y * 2.0 if training else y

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def serve(self, x):
        return {"y": self.f(x)}


def test_a_function_with_several_traces_keeps_them_and_its_defaults(tmp_path):
    net = SeveralTraces()
    x = tf.constant(np.random.default_rng(4).standard_normal((2, 4)).astype("float32"))
    net.f(x), net.f(x, training=True), net.f(tf.zeros((3, 4)))
    src, out = tmp_path / "sm", tmp_path / "sm.square"
    tf.saved_model.save(net, str(src), signatures={"serving_default": net.serve})
    converted, report = actswap.convert(src, to="square")
    actswap.save(converted, out)
    loaded = tf.saved_model.load(str(out))
    assert len(loaded.f.concrete_functions) == len(tf.saved_model.load(str(src)).f.concrete_functions)
    ref_net = SeveralTraces()
    with relu_as_square():
        expected, expected_training = ref_net.f(x).numpy(), ref_net.f(x, training=True).numpy()
    assert_close(loaded.f(x).numpy(), expected, rtol=RTOL)  # the default training=False still applies
    assert_close(loaded.f(x, training=True).numpy(), expected_training, rtol=RTOL)
    assert_close(loaded.serve(x)["y"].numpy(), expected, rtol=RTOL)
