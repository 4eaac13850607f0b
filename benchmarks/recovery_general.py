"""Recovery for any model, with or without labels (issue 27), on data made from MNIST:

    python benchmarks/recovery_general.py [--parts labelfree regression multi dense starved] [--seeds 0 1 2]

Parts (each trains a ReLU original on the first --train training images, then
recovers its x² conversion with `actswap.recover`'s defaults, 3 epochs):

* labelfree -- the deep CNNs of the depth benchmark (ResNet-20, VGG), recovered
  from the training images with their labels, and from the images alone
  (distillation only); test top-1 accuracy. Target: label-free within 0.5
  points of labelled, every seed.
* regression -- rotated digits (uniform in +-45 degrees); a CNN with a linear
  head predicts the angle (in units of 45 degrees); recovered with the angles
  as targets. Target: test MSE within 10% of the original's.
* multi -- one model, two heads (a dict): the digit (softmax) and the angle
  (linear), recovered with both labels, for each budget of --multi-budgets
  (3 and 10 epochs: its loss still falls steeply at 3). Targets: the digit
  within 0.5 points of the original's, the angle's MSE within 10%.
* dense -- an encoder-decoder predicting each digit's pixel mask (pixel > 0.5)
  from the digit with noise; a sigmoid per pixel, recovered with the masks.
  Target: test IoU within 0.01 of the original's.
* starved -- the gate, on a deliberately starved budget (1 epoch at lr 1e-9,
  plain x²) of each model above: it must raise RecoveryFailedError, the
  failure `actswap recover` turns into exit 1 with nothing written.

Every run is also checked finite. Rows are printed as JSON as they are
measured and kept in --rows (build/recovery_general.json): a run replaces its
own rows, so parts can be run apart; the section of docs/benchmarks.md is
written from all of them. Needs ../shared/data/mnist.
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
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import actswap  # noqa: E402
import mnist  # noqa: E402
from actswap import recover as R  # noqa: E402
from actswap.errors import RecoveryFailedError  # noqa: E402
from recovery_depth import ARCHS, train_relu  # noqa: E402

L = keras.layers


def rotate(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image turned about its centre by an angle uniform in +-45 degrees;
    returns the images and the angles in units of 45 degrees ([-1, 1])."""
    rng = np.random.default_rng(seed)
    units = rng.uniform(-1, 1, len(x)).astype("float32")
    theta = units * math.pi / 4
    c, s = np.cos(theta), np.sin(theta)
    cy = cx = (x.shape[1] - 1) / 2
    # keras.ops.image.affine_transform maps output (x, y) to input (a0 x + a1 y + a2, b0 x + b1 y + b2).
    transform = np.stack([c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy,
                          np.zeros_like(c), np.zeros_like(c)], axis=1).astype("float32")
    out = []
    for i in range(0, len(x), 2048):
        out.append(np.asarray(keras.ops.image.affine_transform(x[i:i + 2048], transform[i:i + 2048],
                                                               interpolation="bilinear", fill_mode="constant")))
    return np.concatenate(out), units[:, None]


def noisy(x: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(x + rng.normal(0, 0.35, x.shape), 0, 1).astype("float32")


def trunk(inp):
    h = L.Conv2D(16, 3, padding="same", activation="relu")(inp)
    h = L.AveragePooling2D(2)(h)
    h = L.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = L.AveragePooling2D(2)(h)
    return L.Dense(64, activation="relu")(L.Flatten()(h))


def angle_model() -> keras.Model:
    inp = keras.Input((28, 28, 1))
    return keras.Model(inp, L.Dense(1, name="angle")(trunk(inp)), name="angle_cnn")


def two_head_model() -> keras.Model:
    inp = keras.Input((28, 28, 1))
    h = trunk(inp)
    return keras.Model(inp, {"digit": L.Dense(10, activation="softmax", name="digit")(h),
                             "angle": L.Dense(1, name="angle")(h)}, name="two_heads")


def mask_model() -> keras.Model:
    inp = keras.Input((28, 28, 1))
    h = L.Conv2D(16, 3, padding="same", activation="relu")(inp)
    h = L.AveragePooling2D(2)(h)
    h = L.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = L.UpSampling2D()(h)
    h = L.Conv2D(16, 3, padding="same", activation="relu")(h)
    return keras.Model(inp, L.Conv2D(1, 1, activation="sigmoid", name="mask")(h), name="masks")


def train(model: keras.Model, x, y, loss, epochs: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    steps = -(-len(x) // 128) * epochs
    model.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, steps)), loss)
    model.fit(x, y, epochs=epochs, batch_size=128, verbose=0)
    return model


def iou(pred: np.ndarray, mask: np.ndarray) -> float:
    p, m = pred > 0.5, mask > 0.5
    return float(np.logical_and(p, m).sum() / max(np.logical_or(p, m).sum(), 1))


def finite(model, x) -> bool:
    return all(np.all(np.isfinite(v)) for v in keras.tree.flatten(model.predict(x, verbose=0)))


def recover(original, data, seed: int, args, **kw):
    """actswap.recover with its defaults; the gate's own verdict is kept, not raised."""
    keras.utils.set_random_seed(seed)
    converted, _ = actswap.convert(original)
    t = time.time()
    try:
        model, history = R.recover(original, converted, data, epochs=args.budget, **kw)
        check, passed = history.check, True
    except RecoveryFailedError as e:
        model, check, passed, why = e.model, e.result, False, _gate_message(e)
    else:
        why = ""
    return model, converted, {"gate": passed, "gate_figures": check.get("outputs"), "why": why,
                              "seconds": time.time() - t}


def _gate_message(e: RecoveryFailedError) -> str:
    """The gate's verdict, without the sites' input growth that follows it."""
    return str(e).split("; largest input growth")[0]


def labelfree(arch: str, seed: int, d: dict, args) -> dict:
    xtr, ytr = d["x_train"][: args.train], d["y_train"][: args.train]
    relu = train_relu(ARCHS[arch], seed, xtr, ytr, args.train_epochs)
    row = {"part": "labelfree", "model": arch, "seed": seed, "original": R.accuracy(relu, d["x_test"], d["y_test"])}
    for mode, data in (("labelled", (xtr, ytr)), ("label-free", xtr)):
        model, _, info = recover(relu, data, seed, args)
        row[mode] = R.accuracy(model, d["x_test"], d["y_test"])
        row[f"{mode} gate"] = info["gate"]
        if info["why"]:
            row[f"{mode} gate why"] = info["why"]
        row[f"{mode} s"] = info["seconds"]
        row[f"{mode} finite"] = finite(model, d["x_test"][:2000])
        if mode == "label-free":
            row["agreement"] = float(np.mean(model.predict(d["x_test"], verbose=0).argmax(-1)
                                             == relu.predict(d["x_test"], verbose=0).argmax(-1)))
    row["met"] = row["label-free"] >= row["labelled"] - 0.005 and row["label-free finite"]
    return row


def regression(seed: int, d: dict, args) -> dict:
    xtr, atr = rotate(d["x_train"][: args.train], 100 + seed)
    xte, ate = rotate(d["x_test"], 200 + seed)
    relu = train(angle_model(), xtr, atr, "mse", args.train_epochs + 1, seed)
    model, converted, info = recover(relu, (xtr, atr), seed, args)
    mse = {k: float(np.mean((m.predict(xte, verbose=0) - ate) ** 2)) for k, m in
           (("original", relu), ("converted", converted), ("recovered", model))}
    row = {"part": "regression", "model": "angle CNN", "seed": seed, **mse, "gate": info["gate"],
           "seconds": info["seconds"], "finite": finite(model, xte[:2000])}
    row["met"] = mse["recovered"] <= 1.10 * mse["original"] and row["finite"]
    return row


# The two-head model is recovered down a cosine (`--lr-schedule cosine`): at a
# constant rate its angle head ended 10 epochs at 0.83-1.14x the original's MSE
# (commit b581ab0), down the cosine at 0.90-0.97x; the single angle head did
# better at a constant rate at 3 epochs (see write_doc).
MULTI_SCHEDULE = "cosine"


def multi(seed: int, d: dict, args) -> list[dict]:
    """One original, recovered once per budget in --multi-budgets."""
    xtr, atr = rotate(d["x_train"][: args.train], 100 + seed)
    xte, ate = rotate(d["x_test"], 200 + seed)
    ytr, yte = {"digit": d["y_train"][: args.train], "angle": atr}, {"digit": d["y_test"], "angle": ate}
    relu = train(two_head_model(), xtr, ytr, {"digit": "sparse_categorical_crossentropy", "angle": "mse"},
                 args.train_epochs + 1, seed)
    rows = []
    for budget in args.multi_budgets:
        model, converted, info = recover(relu, (xtr, ytr), seed, argparse.Namespace(**{**vars(args), "budget": budget}),
                                         lr_schedule=MULTI_SCHEDULE)
        row = {"part": "multi", "model": "digit + angle", "seed": seed, "budget": budget, "gate": info["gate"],
               "seconds": info["seconds"], "lr_schedule": MULTI_SCHEDULE}
        for k, m in (("original", relu), ("converted", converted), ("recovered", model)):
            out = m.predict(xte, verbose=0)
            row[f"{k} digit"] = float(np.mean(out["digit"].argmax(-1) == yte["digit"]))
            row[f"{k} angle"] = float(np.mean((out["angle"] - yte["angle"]) ** 2))
        row["finite"] = finite(model, xte[:2000])
        row["met"] = (row["recovered digit"] >= row["original digit"] - 0.005
                      and row["recovered angle"] <= 1.10 * row["original angle"] and row["finite"])
        rows.append(row)
    return rows


def dense(seed: int, d: dict, args) -> dict:
    xtr, mtr = noisy(d["x_train"][: args.train], 300 + seed), (d["x_train"][: args.train] > 0.5).astype("float32")
    xte, mte = noisy(d["x_test"], 400 + seed), (d["x_test"] > 0.5).astype("float32")
    relu = train(mask_model(), xtr, mtr, "binary_crossentropy", args.train_epochs + 1, seed)
    model, converted, info = recover(relu, (xtr, mtr), seed, args)
    row = {"part": "dense", "model": "mask encoder-decoder", "seed": seed, "gate": info["gate"],
           "seconds": info["seconds"]}
    for k, m in (("original", relu), ("converted", converted), ("recovered", model)):
        row[k] = iou(m.predict(xte, verbose=0), mte)
    row["finite"] = finite(model, xte[:2000])
    row["met"] = row["recovered"] >= row["original"] - 0.01 and row["finite"]
    return row


def starved(seed: int, d: dict, args) -> list[dict]:
    """1 epoch at lr 1e-9 with plain x²: the result is the swapped model; the gate must fire."""
    n = min(args.train, 5000)
    x = d["x_train"][:n]
    xr, ar = rotate(x, 100 + seed)
    cases = [
        ("angle CNN, targets", train(angle_model(), xr, ar, "mse", 1, seed), (xr, ar)),
        ("angle CNN, no labels", None, xr),
        ("digit + angle, labels", train(two_head_model(), xr, {"digit": d["y_train"][:n], "angle": ar},
                                        {"digit": "sparse_categorical_crossentropy", "angle": "mse"}, 1, seed),
         (xr, {"digit": d["y_train"][:n], "angle": ar})),
        ("digit + angle, no labels", None, xr),
        # As trained in the dense part: trained 1 epoch on 5,000 images, the starved run's
        # IoU was not 1 point below the original's (the gate did not fire; commit b581ab0).
        ("masks, labels", train(mask_model(), noisy(x, 5), (x > 0.5).astype("float32"), "binary_crossentropy",
                                args.train_epochs + 1, seed),
         (noisy(x, 5), (x > 0.5).astype("float32"))),
        ("masks, no labels", None, noisy(x, 5)),
        ("CNN classifier, no labels", train_relu(ARCHS["vgg"], seed, x, d["y_train"][:n], 1), x),
    ]
    rows, last = [], None
    for name, model, data in cases:
        last = model if model is not None else last
        keras.utils.set_random_seed(seed)
        converted, _ = actswap.convert(last)
        try:
            R.recover(last, converted, data, epochs=1, learning_rate=1e-9, fit=False)
            fired, why = False, ""
        except RecoveryFailedError as e:
            fired, why = True, _gate_message(e)
        rows.append({"part": "starved", "model": name, "seed": seed, "fired": fired, "why": why, "met": fired})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="+", default=["regression", "multi", "dense", "starved", "labelfree"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--archs", nargs="+", default=["resnet20", "vgg"], choices=list(ARCHS))
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--budget", type=int, default=3, help="epochs of recovery")
    ap.add_argument("--multi-budgets", type=int, nargs="+", default=[3, 10],
                    help="the two-head model's recovery budgets (its loss still falls steeply at 3 epochs)")
    ap.add_argument("--rows", type=Path, default=ROOT / "build" / "recovery_general.json",
                    help="rows kept across runs: a run replaces its own (part, model, seed, budget) rows")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    if not mnist.available():
        sys.exit(f"MNIST not found at {mnist.DEFAULT_DIR}")
    d = mnist.load()
    rows: list[dict] = json.loads(args.rows.read_text()) if args.rows.is_file() else []
    t0 = time.time()
    command = " ".join(["python", "benchmarks/recovery_general.py", *sys.argv[1:]])
    commit = os.popen(f"git -C {ROOT} rev-parse --short HEAD").read().strip()

    def key(r: dict) -> tuple:
        return r["part"], r["model"], r["seed"], r.get("budget")

    def done(new: list[dict] | dict) -> None:
        for r in new if isinstance(new, list) else [new]:
            r.update(command=command, commit=commit, train=args.train,
                     budget=r.get("budget", args.budget if r["part"] not in ("starved",) else 1))
            rows[:] = [old for old in rows if key(old) != key(r)] + [r]
            print(json.dumps(r), flush=True)
        args.rows.parent.mkdir(parents=True, exist_ok=True)
        args.rows.write_text(json.dumps(rows, indent=1))
        if not args.no_doc:
            write_doc(rows, time.time() - t0)

    for part in args.parts:
        for seed in args.seeds:
            if part == "labelfree":
                for arch in args.archs:
                    done(labelfree(arch, seed, d, args))
            elif part == "starved":
                if seed == args.seeds[0]:
                    done(starved(seed, d, args))
            else:
                done(globals()[part](seed, d, args))


def write_doc(rows: list[dict], seconds: float | None) -> None:
    """The section from ``rows``; ``seconds``: the last run's wall time (None: rebuilt from the rows alone)."""
    from docsection import write_section

    commands = sorted({(r["command"], r["commit"], r["train"]) for r in rows})
    lines = [
        "## Recovery for any model, with or without labels (issue 27)", "",
        "Commands (each replaces its own rows of the table; "
        + (f"the last ran {seconds:.0f} s " if seconds is not None else "")
        + f"on {os.cpu_count()} cores, Python {sys.version.split()[0]}, Keras {keras.__version__}):", "",
        *[f"- `{c}` (at commit {commit}, {train:,} training images)" for c, commit, train in commands], "",
        "Originals: ReLU networks trained on the first MNIST training images; each recovery is "
        "`actswap.recover` with its defaults for the budget shown (epochs over the same images; its check data "
        "the last tenth, held out); test figures on the 10,000 test images. `gate`: whether recover's own check "
        "passed with its default limits. Every row also checks that the recovered model's outputs are finite. "
        "The check data are images the original was trained on, which it fits better than unseen ones: a labelled "
        "gate can fail there while the test accuracies agree"
        + (f" ({sum(not r['labelled gate'] for r in rows if r['part'] == 'labelfree')} of the "
           f"{sum(r['part'] == 'labelfree' for r in rows)} labelled recoveries below; `--val` with images the "
           "original was not trained on avoids it)." if any(r["part"] == "labelfree" for r in rows) else "."), "",
    ]
    by = {p: [r for r in rows if r["part"] == p] for p in ("labelfree", "regression", "multi", "dense", "starved")}
    if by["labelfree"]:
        lines += ["### Label-free (inputs only) against labelled recovery: top-1 test accuracy, 3 epochs", "",
                  "| model | seed | ReLU original | labelled recovery | label-free recovery | label-free − labelled | "
                  "agreement with the original | gate (labelled / label-free) | time (labelled / label-free) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in by["labelfree"]:
            lines.append(f"| {r['model']} | {r['seed']} | {r['original']:.4f} | {r['labelled']:.4f} | "
                         f"{r['label-free']:.4f} | {100 * (r['label-free'] - r['labelled']):+.2f} pts | "
                         f"{100 * r['agreement']:.2f}% | {_yn(r['labelled gate'])} / {_yn(r['label-free gate'])} | "
                         f"{r['labelled s']:.0f} / {r['label-free s']:.0f} s |")
        lines += ["", _met(by["labelfree"], "label-free within 0.5 points of labelled, finite"), "",
                  "Label-free, a classifier's output trains as with labels (half KL at temperature 4, half "
                  "cross-entropy), the original's top-1 classes standing in for the labels (pseudo-labels). "
                  "Soft targets alone did worse (seed 0, commits b581ab0 and e1d2ecf): at temperature 1, "
                  "ResNet-20 96.94% (−0.88 points against labelled) and VGG 98.00% (−0.72); at temperature 4, "
                  "ResNet-20 97.34% (−0.48).", ""]
    if by["regression"]:
        lines += ["### Regression: the rotation angle (units of 45°), test MSE, 3 epochs", "",
                  "| model | seed | original | after swap | recovered | recovered / original | gate | time |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in by["regression"]:
            lines.append(f"| {r['model']} | {r['seed']} | {r['original']:.4f} | {r['converted']:.4g} | "
                         f"{r['recovered']:.4f} | {r['recovered'] / r['original']:.3f} | {_yn(r['gate'])} | {r['seconds']:.0f} s |")
        lines += ["", _met(by["regression"], "MSE within 10% of the original's, finite"), ""]
    if by["multi"]:
        lines += ["### Two heads in one model (dict): digit (top-1) and angle (MSE)", "",
                  "| seed | epochs | digit: original / after swap / recovered | angle MSE: original / after swap / recovered | gate | time |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(by["multi"], key=lambda r: (r["budget"], r["seed"])):
            lines.append(f"| {r['seed']} | {r['budget']} | {r['original digit']:.4f} / {r['converted digit']:.4f} / "
                         f"{r['recovered digit']:.4f} | {r['original angle']:.4f} / {r['converted angle']:.4g} / "
                         f"{r['recovered angle']:.4f} | {_yn(r['gate'])} | {r['seconds']:.0f} s |")
        lines += ["", "Recovered with `lr_schedule=\"cosine\"` (`--lr-schedule cosine`: the learning rate down a half "
                  "cosine over the epochs). At the default constant rate (commit b581ab0), 10 epochs ended the angle at "
                  "0.83, 0.93 and 1.14× the original's MSE (seeds 0–2): 2 of 3 met. The single angle head above is "
                  "recovered at the default constant rate; down the cosine, at 3 epochs, it ended at 1.14, 1.15 and "
                  "1.08× (commit 7853251): a cosine helps a regression that has the epochs to settle. Originals trained 10 epochs rather than 3 "
                  "(digit 93.4–94.3%), recovered 10 epochs down the cosine: angle 0.99–1.02× the original's MSE, "
                  "digit 0.67–1.09 points below the original's (seeds 0–2, at commit 63b65c0 with `lr_schedule=\"cosine\"`; not rows of this table).", ""]
        for budget in sorted({r["budget"] for r in by["multi"]}):
            lines += [_met([r for r in by["multi"] if r["budget"] == budget],
                           f"{budget} epochs: digit within 0.5 points and angle MSE within 10% of the original's, finite"), ""]
    if by["dense"]:
        lines += ["### Dense prediction: each digit's pixel mask from a noisy digit, test IoU, 3 epochs", "",
                  "| seed | original | after swap | recovered | recovered − original | gate | time |", "|---|---|---|---|---|---|---|"]
        for r in by["dense"]:
            lines.append(f"| {r['seed']} | {r['original']:.4f} | {r['converted']:.4f} | {r['recovered']:.4f} | "
                         f"{r['recovered'] - r['original']:+.4f} | {_yn(r['gate'])} | {r['seconds']:.0f} s |")
        lines += ["", _met(by["dense"], "IoU within 0.01 of the original's, finite"), ""]
    if by["starved"]:
        lines += ["### The gate on a starved budget (1 epoch, lr 1e-9, plain x²)", "",
                  "| model, data | gate fired | its message |", "|---|---|---|"]
        for r in by["starved"]:
            lines.append(f"| {r['model']} | {'yes' if r['fired'] else '**no**'} | {r['why'].replace('|', '/')} |")
        lines += ["", _met(by["starved"], "the gate fires"), ""]
    write_section("recovery-general", "\n".join(lines))


def _yn(v: bool) -> str:
    return "pass" if v is True else ("fail" if v is False else "—")


def _met(rows: list[dict], what: str) -> str:
    return f"Target ({what}): met in {sum(bool(r['met']) for r in rows)} of {len(rows)} runs."


if __name__ == "__main__":
    main()
