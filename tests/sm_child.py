"""Fresh-process check of a converted SavedModel, with actswap made unimportable.

argv: SAVEDMODEL_DIR INPUTS_NPZ OUT_NPZ
For every signature: outputs, gradients of sum(outputs * w) with respect to every
variable of the signature (by variable name), then one SGD step on the trainable
ones; writes
them to OUT_NPZ and prints a JSON summary.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


import no_actswap  # noqa: E402,F401  (actswap cannot be imported from here on)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

directory, inputs_path, out_path = sys.argv[1:4]
inputs = np.load(inputs_path)
loaded = tf.saved_model.load(directory)
result, summary, steps = {}, {}, []
for name, fn in loaded.signatures.items():
    kwargs = {k.split("/", 1)[1]: tf.constant(inputs[k]) for k in inputs.files if k.startswith(name + "/")}
    with tf.GradientTape() as tape:
        tape.watch(fn.variables)  # every variable, the non-trainable ones too
        out = fn(**kwargs)
        loss = tf.add_n([tf.reduce_sum(v * inputs[f"w:{name}/{k}"]) for k, v in sorted(out.items())])
    grads = dict(zip([v.name for v in fn.variables], tape.gradient(loss, fn.variables)))
    variables = fn.trainable_variables
    for k, v in out.items():
        result[f"{name}/out/{k}"] = v.numpy()
    for vname, g in grads.items():
        result[f"{name}/grad/{vname.split(':')[0]}"] = g.numpy()
    steps.append((name, [(v, grads[v.name]) for v in variables]))
    summary[name] = {
        "trainable": sorted(v.name for v in variables),
        "all": sorted((v.name, v.trainable) for v in fn.variables),
    }
# Steps only after every signature was evaluated: signatures share variables.
for name, pairs in steps:
    changed = []
    for var, g in pairs:
        before = var.numpy().copy()
        var.assign_sub(0.01 * g)
        changed.append(not np.array_equal(before, var.numpy()))
    summary[name]["step_changed"] = bool(changed) and all(changed)
np.savez(out_path, **result)
summary["actswap_imported"] = "actswap" in sys.modules
print(json.dumps(summary))
