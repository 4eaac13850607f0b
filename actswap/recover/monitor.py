"""What a long recovery shows while it runs: TensorBoard scalars and throughput.

:class:`SiteScalars` writes, at each epoch end, the loss, the validation
accuracy, and per site its blend factor and its largest |input| (the scalars a
user watches for a collapse) to a TensorBoard log directory.
:class:`Throughput` measures steps and samples per second of the last epoch.

Invariant: both only read the model; neither changes training.
"""

from __future__ import annotations

import time
from typing import Any

import keras
import tensorflow as tf

from .blend import blends


class SiteScalars(keras.callbacks.Callback):
    writes_files = True  # a multi-worker run writes on its chief alone (:mod:`.loop`)

    def __init__(self, logdir: str) -> None:
        super().__init__()
        self.logdir, self.writer = str(logdir), None

    def on_train_begin(self, logs: Any = None) -> None:
        # Opened here, not when made: a worker that drops this callback writes nothing.
        self.writer = tf.summary.create_file_writer(self.logdir)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        with self.writer.as_default(step=epoch + 1):
            for key, value in (logs or {}).items():
                if isinstance(value, (int, float)):
                    tf.summary.scalar(key, value)
            for b in blends(getattr(self.model, "student", self.model)):  # a Distiller trains its student
                tf.summary.scalar(f"blend/{b.name}", float(b.factor.numpy()))
                tf.summary.scalar(f"largest_input/{b.name}", float(b.peak.numpy()))
        self.writer.flush()


class Throughput(keras.callbacks.Callback):
    """Steps and samples per second of each epoch's training steps (``batch_size``
    per step): from the epoch's start to its last training batch, so the
    validation Keras runs at the epoch's end is not counted."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.per_epoch: list[dict[str, float]] = []
        self._start, self._last, self._steps = 0.0, 0.0, 0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._start, self._steps = time.perf_counter(), 0
        self._last = self._start

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self._steps += 1
        self._last = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        seconds = max(self._last - self._start, 1e-9)
        self.per_epoch.append({
            "steps_per_second": self._steps / seconds,
            "samples_per_second": self._steps * self.batch_size / seconds,
        })
