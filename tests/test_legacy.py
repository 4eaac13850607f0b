"""Keras 2 (tf_keras) models: .h5 files and Keras 2 SavedModel directories.

The numerical reference is independent of actswap: the original tf_keras model
run with ReLU patched to x * x. tf_keras does not call ``tf.nn.relu`` through
the ``tensorflow`` module but through ``tensorflow.compat.v2`` (its backend's
``tf``), a different module object, so both are patched (checked by
``test_reference_patch_reaches_tf_keras``); a ``tf.nn.relu(x)`` call in a
functional graph (a TFOpLambda layer) holds the function object itself, so that
layer's ``function`` is patched too.

Reloads run in a fresh interpreter that imports only ``actswap.legacy`` and
``tf_keras`` (no test helpers, no custom_objects).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf_keras = pytest.importorskip("tf_keras")

import tensorflow as tf  # noqa: E402

from actswap import legacy  # noqa: E402
from actswap.errors import (  # noqa: E402
    LoadError,
    UnsafeModelError,
    UnsupportedModelError,
    UserError,
)

CLIP = "clip:0.5"
SEED = 7


# --- the independent reference ------------------------------------------------


from conftest import fake_relu as _fake_relu  # noqa: E402


def _iter_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, tf_keras.Model):
            yield from _iter_layers(layer)


@contextlib.contextmanager
def relu_as_square(model, grad: str = "exact"):
    """Inside this block every plain ReLU of a tf_keras model computes x²."""
    from tf_keras.src import backend

    fake = _fake_relu(grad)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(tf.nn, "relu", fake))
        stack.enter_context(mock.patch.object(backend.tf.nn, "relu", fake))
        for layer in _iter_layers(model):
            if type(layer).__name__ == "TFOpLambda" and layer.get_config()["function"] == "nn.relu":
                stack.enter_context(mock.patch.object(layer, "function", fake))
        yield


from conftest import assert_close as _close  # noqa: E402


def _output_and_grad(model, x, w, ctx=None):
    xt = tf.constant(x)
    with ctx or contextlib.nullcontext():
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = model(xt)
            s = tf.reduce_sum(y * w)
        g = tape.gradient(s, xt)
    return y.numpy(), g.numpy()


def _weights(model):
    return [(tuple(v.shape), np.asarray(v.numpy()).tobytes()) for v in model.weights]


def _flags(model, prefix=""):
    out = []
    for layer in model.layers:
        out.append((prefix + layer.name, bool(layer.trainable)))
        if isinstance(layer, tf_keras.Model):
            out += _flags(layer, prefix + layer.name + "/")
    return out


# --- models -------------------------------------------------------------------


def _save(model, path, fmt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf_keras: "HDF5 ... is considered legacy"
        model.save(path, save_format="h5" if fmt == "h5" else "tf")


def build_nested():
    """Functional > Functional 'mid' > Sequential 'inner', every ReLU form tf_keras has."""
    L = tf_keras.layers
    tf_keras.utils.set_random_seed(SEED)
    inner = tf_keras.Sequential(
        [
            L.InputLayer(input_shape=(6,)),
            L.Dense(6, activation="relu", name="d_in"),
            L.ReLU(name="r_in"),
            L.Dense(6, name="d_frozen", trainable=False),
        ],
        name="inner",
    )
    mi = tf_keras.Input((6,), name="mid_in")
    mh = inner(mi)
    mh = L.Activation("tanh", name="mid_tanh")(mh)
    mid = tf_keras.Model(mi, mh, name="mid")

    x = tf_keras.Input((5,), name="x")
    h = L.Dense(6, name="d1")(x)
    h = L.Activation("relu", name="act")(h)
    h = mid(h)
    h6 = L.ReLU(max_value=6, name="r6")(h)
    hl = L.LeakyReLU(alpha=0.1, name="lk")(h)
    h = L.Concatenate(name="cat")([h6, hl])
    h = L.Dense(4, activation="relu", name="d2")(h)
    y = L.Dense(3, name="out")(h)
    model = tf_keras.Model(x, y, name="outer")
    model.compile(optimizer=tf_keras.optimizers.SGD(0.01), loss="mse")
    return model


EXPECTED_SITES = [
    ("act", "Activation", "Activation layer", "relu", "replaced"),
    ("mid/inner/d_in", "Dense", "activation=", "relu", "replaced"),
    ("mid/inner/r_in", "ReLU", "ReLU layer", "relu", "replaced"),
    ("mid/mid_tanh", "Activation", "Activation layer", "tanh", "skipped"),
    ("r6", "ReLU", "ReLU layer", "relu6", "skipped"),
    ("lk", "LeakyReLU", "LeakyReLU layer", "leaky_relu", "skipped"),
    ("d2", "Dense", "activation=", "relu", "replaced"),
]


def _data(n=16):
    rng = np.random.default_rng(SEED)
    x = rng.normal(0, 1.0, (n, 5)).astype("float32")
    w = rng.normal(0, 1.0, (n, 3)).astype("float32")
    y = np.zeros((n, 3), "float32")
    return x, w, y


CHILD = textwrap.dedent(
    """
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import actswap.legacy, tf_keras
    import numpy as np
    import tensorflow as tf

    spec = json.loads(sys.argv[1])
    data = np.load(spec["data"])
    x, w, y = data["x"], data["w"], data["y"]

    def flags(model, prefix=""):
        out = []
        for layer in model.layers:
            out.append((prefix + layer.name, bool(layer.trainable)))
            if isinstance(layer, tf_keras.Model):
                out += flags(layer, prefix + layer.name + "/")
        return out

    arrays, info = {}, {}
    for key, path in spec["models"].items():
        m = tf_keras.models.load_model(path)
        for j, v in enumerate(m.weights):
            arrays[f"{key}.w{j}"] = v.numpy()
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            out = m(xt)
            s = tf.reduce_sum(out * w)
        arrays[f"{key}.pred"] = out.numpy()
        arrays[f"{key}.grad"] = tape.gradient(s, xt).numpy()
        before = [v.numpy().copy() for v in m.trainable_weights]
        frozen = [v.numpy().copy() for v in m.non_trainable_weights]
        m.fit(x, y, epochs=1, batch_size=len(x), verbose=0)
        info[key] = {
            "n_weights": len(m.weights),
            "compiled": m.optimizer is not None,
            "optimizer": type(m.optimizer).__name__,
            "layers": {
                type(l).__name__ for l in m.submodules if isinstance(l, tf_keras.layers.Layer)
            },
            "flags": flags(m),
            "all_trainable_changed": all(
                not np.array_equal(a, b.numpy()) for a, b in zip(before, m.trainable_weights)
            ),
            "frozen_unchanged": all(
                np.array_equal(a, b.numpy()) for a, b in zip(frozen, m.non_trainable_weights)
            ),
            "finite": all(np.all(np.isfinite(v.numpy())) for v in m.weights),
        }
        info[key]["layers"] = sorted(info[key]["layers"])
    np.savez(spec["result"], **arrays)
    print(json.dumps(info))
    """
)


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    """The nested model saved as .h5 and SavedModel, converted, and reloaded in a fresh process."""
    d = tmp_path_factory.mktemp("legacy")
    model = build_nested()
    h5, sm = d / "model.h5", d / "model_sm"
    _save(model, h5, "h5")
    _save(model, sm, "savedmodel")
    outputs = {
        "h5_exact": (h5, d / "out_exact.h5", "exact"),
        "h5_clip": (h5, d / "out_clip.h5", CLIP),
        "sm_exact": (sm, d / "out_exact_sm", "exact"),
        "sm_clip": (sm, d / "out_clip_sm", CLIP),
    }
    reports = {
        key: legacy.convert_legacy(src, out, grad=grad) for key, (src, out, grad) in outputs.items()
    }
    x, w, y = _data()
    np.savez(d / "data.npz", x=x, w=w, y=y)
    spec = {
        "data": str(d / "data.npz"),
        "result": str(d / "result.npz"),
        "models": {key: str(out) for key, (_, out, _) in outputs.items()},
    }
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    arrays = dict(np.load(d / "result.npz"))
    return {
        "model": model, "h5": h5, "sm": sm, "dir": d, "outputs": outputs,
        "reports": reports, "info": info, "arrays": arrays, "data": (x, w, y),
    }


# --- tests --------------------------------------------------------------------


def test_reference_patch_reaches_tf_keras():
    from tf_keras.src import backend

    # tf_keras's relu is backend.relu -> tf.nn.relu of tensorflow.compat.v2.
    assert backend.tf is tf.compat.v2
    x = tf.constant([-2.0, 3.0])
    with relu_as_square(tf_keras.Sequential([]), "exact"):
        np.testing.assert_array_equal(tf_keras.activations.relu(x).numpy(), [4.0, 9.0])
        np.testing.assert_array_equal(tf_keras.layers.ReLU()(x).numpy(), [4.0, 9.0])
        np.testing.assert_array_equal(tf_keras.layers.Activation("relu")(x).numpy(), [4.0, 9.0])
        # relu6 and leaky ReLU are other ops: untouched, as convert leaves them.
        np.testing.assert_array_equal(tf_keras.layers.ReLU(max_value=6)(x).numpy(), [0.0, 3.0])
    np.testing.assert_array_equal(tf_keras.activations.relu(x).numpy(), [0.0, 3.0])


def test_detects_and_reads_config_without_loading(nested, tmp_path):
    h5, sm = nested["h5"], nested["sm"]
    assert legacy.is_keras2_savedmodel(sm)
    assert not legacy.is_keras2_savedmodel(h5)
    assert not legacy.is_keras2_savedmodel(tmp_path)
    plain = tmp_path / "plain_sm"
    plain.mkdir()
    (plain / "saved_model.pb").write_bytes(b"")
    assert not legacy.is_keras2_savedmodel(plain)

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded")

    with mock.patch.object(tf_keras.models, "load_model", forbidden), mock.patch.object(
        tf.saved_model, "load", forbidden
    ):
        cfg = legacy.read_legacy_config(h5)
        assert cfg["class_name"] == "Functional" and cfg["config"]["name"] == "outer"
        root = legacy.read_legacy_config(sm)
        assert root["class_name"] == "Functional" and root["config"]["name"] == "outer"
        assert root["model_config"]["config"]["layers"]
        legacy.check_legacy_safe(h5)
        legacy.check_legacy_safe(sm)


def test_report_lists_every_site(nested):
    for key, report in nested["reports"].items():
        got = [(s.path, s.layer, s.form, s.activation, s.action) for s in report.sites]
        assert got == EXPECTED_SITES, key
        assert report.replaced == 4 and report.skipped == 3 and report.skipped_relu_like == 2
        by_path = {s.path: s for s in report.sites}
        assert by_path["r6"].reason == "relu6 (max_value=6) is not plain ReLU"
        assert by_path["lk"].reason == "leaky_relu (alpha=0.1) is not plain ReLU"
        assert by_path["act"].reason == "relu -> square"
        assert report.grad == nested["outputs"][key][2]
        assert report.output == str(nested["outputs"][key][1])
        assert any("optimizer state" in n for n in report.notes)


def test_same_family_written_and_input_untouched(nested):
    for key, (src, out, _) in nested["outputs"].items():
        if key.startswith("h5"):
            assert out.is_file() and legacy._kind(out) == "h5"
        else:
            assert legacy.is_keras2_savedmodel(out)
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    # The inputs still hold plain ReLUs.
    assert '"activation": "relu"' in json.dumps(legacy.read_legacy_config(nested["h5"]))
    assert '"activation": "relu"' in json.dumps(legacy.read_legacy_config(nested["sm"]))


def test_reload_in_fresh_process_keeps_weights_bit_identical(nested):
    original = _weights(nested["model"])
    for key in nested["outputs"]:
        info = nested["info"][key]
        assert info["n_weights"] == len(original), key
        got = [
            (tuple(a.shape), a.tobytes())
            for a in (nested["arrays"][f"{key}.w{j}"] for j in range(info["n_weights"]))
        ]
        assert got == original, key


def test_reload_keeps_squares_and_flags(nested):
    flags = _flags(nested["model"])
    assert ("mid/inner/d_frozen", False) in flags
    for key in nested["outputs"]:
        info = nested["info"][key]
        assert "Square" in info["layers"], key
        assert "ReLU" in info["layers"], key  # the relu6 one, skipped
        assert [tuple(f) for f in info["flags"]] == flags, key


def test_reload_outputs_equal_reference(nested):
    model = nested["model"]
    x, w, _ = nested["data"]
    with relu_as_square(model):
        expected = model(tf.constant(x)).numpy()
    plain = model(tf.constant(x)).numpy()
    assert np.abs(expected - plain).max() > 1e-3, "reference equals the ReLU model: void check"
    assert np.abs(expected).max() > 1e-3
    for key in nested["outputs"]:
        _close(nested["arrays"][f"{key}.pred"], expected)


def test_gradient_mode_survives_reload(nested):
    """d sum(y * w) / dx after the reload == in-memory converted model == reference."""
    model = nested["model"]
    x, w, _ = nested["data"]
    ref = {g: _output_and_grad(model, x, w, relu_as_square(model, g))[1] for g in ("exact", CLIP)}
    assert np.abs(ref["exact"] - ref[CLIP]).max() > 1e-3, "clip bound never active: void check"
    loaded = tf_keras.models.load_model(nested["h5"], compile=False)
    for key, (_, _, grad) in nested["outputs"].items():
        converted, _ = legacy.rewrite_legacy_model(loaded, grad)
        _, in_memory = _output_and_grad(converted, x, w)
        _close(nested["arrays"][f"{key}.grad"], in_memory)
        _close(nested["arrays"][f"{key}.grad"], ref[grad])


def test_reloaded_model_trains_one_step(nested):
    for key in nested["outputs"]:
        info = nested["info"][key]
        assert info["compiled"] and info["optimizer"] == "SGD", key
        assert info["all_trainable_changed"], key
        assert info["frozen_unchanged"], key
        assert info["finite"], key


def build_wrappers():
    """Wrappers, RNN cells, a tf.nn.relu op, a shared layer and a shared nested model."""
    L = tf_keras.layers
    tf_keras.utils.set_random_seed(SEED)
    shared = L.Dense(4, activation="relu", name="shared")
    block = tf_keras.Sequential(
        [L.InputLayer(input_shape=(4,)), L.Dense(4, activation="relu", name="b_d")], name="block"
    )
    x = tf_keras.Input((3, 4), name="seq")
    t = L.TimeDistributed(L.Dense(4, activation="relu", name="td_dense"), name="td")(x)
    r = L.LSTM(4, activation="relu", name="lstm")(t)
    b = L.Bidirectional(L.SimpleRNN(2, activation="relu", name="rnn"), name="bi")(t)
    f = L.Flatten(name="flat")(x)
    f = L.Dense(4, name="pre")(f)
    o = tf.nn.relu(f)
    s1, s2 = shared(o), shared(r)
    n1, n2 = block(s1), block(s2)
    h = L.Concatenate(name="cat")([n1, n2, b])
    y = L.Dense(2, name="out")(h)
    return tf_keras.Model(x, y, name="wrappers")


def test_wrappers_rnn_ops_and_sharing(tmp_path):
    model = build_wrappers()
    new, report = legacy.rewrite_legacy_model(model, "exact")
    got = {(s.path, s.form, s.activation, s.action) for s in report.sites}
    assert {
        ("td/td_dense", "activation=", "relu", "replaced"),
        ("lstm", "activation=", "relu", "replaced"),
        ("lstm", "recurrent_activation=", "sigmoid", "skipped"),
        # one config for both directions: Bidirectional builds the backward copy
        ("bi/rnn", "activation=", "relu", "replaced"),
        ("tf.nn.relu", "tf op call", "relu", "replaced"),
        ("shared", "activation=", "relu", "replaced"),
        ("block/b_d", "activation=", "relu", "replaced"),
    } <= got
    assert len([s for s in report.sites if s.path == "shared"]) == 1  # shared: one site
    assert _weights(new) == _weights(model)
    x = np.random.default_rng(1).normal(0, 1, (4, 3, 4)).astype("float32")
    w = np.random.default_rng(2).normal(0, 1, (4, 2)).astype("float32")
    with relu_as_square(model):
        expected = model(tf.constant(x)).numpy()
    assert np.abs(expected - model(tf.constant(x)).numpy()).max() > 1e-3, "void reference"
    _close(new(tf.constant(x)).numpy(), expected)
    # Through an .h5 file (tf_keras serializes the objects), reloaded in-process.
    src, out = tmp_path / "w.h5", tmp_path / "w.square.h5"
    _save(model, src, "h5")
    legacy.convert_legacy(src, out)
    back = tf_keras.models.load_model(out)
    _close(back(tf.constant(x)).numpy(), expected)
    assert _weights(back) == _weights(model)
    _, g1 = _output_and_grad(back, x, w)
    _, g2 = _output_and_grad(new, x, w)
    _close(g1, g2)


def _lambda_model(marker: Path):
    path = str(marker)  # the lambda's closure holds only this string
    tf_keras.utils.set_random_seed(SEED)
    x = tf_keras.Input((3,), name="x")
    h = tf_keras.layers.Dense(3, activation="relu", name="d")(x)
    h = tf_keras.layers.Lambda(lambda t: (open(path, "w").write("ran"), t)[1], name="evil")(h)
    return tf_keras.Model(x, tf_keras.layers.Dense(1, name="out")(h))


@pytest.mark.parametrize("fmt", ["h5", "savedmodel"])
def test_lambda_refused_before_any_load(tmp_path, fmt):
    marker = tmp_path / "marker.txt"
    model = _lambda_model(marker)
    src = tmp_path / ("evil.h5" if fmt == "h5" else "evil_sm")
    _save(model, src, fmt)
    marker.unlink(missing_ok=True)  # building/saving ran the function
    out = tmp_path / ("out.h5" if fmt == "h5" else "out_sm")
    with pytest.raises(UnsafeModelError) as e:
        legacy.convert_legacy(src, out)
    assert e.value.exit_code == 2
    assert "Lambda at 'evil'" in str(e.value) and "--trust-code" in str(e.value)
    assert "\n" not in str(e.value)
    assert not marker.exists(), "the Lambda's code ran"
    assert not out.exists()
    with pytest.raises(UnsafeModelError):
        legacy.check_legacy_safe(src)
    # Control: the check is what stood in the way; tf_keras runs the code on load.
    tf_keras.models.load_model(src, compile=False, safe_mode=True)
    assert marker.exists(), "control: tf_keras did not run the Lambda; the test proves nothing"


def test_trust_code_warns_and_converts(tmp_path):
    marker = tmp_path / "marker.txt"
    src, out = tmp_path / "evil.h5", tmp_path / "evil.square.h5"
    _save(_lambda_model(marker), src, "h5")
    with pytest.warns(UserWarning, match="WILL RUN"):
        report = legacy.convert_legacy(src, out, trust_code=True)
    assert out.is_file() and report.replaced == 1
    assert any("Lambda" in n for n in report.notes)


def _edit_h5_config(src: Path, dst: Path, old: str, new: str) -> None:
    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        text = f.attrs["model_config"]
        text = text.decode() if isinstance(text, bytes) else text
        assert old in text
        f.attrs["model_config"] = text.replace(old, new)


def test_crafted_configs_refused(tmp_path):
    tf_keras.utils.set_random_seed(SEED)
    x = tf_keras.Input((3,), name="x")
    y = tf_keras.layers.Dense(2, name="out")(tf.nn.relu(x))
    src = tmp_path / "op.h5"
    _save(tf_keras.Model(x, y), src, "h5")
    legacy.check_legacy_safe(src)
    cases = {
        "io": ('"function": "nn.relu"', '"function": "io.write_file"', "tf.io.write_file"),
        "module": ('"module": "keras.initializers"', '"module": "os"', "module 'os'"),
    }
    for name, (old, new, expect) in cases.items():
        bad = tmp_path / f"{name}.h5"
        _edit_h5_config(src, bad, old, new)
        with pytest.raises(UnsafeModelError, match=expect) as e:
            legacy.convert_legacy(bad, tmp_path / f"{name}.out.h5")
        assert e.value.exit_code == 2
        assert not (tmp_path / f"{name}.out.h5").exists()


def test_corrupt_keras_metadata_is_a_load_error(nested, tmp_path):
    from tf_keras.protobuf import saved_metadata_pb2

    bad = tmp_path / "bad_sm"
    shutil.copytree(nested["sm"], bad)
    pb = bad / "keras_metadata.pb"
    good = pb.read_bytes()
    cases = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x0a\xff\xff\xff\xff\x0f",
    }
    meta = saved_metadata_pb2.SavedMetadata()
    meta.ParseFromString(good)
    meta.nodes[0].metadata = "{not json"
    cases["bad json"] = meta.SerializeToString()
    for name, data in cases.items():
        pb.write_bytes(data)
        for call in (
            lambda: legacy.read_legacy_config(bad),
            lambda: legacy.check_legacy_safe(bad),
            lambda: legacy.convert_legacy(bad, tmp_path / "o_sm"),
        ):
            with pytest.raises(LoadError) as e:
                call()
            assert e.value.exit_code == 2, name
            assert "\n" not in str(e.value)
    assert not (tmp_path / "o_sm").exists()


def test_output_rules(nested, tmp_path):
    h5, sm = nested["h5"], nested["sm"]
    out = tmp_path / "o.h5"
    out.write_bytes(b"old")
    with pytest.raises(UserError, match="already exists"):
        legacy.convert_legacy(h5, out)
    assert out.read_bytes() == b"old"
    legacy.convert_legacy(h5, out, overwrite=True)
    assert legacy._kind(out) == "h5"
    with pytest.raises(UserError, match="must end in .h5"):
        legacy.convert_legacy(h5, tmp_path / "o.keras")
    with pytest.raises(UserError, match="is the input"):
        legacy.convert_legacy(h5, h5, overwrite=True)
    with pytest.raises(UserError, match="must be a directory name"):
        legacy.convert_legacy(sm, tmp_path / "new.h5")
    with pytest.raises(UserError, match="not a directory"):
        legacy.convert_legacy(sm, out, overwrite=True)  # a file where a folder would go
    with pytest.raises(UserError, match="already exists"):
        legacy.convert_legacy(sm, nested["outputs"]["sm_exact"][1])
    with pytest.raises(UserError):
        legacy.convert_legacy(tmp_path / "missing.h5", tmp_path / "m.h5")
    dest = tmp_path / "dest_sm"  # an existing SavedModel folder is replaced whole
    dest.mkdir()
    (dest / "stale").write_text("old")
    legacy.convert_legacy(sm, dest, overwrite=True)
    assert legacy.is_keras2_savedmodel(dest) and not (dest / "stale").exists()
    notmodel = tmp_path / "x.h5"
    notmodel.write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="neither an HDF5"):
        legacy.convert_legacy(notmodel, tmp_path / "y.h5")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_write_leaves_nothing(nested, tmp_path):
    from tf_keras.src.engine import training

    def broken_save(self, filepath, *args, **kwargs):
        p = Path(filepath)  # actswap hands over an existing temporary file or folder
        (p / "partial" if p.is_dir() else p).write_bytes(b"partial")
        raise RuntimeError("disk full")

    old_dir = tmp_path / "existing_sm"
    old_dir.mkdir()
    (old_dir / "keep").write_text("old")
    with mock.patch.object(training.Model, "save", broken_save):
        with pytest.raises(Exception, match="disk full"):
            legacy.convert_legacy(nested["h5"], tmp_path / "o.h5")
        with pytest.raises(Exception, match="disk full"):
            legacy.convert_legacy(nested["sm"], old_dir, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing_sm"]
    assert (old_dir / "keep").read_text() == "old"


def test_subclassed_model_refused():
    class Net(tf_keras.Model):
        def __init__(self):
            super().__init__()
            self.d = tf_keras.layers.Dense(2, activation="relu")

        def call(self, x):
            return self.d(x)

    net = Net()
    net(tf.zeros((1, 3)))
    with pytest.raises(UnsupportedModelError, match="subclassed"):
        legacy.rewrite_legacy_model(net)


# --- through the CLI ----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["h5", "savedmodel"])
def test_cli_routes_keras2_files_to_tf_keras_and_keeps_the_family(nested, tmp_path, fmt):
    from typer.testing import CliRunner

    from actswap.cli import app

    src = nested["h5"] if fmt == "h5" else nested["sm"]
    out = tmp_path / ("o.h5" if fmt == "h5" else "o_sm")
    r = CliRunner().invoke(app, ["convert", str(src), "--to", "square", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["output"] == str(out) and data["replaced"] == nested["reports"]["h5_exact"].replaced
    assert legacy.is_keras2_savedmodel(out) if fmt == "savedmodel" else out.is_file()
    r = CliRunner().invoke(app, ["inspect", str(src), "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["counts"].get("relu", 0) == data["replaced"]
    strict_out = tmp_path / ("s.h5" if fmt == "h5" else "s_sm")
    r = CliRunner().invoke(app, ["convert", str(src), "--to", "square", "-o", str(strict_out), "--strict"])
    assert r.exit_code == 1 and not strict_out.exists()  # the model has a skipped ReLU(max_value=6)


def test_cli_refuses_lambda_and_warns_loudly_with_trust_code(tmp_path):
    from typer.testing import CliRunner

    from actswap.cli import app

    marker = tmp_path / "marker.txt"
    model = _lambda_model(marker)
    src = tmp_path / "lam.h5"
    _save(model, src, "h5")
    marker.unlink(missing_ok=True)
    r = CliRunner().invoke(app, ["convert", str(src), "--to", "square"])
    assert r.exit_code == 2 and "Lambda" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists()
    # A flat .h5 goes to Keras 3, which honours --trust-code the same way.
    out = tmp_path / "t.keras"
    r = CliRunner().invoke(app, ["convert", str(src), "--to", "square", "--trust-code", "-o", str(out)])
    assert "WARNING: --trust-code" in r.stderr


@pytest.mark.parametrize("fmt", ["h5", "sm"])
def test_python_api_converts_and_saves_keras2_files(nested, tmp_path, fmt):
    """actswap.convert/save take Keras 2 files through their backend, as the CLI
    does: structure, numbers against the reference, and the written file reloads."""
    import actswap

    model = nested["model"]
    x, w, _ = nested["data"]
    converted, report = actswap.convert(nested[fmt], to="square")
    assert isinstance(converted, tf_keras.Model)
    assert report.replaced == sum(1 for s in report.sites if s.action == "replaced") > 0
    with relu_as_square(model):
        expected = model(tf.constant(x)).numpy()
    _close(converted(tf.constant(x)).numpy(), expected)
    assert _weights(converted) == _weights(model)
    out = actswap.save(converted, tmp_path / ("out.h5" if fmt == "h5" else "out_sm"))
    assert legacy._kind(out) == ("h5" if fmt == "h5" else "savedmodel")
    reloaded = tf_keras.models.load_model(str(out), compile=False)
    assert _weights(reloaded) == _weights(model)
    _close(reloaded(tf.constant(x)).numpy(), expected)
    with pytest.raises(actswap.errors.UserError, match="--to square --from relu only"):
        actswap.convert(nested[fmt], to="poly:0,0.5,0.25")
