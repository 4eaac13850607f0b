"""Accuracy recovery: move a trained model from its activations to polynomials
gradually, instead of swapping them all at once and watching training collapse.

Pieces, each usable in a user's own ``model.fit``:

* :class:`Blend` -- a layer computing ``(1 - a) * source(x) + a * p(x)`` whose
  blend factor ``a`` is a (non-trainable) weight: state, saved with the model,
  not a Python closure;
* :func:`blend_model` -- the original model with every selected site turned
  into a Blend (a = 0: the original function);
* :class:`BlendSchedule` -- a callback moving every Blend's factor from 0 to 1
  over ``ramp_epochs`` (per batch, linearly);
* :class:`NaNGuard` -- a callback that, when the loss or a weight stops being
  finite, restores the last good weights and lowers the learning rate;
* :func:`distillation_loss` -- soft-target KL (Hinton et al.) blended with the
  hard-label loss, and :class:`Distiller` to train a student on it;
* :func:`finalize` -- the blended model with each Blend replaced by its
  polynomial (a must be 1), a converted model like any other;
* :func:`recover` -- all of the above in one call.

Invariant: the models passed in are not modified.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from . import registry
from .activations import Polynomial, Square
from .report import REPLACED, SKIPPED
from .rewrite import rewrite
from .sites import find_sites


@keras.saving.register_keras_serializable(package="actswap", name="Blend")
class Blend(keras.layers.Layer):
    """``(1 - a) * source(x) + a * p(x)``; ``a`` is the weight ``blend`` (starts at 0)."""

    actswap_target = True  # its weight is its own, not a copy of the original's

    def __init__(self, source: Any, coefficients: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True
        self.source_config = source
        self.source = keras.activations.get(source)
        self.coefficients = tuple(float(c) for c in coefficients)
        self.factor = self.add_weight(
            name="blend", shape=(), initializer="zeros", trainable=False,
        )

    def call(self, inputs: Any, mask: Any = None) -> Any:
        from .activations import poly_op

        a = tf.cast(self.factor, inputs.dtype)
        return (1.0 - a) * self.source(inputs) + a * poly_op(inputs, self.coefficients)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "source": self.source_config, "coefficients": list(self.coefficients)}


def blends(model: Any) -> list[Blend]:
    """Every Blend in ``model`` (as a layer or as another layer's activation), once."""
    found: dict[int, Blend] = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for candidate in (layer, getattr(layer, "activation", None)):
            if isinstance(candidate, Blend):
                found.setdefault(id(candidate), candidate)
    return list(found.values())


def _source_value(site: Any) -> Any:
    # The activation a site computes, by the name keras.activations.get knows;
    # variants with arguments (ReLU(max_value=...)) have no such name.
    if site.detail:
        raise ValueError(f"'{site.path}': {site.activation}({site.detail}) cannot be blended")
    return site.activation


def polynomials_of(converted: Any) -> dict[str, tuple[float, ...]]:
    """Layer name -> the polynomial a converted model has there (x² is (0, 0, 1)).
    Keyed by name: Keras keeps layer names unique within a model."""
    from .activations import SquareActivation, square

    out: dict[str, tuple[float, ...]] = {}
    for layer in converted._flatten_layers(include_self=False, recursive=True):
        for obj in (layer, getattr(layer, "activation", None)):
            if isinstance(obj, (Square, SquareActivation)) or obj is square:
                out.setdefault(layer.name, (0.0, 0.0, 1.0))
            elif isinstance(obj, Polynomial) or type(obj).__name__ == "PolynomialActivation":
                out.setdefault(layer.name, tuple(obj.coefficients))
    return out


def blend_model(
    original: Any, to: Any = "square", sources: Iterable[str] = ("relu",),
    polynomials: dict[str, tuple[float, ...]] | None = None, **target_options: Any,
) -> Any:
    """``original`` with each selected site (that ``to`` accepts) as a Blend at factor 0.
    With ``polynomials`` (from :func:`polynomials_of` a converted model), exactly
    those sites blend towards exactly those polynomials."""
    target = registry.get_target(to, **target_options)
    chosen = frozenset(sources)
    sites = find_sites(original)
    for s in sites:
        if polynomials is not None:
            ok = s.path.split("/")[-1] in polynomials
        else:
            ok = s.activation in chosen and target.refuses(s.activation, s.detail) is None
        s.action = REPLACED if ok else SKIPPED
    if polynomials is not None:
        def coefficients(site: Any) -> tuple[float, ...]:
            return polynomials[site.path.split("/")[-1]]
    elif target.coefficients is None:
        def coefficients(site: Any) -> tuple[float, ...]:
            return (0.0, 0.0, 1.0)
    else:
        coefficients = target.coefficients

    def make_layer(site: Any, node: dict[str, Any]) -> Any:
        return Blend(_source_value(site), coefficients(site), name=node["config"]["name"])

    def make_activation(site: Any, owner: dict[str, Any]) -> Any:
        return Blend(_source_value(site), coefficients(site))

    return rewrite(original, sites, make_layer, make_activation)


def finalize(blended: Any) -> Any:
    """The polynomial model: every Blend (factor 1) becomes its polynomial; weights kept."""
    for b in blends(blended):
        if float(b.factor.numpy()) != 1.0:
            raise ValueError(f"blend '{b.name}' is at {float(b.factor.numpy()):g}, not 1: finish the schedule first")
    sites = find_sites(blended)
    for s in sites:
        s.action = REPLACED if s.activation == "blend" else SKIPPED

    def poly_of(config: dict[str, Any]) -> tuple[float, ...]:
        return tuple(config["coefficients"])

    def make_layer(site: Any, node: dict[str, Any]) -> Any:
        coeffs = poly_of(node["config"])
        if coeffs == (0.0, 0.0, 1.0):
            return Square(name=node["config"]["name"])
        return Polynomial(coeffs, name=node["config"]["name"])

    def make_activation(site: Any, owner: dict[str, Any]) -> Any:
        from .activations import PolynomialActivation, SquareActivation

        coeffs = poly_of(owner[site.pointer[-1]]["config"])
        return SquareActivation() if coeffs == (0.0, 0.0, 1.0) else PolynomialActivation(coeffs)

    return rewrite(blended, sites, make_layer, make_activation)


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
    a weight is NaN/Inf. Good weights are kept at the end of each finite batch."""

    def __init__(self, lr_factor: float = 0.5, max_restores: int = 10) -> None:
        super().__init__()
        self.lr_factor, self.max_restores = lr_factor, max_restores
        self.restores = 0
        self.gave_up = False
        self._good: list[np.ndarray] | None = None

    def on_train_begin(self, logs: Any = None) -> None:
        self._good = [w.numpy().copy() for w in self.model.weights]

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        loss = (logs or {}).get("loss")
        finite = loss is None or np.isfinite(float(loss))
        if finite:
            finite = all(bool(np.all(np.isfinite(w.numpy()))) for w in self.model.trainable_weights)
        if finite:
            self._good = [w.numpy().copy() for w in self.model.weights]
            return
        self.restores += 1
        for w, v in zip(self.model.weights, self._good or []):
            w.assign(v)
        # The logged loss is a running mean: one NaN batch would keep it NaN
        # for the rest of the epoch and trip the guard on every later batch.
        self.model.reset_metrics()
        opt = self.model.optimizer
        opt.learning_rate.assign(float(opt.learning_rate.numpy()) * self.lr_factor)
        if self.restores > self.max_restores:
            self.gave_up = True
            self.model.stop_training = True


def distillation_loss(y_true: Any, student_logits: Any, teacher_logits: Any,
                      temperature: float = 4.0, alpha: float = 0.5) -> Any:
    """``alpha * T² * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(y, softmax(s))``,
    averaged over the batch (sparse integer labels)."""
    t = tf.nn.softmax(teacher_logits / temperature)
    log_s = tf.nn.log_softmax(student_logits / temperature)
    kl = tf.reduce_sum(t * (tf.math.log(tf.clip_by_value(t, 1e-12, 1.0)) - log_s), axis=-1)
    ce = tf.keras.losses.sparse_categorical_crossentropy(y_true, student_logits, from_logits=True)
    return tf.reduce_mean(alpha * temperature**2 * kl + (1.0 - alpha) * ce)


def _probabilities(model: Any) -> bool:
    """True when the model ends in a softmax (its outputs are probabilities, not logits)."""
    last = model.layers[-1]
    act = getattr(last, "activation", None)
    return getattr(act, "__name__", "") == "softmax" or type(last).__name__ == "Softmax"


class Distiller(keras.Model):
    """Trains ``student`` on :func:`distillation_loss` against a frozen ``teacher``."""

    def __init__(self, student: Any, teacher: Any, temperature: float = 4.0, alpha: float = 0.5, **kwargs: Any):
        super().__init__(**kwargs)
        self.student, self.teacher = student, teacher
        self.temperature, self.alpha = temperature, alpha
        # The teacher is not frozen by setting teacher.trainable (that would
        # change the user's model); only the student's variables are updated.
        self.student_probs, self.teacher_probs = _probabilities(student), _probabilities(teacher)
        # Keras reports epoch logs from tracked metrics, not from train_step's return value.
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")

    @property
    def metrics(self) -> list[Any]:
        return [self.loss_tracker, self.accuracy_tracker]

    def call(self, x: Any, training: bool = False) -> Any:
        return self.student(x, training=training)

    @staticmethod
    def _logits(y: Any, probs: bool) -> Any:
        return tf.math.log(tf.clip_by_value(y, 1e-12, 1.0)) if probs else y

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y = data[0], data[1]
        teacher = self._logits(self.teacher(x, training=False), self.teacher_probs)
        with tf.GradientTape() as tape:
            student = self._logits(self.student(x, training=True), self.student_probs)
            loss = distillation_loss(y, student, teacher, self.temperature, self.alpha)
        variables = self.student.trainable_variables
        grads = tape.gradient(loss, variables)
        self.optimizer.apply(grads, variables)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, data: Any) -> dict[str, Any]:
        x, y = data[0], data[1]
        pred = self.student(x, training=False)
        correct = tf.cast(tf.equal(tf.argmax(pred, -1), tf.cast(tf.reshape(y, [-1]), tf.int64)), tf.float32)
        self.accuracy_tracker.update_state(tf.reduce_mean(correct))
        return {"accuracy": self.accuracy_tracker.result()}


def recover(
    original: Any,
    converted: Any,
    train: Any,
    val: Any = None,
    *,
    epochs: int = 2,
    ramp_epochs: float = 0.5,
    progressive: bool = False,
    distill: bool = True,
    temperature: float = 4.0,
    alpha: float = 0.5,
    learning_rate: float = 2e-3,
    clipnorm: float = 1.0,
    batch_size: int = 128,
    callbacks: Iterable[Any] = (),
    strategy: Any = None,
    max_restores: int = 10,
    verbose: int = 0,
) -> tuple[Any, Any]:
    """Fine-tune ``original`` towards ``converted``'s polynomials without the collapse.

    Each site of ``converted`` that is a polynomial starts as ``original``'s
    activation and is blended into the polynomial over ``ramp_epochs``
    (:class:`BlendSchedule`), with distillation from ``original``
    (``distill``), gradient clipping and a NaN/Inf guard; after ``epochs`` the
    blends are finalized. ``train``/``val`` are (x, y) arrays or
    ``tf.data.Dataset`` s of (x, y). Returns the recovered (polynomial) model
    and the Keras History. ``strategy`` (a ``tf.distribute`` strategy) scopes
    model building and training. If the NaN guard has to give up (more than
    ``max_restores`` restores), a ConversionError is raised rather than a
    diverged model returned.
    """
    import contextlib

    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        student = blend_model(original, polynomials=polynomials_of(converted))
        teacher = original
        optimizer = keras.optimizers.Adam(learning_rate, clipnorm=clipnorm)
        if distill:
            model = Distiller(student, teacher, temperature, alpha)
            model.compile(optimizer=optimizer)
        else:
            model = student
            model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    schedule = BlendSchedule(ramp_epochs, progressive)
    guard = NaNGuard(max_restores=max_restores)
    fit_kwargs: dict[str, Any] = {"epochs": epochs, "verbose": verbose, "callbacks": [schedule, guard, *callbacks]}
    if isinstance(train, tf.data.Dataset):
        history = model.fit(train, validation_data=val, **fit_kwargs)
    else:
        history = model.fit(train[0], train[1], batch_size=batch_size, validation_data=val, **fit_kwargs)
    if guard.gave_up:
        from .errors import ConversionError

        raise ConversionError(
            f"recovery diverged: the loss or weights became NaN/Inf {guard.restores} times and "
            "restoring the last good weights did not help (x² activations overflow once the blend "
            "reaches the polynomial); try a shorter --ramp, a larger --lr, more epochs, or clip:C gradients"
        )
    for b in blends(student):
        b.factor.assign(1.0)  # the ramp has ended (ramp_epochs <= epochs), or it is forced here
    history.nan_restores = guard.restores
    history.blend_factors = schedule.history
    return finalize(student), history


def accuracy(model: Any, x: Any, y: Any, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on (x, y); NaN outputs count as wrong."""
    pred = model.predict(x, batch_size=batch_size, verbose=0)
    ok = np.all(np.isfinite(pred), axis=-1) & (np.argmax(pred, -1) == np.asarray(y).reshape(-1))
    return float(np.mean(ok))


def load_xy(path: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from an .npz with arrays named ``x`` (inputs) and ``y`` (integer labels)."""
    from .errors import UserError
    from .paths import read_arrays

    arrays = read_arrays(path, what)
    if "x" not in arrays or "y" not in arrays:
        raise UserError(f"{what} '{path}' has arrays {sorted(arrays)}; it needs 'x' (inputs) and 'y' (labels)")
    if len(arrays["x"]) != len(arrays["y"]):
        raise UserError(f"{what} '{path}': x has {len(arrays['x'])} rows but y has {len(arrays['y'])}")
    return arrays["x"], arrays["y"]
