"""What the fuzzer (benchmarks/fuzz.py, issue 29) found in the HDF5 reading path,
each as a minimal reproducer, and the bounded reader that fixed the worst of it.

Before the fix, each of these files ended `actswap scan` and `convert` with
"error: unexpected failure: ..." (exit 1) or hung; now each is refused as a
corrupt HDF5 file: one line naming it, exit 2, nothing written. Data-file
findings (.npz, images, TFRecords) are in test_recover_data.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import assert_user_error
from typer.testing import CliRunner

from actswap import scan
from actswap.cli import app
from actswap.safety import bounded, h5read, hdf5

runner = CliRunner()
DATA = Path(__file__).parent / "data"
CONFIG = json.dumps({"class_name": "Sequential", "config": {"name": "s", "layers": []}})


def _link_name_not_utf8(tmp: Path) -> Path:
    """A dataset whose name is not UTF-8: h5py's visit callback failed, and its
    lock re-raised that as a SystemError."""
    p = tmp / "badname.h5"
    with h5py.File(p, "w") as f:
        f.attrs["model_config"] = CONFIG
        f.create_group("model_weights")[b"w\xcb\xff"] = np.zeros(3)
    return p


def _string_attribute_of_unknown_encoding(tmp: Path) -> Path:
    """An attribute whose string type says character set 3 (HDF5 knows 0 and 1):
    h5py raised TypeError('Unknown string encoding')."""
    p = tmp / "encoding.h5"
    with h5py.File(p, "w") as f:
        f.attrs["model_config"] = CONFIG
        f.attrs["note"] = np.bytes_(b"x" * 777)  # a string type of a size found nowhere else
    data = bytearray(p.read_bytes())
    # HDF5's datatype message: version 1, class 3 (string); charset in the high nibble of the next byte; size 777.
    at = next(i for i in range(len(data) - 8) if data[i] == 0x13 and data[i + 4:i + 8] == (777).to_bytes(4, "little"))
    data[at + 1] = (data[at + 1] & 0x0F) | 0x30
    p.write_bytes(bytes(data))
    return p


def _link_address_past_the_end(tmp: Path) -> Path:
    """A Keras 2 .h5 with bytes changed by the fuzzer: a link's object header
    address lies past the end of the file ('Link visitation failed (addr
    overflow ...)', a RuntimeError, as in the issue's B-tree report)."""
    p = tmp / "overflow.h5"
    p.write_bytes((DATA / "fuzz_h5_link_addr_overflow.h5").read_bytes())
    return p


CORRUPT = [_link_name_not_utf8, _string_attribute_of_unknown_encoding, _link_address_past_the_end]


@pytest.mark.parametrize("make", CORRUPT)
def test_corrupt_hdf5_is_refused_by_every_command(tmp_path, make):
    path = make(tmp_path)
    before = sorted(tmp_path.iterdir())
    for args in (["scan", path], ["inspect", path], ["convert", path, "--to", "square"]):
        r = runner.invoke(app, [str(a) for a in args])
        assert_user_error(r, path.name, "corrupt HDF5")
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("make", CORRUPT)
def test_h5py_itself_fails_on_them(tmp_path, make):
    """The control: each file does break h5py (so the tests above can fail)."""
    path = make(tmp_path)
    def read_all(f: h5py.File) -> None:
        def visit(name: str, link: object) -> None:  # None: go on visiting
            obj = f.get(name)
            if obj is not None:
                list(obj.attrs.values())

        f.visititems_links(visit)
        list(f.attrs.values())

    with pytest.raises((RuntimeError, SystemError, TypeError)):
        with h5py.File(path, "r") as f:
            read_all(f)


def test_a_reader_that_never_returns_is_refused_in_time(tmp_path, monkeypatch):
    """HDF5 looped forever on a fuzzed Keras 2 .h5 (a corrupt global heap, reading one
    attribute); C code cannot be interrupted, so the read runs in a child the parent
    stops. Stood in for here by a reader that sleeps."""
    path = tmp_path / "ok.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = CONFIG
    monkeypatch.setattr(h5read, "_read_h5", lambda source, label: time.sleep(60))
    monkeypatch.setattr(bounded, "SECONDS", 1.0)
    h5read._READ.clear()
    start = time.monotonic()
    contents = h5read.read_h5(path, path.name)
    assert time.monotonic() - start < 20
    assert contents.corrupt == "corrupt HDF5 'ok.h5': reading it did not finish within 1 s"
    report = scan.ScanReport(str(path), "h5")
    hdf5.check_h5_links(path, path.name, report)
    assert [f.kind for f in report.errors] == ["damaged"]


def test_bounded_returns_the_result_and_the_child_leaves_nothing():
    assert bounded.bounded(lambda a, b: {"sum": a + b, "pid": os.getpid()}, 2, 3)["sum"] == 5
    assert bounded.bounded(os.getpid) != os.getpid()  # it ran in another process


def test_bounded_reports_time_memory_signals_and_errors():
    with pytest.raises(bounded.ReaderFailed, match="did not finish within 0.5 s"):
        bounded.bounded(time.sleep, 30, seconds=0.5)
    # The memory bound from a fresh process, as the CLI calls it: forked from this
    # test session (after ~600 tests, TensorFlow, JAX and torch loaded), the
    # child once exited with status 1 and no result (1 full run in 5), not
    # reproduced alone or after the tests before it; see issue 29's note.
    import subprocess
    import sys

    code = ("from actswap.safety import bounded\n"
            "try:\n    bounded.bounded(lambda: bytearray(2 * 1024**3), memory=256 * 1024**2)\n"
            "except bounded.ReaderFailed as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "reading it needed more than 0.25 GB of memory" in run.stdout, (run.stdout, run.stderr)
    with pytest.raises(bounded.ReaderFailed, match="signal 9"):  # as a crash in C code would end it
        bounded.bounded(lambda: os.kill(os.getpid(), 9))
    with pytest.raises(bounded.ChildError, match="ZeroDivisionError"):
        bounded.bounded(lambda: 1 / 0)


def test_a_bug_in_the_reader_is_not_called_a_corrupt_file(tmp_path, monkeypatch):
    """Only h5py's errors mean a corrupt file; an error of actswap's own code stays
    an unexpected failure (a blanket catch would hide bugs as refusals)."""
    path = tmp_path / "ok.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = CONFIG

    def buggy(source, label):
        raise TypeError("a bug of ours")

    monkeypatch.setattr(h5read, "_read_h5", buggy)
    h5read._READ.clear()
    with pytest.raises(RuntimeError, match="a bug of ours"):
        h5read.read_h5(path, path.name)


def _keras2_nested_h5(tmp: Path, edit) -> Path:
    import tf_keras

    inp = tf_keras.Input((8,))
    inner = tf_keras.Sequential([tf_keras.layers.Dense(8, activation="relu")], name="inner")
    path = tmp / "nested.h5"
    tf_keras.Model(inp, tf_keras.layers.Dense(3, name="head")(inner(inp))).save(path)
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        edit({layer["name"]: layer for layer in config["config"]["layers"]})
        f.attrs["model_config"] = json.dumps(config)
    return path


def _drop_the_calls(layers):
    layers["inner"]["inbound_nodes"] = []  # 'inner' has its own node 0 and no call


def _drop_the_input_layer(layers):
    del layers["inner"]["config"]["layers"][0]  # 'inner' is no longer built: its call is node 0


def _drop_a_tensor_index(layers):
    layers["head"]["inbound_nodes"] = [[["inner", 0, {}]]]  # the fourth long run's edit: [name, node, kwargs]


@pytest.mark.parametrize("edit, why", [
    (_drop_the_calls, "'head' reads node 1 of 'inner'"),
    (_drop_the_input_layer, "'head' reads node 1 of 'inner'"),
    (_drop_a_tensor_index, "'head' reads its input through a malformed reference [\"inner\", 0, {}]"),
])
def test_a_layer_graph_tf_keras_never_finishes_is_refused(tmp_path, edit, why):
    """The fuzzer's hangs (issue 29): one JSON edit each (a call list emptied; the
    nested model's InputLayer deleted) leaves 'head' reading node 1 of 'inner',
    which never exists, and tf_keras's load_model re-queues that call forever;
    a reference without its tensor index (the fourth long run) hangs it too."""
    path = _keras2_nested_h5(tmp_path, edit)
    r = runner.invoke(app, ["inspect", str(path)])
    assert_user_error(r, path.name, "layer graph is broken", why)
    # The control: tf_keras itself does not come back (stopped by the bounded runner).
    import tf_keras

    with pytest.raises(bounded.ReaderFailed, match="did not finish"):
        bounded.bounded(lambda: tf_keras.models.load_model(path, compile=False) and None, seconds=5)


def test_layers_reading_each_other_in_a_cycle_are_refused(tmp_path):
    def cycle(layers):
        # 'inner' now reads 'head', which reads 'inner'.
        layers["inner"]["inbound_nodes"] = [[["head", 0, 0, {}]]]

    path = _keras2_nested_h5(tmp_path, cycle)
    assert_user_error(runner.invoke(app, ["scan", str(path)]), "layer graph is broken", "cycle")


def test_the_graph_check_accepts_the_graphs_keras2_writes(tmp_path):
    """No false refusal: shared layers, a nested model called twice, several outputs."""
    import tf_keras

    a, b = tf_keras.Input((4,), name="a"), tf_keras.Input((4,), name="b")
    shared = tf_keras.layers.Dense(4, activation="relu", name="shared")
    inner = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(4)], name="inner")
    ya, yb = inner(shared(a)), inner(shared(b))
    path = tmp_path / "shared.h5"
    tf_keras.Model([a, b], [tf_keras.layers.Add()([ya, yb]), ya], name="m").save(path)
    assert scan.scan(path).errors == []


@pytest.mark.parametrize("layers, broken", [
    ([{"name": ["x"], "class_name": "Dense", "inbound_nodes": []}], True),  # a name that is a list
    ([{"name": "a", "class_name": ["Dense"], "inbound_nodes": [[["a", 0, 0, {}]]]}], True),  # reads itself
    # A class that is a dict (the allow-list walk refuses it) and a reference that is not text (ignored):
    ([{"name": "a", "class_name": {"x": 1}, "inbound_nodes": [{"args": [{"config": {"keras_history": [{}, 0, 0]}}]}]}],
     False),
    ([{"name": "a", "class_name": "Dense", "inbound_nodes": "nodes"}, 7, None], True),  # 'a' has no node 0
    # A node index that is text (compared with an int: TypeError, the long run's finding):
    ([{"name": "a", "class_name": "Dense", "inbound_nodes": [{"args": [{"config": {"keras_history": ["a", "0", 0]}}]}]}],
     False),
])
def test_the_graph_check_reads_any_json_as_data(layers, broken):
    """The graph check itself met mutated configs: a name or class that is a list or
    a dict raised TypeError (unhashable) before it learnt to refuse them."""
    from actswap.safety.graphs import check_graphs

    report = scan.ScanReport("m.h5", "h5")
    check_graphs({"class_name": "Functional", "config": {"layers": layers, "input_layers": [["a", 0, 0]],
                                                        "output_layers": [["a", 0, 0]]}}, report, "model_config")
    assert [f.kind for f in report.errors] == (["damaged"] if broken else [])


def test_a_model_without_outputs_is_refused_before_tf_keras_clones_it(tmp_path):
    """The fuzzer's third hang (issue 29): output_layers emptied. tf_keras loads the
    file; cloning the model (convert's rewrite) re-queues calls forever."""
    path = _keras2_nested_h5(tmp_path, lambda layers: None)
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        config["config"]["output_layers"] = []
        f.attrs["model_config"] = json.dumps(config)
    assert_user_error(runner.invoke(app, ["convert", str(path), "--to", "square"]), path.name,
                      "the model has no outputs")
    # And the rewrite engine refuses such a model itself, whatever loaded it.
    from types import SimpleNamespace

    from actswap.errors import UnsupportedModelError
    from actswap.legacy.engine import _check_cloneable

    with pytest.raises(UnsupportedModelError, match="'m' has no outputs"):
        _check_cloneable(SimpleNamespace(name="m", inputs=[object()], outputs=[]))


def test_a_savedmodel_whose_function_returns_fewer_tensors_than_declared(tmp_path):
    """A fuzzed Keras export() SavedModel (issue 29): its serving function returns no
    tensor while its signature declares one; rewriting it ended in a bare
    StopIteration ('unexpected failure'). Stored as the fuzzer wrote it."""
    import shutil

    path = tmp_path / "export_sm"
    shutil.copytree(DATA / "fuzz_savedmodel_outputs_mismatch", path)
    for command in ("inspect", "convert"):
        args = [command, str(path)] + (["--to", "square", "-o", str(tmp_path / "out_sm")] if command == "convert" else [])
        assert_user_error(runner.invoke(app, args), str(path), "returns 0 tensor(s) but its signature declares 1")
    assert not (tmp_path / "out_sm").exists()


def test_a_refusal_of_a_keras2_savedmodel_names_it(tmp_path):
    """A fuzzed Keras 2 SavedModel whose layer the rewrite cannot rebuild was
    refused (exit 2) without naming the file (issue 29's rule: a refusal names
    it). Stored as the fuzzer wrote it."""
    import shutil

    path = tmp_path / "keras2_sm"
    shutil.copytree(DATA / "fuzz_keras2_savedmodel_restored_layer", path)
    r = runner.invoke(app, ["convert", str(path), "--to", "square", "-o", str(tmp_path / "out_sm")])
    assert_user_error(r, str(path), "restored from the SavedModel graph")


def test_two_layers_of_one_name_are_refused(tmp_path):
    """The fuzzer's fourth hang (issue 29): a Keras 2 .h5 whose InputLayer entry is
    listed twice; tf_keras's rebuild maps calls by layer name and never finishes.
    Stored as the fuzzer wrote it (a construction by hand loaded fine)."""
    path = tmp_path / "dup.h5"
    path.write_bytes((DATA / "fuzz_h5_duplicate_input_layer.h5").read_bytes())
    assert_user_error(runner.invoke(app, ["inspect", str(path)]), path.name, "two layers are named 'input_1'")
    import tf_keras

    with pytest.raises(bounded.ReaderFailed, match="did not finish"):
        bounded.bounded(lambda: tf_keras.models.load_model(path, compile=False) and None, seconds=5)


def test_a_zip_member_name_flagged_utf8_that_is_not_is_a_damaged_archive(tmp_path):
    """The final long run's finding (issue 29): a .keras whose central directory
    flags a member name as UTF-8 while its bytes are not; Python's zipfile raised
    UnicodeDecodeError while opening it ('unexpected failure')."""
    import zipfile

    path = tmp_path / "names.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", CONFIG)
        z.writestr("\u00e9.txt", b"x")  # non-ASCII: written with the UTF-8 flag
    path.write_bytes(path.read_bytes().replace("\u00e9".encode(), b"\x86\x86"))
    with pytest.raises(UnicodeDecodeError):  # the control
        zipfile.ZipFile(path)
    for command in ("scan", "inspect"):
        assert_user_error(runner.invoke(app, [command, str(path)]), path.name, "damaged zip archive")


def test_a_zip_entry_needing_an_unknown_zip_version_is_a_damaged_archive(tmp_path):
    """The fourth long run's finding (issue 29): a .keras whose central directory
    entry asks for zip version 8.4 to extract (a changed byte); Python's zipfile
    raised NotImplementedError('zip file version 8.4') while opening it
    ('unexpected failure')."""
    import struct
    import zipfile

    path = tmp_path / "version.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", CONFIG)
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the central directory entry: version needed to extract at +6
    data[entry + 6: entry + 8] = struct.pack("<H", 84)
    path.write_bytes(bytes(data))
    with pytest.raises(NotImplementedError, match="zip file version 8.4"):  # the control
        zipfile.ZipFile(path)
    for command in (["scan"], ["inspect"], ["convert", "--to", "square"]):
        assert_user_error(runner.invoke(app, [*command, str(path)]), path.name, "damaged zip archive")


def test_a_zip_member_flagged_encrypted_is_a_damaged_member(tmp_path):
    """The same run's finding was in an .npz (tests/test_recover_data.py): a
    member flagged encrypted made zipfile raise RuntimeError ('password
    required for extraction'). A .keras was already safe (its scan reads the
    flag before any member); this holds it so."""
    import zipfile

    path = tmp_path / "encrypted.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", CONFIG)
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the central directory entry: its flags at +8
    data[entry + 8] |= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="password required"):  # the control
        zipfile.ZipFile(path).read("config.json")
    for command in (["scan"], ["inspect"], ["convert", "--to", "square"]):
        assert_user_error(runner.invoke(app, [*command, str(path)]), path.name, "zip member 'config.json' is encrypted")


def test_a_keras3_model_listing_one_input_twice_is_refused(tmp_path, fixtures_dir):
    """The fifth long run's finding (issue 29): the fixture with two inputs, its
    config's input_layers edited to [a, a, b]. Keras 3 loads it; convert's
    clone then failed ('The name "a" is used 2 times', unexpected failure)."""
    import zipfile

    import keras

    src = fixtures_dir / "shared_layer.keras"
    path = tmp_path / "twice.keras"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "config.json":
                config = json.loads(data)
                first = config["config"]["input_layers"][0]
                config["config"]["input_layers"].insert(0, first)
                data = json.dumps(config).encode()
            zout.writestr(info, data)
    # The control: Keras loads it, and cannot rebuild it.
    model = keras.models.load_model(path, safe_mode=True)
    with pytest.raises(ValueError, match="is used 2 times"):
        keras.models.clone_model(model)
    for command in (["scan"], ["convert", "--to", "square"]):
        assert_user_error(runner.invoke(app, [*command, str(path)]), path.name, f"input '{first[0]}' is listed 2 times")


def _savedmodel_with_its_signature_map_edited(tmp: Path, edit) -> Path:
    """A small SavedModel (one ReLU) whose object graph ``edit`` changes."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    module = tf.Module()
    module.w = tf.Variable(tf.ones([3, 2]))
    module.f = tf.function(lambda x: tf.nn.relu(tf.matmul(x, module.w)),
                           input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    path = tmp / "sm"
    tf.saved_model.save(module, str(path), signatures=module.f.get_concrete_function())
    proto = saved_model_pb2.SavedModel()
    pb = path / "saved_model.pb"
    proto.ParseFromString(pb.read_bytes())
    nodes = proto.meta_graphs[0].object_graph_def.nodes
    edit(nodes, next(n for n in nodes if n.user_object.identifier == "signature_map"))
    pb.write_bytes(proto.SerializeToString())
    return path


def _signature_map_as_a_plain_object(nodes, signature_map):
    signature_map.user_object.identifier = "_generic_user_object"


def _signature_as_a_variable(nodes, signature_map):
    signature_map.children[0].node_id = next(i for i, n in enumerate(nodes) if n.HasField("variable"))


@pytest.mark.parametrize("edit, why", [
    (None, ""),
    (_signature_map_as_a_plain_object, "its 'signatures' object is a _UserObject, not a map of signatures"),
    (_signature_as_a_variable, "its signature 'serving_default' is a"),
])
def test_a_savedmodel_whose_signatures_are_not_functions_is_refused(tmp_path, edit, why):
    """The fuzzer's finding at seed 25 (issue 29): a mutated object graph
    restored a SavedModel's ``signatures`` as a plain object, and reading it
    ended in "unexpected failure: TypeError: '_UserObject' object is not
    iterable". Without the edit, the same file converts."""
    path = _savedmodel_with_its_signature_map_edited(tmp_path, edit or (lambda nodes, m: None))
    out = tmp_path / "out_sm"
    for command in ("inspect", "convert"):
        args = [command, str(path)] + (["--to", "square", "-o", str(out)] if command == "convert" else [])
        r = runner.invoke(app, args)
        if edit is None:
            assert r.exit_code == 0, r.output
        else:
            assert_user_error(r, str(path), "corrupt SavedModel", why)
    assert out.exists() == (edit is None)
