"""The CLI: thin over the API; exit codes, one-line errors, atomic output.

Bad and hostile inputs are in test_bad_inputs.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import pytest
from conftest import assert_user_error
from typer.testing import CliRunner

import actswap
from actswap.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def model_file(tmp_path, fixtures_dir):
    dst = tmp_path / "forms.keras"
    shutil.copy(fixtures_dir / "functional_forms.keras", dst)
    return dst


def test_convert_default_output_table_and_summary(model_file):
    before = model_file.read_bytes()
    r = invoke("convert", model_file, "--to", "square")
    assert r.exit_code == 0, r.stderr
    out = model_file.with_name("forms.square.keras")
    assert out.is_file() and model_file.read_bytes() == before
    assert "replaced 4, skipped 3 (2 ReLU-like); wrote" in r.stdout
    for path in ("act_str", "relu6_layer", "dense_relu6", "probs"):
        assert path in r.stdout
    assert [s.activation for s in actswap.inspect(out).sites].count("square") == 4


def test_convert_json_is_one_object_with_the_documented_keys(model_file, tmp_path):
    out = tmp_path / "o.keras"
    r = invoke("convert", model_file, "--to", "square", "-o", out, "--json", "--grad", "clip:2")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["replaced"] == 4 and data["skipped"] == 3 and data["output"] == str(out)
    assert data["grad"] == "clip:2"
    for site in data["sites"]:
        assert {"path", "layer", "form", "activation", "action", "reason"} <= set(site)
    forms = {s["form"] for s in data["sites"] if s["action"] == "replaced"}
    assert forms == {"activation=", "Activation layer", "ReLU layer"}
    assert keras.models.load_model(out).get_layer("relu_layer").grad == "clip:2"


def test_inspect_json_lists_every_activation(model_file):
    r = invoke("inspect", model_file, "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    acts = sorted((s["path"], s["activation"], s["replaceable"]) for s in data["sites"])
    assert acts == [
        ("act_fn", "relu", True), ("act_str", "relu", True), ("conv", "relu", True),
        ("dense_relu6", "relu6", False), ("probs", "softmax", False),
        ("relu6_layer", "relu6", False), ("relu_layer", "relu", True),
    ]
    assert data["counts"] == {"relu": 4, "relu6": 2, "softmax": 1}
    assert list(model_file.parent.iterdir()) == [model_file]  # inspect writes nothing


def test_strict_fails_and_writes_nothing_when_relu_like_sites_are_skipped(model_file, tmp_path):
    out = tmp_path / "strict.keras"
    r = invoke("convert", model_file, "--to", "square", "-o", out, "--strict")
    assert r.exit_code == 1 and not out.exists()
    assert "--strict: 2 ReLU-like" in r.stderr


def test_strict_passes_when_only_non_relu_sites_are_skipped(tmp_path, fixtures_dir):
    # Nothing to replace: exit 0 and nothing written, unless --force asks for a copy.
    out = tmp_path / "s.keras"
    r = invoke("convert", fixtures_dir / "no_relu.keras", "--to", "square", "-o", out, "--strict")
    assert r.exit_code == 0 and not out.exists()
    r = invoke("convert", fixtures_dir / "no_relu.keras", "--to", "square", "-o", out, "--strict", "--force")
    assert r.exit_code == 0 and out.is_file()


def test_refuses_to_overwrite_without_force_and_keeps_the_file(model_file, tmp_path):
    out = tmp_path / "exists.keras"
    out.write_bytes(b"precious")
    r = invoke("convert", model_file, "--to", "square", "-o", out)
    assert_user_error(r, "already exists", "--force")
    assert out.read_bytes() == b"precious"
    r = invoke("convert", model_file, "--to", "square", "-o", out, "--force")
    assert r.exit_code == 0 and zipfile.is_zipfile(out)


def test_refuses_output_equal_to_input(model_file):
    before = model_file.read_bytes()
    r = invoke("convert", model_file, "--to", "square", "-o", model_file, "--force")
    assert_user_error(r, "is the input")
    assert model_file.read_bytes() == before


def test_bad_options_are_exit_2_one_line(model_file, capsys):
    from actswap.cli import main

    for args, fragment in [
        (["convert", str(model_file), "--to", "cube"], "unknown target 'cube'"),
        (["convert", str(model_file), "--to", "square", "--grad", "clip:-3"], "clip"),
        (["convert", str(model_file)], "Missing option '--to'"),
        (["convert", str(model_file), "--to", "square", "--bogus"], "No such option: --bogus"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and fragment in err[0], (args, err)


def test_debug_shows_the_traceback(tmp_path):
    r = invoke("--debug", "convert", tmp_path / "missing.keras", "--to", "square")
    assert r.exit_code != 0 and r.exception is not None


def test_interrupted_save_leaves_no_partial_file_and_keeps_the_old_one(model_file, tmp_path, monkeypatch):
    out = tmp_path / "keep.keras"
    out.write_bytes(b"old good file")

    def interrupted_save(self, filepath, *a, **k):
        Path(filepath).write_bytes(b"half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save", interrupted_save)
    r = invoke("convert", model_file, "--to", "square", "-o", out, "--force")
    assert r.exit_code == 130 and "interrupted" in r.stderr
    assert out.read_bytes() == b"old good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forms.keras", "keep.keras"]


def test_help_and_version_do_not_import_tensorflow():
    code = (
        "import sys; from actswap.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "try:\n    main(['--version'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print('TF' if 'tensorflow' in sys.modules or 'keras' in sys.modules else 'clean')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "clean", out.stderr


def test_real_subprocess_of_the_installed_script(tmp_path, fixtures_dir):
    out = tmp_path / "n.keras"
    proc = subprocess.run(
        ["actswap", "convert", str(fixtures_dir / "nested.keras"), "--to", "square", "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "replaced 5, skipped 0" in proc.stdout
    assert proc.stderr.strip() == "", proc.stderr  # TF start-up banners kept off stderr
    bad = subprocess.run(
        ["actswap", "convert", str(tmp_path / "nope.keras"), "--to", "square"],
        capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    version = subprocess.run(["actswap", "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"actswap {actswap.__version__}"
