"""Round trip: convert, save with actswap.save, reload in a fresh process that
imports only actswap, predict, differentiate (the gradient mode must survive),
and train one step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import actswap
from cases import CASES, sample_inputs

CHILD = Path(__file__).with_name("roundtrip_child.py")


def run_child(pairs: list[tuple[Path, Path]], *extra: str) -> dict[str, dict]:
    """roundtrip_child.py on every (model, data) pair, in one fresh process: the
    result per model path."""
    out = subprocess.run(
        [sys.executable, str(CHILD), *(str(p) for pair in pairs for p in pair), *extra],
        capture_output=True, text=True, timeout=600, cwd=pairs[0][0].parent,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def dump_expectations(model, x, path: Path, **extra) -> np.ndarray:
    xs = x if isinstance(x, list) else [x]
    xt = [tf.constant(a) for a in xs]
    pred = model.predict(x, verbose=0)
    w = np.random.default_rng(3).standard_normal(pred.shape).astype("float32")
    with tf.GradientTape() as tape:
        for t in xt:
            tape.watch(t)
        y = tf.reduce_sum(model(xt if len(xt) > 1 else xt[0]) * w)
    grads = tape.gradient(y, xt)
    arrays = {f"x{i}": a for i, a in enumerate(xs)}
    arrays.update({f"g{i}": g.numpy() for i, g in enumerate(grads)})
    np.savez(path, pred=pred, w=w, **arrays, **extra)
    return pred


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Every case converted (clipped gradient), saved with actswap.save, its
    expectations dumped, then all of them reloaded in one fresh process."""
    made, pairs = {}, []
    for name in sorted(CASES):
        folder = tmp_path_factory.mktemp(name)
        model, _ = CASES[name]()
        converted, _ = actswap.convert(model, to="square", grad="clip:0.5")
        out = actswap.save(converted, folder / f"{name}.square.keras")
        left = [p.name for p in folder.iterdir()]  # before the expectations are written beside it
        pred = dump_expectations(converted, sample_inputs(model), folder / "data.npz")
        made[name] = (out, left, pred, len(converted.trainable_weights))
        pairs.append((out, folder / "data.npz"))
    return made, run_child(pairs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_saved_model_reloads_in_fresh_process_and_trains(reloaded, name):
    made, results = reloaded
    out, left, pred, n_trainable = made[name]
    assert out.is_file()
    assert left == [out.name], "temporary files left behind"
    r = results[str(out)]
    assert "error" not in r, r.get("error")
    assert r["pred_err"] <= 1e-6 * max(1.0, float(np.abs(pred).max()))
    assert r["grad_err"] <= 1e-5
    assert r["changed"] and r["finite"]
    assert r["n_trainable"] == n_trainable


mnist = pytest.importorskip("mnist")


@pytest.mark.skipif(not mnist.available(), reason="MNIST data not found at ../shared/data/mnist")
def test_cli_converts_the_mnist_fixture_and_it_trains_elsewhere(tmp_path, fixtures_dir):
    """The README's first command, as a real subprocess of the installed script."""
    out = tmp_path / "mnist_square.keras"
    proc = subprocess.run(
        ["actswap", "convert", str(fixtures_dir / "mnist_cnn.keras"), "--to", "square", "-o", str(out), "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert (report["replaced"], report["skipped"], report["output"]) == (3, 1, str(out))
    data = mnist.load()
    x, y = data["x_test"][:256], data["y_test"][:256]
    converted = actswap.load(out)
    dump_expectations(converted, x, tmp_path / "data.npz", y=y)
    r = run_child([(out, tmp_path / "data.npz")], "--keep-compile")[str(out)]  # its own loss/optimizer
    assert r["changed"] and r["finite"] and r["pred_err"] <= 1e-6
