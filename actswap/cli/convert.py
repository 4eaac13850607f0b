"""``actswap convert``: replace activations and write a model that loads and trains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .. import registry
from ..policy import PARITY_TOL as DEFAULT_TOL
from .base import (
    AsJson, Debug, TrustCode, _console, _import_tensorflow_quietly, _run, _sites_table, _state,
    _warn_code_findings, _warn_trust_code, app,
)


@app.command()
def convert(
    model: Path = typer.Argument(
        ..., help="Model: .keras, legacy .h5, SavedModel directory or frozen .pb (detected from content)."
    ),
    to: str = typer.Option(
        ..., "--to", help=f"Target: {', '.join(registry.target_names())} (poly:c0,c1,... ascending)."
    ),
    sources: str = typer.Option(
        "relu", "--from", help="Source activations to replace, comma-separated, or 'all'."
    ),
    degree: Optional[int] = typer.Option(None, "--degree", help="approx: polynomial degree (default: 2)."),
    fit_range: Optional[str] = typer.Option(None, "--range", help="approx: fit interval LO,HI (default: -4,4)."),
    calibrate: Optional[Path] = typer.Option(
        None, "--calibrate", help="Sample inputs (.npz with x, or .npy): measure each site's input range."
    ),
    margin: float = typer.Option(0.1, "--margin", help="Widen calibrated ranges by this fraction per side."),
    trainable: bool = typer.Option(False, "--trainable", help="approx: make the fitted coefficients trainable."),
    per_channel: bool = typer.Option(False, "--per-channel", help="quad/--trainable: coefficients per channel."),
    pool: Optional[str] = typer.Option(None, "--pool", help="'avg': swap max pooling for average pooling."),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output",
        help="Output path, same family as MODEL (default: <stem>.<target>.keras|.pb, or <dir>.<target>/ beside MODEL).",
    ),
    grad: str = typer.Option("exact", "--grad", help="Gradient of the new activation: exact | clip:C."),
    signature: Optional[str] = typer.Option(
        None, "--signature", help="SavedModel only: rewrite this signature, keep the others as they are."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    trust_code: TrustCode = False,
    strict: bool = typer.Option(
        False, "--strict", help="Exit 1, writing nothing, if any ReLU-like site was skipped."
    ),
    allow_nonfinite: bool = typer.Option(
        False, "--allow-nonfinite", help="Write the output even if it computes NaN/Inf where the original does not."
    ),
    onnx_out: Optional[Path] = typer.Option(
        None, "--onnx", help="Also export the converted model to this .onnx file, checked for parity."
    ),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: tf2onnx's preferred)."),
    sample: Optional[Path] = typer.Option(
        None, "--sample", help="Parity inputs: .npz (arrays named like the inputs, or x) or .npy."
    ),
    tol: float = typer.Option(DEFAULT_TOL, "--tol", help="Parity tolerance, relative to the output's largest value."),
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Replace every plain ReLU in MODEL and write a model that loads and trains."""

    def body() -> int:
        from ..pipeline import plan_convert, run_convert  # not on --help's path

        plan = plan_convert(
            model, to=to, output=output, grad=grad, signature=signature, force=force, onnx_out=onnx_out,
            sources=sources, degree=degree, interval=fit_range, calibrate=calibrate, margin=margin,
            trainable=trainable, per_channel=per_channel, pool=pool, trust_code=trust_code,
        )
        if trust_code:
            _warn_trust_code()
            if plan.scan_report is not None:
                _warn_code_findings(plan.scan_report)
        _import_tensorflow_quietly(debug or _state["debug"])
        report, failed = run_convert(
            plan, strict=strict, trust_code=trust_code, opset=opset, sample=sample, tol=tol,
            allow_nonfinite=allow_nonfinite,
        )
        data = report.to_dict()
        if as_json:
            if failed:
                data["error"] = "strict"
            typer.echo(json.dumps(data))
        else:
            console = _console()
            console.print(
                _sites_table(
                    f"{model} -> {to}", data["sites"],
                    ["path", "layer", "form", "activation", "action", "reason"],
                )
            )
            for note in report.notes:
                if report.needs_recovery is None or report.needs_recovery not in note:
                    console.print(f"note: {note}")
            nothing = "nothing to replace; " if report.replaced == 0 else ""
            console.print(
                f"replaced {report.replaced}, skipped {report.skipped} "
                f"({report.skipped_relu_like} ReLU-like); {nothing}"
                + (f"wrote {report.output}" if report.output else "nothing written")
            )
        if report.needs_recovery is not None:
            typer.echo(f"warning: {report.needs_recovery}", err=True)
        if failed:
            typer.echo(
                f"error: --strict: {report.skipped_relu_like} ReLU-like site(s) were skipped "
                "(see the report); nothing was written",
                err=True,
            )
            return 1
        return 0

    _run(debug, body)
