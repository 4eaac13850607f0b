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
    """``(1 - a) * source(x) + a * p(x)``; ``a`` is the weight ``blend`` (starts at 0).

    For x² (``coefficients`` (0, 0, 1)), ``p(x) = scale * (x + shift)²``: the
    shifted square that :func:`finalize` turns into ``Square(scale=scale)``
    with ``shift`` folded into the layer producing x (:mod:`actswap.shifts`);
    ``scale`` is a (non-trainable) weight, ``shift`` a constant.
    """

    actswap_target = True  # its weight is its own, not a copy of the original's

    def __init__(self, source: Any, coefficients: Any, scale: float = 1.0, shift: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True
        self.source_config = source
        self.source = keras.activations.get(source)
        self.coefficients = tuple(float(c) for c in coefficients)
        self.is_square = self.coefficients == SQUARE
        if not self.is_square and (scale != 1.0 or shift != 0.0):
            raise ValueError(f"scale and shift are for x² only, not the polynomial {self.coefficients}")
        self.shift = float(shift)
        self.factor = self.add_weight(
            name="blend", shape=(), initializer="zeros", trainable=False,
        )
        # Largest |input| of the last training batch: what the guard watches.
        self.peak = self.add_weight(name="peak", shape=(), initializer="zeros", trainable=False,
                                    aggregation="mean")
        self.scale = self.add_weight(name="scale", shape=(), initializer=keras.initializers.Constant(scale),
                                     trainable=False) if self.is_square else None

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        from .activations import poly_op

        a = tf.cast(self.factor, inputs.dtype)
        if training:
            self.peak.assign(tf.cast(tf.reduce_max(tf.abs(tf.stop_gradient(inputs))), tf.float32))
        if self.is_square:
            p = poly_op(inputs + self.shift if self.shift else inputs, SQUARE) * tf.cast(self.scale, inputs.dtype)
        else:
            p = poly_op(inputs, self.coefficients)
        return (1.0 - a) * self.source(inputs) + a * p

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = {**super().get_config(), "source": self.source_config, "coefficients": list(self.coefficients)}
        if self.is_square:
            config.update(scale=float(self.scale.numpy()), shift=self.shift)
        return config


SQUARE = (0.0, 0.0, 1.0)


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
    """Layer name -> the polynomial a converted model has there (x² is (0, 0, 1),
    a scaled square ``s·x²`` is (0, 0, s)). Keyed by name: Keras keeps layer
    names unique within a model."""
    from .activations import SquareActivation, square

    out: dict[str, tuple[float, ...]] = {}
    for layer in converted._flatten_layers(include_self=False, recursive=True):
        for obj in (layer, getattr(layer, "activation", None)):
            if isinstance(obj, (Square, SquareActivation)):
                out.setdefault(layer.name, (0.0, 0.0, obj.scale))
            elif obj is square:
                out.setdefault(layer.name, SQUARE)
            elif isinstance(obj, Polynomial) or type(obj).__name__ == "PolynomialActivation":
                out.setdefault(layer.name, tuple(obj.coefficients))
    return out


def blend_model(
    original: Any, to: Any = "square", sources: Iterable[str] = ("relu",),
    polynomials: dict[str, tuple[float, ...]] | None = None,
    squares: dict[str, tuple[float, float]] | None = None,
    **target_options: Any,
) -> Any:
    """``original`` with each selected site (that ``to`` accepts) as a Blend at factor 0.
    With ``polynomials`` (from :func:`polynomials_of` a converted model), exactly
    those sites blend towards exactly those polynomials. ``squares`` (layer name
    -> (scale, shift)): those x² sites blend towards ``scale·(x + shift)²``
    (:func:`fit_squares`)."""
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
            return SQUARE
    else:
        coefficients = target.coefficients

    def blend(site: Any, **kwargs: Any) -> Blend:
        c = tuple(coefficients(site))
        name = site.path.split("/")[-1]
        if _monomial(c):
            scale, shift = (squares or {}).get(name, (c[2], 0.0))
            return Blend(_source_value(site), SQUARE, scale=scale, shift=shift, **kwargs)
        return Blend(_source_value(site), c, **kwargs)

    def make_layer(site: Any, node: dict[str, Any]) -> Any:
        return blend(site, name=node["config"]["name"])

    def make_activation(site: Any, owner: dict[str, Any]) -> Any:
        return blend(site)

    return rewrite(original, sites, make_layer, make_activation)


def _monomial(c: tuple[float, ...]) -> bool:
    """s·x² with s > 0 (a square, scaled or not)."""
    return len(c) == 3 and c[0] == 0.0 and c[1] == 0.0 and c[2] > 0


def fit_squares(original: Any, polynomials: dict[str, tuple[float, ...]], x: Any) -> dict[str, tuple[float, float]]:
    """Range-aware start for the x² sites of ``polynomials``: per site, the
    shifted square ``s·(z + b)²`` that is the least-squares quadratic to the
    source activation on the site's measured input range [-R, R] (``original``
    run on inputs ``x``), when ``b`` can be folded into the layer producing z
    (:func:`actswap.shifts.producers`); elsewhere ``b = 0`` and ``s`` is that
    quadratic's x² coefficient. Layer name -> (s, b)."""
    from .calibrate import calibrate
    from .shifts import producers

    foldable = producers(original)
    sites = [s for s in find_sites(original) if s.path.split("/")[-1] in polynomials
             and _monomial(tuple(polynomials[s.path.split("/")[-1]]))]
    ranges = calibrate(original, sites, x)
    out: dict[str, tuple[float, float]] = {}
    for s in sites:
        r = ranges.get(s.path)
        name = s.path.split("/")[-1]
        if r is None or s.detail or s.path != name:
            continue
        bound = max(abs(r.min), abs(r.max), 1e-3)
        c0, c1, c2 = registry.fit_coefficients(s.activation, s.detail, 2, (-bound, bound))
        if c2 <= 0:
            continue
        out[name] = (c2, c1 / (2.0 * c2) if name in foldable else 0.0)
    return out


def _blend_by_layer(model: Any) -> dict[str, Blend]:
    """Layer name -> the Blend it is or holds as its activation. (A Blend held as
    an activation is also a sub-layer of its owner; it is listed under the owner.)"""
    layers = list(model._flatten_layers(include_self=False, recursive=True))
    out: dict[str, Blend] = {}
    owned = set()
    for layer in layers:
        act = getattr(layer, "activation", None)
        if isinstance(act, Blend):
            out.setdefault(layer.name, act)
            owned.add(id(act))
    for layer in layers:
        if isinstance(layer, Blend) and id(layer) not in owned:
            out.setdefault(layer.name, layer)
    return out


def finalize(blended: Any) -> Any:
    """The polynomial model: every Blend (factor 1) becomes its polynomial (x²:
    ``Square(scale=s)``, its shift folded into the layer producing its input,
    :mod:`actswap.shifts`); weights kept. ``blended`` is not modified."""
    from .shifts import fold, producers

    for b in blends(blended):
        if float(b.factor.numpy()) != 1.0:
            raise ValueError(f"blend '{b.name}' is at {float(b.factor.numpy()):g}, not 1: finish the schedule first")
    sites = find_sites(blended)
    for s in sites:
        s.action = REPLACED if s.activation == "blend" else SKIPPED
    by_layer = _blend_by_layer(blended)
    shifted = {name: b.shift for name, b in by_layer.items() if b.is_square and b.shift}
    where = producers(blended) if shifted else {}
    missing = sorted(set(shifted) - set(where))
    if missing:
        raise ValueError(f"blend(s) {missing} have a shift but no layer to fold it into")

    def square_scale(site: Any) -> float | None:
        b = by_layer[site.path.split("/")[-1]]
        return float(b.scale.numpy()) if b.is_square else None

    def make_layer(site: Any, node: dict[str, Any]) -> Any:
        scale = square_scale(site)
        if scale is not None:
            return Square(scale=scale, name=node["config"]["name"])
        return Polynomial(tuple(node["config"]["coefficients"]), name=node["config"]["name"])

    def make_activation(site: Any, owner: dict[str, Any]) -> Any:
        from .activations import PolynomialActivation, SquareActivation

        scale = square_scale(site)
        if scale is not None:
            return SquareActivation(scale=scale)
        return PolynomialActivation(tuple(owner[site.pointer[-1]]["config"]["coefficients"]))

    final = rewrite(blended, sites, make_layer, make_activation)
    for name, shift in shifted.items():
        fold(final, where[name], shift)
    return final


def reestimate_statistics(model: Any, batches: Iterable[Any]) -> int:
    """Recompute the inference statistics of ``model`` -- BatchNormalization's
    moving mean and variance -- as exact
    averages over ``batches`` (inputs only) run in training mode, instead of the
    moving averages left by training (which lag behind the weights' last steps;
    x² amplifies any lag). No weight other than those statistics changes. Returns
    the number of batches used."""
    layers = [layer for layer in model._flatten_layers(include_self=False, recursive=True)
              if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]

    momenta = [layer.momentum for layer in layers]
    n = 0
    try:
        for n, x in enumerate(batches, start=1):
            for layer in layers:
                layer.momentum = (n - 1) / n  # running mean over the batches so far
            model(x, training=True)
    finally:
        for layer, m in zip(layers, momenta):
            layer.momentum = m
    return n


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
    ``warmup`` batches, the loss's floored at 1). Good weights are kept at the
    end of each good batch. ``restores`` counts both kinds, ``explosions`` the
    finite ones."""

    def __init__(self, lr_factor: float = 0.5, max_restores: int = 10, explode_factor: float = 1e3,
                 warmup: int = 10) -> None:
        super().__init__()
        self.lr_factor, self.max_restores = lr_factor, max_restores
        self.explode_factor, self.warmup = float(explode_factor), int(warmup)
        self.restores = 0
        self.explosions = 0
        self.gave_up = False
        self.last_reason = ""
        self._good: list[np.ndarray] | None = None
        self._early: list[tuple[float, list[float]]] = []

    def on_train_begin(self, logs: Any = None) -> None:
        self._good = [w.numpy().copy() for w in self.model.weights]
        self._blends = blends(self.model)

    def _peaks(self) -> list[float]:
        return [float(b.peak.numpy()) for b in self._blends]

    def _explosion(self, loss: float | None) -> str:
        peaks = self._peaks()
        if len(self._early) < self.warmup:
            self._early.append((loss if loss is not None else 0.0, peaks))
            return ""
        ref_loss = max(float(np.median([e[0] for e in self._early])), 1.0)
        if loss is not None and loss > self.explode_factor * ref_loss:
            return f"loss {loss:.3g} is over {self.explode_factor:g}x its early value {ref_loss:.3g}"
        for b, p, ref in zip(self._blends, peaks, np.median([e[1] for e in self._early], axis=0).reshape(-1)):
            if ref > 0 and p > self.explode_factor * ref:
                return f"largest |input| at '{b.name}' is {p:.3g}, over {self.explode_factor:g}x its early {ref:.3g}"
        return ""

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        loss = (logs or {}).get("loss")
        loss = None if loss is None else float(loss)
        finite = loss is None or np.isfinite(loss)
        if finite:
            finite = all(bool(np.all(np.isfinite(w.numpy()))) for w in self.model.trainable_weights)
        reason = "" if finite else "the loss or a weight is NaN/Inf"
        if finite:
            reason = self._explosion(loss)
            if not reason:
                self._good = [w.numpy().copy() for w in self.model.weights]
                return
            self.explosions += 1
        self.last_reason = reason
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
            if self.student.losses:  # e.g. Blend range penalties
                loss = loss + tf.add_n(self.student.losses)
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


MAX_DROP = 1.0  # points of accuracy a recovery may lose against the original before it fails
REESTIMATE_BATCHES = 200
CHECK_SAMPLES = 10_000


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
    fit: bool = True,
    max_drop: float | None = MAX_DROP,
    verbose: int = 0,
) -> tuple[Any, Any]:
    """Fine-tune ``original`` towards ``converted``'s polynomials without the collapse.

    Each site of ``converted`` that is a polynomial starts as ``original``'s
    activation and is blended into the polynomial over ``ramp_epochs``
    (:class:`BlendSchedule`), with distillation from ``original``
    (``distill``), gradient clipping and a guard against NaN/Inf and finite
    explosions (:class:`NaNGuard`). With ``fit`` (default), an x² site blends
    towards the shifted square ``s·(z + b)²`` closest to the source on the
    site's measured range (:func:`fit_squares`; the first batches of ``train``)
    and ends as ``s·x²`` with ``b`` folded into the layer before it: what
    keeps deep networks (residual sums feeding squares) from compounding
    magnitudes. After ``epochs`` the inference statistics
    (BatchNorm, scales) are re-estimated on training batches
    (:func:`reestimate_statistics`) and the blends finalized.

    The result is then checked on ``val`` (else on a held-out tenth of
    ``train`` when it is arrays, which is then not trained on; a Dataset
    without ``val`` is checked on its own first batches): non-finite outputs,
    or an accuracy more than ``max_drop`` points below the original's there,
    raise :class:`~actswap.errors.RecoveryFailedError` naming the sites whose
    inputs grew the most (``max_drop=None`` skips the accuracy test, never the
    finite one). ``train``/``val`` are (x, y) arrays or ``tf.data.Dataset`` s
    of (x, y). Returns the recovered model and the Keras History, which also
    carries ``nan_restores``, ``explosions``, ``blend_factors`` and ``check``
    (the accuracies compared). ``strategy`` (a ``tf.distribute`` strategy)
    scopes model building and training. A guard that gives up (more than
    ``max_restores`` restores) raises a ConversionError.
    """
    import contextlib

    from .errors import ConversionError

    check = val
    if val is None and not isinstance(train, tf.data.Dataset):
        x, y = np.asarray(train[0]), np.asarray(train[1])
        held = max(1, min(len(x) // 10, CHECK_SAMPLES)) if len(x) > 1 else 0
        train, check = (x[: len(x) - held], y[: len(y) - held]), (x[len(x) - held:], y[len(y) - held:])
    elif val is None:
        check = train.take(max(1, CHECK_SAMPLES // batch_size))
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        polynomials = polynomials_of(converted)
        squares = fit_squares(original, polynomials, _calibration_inputs(train, batch_size)) if fit else None
        student = blend_model(original, polynomials=polynomials, squares=squares)
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
        raise ConversionError(
            f"recovery diverged: training was restored {guard.restores} times ({guard.last_reason}) and "
            "restoring the last good weights did not help (x² activations overflow once the blend "
            "reaches the polynomial); try a shorter --ramp, a larger --lr, more epochs, or clip:C gradients"
        )
    for b in blends(student):
        b.factor.assign(1.0)  # the ramp has ended (ramp_epochs <= epochs), or it is forced here
    reestimate_statistics(student, _inputs(train, batch_size, REESTIMATE_BATCHES))
    history.nan_restores = guard.restores
    history.explosions = guard.explosions
    history.blend_factors = schedule.history
    recovered = finalize(student)
    history.check = check_recovery(original, recovered, check, max_drop=max_drop, batch_size=batch_size)
    return recovered, history


CALIBRATION_SAMPLES = 2048


def _calibration_inputs(train: Any, batch_size: int) -> Any:
    """The first CALIBRATION_SAMPLES inputs of ``train`` (arrays or a Dataset of (x, y))."""
    if isinstance(train, tf.data.Dataset):
        return np.concatenate([np.asarray(x) for x in _inputs(train, batch_size, CALIBRATION_SAMPLES // batch_size + 1)])
    return np.asarray(train[0][:CALIBRATION_SAMPLES])


def _inputs(data: Any, batch_size: int, limit: int) -> Iterable[Any]:
    """Up to ``limit`` input batches of (x, y) arrays or a Dataset of (x, y)."""
    if isinstance(data, tf.data.Dataset):
        for item in data.take(limit):
            yield item[0] if isinstance(item, (tuple, list)) else item
        return
    x = data[0]
    for i in range(0, min(len(x), limit * batch_size), batch_size):
        yield x[i: i + batch_size]


def _xy(data: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(data, tf.data.Dataset):
        xs, ys = zip(*[(np.asarray(a), np.asarray(b)) for a, b, *_ in data])
        return np.concatenate(xs), np.concatenate(ys)
    return np.asarray(data[0]), np.asarray(data[1])


def check_recovery(original: Any, recovered: Any, data: Any, *, max_drop: float | None = MAX_DROP,
                   batch_size: int = 256) -> dict[str, Any]:
    """Compare ``recovered`` with ``original`` on ``data`` ((x, y) or a Dataset):
    raise :class:`~actswap.errors.RecoveryFailedError` if its outputs are not
    all finite, or its accuracy is more than ``max_drop`` points below the
    original's (None: not checked). Returns the figures compared."""
    from .errors import RecoveryFailedError

    x, y = _xy(data)
    pred = recovered.predict(x, batch_size=batch_size, verbose=0)
    nonfinite = int(np.size(pred) - np.isfinite(pred).sum())
    result = {
        "samples": int(len(x)), "original_accuracy": accuracy(original, x, y, batch_size),
        "recovered_accuracy": accuracy(recovered, x, y, batch_size), "nonfinite_outputs": nonfinite,
        "max_drop": max_drop,
    }
    drop = 100.0 * (result["original_accuracy"] - result["recovered_accuracy"])
    if nonfinite:
        why = f"its outputs on the check data hold {nonfinite} NaN/Inf value(s)"
    elif max_drop is not None and drop > max_drop:
        why = (f"its accuracy on the check data is {100 * result['recovered_accuracy']:.2f}%, "
               f"{drop:.2f} points below the original's {100 * result['original_accuracy']:.2f}% "
               f"(allowed: {max_drop:g})")
    else:
        return result
    grown = site_growth(original, recovered, x[:512])
    result["site_growth"] = grown
    worst = ", ".join(f"'{g['site']}' |x| {g['recovered']:.3g} vs {g['original']:.3g}" for g in grown[:3])
    raise RecoveryFailedError(
        f"recovery failed: {why} ({len(x)} samples); largest input growth per site: {worst or 'none'}; "
        "try more epochs, a lower --lr, or more data",
        model=recovered, result=result,
    )


def site_growth(original: Any, recovered: Any, x: Any) -> list[dict[str, Any]]:
    """Per replaced site, the largest |input| in ``recovered`` against that in
    ``original`` on inputs ``x``, largest ratio first."""
    from .calibrate import calibrate

    new_sites = [s for s in find_sites(recovered) if s.activation in ("square", "poly")]
    names = {s.path for s in new_sites}
    old_sites = [s for s in find_sites(original) if s.path in names]
    try:
        before, after = calibrate(original, old_sites, x), calibrate(recovered, new_sites, x)
    except Exception:  # noqa: BLE001 - the failure is reported either way; this only adds detail
        return []

    def peak(r: Any) -> float:
        return max(abs(r.min), abs(r.max)) if r is not None else float("inf")

    rows = []
    for path in sorted(names):
        b, a = before.get(path), after.get(path)
        o, n = peak(b), peak(a)
        rows.append({"site": path, "original": o, "recovered": n, "ratio": n / o if o else float("inf")})
    return sorted(rows, key=lambda r: -r["ratio"] if np.isfinite(r["ratio"]) else float("-inf"))


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
