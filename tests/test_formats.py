"""Format detection from content, the pre-load scan, and legacy .h5 input."""

from __future__ import annotations

import json
import shutil
import zipfile

import h5py
import numpy as np
import pytest
from conftest import assert_close, relu_as_square

import actswap
from actswap import scan
from actswap.errors import UnsafeModelError, UserError
from actswap.formats import Format, detect
from cases import CASES, sample_inputs


def test_detection_ignores_the_extension(tmp_path, fixtures_dir):
    disguised = tmp_path / "model.h5"
    shutil.copy(fixtures_dir / "no_relu.keras", disguised)
    assert detect(disguised) is Format.KERAS
    model, _ = CASES["sequential_dense"]()
    h5 = tmp_path / "model.keras.bin"
    model.save(tmp_path / "m.h5")
    shutil.move(tmp_path / "m.h5", h5)
    assert detect(h5) is Format.H5


def test_legacy_h5_converts_to_keras_with_parity(tmp_path):
    model, expected = CASES["functional_forms"]()
    src = tmp_path / "forms.h5"
    model.save(src)
    converted, report = actswap.convert(src)
    assert report.replaced == expected["replaced"]
    x = sample_inputs(model)
    with relu_as_square():
        ref = model(x)
    assert_close(converted(x), ref)
    out = actswap.save(converted, tmp_path / "forms.square.keras")
    assert detect(out) is Format.KERAS


def _h5_with_config(path, config):
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config)


@pytest.mark.parametrize(
    "layer, fragment",
    [
        ({"class_name": "Lambda", "config": {"name": "evil", "function": "..."}}, "Lambda at 'outer/evil'"),
        ({"class_name": "TFSMLayer", "config": {"name": "sm"}}, "TFSMLayer"),
        ({"module": "os", "class_name": "system", "config": {"name": "x"}}, "module 'os'"),
    ],
)
def test_scan_refuses_code_at_any_depth(tmp_path, layer, fragment):
    nested = {
        "class_name": "Functional",
        "config": {"name": "top", "layers": [{"class_name": "Sequential", "config": {"name": "outer", "layers": [layer]}}]},
    }
    findings = scan.find_unsafe(nested)
    assert len(findings) == 1 and fragment in findings[0]
    path = tmp_path / "evil.h5"
    _h5_with_config(path, nested)
    with pytest.raises(UnsafeModelError, match="refusing to load"):
        actswap.load(path)


def test_scan_accepts_every_fixture(fixtures_dir):
    for path in sorted(fixtures_dir.glob("*.keras")):
        assert scan.find_unsafe(scan.read_config(path, Format.KERAS)) == [], path


def test_h5_without_model_config_is_a_user_error(tmp_path):
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as f:
        f["w"] = np.zeros(3)
    with pytest.raises(UserError, match="without a Keras model config"):
        detect(path)


def test_keras_zip_with_bad_config_json_is_a_load_error(tmp_path):
    path = tmp_path / "bad.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", "{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        actswap.load(path)


def test_keras_zip_with_unloadable_config_is_a_load_error(tmp_path):
    # A Keras class the scan allows, with a config Keras cannot build (no units).
    path = tmp_path / "bad.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", json.dumps({"class_name": "Dense", "module": "keras.layers", "config": {"name": "n"}}))
    with pytest.raises(UserError, match="could not load"):
        actswap.load(path)
