"""``actswap recover`` as a function: files in, a checked recovered model out.

What the command does between parsing its arguments and rendering its
result, so that the CLI only parses and renders:

* load ORIGINAL, and either load CONVERTED or convert ORIGINAL in memory
  (``to``, ``sources``, ...: the conversion is never written, so a deep
  network whose x² overflows needs no intermediate file);
* open the training data and the check data (:mod:`.data`: .npz arrays,
  image folders, TFRecords or a user's pipeline; ``val``, else a held-out
  tenth of the training data, which is then not trained on);
* run :func:`actswap.recover.recover`, whose result is checked (finite
  outputs, accuracy within ``max_drop`` points of the original's);
* write the result atomically -- only if the check passed, or ``force``.

Invariant: ORIGINAL and CONVERTED are never modified; nothing is written
when the recovery failed unless ``force`` (and then the failure is still
raised, after the write, so the exit status says it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .data import HOLD_OUT  # without --val, 1/HOLD_OUT of the training data is the check data


def default_output(original: Path, converted: Path | None, to: str | None) -> Path:
    """``<converted stem>.recovered.keras``, or ``<original stem>.<target>.recovered.keras``."""
    base = converted if converted is not None else original
    stem = base.name[: -len(base.suffix)] if base.suffix else base.name
    middle = "" if converted is not None else f".{(to or 'square').split(':')[0]}"
    return base.with_name(f"{stem}{middle}.recovered.keras")


def split_check(x: Any, y: Any) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """(train, check): the last tenth of (x, y) held out (at least one sample);
    ``y`` may be None (no labels) or a dict by output name."""
    if len(x) < 2:
        from ..errors import UserError

        raise UserError(f"training data has {len(x)} sample(s); recovery needs at least 2 (or --val)")
    held = max(1, len(x) // HOLD_OUT)

    def part(a: Any, s: slice) -> Any:
        return None if a is None else ({k: v[s] for k, v in a.items()} if isinstance(a, dict) else a[s])

    head, tail = slice(None, -held), slice(-held, None)
    return (x[head], part(y, head)), (x[tail], part(y, tail))


def run(
    original: str | os.PathLike[str],
    converted: str | os.PathLike[str] | None,
    data: str | os.PathLike[str],
    *,
    val: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str],
    force: bool = False,
    conversion: dict[str, Any] | None = None,
    data_options: Any = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    logdir: str | os.PathLike[str] | None = None,
    callbacks: list[Any] = (),  # type: ignore[assignment]
    **recover_options: Any,
) -> dict[str, Any]:
    """Recover and write; return the figures (what ``--json`` prints).

    ``conversion`` (without ``converted``): keyword arguments of
    :func:`actswap.convert` (``to``, ``sources``, ...). Raises
    :class:`~actswap.errors.RecoveryFailedError` when the result is not
    recovered; with ``force`` it is written first and the error carries the
    written path in ``result["output"]``."""
    from .. import api
    from ..formats import load_keras_model
    from ..formats.keras_file import save_keras
    from .. import recover as R
    from ..errors import RecoveryFailedError

    from .data import DataOptions, kind, open_data, read_errors

    import contextlib

    from .distribute import replicas

    options = data_options or DataOptions(batch_size=recover_options.get("batch_size", 128))
    strategy = recover_options.get("strategy")
    # The models are built under the strategy: their variables are mirrored on its devices.

    def scope() -> Any:
        return strategy.scope() if strategy is not None else contextlib.nullcontext()

    with scope():
        teacher = load_keras_model(original)[0]
    if val is not None:
        train = open_data(str(data), "training data", options, teacher)
        check = open_data(str(val), "validation data", options, teacher, shuffle=False)
    elif kind(str(data)) == "npz":
        train, check = split_check(*open_data(str(data), "training data", options, teacher))
    else:
        train = open_data(str(data), "training data", options, teacher, split="train")
        check = open_data(str(data), "training data", options, teacher, split="check")
    with scope():
        if converted is not None:
            target = load_keras_model(converted)[0]
        else:
            target, report = api.convert(teacher, **(conversion or {}))
            if report.replaced == 0:
                from ..errors import UserError

                raise UserError(f"nothing to replace in '{original}' for this conversion; nothing to recover")
    # A corrupt image or record surfaces only when the pipeline reaches it.
    named = [("training data", str(data))] + ([("validation data", str(val))] if val is not None else [])
    result: dict[str, Any] = {"replicas": replicas(strategy)}
    per_epoch: list[dict[str, Any]] = []
    import keras

    from .blend import blends
    from .monitor import SiteScalars, Throughput

    speed = Throughput(options.batch_size)

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            factors = [float(b.factor.numpy()) for b in blends(self.model)]
            logs = logs or {}
            per_epoch.append({"epoch": epoch + 1, "loss": float(logs.get("loss", float("nan"))),
                              "val_accuracy": logs.get("val_accuracy"), "val_loss": logs.get("val_loss"),
                              "blend": sum(factors) / len(factors) if factors else None,
                              **(speed.per_epoch[-1] if speed.per_epoch else {})})

    failure: RecoveryFailedError | None = None
    try:
        scalars = [SiteScalars(str(logdir))] if logdir is not None else []
        with read_errors(*named):
            model, history = R.recover(
                teacher, target, train, val=check, callbacks=[*callbacks, speed, Record(), *scalars],
                checkpoint_dir=checkpoint_dir, resume=resume, **recover_options,
            )
        result["resumed_from"] = history.resumed_from
        figures = history.check
        result.update(nan_restores=history.nan_restores, explosions=history.explosions)
    except RecoveryFailedError as e:
        failure, model, figures = e, e.model, e.result
        result.update(nan_restores=None, explosions=None)
    result.update(
        original_accuracy=figures.get("original_accuracy"), converted_accuracy=figures.get("converted_accuracy"),
        recovered_accuracy=figures.get("recovered_accuracy"), outputs=figures.get("outputs", []),
        losses={o["output"]: o["loss"] for o in figures.get("outputs", [])},
        check=figures, epochs=per_epoch, output=None, check_samples=figures.get("samples"),
    )
    if failure is None or force:
        result["output"] = str(save_keras(model, Path(output), overwrite=force))
    if failure is not None:
        failure.result = result
        raise failure
    return result

