"""The work inside one process for ``benchmarks/run.py``: model set-up, the
whole-process floors, and the in-process measurements (each returns a dict of
lists of seconds).

Run as a script, ``python benchmarks/perf_tasks.py TASK 'JSON-ARGS'`` runs one
task and prints its result as the last line of stdout (JSON); the floors
(``floor-keras``, ``floor-savedmodel``) are the plain programs the issue
names and print nothing. Top-level imports are the standard library only, so
that a floor process pays for nothing but what it does.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# --- models -------------------------------------------------------------------


def _tiny_cnn(keras: Any) -> Any:
    """A small functional CNN with every ReLU form (quick mode's stand-in for ResNet50)."""
    L = keras.layers
    x = inp = keras.Input((16, 16, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = L.Conv2D(8, 3, padding="same", name="conv2")(x)
    x = L.ReLU(name="relu2")(x)
    x = L.MaxPooling2D(name="pool")(x)
    x = L.Conv2D(16, 3, padding="same", name="conv3")(x)
    x = L.Activation("relu", name="relu3")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(10, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name="tiny_cnn")


def setup(workdir: str, quick: bool) -> dict[str, Any]:
    """Write the model files every row reads: ``model.keras`` (ResNet50,
    ``weights=None``, or the tiny CNN), ``model_sm`` (its Keras ``export()``
    SavedModel) and ``converted.keras`` (actswap's x² version)."""
    import keras

    import actswap

    work = Path(workdir)
    keras.utils.set_random_seed(0)
    model = _tiny_cnn(keras) if quick else keras.applications.ResNet50(weights=None)
    model.save(work / "model.keras")
    model.export(str(work / "model_sm"), verbose=False)
    converted, report = actswap.convert(model, to="square")
    actswap.save(converted, work / "converted.keras", overwrite=True)
    return {
        "name": model.name,
        "layers": len(model.layers),
        "params": int(model.count_params()),
        "input_shape": list(model.input_shape[1:]),
        "replaced": report.replaced,
        "file_mb": (work / "model.keras").stat().st_size / 1e6,
    }


# --- whole-process floors -------------------------------------------------------


def floor_keras(src: str, dst: str) -> None:
    """What the issue names: keras.models.load_model + model.save of the same file."""
    import keras

    keras.models.load_model(src).save(dst)


def floor_savedmodel(src: str, dst: str) -> None:
    """tf.saved_model.load + tf.saved_model.save of the same SavedModel."""
    import tensorflow as tf

    tf.saved_model.save(tf.saved_model.load(src), dst)


# --- ONNX export -------------------------------------------------------------------


def _flat_function(model: Any) -> tuple[Any, list[Any]]:
    """The model as a tf.function over flat inputs, as a tf2onnx user writes it."""
    import keras
    import tensorflow as tf

    specs = [
        tf.TensorSpec((None,) + tuple(t.shape[1:]), t.dtype, name=t.name) for t in keras.tree.flatten(model.inputs)
    ]

    def run(*xs: Any) -> list[Any]:
        return keras.tree.flatten(model(xs[0] if len(xs) == 1 else list(xs), training=False))

    return tf.function(run, input_signature=specs, autograph=False), specs


def onnx_export(model_path: str, out: str, actswap_export: bool) -> dict[str, Any]:
    """Seconds for one ONNX export in a fresh process.

    Floor (``actswap_export=False``): tf2onnx's ``from_function`` on the model,
    written to ``out``, nothing else. actswap: ``actswap.export_onnx`` (tf2onnx
    with its fix, op and ``onnx.checker`` full checks, onnxruntime-vs-TF parity,
    atomic write). Both import tf2onnx and load the model before the clock starts.
    """
    import keras
    import tf2onnx

    if actswap_export:
        from actswap.export import export_onnx  # also registers actswap's layers for loading

        model = keras.models.load_model(model_path)
        start, cpu = time.perf_counter(), time.process_time()
        report = export_onnx(model, out, overwrite=True)
        return {
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "parity": report.parity.describe(), "op_counts": report.op_counts,
        }
    model = keras.models.load_model(model_path)
    fn, specs = _flat_function(model)
    start, cpu = time.perf_counter(), time.process_time()
    tf2onnx.convert.from_function(
        fn, input_signature=specs, opset=tf2onnx.constants.PREFERRED_OPSET, output_path=out
    )
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}


# --- ONNX export memory (issue 28) --------------------------------------------------------

# The models of the ONNX-memory rows: keras.applications, weights=None, ReLUs as
# x² (ConvNeXt has none: its GELUs and LayerNorms become fitted polynomials).
ONNX_MEMORY_MODELS = {
    "ResNet50": {"to": "square", "sources": ("relu",)},
    "ResNet152": {"to": "square", "sources": ("relu",)},
    "ConvNeXtBase": {"to": "approx", "sources": "all"},
}


def setup_onnx_memory(workdir: str, quick: bool) -> dict[str, Any]:
    """Write ``onnx-NAME.keras`` (converted) for each model; return their sizes."""
    import keras
    import numpy as np

    import actswap

    work, info = Path(workdir), {}
    names = ["tiny CNN"] if quick else list(ONNX_MEMORY_MODELS)
    for name in names:
        keras.utils.set_random_seed(0)
        model = _tiny_cnn(keras) if quick else getattr(keras.applications, name)(weights=None)
        how = {"to": "square", "sources": ("relu",)} if quick else ONNX_MEMORY_MODELS[name]
        converted, report = actswap.convert(model, **how)
        path = work / f"onnx-{name.replace(' ', '-')}.keras"
        actswap.save(converted, path, overwrite=True)
        info[name] = {
            "path": str(path), "params": int(model.count_params()), "replaced": report.replaced,
            "weight_bytes": int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.weights)),
            "file_mb": path.stat().st_size / 1e6, "to": how["to"],
        }
        del model, converted
        gc.collect()
    return info


def floor_onnx_before(src: str, dst: str) -> None:
    """actswap's ONNX export before issue 28, as a whole process: tf2onnx's
    ``from_function`` on the model (the transpose-optimizer fix applied), the
    full checker, onnxruntime-vs-TF parity on seeded random inputs, the write."""
    import keras
    import numpy as np
    import onnx
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    import actswap  # noqa: F401  (registers actswap's layers for loading)
    from actswap.tf2onnx_fixes import patched

    model = keras.models.load_model(src)
    fn, specs = _flat_function(model)
    with patched():
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=specs, opset=tf2onnx.constants.PREFERRED_OPSET)
    onnx.checker.check_model(proto, full_check=True)
    x = np.random.default_rng(0).uniform(0, 1, [2] + list(specs[0].shape[1:])).astype("float32")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    ref = np.asarray(fn(tf.constant(x))[0])
    if not np.allclose(got, ref, rtol=0, atol=1e-4 * max(float(np.abs(ref).max()), 1e-30)):
        raise SystemExit("parity failed")
    Path(dst).write_bytes(proto.SerializeToString())


# --- conversion time vs model size ------------------------------------------------------


def chain_model(keras: Any, n: int) -> Any:
    """``n`` Dense layers, each with a ReLU: even ones ``Dense`` + ``ReLU()`` layer,
    odd ones ``Dense(activation="relu")``, so both site forms scale."""
    x = inp = keras.Input((4,), name="x")
    for i in range(n):
        if i % 2:
            x = keras.layers.Dense(4, activation="relu", name=f"dense{i}")(x)
        else:
            x = keras.layers.ReLU(name=f"relu{i}")(keras.layers.Dense(4, name=f"dense{i}")(x))
    return keras.Model(inp, x, name=f"chain{n}")


def _in_big_stack(fn: Any) -> Any:
    """Run ``fn`` in a thread with a large stack: Keras builds and clones
    functional graphs recursively, ~1 frame per layer."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old_limit, 200_000))
    old_size = threading.stack_size(1 << 29)
    try:
        t = threading.Thread(target=target)
        t.start()
        t.join()
    finally:
        threading.stack_size(old_size)
        sys.setrecursionlimit(old_limit)
    if "error" in box:
        raise box["error"]
    return box["value"]


def chains(sizes: list[int], rounds: int) -> dict[str, Any]:
    """Seconds of ``actswap.convert(model, to="square")`` per chain size, sizes
    interleaved round by round (the order rotates), all models alive throughout."""
    import keras

    import actswap

    def work() -> dict[str, Any]:
        models = {n: chain_model(keras, n) for n in sizes}
        times: dict[str, list[float]] = {str(n): [] for n in sizes}
        for n in sizes:  # warm-up: first-call costs (imports, tracing) are not per layer
            actswap.convert(models[n], to="square")
            gc.collect()
        for r in range(rounds):
            order = sizes[r % len(sizes):] + sizes[: r % len(sizes)]
            for n in order:
                start = time.perf_counter()
                converted, report = actswap.convert(models[n], to="square")
                times[str(n)].append(time.perf_counter() - start)
                assert report.replaced == n, (n, report.replaced)
                del converted, report
                gc.collect()
        return {"seconds": times}

    return _in_big_stack(work)


# --- training step ------------------------------------------------------------------


def _cnn(keras: Any, arg_act: Any, layer_act: Any, size: int, widths: list[int]) -> Any:
    """3x3 CNN: odd convs carry ``activation=``, even ones are followed by an
    activation layer and max pooling; global average pool, Dense 10."""
    L = keras.layers
    x = inp = keras.Input((size, size, 1), name="image")
    for i, f in enumerate(widths):
        if i % 2 == 0:
            x = L.Conv2D(f, 3, padding="same", activation=arg_act, name=f"conv{i}")(x)
        else:
            x = L.Conv2D(f, 3, padding="same", name=f"conv{i}")(x)
            x = layer_act(f"act{i}")(x)
            x = L.MaxPooling2D(name=f"pool{i}")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(10, name="logits")(x))


def train_steps(quick: bool, rounds: int, steps: int) -> dict[str, Any]:
    """Seconds per ``steps`` training steps: the actswap-converted CNN against
    the same network built with ``tf.square`` (same weights), for a plain
    ``tf.function`` step and a ``jit_compile=True`` one; plus the converted
    network with ``--grad clip:1`` (a custom gradient) against the same floor."""
    import keras
    import numpy as np
    import tensorflow as tf

    import actswap

    size, batch = (12, 16) if quick else (28, 128)
    widths = [4, 4] if quick else [32, 32, 64, 64, 128, 128]
    keras.utils.set_random_seed(0)
    relu = _cnn(keras, "relu", lambda name: keras.layers.ReLU(name=name), size, widths)
    exact, _ = actswap.convert(relu, to="square")
    clip, _ = actswap.convert(relu, to="square", grad="clip:1")
    floor = _cnn(
        keras, tf.math.square, lambda name: keras.layers.Activation(tf.math.square, name=name), size, widths
    )
    floor.set_weights(relu.get_weights())
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 0.1, (batch, size, size, 1)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, batch))

    def make_step(model: Any, jit: bool) -> Any:
        opt = keras.optimizers.SGD(1e-4)
        opt.build(model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        @tf.function(jit_compile=jit)
        def step(x: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply(grads, model.trainable_variables)
            return loss

        return step

    def timed(step: Any) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = step(x, y)
        loss.numpy()
        return time.perf_counter() - start

    out: dict[str, Any] = {}
    for label, model, jit in (("exact", exact, False), ("exact_jit", exact, True), ("clip", clip, False)):
        f_step, s_step = make_step(floor, jit), make_step(model, jit)
        for step in (f_step, s_step):  # trace / compile, then settle
            for _ in range(3):
                step(x, y).numpy()
        f_times, s_times = [], []
        for r in range(rounds):
            pair = [(f_step, f_times), (s_step, s_times)]
            for step, acc in pair if r % 2 == 0 else pair[::-1]:
                acc.append(timed(step))
        out[label] = {"floor": f_times, "subject": s_times}
    return out


# --- inference ---------------------------------------------------------------------


def inference(keras_path: str, onnx_path: str, rounds: int, batch: int) -> dict[str, Any]:
    """Seconds per batch: onnxruntime on the exported ONNX against the TF
    (Keras) model's ``predict`` on the same batch, interleaved after warm-up."""
    import keras
    import numpy as np
    import onnxruntime as ort

    import actswap  # noqa: F401 - registers the square for loading

    model = keras.models.load_model(keras_path)
    x = np.random.default_rng(0).uniform(0, 1, (batch, *model.input_shape[1:])).astype("float32")
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def tf_run() -> Any:
        return model.predict(x, batch_size=batch, verbose=0)

    def ort_run() -> Any:
        return session.run(None, {name: x})[0]

    for fn in (tf_run, ort_run):
        fn()
        fn()
    tf_times, ort_times = [], []
    for r in range(rounds):
        pair = [(tf_run, tf_times), (ort_run, ort_times)]
        for fn, acc in pair if r % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    diff = float(np.max(np.abs(tf_run() - ort_run())))
    return {"floor": tf_times, "subject": ort_times, "max_abs_diff": diff}


TASKS = {
    "setup": setup,
    "setup-onnx-memory": setup_onnx_memory,
    "onnx": onnx_export,
    "chains": chains,
    "train": train_steps,
    "inference": inference,
}


def main(argv: list[str]) -> int:
    task = argv[0]
    if task == "floor-keras":
        floor_keras(argv[1], argv[2])
        return 0
    if task == "floor-savedmodel":
        floor_savedmodel(argv[1], argv[2])
        return 0
    if task == "floor-onnx-before":
        floor_onnx_before(argv[1], argv[2])
        return 0
    result = TASKS[task](**json.loads(argv[1]))
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
