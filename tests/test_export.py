"""ONNX export with proven parity, and `actswap verify`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
import tensorflow as tf
from conftest import relu_as_square
from typer.testing import CliRunner

import actswap
from actswap.cli import app
from actswap.export import Parity, compare, export_onnx, run_onnx
from actswap.onnx_build import non_standard_ops

runner = CliRunner()


def mnist_sample(tmp_path: Path) -> Path | None:
    import mnist

    if not mnist.available():
        return None
    data = mnist.load()
    path = tmp_path / "sample.npz"
    np.savez(path, x=data["x_test"][:64])
    return path


def test_fixture_cnn_exports_with_squares_as_mul_and_parity(tmp_path, fixtures_dir):
    converted, report = actswap.convert(fixtures_dir / "mnist_cnn.keras")
    out = tmp_path / "cnn.onnx"
    r = export_onnx(converted, out)  # default: seeded random inputs, tolerance 1e-5
    assert r.parity.ok and r.parity.max_rel <= 1e-5
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Relu") == 0 and ops.count("Pow") == 0
    assert ops.count("Mul") == report.replaced == 3  # conv1, relu2, relu3: one Mul(x, x) each
    # Independently of the exporter's own check: onnxruntime vs the TF model, on
    # real digits when available. x² doubles relative rounding differences at
    # each square (measured here: 1.2e-5 on 64 MNIST test images), so real data
    # gets a 1e-4 bound.
    sample = mnist_sample(tmp_path)
    x = np.load(sample)["x"] if sample else np.random.default_rng(0).uniform(0, 1, (8, 28, 28, 1)).astype("float32")
    got = run_onnx(model, [x])[0]
    ref = converted.predict(x, verbose=0)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_unconverted_keras_file_exports_too(tmp_path, fixtures_dir):
    r = runner.invoke(app, ["export", str(fixtures_dir / "mnist_cnn.keras"), str(tmp_path / "relu.onnx"), "--json"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["relu_nodes"] == 3 and data["parity"]["ok"]


def test_convert_with_onnx_writes_both_and_reports_parity(tmp_path, fixtures_dir):
    out, onnx_out = tmp_path / "c.keras", tmp_path / "c.onnx"
    r = runner.invoke(app, [
        "convert", str(fixtures_dir / "mnist_cnn.keras"), "--to", "square", "-o", str(out),
        "--onnx", str(onnx_out), "--json",
    ])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert out.is_file() and onnx_out.is_file()
    assert data["onnx"]["parity"]["ok"] and data["onnx"]["pow_nodes"] == 0 and data["onnx"]["mul_nodes"] == 3


def test_savedmodel_converted_by_actswap_exports(tmp_path):
    from tf_cases import ControlFlowModule

    m = ControlFlowModule()
    src = tmp_path / "sm"
    tf.saved_model.save(m, str(src), signatures={"serving_default": m.second})
    converted, report = actswap.convert(src)
    out = actswap.save(converted, tmp_path / "sm.square")
    r = runner.invoke(app, ["export", str(out), str(tmp_path / "sm.onnx"), "--json"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["relu_nodes"] == 0 and data["pow_nodes"] == 0 and data["parity"]["ok"]
    x = np.random.default_rng(0).uniform(-1, 1, (2, 4)).astype("float32")
    got = run_onnx(onnx.load(str(tmp_path / "sm.onnx")), [x])[0]
    fresh = ControlFlowModule()  # m.second is already traced with ReLU; a fresh one traces under the patch
    with relu_as_square():
        ref = fresh.second(tf.constant(x))["out"].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_tf_only_op_is_refused_naming_it(tmp_path):
    class Zeta(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def f(self, x):
            return {"y": tf.math.zeta(tf.nn.relu(x) + 2.0, x * x + 1.0)}

    z = Zeta()
    src = tmp_path / "zeta"
    tf.saved_model.save(z, str(src), signatures={"serving_default": z.f})
    out = tmp_path / "z.onnx"
    r = runner.invoke(app, ["export", str(src), str(out)])
    assert r.exit_code == 1, (r.stdout, r.stderr)
    assert "Zeta" in r.stderr and "not standard ONNX" in r.stderr
    assert not out.exists()


def test_non_standard_ops_sees_nested_graphs():
    from onnx import helper

    inner = helper.make_graph([helper.make_node("MyTfOp", ["a"], ["b"])], "g", [], [])
    node = helper.make_node("If", ["c"], ["d"], then_branch=inner, else_branch=inner)
    model = helper.make_model(helper.make_graph([node], "top", [], []))
    found = non_standard_ops(model)
    assert len(found) == 2 and all("MyTfOp" in f for f in found)


def test_overflow_is_reported_as_nan_inf_not_as_an_error_figure(tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    x = keras.layers.Dense(4, activation="relu", kernel_initializer=keras.initializers.Constant(1e6))(inp)
    x = keras.layers.Dense(4, activation="relu", kernel_initializer=keras.initializers.Constant(1e6))(x)
    converted, _ = actswap.convert(keras.Model(inp, keras.layers.Dense(2)(x)))
    out = tmp_path / "big.onnx"
    with pytest.raises(actswap.ActswapError, match="NaN/Inf") as e:
        export_onnx(converted, out)
    assert e.value.report.parity.max_rel is None and "TensorFlow output 0" in e.value.report.parity.nonfinite
    assert not out.exists()


def test_parity_failure_exit_1_json_has_figures_and_nothing_written(tmp_path, fixtures_dir, monkeypatch):
    import actswap.export as ex

    real = ex.run_onnx
    monkeypatch.setattr(ex, "run_onnx", lambda proto, inputs: [o * 1.01 for o in real(proto, inputs)])
    out = tmp_path / "off.onnx"
    r = runner.invoke(app, ["export", str(fixtures_dir / "sequential_dense.keras"), str(out), "--json"])
    assert r.exit_code == 1 and not out.exists()
    data = json.loads(r.stdout)
    assert data["parity"]["ok"] is False and data["parity"]["max_rel"] > 1e-5 and "differs" in data["error"]


def test_compare_figures():
    a = [np.array([1.0, -2.0, 4.0], "float32")]
    p = compare(a, [a[0] + np.array([0, 0, 4e-5], "float32")], 1e-5, 1)
    assert p.max_abs == pytest.approx(4e-5, rel=1e-2) and p.max_rel == pytest.approx(1e-5, rel=1e-2)
    assert compare(a, [a[0]], 1e-5, 1).ok and not Parity(None, None, 1e-5, 1, "x").ok


# --- ResNet50 and the tf2onnx workaround -------------------------------------------


@pytest.fixture(scope="module")
def resnet50():
    from test_applications import tame

    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), include_top=False, pooling="avg")
    x = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype("float32")
    tame(model, x)
    converted, report = actswap.convert(model)
    return converted, report, x


@pytest.mark.slow
def test_resnet50_exports_structurally_and_runs(resnet50, tmp_path):
    from actswap.export import check_graph, tf_callable
    from actswap.onnx_build import build

    converted, report, x = resnet50
    call, keep = tf_callable(converted)
    # build + check_graph, not export_onnx: 49 squares deep, onnxruntime and TF
    # part ways (chaotically, as DESIGN.md records: 0.36 apart at the 16th
    # square here, NaN at the end where TF is finite), so no parity proof holds.
    path, size = build(call, tmp_path, "r50.onnx", None, False)
    proto = check_graph(path)  # checker (full) and the standard-op check
    ops = [n.op_type for n in proto.graph.node]
    assert report.replaced == 49 and size < 100 * 2**20 and not (tmp_path / "r50.onnx.data").exists()
    assert ops.count("Relu") == 0 and ops.count("Pow") == 0 and ops.count("Mul") == 49
    # Batch norms folded into the convolutions, as TF's constant folding did
    # before the weights left the converter: no Mul but the squares, one
    # Transpose (the input's), an Add per residual join only.
    assert ops.count("Conv") == 53 and ops.count("Transpose") == 1 and ops.count("Add") == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r50.onnx"]  # the raw files are gone
    out = run_onnx(path, [x])[0]  # the workaround: onnxruntime accepts the graph
    assert out.shape == (2, 2048)


@pytest.mark.slow
def test_tf2onnx_workaround_is_still_needed(resnet50, tmp_path, monkeypatch):
    """When this fails, tf2onnx fixed Mul(t, t) in its transpose optimizer:
    delete actswap/tf2onnx_fixes.py and this test."""
    import contextlib

    import actswap.tf2onnx_fixes as fixes
    from actswap.errors import ConversionError

    converted, _, x = resnet50
    monkeypatch.setattr(fixes, "patched", contextlib.nullcontext)
    with pytest.raises(ConversionError, match="onnxruntime (could not optimise|cannot run)") as e:
        export_onnx(converted, tmp_path / "unfixed.onnx")
    assert "channels" in str(e.value) or "NCHWc" in str(e.value), e.value
    assert list(tmp_path.iterdir()) == []  # not even the staging directory


# --- verify ----------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path, fixtures_dir):
    original = tmp_path / "orig.keras"
    shutil.copy(fixtures_dir / "functional_forms.keras", original)
    converted, _ = actswap.convert(original)
    return original, converted, tmp_path


def test_verify_passes_a_good_conversion_with_onnx(pair):
    original, converted, tmp = pair
    conv_path = actswap.save(converted, tmp / "conv.keras")
    export_onnx(converted, tmp / "conv.onnx")
    r = runner.invoke(app, ["verify", str(original), str(conv_path), "--onnx", str(tmp / "conv.onnx"), "--json"])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    data = json.loads(r.stdout)
    assert data["ok"] and sorted(data["replaced"]) == ["act_fn", "act_str", "conv", "relu_layer"]
    assert [c["name"] for c in data["checks"]] == ["sites", "weights", "outputs", "onnx"]


def test_verify_names_a_changed_weight(pair):
    original, converted, tmp = pair
    w = converted.get_layer("conv2").kernel
    w.assign(w.numpy() + np.eye(1, w.numpy().size).reshape(w.shape).astype("float32"))  # one value
    conv_path = actswap.save(converted, tmp / "bad.keras")
    r = runner.invoke(app, ["verify", str(original), str(conv_path), "--json"])
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    weights = next(c for c in data["checks"] if c["name"] == "weights")
    assert not weights["ok"] and "conv2" in weights["detail"] and "1 value" in weights["detail"]
    assert "weights" in r.stderr


def test_verify_names_a_relu_left_behind(pair, tmp_path):
    from actswap import registry
    from actswap.report import REPLACED, SKIPPED
    from actswap.rewrite import rewrite
    from actswap.sites import find_sites

    original, _, tmp = pair
    model = keras.models.load_model(original)
    # An incomplete conversion, made with the engine directly: every ReLU but act_str.
    t = registry.get_target("square")
    s2 = find_sites(model)
    for s in s2:
        s.action = REPLACED if (s.activation == "relu" and s.path != "act_str") else SKIPPED
    partial = rewrite(model, s2, lambda site, node: t.layer("exact", name=node["config"]["name"]), lambda site, owner: t.activation("exact"))
    path = actswap.save(partial, tmp / "partial.keras")
    r = runner.invoke(app, ["verify", str(original), str(path), "--json"])
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["failed"] == ["sites"]
    assert any("'act_str': relu left" in d for d in data["differences"])
