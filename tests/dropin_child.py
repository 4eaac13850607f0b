"""Fresh-process use of a SavedModel as its owner's code would use it, with
actswap made unimportable: the converted file must stand on its own.

argv: SAVEDMODEL_DIR SPEC_JSON INPUTS_NPZ OUT_NPZ. SPEC: "calls", a list of
[attribute, input, output key or null] (attribute "__call__" calls the object
itself), "signature_input", the input every signature is called on (its first
output is kept), and "train" (or null),
[attribute, input, output key]: the function whose sum(output * w) gives the
gradients (w.r.t. every float variable attribute) and one SGD step. Writes the
outputs, gradients and variables after the step to OUT_NPZ and prints a JSON
summary (public attributes, which variables the step changed).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


import no_actswap  # noqa: E402,F401  (actswap cannot be imported from here on)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

directory, spec_json, inputs_path, out_path = sys.argv[1:5]
spec = json.loads(spec_json)
inputs = np.load(inputs_path)
loaded = tf.saved_model.load(directory)
result = {}


def pick(out, key):
    return out if key is None else out[key]


for attr, arg, key in spec["calls"]:
    fn = loaded if attr == "__call__" else getattr(loaded, attr)
    result[f"call/{attr}"] = pick(fn(tf.constant(inputs[arg])), key).numpy()
for name, fn in loaded.signatures.items():  # each on the one input it takes
    (kw,) = fn.structured_input_signature[1]
    out = fn(**{kw: tf.constant(inputs[spec["signature_input"]])})
    result[f"sig/{name}"] = out[sorted(out)[0]].numpy()

public = sorted(a for a in dir(loaded) if not a.startswith("_"))
variables = {a: getattr(loaded, a) for a in public if isinstance(getattr(loaded, a), tf.Variable)}
floats = {a: v for a, v in variables.items() if v.dtype.is_floating}
before = {a: v.numpy().copy() for a, v in variables.items()}
if spec["train"] is not None:
    attr, arg, key = spec["train"]
    fn = loaded if attr == "__call__" else getattr(loaded, attr)
    with tf.GradientTape() as tape:
        tape.watch(list(floats.values()))
        loss = tf.reduce_sum(pick(fn(tf.constant(inputs[arg])), key) * inputs["w"])
    grads = dict(zip(floats, tape.gradient(loss, list(floats.values()))))
    for a, g in grads.items():
        result[f"grad/{a}"] = np.zeros(floats[a].shape) if g is None else g.numpy()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(pick(fn(tf.constant(inputs[arg])), key) * inputs["w"])
    trainable = [v for v in variables.values() if v.trainable]
    for v, g in zip(trainable, tape.gradient(loss, trainable)):  # one plain SGD step
        if g is not None:
            v.assign_sub(0.01 * g)
changed = sorted(a for a, v in variables.items() if not np.array_equal(before[a], v.numpy()))
np.savez(out_path, **result)
print(json.dumps({
    "public": public,
    "variables": sorted((a, v.name, v.dtype.name, bool(v.trainable)) for a, v in variables.items()),
    "changed": changed,
    "actswap_imported": "actswap" in sys.modules,
}))
