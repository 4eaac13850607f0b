"""Recovery at depth on MNIST (issue 14): python benchmarks/recovery_depth.py [--seeds 0 1 2] [--archs ...] [--quick]

For each architecture and seed:

  1. train the ReLU network on the first --train images (Adam 1e-3 with cosine
     decay, batch 128, --train-epochs epochs)                  -> ReLU accuracy
  2. swap every ReLU for x² (actswap.convert)                  -> after-swap accuracy
  3. naive fine-tune of the swapped model (Adam 1e-3), --naive-budget epochs
  4. actswap.recover with its defaults, --budget epochs         -> recovered accuracy

Test accuracy on the 10,000 MNIST test images, inference mode. Also: the
largest |input| per site of the ReLU original and of the recovered model
(first 512 test images), and whether anything turned NaN/Inf. Writes its
section of docs/benchmarks.md and docs/recovery_depth.png; every row is
also printed as JSON as soon as it is measured. Needs ../shared/data/mnist.
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
from actswap.errors import ConversionError  # noqa: E402

L = keras.layers


def _bn() -> keras.layers.Layer:
    # momentum 0.9: moving statistics that keep up with a 2-epoch training run
    return L.BatchNormalization(momentum=0.9)


def resnet20() -> keras.Model:
    """CIFAR-style ResNet-20 (He et al. 2016) for 28x28x1: stem conv 16, 3 stages x 3
    basic blocks (16/32/64), BN after every conv, 1x1 strided projection shortcuts,
    ReLU after each Add: 19 ReLU sites."""
    inp = keras.Input((28, 28, 1))

    def conv_bn(x, filters, kernel=3, strides=1):
        return _bn()(L.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False)(x))

    x = L.Activation("relu")(conv_bn(inp, 16))
    for stage, filters in enumerate([16, 32, 64]):
        for block in range(3):
            strides = 2 if stage > 0 and block == 0 else 1
            y = L.Activation("relu")(conv_bn(x, filters, strides=strides))
            y = conv_bn(y, filters)
            shortcut = x if strides == 1 and x.shape[-1] == filters else conv_bn(x, filters, 1, strides)
            x = L.Activation("relu")(L.Add()([shortcut, y]))
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10, activation="softmax")(x), name="resnet20")


def vgg() -> keras.Model:
    """VGG-style plain CNN: 8 conv 3x3 + BN + ReLU (32-32-64-64-128-128-128-128), max-pool
    after the 2nd, 4th and 6th, global average pool, Dense 128 ReLU, Dense 10: 9 ReLU sites."""
    inp = keras.Input((28, 28, 1))
    x = inp
    for i, filters in enumerate([32, 32, 64, 64, 128, 128, 128, 128]):
        x = L.Activation("relu")(_bn()(L.Conv2D(filters, 3, padding="same", use_bias=False)(x)))
        if i in (1, 3, 5):
            x = L.MaxPooling2D()(x)
    x = L.Dense(128, activation="relu")(L.GlobalAveragePooling2D()(x))
    return keras.Model(inp, L.Dense(10, activation="softmax")(x), name="vgg")


def mobile() -> keras.Model:
    """MobileNet-style: conv 3x3 32, then 5 depthwise-separable blocks (depthwise 3x3 + BN +
    ReLU, pointwise 1x1 + BN + ReLU; 64, 64/2, 128, 128/2, 256): 11 ReLU sites (ReLU layers)."""
    inp = keras.Input((28, 28, 1))
    x = L.ReLU()(_bn()(L.Conv2D(32, 3, padding="same", use_bias=False)(inp)))
    for filters, strides in [(64, 1), (64, 2), (128, 1), (128, 2), (256, 1)]:
        x = L.ReLU()(_bn()(L.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False)(x)))
        x = L.ReLU()(_bn()(L.Conv2D(filters, 1, use_bias=False)(x)))
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10, activation="softmax")(x), name="mobile")


def mlp() -> keras.Model:
    """The shallow control: 3 x Dense 256 ReLU, Dense 10 (3 ReLU sites)."""
    inp = keras.Input((28, 28, 1))
    x = L.Flatten()(inp)
    for _ in range(3):
        x = L.Dense(256, activation="relu")(x)
    return keras.Model(inp, L.Dense(10, activation="softmax")(x), name="mlp")


ARCHS = {"resnet20": resnet20, "vgg": vgg, "mobile": mobile, "mlp": mlp}


def train_relu(build, seed: int, x, y, epochs: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = build()
    steps = -(-len(x) // 128) * epochs
    model.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, steps)),
                  "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=128, verbose=0)
    return model


def peaks(model: keras.Model, x) -> dict[str, float]:
    """Largest |input| per replaceable site (relu, square) on x; inf where it is not finite."""
    from actswap.calibrate import calibrate
    from actswap.sites import find_sites

    sites = [s for s in find_sites(model) if s.activation in ("relu", "square", "poly")]
    ranges = calibrate(model, sites, x)
    return {s.path: (max(abs(ranges[s.path].min), abs(ranges[s.path].max)) if s.path in ranges else float("inf"))
            for s in sites}


def run(arch: str, seed: int, data: dict, args) -> dict:
    xtr, ytr = data["x_train"][: args.train], data["y_train"][: args.train]
    xte, yte = data["x_test"], data["y_test"]
    row: dict = {"arch": arch, "seed": seed}
    t = time.time()
    relu = train_relu(ARCHS[arch], seed, xtr, ytr, args.train_epochs)
    row["train_seconds"] = time.time() - t
    row["relu"] = R.accuracy(relu, xte, yte)
    row["sites"] = sum(s.activation == "relu" for s in actswap.inspect(relu).sites)
    swapped, _ = actswap.convert(relu)
    row["swapped"] = R.accuracy(swapped, xte, yte)
    keras.utils.set_random_seed(seed)
    naive = actswap.convert(relu)[0]
    naive.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    hist = naive.fit(xtr, ytr, epochs=args.naive_budget, batch_size=128, verbose=0)
    row["naive"] = R.accuracy(naive, xte, yte)
    row["naive_nan"] = bool(not np.all(np.isfinite(hist.history["loss"]))
                            or not np.all(np.isfinite(naive.predict(xte[:1000], verbose=0))))
    keras.utils.set_random_seed(seed)
    t = time.time()
    try:
        # actswap's defaults: what `actswap recover ORIGINAL --to square --epochs BUDGET` does
        # (its check data: the last tenth of the training images, held out).
        recovered, h = R.recover(relu, swapped, (xtr, ytr), epochs=args.budget, max_drop=None)
        row.update(recovered=R.accuracy(recovered, xte, yte), restores=h.nan_restores, explosions=h.explosions,
                   curve=[float(v) for v in h.history.get("val_accuracy", [])])
        out = recovered.predict(xte, verbose=0)
        row["recover_nan"] = bool(not np.all(np.isfinite(out)) or not np.all(np.isfinite(h.history["loss"])))
        before, after = peaks(relu, xte[:512]), peaks(recovered, xte[:512])
        row["peaks"] = {k: [before[k], after.get(k, float("inf"))] for k in before}
    except ConversionError as e:
        row.update(recovered=0.0, recover_nan=True, error=str(e))
    row["recover_seconds"] = time.time() - t
    return row


def figure(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110)
    width = 0.8 / 4
    for i, key in enumerate(["relu", "swapped", "naive", "recovered"]):
        means = [np.mean([r[key] for r in rows if r["arch"] == a]) for a in archs]
        axes[0].bar(np.arange(len(archs)) + (i - 1.5) * width, means, width, label=key)
    axes[0].set_xticks(range(len(archs)), archs)
    axes[0].set_ylabel("test accuracy (mean over seeds)")
    axes[0].set_ylim(0, 1.0)
    axes[0].legend(fontsize=7)
    axes[0].set_title("MNIST test accuracy")
    for r in rows:
        if "peaks" not in r:
            continue
        ratio = [min(a / b, 1e6) if b else 1.0 for b, a in r["peaks"].values()]
        axes[1].plot(range(1, len(ratio) + 1), ratio, marker=".", label=f"{r['arch']} s{r['seed']}")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("site (model order)")
    axes[1].set_ylabel("max |input|: recovered / ReLU original")
    axes[1].set_title("activation growth per site after recover")
    axes[1].legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--archs", nargs="+", default=["resnet20", "vgg", "mobile", "mlp"], choices=list(ARCHS))
    ap.add_argument("--train", type=int, default=20000, help="training images (the ReLU original's and recovery's)")
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--budget", type=int, default=3, help="epochs of recovery")
    ap.add_argument("--naive-budget", type=int, default=1, help="epochs of naive fine-tuning")
    ap.add_argument("--quick", action="store_true", help="2,000 images, 1 seed, 1 epoch each: a smoke run")
    ap.add_argument("--no-doc", action="store_true", help="print rows only")
    args = ap.parse_args()
    if not mnist.available():
        sys.exit(f"MNIST not found at {mnist.DEFAULT_DIR}")
    if args.quick:
        args.train, args.seeds, args.train_epochs, args.budget, args.naive_budget = 2000, args.seeds[:1], 1, 1, 1
    data = mnist.load()
    rows = []
    t0 = time.time()
    for seed in args.seeds:
        for arch in args.archs:
            row = run(arch, seed, data, args)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "peaks"}), flush=True)
            if not args.no_doc:  # after every row: a run cut short still leaves its figures
                write_doc(rows, args, time.time() - t0)


def write_doc(rows: list[dict], args, seconds: float) -> None:
    from docsection import write_section

    command = (f"python benchmarks/recovery_depth.py --seeds {' '.join(map(str, args.seeds))} "
               f"--archs {' '.join(args.archs)} --train {args.train} --train-epochs {args.train_epochs} "
               f"--budget {args.budget} --naive-budget {args.naive_budget}{' --quick' if args.quick else ''}")
    planned = len(args.seeds) * len(args.archs)
    lines = [
        "## Recovery at depth on MNIST (issue 14)", "",
        f"Command: `{command}` ({seconds:.0f} s on {os.cpu_count()} cores, Python "
        f"{sys.version.split()[0]}, Keras {keras.__version__}); {len(rows)} of {planned} runs"
        + (" (the run was still going when this was written)" if len(rows) < planned else "") + ".", "",
        f"Each ReLU original is trained on the first {args.train:,} training images for {args.train_epochs} "
        f"epochs (Adam 1e-3, cosine decay, batch 128); every ReLU is swapped for x²; then {args.naive_budget} "
        f"epoch(s) of naive fine-tuning (Adam 1e-3), or {args.budget} epochs over the same images of "
        "`actswap.recover` with its defaults (what `actswap recover ORIGINAL --to square` runs; its check data "
        "are the last tenth of those images, held out from training). Test accuracy on the 10,000 MNIST test "
        "images. Peak |x|: the largest input of any site on 512 test images, ReLU original → recovered.", "",
        "| architecture | sites | seed | ReLU | after swap | naive | recover | recover − ReLU | "
        "NaN/Inf (naive / recover) | peak \\|x\\| ReLU → recovered | restores | recover time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pk = r.get("peaks", {})
        peak = (f"{max(v[0] for v in pk.values()):.3g} → {max(v[1] for v in pk.values()):.3g}" if pk else "—")
        lines.append(
            f"| {r['arch']} | {r['sites']} | {r['seed']} | {r['relu']:.4f} | {r['swapped']:.4f} | {r['naive']:.4f} | "
            f"{r['recovered']:.4f} | {100 * (r['recovered'] - r['relu']):+.2f} pts | "
            f"{'yes' if r['naive_nan'] else 'no'} / {'yes' if r['recover_nan'] else 'no'} | {peak} | "
            f"{r.get('restores', '—')} | {r['recover_seconds']:.0f} s |"
        )
    met = [r["recovered"] >= r["relu"] - 0.005 and not r["recover_nan"] for r in rows]
    lines += ["", f"Target (issue 14): within 0.5 points of ReLU with at most 3 epochs, never a NaN/Inf: met in "
              f"{sum(met)} of {len(met)} runs.", ""]
    if any("peaks" in r for r in rows):
        lines += ["Largest |input| per site (ReLU original → recovered), first seed. A recovered site's input "
                  "includes the shift b folded into the layer before it (about half the site's range), which "
                  "is most of the growth shown; magnitudes no longer compound from site to site:", ""]
        for r in rows:
            if r["seed"] == args.seeds[0] and "peaks" in r:
                lines.append(f"- {r['arch']}: " + ", ".join(f"{k} {b:.3g}→{a:.3g}" for k, (b, a) in r["peaks"].items()))
        lines.append("")
    if figure(rows, ROOT / "docs" / "recovery_depth.png"):
        lines += ["![recovery at depth](recovery_depth.png)", "",
                  "Left: mean test accuracy per architecture at each stage. Right: per site, the recovered "
                  "model's largest |input| over the ReLU original's (1 = unchanged).", ""]
    write_section("recovery-depth", chr(10).join(lines))

if __name__ == "__main__":
    main()
