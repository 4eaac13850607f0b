"""Bad and hostile inputs: each is refused with exit 2, one line on stderr that
names what was received, no traceback, nothing written, and, for the inputs
that carry code, proof that the code did not run (the marker file its payload
writes is absent; where cheap, a control shows the payload is live).

Every case goes through the real command line (``convert``, then ``inspect``
and ``scan`` where they apply); builders make each input inside ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_user_error, cli_env, run_cli
from typer.testing import CliRunner

from actswap import scan
from actswap.cli import app

runner = CliRunner()
MARKER = "marker.txt"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def tree(root: Path) -> list[str]:
    """Every path under ``root`` (files and directories), to prove nothing was written."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- model builders -------------------------------------------------------------


def keras_model(path: Path, name: str = "plain") -> Path:
    keras.utils.set_random_seed(0)
    inp = keras.Input((3,), name="x")
    h = keras.layers.Dense(3, activation="relu", name="d")(inp)
    keras.Model(inp, keras.layers.Dense(1, name="out")(h), name=name).save(path)
    return path


def keras_config(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("config.json"))


def rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes] | None = None, extra=()) -> Path:
    """Copy a .keras archive member by member, replacing some and appending ``extra`` (name, data)."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, replace.get(info.filename, zin.read(info)))
        for name, data in extra:
            zout.writestr(name, data)
    return dst


def keras_lambda_nested(tmp: Path) -> Path:
    """A .keras whose Lambda (Python bytecode that writes the marker) sits two models deep."""
    marker = str(tmp / MARKER)
    evil = keras.layers.Lambda(lambda t: (open(marker, "w").write("ran"), t)[1], name="evil")
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="relu", name="d"), evil], name="inner")
    middle = keras.Sequential([keras.Input((3,)), inner], name="middle")
    inp = keras.Input((3,), name="x")
    path = tmp / "lambda_nested.keras"
    keras.Model(inp, keras.layers.Dense(1, name="out")(middle(inp)), name="top").save(path)
    (tmp / MARKER).unlink(missing_ok=True)  # building the model ran the lambda once, here
    return path


def keras_lambda_top(tmp: Path) -> Path:
    marker = str(tmp / MARKER)
    inp = keras.Input((2,), name="x")
    out = keras.layers.Lambda(lambda t: (open(marker, "w").write("ran"), t * 2)[1], name="evil")(inp)
    path = tmp / "lambda_top.keras"
    keras.Model(inp, out).save(path)
    (tmp / MARKER).unlink(missing_ok=True)
    return path


def keras2_lambda_nested(tmp: Path, fmt: str) -> Path:
    """Keras 2 (tf_keras) model, Lambda two models deep: tf_keras runs its bytecode
    on load even with safe_mode=True."""
    import tf_keras

    L = tf_keras.layers
    marker = str(tmp / MARKER)
    tf_keras.utils.set_random_seed(0)
    inner = tf_keras.Sequential([
        L.InputLayer(input_shape=(3,)), L.Dense(3, activation="relu", name="d"),
        L.Lambda(lambda t: (open(marker, "w").write("ran"), t)[1], name="evil"),
    ], name="inner")
    middle = tf_keras.Sequential([L.InputLayer(input_shape=(3,)), inner], name="middle")
    x = tf_keras.Input((3,), name="x")
    model = tf_keras.Model(x, L.Dense(1, name="out")(middle(x)), name="top")
    path = tmp / ("lambda_nested.hdf5" if fmt == "h5" else "lambda_nested_sm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(str(path), save_format="h5" if fmt == "h5" else "tf")
    (tmp / MARKER).unlink(missing_ok=True)
    return path


class _WritesOnLoad(tf.saved_model.experimental.TrackableResource):
    """A resource whose initializer writes a file: TF runs it inside tf.saved_model.load."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self._marker = marker

    def _create_resource(self):
        return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="")

    def _initialize(self):
        tf.io.write_file(self._marker, "ran")
        tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=1.0)


def savedmodel(tmp: Path, kind: str) -> Path:
    """A SavedModel whose graph reaches outside the model (``kind``), with a ReLU to convert."""
    marker = str(tmp / MARKER)
    m = tf.Module()
    m.w = tf.Variable(tf.ones([2, 2]))
    if kind == "write_file_initializer":
        m.res = _WritesOnLoad(marker)
        body = lambda x: tf.nn.relu(x @ m.w)  # noqa: E731
    elif kind == "read_file":
        body = lambda x: tf.nn.relu(x @ m.w) + tf.cast(tf.strings.length(tf.io.read_file("/etc/hostname")), tf.float32) * 0.0  # noqa: E731
    elif kind == "eager_py_func":
        def body(x):
            y = tf.py_function(lambda t: (open(marker, "w").write("ran"), t)[1], [x], tf.float32)
            return tf.nn.relu(tf.reshape(y, [-1, 2]) @ m.w)
    elif kind == "matching_files":
        body = lambda x: tf.nn.relu(x @ m.w) + tf.cast(tf.size(tf.io.matching_files("/etc/*")), tf.float32) * 0.0  # noqa: E731
    else:
        raise ValueError(kind)
    m.f = tf.function(lambda x: {"y": body(x)}, input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
    path = tmp / f"{kind}_sm"
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.f})
    (tmp / MARKER).unlink(missing_ok=True)
    return path


def graphdef_writing_a_file(tmp: Path) -> Path:
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
        y = tf.nn.relu(x, name="y")
        tf.io.write_file(str(tmp / MARKER), "ran", name="evil")
    path = tmp / "evil.pb"
    path.write_bytes(g.as_graph_def().SerializeToString())
    del y
    return path


def zip_bomb(tmp: Path) -> Path:
    """A valid model archive plus a member that inflates 1000x (64 MB of zeros from ~64 KB)."""
    path = rewrite_zip(keras_model(tmp / "base.keras"), tmp / "bomb.keras")
    (tmp / "base.keras").unlink()
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z, z.open("assets/bomb.bin", "w") as f:
        chunk = b"\0" * (1 << 20)
        for _ in range(64):
            f.write(chunk)
    return path


def h5_model(tmp: Path, name: str = "model.h5") -> Path:
    keras.utils.set_random_seed(0)
    inp = keras.Input((3,), name="x")
    model = keras.Model(inp, keras.layers.Dense(2, activation="relu", name="d")(inp))
    path = tmp / name
    model.save(path)
    return path


def h5_with(tmp: Path, kind: str) -> Path:
    path = h5_model(tmp, f"{kind}.h5")
    (tmp / "other.h5").write_bytes(b"")
    with h5py.File(path, "r+") as f:
        if kind == "external_link":
            f["evil"] = h5py.ExternalLink("/etc/hostname", "/")
        elif kind == "virtual_dataset":
            layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
            layout[:] = h5py.VirtualSource(str(tmp / "other.h5"), "data", shape=(4,))
            f.create_virtual_dataset("vds", layout)
        else:
            f.create_dataset("ext", shape=(4,), dtype="f4", external=[(str(tmp / "other.bin"), 0, 16)])
    return path


def keras_with_config(tmp: Path, edit: Callable[[dict], None], name: str) -> Path:
    base = keras_model(tmp / "base.keras")
    config = keras_config(base)
    edit(config)
    path = rewrite_zip(base, tmp / name, {"config.json": json.dumps(config).encode()})
    base.unlink()
    return path


def _set_first_layer(config: dict, layer: dict) -> None:
    config["config"]["layers"][1] = layer


# --- the cases ------------------------------------------------------------------
# name -> (builder(tmp) -> args after "convert", fragments of the error line,
#          whether the input carries code (marker), run inspect/scan too)


def _missing(t):
    return [t / "missing.keras"]


def _empty_dir(t):
    (t / "empty").mkdir()
    return [t / "empty"]


def _dir_without_pb(t):
    d = t / "not_a_savedmodel"
    (d / "variables").mkdir(parents=True)
    (d / "variables" / "variables.index").write_bytes(b"x")
    return [d]


def _keras_holding_h5(t):
    path = t / "lies.keras"
    shutil.move(h5_model(t), path)
    return [path]


def _h5_holding_zip(t):
    path = t / "lies.h5"
    shutil.move(keras_model(t / "m.keras"), path)
    return [path]


def _truncated(t):
    path = keras_model(t / "whole.keras")
    data = path.read_bytes()
    cut = t / "truncated.keras"
    cut.write_bytes(data[: len(data) // 2])
    path.unlink()
    return [cut]


def _dotdot_member(t):
    path = rewrite_zip(keras_model(t / "base.keras"), t / "dotdot.keras", extra=[("../escape.txt", b"x")])
    (t / "base.keras").unlink()
    return [path]


def _absolute_member(t):
    path = rewrite_zip(keras_model(t / "base.keras"), t / "absolute.keras", extra=[("/tmp/escape.txt", b"x")])
    (t / "base.keras").unlink()
    return [path]


def _duplicate_member(t):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile: "Duplicate name"
        path = rewrite_zip(keras_model(t / "base.keras"), t / "dup.keras", extra=[("config.json", b"{}")])
    (t / "base.keras").unlink()
    return [path]


def _invalid_json(t):
    path = t / "badjson.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", "{not json")
    return [path]


def _deep_json(t):
    path = t / "deep.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", '{"class_name": "Functional", "config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return [path]


def _weights_only_h5(t):
    path = t / "weights.h5"
    with h5py.File(path, "w") as f:
        f["dense/kernel"] = np.zeros((3, 3), "float32")
    return [path]


def _module_os(t):
    layer = {"module": "os", "class_name": "system", "config": {"name": "evil", "command": f"touch {t / MARKER}"}}
    return [keras_with_config(t, lambda c: _set_first_layer(c, layer), "module_os.keras")]


def _unknown_class(t):
    layer = {"module": "keras.layers", "class_name": "NoSuchLayer", "config": {"name": "ghost"}}
    return [keras_with_config(t, lambda c: _set_first_layer(c, layer), "unknown.keras")]


def _tfsmlayer(t):
    sm = savedmodel(t, "write_file_initializer")
    inp = keras.Input((2,), name="x")
    out = keras.layers.TFSMLayer(str(sm), call_endpoint="serving_default", name="smuggled")(inp)
    path = t / "tfsm.keras"
    keras.Model(inp, out).save(path)
    (t / MARKER).unlink(missing_ok=True)  # building the layer loaded the SavedModel, here
    return [path]


def _fifo(t):
    os.mkfifo(t / "pipe.keras")
    return [t / "pipe.keras"]


def _dev_zero(t):
    (t / "zero.keras").symlink_to("/dev/zero")
    return [t / "zero.keras"]


def _symlink_out_of_savedmodel(t):
    sm = t / "sm"
    m = _relu_module()
    tf.saved_model.save(m, str(sm), signatures={"serving_default": m.f})
    (sm / "assets").mkdir(exist_ok=True)
    (sm / "assets" / "vocab.txt").symlink_to("/etc/hostname")
    return [sm]


def _fifo_in_savedmodel(t):
    sm = t / "sm"
    tf.saved_model.save(_relu_module(), str(sm), signatures=None)
    os.mkfifo(sm / "assets_fifo")
    return [sm]


def _relu_module():
    m = tf.Module()
    m.w = tf.Variable(tf.ones([2, 2]))
    m.f = tf.function(lambda x: tf.nn.relu(x @ m.w), input_signature=[tf.TensorSpec([None, 2], tf.float32)])
    return m


def _output_is_input(t):
    path = keras_model(t / "m.keras")
    return [path, "-o", path, "--force"]


def _output_inside_savedmodel(t):
    sm = t / "sm"
    m = _relu_module()
    tf.saved_model.save(m, str(sm), signatures={"serving_default": m.f})
    return [sm, "-o", sm / "converted", "--force"]


def _text_file(t):
    (t / "notes.keras").write_text("this is not a model\n")
    return [t / "notes.keras"]


def _empty_file(t):
    (t / "empty.keras").write_bytes(b"")
    return [t / "empty.keras"]


def _zip_without_config(t):
    with zipfile.ZipFile(t / "hello.keras", "w") as z:
        z.writestr("hello.txt", "hi")
    return [t / "hello.keras"]


def _bad_output_extension(t):
    return [keras_model(t / "m.keras"), "-o", t / "m.square.h5"]


def _corrupt_saved_model_pb(t):
    (t / "sm").mkdir()
    (t / "sm" / "saved_model.pb").write_bytes(b"\x00garbage\xff" * 10)
    return [t / "sm"]


def _no_signatures(t):
    sm = t / "nosig"
    tf.saved_model.save(tf.Module(), str(sm))
    return [sm]


CASES: dict[str, tuple[Callable, tuple[str, ...], bool, bool]] = {
    "missing": (_missing, ("no such file", "missing.keras"), False, True),
    "empty_dir": (_empty_dir, ("not a SavedModel", "empty"), False, True),
    "dir_without_saved_model_pb": (_dir_without_pb, ("no saved_model.pb",), False, True),
    "keras_name_holding_hdf5": (_keras_holding_h5, ("holds an HDF5 file", "rename it to lies.h5"), False, True),
    "h5_name_holding_zip": (_h5_holding_zip, ("holds a Keras 3 zip archive", "rename it to lies.keras"), False, True),
    "hdf5_name_keras2_lambda_nested": (
        lambda t: [keras2_lambda_nested(t, "h5")], ("Lambda at 'middle/inner/evil'", "--trust-code"), True, True),
    "truncated_keras": (_truncated, ("damaged zip archive", "truncated"), False, True),
    "zip_bomb": (lambda t: [zip_bomb(t)], ("assets/bomb.bin", "zip bomb"), False, True),
    "zip_member_dotdot": (_dotdot_member, ("'../escape.txt'", "'..'"), False, True),
    "zip_member_absolute": (_absolute_member, ("'/tmp/escape.txt'", "absolute path"), False, True),
    "zip_member_duplicate": (_duplicate_member, ("'config.json' appears twice",), False, True),
    "invalid_config_json": (_invalid_json, ("config.json is not valid JSON",), False, True),
    "deeply_nested_config_json": (_deep_json, ("config.json is nested 100001 levels deep",), False, True),
    "h5_weights_only": (_weights_only_h5, ("without a Keras model config", "weights.h5"), False, True),
    "keras_lambda_top_level": (lambda t: [keras_lambda_top(t)], ("Lambda at 'evil'", "carries code"), True, True),
    "keras_lambda_two_models_deep": (
        lambda t: [keras_lambda_nested(t)], ("Lambda at 'middle/inner/evil'", "config.layers[1].config.layers"),
        True, True),
    "keras2_savedmodel_lambda_nested": (
        lambda t: [keras2_lambda_nested(t, "savedmodel")], ("Lambda at 'middle/inner/evil'",), True, True),
    "module_os": (_module_os, ("'system' from module 'os'", "'evil'"), True, True),
    "unknown_class": (_unknown_class, ("unknown class 'NoSuchLayer'", "'ghost'"), True, True),
    "tfsmlayer_in_keras": (_tfsmlayer, ("TFSMLayer at 'smuggled'",), True, True),
    "savedmodel_write_file_initializer": (
        lambda t: [savedmodel(t, "write_file_initializer")], ("op WriteFile", "__inference__initializer"), True, True),
    "savedmodel_read_file": (lambda t: [savedmodel(t, "read_file")], ("op ReadFile (reads a file)",), True, True),
    "savedmodel_eager_py_func": (
        lambda t: [savedmodel(t, "eager_py_func")], ("op EagerPyFunc (runs Python code)",), True, True),
    "savedmodel_matching_files": (
        lambda t: [savedmodel(t, "matching_files")], ("op MatchingFiles (lists files on disk)",), True, True),
    "savedmodel_symlink_out": (_symlink_out_of_savedmodel, ("symlink 'assets/vocab.txt' leads out",), False, True),
    "savedmodel_fifo_inside": (_fifo_in_savedmodel, ("'assets_fifo' is not a regular file",), False, True),
    "savedmodel_no_signatures": (_no_signatures, ("has no signatures",), False, True),
    "graphdef_write_file": (lambda t: [graphdef_writing_a_file(t)], ("op WriteFile", "graph node 'evil'"), True, True),
    "h5_external_link": (lambda t: [h5_with(t, "external_link")], ("external link", "/etc/hostname"), False, True),
    "h5_virtual_dataset": (lambda t: [h5_with(t, "virtual_dataset")], ("virtual dataset",), False, True),
    "h5_external_storage": (lambda t: [h5_with(t, "external_storage")], ("external file(s)", "other.bin"), False, True),
    "fifo_named_keras": (_fifo, ("not a regular file", "pipe.keras"), False, True),
    "symlink_to_dev_zero": (_dev_zero, ("not a regular file", "zero.keras"), False, True),
    "text_file": (_text_file, ("not a model file", "notes.keras"), False, True),
    "empty_file": (_empty_file, ("empty file", "empty.keras"), False, True),
    "zip_without_config_json": (_zip_without_config, ("no config.json",), False, True),
    "savedmodel_corrupt_pb": (_corrupt_saved_model_pb, ("saved_model.pb is not a valid SavedModel",), False, True),
    "output_bad_extension": (_bad_output_extension, ("must end in .keras",), False, False),
    "output_equal_to_input": (_output_is_input, ("is the input",), False, False),
    "output_inside_savedmodel_input": (_output_inside_savedmodel, ("inside the input SavedModel",), False, False),
}


def _invoke_bounded(*args, seconds: float = 120):
    """Invoke in a thread so that a regression that blocks (a FIFO) fails instead of hanging."""
    box = {}
    t = threading.Thread(target=lambda: box.update(r=invoke(*args)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"actswap {' '.join(map(str, args))} blocked"
    return box["r"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_with_one_line_and_nothing_written(tmp_path, name):
    build, fragments, carries_code, others = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    args = build(work)
    marker = work / MARKER
    assert not marker.exists()
    before = tree(tmp_path)
    r = _invoke_bounded("convert", *args, "--to", "square")
    assert_user_error(r, *fragments)
    assert tree(tmp_path) == before, "something was written"
    if others:
        assert_user_error(_invoke_bounded("inspect", args[0]), *fragments)
        if name != "savedmodel_no_signatures":
            assert_user_error(_invoke_bounded("scan", args[0]), *fragments)
        assert tree(tmp_path) == before
    if carries_code:
        assert not marker.exists(), "the file's code ran"


def test_enough_distinct_bad_inputs():
    assert len(CASES) >= 20


def test_controls_the_payloads_are_live(tmp_path):
    """Without actswap in the way, the hostile files do run their code: the
    marker checks above can fail."""
    sm = savedmodel(tmp_path, "write_file_initializer")
    tf.saved_model.load(str(sm))
    assert (tmp_path / MARKER).exists(), "tf.saved_model.load did not run the initializer"
    (tmp_path / MARKER).unlink()
    path = keras_lambda_nested(tmp_path)
    keras.saving.load_model(path, safe_mode=False)
    assert (tmp_path / MARKER).exists(), "loading the Lambda did not run it"


def test_trust_code_lets_code_through_loudly_but_never_a_malformed_file(tmp_path):
    sm = savedmodel(tmp_path, "matching_files")
    out = tmp_path / "out_sm"
    r = invoke("convert", sm, "--to", "square", "-o", out, "--trust-code")
    assert r.exit_code == 0, r.stderr
    assert "WARNING: --trust-code" in r.stderr and "MatchingFiles" in r.stderr and out.is_dir()
    dotdot = _dotdot_member(tmp_path)[0]
    r = invoke("convert", dotdot, "--to", "square", "--trust-code")
    assert r.exit_code == 2 and "--trust-code does not override this" in r.stderr


def test_unreadable_file(tmp_path):
    """Permission denied, in a real process (as root, inside a user namespace
    where the file's owner has no override)."""
    path = keras_model(tmp_path / "secret.keras")
    path.chmod(0)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        if not shutil.which("unshare"):
            pytest.skip("running as root without unshare: cannot make a file unreadable")
        prefix = ("unshare", "--map-user=1000", "--map-group=1000")
        probe = subprocess.run([*prefix, "cat", str(path)], capture_output=True)
        if probe.returncode == 0 or b"ermission denied" not in probe.stderr:
            pytest.skip("user namespaces unavailable: cannot make a file unreadable to root")
    before = tree(tmp_path)
    r = run_cli("convert", path, "--to", "square", prefix=prefix, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert ("permission denied" in lines[0] or "not readable" in lines[0]) and "secret.keras" in lines[0]
    assert tree(tmp_path) == before


def test_model_without_relu_writes_nothing_unless_forced(tmp_path, fixtures_dir):
    src = tmp_path / "no_relu.keras"
    shutil.copy(fixtures_dir / "no_relu.keras", src)
    r = invoke("convert", src, "--to", "square")
    assert r.exit_code == 0, r.stderr
    assert "nothing to replace" in r.stdout and tree(tmp_path) == ["no_relu.keras"]
    r = invoke("convert", src, "--to", "square", "--json")
    data = json.loads(r.stdout)
    assert data["output"] is None and any("nothing to replace" in n for n in data["notes"])
    r = invoke("convert", src, "--to", "square", "--force")
    assert r.exit_code == 0 and (tmp_path / "no_relu.square.keras").is_file()


def test_scan_command_reports_and_json(tmp_path, fixtures_dir):
    r = invoke("scan", fixtures_dir / "mnist_cnn.keras", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["ok"] and data["format"] == "keras" and data["findings"] == []
    assert any("CRC" in c for c in data["checked"]) and any("allow-list" in c for c in data["checked"])
    path = keras_lambda_nested(tmp_path)
    r = invoke("scan", path, "--json")
    assert r.exit_code == 2
    data = json.loads(r.stdout)
    (finding,) = data["findings"]
    assert finding["severity"] == "error" and finding["kind"] == "code" and finding["where"] == "middle/inner/evil"
    assert len(r.stderr.strip().splitlines()) == 1


def test_scan_warns_about_float16(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    try:
        path = keras_model(tmp_path / "half.keras")
    finally:
        keras.config.set_dtype_policy("float32")
    r = invoke("scan", path)
    assert r.exit_code == 0
    assert "warning  numerics" in r.stdout and "mixed_float16" in r.stdout and "overflows float16" in r.stdout


def test_scan_never_imports_tensorflow(tmp_path):
    sm = savedmodel(tmp_path, "read_file")
    code = (
        "import sys\nfrom actswap import scan\n"
        f"r = scan.scan({str(sm)!r})\n"
        "assert any('ReadFile' in f.message for f in r.errors), r.findings\n"
        "print('TF' if 'tensorflow' in sys.modules or 'keras' in sys.modules else 'clean')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=cli_env())
    assert out.stdout.strip().splitlines()[-1] == "clean", out.stderr


def test_zip_members_overlapping_are_a_bomb(tmp_path):
    """A non-recursive zip bomb: two central-directory entries share one local file's data."""
    src = keras_model(tmp_path / "m.keras")
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        infos = z.infolist()
    # Point the second central-directory entry at the first member's local header.
    cd = data.find(b"PK\x01\x02", data.find(b"PK\x01\x02") + 4)
    data[cd + 42: cd + 46] = infos[0].header_offset.to_bytes(4, "little")
    bad = tmp_path / "overlap.keras"
    bad.write_bytes(bytes(data))
    messages = [f.message for f in scan.scan(bad).errors]
    assert any("overlap" in m for m in messages), messages


def test_polyglot_zip_and_hdf5_is_refused(tmp_path):
    h5 = h5_model(tmp_path, "m.h5").read_bytes()
    zipped = keras_model(tmp_path / "m.keras").read_bytes()
    poly = tmp_path / "poly.h5"
    poly.write_bytes(h5 + zipped)  # an HDF5 file with a zip appended: both parsers accept it
    assert zipfile.is_zipfile(poly)
    messages = [f.message for f in scan.scan(poly).errors]
    assert any("polyglot" in m for m in messages), messages
