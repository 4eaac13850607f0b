"""What runs during a recovery's ``fit``: the blend schedule, the guard against
NaN/Inf and finite explosions, and distillation from the original.

Invariant: the teacher model is never changed (only the student's variables
are trained).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from .blend import blends


class BlendSchedule(keras.callbacks.Callback):
    """Move every Blend's factor from 0 to 1 over ``ramp_epochs`` epochs, updated
    each batch (``steps_per_epoch`` is read from the fit).

    ``progressive=False``: all sites move together, linearly. ``progressive=True``:
    sites move one after another in model order (input side first), each over
    a window of ``2 * ramp / (n + 1)`` epochs starting when the previous one is
    halfway, so later layers adapt to each change before their own site moves;
    the last site still reaches 1 at ``ramp_epochs``.
    """

    def __init__(self, ramp_epochs: float = 1.0, progressive: bool = False) -> None:
        super().__init__()
        self.ramp_epochs = float(ramp_epochs)
        self.progressive = progressive
        self.epoch = 0
        self.history: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def factors(self, n: int, epoch: int, batch: int, steps: int) -> list[float]:
        """The factor of each of ``n`` sites after batch ``batch`` of ``epoch``."""
        if self.ramp_epochs <= 0:
            return [1.0] * n
        t = (epoch + (batch + 1) / max(steps, 1)) / self.ramp_epochs  # ramp progress, 1 = done
        if not self.progressive or n <= 1:
            return [float(min(1.0, t))] * n
        w = 2.0 / (n + 1)
        return [float(np.clip((t - i * w / 2) / w, 0.0, 1.0)) for i in range(n)]

    def on_train_begin(self, logs: Any = None) -> None:
        self._blends = blends(self.model)

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        steps = self.params.get("steps") or 1
        values = self.factors(len(self._blends), self.epoch, batch, steps)
        for b, a in zip(self._blends, values):
            b.factor.assign(a)
        self.history.append(float(np.mean(values)) if values else 1.0)


class NaNGuard(keras.callbacks.Callback):
    """Restore the last good weights and lower the learning rate when the loss or
    a weight is NaN/Inf, or when training explodes while staying finite: the
    (running) loss, or the largest |input| of a Blend site, grows more than
    ``explode_factor`` times past its reference (the median over the first
    ``warmup`` batches, the loss's floored at 1). ``restores`` counts both
    kinds, ``explosions`` the finite ones.

    The loss, the weights and the sites' inputs are read, and the good weights
    kept, after each of the first ``warmup`` batches and then every
    ``check_every`` batches: each read waits for the device, and doing it
    every batch cost ~30% of the steps per second of a small CNN
    (benchmarks/recovery_scale.py). A restore goes back at most
    ``check_every`` batches."""

    def __init__(self, lr_factor: float = 0.5, max_restores: int = 10, explode_factor: float = 1e3,
                 warmup: int = 10, check_every: int = 10) -> None:
        super().__init__()
        self.lr_factor, self.max_restores = lr_factor, max_restores
        self.explode_factor, self.warmup = float(explode_factor), int(warmup)
        self.check_every = max(1, int(check_every))
        self.restores = 0
        self.explosions = 0
        self.gave_up = False
        self.last_reason = ""
        self._good: list[Any] | None = None
        self._early: list[tuple[float, list[float]]] = []
        self._since = 0

    def on_train_begin(self, logs: Any = None) -> None:
        # The good weights are kept on the device: keeping them is an assign,
        # not a copy to the host that waits for the step to finish.
        self._good = [tf.Variable(w, trainable=False) for w in self.model.weights]
        self._blends = blends(self.model)
        weights = [w for w in self.model.trainable_weights if keras.backend.is_float_dtype(w.dtype)]
        self._all_finite = tf.function(
            lambda: tf.reduce_all([tf.reduce_all(tf.math.is_finite(w)) for w in weights]) if weights else True
        )

    def _keep(self) -> None:
        for good, w in zip(self._good, self.model.weights):
            good.assign(w)

    def _peaks(self) -> list[float]:
        return [float(b.peak.numpy()) for b in self._blends]

    def _explosion(self, loss: float | None) -> str:
        if len(self._early) < self.warmup:
            self._early.append((loss if loss is not None else 0.0, self._peaks()))
            return ""
        ref_loss = max(float(np.median([e[0] for e in self._early])), 1.0)
        if loss is not None and loss > self.explode_factor * ref_loss:
            return f"loss {loss:.3g} is over {self.explode_factor:g}x its early value {ref_loss:.3g}"
        peaks = self._peaks()
        for b, p, ref in zip(self._blends, peaks, np.median([e[1] for e in self._early], axis=0).reshape(-1)):
            if ref > 0 and p > self.explode_factor * ref:
                return f"largest |input| at '{b.name}' is {p:.3g}, over {self.explode_factor:g}x its early {ref:.3g}"
        return ""

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self._since += 1
        if not (len(self._early) < self.warmup or self._since >= self.check_every):
            return  # reading the loss would wait for the device too
        loss = (logs or {}).get("loss")
        loss = None if loss is None else float(loss)
        finite = loss is None or np.isfinite(loss)
        if finite:
            finite = bool(self._all_finite())
        reason = "" if finite else "the loss or a weight is NaN/Inf"
        if finite:
            reason = self._explosion(loss)
            if not reason:
                self._keep()
                self._since = 0
                return
            self.explosions += 1
        self.last_reason = reason
        self.restores += 1
        self._since = 0
        for w, good in zip(self.model.weights, self._good or []):
            w.assign(good)
        # The logged loss is a running mean: one NaN batch would keep it NaN
        # for the rest of the epoch and trip the guard on every later batch.
        self.model.reset_metrics()
        opt = self.model.optimizer
        opt.learning_rate.assign(float(opt.learning_rate.numpy()) * self.lr_factor)
        if self.restores > self.max_restores:
            self.gave_up = True
            self.model.stop_training = True


def distillation_losses(y_true: Any, student_logits: Any, teacher_logits: Any,
                        temperature: float = 4.0, alpha: float = 0.5) -> Any:
    """Per example: ``alpha * T² * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(y, softmax(s))``
    (sparse integer labels): the ``kl`` record of :mod:`.outputs` on one logits head."""
    from .outputs import LOSSES, Head

    head = Head("output", 0, "linear", "kl", teacher_probs=False, student_probs=False, labelled=True)
    kl = LOSSES["kl"]
    return alpha * kl.distil(teacher_logits, student_logits, head, temperature) + \
        (1.0 - alpha) * kl.fit(y_true, student_logits, head)


def distillation_loss(y_true: Any, student_logits: Any, teacher_logits: Any,
                      temperature: float = 4.0, alpha: float = 0.5) -> Any:
    """:func:`distillation_losses` averaged over the batch."""
    return tf.reduce_mean(distillation_losses(y_true, student_logits, teacher_logits, temperature, alpha))


def per_example_loss(model: Any, x: Any, y: Any, training: bool = True) -> Any:
    """The loss of each example of ``x`` (with labels ``y``, or None) for a
    :class:`Distiller`: summed over its heads, each ``alpha`` parts distillation
    from the teacher and ``1 - alpha`` parts its labels. A head without labels
    in ``y`` takes the teacher's pseudo-labels where its loss has them
    (``LossKind.pseudo``, with ``pseudo_labels``), else distillation alone at
    ``label_free_temperature`` (``alpha = 0`` and no labels is refused before
    training, :func:`check_trainable`)."""
    import keras

    from .outputs import LOSSES, labels_per_head

    heads = model.heads
    labels = labels_per_head(y, [h.name for h in heads])
    needs_teacher = model.alpha > 0 or any(label is None for label in labels)
    teacher = keras.tree.flatten(model.teacher(x, training=False)) if needs_teacher else None
    student = keras.tree.flatten(model.student(x, training=training))
    total = None
    for head, label in zip(heads, labels):
        kind = LOSSES[head.loss]
        s = student[head.index]
        if label is None and model.pseudo_labels and kind.pseudo is not None:
            label = kind.pseudo(teacher[head.index], head)
        if label is None:
            term = kind.distil(teacher[head.index], s, head, model.label_free_temperature)
        elif model.alpha == 0:
            term = kind.fit(label, s, head)
        else:
            term = model.alpha * kind.distil(teacher[head.index], s, head, model.temperature) + \
                (1.0 - model.alpha) * kind.fit(label, s, head)
        total = term if total is None else total + term
    return total


def check_trainable(heads: Any, labelled: bool, alpha: float) -> None:
    """Refuse, before any training, a head with neither a teacher nor labels."""
    from ..errors import UserError

    if alpha == 0 and (not labelled or not all(h.labelled for h in heads)):
        missing = [h.name for h in heads if not (labelled and h.labelled)]
        raise UserError(f"--no-distill trains on labels alone, and output(s) {missing} have none in the "
                        "training data; drop --no-distill (the original then teaches them)")


# Without labels, a classifier's output trains on the teacher's top-1 classes
# as labels (pseudo-labels), mixed with soft targets at T = 4 as labels are:
# soft targets alone underfit the decisions, which the labels' cross-entropy
# sharpens. ResNet-20, seed 0 of benchmarks/recovery_general.py (labelled
# recovery 97.82%): 97.34% at T = 4 alone, 96.94% at T = 1 alone, 97.54% with
# pseudo-labels; over ResNet-20 and a VGG, 3 seeds each, pseudo-labels landed
# 0.00-0.28 points below labelled recovery (docs/benchmarks.md).
# LABEL_FREE_TEMPERATURE is the temperature of distillation alone
# (pseudo_labels=False): 1, where the committed fixture did best alone (3
# epochs, seed 0: 92.95% at T = 4, 93.25% at T = 2, 94.20% at T = 1; with
# pseudo-labels 93.25%, with labels 93.85%): a small model, which the deep
# CNNs the default is chosen for do not follow.
LABEL_FREE_TEMPERATURE = 1.0


class Distiller(keras.Model):
    """Trains ``student`` against a frozen ``teacher``, one loss per output
    (``heads``, :mod:`.outputs`; default: every output a classifier with
    integer labels, :func:`~.outputs.classifier_heads`): ``alpha`` parts
    distillation at ``temperature``, ``1 - alpha`` parts labels where the
    batch has them; where it has none, the same mix with the teacher's
    pseudo-labels (``pseudo_labels``, for losses that have them), else
    distillation alone at ``label_free_temperature``. Batches are ``x``,
    ``(x,)`` or ``(x, y)`` (``keras.utils.unpack_x_y_sample_weight``)."""

    def __init__(self, student: Any, teacher: Any, temperature: float = 4.0, alpha: float = 0.5,
                 heads: Any = None, pseudo_labels: bool = True,
                 label_free_temperature: float = LABEL_FREE_TEMPERATURE, **kwargs: Any):
        super().__init__(**kwargs)
        from .outputs import classifier_heads

        self.student, self.teacher = student, teacher
        self.temperature, self.alpha = temperature, alpha
        self.pseudo_labels, self.label_free_temperature = pseudo_labels, label_free_temperature
        # The teacher is not frozen by setting teacher.trainable (that would
        # change the user's model); only the student's variables are updated.
        self.heads = list(heads) if heads is not None else classifier_heads(teacher, student)
        # Validation accuracy is a classifier's figure; every model has a loss.
        self.classifies = self.heads[0].loss == "kl" and self.heads[0].labelled
        # Keras reports epoch logs from tracked metrics, not from train_step's return value.
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")

    @property
    def metrics(self) -> list[Any]:
        return [self.loss_tracker, self.accuracy_tracker] if self.classifies else [self.loss_tracker]

    def call(self, x: Any, training: bool = False) -> Any:
        return self.student(x, training=training)

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        # The optimizer sums the replicas' gradients (an all-reduce): each
        # replica contributes its share of the mean, as Keras' own losses do.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example_loss(self, x, y))
            if self.student.losses:  # e.g. Blend range penalties
                loss = loss + tf.add_n(self.student.losses)
            share = loss / replicas
        variables = self.student.trainable_variables
        grads = tape.gradient(share, variables)
        self.optimizer.apply(grads, variables)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, data: Any) -> dict[str, Any]:
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        if not self.classifies or y is None:
            self.loss_tracker.update_state(tf.reduce_mean(per_example_loss(self, x, y, training=False)))
            return {"loss": self.loss_tracker.result()}
        pred = keras.tree.flatten(self.student(x, training=False))[self.heads[0].index]
        from .outputs import labels_per_head

        label = labels_per_head(y, [h.name for h in self.heads])[0]
        if len(label.shape) == len(pred.shape):  # one-hot rows
            label = tf.argmax(label, -1)
        correct = tf.cast(tf.equal(tf.argmax(pred, -1), tf.cast(tf.reshape(label, [-1]), tf.int64)), tf.float32)
        self.accuracy_tracker.update_state(tf.reduce_mean(correct))
        return {"accuracy": self.accuracy_tracker.result()}
