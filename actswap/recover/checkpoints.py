"""Checkpoints of a recovery: written at each epoch end, read back by ``--resume``.

A checkpoint is a directory ``epoch-NNNN`` in the checkpoint directory holding
the blended model's weights (``student.weights.h5``), the optimizer's
variables (``optimizer.npz``) and ``state.json``: the epoch, the learning
rate, the guard's counters and references, the fitted shifted squares (the
blended model's constants, which a resumed run must not fit again on other
batches). ``latest.json`` names the newest complete one.

Invariants: a checkpoint is complete before it is named: its directory is
written under a temporary name and renamed, then ``latest.json`` is replaced
atomically (:func:`actswap.paths.write_atomically`), so a run killed at any
moment (SIGKILL included) leaves the previous checkpoint usable; the two
newest are kept, older ones are removed after the new one is named.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ..errors import UserError
from ..paths import write_atomically

LATEST = "latest.json"
KEEP = 2


def read_latest(directory: Path) -> dict[str, Any] | None:
    """The newest checkpoint's state (with ``path``), or None when there is none."""
    latest = Path(directory) / LATEST
    if not latest.is_file():
        return None
    try:
        name = json.loads(latest.read_text())["checkpoint"]
        path = Path(directory) / name
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"checkpoint directory '{directory}' is damaged ({e}); remove it or drop --resume") from None
    state["path"] = str(path)
    return state


class EpochCheckpoint(keras.callbacks.Callback):
    """Write a checkpoint of ``student``, ``optimizer`` and the guard at each epoch end."""

    writes_files = True  # a multi-worker run writes on its chief alone (:mod:`.loop`)

    def __init__(self, directory: Path, student: Any, optimizer: Any, guard: Any, squares: Any) -> None:
        super().__init__()
        self.directory, self.student, self.optimizer = Path(directory), student, optimizer
        self.guard, self.squares = guard, squares
        self.written: list[int] = []

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{epoch + 1:04d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.directory))
        try:
            self.student.save_weights(tmp / "student.weights.h5")
            np.savez(tmp / "optimizer.npz", *[v.numpy() for v in self.optimizer.variables])
            state = {
                "epoch": epoch + 1,
                "learning_rate": float(self.optimizer.learning_rate.numpy()),
                "guard": {"restores": self.guard.restores, "explosions": self.guard.explosions,
                          "early": [[e[0], list(e[1])] for e in self.guard._early]},
                "squares": None if self.squares is None else {k: list(v) for k, v in self.squares.items()},
            }
            (tmp / "state.json").write_text(json.dumps(state))
            final = self.directory / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_atomically(self.directory / LATEST, json.dumps({"checkpoint": name}).encode())
        self.written.append(epoch + 1)
        for old in sorted(self.directory.glob("epoch-*"))[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)


def restore(state: dict[str, Any], student: Any, optimizer: Any, guard: Any) -> int:
    """Put a checkpoint's weights, optimizer variables and guard state back;
    return the number of epochs it had finished."""
    path = Path(state["path"])
    student.load_weights(path / "student.weights.h5")
    optimizer.build(student.trainable_variables)
    saved = np.load(path / "optimizer.npz")
    values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(values) != len(optimizer.variables):
        raise UserError(
            f"checkpoint '{path}' holds {len(values)} optimizer variables, this run has "
            f"{len(optimizer.variables)}; resume with the options of the run that wrote it"
        )
    for var, value in zip(optimizer.variables, values):
        var.assign(value)
    optimizer.learning_rate.assign(state["learning_rate"])
    g = state["guard"]
    guard.restores, guard.explosions = g["restores"], g["explosions"]
    guard._early = [(e[0], list(e[1])) for e in g["early"]]
    return int(state["epoch"])
