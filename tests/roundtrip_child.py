"""Run in a fresh interpreter by test_roundtrip.py: only `import actswap` (no
test helpers, no custom_objects), then load, predict, differentiate, train.

argv: MODEL_PATH DATA_NPZ [MODEL_PATH DATA_NPZ ...] [--keep-compile]
Prints one JSON line: per model path, max |pred - expected|, max
|grad - expected|, whether a fit step changed the trainable weights, and the
trainable flags; or "error" with what went wrong for that model. Several
models share one process (one TensorFlow start, ~5 s, instead of one each);
each is loaded after the session is cleared, and nothing of one model is
reused for the next.
"""

import json
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import actswap  # noqa: F401,E402  (the only actswap-side import)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def check(path: str, data_path: str, keep_compile: bool) -> dict:
    data = np.load(data_path)
    xs = [data[k] for k in sorted(k for k in data.files if k.startswith("x"))]
    x = xs if len(xs) > 1 else xs[0]
    model = keras.models.load_model(path)
    pred = model.predict(x, verbose=0)
    xt = [tf.constant(a) for a in xs]
    with tf.GradientTape() as tape:
        for t in xt:
            tape.watch(t)
        y = tf.reduce_sum(model(xt if len(xt) > 1 else xt[0]) * data["w"])
    grads = tape.gradient(y, xt)
    before = [w.numpy().copy() for w in model.trainable_weights]
    if keep_compile:
        model.fit(x, data["y"], epochs=1, batch_size=len(data["y"]), verbose=0)
    else:
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        model.fit(x, np.zeros_like(pred), epochs=1, batch_size=len(pred), verbose=0)
    after = [w.numpy() for w in model.trainable_weights]
    return {
        "pred_err": float(np.max(np.abs(pred - data["pred"]))),
        "grad_err": max(float(np.max(np.abs(g.numpy() - data[f"g{i}"]))) for i, g in enumerate(grads)),
        "changed": any(not np.array_equal(a, b) for a, b in zip(before, after)),
        "finite": all(bool(np.all(np.isfinite(a))) for a in after),
        "n_trainable": len(model.trainable_weights),
    }


args = [a for a in sys.argv[1:] if a != "--keep-compile"]
results = {}
for path, data_path in zip(args[::2], args[1::2]):
    keras.backend.clear_session()
    try:
        results[path] = check(path, data_path, "--keep-compile" in sys.argv)
    except Exception:  # reported per model: the others still run
        results[path] = {"error": traceback.format_exc()[-3000:]}
print(json.dumps(results))
