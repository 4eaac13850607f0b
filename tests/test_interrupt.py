"""Interrupting ``actswap convert`` while it writes a large model.

SIGINT: the pre-existing output is intact and no temporary file is left.
SIGKILL (no chance to clean up): the pre-existing output is intact, and what
is left is only clearly named temporaries (``.<out>.actswap-<pid>-...tmp...``)
that the next write to that output removes.

The writer is held at a known point, its temporary output complete and read
back, just before the rename (``actswap.paths.HOLD_ENV``, a test hook): the
signal arrives there whatever the machine's load, so neither outcome is a race.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import keras
import pytest
from conftest import cli_command, cli_env

from actswap.paths import HOLD_ENV

PRECIOUS = b"the previous output, which must survive"


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """~128 MB of weights (two 4096x4096 Dense layers): a save that takes a while."""
    path = tmp_path_factory.mktemp("big") / "big.keras"
    keras.utils.set_random_seed(0)
    inp = keras.Input((4096,), name="x")
    h = keras.layers.Dense(4096, activation="relu", name="d1")(inp)
    h = keras.layers.Dense(4096, activation="relu", name="d2")(h)
    keras.Model(inp, keras.layers.Dense(4, name="out")(h)).save(path)
    return path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "small.keras"
    inp = keras.Input((3,), name="x")
    keras.Model(inp, keras.layers.Dense(2, activation="relu", name="d")(inp)).save(path)
    return path


def temp_pattern(out: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(out.name)}\.actswap-\d+-.*\.tmp")


def start_and_signal(src: Path, out: Path, sig: int) -> tuple[subprocess.Popen, list[str]]:
    """Start a conversion, wait until it holds before moving its complete temporary
    output into place, send ``sig``."""
    held = out.parent.parent / f"{out.parent.name}.held"  # outside the output's folder
    env = dict(cli_env(), **{HOLD_ENV: str(held)})
    # SIGINT back to its default in the child: a shell's background job (`cmd &`)
    # starts with SIGINT ignored, Python then installs no handler, and the test
    # would wait out the hold instead of seeing Ctrl-C.
    proc = subprocess.Popen(
        cli_command("convert", src, "--to", "square", "-o", out, "--force"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not held.exists():
        if proc.poll() is not None:
            pytest.fail(f"convert finished without holding before its rename: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the writer never reached its rename")
        time.sleep(0.01)
    seen = [p.name for p in out.parent.iterdir() if temp_pattern(out).match(p.name)]
    assert Path(held.read_text()).name in seen  # held with its temporary file in place
    proc.send_signal(sig)
    proc.wait(timeout=120)
    held.unlink()
    return proc, seen


def test_sigint_keeps_the_old_output_and_leaves_nothing(big_model, tmp_path):
    src = tmp_path / "big.keras"
    src.symlink_to(big_model)
    out = tmp_path / "out.keras"
    out.write_bytes(PRECIOUS)
    proc, seen = start_and_signal(src, out, signal.SIGINT)
    stderr = proc.stderr.read()
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert out.read_bytes() == PRECIOUS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.keras", "out.keras"], seen


def test_sigkill_keeps_the_old_output_and_the_next_run_cleans_up(big_model, small_model, tmp_path):
    src = tmp_path / "big.keras"
    src.symlink_to(big_model)
    out = tmp_path / "out.keras"
    out.write_bytes(PRECIOUS)
    proc, _ = start_and_signal(src, out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert out.read_bytes() == PRECIOUS
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("big.keras", "out.keras"))
    assert left, "SIGKILL during the write should leave its temporary file (else the test proves nothing)"
    assert all(temp_pattern(out).match(name) for name in left), left
    # The next write to the same output removes them (their writer is dead).
    r = subprocess.run(
        cli_command("convert", small_model, "--to", "square", "-o", out, "--force"),
        capture_output=True, text=True, env=cli_env(), timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.keras", "out.keras"]
    assert out.read_bytes() != PRECIOUS
