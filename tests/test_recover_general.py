"""Issue 27: recovery for any model, with or without labels.

One small model with three heads (a dict: a softmax class head, a linear
regression head, a sigmoid multi-label head) is trained here on a synthetic
task; it is recovered label-free, with labels and targets, starved, and
through the CLI. The references are independent: the losses are recomputed
with numpy, and the gate's figures from the models' own predictions.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from typer.testing import CliRunner

import actswap
from actswap import recover as R
from actswap.cli import app
from actswap.errors import RecoveryFailedError, UserError
from actswap.recover import metrics as M
from actswap.recover import outputs as O
from conftest import assert_user_error

runner = CliRunner()
L = keras.layers


def _task(n: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3 * n, 8)).astype("float32")
    x[:, 2:5] += 0.5 * np.sign(x[:, 2:5])  # the bits' inputs keep clear of their threshold
    w = np.random.default_rng(99).normal(size=(8, 3))
    z = np.sort(x @ w, -1)
    x = x[z[:, -1] - z[:, -2] > 0.5][:n]  # and the classes clear of their boundaries
    return x, {
        "cls": np.argmax(x @ w, -1),
        # A target a polynomial network can represent (|x| would leave a floor of error).
        "reg": (0.5 * x[:, :1] * x[:, 1:2] + x[:, 5:6]).astype("float32"),
        "bits": (x[:, 2:5] > 0).astype("float32"),
    }


@pytest.fixture(scope="module")
def model():
    x, y = _task(1024, 0)
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    h = L.Dense(32, activation="relu", name="h1")(inp)
    h = L.Dense(32, activation="relu", name="h2")(h)
    m = keras.Model(inp, {"cls": L.Dense(3, activation="softmax", name="c")(h), "reg": L.Dense(1, name="r")(h),
                          "bits": L.Dense(3, activation="sigmoid", name="b")(h)})
    m.compile(keras.optimizers.Adam(3e-3), loss={"cls": "sparse_categorical_crossentropy", "reg": "mse",
                                                 "bits": "binary_crossentropy"})
    m.fit(x, y, epochs=40, batch_size=64, verbose=0)
    return m


def _recover(model, data, **kw):
    converted, _ = actswap.convert(model)
    options = dict(epochs=3, batch_size=32, learning_rate=3e-3)
    return R.recover(model, converted, data, **{**options, **kw})


def test_the_loss_follows_each_output(model):
    x, y = _task(4, 1)
    heads = O.heads_of(model, model, model(x))
    assert [(h.name, h.activation, h.loss) for h in heads] == [
        ("bits", "sigmoid", "binary_kl"), ("cls", "softmax", "kl"), ("reg", "linear", "mse")]
    assert all(not h.labelled for h in heads)
    # The mse scale is the original's output variance.
    assert heads[2].variance == pytest.approx(float(np.var(np.asarray(model(x)["reg"]))))
    # Logits with integer class labels are a classifier; with real targets, a regression.
    logits = keras.Sequential([keras.Input((8,)), L.Dense(4)])
    assert O.heads_of(logits, logits, logits(x), np.array([1]))[0].loss == "kl"
    assert O.heads_of(logits, logits, logits(x), np.zeros((1, 4), "float32"))[0].loss == "mse"
    assert O.heads_of(logits, logits, logits(x))[0].loss == "mse"
    # --loss overrides, for all outputs or by name; unknown names and kinds are refused.
    assert [h.loss for h in O.heads_of(model, model, model(x), losses={"reg": "kl"})] == ["binary_kl", "kl", "kl"]
    assert O.parse_losses("reg=mse,cls=kl") == {"reg": "mse", "cls": "kl"}
    with pytest.raises(UserError, match="the model's outputs are"):
        O.heads_of(model, model, model(x), losses={"box": "mse"})
    with pytest.raises(UserError, match="unknown loss 'l1'"):
        O.parse_losses("l1")
    with pytest.raises(UserError, match="one label array for 3 model outputs"):
        O.heads_of(model, model, model(x), y["cls"])


def test_each_loss_equals_a_numpy_computation():
    rng = np.random.default_rng(2)
    t, s = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    head = O.Head("o", 0, "linear", "kl", False, False, variance=2.5)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    pt, ps = softmax(t / 4), softmax(s / 4)
    want = 16 * np.sum(pt * (np.log(pt) - np.log(ps)), -1)
    np.testing.assert_allclose(O.LOSSES["kl"].distil(t, s, head, 4.0), want, rtol=1e-5)
    labels = np.array([0, 1, 2, 3, 0])
    np.testing.assert_allclose(O.LOSSES["kl"].fit(labels, s, head), -np.log(softmax(s)[np.arange(5), labels]), rtol=1e-5)
    np.testing.assert_allclose(O.LOSSES["mse"].distil(t, s, head, 4.0), np.mean((s - t) ** 2, -1) / 2.5, rtol=1e-6)
    probs = O.Head("o", 0, "sigmoid", "binary_kl", True, True)
    p, q = 1 / (1 + np.exp(-t)), 1 / (1 + np.exp(-s))
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    np.testing.assert_allclose(O.LOSSES["binary_kl"].distil(p, q, probs, 4.0), kl.mean(-1), rtol=1e-4, atol=1e-6)
    bits = (t > 0).astype("float32")
    bce = -(bits * np.log(q) + (1 - bits) * np.log(1 - q))
    np.testing.assert_allclose(O.LOSSES["binary_kl"].fit(bits, q, probs), bce.mean(-1), rtol=1e-4)


def test_the_distiller_uses_labels_where_given_and_the_teachers_top1_classes_without():
    from actswap.recover.training import Distiller, per_example_loss

    keras.utils.set_random_seed(1)
    teacher = keras.Sequential([keras.Input((3,)), L.Dense(4, activation="softmax")])
    student = keras.Sequential([keras.Input((3,)), L.Dense(4, activation="softmax")])
    distiller = Distiller(student, teacher, temperature=4.0, alpha=0.5)
    x = np.random.default_rng(3).normal(size=(6, 3)).astype("float32")
    y = np.array([0, 1, 2, 3, 0, 1])
    t, s = np.log(teacher.predict(x, verbose=0)), np.log(student.predict(x, verbose=0))

    def kl(temperature):
        def softmax(z):
            e = np.exp(z - z.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)
        p, q = softmax(t / temperature), softmax(s / temperature)
        return temperature**2 * np.sum(p * np.log(p / q), -1)

    ce = -s[np.arange(6), y]
    np.testing.assert_allclose(per_example_loss(distiller, x, y, training=False), 0.5 * kl(4) + 0.5 * ce, rtol=1e-4)
    # Without labels: the same mix, the teacher's top-1 classes as the labels.
    top1 = t.argmax(-1)
    assert len(set(top1)) > 1  # not one class everywhere: the labels matter
    np.testing.assert_allclose(per_example_loss(distiller, x, None, training=False),
                               0.5 * kl(4) + 0.5 * -s[np.arange(6), top1], rtol=1e-4)
    # pseudo_labels=False: distillation alone, at label_free_temperature.
    alone = Distiller(student, teacher, temperature=4.0, alpha=0.5, pseudo_labels=False, label_free_temperature=2.0)
    np.testing.assert_allclose(per_example_loss(alone, x, None, training=False), kl(2), rtol=1e-4)


def test_a_dict_output_model_recovers_from_a_dataset_of_inputs_only(model, tmp_path):
    x, y = _task(1024, 3)
    xv, yv = _task(256, 4)
    train = tf.data.Dataset.from_tensor_slices(x).shuffle(1024, seed=0).batch(32)
    recovered, history = _recover(model, train, val=tf.data.Dataset.from_tensor_slices(xv).batch(64))
    # Structure: the same outputs, every ReLU now a square.
    assert set(recovered(xv[:2])) == {"cls", "reg", "bits"}
    assert actswap.inspect(recovered).counts().get("relu", 0) == 0
    assert [h.loss for h in history.heads] == ["binary_kl", "kl", "mse"]
    # The gate's figures, recomputed from the models' predictions.
    figures = {o["output"]: o for o in history.check["outputs"]}
    a, b = model.predict(xv, verbose=0), recovered.predict(xv, verbose=0)
    assert figures["cls"]["metric"] == "top-1 agreement"
    assert figures["cls"]["recovered"] == pytest.approx(np.mean(a["cls"].argmax(-1) == b["cls"].argmax(-1)))
    rel = {k: np.sqrt(np.mean((b[k] - a[k]) ** 2)) / np.std(a[k]) for k in ("reg", "bits")}
    assert figures["reg"]["recovered"] == pytest.approx(rel["reg"], rel=1e-4)
    assert figures["bits"]["metric"] == "relative error against the original"
    assert figures["bits"]["recovered"] == pytest.approx(rel["bits"], rel=1e-4)
    assert figures["cls"]["recovered"] >= 0.98 and max(rel.values()) <= 0.25
    assert all(o["passed"] for o in figures.values())
    # ... and it is better than the plain swap on every output.
    assert figures["cls"]["converted"] < figures["cls"]["recovered"]
    assert all(figures[k]["converted"] > rel[k] for k in rel)
    # Round trip: saved, reloaded, the same outputs; it trains.
    path = actswap.save(recovered, tmp_path / "r.keras")
    again = keras.models.load_model(path)
    for k in a:
        np.testing.assert_allclose(again.predict(xv, verbose=0)[k], b[k], rtol=1e-5, atol=1e-6)
    again.compile("adam", loss={"cls": "sparse_categorical_crossentropy", "reg": "mse", "bits": "binary_crossentropy"})
    assert np.all(np.isfinite(again.train_on_batch(xv[:32], {k: v[:32] for k, v in yv.items()})))


def test_labels_and_targets_are_used_and_checked(model):
    x, y = _task(1024, 5)
    recovered, history = _recover(model, (x, y), max_error=1.0)
    assert [h.labelled for h in history.heads] == [True, True, True]
    figures = {o["output"]: o for o in history.check["outputs"]}
    assert [figures[k]["metric"] for k in ("cls", "reg", "bits")] == [
        "top-1 accuracy", "MSE against the targets", "IoU against the labels"]
    xc, yc = x[-102:], {k: v[-102:] for k, v in y.items()}  # the held-out tenth it was checked on
    pred = recovered.predict(xc, verbose=0)
    assert figures["reg"]["recovered"] == pytest.approx(np.mean((pred["reg"] - yc["reg"]) ** 2), rel=1e-4)
    assert figures["cls"]["recovered"] == pytest.approx(np.mean(pred["cls"].argmax(-1) == yc["cls"]))
    on, want = pred["bits"] > 0.5, yc["bits"] > 0.5
    assert figures["bits"]["recovered"] == pytest.approx(np.sum(on & want) / np.sum(on | want))


@pytest.mark.parametrize("labels", [True, False])
def test_a_starved_recovery_fails_naming_the_output_and_the_metric(model, labels):
    x, y = _task(256, 6)
    with pytest.raises(RecoveryFailedError, match=r"on the check data \(output '\w+', loss \w+\)") as e:
        _recover(model, (x, y) if labels else x, epochs=1, learning_rate=1e-9, fit=False, labels=labels)
    failed = [o for o in e.value.result["outputs"] if not o["passed"]]
    assert failed and e.value.result["samples"] == 25
    assert all((o["metric"] in M.METRICS) and (M.METRICS[o["metric"]].labels == labels) for o in failed)


def test_the_gate_judges_each_metric_by_its_limit():
    m = M.METRICS
    limits = M.Limits(max_drop=1.0, max_disagreement=2.0, max_error=0.25)
    assert m["top-1 accuracy"].judge(0.95, 0.945, limits) == "" and m["top-1 accuracy"].judge(0.95, 0.93, limits)
    assert m["top-1 agreement"].judge(1.0, 0.985, limits) == "" and m["top-1 agreement"].judge(1.0, 0.975, limits)
    # IoU: a mask predicted empty scores 0 where agreement per unit would have been the empty share.
    head = O.Head("m", 0, "sigmoid", "binary_kl", True, True)
    mask = np.zeros((4, 10)); mask[:, :2] = 1
    iou = m["IoU against the labels"]
    assert iou.value(iou.sums(np.zeros((4, 10)), None, mask, head)) == 0.0
    assert iou.value(iou.sums(mask * 0.9, None, mask, head)) == 1.0
    assert m["MSE against the targets"].judge(0.2, 0.24, limits) == ""
    assert "30.0% more" in m["MSE against the targets"].judge(0.2, 0.26, M.Limits(max_error=0.1))
    assert m["relative error against the original"].judge(0.0, 0.2, limits) == ""
    assert m["relative error against the original"].judge(0.0, float("nan"), limits)  # NaN fails
    assert m["top-1 accuracy"].judge(0.95, 0.0, M.Limits(max_drop=None)) == ""  # None: not checked


def test_cli_label_free_and_regression_runs_and_a_starved_one(model, tmp_path):
    path = tmp_path / "m.keras"
    reg = keras.Model(model.input, model.get_layer("r").output)  # a one-output regression model
    reg.save(path)
    x, y = _task(1024, 7)
    np.savez(tmp_path / "xonly.npz", x=x)
    np.savez(tmp_path / "targets.npz", x=x, y=y["reg"])
    common = ["--to", "square", "--epochs", "6", "--batch-size", "32", "--lr", "3e-3", "--json"]
    for data, metric in (("xonly.npz", "relative error against the original"), ("targets.npz", "MSE against the targets")):
        out = tmp_path / f"{data}.keras"
        r = runner.invoke(app, ["recover", str(path), "--data", str(tmp_path / data), "-o", str(out), *common])
        assert r.exit_code == 0, r.stderr[-1500:]
        result = json.loads(r.stdout)
        assert result["losses"] == {"r": "mse"} and result["outputs"][0]["metric"] == metric
        assert result["outputs"][0]["passed"] and out.is_file() and result["recovered_accuracy"] is None
    # Starved: exit 1, one error line naming the output and the metric, nothing written.
    out = tmp_path / "starved.keras"
    r = runner.invoke(app, ["recover", str(path), "--data", str(tmp_path / "xonly.npz"), "-o", str(out),
                            "--to", "square", "--epochs", "1", "--lr", "1e-9", "--plain", "--max-error", "0.05", "--json"])
    assert_user_error(r, "relative error against the original", "output 'r'", "--max-error", "nothing written", code=1)
    assert not out.exists() and not json.loads(r.stdout)["outputs"][0]["passed"]
    # Labels ignored on request; nothing to train on is refused before anything runs.
    r = runner.invoke(app, ["recover", str(path), "--data", str(tmp_path / "targets.npz"), "--no-labels",
                            "--no-distill", "-o", str(out)])
    assert_user_error(r, "--no-distill", "--no-labels")


def test_cli_a_starved_multi_output_recovery_exits_1_naming_each_failing_output(model, tmp_path):
    """Every kind of output at once (class, regression, multi-label), labels as
    y_<output> arrays of an .npz: the starved run fails, each failing output is
    named with its metric, nothing is written. (Without labels: the API test above.)"""
    labelled = True
    path = tmp_path / "m.keras"
    model.save(path)
    x, y = _task(512, 8)
    np.savez(tmp_path / "d.npz", x=x, **({f"y_{k}": v for k, v in y.items()} if labelled else {}))
    out = tmp_path / "starved.keras"
    r = runner.invoke(app, ["recover", str(path), "--data", str(tmp_path / "d.npz"), "-o", str(out), "--to", "square",
                            "--epochs", "1", "--lr", "1e-9", "--plain", "--max-error", "0.01", "--max-drop", "0",
                            "--max-disagreement", "0", "--json"])
    result = json.loads(r.stdout)
    assert result["losses"] == {"bits": "binary_kl", "cls": "kl", "reg": "mse"}
    failed = {o["output"]: o["metric"] for o in result["outputs"] if not o["passed"]}
    assert "reg" in failed and failed["reg"] == ("MSE against the targets" if labelled else "relative error against the original")
    assert_user_error(r, *[f"output '{k}'" for k in failed], "nothing written", code=1)
    assert not out.exists()
