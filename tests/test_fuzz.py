"""Property-based fuzzing of the Keras rewrite with hypothesis.

Random Sequential and Functional architectures (depth, widths, nesting up to
two models deep, frozen sub-models, shared layers, parallel branches, one or
two inputs and outputs, conv and recurrent towers), with every ReLU form
actswap replaces (``Activation('relu')``, ``Activation(keras.activations.relu)``,
``ReLU()``, ``activation=`` on Dense/Conv*/recurrent layers and inside
TimeDistributed/Bidirectional, ``keras.ops.relu``/``keras.activations.relu``
calls) and the variants it must leave alone (``max_value=6``/``relu6``,
``negative_slope``, ``threshold``, ``LeakyReLU``), plus other activations.

For each, after ``actswap.convert(model, to="square")``:

* the counts of replaced and skipped ReLU-like sites equal the ones written
  down while generating the architecture (not computed by actswap);
* no plain ReLU is left: the converted model runs with ``tf.nn.relu`` patched
  to fail, and reports no ``relu`` site;
* skipped sites are intact (same path, activation and arguments);
* weights are bit-identical;
* outputs equal the independent reference (the original with ``tf.nn.relu``
  patched to x², conftest.py);
* the saved model, reloaded in a fresh process that imports only actswap,
  gives the same outputs as in memory (all examples' models in one process).

The variants are chosen among those whose Keras implementation does not call
``tf.nn.relu`` (``ReLU(max_value=5)`` does, so the patched reference would
square it), which keeps the reference independent and exact.

Profiles (tests/conftest.py): ``ci`` (default, 30 examples, derandomized) and
``thorough`` (300): ``python -m pytest tests/test_fuzz.py --hypothesis-profile=thorough``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import keras
import numpy as np
from conftest import assert_close, cli_env, relu_as_square, relu_forbidden
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import layers, ops

import actswap
from actswap.report import REPLACED
from actswap.sites import find_sites
from cases import sample_inputs

CHILD = Path(__file__).with_name("fuzz_child.py")

# --- architectures, as data -------------------------------------------------------

DENSE_ACTS = ["relu", "relu_obj", "relu6", "tanh", "linear"]
TOWERS = ["conv2d", "conv2dt", "sepconv", "dwconv", "conv1d", "conv3d", "lstm", "gru", "rnn", "td", "bi"]


def leaf_blocks(functional: bool) -> st.SearchStrategy:
    options = [
        st.tuples(st.just("dense"), st.integers(2, 5), st.sampled_from(DENSE_ACTS)),
        st.tuples(st.just("activation"), st.sampled_from(["relu", "relu_obj", "relu6", "tanh"])),
        st.tuples(st.just("relu_layer"), st.sampled_from(["plain", "max6", "slope", "threshold"])),
        st.just(("leaky",)),
    ]
    if functional:
        options += [
            st.tuples(st.just("op"), st.sampled_from(["ops_relu", "act_relu", "act_relu6"])),
            st.tuples(st.just("shared"), st.integers(2, 4)),
        ]
    return st.one_of(options)


def blocks(depth: int, functional: bool) -> st.SearchStrategy:
    options = [leaf_blocks(functional)]
    if depth < 2:
        options.append(st.tuples(
            st.just("sub"), st.sampled_from(["seq", "func"]), st.booleans(),
            st.deferred(lambda: blocks(depth + 1, True)), st.deferred(lambda: blocks(depth + 1, False)),
        ))
        if functional:
            options.append(st.tuples(
                st.just("branch"), st.deferred(lambda: blocks(depth + 1, True)),
                st.deferred(lambda: blocks(depth + 1, True)),
            ))
    return st.lists(st.one_of(options), min_size=1, max_size=4 if depth == 0 else 2)


architectures = st.one_of(
    st.tuples(st.just("sequential"), st.integers(2, 5), blocks(0, False)),
    st.tuples(
        st.just("functional"), st.integers(2, 5),
        st.lists(st.tuples(st.sampled_from(TOWERS), st.sampled_from(["relu", "relu6"])),
                 max_size=2, unique_by=lambda t: t[0]),
        blocks(0, True), st.integers(1, 2),
    ),
)

# --- counting, by hand ------------------------------------------------------------


def count(blocks_: list) -> Counter:
    """Plain ReLU sites (``plain``) and ReLU variants (``variant``) in ``blocks_``."""
    c: Counter = Counter()
    for b in blocks_:
        kind = b[0]
        if kind == "dense":
            c["plain"] += b[2] in ("relu", "relu_obj")
            c["variant"] += b[2] == "relu6"
        elif kind == "activation":
            c["plain"] += b[1] in ("relu", "relu_obj")
            c["variant"] += b[1] == "relu6"
        elif kind == "relu_layer":
            c["plain" if b[1] == "plain" else "variant"] += 1
        elif kind == "leaky":
            c["variant"] += 1
        elif kind == "op":
            c["variant" if b[1] == "act_relu6" else "plain"] += 1
        elif kind == "shared":
            c["plain"] += 1  # one layer, applied twice: one site
        elif kind == "sub":
            c += count(b[3] if b[1] == "func" else b[4])
        elif kind == "branch":
            c += count(b[1]) + count(b[2])
    return c


def expected_counts(arch: tuple) -> Counter:
    if arch[0] == "sequential":
        return count(arch[2])
    c = count(arch[3])
    for tower, act in arch[2]:
        c["plain" if act == "relu" else "variant"] += 2 if tower == "bi" else 1  # bi: forward and backward
    return c


# --- building ---------------------------------------------------------------------


def _uniform(fan_in: int) -> keras.initializers.Initializer:
    # |W x| <= 0.9 max|x|: activations stay bounded through any number of x².
    lim = 0.9 / max(1, fan_in)
    return keras.initializers.RandomUniform(-lim, lim)


def _dense(units: int, width: int, activation=None) -> layers.Layer:
    return layers.Dense(units, activation=activation, kernel_initializer=_uniform(width), bias_initializer="zeros")


def _act(name: str):
    return keras.activations.relu if name == "relu_obj" else (None if name == "linear" else name)


def _layer_block(b: tuple, width: int) -> tuple[list, int]:
    """Layers for a block that is plain layers (usable in a Sequential)."""
    kind = b[0]
    if kind == "dense":
        return [_dense(b[1], width, _act(b[2]))], b[1]
    if kind == "activation":
        return [layers.Activation(_act(b[1]))], width
    if kind == "relu_layer":
        kwargs = {"plain": {}, "max6": {"max_value": 6.0}, "slope": {"negative_slope": 0.1},
                  "threshold": {"threshold": 0.1}}[b[1]]
        return [layers.ReLU(**kwargs)], width
    if kind == "leaky":
        return [layers.LeakyReLU(negative_slope=0.2)], width
    if kind == "sub":
        sub, out = _submodel(b, width)
        return [sub], out
    raise ValueError(b)


def _submodel(b: tuple, width: int) -> tuple[keras.Model, int]:
    _, kind, frozen, func_blocks, seq_blocks = b
    if kind == "func":
        inp = keras.Input((width,))
        out, w = _apply(func_blocks, inp, width)
        model = keras.Model(inp, out)
    else:
        seq: list = [keras.Input((width,))]
        w = width
        for blk in seq_blocks:
            new, w = _layer_block(blk, w)
            seq += new
        model = keras.Sequential(seq)
    if frozen:
        model.trainable = False
    return model, w


def _apply(blocks_: list, x, width: int):
    """Apply blocks in a functional graph; return the output and its width."""
    for b in blocks_:
        kind = b[0]
        if kind == "op":
            x = {"ops_relu": ops.relu, "act_relu": keras.activations.relu,
                 "act_relu6": lambda t: keras.activations.relu(t, max_value=6.0)}[b[1]](x)
        elif kind == "shared":
            shared = _dense(width, width, "relu")
            other = _dense(width, width)(x)
            x = layers.Add()([shared(x), shared(other)])
        elif kind == "branch":
            a, wa = _apply(b[1], x, width)
            c, wc = _apply(b[2], x, width)
            x, width = layers.Concatenate()([a, c]), wa + wc
        else:
            new, width = _layer_block(b, width)
            for layer in new:
                x = layer(x)
    return x, width


def _tower(kind: str, act: str):
    """An extra input and a small conv/recurrent stack on it, flattened to 3 features."""
    if kind in ("conv2d", "conv2dt", "sepconv", "dwconv"):
        inp = keras.Input((4, 4, 2))
        layer = {
            "conv2d": lambda: layers.Conv2D(2, 2, activation=act, kernel_initializer=_uniform(8)),
            "conv2dt": lambda: layers.Conv2DTranspose(2, 2, activation=act, kernel_initializer=_uniform(8)),
            "sepconv": lambda: layers.SeparableConv2D(
                2, 2, activation=act, depthwise_initializer=_uniform(4), pointwise_initializer=_uniform(2)),
            "dwconv": lambda: layers.DepthwiseConv2D(2, activation=act, depthwise_initializer=_uniform(4)),
        }[kind]()
        h = layer(inp)
    elif kind == "conv1d":
        inp = keras.Input((5, 2))
        h = layers.Conv1D(2, 2, activation=act, kernel_initializer=_uniform(4))(inp)
    elif kind == "conv3d":
        inp = keras.Input((3, 3, 3, 1))
        h = layers.Conv3D(1, 2, activation=act, kernel_initializer=_uniform(8))(inp)
    else:
        inp = keras.Input((3, 2))
        rec = {"kernel_initializer": _uniform(4), "recurrent_initializer": _uniform(6)}
        if kind == "lstm":
            h = layers.LSTM(3, activation=act, **rec)(inp)
        elif kind == "gru":
            h = layers.GRU(3, activation=act, **rec)(inp)
        elif kind == "rnn":
            h = layers.SimpleRNN(3, activation=act, **rec)(inp)
        elif kind == "td":
            h = layers.TimeDistributed(layers.Dense(3, activation=act, kernel_initializer=_uniform(2)))(inp)
        else:
            h = layers.Bidirectional(layers.SimpleRNN(2, activation=act, **rec))(inp)
    h = layers.Flatten()(h)
    return inp, _dense(3, int(h.shape[-1]))(h)


def build(arch: tuple) -> keras.Model:
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    if arch[0] == "sequential":
        _, width, blocks_ = arch
        seq: list = [keras.Input((width,))]
        w = width
        for b in blocks_:
            new, w = _layer_block(b, w)
            seq += new
        return keras.Sequential(seq + [_dense(2, w)])
    _, width, towers, blocks_, n_out = arch
    x = keras.Input((width,))
    inputs, parts = [x], [x]
    for kind, act in towers:
        inp, h = _tower(kind, act)
        inputs.append(inp)
        parts.append(h)
    h0 = layers.Concatenate()(parts) if len(parts) > 1 else x
    w0 = width + 3 * (len(parts) - 1)
    h, w = _apply(blocks_, h0, w0)
    outputs = [_dense(2, w)(h)] + ([_dense(1, w0)(h0)] if n_out == 2 else [])
    return keras.Model(inputs if len(inputs) > 1 else x, outputs if len(outputs) > 1 else outputs[0])


# --- the property -----------------------------------------------------------------


def _outputs(model, x) -> list[np.ndarray]:
    out = model(x, training=False)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def check_example(arch: tuple, out_dir: Path, index: int) -> dict:
    model = build(arch)
    want = expected_counts(arch)
    converted, report = actswap.convert(model, to="square")
    assert report.replaced == want["plain"], (report.replaced, want, arch)
    assert report.skipped_relu_like == want["variant"], (report.skipped_relu_like, want, arch)
    after = find_sites(converted)
    assert "relu" not in [s.activation for s in after], arch
    skipped = Counter((s.path, s.activation, s.detail) for s in report.sites if s.action != REPLACED)
    kept = Counter((s.path, s.activation, s.detail) for s in after if s.activation != "square")
    assert kept == skipped, (kept, skipped, arch)
    assert [w.numpy().tobytes() for w in converted.weights] == [w.numpy().tobytes() for w in model.weights]
    x = sample_inputs(model, batch=3)
    with relu_as_square():
        reference = _outputs(model, x)
    with relu_forbidden():
        got = _outputs(converted, x)
    assert len(got) == len(reference)
    for g, r in zip(got, reference):
        assert_close(g, r)
    path = actswap.save(converted, out_dir / f"m{index}.keras")
    xs = x if isinstance(x, list) else [x]
    np.savez(out_dir / f"in{index}.npz", **{f"x{i}": a for i, a in enumerate(xs)})
    return {"model": str(path), "inputs": str(out_dir / f"in{index}.npz"),
            "outputs": str(out_dir / f"out{index}.npz"), "expected": got, "arch": repr(arch)}


def test_random_architectures_convert_soundly(tmp_path):
    runs: list[dict] = []

    @given(architectures)
    def property_(arch):
        runs.append(check_example(arch, tmp_path, len(runs)))

    property_()
    # The profile's examples all ran (a property that silently ran none would pass).
    assert len(runs) >= settings().max_examples, len(runs)
    print(f"{len(runs)} architectures converted")
    # Reload in a fresh process: one process for every example's model.
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps([{k: r[k] for k in ("model", "inputs", "outputs")} for r in runs]))
    proc = subprocess.run([sys.executable, str(CHILD), str(manifest)], capture_output=True, text=True,
                          timeout=1800, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"models": len(runs)}
    for r in runs:
        data = np.load(r["outputs"])
        reloaded = [data[f"y{i}"] for i in range(len(data.files))]
        assert len(reloaded) == len(r["expected"]), r["arch"]
        for a, b in zip(reloaded, r["expected"]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(b).max())), err_msg=r["arch"])
