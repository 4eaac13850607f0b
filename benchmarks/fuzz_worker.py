"""The worker process of benchmarks/fuzz.py: builds the seed corpus, makes each
input from its name (target, seed, index), runs actswap's stages on it in
process, and answers one JSON line per request (stdin -> stdout).

argv: ROOT (seeds in ROOT/seeds, inputs in ROOT/work, the canary in ROOT/canary).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import fuzz_mutate as mut

ROOT = Path(sys.argv[1]) if __name__ == "__main__" else Path(".")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MODEL_TARGETS = ("keras", "h5", "savedmodel", "graphdef")


def canary_file() -> Path:
    return ROOT / "canary" / "ran"


# --- seeds ---------------------------------------------------------------------------

def build_seeds() -> dict[str, list[str]]:
    """Every target's seed inputs, built once into ROOT/seeds (names relative to it)."""
    seeds = ROOT / "seeds"
    index = seeds / "index.json"
    if index.exists():
        return json.loads(index.read_text())
    if seeds.exists():
        shutil.rmtree(seeds)
    seeds.mkdir(parents=True)
    (ROOT / "canary").mkdir(exist_ok=True)
    import keras
    import numpy as np
    import tensorflow as tf

    out: dict[str, list[str]] = {t: [] for t in ("keras", "h5", "savedmodel", "graphdef", "npz", "images", "tfrecord")}
    keras.utils.set_random_seed(0)
    for name in ("functional_forms", "nested", "shared_layer", "ops_relu", "sequential_dense"):
        shutil.copy(FIXTURES / f"{name}.keras", seeds / f"{name}.keras")
        out["keras"].append(f"{name}.keras")
    canary = str(canary_file())
    inp = keras.Input((4,), name="x")
    evil = keras.layers.Lambda(lambda t: t + 0 * len(open(canary, "w").write("ran") * "x"), name="evil")(inp)
    keras.Model(inp, keras.layers.Dense(2, activation="relu")(evil)).save(seeds / "canary.keras")
    out["keras"].append("canary.keras")

    keras.models.load_model(FIXTURES / "functional_forms.keras").save(seeds / "keras3.h5")
    out["h5"].append("keras3.h5")
    import tf_keras

    i2 = tf_keras.Input((8,))
    inner = tf_keras.Sequential([tf_keras.layers.Dense(8, activation="relu")], name="inner")
    tf_keras.Model(i2, tf_keras.layers.Dense(3)(inner(i2))).save(seeds / "keras2_nested.h5")
    out["h5"].append("keras2_nested.h5")
    l2 = tf_keras.layers.Lambda(lambda t: t + 0 * len(open(canary, "w").write("ran") * "x"), name="evil")(i2)
    tf_keras.Model(i2, tf_keras.layers.Dense(2, activation="relu")(l2)).save(seeds / "keras2_canary.h5")
    out["h5"].append("keras2_canary.h5")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf_keras.Model(i2, tf_keras.layers.Dense(3, activation="relu")(i2)).save(seeds / "keras2_sm", save_format="tf")
    out["savedmodel"].append("keras2_sm")
    small = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)])
    small.export(str(seeds / "export_sm"), verbose=False)
    out["savedmodel"].append("export_sm")

    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    fn = tf.function(lambda t: small(t)).get_concrete_function(tf.TensorSpec((None, 6), tf.float32))
    (seeds / "frozen.pb").write_bytes(convert_variables_to_constants_v2(fn).graph.as_graph_def().SerializeToString())
    out["graphdef"].append("frozen.pb")

    rng = np.random.default_rng(0)
    x = rng.random((12, 8, 8, 1), dtype=np.float32)
    np.savez(seeds / "data.npz", x=x, y=rng.integers(0, 2, 12))
    out["npz"].append("data.npz")
    folder = seeds / "images"
    pngs = []
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for k in range(3):
            png = tf.io.encode_png((x[k + (3 if c == "b" else 0)] * 255).astype("uint8")).numpy()
            (folder / c / f"{k}.png").write_bytes(png)
            pngs.append(png)
    out["images"].append("images")
    with tf.io.TFRecordWriter(str(seeds / "data.tfrecord")) as w:
        for k, png in enumerate(pngs):
            ex = tf.train.Example(features=tf.train.Features(feature={
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[k % 2])),
            }))
            w.write(ex.SerializeToString())
    out["tfrecord"].append("data.tfrecord")
    if canary_file().exists():  # building the Lambda seeds called them once
        canary_file().unlink()
    index.write_text(json.dumps(out))
    return out


# --- inputs --------------------------------------------------------------------------

def make_input(target: str, seed_name: str, rng: random.Random, work: Path) -> Path:
    """A mutated copy of seed ``seed_name`` in ``work``."""
    src = ROOT / "seeds" / seed_name
    dst = work / seed_name
    if target == "keras":
        data = src.read_bytes()
        dst.write_bytes(mut.mutate_zip(data, rng, ("config.json", "metadata.json")) if rng.random() < 0.6
                        else mut.mutate_bytes(data, rng))
    elif target == "h5":
        if rng.random() < 0.3:
            mut.mutate_h5_config(src, dst, rng)
        else:
            dst.write_bytes(mut.mutate_bytes(src.read_bytes(), rng))
    elif target == "savedmodel":
        shutil.copytree(src, dst)
        files = sorted(p for p in dst.rglob("*") if p.is_file())
        victim = rng.choice(files)
        if victim.name == "saved_model.pb" and rng.random() < 0.5:
            from tensorflow.core.protobuf import saved_model_pb2

            victim.write_bytes(_mutated_message(saved_model_pb2.SavedModel, victim.read_bytes(), rng))
        else:
            victim.write_bytes(mut.mutate_bytes(victim.read_bytes(), rng))
    elif target == "graphdef":
        if rng.random() < 0.5:
            from tensorflow.core.framework import graph_pb2

            dst.write_bytes(_mutated_message(graph_pb2.GraphDef, src.read_bytes(), rng))
        else:
            dst.write_bytes(mut.mutate_bytes(src.read_bytes(), rng))
    elif target == "npz":
        data = src.read_bytes()
        dst.write_bytes(mut.mutate_zip(data, rng) if rng.random() < 0.6 else mut.mutate_bytes(data, rng))
    elif target == "images":
        shutil.copytree(src, dst)
        files = sorted(p for p in dst.rglob("*.png"))
        victim = rng.choice(files)
        victim.write_bytes(mut.mutate_bytes(victim.read_bytes(), rng))
        if rng.random() < 0.1:
            victim.rename(victim.with_suffix(rng.choice([".jpg", ".gif", ".bmp", ".txt"])))
    elif target == "tfrecord":
        if rng.random() < 0.5:
            dst.write_bytes(mut.mutate_bytes(src.read_bytes(), rng))
        else:
            import tensorflow as tf

            records = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(str(src))]
            from tensorflow.core.example import example_pb2

            with tf.io.TFRecordWriter(str(dst)) as w:
                for raw in records:
                    if rng.random() < 0.5:
                        ex = example_pb2.Example()
                        ex.ParseFromString(raw)
                        raw = mut.mutate_proto(ex, rng)
                    w.write(raw)
    else:
        raise ValueError(target)
    return dst


def _mutated_message(cls: Any, data: bytes, rng: random.Random) -> bytes:
    """``data`` parsed as protobuf message ``cls``, mutated, serialized."""
    msg = cls()
    msg.ParseFromString(data)
    return mut.mutate_proto(msg, rng)


# --- stages --------------------------------------------------------------------------

_MODEL = None


def _data_model() -> Any:
    global _MODEL
    if _MODEL is None:
        import keras

        _MODEL = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(2)])
    return _MODEL


def run_stages(target: str, path: Path, deep: bool) -> bool:
    """actswap's stages on ``path``; return whether the deep stages ran.
    Raises what actswap raised."""
    import actswap
    from actswap import scan

    if target in MODEL_TARGETS:
        report = scan.scan(path)
        if report.errors:
            scan.check(path)  # the refusal, as convert and inspect give it
            raise AssertionError("a scan with errors was not refused")
        if not deep:
            return False
        actswap.inspect(path)
        actswap.convert(path, to="square")
        return True
    from actswap.recover.data import DataOptions, check_spec, open_data, read_errors

    check_spec(str(path), "training data")
    data = open_data(str(path), "training data", DataOptions(batch_size=4, shuffle_buffer=8), _data_model())
    if not isinstance(data, tuple):
        with read_errors(("training data", str(path))):  # as actswap recover reads it
            for _ in data:
                pass
    return True


def fuzz(request: dict[str, Any], seeds: dict[str, list[str]]) -> dict[str, Any]:
    from actswap.errors import ActswapError

    target, index = request["target"], request["index"]
    rng = random.Random(f"{target}/{request['seed']}/{index}")
    work = ROOT / "work" / f"{target}-{index}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    seed_name = rng.choice(seeds[target])
    try:
        path = make_input(target, seed_name, rng, work)
    except Exception as e:  # noqa: BLE001 - the harness's own failure, not actswap's
        import traceback

        return {"outcome": "harness-error", "detail": f"making the input failed: {e}\n{traceback.format_exc()}"}
    before = _listing(work)
    reply: dict[str, Any] = {"input": str(path), "from": seed_name}
    try:
        reply["deep"] = run_stages(target, path, request.get("deep", True))
        reply["outcome"] = "ok"
    except ActswapError as e:
        message = str(e)
        named = path.name in message or str(path) in message
        if e.exit_code == 2 and "\n" not in message and named:
            reply["outcome"] = "refused"
        else:
            reply.update(outcome="finding", kind="refusal", detail=f"{type(e).__name__} (exit {e.exit_code}): "
                         f"{message[:300]}" + ("" if named else " [does not name the file]"))
    except Exception as e:  # noqa: BLE001 - what the fuzzer is for
        reply.update(outcome="finding", kind="unexpected", detail=f"{type(e).__name__}: {str(e)[:300]}")
    if canary_file().exists():
        canary_file().unlink()
        reply.update(outcome="finding", kind="canary", detail="the seed's Lambda ran")
    after = _listing(work)
    if after != before:
        reply.update(outcome="finding", kind="wrote", detail=f"written beside the input: {sorted(after - before)[:5]}")
    if reply["outcome"] != "finding":
        shutil.rmtree(work, ignore_errors=True)
    return reply


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    from actswap.safety import bounded

    bounded.SECONDS = 10.0  # well below the harness's bound: a hang inside HDF5 is the reader's to report
    seeds: dict[str, list[str]] | None = None
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "seeds":
            seeds = build_seeds()
            reply: dict[str, Any] = {"outcome": "ok", "seeds": seeds}
        else:
            if seeds is None:
                seeds = build_seeds()
            reply = fuzz(request, seeds)
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
