"""``actswap recover``: recover accuracy after the swap; fails when it does not recover."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .. import registry
from ..errors import UserError
from .base import (
    AsJson, Debug, _console, _import_tensorflow_quietly, _run, _scan_first, _state, app,
)


@app.command()
def recover(
    original: Path = typer.Argument(..., help="The trained model before conversion (.keras/.h5)."),
    converted: Optional[Path] = typer.Argument(
        None, help="Its conversion (.keras): which sites, which polynomials. Omit it and give --to instead."
    ),
    data: str = typer.Option(
        ..., "--data",
        help="Training data: .npz with x (inputs) and, if labelled, y (labels or targets) or y_<output> per "
        "output; a folder with one subfolder of images per class, or of images alone; TFRecord files (a glob) "
        "of tf.train.Examples with an encoded image and, if labelled, an int label or float target; or "
        "module:function returning a tf.data.Dataset of (x, y) or x batches (this RUNS that module's code). "
        "Without labels the original alone teaches.",
    ),
    val: Optional[str] = typer.Option(
        None, "--val", help="Validation data, in any of those forms (default: a tenth of --data, held out)."
    ),
    image_size: Optional[str] = typer.Option(
        None, "--image-size", help="Images: resize to H,W (default: the model's input size)."
    ),
    scale: str = typer.Option("1", "--scale", help="Images: multiply pixel values by this (e.g. 1/255), as the model expects."),
    image_key: str = typer.Option("image", "--image-key", help="TFRecords: the feature holding the encoded image."),
    label_key: Optional[str] = typer.Option(
        None, "--label-key", help="TFRecords: the feature holding the label (default: 'label' when present, else no labels)."
    ),
    to: Optional[str] = typer.Option(
        None, "--to", help="Without CONVERTED: the target, as for convert (square, poly:..., approx) (default: square)."
    ),
    sources: str = typer.Option("relu", "--from", help="Without CONVERTED: source activations, as for convert."),
    degree: Optional[int] = typer.Option(None, "--degree", help="Without CONVERTED, approx: polynomial degree."),
    fit_range: Optional[str] = typer.Option(None, "--range", help="Without CONVERTED, approx: fit interval LO,HI."),
    epochs: int = typer.Option(2, "--epochs", help="Epochs of recovery."),
    ramp: float = typer.Option(0.5, "--ramp", help="Epochs over which each site blends into its polynomial."),
    batch_size: int = typer.Option(128, "--batch-size"),
    learning_rate: float = typer.Option(2e-3, "--lr", help="Adam learning rate (gradients clipped to norm 1)."),
    lr_schedule: str = typer.Option(
        "constant", "--lr-schedule", help="constant | cosine: the rate down a half cosine over the epochs."
    ),
    no_distill: bool = typer.Option(False, "--no-distill", help="Train on labels only, without the original as teacher."),
    no_labels: bool = typer.Option(
        False, "--no-labels",
        help="Ignore any labels: learn from the original alone (its outputs, and a classifier's top-1 classes "
        "as labels), and check fidelity to it."
    ),
    loss: Optional[str] = typer.Option(
        None, "--loss",
        help="Loss per output: kl | binary_kl | mse, for every output or OUTPUT=KIND,... (default: from each "
        "output's activation: softmax kl, sigmoid binary_kl, logits with class labels kl, else mse).",
    ),
    plain: bool = typer.Option(
        False, "--plain", help="Blend x² sites towards plain x² (no fitted scale and shift s·(x + b)²)."
    ),
    max_drop: float = typer.Option(
        1.0, "--max-drop", help="With labels: fail (exit 1) if a recovered accuracy is more than this many points "
        "below the original's."
    ),
    max_disagreement: float = typer.Option(
        5.0, "--max-disagreement", help="Without labels: fail if a class output disagrees with the original's on "
        "more than this many points (percent) of the check data."
    ),
    max_error: float = typer.Option(
        0.25, "--max-error", help="Outputs that are not classes: fail if the relative error against the original "
        "(RMSE over its standard deviation) exceeds this, or, with targets, the MSE is more than this fraction above the original's."
    ),
    checkpoint_dir: Optional[Path] = typer.Option(
        None, "--checkpoint-dir", help="Write a checkpoint here at each epoch end (atomically; the two newest are kept)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --checkpoint-dir."),
    distribute: Optional[str] = typer.Option(
        None, "--distribute",
        help="mirrored: tf.distribute.MirroredStrategy over the local devices. multiworker: "
        "MultiWorkerMirroredStrategy, the cluster read from TF_CONFIG; run the same command on every worker "
        "(only the chief writes --checkpoint-dir and --logdir; each writes its -o). --batch-size stays the "
        "global batch, split across all replicas.",
    ),
    cpu_devices: Optional[int] = typer.Option(
        None, "--cpu-devices", help="Split the CPU into N logical devices (for --distribute mirrored without GPUs)."
    ),
    logdir: Optional[Path] = typer.Option(
        None, "--logdir", help="Write TensorBoard scalars here: loss, validation accuracy, per site blend factor and largest |input|."
    ),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output",
        help="Output .keras (default: <converted>.recovered.keras, or <original>.<target>.recovered.keras).",
    ),
    force: bool = typer.Option(
        False, "--force", help="Overwrite OUTPUT if it exists; write it even if the recovery failed (still exit 1)."
    ),
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Fine-tune ORIGINAL into polynomials gradually (blend, distil, guard); fail if it does not recover."""

    def body() -> int:
        from ..formats.base import KERAS_MODEL  # the formats package: not on --help's path

        from ..paths import check_output_path
        from ..recover.files import default_output

        if converted is not None and (to is not None or degree is not None or fit_range is not None):
            raise UserError("give either CONVERTED or --to (with --from/--degree/--range), not both")
        _scan_first(original, needs=KERAS_MODEL)
        if converted is not None:
            _scan_first(converted, needs=KERAS_MODEL)
        out = output if output is not None else default_output(original, converted, to)
        check_output_path(out, overwrite=force)
        if epochs < 1 or not 0 <= ramp <= epochs:
            raise UserError(f"--epochs must be >= 1 and --ramp between 0 and --epochs; got {epochs}, {ramp}")
        for flag, value in (("--max-drop", max_drop), ("--max-disagreement", max_disagreement), ("--max-error", max_error)):
            if not value >= 0:
                raise UserError(f"{flag} must be >= 0, got {value}")
        from ..recover.outputs import parse_losses

        losses = parse_losses(loss)
        if no_distill and no_labels:
            raise UserError("--no-distill trains on labels and --no-labels ignores them: nothing to train on; drop one")
        if lr_schedule not in ("constant", "cosine"):
            raise UserError(f"--lr-schedule takes constant or cosine, got '{lr_schedule}'")
        from ..recover.data import DataOptions, check_spec, parse_image_size, parse_scale

        if distribute not in (None, "mirrored", "multiworker"):
            raise UserError(f"--distribute takes mirrored or multiworker, got '{distribute}'")
        if cpu_devices is not None and cpu_devices < 1:
            raise UserError(f"--cpu-devices must be >= 1, got {cpu_devices}")
        if logdir is not None:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise UserError("--logdir writes TensorBoard scalars, which need tensorboard: pip install 'actswap[tensorboard]'")
        if resume and checkpoint_dir is None:
            raise UserError("--resume needs --checkpoint-dir (where the run to continue wrote its checkpoints)")
        if resume and not (checkpoint_dir / "latest.json").is_file():
            raise UserError(f"--resume: no checkpoint in '{checkpoint_dir}' (no latest.json); drop --resume to start afresh")

        if check_spec(data, "training data") == "callable" and val is None:
            raise UserError(f"pass --val with --data {data}: actswap cannot hold out part of a pipeline it did not build")
        if val is not None:
            check_spec(val, "validation data")
        data_options = DataOptions(
            image_size=parse_image_size(image_size), scale=parse_scale(scale), image_key=image_key,
            label_key=label_key, batch_size=batch_size,
        )
        conversion = None
        if converted is None:
            from ..pipeline import parse_interval

            target, bounds = to or "square", parse_interval(fit_range)
            chosen = registry.resolve_sources(sources)
            if sources.strip() != "all":
                registry.check_pairs(chosen, registry.get_target(target, degree=degree, interval=bounds))
            conversion = {"to": target, "sources": chosen, "degree": degree, "interval": bounds}
        _import_tensorflow_quietly(debug or _state["debug"])
        from ..recover.distribute import make_strategy

        # Before anything else runs TensorFlow: devices and collectives are set up once.
        strategy = make_strategy(distribute, cpu_devices)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        import keras

        from ..errors import RecoveryFailedError
        from ..recover.files import run

        import time

        class Bar(keras.callbacks.Callback):
            def __init__(self, progress: Any) -> None:
                super().__init__()
                self.progress, self.task, self.start, self.steps = progress, None, 0.0, 0

            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self.task = self.progress.add_task(
                    f"epoch {epoch + 1}/{epochs}", total=self.params.get("steps"), rate="")
                self.start, self.steps = time.perf_counter(), 0

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                self.steps += 1
                per_s = self.steps / max(time.perf_counter() - self.start, 1e-9)
                self.progress.update(
                    self.task, advance=1, rate=f"{per_s:.1f} steps/s, {per_s * batch_size:.0f} samples/s")

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}")]
        failure: RecoveryFailedError | None = None
        with Progress(*columns, console=Console(stderr=True), disable=as_json) as progress:
            try:
                result = run(
                    original, converted, data, val=val, output=out, force=force, conversion=conversion,
                    data_options=data_options, checkpoint_dir=checkpoint_dir, resume=resume, logdir=logdir,
                    callbacks=[] if as_json else [Bar(progress)], epochs=epochs, ramp_epochs=ramp, distill=not no_distill,
                    learning_rate=learning_rate, lr_schedule=lr_schedule, batch_size=batch_size, fit=not plain,
                    max_drop=max_drop, max_disagreement=max_disagreement, max_error=max_error,
                    labels=not no_labels, losses=losses, strategy=strategy,
                )
            except RecoveryFailedError as e:
                failure, result = e, e.result
            except KeyboardInterrupt:
                if checkpoint_dir is None:
                    raise
                typer.echo(
                    f"error: interrupted; the last checkpoint in '{checkpoint_dir}' is usable: run the same "
                    "command with --resume to continue", err=True,
                )
                return 130
        if as_json:
            if failure is not None:
                result = {**result, "error": str(failure)}
            typer.echo(json.dumps(result))
        else:
            table = Table(title=f"recover {converted or original}")
            # Keras validates with the BatchNorm statistics of the moment; the final
            # figures below are after they are re-estimated, and can differ a lot.
            accuracy = any(e.get("val_accuracy") is not None for e in result["epochs"])
            for col in ("epoch", "loss", "val accuracy (running stats)" if accuracy else "val loss (running stats)"):
                table.add_column(col)
            for e in result["epochs"]:
                val_figure = e.get("val_accuracy") if accuracy else e.get("val_loss")
                table.add_row(str(e["epoch"]), f"{e['loss']:.4g}", "" if val_figure is None else f"{val_figure:.4f}")
            console = _console()
            console.print(table)
            restores = "" if result["nan_restores"] is None else (
                f"; restores {result['nan_restores']} ({result['explosions']} finite explosions)")
            written = f"wrote {result['output']}" if result["output"] else "nothing written"
            console.print(f"{summary(result)}{restores}; {written}")
        if failure is not None:
            where = f"; written anyway (--force): {result['output']}" if result["output"] else "; nothing written"
            typer.echo(f"error: {failure}{where}", err=True)
            return 1
        return 0

    _run(debug, body)


def summary(result: dict[str, Any]) -> str:
    """The check in one line: a labelled classifier's accuracies as ever, else
    each output's metric (original, converted, recovered)."""
    n = result.get("check_samples")
    if result.get("recovered_accuracy") is not None and len(result.get("outputs", [])) == 1:
        return (f"accuracy on {n} check samples: original {result['original_accuracy']:.4f}, "
                f"converted {result['converted_accuracy']:.4f}, recovered {result['recovered_accuracy']:.4f}")

    def fmt(o: dict[str, Any], key: str) -> str:
        v = o.get(key)
        return "n/a" if v is None else (f"{100 * v:.2f}%" if o["percent"] else f"{v:.4g}")

    parts = [f"'{o['output']}' ({o['loss']}) {o['metric']}: original {fmt(o, 'original')}, "
             f"converted {fmt(o, 'converted')}, recovered {fmt(o, 'recovered')}" for o in result.get("outputs", [])]
    return f"on {n} check samples: " + "; ".join(parts)
