"""``recover()``: blend, train, re-estimate, finalize, and check the result --
a recovery that did not recover raises instead of returning a broken model.

Training data is ``(x, y)``, ``(x, None)`` or ``x`` arrays, or a
``tf.data.Dataset`` of ``x``, ``(x,)`` or ``(x, y)`` batches; ``y`` is one
array, a list or a dict by output name. Without labels the original alone
teaches (distillation); each output is trained and checked by what it is
(:mod:`.outputs`).

Invariant: the models passed in are not modified.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from .. import rules
from ..calibrate import batches_of
from ..errors import UserError
from .blend import blend_model, blends, finalize, fit_squares, polynomials_of, reestimate_statistics, rule_layers_of
from .check import check_recovery, predict
from .metrics import MAX_DISAGREEMENT, MAX_DROP, MAX_ERROR
from .outputs import heads_of
from .training import LABEL_FREE_TEMPERATURE, BlendSchedule, Distiller, NaNGuard, check_trainable


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
    labels: bool = True,
    losses: str | Mapping[str, str] | None = None,
    temperature: float = 4.0,
    pseudo_labels: bool = True,
    label_free_temperature: float = LABEL_FREE_TEMPERATURE,
    alpha: float = 0.5,
    learning_rate: float = 2e-3,
    lr_schedule: str = "constant",
    clipnorm: float = 1.0,
    batch_size: int = 128,
    callbacks: Iterable[Any] = (),
    strategy: Any = None,
    max_restores: int = 10,
    fit: bool = True,
    max_drop: float | None = MAX_DROP,
    max_disagreement: float | None = MAX_DISAGREEMENT,
    max_error: float | None = MAX_ERROR,
    verbose: int = 0,
    checkpoint_dir: Any = None,
    resume: bool = False,
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

    Each output is trained by its loss (:mod:`.outputs`: ``kl`` for softmax
    or logits with class labels, ``binary_kl`` for sigmoid, ``mse`` scaled by
    the original's output variance otherwise; ``losses`` overrides, one kind
    or a kind per output name): ``alpha`` parts distillation, ``1 - alpha``
    parts labels where ``train`` has them. Where it has none, or with
    ``labels=False`` (labels are then ignored in ``val`` too), a classifier's
    output takes the original's top-1 classes as its labels
    (``pseudo_labels``, the default), and every other output is distilled
    alone (``label_free_temperature``: the temperature of a classifier's
    output distilled alone, with ``pseudo_labels=False``).

    The result is then checked on ``val`` (else on a held-out tenth of
    ``train`` when it is arrays, which is then not trained on; a Dataset
    without ``val`` is checked on its own first batches), output by output
    (:func:`~.check.check_recovery`): non-finite outputs fail; with labels, a
    top-1 accuracy more than ``max_drop`` points below the original's, or an
    MSE against targets more than ``max_error`` (a fraction) above it; without,
    more than ``max_disagreement`` points of disagreement with the original,
    or a relative error against its outputs over ``max_error``. Failing raises
    :class:`~actswap.errors.RecoveryFailedError` naming the output, the metric
    and the sites whose inputs grew the most (a limit of None skips that
    test, never the finite one). Returns the recovered model and the Keras
    History, which also carries ``nan_restores``, ``explosions``,
    ``blend_factors``, ``heads`` and ``check`` (the figures compared, with
    ``converted``'s). ``strategy`` (a ``tf.distribute`` strategy) scopes model
    building and training. A guard that gives up (more than ``max_restores``
    restores) raises a ConversionError. ``lr_schedule`` "cosine" lowers the
    learning rate along a half cosine over the epochs
    (:func:`cosine_learning_rate`); "constant" (default) keeps it.
    """
    import contextlib

    from ..errors import ConversionError
    from ..keras_setup import require_tensorflow

    # Its training loop is TensorFlow's: tf.data input, tf.distribute, the
    # distillation step and the guard's reads of the blend weights.
    require_tensorflow("recover")

    if lr_schedule not in LR_SCHEDULES:
        raise UserError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
    train = as_data(train, "training data", labels)
    val = None if val is None else as_data(val, "validation data", labels)
    if isinstance(train, tf.data.Dataset):
        train = _with_length(train)
    check = val
    if val is None and not isinstance(train, tf.data.Dataset):
        n = _rows(train[0])
        held = max(1, min(n // 10, CHECK_SAMPLES)) if n > 1 else 0
        train, check = _take(train, 0, n - held), _take(train, n - held, n)
    elif val is None:
        check = train.take(max(1, CHECK_SAMPLES // batch_size))
    from .checkpoints import EpochCheckpoint, read_latest, restore

    state = read_latest(checkpoint_dir) if resume and checkpoint_dir is not None else None
    if resume and state is None:
        raise ConversionError(f"--resume: no checkpoint in '{checkpoint_dir}' to resume from")
    def scope() -> Any:
        return strategy.scope() if strategy is not None else contextlib.nullcontext()

    calibration = _calibration_inputs(train, batch_size)
    heads = heads_of(original, converted, predict(original, calibration), label_sample(train), losses)
    check_trainable(heads, has_labels(train), alpha if distill else 0.0)
    with scope():
        polynomials = polynomials_of(converted)
        if state is not None:  # the constants the checkpointed weights were trained with
            squares = None if state["squares"] is None else {k: tuple(v) for k, v in state["squares"].items()}
        else:
            squares = fit_squares(original, polynomials, calibration) if fit else None
        student = blend_model(original, polynomials=polynomials, squares=squares,
                              rule_layers=rule_layers_of(converted))
        # The rule layers' constants (softmax and LayerNorm scales) from the
        # training inputs: at blend factor 0 the student computes the original.
        # (Measured again on a resume, from the same first inputs.)
        rules.calibrate_layers(student, batches_of(calibration, batch_size))
        optimizer = keras.optimizers.Adam(learning_rate, clipnorm=clipnorm)
        model = Distiller(student, original, temperature, alpha if distill else 0.0, heads=heads,
                          pseudo_labels=pseudo_labels, label_free_temperature=label_free_temperature)
        model.classifies = model.classifies and (val is None or has_labels(val))
        model.compile(optimizer=optimizer)
    schedule = BlendSchedule(ramp_epochs, progressive)
    guard = NaNGuard(max_restores=max_restores)
    if lr_schedule == "cosine":
        callbacks = [cosine_learning_rate(learning_rate, epochs), *callbacks]
    with scope():  # the optimizer's variables are the strategy's too
        done = restore(state, student, optimizer, guard) if state is not None else 0
    extra = [EpochCheckpoint(checkpoint_dir, student, optimizer, guard, squares)] if checkpoint_dir is not None else []
    fit_kwargs: dict[str, Any] = {
        "epochs": epochs, "initial_epoch": min(done, epochs), "verbose": verbose,
        "callbacks": [schedule, guard, *callbacks, *extra],
    }
    from . import loop

    if loop.needs_own_loop(strategy):
        history = loop.fit(model, train, val, strategy=strategy, epochs=epochs, initial_epoch=fit_kwargs["initial_epoch"],
                           batch_size=batch_size, callbacks=fit_kwargs["callbacks"])
    elif isinstance(train, tf.data.Dataset):  # shuffled by its pipeline, as Keras expects of a Dataset
        history = model.fit(train, validation_data=val, shuffle=False, **fit_kwargs)
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
    history.resumed_from = done
    history.nan_restores = guard.restores
    history.explosions = guard.explosions
    history.blend_factors = schedule.history
    history.heads = heads
    recovered = finalize(student)
    history.check = check_recovery(original, recovered, check, heads=heads, max_drop=max_drop,
                                   max_disagreement=max_disagreement, max_error=max_error,
                                   batch_size=batch_size, converted=converted)
    return recovered, history


def as_data(data: Any, what: str, labels: bool = True) -> Any:
    """``data`` as (x, y) arrays (y None without labels) or a Dataset; with
    ``labels=False`` its labels are dropped. A tuple/list is ``(x,)`` or
    ``(x, y)``; anything else is the inputs alone."""
    if isinstance(data, tf.data.Dataset):
        if not labels and has_labels(data):
            return data.map(lambda *item: item[0])
        return data
    if isinstance(data, (tuple, list)):
        if len(data) not in (1, 2):
            raise UserError(f"{what}: pass x, (x,) or (x, y) arrays, or a tf.data.Dataset; got {len(data)} items")
        x, y = data[0], (data[1] if len(data) == 2 else None)
    else:
        x, y = data, None
    if y is not None and any(_rows(a) != _rows(x) for a in keras.tree.flatten(y)):
        raise UserError(f"{what}: the inputs have {_rows(x)} rows and the labels {[_rows(a) for a in keras.tree.flatten(y)]}")
    return x, (y if labels else None)


def has_labels(data: Any) -> bool:
    """Whether (x, y) arrays or a Dataset carry labels."""
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        return isinstance(spec, tuple) and len(spec) >= 2
    return data[1] is not None


def label_sample(data: Any) -> Any:
    """The labels' structure (arrays or TensorSpecs), or None without labels."""
    if not has_labels(data):
        return None
    if isinstance(data, tf.data.Dataset):
        return data.element_spec[1]
    return keras.tree.map_structure(lambda a: np.asarray(a)[:1], data[1])


def _rows(x: Any) -> int:
    return len(keras.tree.flatten(x)[0])


def _take(data: tuple[Any, Any], start: int, stop: int) -> tuple[Any, Any]:
    x, y = data

    def cut(a: Any) -> Any:
        return np.asarray(a)[start:stop]

    return keras.tree.map_structure(cut, x), (None if y is None else keras.tree.map_structure(cut, y))


LR_SCHEDULES = ("constant", "cosine")


def cosine_learning_rate(learning_rate: float, epochs: int) -> Any:
    """Adam's learning rate from ``learning_rate`` down a half cosine, set at the
    start of each epoch (epoch e of n: lr·(1 + cos(π·e/n))/2). A function of the
    epoch alone, so a resumed recovery continues the same schedule. Measured on
    the transformer benchmark (ViT, seed 0, 5 epochs): 97.08% against 96.84%
    with a constant rate."""
    import math

    def rate(epoch: int, current: float) -> float:
        return float(learning_rate * 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1))))

    return keras.callbacks.LearningRateScheduler(rate)


def _with_length(ds: Any) -> Any:
    """``ds``, its number of batches known: the blend schedule is in epochs and
    needs the steps of one (Keras reports none for a pipeline of unknown length,
    and the ramp would then end after the first batch). An unknown length is
    counted once by reading the pipeline through."""
    if int(ds.cardinality()) != tf.data.UNKNOWN_CARDINALITY:
        return ds
    n = int(ds.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))
    return ds.apply(tf.data.experimental.assert_cardinality(n))


CALIBRATION_SAMPLES = 2048


def _calibration_inputs(train: Any, batch_size: int) -> Any:
    """The first CALIBRATION_SAMPLES inputs of ``train`` ((x, y) arrays or a Dataset)."""
    if isinstance(train, tf.data.Dataset):
        return np.concatenate([np.asarray(x) for x in _inputs(train, batch_size, CALIBRATION_SAMPLES // batch_size + 1)])
    return np.asarray(train[0][:CALIBRATION_SAMPLES])


def _inputs(data: Any, batch_size: int, limit: int) -> Iterable[Any]:
    """Up to ``limit`` input batches of (x, y) arrays or a Dataset of x, (x,) or (x, y)."""
    if isinstance(data, tf.data.Dataset):
        for item in data.take(limit):
            yield keras.utils.unpack_x_y_sample_weight(item)[0]
        return
    x = data[0]
    for i in range(0, min(len(x), limit * batch_size), batch_size):
        yield x[i: i + batch_size]
