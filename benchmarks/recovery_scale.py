"""Recovery at dataset scale (issue 17): memory, throughput, two devices.

    python benchmarks/recovery_scale.py [--work DIR] [--no-doc]

Writes MNIST as folders of PNGs (6,000 and 60,000 training images, one
subfolder per digit; 2,000 test images for --val), then, each in a fresh
process (``os.wait4`` gives its peak RSS):

1. ``actswap recover`` of the committed CNN fixture from each folder, one
   epoch: peak RSS at 60,000 against 6,000 (streaming: no more than 1.2x);
2. the same recovery from the 60,000 folder with ``--no-distill`` against a
   plain ``model.fit`` of the same blended model on the same ``tf.data``
   pipeline (``actswap.recover.data.open_data``), one epoch each: steps per
   second of the recovery's epoch within 5% of the plain fit's (the floor,
   measured in the same run);
3. ``--distribute mirrored --cpu-devices 2`` against one device, from the
   60,000 folder, one epoch: accuracy on the 2,000 test images within 0.3
   points.

Not a test: budgets are compared with floors measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "fixtures"))
MODEL = ROOT / "fixtures" / "mnist_cnn.keras"

PLAIN_FIT = r"""
import json, sys, time
import keras, tensorflow as tf
from actswap.recover import blend_model, polynomials_of
from actswap.recover.data import DataOptions, open_data
import actswap
teacher = keras.models.load_model(sys.argv[1])
converted, _ = actswap.convert(teacher, to="square")
student = blend_model(teacher, polynomials=polynomials_of(converted))
student.compile(keras.optimizers.Adam(2e-3, clipnorm=1.0), "sparse_categorical_crossentropy", metrics=["accuracy"])
data = open_data(sys.argv[2], "data", DataOptions(batch_size=128, scale=1 / 255), teacher)
class Clock(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.steps = time.perf_counter(), 0
    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
    def on_epoch_end(self, epoch, logs=None):
        self.rate = self.steps / (time.perf_counter() - self.start)
clock = Clock()
student.fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[clock])
print(json.dumps({"steps_per_second": clock.rate}))
"""


def write_pngs(root: Path, x, y, n: int) -> Path:
    from PIL import Image
    import numpy as np

    if (root / "done").is_file():
        return root
    for i in range(n):
        folder = root / str(int(y[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(x[i].reshape(28, 28) * 255).astype("uint8")).save(folder / f"{i:05d}.png")
    (root / "done").write_text(str(n))
    return root


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[dict, float, float]:
    """(JSON on stdout, seconds, peak RSS in MB) of a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(map(str, cmd))}\n{err.decode()[-3000:]}")
    return json.loads(out.decode().strip().splitlines()[-1]), seconds, usage.ru_maxrss / 1024


def recover_cmd(data: Path, val: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "actswap.cli", "recover", str(MODEL), "--to", "square", "--data", str(data),
            "--val", str(val), "--scale", "1/255", "--max-drop", "100", "-o", str(out), "--force", "--json",
            *extra]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/actswap-recovery-scale"))
    ap.add_argument("--doc", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    import mnist

    d = mnist.load()
    work = args.work
    small = write_pngs(work / "train_6000", d["x_train"], d["y_train"], 6000)
    large = write_pngs(work / "train_60000", d["x_train"], d["y_train"], 60000)
    val = write_pngs(work / "val_2000", d["x_test"], d["y_test"], 2000)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    rows = {}
    for name, folder in (("6000", small), ("60000", large)):
        result, seconds, rss = run(recover_cmd(folder, val, work / f"r{name}.keras", "--epochs", "1"), env)
        rows[name] = {"rss_mb": rss, "seconds": seconds, "accuracy": result["recovered_accuracy"]}
        print(name, rows[name], flush=True)
    # Floor and subject alternate (floor first in even rounds): a load change hits both.
    ratios, recover_rates, plain_rates = [], [], []
    for i in range(3):
        pair = []
        for which in ("plain", "recover") if i % 2 == 0 else ("recover", "plain"):
            if which == "plain":
                rate = run([sys.executable, "-c", PLAIN_FIT, str(MODEL), str(large)], env)[0]["steps_per_second"]
                plain_rates.append(rate)
            else:
                result = run(recover_cmd(large, val, work / "nd.keras", "--epochs", "1", "--no-distill"), env)[0]
                rate = result["epochs"][0]["steps_per_second"]
                recover_rates.append(rate)
            pair.append((which, rate))
        d = dict(pair)
        ratios.append(d["recover"] / d["plain"])
    import statistics

    recover_rate, plain = statistics.median(recover_rates), {"steps_per_second": statistics.median(plain_rates)}
    one, _, _ = run(recover_cmd(large, val, work / "one.keras", "--epochs", "1"), env)
    two, _, _ = run(recover_cmd(large, val, work / "two.keras", "--epochs", "1", "--distribute", "mirrored",
                                "--cpu-devices", "2"), env)
    rss_ratio = rows["60000"]["rss_mb"] / rows["6000"]["rss_mb"]
    speed_ratio = statistics.median(ratios)
    acc_gap = 100 * abs(two["recovered_accuracy"] - one["recovered_accuracy"])
    checks = [
        ("peak RSS, 60,000 vs 6,000 images", f"{rows['60000']['rss_mb']:.0f} vs {rows['6000']['rss_mb']:.0f} MB",
         f"{rss_ratio:.3f}x", "<= 1.2x", rss_ratio <= 1.2),
        ("steps/s, recover --no-distill vs plain fit of the blended model (60,000; median of 3 alternating rounds)",
         f"{recover_rate:.1f} vs {plain['steps_per_second']:.1f}", f"{speed_ratio:.3f}x", ">= 0.95x",
         speed_ratio >= 0.95),
        ("accuracy, mirrored on 2 logical CPUs vs 1 device (60,000, 1 epoch)",
         f"{100 * two['recovered_accuracy']:.2f}% vs {100 * one['recovered_accuracy']:.2f}% "
         f"({two['replicas']} vs {one['replicas']} replicas)", f"{acc_gap:.2f} points", "<= 0.3 points",
         acc_gap <= 0.3),
    ]
    lines = [
        "## Recovery at dataset scale (issue 17)", "",
        "Command: `python benchmarks/recovery_scale.py` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 2 shared cores). The committed MNIST CNN fixture, "
        "recovered to x² from folders of MNIST PNGs (`--scale 1/255`, batch 128), checked on 2,000 test images; "
        "each run a fresh process.", "",
        "| measure | figures | ratio | budget | result |", "|---|---|---|---|---|",
        *[f"| {m} | {f} | {r} | {b} | **{'pass' if ok else 'MISS'}** |" for m, f, r, b, ok in checks],
        "",
        f"One epoch from 6,000 images: {rows['6000']['seconds']:.1f} s, accuracy {100 * rows['6000']['accuracy']:.2f}%; "
        f"from 60,000: {rows['60000']['seconds']:.1f} s, {100 * rows['60000']['accuracy']:.2f}%.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.doc:
        from docsection import write_section

        write_section("recovery-scale", text)


if __name__ == "__main__":
    main()
