"""SavedModels (generic tf.Module and Keras 3 model.export()) and frozen GraphDefs.

Each converted SavedModel is reloaded in a fresh process where actswap cannot
be imported, and its outputs and gradients (for every variable) are compared
with an independent reference: the original TF code re-traced with
``tf.nn.relu`` patched to x² (for clip:C, a stop_gradient formulation of the
clipped derivative, not tf.custom_gradient).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close, relu_as_square
from typer.testing import CliRunner

import actswap
from actswap.cli import app
from cases import CASES, sample_inputs
from tf_cases import SIGNATURE_SITES, ControlFlowModule

CHILD = Path(__file__).with_name("sm_child.py")
runner = CliRunner()


def run_child(directory: Path, inputs: dict, tmp_path: Path) -> tuple[dict, dict]:
    np.savez(tmp_path / "in.npz", **inputs)
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(directory), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary.pop("actswap_imported") is False
    return summary, dict(np.load(tmp_path / "out.npz"))


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sm") / "control_flow"
    m = ControlFlowModule()
    tf.saved_model.save(m, str(d), signatures=m.signatures())
    return d


def reference(grad: str, x: np.ndarray, weights: dict[str, np.ndarray]):
    ref = ControlFlowModule()
    out, grads = {}, {}
    with relu_as_square(grad):
        for name, fn in ref.signatures().items():
            kw = {"x": x} if name == "serving_default" else {"a": x}
            with tf.GradientTape() as tape:
                tape.watch(ref.bias)  # non-trainable: watched explicitly, as the child does
                res = fn(**{k: tf.constant(v) for k, v in kw.items()})
                loss = tf.add_n([tf.reduce_sum(v * weights[f"w:{name}/{k}"]) for k, v in sorted(res.items())])
            g = tape.gradient(loss, [ref.w1, ref.w2, ref.bias])
            out[name] = {k: v.numpy() for k, v in res.items()}
            grads[name] = {"w1": g[0], "w2": g[1], "bias": g[2]}
    return out, grads


@pytest.mark.parametrize("grad", ["exact", "clip:0.5"])
def test_tf_module_with_control_flow_and_two_signatures(module_dir, tmp_path, grad):
    out_dir = tmp_path / "converted"
    r = runner.invoke(app, ["convert", str(module_dir), "--to", "square", "--grad", grad, "-o", str(out_dir), "--json"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    per_sig = {}
    for s in report["sites"]:
        if s["action"] == "replaced":
            sig = s["path"].split("/")[0]
            per_sig[sig] = per_sig.get(sig, 0) + 1
    # The module's own function `inner` is carried over too (issue 16): saving traced it
    # again, so its ReLU is an op of a function of its own in the file, one more site.
    assert per_sig == {**SIGNATURE_SITES, "inner": 1}
    assert [s["activation"] for s in report["sites"] if s["action"] == "skipped"] == ["relu6"]
    forms = {s["path"].split("/")[2] for s in report["sites"]
             if s["action"] == "replaced" and s["path"].split("/")[0] in SIGNATURE_SITES}
    assert forms == {"inner", "cond", "while"}

    x = np.random.default_rng(0).uniform(-0.2, 1.0, (3, 4)).astype("float32")  # sum > 0: then-branch
    rng = np.random.default_rng(1)
    weights = {
        "w:serving_default/y": rng.standard_normal((3, 4)).astype("float32"),
        "w:serving_default/capped": rng.standard_normal((3, 4)).astype("float32"),
        "w:second/out": rng.standard_normal((3, 4)).astype("float32"),
    }
    summary, got = run_child(out_dir, {"serving_default/x": x, "second/a": x, **weights}, tmp_path)
    ref_out, ref_grads = reference(grad, x, weights)
    for sig in ("serving_default", "second"):
        assert summary[sig]["trainable"] == ["w1:0", "w2:0"] or sig == "second"
        assert ("bias:0", False) in [tuple(v) for v in summary[sig]["all"]] or sig == "second"
        assert summary[sig]["step_changed"]
        for k, v in ref_out[sig].items():
            assert_close(got[f"{sig}/out/{k}"], v)
        for var in ("w1", "w2", "bias"):
            key = f"{sig}/grad/{var}"
            if key in got:
                assert_close(got[key], ref_grads[sig][var].numpy(), rtol=1e-5)
    # Every variable each signature uses has its gradient checked.
    assert {k for k in got if "/grad/" in k} == {
        "serving_default/grad/w1", "serving_default/grad/w2", "serving_default/grad/bias", "second/grad/w1",
    }

    # The else-branch, in this process: reload and compare once more.
    x_neg = -np.abs(x)
    loaded = tf.saved_model.load(str(out_dir))
    ref_module = ControlFlowModule()  # kept referenced: its tf.functions hold it weakly
    with relu_as_square(grad):
        ref = ref_module.main(tf.constant(x_neg))
    assert_close(loaded.signatures["serving_default"](x=tf.constant(x_neg))["y"], ref["y"])


def test_variables_are_bit_identical_copies(module_dir, tmp_path):
    converted, _ = actswap.convert(module_dir)
    out = actswap.save(converted, tmp_path / "c")
    lo_a, lo_b = tf.saved_model.load(str(module_dir)), tf.saved_model.load(str(out))
    original, new = lo_a.signatures["serving_default"], lo_b.signatures["serving_default"]
    a = {v.name: (v.numpy().tobytes(), v.trainable) for v in original.variables}
    b = {v.name: (v.numpy().tobytes(), v.trainable) for v in new.variables}
    assert a == b


def test_signature_option_restricts_the_rewrite(module_dir, tmp_path):
    out = tmp_path / "only_second"
    r = runner.invoke(app, ["convert", str(module_dir), "--to", "square", "--signature", "second", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    sites = json.loads(r.stdout)["sites"]
    assert {s["path"].split("/")[0] for s in sites if s["action"] == "replaced"} == {"second"}
    assert all("signature not selected" in s["reason"] for s in sites if s["path"].startswith("serving_default") and s["activation"] == "relu")
    r = runner.invoke(app, ["convert", str(module_dir), "--to", "square", "--signature", "nope", "-o", str(tmp_path / "n")])
    assert r.exit_code == 2 and "'nope' is not in" in r.stderr


def test_inspect_lists_relu_nodes_per_signature(module_dir):
    r = runner.invoke(app, ["inspect", str(module_dir), "--json"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    # 5 in the signatures, 1 in the module's function `inner`, a function of its own in the file
    assert data["counts"] == {"relu": 6, "relu6": 1}
    assert sum(s["replaceable"] for s in data["sites"]) == 6


@pytest.mark.parametrize("writer", ["model.export", "tf.saved_model.save"])
def test_keras_model_savedmodel(tmp_path, writer):
    model, expected = CASES["functional_forms"]()
    export_dir = tmp_path / "exported"
    if writer == "model.export":
        model.export(str(export_dir), verbose=False)
    else:
        tf.saved_model.save(model, str(export_dir))
    converted, report = actswap.convert(export_dir, grad="clip:1")
    sigs = {s.path.split("/")[0] for s in report.sites if s.action == "replaced"}
    assert report.replaced == expected["replaced"] * len(sigs)
    out = actswap.save(converted, tmp_path / "exported.square")
    x = sample_inputs(model)
    lo_export = tf.saved_model.load(str(export_dir))
    w = np.random.default_rng(2).standard_normal(model.output.shape[1:]).astype("float32")
    feeds = {}
    for name, fn in lo_export.signatures.items():  # Keras exports "serve" and "serving_default"
        (arg,) = fn.structured_input_signature[1]
        (out_key,) = fn.structured_outputs
        feeds.update({f"{name}/{arg}": x, f"w:{name}/{out_key}": w})
    summary, got = run_child(out, feeds, tmp_path)
    with relu_as_square("clip:1"):
        with tf.GradientTape() as tape:
            y = model(x, training=False)
            loss = tf.reduce_sum(y * w)
        ref_grads = tape.gradient(loss, model.trainable_weights)
    assert_close(got["serving_default/out/output_0"], y.numpy())
    assert summary["serving_default"]["step_changed"]
    # Match each reloaded variable to the Keras weight it copies (same bytes;
    # weights whose bytes are not unique, e.g. zero biases, are left out).
    counts: dict[bytes, int] = {}
    for wt in model.trainable_weights:
        counts[wt.numpy().tobytes()] = counts.get(wt.numpy().tobytes(), 0) + 1
    by_bytes = {
        wt.numpy().tobytes(): g for wt, g in zip(model.trainable_weights, ref_grads)
        if counts[wt.numpy().tobytes()] == 1
    }
    lo = tf.saved_model.load(str(export_dir))
    originals = lo.signatures["serving_default"].trainable_variables
    matched = 0
    for var in originals:
        key = f"serving_default/grad/{var.name.split(':')[0]}"
        if key in got and var.numpy().tobytes() in by_bytes:
            assert_close(got[key], by_bytes[var.numpy().tobytes()].numpy(), rtol=1e-5)
            matched += 1
    assert matched >= 2


def frozen_graph(path: Path) -> tuple[str, str]:
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    m = ControlFlowModule()
    fn = m.second.get_concrete_function()
    frozen = convert_variables_to_constants_v2(fn)
    path.write_bytes(frozen.graph.as_graph_def().SerializeToString())
    return frozen.inputs[0].name, frozen.outputs[0].name


def run_graphdef(path: Path, feed: str, fetch: str, x: np.ndarray) -> np.ndarray:
    gd = tf.compat.v1.GraphDef()
    gd.ParseFromString(path.read_bytes())
    with tf.Graph().as_default() as g:
        tf.graph_util.import_graph_def(gd, name="")
        with tf.compat.v1.Session(graph=g) as sess:
            return sess.run(fetch, {feed: x})


def test_frozen_graphdef(tmp_path):
    src = tmp_path / "frozen.pb"
    feed, fetch = frozen_graph(src)
    r = runner.invoke(app, ["convert", str(src), "--to", "square", "--json"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["replaced"] == 1 and data["output"].endswith("frozen.square.pb")
    assert any("not trainable" in n for n in data["notes"])
    x = np.random.default_rng(0).uniform(-1, 1, (2, 4)).astype("float32")
    got = run_graphdef(Path(data["output"]), feed, fetch, x)
    ref_module = ControlFlowModule()
    with relu_as_square():
        ref = ref_module.second(tf.constant(x))["out"].numpy()
    assert_close(got, ref)
    ops = [n.op for n in tf.compat.v1.GraphDef.FromString(Path(data["output"]).read_bytes()).node]
    assert "Relu" not in ops and "Square" in ops


# Bad SavedModels (empty, corrupt, no signatures, hostile ops) are in test_bad_inputs.py.


def test_savedmodel_to_keras_output_is_refused(module_dir, tmp_path):
    r = runner.invoke(app, ["convert", str(module_dir), "--to", "square", "-o", str(tmp_path / "x.keras")])
    assert r.exit_code == 2 and "SavedModel directory" in r.stderr


def test_private_tf_api_still_works():
    """Fails loudly when a TF upgrade moves the internals actswap relies on."""
    from actswap import tf_private

    assert tf_private.tf_version_tested(), f"TF {tf.__version__} is not a tested version: rerun this suite"

    @tf.function
    def f(x):
        return tf.nn.relu(x) * 2.0

    cf = f.get_concrete_function(tf.TensorSpec([2]))
    fdef = cf.function_def
    g = tf_private.function_def_to_graph(fdef)
    assert [op.type for op in g.get_operations()].count("Relu") == 1
    v = tf.Variable(1.0)

    @tf.function(autograph=False)
    def h():
        tf_private.mark_variable_accessed(v)
        graph = tf.compat.v1.get_default_graph()
        relu = next(op for op in g.get_operations() if op.type == "Relu")
        out = tf_private.create_op(
            graph, "Relu", [tf.constant([-1.0, 3.0])], [tf.float32], dict(relu.node_def.attr), relu.op_def
        )
        return out.outputs[0]

    np.testing.assert_array_equal(h().numpy(), [0.0, 3.0])

    # freeze: the variables chosen become Placeholders (never read), the rest constants.
    w, b = tf.Variable(tf.ones([3, 4])), tf.Variable(tf.fill([4], 0.5))

    @tf.function(input_signature=[tf.TensorSpec([None, 3])])
    def lin(x):
        return tf.matmul(x, w) + b

    graph_def, left = tf_private.freeze(lin.get_concrete_function(), lambda v: len(v.shape) == 2)
    nodes = {n.name: n for n in graph_def.node}
    (name, var), = left.items()
    assert var is w and nodes[name].op == "Placeholder"
    assert [d.size for d in nodes[name].attr["shape"].shape.dim] == [3, 4]
    consts = [n for n in graph_def.node if n.op == "Const" and n.attr["value"].tensor.dtype == tf.float32.as_datatype_enum]
    assert [tf.make_ndarray(n.attr["value"].tensor).tolist() for n in consts] == [[0.5] * 4]
