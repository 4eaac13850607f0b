"""Run in a fresh interpreter by test_fuzz.py: only ``import actswap`` (no test
helpers, no custom_objects), then load every converted model of a fuzz run
and write its outputs on the given inputs.

argv: MANIFEST_JSON (a list of {"model": path, "inputs": npz, "outputs": npz})
Prints one JSON line: how many models were run.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import actswap  # noqa: F401,E402  (the only actswap-side import)
import keras  # noqa: E402
import numpy as np  # noqa: E402

with open(sys.argv[1]) as f:
    manifest = json.load(f)
for item in manifest:
    model = keras.models.load_model(item["model"])
    data = np.load(item["inputs"])
    xs = [data[k] for k in sorted(data.files, key=lambda k: int(k[1:]))]
    out = model(xs if len(xs) > 1 else xs[0], training=False)
    outs = out if isinstance(out, (list, tuple)) else [out]
    np.savez(item["outputs"], **{f"y{i}": np.asarray(o) for i, o in enumerate(outs)})
print(json.dumps({"models": len(manifest)}))
