"""``actswap export``: ONNX export proven equal to TensorFlow before it is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from ..policy import PARITY_TOL as DEFAULT_TOL
from .base import (
    AsJson, Debug, TrustCode, _console, _import_tensorflow_quietly, _run, _scan_first, _state,
    _warn_trust_code, app,
)


def _export_error_data(e: Exception) -> dict[str, Any]:
    report = getattr(e, "report", None)
    data = report.to_dict() if report is not None else {}
    data["error"] = str(e)
    return data


@app.command()
def export(
    model: Path = typer.Argument(..., help="Keras file (.keras/.h5) or SavedModel directory."),
    out: Path = typer.Argument(..., help="Output .onnx file."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: tf2onnx's preferred)."),
    sample: Optional[Path] = typer.Option(
        None, "--sample", help="Parity inputs: .npz (arrays named like the inputs, or x) or .npy."
    ),
    tol: float = typer.Option(DEFAULT_TOL, "--tol", help="Parity tolerance, relative to the output's largest value."),
    signature: Optional[str] = typer.Option(None, "--signature", help="SavedModel signature to export."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT (and OUT.data) if it exists."),
    external_data: Optional[bool] = typer.Option(
        None, "--external-data/--single-file",
        help="Weights in OUT.data beside OUT (ONNX external data), or all in OUT. "
             "Default: OUT.data from 100 MiB of weights on.",
    ),
    trust_code: TrustCode = False,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Export MODEL to ONNX; the export is checked (standard ops only, onnx.checker,
    onnxruntime parity with TensorFlow) and written only if every check passes."""

    def body() -> int:
        from ..formats import backend_for
        from ..formats.base import ONNX
        from ..paths import check_output_onnx

        check_output_onnx(out, overwrite=force)
        if trust_code:
            _warn_trust_code()
        backend = backend_for(model)
        _scan_first(model, trust_code, needs=ONNX)
        _import_tensorflow_quietly(debug or _state["debug"])
        from ..export import ExportCheckError, export_onnx

        obj, _ = backend.load(model, trust_code)
        try:
            report = export_onnx(obj, out, opset=opset, sample=sample, tol=tol, signature=signature,
                                 overwrite=force, external_data=external_data)
        except ExportCheckError as e:
            if as_json:
                typer.echo(json.dumps(_export_error_data(e)))
            raise
        data = report.to_dict()
        if as_json:
            typer.echo(json.dumps(data))
            return 0
        console = _console()
        counts = ", ".join(f"{k} {v}" for k, v in data["op_counts"].items())
        console.print(f"ops: {counts}")
        console.print(f"Relu nodes: {data['relu_nodes']}, Pow nodes: {data['pow_nodes']}, Mul nodes: {data['mul_nodes']}")
        shown = ", ".join(report.non_polynomial[:5]) + (" ..." if len(report.non_polynomial) > 5 else "")
        console.print(f"non-polynomial nodes: {len(report.non_polynomial)}{': ' + shown if shown else ''} "
                      "(an output Softmax is the client's and not counted)")
        console.print(f"parity: {report.parity.describe()}")
        for note in report.notes:
            console.print(f"note: {note}")
        weights = f"; its weights ({report.weight_bytes / 1e6:.1f} MB) in {report.data}" if report.data else ""
        console.print(f"wrote {report.output} (opset {report.opset}){weights}")
        return 0

    _run(debug, body)
