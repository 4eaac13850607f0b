"""Issue 17: ``actswap recover`` reads image folders, TFRecords and a user's
``module:function`` pipeline, streamed through tf.data.

A small image classifier is trained here on two classes that a glance tells
apart (the bright half of the image: left or right); each data form then
recovers it end to end through the CLI. The recovery's own check (accuracy
within --max-drop points of the original's, finite outputs) is what passes or
fails; the figures are compared with the number of samples each form holds.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from typer.testing import CliRunner

from actswap.cli import app
from conftest import assert_user_error

runner = CliRunner()
N_PER_CLASS = 40
CLASSES = ("left", "right")  # label 0, 1: image_dataset_from_directory sorts the subfolder names


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n)
    x = rng.integers(0, 60, (2 * n, 8, 8, 1)).astype("uint8")
    for i, label in enumerate(y):
        cols = slice(0, 4) if label == 0 else slice(4, 8)
        x[i, :, cols, 0] += 150
    return x, y


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("recover_data")
    x, y = _images(N_PER_CLASS, 0)
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Flatten()(keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp))
    h = keras.layers.Dense(8, activation="relu", name="hidden")(h)
    model = keras.Model(inp, keras.layers.Dense(2, name="out")(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x / 255.0, y, epochs=30, batch_size=16, verbose=0)
    assert model.evaluate(x / 255.0, y, verbose=0)[1] > 0.95
    model.save(d / "model.keras")
    # An image folder, one subfolder per class.
    folder = d / "images"
    for i, (img, label) in enumerate(zip(x, y)):
        (folder / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        tf.io.write_file(str(folder / CLASSES[label] / f"{i:03d}.png"), tf.io.encode_png(img))
    # The same images in one folder, without labels (issue 27).
    (d / "flat").mkdir()
    for i, img in enumerate(x):
        tf.io.write_file(str(d / "flat" / f"{i:03d}.png"), tf.io.encode_png(img))
    # The same images as TFRecords (two shards) of encoded PNGs and labels, and without labels.
    for name, labelled in (("train", True), ("unlabelled", False)):
        for shard in range(2):
            with tf.io.TFRecordWriter(str(d / f"{name}-{shard}.tfrecord")) as w:
                for img, label in list(zip(x, y))[shard::2]:
                    feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[tf.io.encode_png(img).numpy()]))}
                    if labelled:
                        feature["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))
                    w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    # A user's own pipeline, as module:function.
    np.savez(d / "arrays.npz", x=x / 255.0, y=y)
    np.savez(d / "xonly.npz", x=x / 255.0)
    (d / "my_pipeline.py").write_text(textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        def _ds():
            a = np.load({str(d / 'arrays.npz')!r})
            return tf.data.Dataset.from_tensor_slices((a["x"].astype("float32"), a["y"])).batch(16)
        def train():
            return _ds().shuffle(8, seed=0)
        def val():
            return _ds()
        def inputs():
            return _ds().map(lambda x, y: x)
    """))
    return d


def _recover(*args: str):
    return runner.invoke(app, ["recover", *args, "--to", "square", "--epochs", "1", "--batch-size", "16",
                               "--max-drop", "100", "--json"])


def _ok(r, out: Path, samples: int) -> dict:
    assert r.exit_code == 0, (r.stdout[-2000:], r.stderr[-2000:])
    data = json.loads(r.stdout)
    assert data["output"] == str(out) and out.is_file()
    assert data["check_samples"] == samples
    assert data["original_accuracy"] > 0.9  # the data reached the model as it was trained: scaled, labelled
    assert np.isfinite(data["recovered_accuracy"])
    return data


def test_image_folder(setup, tmp_path):
    out = tmp_path / "r.keras"
    r = _recover(str(setup / "model.keras"), "--data", str(setup / "images"), "--scale", "1/255", "-o", str(out))
    _ok(r, out, samples=2 * N_PER_CLASS // 10)  # a tenth held out by Keras's validation_split


def test_tfrecords(setup, tmp_path):
    out, logs = tmp_path / "r.keras", tmp_path / "logs"
    r = _recover(str(setup / "model.keras"), "--data", str(setup / "train-*.tfrecord"), "--scale", "1/255",
                 "-o", str(out), "--logdir", str(logs))
    _ok(r, out, samples=2 * N_PER_CLASS // 10)  # every tenth record held out
    # TensorBoard scalars: loss, and per site its blend factor and largest |input|.
    tags = set()
    for event_file in logs.glob("events.out.tfevents.*"):
        for raw in tf.data.TFRecordDataset(str(event_file)):
            event = tf.compat.v1.Event.FromString(raw.numpy())
            tags.update(v.tag for v in event.summary.value)
    assert "loss" in tags
    assert {t.split("/")[0] for t in tags if "/" in t} == {"blend", "largest_input"}
    assert len([t for t in tags if t.startswith("blend/")]) == 2  # two ReLU sites


def test_blend_ramps_over_the_epoch_whatever_the_pipeline_says_of_its_length(setup):
    """The blend schedule is in epochs: it needs the steps per epoch. TFRecords
    are counted when opened; a pipeline of unknown length is counted by
    recover. With --ramp 1 over one epoch of 5 batches the factor after batch i
    is (i + 1) / 5 (it jumped to 1 after the first batch when Keras reported
    no length)."""
    import actswap
    from actswap import recover as R
    from actswap.recover.data import DataOptions, open_data

    model = actswap.load(setup / "model.keras")
    opts = DataOptions(batch_size=16, scale=1 / 255)
    records = open_data(str(setup / "train-*.tfrecord"), "training data", opts, model, split="train")
    assert int(records.cardinality()) == -(-(2 * N_PER_CLASS - 2 * N_PER_CLASS // 10) // 16)  # 72 records
    x, y = _images(N_PER_CLASS, 1)
    unknown = tf.data.Dataset.from_tensor_slices((x / 255.0, y)).filter(lambda a, b: True).batch(16)
    assert int(unknown.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    converted, _ = actswap.convert(model)
    _, history = R.recover(model, converted, unknown, val=(x / 255.0, y), epochs=1, ramp_epochs=1, max_drop=None)
    assert history.blend_factors == pytest.approx([(i + 1) / 5 for i in range(5)])


def test_module_function(setup, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(setup))
    out = tmp_path / "r.keras"
    r = _recover(str(setup / "model.keras"), "--data", "my_pipeline:train", "--val", "my_pipeline:val",
                 "-o", str(out))
    _ok(r, out, samples=2 * N_PER_CLASS)
    sys.modules.pop("my_pipeline", None)


def test_labels_and_class_order_are_keras(setup):
    from actswap.recover.data import DataOptions, open_data

    model = keras.models.load_model(setup / "model.keras")
    ours = open_data(str(setup / "images"), "data", DataOptions(batch_size=16, scale=1 / 255), model, shuffle=False)
    theirs = keras.utils.image_dataset_from_directory(
        setup / "images", color_mode="grayscale", image_size=(8, 8), batch_size=16, shuffle=False)
    assert theirs.class_names == list(CLASSES)
    got = np.concatenate([y for _, y in ours])
    assert np.array_equal(got, np.concatenate([y for _, y in theirs]))
    # Label 0 is the folder 'left': its images are bright on the left.
    xs = np.concatenate([x for x, _ in ours])
    left_bright = xs[..., :4, 0].mean(axis=(1, 2)) > xs[..., 4:, 0].mean(axis=(1, 2))
    assert np.array_equal(left_bright, got == 0)
    assert xs.max() <= 1.0  # --scale applied


def test_inputs_only_in_every_form(setup, monkeypatch):
    """Issue 27: an .npz with x alone, a flat folder of images, TFRecords without
    a label feature and a pipeline of x batches are read as the inputs alone:
    the same images, in the same order, as their labelled forms, without labels."""
    from actswap.recover.data import DataOptions, open_data
    from actswap.recover.run import as_data, has_labels

    monkeypatch.syspath_prepend(str(setup))
    model = keras.models.load_model(setup / "model.keras")
    opts = DataOptions(batch_size=16, scale=1 / 255)
    x, _ = _images(N_PER_CLASS, 0)
    pairs = [("xonly.npz", "arrays.npz"), ("flat", "images"), ("unlabelled-*.tfrecord", "train-*.tfrecord"),
             ("my_pipeline:inputs", "my_pipeline:val")]
    for bare, labelled in pairs:
        got = as_data(open_data(str(setup / bare) if ":" not in bare else bare, "data", opts, model, shuffle=False), "data")
        ref = as_data(open_data(str(setup / labelled) if ":" not in labelled else labelled, "data", opts, model,
                                shuffle=False), "data")
        assert not has_labels(got) and has_labels(ref), bare
        if isinstance(got, tf.data.Dataset):
            got_x = np.concatenate([np.asarray(b) for b in got])
            ref_x = np.concatenate([np.asarray(b[0]) for b in ref])
        else:
            got_x, ref_x = got[0], ref[0]
        if bare == "flat":  # the folder lists its files by name, the labelled one by class first
            order = np.argsort([f"{i:03d}.png" for i in range(len(x))])
            ref_x = (x / 255.0)[order]
        np.testing.assert_allclose(got_x, ref_x, atol=1e-6, err_msg=bare)
    sys.modules.pop("my_pipeline", None)


def test_recover_from_a_flat_folder_distils_and_checks_agreement(setup, tmp_path):
    out = tmp_path / "r.keras"
    r = _recover(str(setup / "model.keras"), "--data", str(setup / "flat"), "--scale", "1/255", "--loss", "kl",
                 "-o", str(out))
    assert r.exit_code == 0, r.stderr[-1500:]
    data = json.loads(r.stdout)
    assert data["losses"] == {"out": "kl"} and data["recovered_accuracy"] is None
    [check] = data["outputs"]
    assert check["metric"] == "top-1 agreement" and check["original"] == 1.0 and check["passed"]
    assert data["check_samples"] == 2 * N_PER_CLASS // 10 and out.is_file()


def test_bad_inputs_are_one_line(setup, tmp_path):
    model = str(setup / "model.keras")
    r = _recover(model, "--data", str(setup / "train-*.tfrecord"), "--image-key", "img", "-o", str(tmp_path / "a.keras"))
    assert_user_error(r, "no bytes feature 'img'", "they have: image, label", "--image-key")
    r = _recover(model, "--data", str(setup / "unlabelled-*.tfrecord"), "--label-key", "label", "-o", str(tmp_path / "a.keras"))
    assert_user_error(r, "no int64 or float feature 'label'", "they have: image", "--label-key")
    empty = tmp_path / "empty"
    (empty / "some_class").mkdir(parents=True)
    r = _recover(model, "--data", str(empty), "-o", str(tmp_path / "b.keras"))
    assert_user_error(r, "holds no images")
    r = _recover(model, "--data", "my_pipeline:train", "-o", str(tmp_path / "c.keras"))
    assert_user_error(r, "pass --val")
    r = _recover(model, "--data", str(tmp_path / "nothing-*.tfrecord"), "-o", str(tmp_path / "d.keras"))
    assert_user_error(r, "matches no TFRecord file")
    assert not list(tmp_path.glob("*.keras"))


def test_killed_recovery_resumes_where_it_stopped(setup, tmp_path):
    """SIGKILL after the first checkpoint; --resume runs only the remaining epochs,
    the blend schedule continuing (ramp over all 4 epochs: factor e/4 after epoch e)."""
    import os
    import signal
    import subprocess
    import time

    from conftest import cli_command, cli_env

    x, y = _images(1500, 1)  # 3,000 images: epochs long enough to be killed in
    np.savez(tmp_path / "train.npz", x=x / 255.0, y=y)
    ckpt, out = tmp_path / "ckpt", tmp_path / "r.keras"
    args = [
        "recover", setup / "model.keras", "--data", tmp_path / "train.npz", "--to", "square", "--epochs", "4",
        "--ramp", "4", "--batch-size", "8", "--max-drop", "100", "--checkpoint-dir", ckpt, "-o", out, "--json",
    ]
    proc = subprocess.Popen(cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    deadline = time.time() + 240
    while not (ckpt / "latest.json").is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads((ckpt / json.loads((ckpt / "latest.json").read_text())["checkpoint"] / "state.json").read_text())["epoch"]
    assert 1 <= done < 4 and not out.exists()

    r = subprocess.run(cli_command(*args, "--resume"), capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["resumed_from"] == done
    assert [e["epoch"] for e in result["epochs"]] == list(range(done + 1, 5))  # the remaining epochs only
    for e in result["epochs"]:
        assert e["blend"] == pytest.approx(e["epoch"] / 4, abs=1e-6)  # the schedule continued, not restarted
        assert e["samples_per_second"] > 0
    assert out.is_file()


def test_mirrored_over_two_logical_cpus_from_the_cli(setup, tmp_path):
    """--distribute mirrored --cpu-devices 2: one replica per logical CPU, the same global batch."""
    from conftest import run_cli

    out = tmp_path / "r.keras"
    r = run_cli("recover", setup / "model.keras", "--data", setup / "images", "--scale", "1/255", "--to", "square",
                "--epochs", "1", "--batch-size", "16", "--max-drop", "100", "--distribute", "mirrored",
                "--cpu-devices", "2", "-o", out, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(r.stdout)
    assert data["replicas"] == 2
    assert data["original_accuracy"] > 0.9 and np.isfinite(data["recovered_accuracy"])
    assert out.is_file()


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("localhost", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def test_multiworker_two_local_workers_finish_with_the_same_weights(setup, tmp_path):
    """--distribute multiworker: two worker processes (TF_CONFIG), one CPU replica
    each, train the same model over one global batch of 16 split between them:
    both exit 0 with bit-identical weights that differ from the original's, and
    only the chief (worker 0) writes checkpoints and TensorBoard scalars."""
    import subprocess

    from conftest import cli_command, cli_env

    hosts = [f"localhost:{p}" for p in _free_ports(2)]
    procs = []
    for i in range(2):
        env = {**cli_env(), "TF_CONFIG": json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}})}
        args = ["recover", setup / "model.keras", "--data", setup / "images", "--scale", "1/255", "--to", "square",
                "--epochs", "2", "--batch-size", "16", "--max-drop", "100", "--distribute", "multiworker",
                "--checkpoint-dir", tmp_path / "ck", "--logdir", tmp_path / f"logs{i}", "-o", tmp_path / f"r{i}.keras",
                "--json"]
        procs.append(subprocess.Popen(cli_command(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(out) for out, _ in outs]
    assert [r["replicas"] for r in reports] == [2, 2]
    assert [e["epoch"] for e in reports[0]["epochs"]] == [1, 2]
    assert reports[0]["epochs"] == [{**e, **{k: reports[0]["epochs"][i][k] for k in e if "per_second" in k}}
                                    for i, e in enumerate(reports[1]["epochs"])]  # same losses, accuracies, blends
    a, b = (keras.models.load_model(tmp_path / f"r{i}.keras") for i in range(2))
    original = keras.models.load_model(setup / "model.keras")
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        assert np.array_equal(wa, wb)
    assert any(not np.array_equal(wa, wo) for wa, wo in zip(a.get_weights(), original.get_weights()))
    assert json.loads((tmp_path / "ck" / "latest.json").read_text()) == {"checkpoint": "epoch-0002"}
    assert list((tmp_path / "logs0").iterdir()) and not (tmp_path / "logs1").exists()


def test_multiworker_needs_a_cluster_in_tf_config(setup, tmp_path, monkeypatch):
    for value, fragment in ((None, "TF_CONFIG, which is not set"), ("{not json", "TF_CONFIG is not a cluster"),
                            ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}',
                             "task worker 3 is not in its cluster")):
        if value is None:
            monkeypatch.delenv("TF_CONFIG", raising=False)
        else:
            monkeypatch.setenv("TF_CONFIG", value)
        r = _recover(str(setup / "model.keras"), "--data", str(setup / "images"), "--distribute", "multiworker",
                     "-o", str(tmp_path / "r.keras"))
        assert_user_error(r, fragment)

def _corrupt_png_folder(setup: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    import shutil

    shutil.copytree(setup / "images", folder)
    victim = sorted((folder / "left").glob("*.png"))[3]
    data = bytearray(victim.read_bytes())
    data[40:60] = b"\xff" * 20  # inside the first data chunk: PNG's CRC no longer matches
    victim.write_bytes(bytes(data))
    return folder


def _truncated_tfrecord(setup: Path, tmp_path: Path) -> Path:
    shard = tmp_path / "cut.tfrecord"
    data = (setup / "train-0.tfrecord").read_bytes()
    shard.write_bytes(data[: len(data) * 2 // 3])  # a record cut in the middle
    return shard


def _tfrecord_missing_a_feature_later(setup: Path, tmp_path: Path) -> Path:
    shard = tmp_path / "partial.tfrecord"
    records = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(str(setup / "train-0.tfrecord"))]
    with tf.io.TFRecordWriter(str(shard)) as w:
        for i, raw in enumerate(records):
            if i == 5:  # the first record, which actswap checks up front, is intact
                ex = tf.train.Example.FromString(raw)
                del ex.features.feature["image"]
                raw = ex.SerializeToString()
            w.write(raw)
    return shard


def _npz_with_a_bad_member(setup: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "bad.npz"
    data = bytearray((setup / "arrays.npz").read_bytes())
    at = data.index(b"NUMPY") + 200  # inside x.npy's data: its CRC-32 no longer matches
    data[at] ^= 0xFF
    bad.write_bytes(bytes(data))
    return bad


def _npz_with_an_unparseable_header(setup: Path, tmp_path: Path) -> Path:
    """x.npy's header dict cut short: numpy's tokenizer raised TokenError."""
    import zipfile

    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,"
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(12)
    bad = tmp_path / "header.npz"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("x.npy", npy)
        z.writestr("y.npy", npy)
    return bad


def _npz_with_a_member_flagged_encrypted(setup: Path, tmp_path: Path) -> Path:
    """The fourth long run's finding: a member whose general-purpose flag says
    encrypted (bit 0); zipfile raised RuntimeError('... password required for
    extraction') when numpy read it."""
    bad = tmp_path / "encrypted.npz"
    data = bytearray((setup / "arrays.npz").read_bytes())
    entry = data.rindex(b"PK\x01\x02")  # the last central directory entry (y.npy): its flags at +8
    data[entry + 8] |= 0x01
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize("make", [_corrupt_png_folder, _truncated_tfrecord, _tfrecord_missing_a_feature_later,
                                  _npz_with_a_bad_member, _npz_with_an_unparseable_header,
                                  _npz_with_a_member_flagged_encrypted])
def test_corrupt_data_is_refused_in_one_line(setup, tmp_path, make):
    """Fuzzer findings (issue 29): a corrupt image, a truncated record, a record
    without the image feature after a good first one, an .npz member whose CRC
    fails were each an 'unexpected failure' (exit 1) once the pipeline reached
    them; now one line naming the data, exit 2, nothing written."""
    spec = make(setup, tmp_path)
    out = tmp_path / "r.keras"
    r = _recover(str(setup / "model.keras"), "--data", str(spec), "--scale", "1/255", "-o", str(out))
    assert_user_error(r, str(spec))
    assert not out.exists() and not list(tmp_path.glob(".r.keras*"))
