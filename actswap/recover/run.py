"""``recover()``: blend, train, re-estimate, finalize, and check the result --
a recovery that did not recover raises instead of returning a broken model.

Invariant: the models passed in are not modified.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..sites import find_sites
from .. import rules
from ..calibrate import batches_of
from .blend import blend_model, blends, finalize, fit_squares, polynomials_of, reestimate_statistics, rule_layers_of
from .training import BlendSchedule, Distiller, NaNGuard


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
    lr_schedule: str = "constant",
    clipnorm: float = 1.0,
    batch_size: int = 128,
    callbacks: Iterable[Any] = (),
    strategy: Any = None,
    max_restores: int = 10,
    fit: bool = True,
    max_drop: float | None = MAX_DROP,
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
    ``max_restores`` restores) raises a ConversionError. ``lr_schedule``
    "cosine" lowers the learning rate along a half cosine over the epochs
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
    if isinstance(train, tf.data.Dataset):
        train = _with_length(train)
    check = val
    if val is None and not isinstance(train, tf.data.Dataset):
        x, y = np.asarray(train[0]), np.asarray(train[1])
        held = max(1, min(len(x) // 10, CHECK_SAMPLES)) if len(x) > 1 else 0
        train, check = (x[: len(x) - held], y[: len(y) - held]), (x[len(x) - held:], y[len(y) - held:])
    elif val is None:
        check = train.take(max(1, CHECK_SAMPLES // batch_size))
    from .checkpoints import EpochCheckpoint, read_latest, restore

    state = read_latest(checkpoint_dir) if resume and checkpoint_dir is not None else None
    if resume and state is None:
        raise ConversionError(f"--resume: no checkpoint in '{checkpoint_dir}' to resume from")
    def scope() -> Any:
        return strategy.scope() if strategy is not None else contextlib.nullcontext()

    with scope():
        polynomials = polynomials_of(converted)
        if state is not None:  # the constants the checkpointed weights were trained with
            squares = None if state["squares"] is None else {k: tuple(v) for k, v in state["squares"].items()}
        else:
            squares = fit_squares(original, polynomials, _calibration_inputs(train, batch_size)) if fit else None
        student = blend_model(original, polynomials=polynomials, squares=squares,
                              rule_layers=rule_layers_of(converted))
        # The rule layers' constants (softmax and LayerNorm scales) from the
        # training inputs: at blend factor 0 the student computes the original.
        # (Measured again on a resume, from the same first inputs.)
        rules.calibrate_layers(student, batches_of(_calibration_inputs(train, batch_size), batch_size))
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
    recovered = finalize(student)
    history.check = check_recovery(original, recovered, check, max_drop=max_drop, batch_size=batch_size)
    return recovered, history


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


def _batches(data: Any, batch_size: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(x, y) batches of (x, y) arrays or of a Dataset of (x, y) batches, streamed."""
    if isinstance(data, tf.data.Dataset):
        for item in data:
            yield np.asarray(item[0]), np.asarray(item[1])
        return
    x, y = data
    for i in range(0, len(x), batch_size):
        yield np.asarray(x[i: i + batch_size]), np.asarray(y[i: i + batch_size])


def _predict(model: Any, x: np.ndarray) -> np.ndarray:
    """``model`` on one batch, whatever strategy its variables live under
    (``predict_on_batch`` returns one replica's share under MirroredStrategy)."""
    return np.asarray(model.predict(x, batch_size=len(x), verbose=0))


def _correct(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Top-1 hits; NaN outputs count as wrong."""
    return np.all(np.isfinite(pred), axis=-1) & (np.argmax(pred, -1) == np.asarray(y).reshape(-1))


def check_recovery(original: Any, recovered: Any, data: Any, *, max_drop: float | None = MAX_DROP,
                   batch_size: int = 256) -> dict[str, Any]:
    """Compare ``recovered`` with ``original`` on ``data`` ((x, y) or a Dataset,
    read batch by batch): raise :class:`~actswap.errors.RecoveryFailedError` if
    its outputs are not all finite, or its accuracy is more than ``max_drop``
    points below the original's (None: not checked). Returns the figures compared."""
    from ..errors import RecoveryFailedError

    n = hits_original = hits_recovered = nonfinite = 0
    first: list[np.ndarray] = []
    for xb, yb in _batches(data, batch_size):
        pred = _predict(recovered, xb)
        nonfinite += int(np.size(pred) - np.isfinite(pred).sum())
        hits_recovered += int(_correct(pred, yb).sum())
        hits_original += int(_correct(_predict(original, xb), yb).sum())
        n += len(xb)
        if sum(len(f) for f in first) < 512:
            first.append(xb)
    if n == 0:
        raise RecoveryFailedError("recovery cannot be checked: the check data is empty", model=recovered, result={})
    result = {
        "samples": n, "original_accuracy": hits_original / n,
        "recovered_accuracy": hits_recovered / n, "nonfinite_outputs": nonfinite,
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
    grown = site_growth(original, recovered, np.concatenate(first)[:512])
    result["site_growth"] = grown
    worst = ", ".join(f"'{g['site']}' |x| {g['recovered']:.3g} vs {g['original']:.3g}" for g in grown[:3])
    raise RecoveryFailedError(
        f"recovery failed: {why} ({n} samples); largest input growth per site: {worst or 'none'}; "
        "try more epochs, a lower --lr, or more data",
        model=recovered, result=result,
    )


def site_growth(original: Any, recovered: Any, x: Any) -> list[dict[str, Any]]:
    """Per replaced site, the largest |input| in ``recovered`` against that in
    ``original`` on inputs ``x``, largest ratio first."""
    from ..calibrate import calibrate

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


def accuracy(model: Any, x: Any, y: Any = None, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on (x, y) arrays, or on a Dataset of (x, y)
    batches passed as ``x``, read batch by batch; NaN outputs count as wrong."""
    data = x if y is None else (x, y)
    n = hits = 0
    for xb, yb in _batches(data, batch_size):
        hits += int(_correct(_predict(model, xb), yb).sum())
        n += len(xb)
    return hits / n if n else float("nan")


def load_xy(path: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from an .npz with arrays named ``x`` (inputs) and ``y`` (integer labels)."""
    from ..errors import UserError
    from ..paths import read_arrays

    arrays = read_arrays(path, what)
    if "x" not in arrays or "y" not in arrays:
        raise UserError(f"{what} '{path}' has arrays {sorted(arrays)}; it needs 'x' (inputs) and 'y' (labels)")
    if len(arrays["x"]) != len(arrays["y"]):
        raise UserError(f"{what} '{path}': x has {len(arrays['x'])} rows but y has {len(arrays['y'])}")
    return arrays["x"], arrays["y"]

