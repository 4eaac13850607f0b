"""One recovery run with chosen settings, to compare settings (issue 6).

    python benchmarks/recovery_sweep.py [--seed 0] [--bn] [--ramp 0.5] [--lr 2e-3]
        [--batch-size 128] [--progressive] [--cosine] [--epochs 2] [--plain]

Trains (or reuses, cached under --cache) the benchmark's ReLU network for the
seed, converts it to x², runs ``actswap.recover.recover`` with the settings
and prints one JSON line with the test accuracy. ``benchmarks/recovery_mnist.py``
lists the settings compared this way when the defaults were chosen.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "fixtures"))

import keras  # noqa: E402

import actswap  # noqa: E402
import mnist  # noqa: E402
import recovery_mnist as bench  # noqa: E402
from actswap import recover as R  # noqa: E402


class CosineLR(keras.callbacks.Callback):
    """Cosine decay of the learning rate to 0 over ``total`` steps, set per batch
    (a callback rather than a schedule object: the NaN guard assigns the rate)."""

    def __init__(self, base: float, total: int) -> None:
        super().__init__()
        self.base, self.total, self.step = base, total, 0

    def on_train_batch_begin(self, batch, logs=None):
        self.step += 1
        frac = min(1.0, self.step / self.total)
        self.model.optimizer.learning_rate.assign(self.base * 0.5 * (1 + math.cos(math.pi * frac)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bn", action="store_true", help="the BatchNorm setup")
    ap.add_argument("--ramp", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--progressive", action="store_true")
    ap.add_argument("--plain", action="store_true", help="blend towards plain x² (no fitted scale and shift)")
    ap.add_argument("--cosine", action="store_true", help="cosine-decay the learning rate to 0")
    ap.add_argument("--cache", default="/tmp/actswap-recovery-sweep")
    args = ap.parse_args()
    if not mnist.available():
        sys.exit(f"MNIST not found at {mnist.DEFAULT_DIR}")
    d = mnist.load()
    cached = Path(args.cache) / f"relu_bn{int(args.bn)}_seed{args.seed}.keras"
    if cached.exists():
        relu = keras.models.load_model(cached)
    else:
        keras.utils.set_random_seed(args.seed)
        relu = bench.compiled(bench.cnn(args.bn))
        relu.fit(d["x_train"], d["y_train"], epochs=1, batch_size=128, verbose=0)
        cached.parent.mkdir(parents=True, exist_ok=True)
        relu.save(cached)
    keras.utils.set_random_seed(args.seed)
    swapped, _ = actswap.convert(relu)
    callbacks = []
    if args.cosine:
        callbacks.append(CosineLR(args.lr, math.ceil(len(d["x_train"]) / args.batch_size) * args.epochs))
    t = time.time()
    recovered, hist = R.recover(
        relu, swapped, (d["x_train"], d["y_train"]), epochs=args.epochs, ramp_epochs=args.ramp,
        learning_rate=args.lr, batch_size=args.batch_size, progressive=args.progressive, callbacks=callbacks,
        fit=not args.plain, max_drop=None,
    )
    print(json.dumps({
        **vars(args), "relu": R.accuracy(relu, d["x_test"], d["y_test"]),
        "recovered": R.accuracy(recovered, d["x_test"], d["y_test"]), "nan_restores": hist.nan_restores,
        "loss": [round(v, 4) for v in hist.history["loss"]], "seconds": round(time.time() - t),
    }), flush=True)


if __name__ == "__main__":
    main()
