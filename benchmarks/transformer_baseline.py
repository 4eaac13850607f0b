"""Transformer baselines on MNIST: python benchmarks/transformer_baseline.py [--epochs 15] [--seeds 0 1 2]

Trains the stock-Keras transformers of fixtures/transformers.py (``vit``: 7x7
patches, ``rows``: the 28 rows as tokens) on the 60k MNIST training images for
each seed (Adam, cosine-decayed learning rate, batch 128), evaluates on the 10k
test images, saves each model to OUT/{model}_s{seed}.keras, reloads it with
``keras.saving.load_model`` (safe mode) and checks the reloaded predictions on
the test set match. Writes OUT/baseline.json (test accuracy, parameters,
seconds per epoch, reload check) after every run, so a partial run keeps its
results. Needs ../shared/data/mnist (the gzipped IDX files).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import mnist  # noqa: E402
import transformers as T  # noqa: E402  (fixtures/transformers.py, not Hugging Face)


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._t)
        print(f"    epoch {epoch + 1}: {self.seconds[-1]:.1f}s loss {logs['loss']:.4f} "
              f"acc {logs['accuracy']:.4f}", flush=True)


def run_one(name: str, seed: int, epochs: int, lr: float, data: dict, out: Path) -> dict:
    model = T.BUILDERS[name](seed)
    timer = EpochTimer()
    t0 = time.perf_counter()
    T.train(model, data["x_train"], data["y_train"], epochs, seed=seed, learning_rate=lr,
            callbacks=[timer])
    train_s = time.perf_counter() - t0
    _, acc = model.evaluate(data["x_test"], data["y_test"], batch_size=500, verbose=0)
    pred = model.predict(data["x_test"], batch_size=500, verbose=0)
    path = out / f"{name}_s{seed}.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)  # safe_mode=True (the default)
    pred2 = reloaded.predict(data["x_test"], batch_size=500, verbose=0)
    return {
        "model": name, "seed": seed, "epochs": epochs, "learning_rate": lr,
        "test_accuracy": round(float(acc), 4),
        "test_accuracy_argmax": round(float((pred.argmax(1) == data["y_test"]).mean()), 4),
        "params": int(model.count_params()),
        "train_seconds": round(train_s, 1),
        "seconds_per_epoch": round(train_s / epochs, 1),
        "epoch_seconds": [round(s, 1) for s in timer.seconds],
        "path": str(path),
        "reload_safe_mode_ok": True,
        "reload_max_abs_diff": float(np.abs(pred2 - pred).max()),
        "reload_same_argmax": bool((pred2.argmax(1) == pred.argmax(1)).all()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit", "rows"], choices=sorted(T.BUILDERS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (cosine-decayed)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/actswap_tf"))
    ap.add_argument("--json", type=Path, default=None, help="summary file (default OUT/baseline.json)")
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    summary_path = args.json or args.out / "baseline.json"
    data = mnist.load()
    summary = {
        "command": "python benchmarks/transformer_baseline.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "keras": keras.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "train_images": len(data["x_train"]), "test_images": len(data["x_test"]),
        "runs": [],
    }
    for name in args.models:
        for seed in args.seeds:
            print(f"{name} seed {seed}: {args.epochs} epochs", flush=True)
            try:
                row = run_one(name, seed, args.epochs, args.lr, data, args.out)
            except Exception as e:  # keep the other runs' results
                row = {"model": name, "seed": seed, "error": f"{type(e).__name__}: {e}"}
            print("  ", json.dumps(row), flush=True)
            summary["runs"].append(row)
            summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    ok = [r for r in summary["runs"] if "error" not in r]
    for name in args.models:
        accs = [r["test_accuracy"] for r in ok if r["model"] == name]
        if accs:
            print(f"{name}: test accuracy {np.mean(accs):.4f} (min {min(accs):.4f}, max {max(accs):.4f})")
    print(f"wrote {summary_path}")
    return 0 if len(ok) == len(summary["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
