"""What convert writes: verified before it is moved into place, never on a
full disk, never a model that computes NaN/Inf unknowingly; float16 warned about.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import assert_user_error, cli_env
from typer.testing import CliRunner

import actswap
from actswap import paths
from actswap.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def small_model(path: Path, kernel: float | None = None, units: int = 4) -> Path:
    keras.utils.set_random_seed(0)
    init = keras.initializers.Constant(kernel) if kernel is not None else "glorot_uniform"
    inp = keras.Input((3,), name="x")
    h = keras.layers.Dense(units, activation="relu", kernel_initializer=init, name="d")(inp)
    if units > 4:  # units x units weights: a file of some size
        h = keras.layers.Dense(units, name="wide")(h)
    keras.Model(inp, keras.layers.Dense(2, name="out")(h)).save(path)
    return path


def test_a_written_file_that_does_not_hold_the_squares_is_not_moved_into_place(tmp_path, monkeypatch):
    """The output is read back before the rename: a writer that wrote the wrong
    model (here: the original) is caught, and nothing is written."""
    src = small_model(tmp_path / "m.keras")
    original = keras.models.load_model(src)
    real_save = keras.Model.save

    def wrong_save(self, filepath, *a, **k):
        return real_save(original, filepath, *a, **k)

    monkeypatch.setattr(keras.Model, "save", wrong_save)
    r = invoke("convert", src, "--to", "square", "-o", tmp_path / "out.keras")
    assert_user_error(r, "the written 'out.keras'", "relu", "nothing written", code=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras"]


def test_disk_space_is_checked_before_writing(tmp_path, monkeypatch):
    src = small_model(tmp_path / "m.keras")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(paths.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    r = invoke("convert", src, "--to", "square", "-o", tmp_path / "out.keras")
    assert_user_error(r, "not enough free space", "nothing was written", code=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras"]


def _tmpfs_run(tmp_path: Path, src: Path, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` with a 256 KB tmpfs mounted at tmp_path/'full' (a private
    mount namespace), then list what is left on it."""
    if not shutil.which("unshare"):
        pytest.skip("unshare not available")
    full = tmp_path / "full"
    full.mkdir()
    (tmp_path / "script.py").write_text(script)
    shell = (
        f"mount -t tmpfs -o size=256k tmpfs {full} || exit 99; "
        f"{sys.executable} {tmp_path / 'script.py'} {src} {full / 'out.keras'}; rc=$?; "
        f"echo LEFT:; ls -A {full}; exit $rc"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", shell], capture_output=True, text=True,
                          timeout=300, env=cli_env())
    if proc.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[-200:]}")
    return proc


def _left(proc: subprocess.CompletedProcess) -> list[str]:
    return proc.stdout.split("LEFT:", 1)[1].split()


def test_a_full_disk_is_refused_before_writing(tmp_path):
    src = small_model(tmp_path / "m.keras", units=512)  # ~1 MB of weights, on 256 KB
    proc = _tmpfs_run(tmp_path, src, "import sys\nfrom actswap.cli import main\n"
                                     "main(['convert', sys.argv[1], '--to', 'square', '-o', sys.argv[2]])\n")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "not enough free space" in err[0] and _left(proc) == []


def test_enospc_while_writing_cleans_up_and_says_so(tmp_path):
    """The disk fills up after the check (as when another process writes): the
    real ENOSPC from the writer is reported in one line and the partial
    temporary file is removed."""
    src = small_model(tmp_path / "m.keras", units=512)
    script = (
        "import sys\nimport actswap.formats.keras_file, actswap.paths\n"
        "actswap.formats.keras_file.ensure_space = lambda *a, **k: None  # the space was there when checked\n"
        "from actswap.cli import main\n"
        "main(['convert', sys.argv[1], '--to', 'square', '-o', sys.argv[2]])\n"
    )
    proc = _tmpfs_run(tmp_path, src, script)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "ran out of disk space" in err[0] and "nothing was written" in err[0]
    assert _left(proc) == []


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "out.keras"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.keras.actswap-{dead.pid}-abc.tmp.keras"
    stale.write_bytes(b"half")
    live = tmp_path / f".out.keras.actswap-{os.getppid()}-def.tmp.keras"
    live.write_bytes(b"someone else's, still writing")
    other = tmp_path / f".other.keras.actswap-{dead.pid}-ghi.tmp.keras"
    other.write_bytes(b"another output's")
    model = keras.models.load_model(small_model(tmp_path / "m.keras"))
    actswap.save(model, out)
    assert not stale.exists() and live.exists() and other.exists() and out.is_file()


def test_nonfinite_outputs_are_written_with_a_recover_warning_and_fail_under_strict(tmp_path):
    src = small_model(tmp_path / "big.keras", kernel=1e20)  # relu: 1e20, finite; x²: 1e40, Inf
    out = tmp_path / "out.keras"
    r = invoke("convert", src, "--to", "square", "-o", out, "--strict")
    assert_user_error(r, "NaN/Inf", "x² overflowed", "nothing written", "actswap recover", code=1)
    assert not out.exists()
    # Without --strict: written, exit 0, one warning line on stderr giving the recover command.
    r = invoke("convert", src, "--to", "square", "-o", out)
    assert r.exit_code == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "x² overflowed" in warnings[0]
    assert f"actswap recover {src} {out} --data" in warnings[0]
    assert out.is_file() and "wrote" in r.stdout
    r = invoke("convert", src, "--to", "poly:0,1,1", "-o", tmp_path / "p.keras", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert "the polynomial overflowed" in data["needs_recovery"] and "x²" not in data["needs_recovery"]
    r = invoke("convert", src, "--to", "square", "-o", out, "--force", "--allow-nonfinite", "--strict", "--json")
    assert r.exit_code == 0, r.stderr
    assert "actswap recover" in json.loads(r.stdout)["needs_recovery"]
    # verify reports it as a failed check, not as success
    r = invoke("verify", src, out, "--json")
    assert r.exit_code == 1
    outputs = next(c for c in json.loads(r.stdout)["checks"] if c["name"] == "outputs")
    assert not outputs["ok"] and "NaN/Inf" in outputs["detail"]


def test_finite_outputs_are_noted(tmp_path):
    src = small_model(tmp_path / "m.keras")
    r = invoke("convert", src, "--to", "square", "-o", tmp_path / "o.keras", "--json")
    assert r.exit_code == 0, r.stderr
    assert "outputs checked on seeded random inputs: all finite" in json.loads(r.stdout)["notes"]


def test_float16_models_are_warned_about(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    try:
        src = small_model(tmp_path / "half.keras")
    finally:
        keras.config.set_dtype_policy("float32")
    r = invoke("convert", src, "--to", "square", "-o", tmp_path / "o.keras", "--json")
    assert r.exit_code == 0, r.stderr
    notes = json.loads(r.stdout)["notes"]
    assert any("computes in float16" in n and "overflows float16" in n for n in notes), notes
    r = invoke("convert", tmp_path / "m_missing.keras", "--to", "square")
    assert r.exit_code == 2
    # and a float32 model is not warned about
    src32 = small_model(tmp_path / "full.keras")
    r = invoke("convert", src32, "--to", "square", "-o", tmp_path / "o32.keras", "--json")
    assert not any("float16" in n for n in json.loads(r.stdout)["notes"])


def test_float16_graph_sites_are_warned_about(tmp_path):
    import tensorflow as tf

    m = tf.Module()
    m.f = tf.function(lambda x: {"y": tf.nn.relu(x) * tf.constant(2.0, tf.float16)},
                      input_signature=[tf.TensorSpec([None, 2], tf.float16, name="x")])
    src = tmp_path / "half_sm"
    tf.saved_model.save(m, str(src), signatures={"serving_default": m.f})
    r = invoke("convert", src, "--to", "square", "-o", tmp_path / "out_sm", "--json")
    assert r.exit_code == 0, r.stderr
    assert any("compute in float16" in n for n in json.loads(r.stdout)["notes"])
    r = invoke("scan", src)
    assert "warning  numerics" in r.stdout and "Relu" in r.stdout
    np.testing.assert_equal(r.exit_code, 0)
