"""What ONNX export writes (issue 28): one file or .onnx + external data, both
read back and run from where they were written before they are renamed into
place; nothing left behind when the disk or the memory runs out; models whose
graphs tf2onnx could not take before (an XLA-compiled grouped convolution, a
captured constant)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
from conftest import cli_env, relu_as_square
from typer.testing import CliRunner

import actswap
from actswap import paths
from actswap.cli import app
from actswap.export import export_onnx, run_onnx

runner = CliRunner()


def dense_model(path: Path, units: int = 512, wide: int | None = None) -> Path:
    """Plain ReLU Dense layers; ``units`` x ``wide`` weights give the file some size."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,), name="x")
    h = keras.layers.Dense(units, activation="relu", name="d1")(inp)
    h = keras.layers.Dense(wide or units, activation="relu", name="d2")(h)
    keras.Model(inp, keras.layers.Dense(3, name="out")(h)).save(path)
    return path


def reference(original: Path, x: np.ndarray) -> np.ndarray:
    """The original model with every ReLU computing x² by other means."""
    with relu_as_square():
        return np.asarray(keras.models.load_model(original)(x, training=False))


X = np.random.default_rng(1).uniform(-1, 1, (5, 8)).astype("float32")


def test_an_external_data_export_is_the_single_file_export_with_its_weights_beside_it(tmp_path):
    src = dense_model(tmp_path / "m.keras")
    converted, _ = actswap.convert(src)
    one = export_onnx(converted, tmp_path / "one.onnx", external_data=False)
    two = export_onnx(converted, tmp_path / "two.onnx", external_data=True)
    assert one.data is None and not (tmp_path / "one.onnx.data").exists()
    assert two.data == str(tmp_path / "two.onnx.data") and (tmp_path / "two.onnx.data").is_file()
    # Structure: the same graph; the weights are in the data file, named relative to the .onnx.
    graph_one, graph_two = onnx.load(str(tmp_path / "one.onnx")), onnx.load(str(tmp_path / "two.onnx"),
                                                                          load_external_data=False)
    assert [n.op_type for n in graph_one.graph.node] == [n.op_type for n in graph_two.graph.node]
    ops = [n.op_type for n in graph_two.graph.node]
    assert ops.count("Mul") == 2 and ops.count("MatMul") == 3 and "Gemm" not in ops  # as tf2onnx wrote it
    stored = {i.name: {e.key: e.value for e in i.external_data} for i in graph_two.graph.initializer
              if i.data_location == onnx.TensorProto.EXTERNAL}
    assert len(stored) >= 2 and {s["location"] for s in stored.values()} == {"two.onnx.data"}
    assert (tmp_path / "two.onnx").stat().st_size < 20_000 < (tmp_path / "two.onnx.data").stat().st_size
    # Numbers: the same parity figures, and both agree with the independent reference.
    assert one.parity.ok and (one.parity.max_abs, one.parity.max_rel) == (two.parity.max_abs, two.parity.max_rel)
    ref = reference(src, X)
    moved = tmp_path / "elsewhere"  # the pair travels together
    moved.mkdir()
    for name in ("two.onnx", "two.onnx.data"):
        shutil.move(tmp_path / name, moved / name)
    for path in (tmp_path / "one.onnx", moved / "two.onnx"):
        got = run_onnx(path, [X])[0]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # verify reads the pair the same way.
    actswap.save(converted, tmp_path / "c.keras")
    r = runner.invoke(app, ["verify", str(src), str(tmp_path / "c.keras"), "--onnx", str(moved / "two.onnx")])
    assert r.exit_code == 0 and "onnx" in r.stdout, (r.stdout, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.keras", "elsewhere", "m.keras", "one.onnx"]


def test_the_pair_is_checked_and_run_where_it_was_written_before_the_rename(tmp_path, monkeypatch):
    import actswap.export as ex

    src = dense_model(tmp_path / "m.keras")
    converted, _ = actswap.convert(src)
    seen = []
    real = ex.run_onnx

    def watching(model, inputs):
        model = Path(model)
        seen.append((model.parent != tmp_path, (model.parent / "p.onnx.data").is_file(),
                     (tmp_path / "p.onnx").exists() or (tmp_path / "p.onnx.data").exists()))
        return real(model, inputs)

    monkeypatch.setattr(ex, "run_onnx", watching)
    r = export_onnx(converted, tmp_path / "p.onnx", external_data=True)
    # Run from the staging directory, with its data file beside it, nothing at OUT yet.
    assert seen == [(True, True, False)] and r.parity.ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras", "p.onnx", "p.onnx.data"]


def test_an_existing_pair_is_replaced_only_with_force(tmp_path):
    src = dense_model(tmp_path / "m.keras")
    out = tmp_path / "p.onnx"
    args = ["export", str(src), str(out), "--external-data"]
    assert runner.invoke(app, args).exit_code == 0
    before = (out.read_bytes(), (tmp_path / "p.onnx.data").read_bytes())
    out.unlink()  # a data file whose .onnx is gone is still not overwritten without --force
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "p.onnx.data' exists" in r.stderr and "--force" in r.stderr
    assert not out.exists()
    r = runner.invoke(app, [*args, "--force", "--json"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["data"] == str(tmp_path / "p.onnx.data") and data["parity"]["ok"] and data["weight_bytes"] > 1e6
    assert (out.read_bytes(), (tmp_path / "p.onnx.data").read_bytes())[1] == before[1]  # same weights
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # Replaced by a single file, the pair's data file goes with the .onnx that named it.
    r = runner.invoke(app, ["export", str(src), str(out), "--single-file", "--force", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["data"] is None, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras", "p.onnx"]


def test_move_into_place_puts_back_what_it_replaced_when_a_rename_fails(tmp_path, monkeypatch):
    staged = tmp_path / "stage"
    staged.mkdir()
    (staged / "a.data").write_text("new data")
    (staged / "a.onnx").write_text("new model")
    (tmp_path / "a.data").write_text("old data")
    (tmp_path / "a.onnx").write_text("old model")
    real = os.replace

    def failing(src, dst):
        if Path(src) == staged / "a.onnx":
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        paths.move_into_place([(staged / "a.data", tmp_path / "a.data"), (staged / "a.onnx", tmp_path / "a.onnx")])
    assert (tmp_path / "a.data").read_text() == "old data" and (tmp_path / "a.onnx").read_text() == "old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.data", "a.onnx", "stage"]


# --- out of disk, out of memory ------------------------------------------------------


def _run_script(tmp_path: Path, src: Path, out: Path, script: str, prefix: str = "") -> subprocess.CompletedProcess:
    (tmp_path / "script.py").write_text(textwrap.dedent(script))
    shell = f"{prefix}{sys.executable} {tmp_path / 'script.py'} {src} {out}; rc=$?; echo LEFT:; ls -A {out.parent}; exit $rc"
    cmd = ["unshare", "-rm", "sh", "-c", shell] if prefix else ["sh", "-c", shell]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cli_env())


def _left(proc: subprocess.CompletedProcess) -> list[str]:
    return proc.stdout.split("LEFT:", 1)[1].split()


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 1 and len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return err[0]


def test_an_export_that_runs_out_of_disk_leaves_nothing_and_says_so(tmp_path):
    """The disk fills up after the space check (as when another process writes):
    the write that fails is said in one line, and the staging directory goes.
    1.5 MB holds the raw weights (1 MB) but not the final copy: the failure is
    onnxruntime's write, whose message has no errno (a full disk at actswap's own
    raw write is Python's OSError(ENOSPC), as for every other writer)."""
    mode, size = "--external-data", "1500k"
    if not shutil.which("unshare"):
        pytest.skip("unshare not available")
    src = dense_model(tmp_path / "m.keras")  # 1 MB of weights: raw and final copies
    full = tmp_path / "full"
    full.mkdir()
    script = f"""
        import sys
        from actswap.cli.base import _import_tensorflow_quietly
        _import_tensorflow_quietly(False)  # as the CLI does, before actswap.export imports TF
        import actswap.export as ex
        ex.ensure_space = lambda *a, **k: None  # the space was there when checked
        from actswap.cli import main
        main(["export", sys.argv[1], sys.argv[2], "{mode}"])
    """
    proc = _run_script(tmp_path, src, full / "out.onnx", script, prefix=f"mount -t tmpfs -o size={size} tmpfs {full} && ")
    line = _one_error_line(proc)
    assert "ran out of disk space" in line and "nothing was written" in line and "another OUT" in line
    assert _left(proc) == []


def test_an_export_that_runs_out_of_memory_leaves_nothing_and_says_so(tmp_path):
    """Memory runs out where the weights are folded (the address space capped just
    before onnxruntime allocates them): one line, and the staging directory goes.
    One 48 MB kernel: above glibc's largest mmap threshold (32 MB), so it cannot
    come from memory the process already holds."""
    src = dense_model(tmp_path / "m.keras", units=3072, wide=4096)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    script = """
        import resource, sys
        from actswap.cli.base import _import_tensorflow_quietly
        _import_tensorflow_quietly(False)  # as the CLI does, before actswap.onnx_build imports TF
        import onnxruntime  # loaded first: the test is about what the export allocates
        import actswap.onnx_build as b
        real = b.optimise
        def squeezed(*a, **k):
            vm = int(open("/proc/self/statm").read().split()[0]) * 4096
            resource.setrlimit(resource.RLIMIT_AS, (vm + 4 * 2**20, resource.RLIM_INFINITY))
            try:
                return real(*a, **k)
            finally:  # only this stage is squeezed
                resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        b.optimise = squeezed
        from actswap.cli import main
        main(["export", sys.argv[1], sys.argv[2], "--external-data"])
    """
    proc = _run_script(tmp_path, src, out_dir / "out.onnx", script)
    line = _one_error_line(proc)
    assert "ran out of memory while exporting 'out.onnx'" in line and "nothing was written" in line
    assert _left(proc) == []


def test_an_export_that_would_not_fit_in_memory_is_refused_before_it_starts(tmp_path, monkeypatch):
    src = dense_model(tmp_path / "m.keras")
    monkeypatch.setattr(paths, "available_memory", lambda: 100 * 2**20)
    r = runner.invoke(app, ["export", str(src), str(tmp_path / "o.onnx")])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1, r.stderr
    assert "needs about" in lines[0] and "100.0 MB" not in lines[0] and "104.9 MB is available" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras"]


# --- graphs the old export could not take ---------------------------------------------


def test_a_grouped_convolution_and_a_captured_constant_export_with_parity(tmp_path):
    """Keras' TF backend runs a grouped Conv2D (ConvNeXt's depthwise convolution)
    as an XLA-compiled function, which grappler does not inline and tf2onnx
    cannot convert; a Normalization layer's mean and variance are captured
    constants, which tf2onnx's from_function made graph inputs."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 4), name="x")
    h = keras.layers.Normalization(mean=[0.5] * 4, variance=[0.25] * 4, name="norm")(inp)
    h = keras.layers.Conv2D(4, 3, padding="same", groups=4, activation="relu", name="grouped")(h)
    h = keras.layers.Conv2D(8, 1, activation="relu", name="point")(h)
    out = keras.layers.Dense(2, name="out")(keras.layers.GlobalAveragePooling2D()(h))
    src = tmp_path / "g.keras"
    keras.Model(inp, out).save(src)
    converted, report = actswap.convert(src)
    r = export_onnx(converted, tmp_path / "g.onnx")
    graph = onnx.load(str(tmp_path / "g.onnx"))
    assert report.replaced == 2 and [i.name for i in graph.graph.input] == ["x"]
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and any(a.name == "group" and a.i == 4 for a in convs[0].attribute)
    assert r.parity.ok and r.parity.max_rel <= 1e-5
    x = np.random.default_rng(0).uniform(0, 1, (3, 8, 8, 4)).astype("float32")
    ref = reference(src, x)
    np.testing.assert_allclose(run_onnx(tmp_path / "g.onnx", [x])[0], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
