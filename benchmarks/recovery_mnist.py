"""Recovery benchmark on MNIST (issue 6): python benchmarks/recovery_mnist.py [--seeds 0 1 2] [--quick]

For each seed and each setup (a 6-layer 3x3 CNN, 32-32-64-64-128-128 filters,
max-pool every two layers, global average pool, Dense(10); without and with
BatchNorm before each activation):

  1. train the ReLU network for 1 epoch (Adam 1e-3, batch 128) -> ReLU accuracy
  2. swap every ReLU for x² (actswap.convert)                   -> after-swap accuracy
  3. naive fine-tune of the swapped model, same epoch budget     -> naive accuracy
  4. actswap.recover with the same epoch budget                   -> recovered accuracy

and whether any NaN/Inf occurred. Also trains a CryptoNets-style network
(conv 5x5/2 -> x² -> dense 100 -> x² -> dense 10) from scratch with the
actswap square. Writes a Markdown table (and the command) to
docs/benchmarks.md and a training-curve PNG to docs/recovery_mnist.png.
Needs ../shared/data/mnist (the gzipped IDX files).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import actswap  # noqa: E402
import mnist  # noqa: E402
from actswap import recover as R  # noqa: E402
from actswap.activations import Square  # noqa: E402

L = keras.layers


def cnn(batchnorm: bool) -> keras.Model:
    inp = keras.Input((28, 28, 1))
    x = inp
    for i, filters in enumerate([32, 32, 64, 64, 128, 128]):
        x = L.Conv2D(filters, 3, padding="same", use_bias=not batchnorm)(x)
        if batchnorm:
            x = L.BatchNormalization()(x)
        x = L.Activation("relu")(x)
        if i % 2 == 1:
            x = L.MaxPooling2D()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10, activation="softmax")(x))


def cryptonets() -> keras.Model:
    inp = keras.Input((28, 28, 1))
    x = L.Conv2D(5, 5, strides=2, padding="same")(inp)
    x = Square()(L.Flatten()(x))
    x = Square()(L.Dense(100)(x))
    return keras.Model(inp, L.Dense(10, activation="softmax")(x))


def compiled(model: keras.Model, lr: float = 1e-3) -> keras.Model:
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def run(seed: int, batchnorm: bool, data: dict, epochs: int, budget: int) -> dict:
    keras.utils.set_random_seed(seed)
    xtr, ytr, xte, yte = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    relu = compiled(cnn(batchnorm))
    relu.fit(xtr, ytr, epochs=epochs, batch_size=128, verbose=0)
    row = {"seed": seed, "batchnorm": batchnorm, "relu": R.accuracy(relu, xte, yte)}
    swapped, _ = actswap.convert(relu)
    row["swapped"] = R.accuracy(swapped, xte, yte)
    naive = compiled(actswap.convert(relu)[0])
    h = naive.fit(xtr, ytr, epochs=budget, batch_size=128, verbose=0)
    row["naive"] = R.accuracy(naive, xte, yte)
    row["naive_nan"] = bool(not np.all(np.isfinite(h.history["loss"])))
    curve = []

    class Curve(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            curve.append((logs or {}).get("loss"))

    recovered, hist = R.recover(relu, swapped, (xtr, ytr), epochs=budget, learning_rate=1e-3, callbacks=[Curve()])
    row["recovered"] = R.accuracy(recovered, xte, yte)
    row["recover_nan_restores"] = hist.nan_restores
    row["curve"] = curve
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=2, help="epochs of naive fine-tuning / recovery")
    ap.add_argument("--quick", action="store_true", help="5,000 training images: a smoke run, not the benchmark")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    if not mnist.available():
        sys.exit(f"MNIST not found at {mnist.DEFAULT_DIR}")
    data = mnist.load()
    if args.quick:
        data = {**data, "x_train": data["x_train"][:5000], "y_train": data["y_train"][:5000]}
    rows = []
    t0 = time.time()
    for bn in (False, True):
        for seed in args.seeds:
            row = run(seed, bn, data, 1, args.budget)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    keras.utils.set_random_seed(0)
    cn = compiled(cryptonets())
    cn.fit(data["x_train"], data["y_train"], epochs=5, batch_size=128, verbose=0)
    crypto = R.accuracy(cn, data["x_test"], data["y_test"])
    print(json.dumps({"cryptonets_square_5_epochs": crypto}), flush=True)
    lines = [
        "# Benchmarks", "", "## Recovery on MNIST (issue 6)", "",
        f"Command: `python benchmarks/recovery_mnist.py --seeds {' '.join(map(str, args.seeds))}"
        f" --budget {args.budget}{' --quick' if args.quick else ''}` "
        f"({time.time() - t0:.0f} s on {os.cpu_count()} cores).", "",
        "| BatchNorm | seed | ReLU | after swap | naive fine-tune | actswap recover | NaN (naive / recover restores) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {'yes' if r['batchnorm'] else 'no'} | {r['seed']} | {r['relu']:.4f} | {r['swapped']:.4f} | "
            f"{r['naive']:.4f} | {r['recovered']:.4f} | {r['naive_nan']} / {r['recover_nan_restores']} |"
        )
    met = [r["recovered"] >= r["relu"] - 0.005 and r["recover_nan_restores"] == 0 for r in rows]
    lines += [
        "", f"CryptoNets-style network with the actswap square, 5 epochs from scratch: {crypto:.4f}", "",
        "Targets (issue 6): recovered within 0.5 points of ReLU with at most 2 epochs, never a NaN: "
        f"met in {sum(met)} of {len(met)} runs; CryptoNets-style >= 0.99: {'met' if crypto >= 0.99 else 'not met'}.",
        "",
    ]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
        for r in rows:
            ax.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o",
                    label=f"{'BN' if r['batchnorm'] else 'no BN'}, seed {r['seed']}")
        ax.set_xlabel("recovery epoch")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(ROOT / "docs" / "recovery_mnist.png")
        lines += ["![recovery training loss](recovery_mnist.png)", ""]
    except ImportError:
        pass
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
