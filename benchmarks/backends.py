"""A converted model's training step under each Keras backend (issue 24):
python benchmarks/backends.py [--backends tensorflow jax torch] [--rounds 7] [--steps 5] [--no-doc]

For each backend, in a fresh process with KERAS_BACKEND set: the 6-conv CNN of
benchmarks/run.py (issue 8: widths 32, 32, 64, 64, 128, 128, 28x28 inputs, batch 128)
with ReLU, converted to x² by `actswap.convert` in that process (the in-memory API);
the floor is the same network with `keras.ops.square` as its activation, same weights.
Both train with the same compiled `train_on_batch` (SGD, cross-entropy); after
warm-up, `--steps` steps per timing, floor and converted alternating for `--rounds`
rounds. Reports the median time per step and the ratio of medians (budget: ≤ 1.05×,
issue 8's). Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

CHILD = r"""
import json, sys, time
import numpy as np
import keras, actswap

rounds, steps = int(sys.argv[1]), int(sys.argv[2])
widths, size, batch = [32, 32, 64, 64, 128, 128], 28, 128

def cnn(activation):
    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, 1))
    h = inp
    for i, w in enumerate(widths):
        h = keras.layers.Conv2D(w, 3, padding="same", strides=2 if i % 2 else 1, name=f"conv{i}")(h)
        h = activation(f"act{i}")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(h))

relu = cnn(lambda name: keras.layers.ReLU(name=name))
converted, _ = actswap.convert(relu, to="square")
floor = cnn(lambda name: keras.layers.Activation(keras.ops.square, name=name))
floor.set_weights(relu.get_weights())
rng = np.random.default_rng(0)
x = rng.uniform(0, 0.1, (batch, size, size, 1)).astype("float32")
y = rng.integers(0, 10, batch)
for m in (floor, converted):
    m.compile(optimizer=keras.optimizers.SGD(1e-4),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for _ in range(3):
        m.train_on_batch(x, y)

def timed(m):
    start = time.perf_counter()
    for _ in range(steps):
        loss = m.train_on_batch(x, y)
    float(np.asarray(loss))
    return (time.perf_counter() - start) / steps

f, s = [], []
for r in range(rounds):
    pair = [(floor, f), (converted, s)]
    for m, acc in pair if r % 2 == 0 else pair[::-1]:
        acc.append(timed(m))
print(json.dumps({"backend": keras.backend.backend(), "floor": f, "subject": s}))
"""


def measure(backend: str, rounds: int, steps: int) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(rounds), str(steps)], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{backend}: failed\n{r.stderr[-3000:]}")
    data = json.loads(r.stdout.strip().splitlines()[-1])
    data["ratio"] = statistics.median(data["subject"]) / statistics.median(data["floor"])
    print(json.dumps({k: data[k] for k in ("backend", "ratio")}), flush=True)
    return data


def write_doc(rows: list[dict], args) -> None:
    from docsection import write_section

    lines = [
        "## Training step under each Keras backend (`benchmarks/backends.py`)",
        "",
        f"`python benchmarks/backends.py --rounds {args.rounds} --steps {args.steps}`: the 6-conv CNN of issue 8 "
        "(batch 128) converted to x² in-process by `actswap.convert`, against the same network with "
        "`keras.ops.square`, same weights; `train_on_batch`, alternating, median seconds per step. Budget ≤ 1.05×.",
        "",
        "| backend | floor (`keras.ops.square`) | converted (`actswap` Square, custom gradient) | ratio of medians "
        "| budget |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ok = "met" if r["ratio"] <= 1.05 else "**missed**"
        lines.append(f"| {r['backend']} | {statistics.median(r['floor']) * 1e3:.1f} ms "
                     f"| {statistics.median(r['subject']) * 1e3:.1f} ms | {r['ratio']:.3f}× | ≤ 1.05× ({ok}) |")
    write_section("backends", "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["tensorflow", "jax", "torch"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    rows = [measure(b, args.rounds, args.steps) for b in args.backends]
    if not args.no_doc:
        write_doc(rows, args)


if __name__ == "__main__":
    main()
