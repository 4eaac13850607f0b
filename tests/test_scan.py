"""The pre-load scan itself: its allow-lists and protobuf schema are TensorFlow's
and Keras's own, it accepts every legitimate model actswap handles (no false
refusals), and it refuses what reaches outside the model in each format.
Hostile inputs through the CLI are in test_bad_inputs.py."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import h5py
import keras
import pytest
import tensorflow as tf
from gen_allowlists import OUT, render

from actswap import scan, tfproto
from actswap.formats import Format
from cases import CASES
from tf_cases import ControlFlowModule


def test_allowlists_are_current():
    """Regenerate from the installed TensorFlow/Keras/tf_keras: must equal the stored file
    (else run `python tests/gen_allowlists.py` and review the difference)."""
    assert render() == OUT.read_text()


def test_allowlists_exclude_what_runs_code():
    from actswap.safety import allowlists

    for name in ("Lambda", "TFSMLayer", "TorchModuleWrapper", "JaxLayer", "FlaxLayer"):
        assert name not in allowlists.KERAS_CLASSES and name not in allowlists.TF_KERAS_CLASSES
    for op in ("ReadFile", "WriteFile", "MatchingFiles", "PyFunc", "EagerPyFunc", "PrintV2", "SaveV2",
               "RestoreV2", "MergeV2Checkpoints", "ImmutableConst", "Abort", "TFRecordDataset",
               "WriteSummary", "InitializeTableFromTextFileV2", "DecodeProtoV2"):
        assert op not in allowlists.TF_OPS, op
    for op in ("Relu", "MatMul", "Conv2D", "StatefulPartitionedCall", "While", "VarHandleOp", "Square"):
        assert op in allowlists.TF_OPS, op
    for fn in ("get_file", "enable_unsafe_deserialization", "load_model"):
        assert fn not in allowlists.KERAS_FUNCTIONS


def test_protobuf_schema_matches_tensorflow():
    """Every field the scan declares has TensorFlow's (or tf_keras's) number and wire type."""
    from google.protobuf import descriptor_pool
    from tensorflow.core.protobuf import saved_model_pb2  # noqa: F401  (registers TF's descriptors)
    from tf_keras.protobuf import saved_metadata_pb2  # noqa: F401

    pool = descriptor_pool.Default()
    wire = {  # FieldDescriptor types -> protobuf wire types
        9: 2, 11: 2, 3: 0, 5: 0, 14: 0,
    }
    for name, fields in tfproto.SCHEMA.items():
        real = pool.FindMessageTypeByName(tfproto.TF_NAMES[name])
        for fname, number, ftype, label, _ in fields:
            field = real.fields_by_number[number]
            assert field.name == fname, (name, fname, field.name)
            assert wire[field.type] == wire[ftype], (name, fname)
            repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
            assert repeated == (label == tfproto.REPEATED), (name, fname)


def test_tfproto_reads_what_tensorflow_wrote(tmp_path):
    m = ControlFlowModule()
    tf.saved_model.save(m, str(tmp_path / "sm"), signatures=m.signatures())
    msg = tfproto.message("SavedModel")
    msg.ParseFromString((tmp_path / "sm" / "saved_model.pb").read_bytes())
    graph = msg.meta_graphs[0].graph_def
    ops = {n.op for f in graph.library.function for n in f.node_def}
    assert {"Relu", "Relu6", "While", "StatelessIf"} <= ops
    assert {e.key for e in msg.meta_graphs[0].signature_def} >= {"serving_default", "second"}


# --- no false refusals ---------------------------------------------------------------


def test_every_fixture_and_case_passes(tmp_path, fixtures_dir):
    for path in sorted(fixtures_dir.glob("*.keras")):
        report = scan.scan(path)
        assert report.ok and not report.findings, (path, report.findings)
    for name, factory in CASES.items():
        model, _ = factory()
        for suffix in (".keras", ".h5"):
            path = tmp_path / f"{name}{suffix}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.save(path)
            assert scan.scan(path).findings == [], (path, scan.scan(path).findings)
        model.export(str(tmp_path / f"{name}_export"), verbose=False)
        assert scan.scan(tmp_path / f"{name}_export").findings == [], name


def test_savedmodels_of_every_writer_pass(tmp_path):
    import tf_keras

    m = ControlFlowModule()
    tf.saved_model.save(m, str(tmp_path / "module"), signatures=m.signatures())
    x = tf_keras.Input((4,))
    y = tf_keras.layers.LSTM(2)(tf_keras.layers.Reshape((4, 1))(tf_keras.layers.Dense(4, activation="relu")(x)))
    km = tf_keras.Model(x, y)
    km.compile("adam", "mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        km.save(str(tmp_path / "keras2_sm"), save_format="tf")
        km.save(str(tmp_path / "keras2.h5"), save_format="h5")
    g = tf.Graph()
    with g.as_default():
        p = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        v = tf.compat.v1.get_variable("w", [4, 4])
        out = tf.nn.relu(tf.matmul(p, v), name="y")
        with tf.compat.v1.Session(graph=g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            b = tf.compat.v1.saved_model.Builder(str(tmp_path / "tf1"))
            sig = tf.compat.v1.saved_model.predict_signature_def({"x": p}, {"y": out})
            b.add_meta_graph_and_variables(sess, ["serve"], signature_def_map={"serving_default": sig})
            b.save()
    for name in ("module", "keras2_sm", "keras2.h5", "tf1"):
        report = scan.scan(tmp_path / name)
        assert report.findings == [], (name, report.findings)


# --- refusals, per mechanism ----------------------------------------------------------


def test_checkpoint_ops_only_in_the_saver(tmp_path):
    class Saves(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([2], tf.float32)])
        def f(self, x):
            tf.raw_ops.SaveV2(prefix=str(tmp_path / "ckpt"), tensor_names=["x"], shape_and_slices=[""], tensors=[x])
            return {"y": tf.nn.relu(x)}

    m = Saves()
    tf.saved_model.save(m, str(tmp_path / "sm"), signatures={"serving_default": m.f})
    messages = [f.message for f in scan.scan(tmp_path / "sm").errors]
    assert len(messages) == 1 and "op SaveV2" in messages[0] and "outside the saver" in messages[0], messages


def test_keras2_tf_op_layers_that_touch_files_are_refused(tmp_path):
    import tf_keras

    x = tf_keras.Input((3,), name="x")
    y = tf_keras.layers.Dense(2, name="out")(tf.nn.relu(x))
    src = tmp_path / "op.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf_keras.Model(x, y).save(src)
    assert scan.scan(src).findings == []
    bad = tmp_path / "io.h5"
    shutil.copy(src, bad)
    with h5py.File(bad, "r+") as f:
        f.attrs["model_config"] = f.attrs["model_config"].replace('"nn.relu"', '"io.write_file"')
    messages = [f.message for f in scan.scan(bad).errors]
    assert any("calls tf.io.write_file" in m for m in messages), messages


def test_config_objects_are_checked_against_the_allow_list():
    def wrap(obj):
        return {"class_name": "Functional", "config": {"name": "top", "layers": [obj]}}

    ok = {"module": "keras.layers", "class_name": "Dense", "config": {"name": "d", "units": 2, "activation": "relu"}}
    assert scan.find_unsafe(wrap(ok)) == []
    cases = {
        "function from os": ({"module": "os", "class_name": "function", "config": "system"}, "outside Keras"),
        "keras utility": ({"module": "keras.utils", "class_name": "function", "config": "get_file"},
                          "not a Keras activation"),
        "unsafe switch": ({"module": "keras.config", "class_name": "enable_unsafe_deserialization",
                           "config": {"name": "x"}}, "unknown class"),
        "custom class": ({"module": "mypkg", "class_name": "Evil", "registered_name": "mypkg>Evil",
                          "config": {"name": "e"}}, "custom class 'mypkg>Evil'"),
        "vocabulary file": ({"module": "keras.layers", "class_name": "StringLookup",
                             "config": {"name": "s", "vocabulary": "/etc/passwd"}}, "reads the file '/etc/passwd'"),
    }
    for name, (obj, fragment) in cases.items():
        found = scan.find_unsafe(wrap(obj))
        assert len(found) == 1 and fragment in found[0], (name, found)


def test_read_config_and_format_helpers(fixtures_dir):
    config = scan.read_config(fixtures_dir / "nested.keras", Format.KERAS)
    assert config["class_name"] == "Functional"
    assert json.dumps(config)


def test_scan_is_quick_to_import():
    import subprocess

    from conftest import cli_env

    code = "import sys, actswap.scan, actswap.tfproto; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=cli_env())
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("member", ["model.weights.h5"])
def test_external_link_inside_a_keras_archive_is_refused(tmp_path, member):
    """The weights file inside a .keras is HDF5 too: an external link there would
    make Keras read another file while loading weights."""
    import zipfile

    keras.utils.set_random_seed(0)
    inp = keras.Input((2,), name="x")
    src = tmp_path / "m.keras"
    keras.Model(inp, keras.layers.Dense(2, activation="relu")(inp)).save(src)
    with zipfile.ZipFile(src) as z:
        (tmp_path / member).write_bytes(z.read(member))
        others = {i.filename: z.read(i) for i in z.infolist() if i.filename != member}
    with h5py.File(tmp_path / member, "r+") as f:
        f["leak"] = h5py.ExternalLink("/etc/hostname", "/")
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(bad, "w") as z:
        for name, data in others.items():
            z.writestr(name, data)
        z.writestr(member, (tmp_path / member).read_bytes())
    messages = [f.message for f in scan.scan(bad).errors]
    assert any("external link" in m and "model.weights.h5" in m for m in messages), messages


def test_paths_in_findings_name_the_place(tmp_path):
    path = Path(tmp_path / "x.keras")
    inner = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="d")], name="inner")
    keras.Sequential([keras.Input((2,)), inner], name="outer").save(path)
    report = scan.scan(path)
    assert report.ok
    # edit: the Dense in the nested Sequential becomes an unknown class
    import zipfile

    with zipfile.ZipFile(path) as z:
        files = {i.filename: z.read(i) for i in z.infolist()}
    config = json.loads(files["config.json"])
    config["config"]["layers"][1]["config"]["layers"][1]["class_name"] = "Ghost"
    files["config.json"] = json.dumps(config).encode()
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(bad, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    (finding,) = scan.scan(bad).errors
    assert finding.where == "inner/d"
    assert "config.layers[1].config.layers[1]" in finding.message
