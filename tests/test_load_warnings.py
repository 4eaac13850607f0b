"""Issue 16: what Keras or TensorFlow warns while reading a user's file becomes
actswap notes (in --json too), once each, and nothing of it is printed raw."""

from __future__ import annotations

import json
import warnings

import pytest

from conftest import run_cli

tf_keras = pytest.importorskip("tf_keras")


def _keras2_h5_with_old_arguments(path):
    """A flat Keras 2 .h5 whose config Keras 3 warns about when loading it:
    a layer with input_shape, an optimizer with decay."""
    model = tf_keras.Sequential([
        tf_keras.layers.Dense(4, input_shape=(3,), activation="relu", name="d1"),
        tf_keras.layers.Dense(2, name="d2"),
    ])
    model.compile(optimizer=tf_keras.optimizers.legacy.SGD(learning_rate=0.1, decay=0.01), loss="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf_keras: "HDF5 ... is considered legacy"
        model.save(path, save_format="h5")
    return path


def test_loading_warnings_become_notes(tmp_path):
    src = _keras2_h5_with_old_arguments(tmp_path / "old.h5")
    r = run_cli("convert", src, "--to", "square", "--json")
    assert r.returncode == 0, r.stderr
    notes = json.loads(r.stdout)["notes"]
    warned = [n for n in notes if "warned:" in n]
    assert any("Do not pass an `input_shape`" in n for n in warned), notes
    assert any("`decay` is no longer supported" in n for n in warned), notes
    assert len(warned) == len(set(warned))  # once each
    assert "UserWarning" not in r.stderr and "input_shape" not in r.stderr and "decay" not in r.stderr

    r = run_cli("convert", src, "--to", "square", "-o", tmp_path / "table.keras")
    assert r.returncode == 0, r.stderr
    assert "UserWarning" not in r.stderr and "input_shape" not in r.stderr
    assert "note: Keras, loading the file, warned: Do not pass an `input_shape`" in r.stdout.replace("\n", " ")
