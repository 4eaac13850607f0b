"""``actswap verify``: independent check of a conversion someone else made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..policy import PARITY_TOL as DEFAULT_TOL
from .base import (
    AsJson, Debug, TrustCode, _console, _import_tensorflow_quietly, _run, _scan_first, _state,
    _warn_trust_code, app,
)


@app.command()
def verify(
    original: Path = typer.Argument(..., help="The model before conversion (.keras/.h5)."),
    converted: Path = typer.Argument(..., help="The converted model (.keras)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Also check this ONNX export against CONVERTED."),
    sample: Optional[Path] = typer.Option(None, "--sample", help="Inputs: .npz or .npy (default: seeded random)."),
    tol: float = typer.Option(DEFAULT_TOL, "--tol", help="Tolerance, relative to the output's largest value."),
    trust_code: TrustCode = False,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Check a conversion independently: which sites differ, weights bit-identical,
    outputs equal ORIGINAL with squares at those sites and finite (and ONNX parity). Exit 1 if any fails."""

    def body() -> int:
        if trust_code:
            _warn_trust_code()
        _scan_first(original, trust_code)
        _scan_first(converted, trust_code)
        _import_tensorflow_quietly(debug or _state["debug"])
        from ..verify import verify as run_verify

        report = run_verify(original, converted, onnx_path=onnx, sample=sample, tol=tol, trust_code=trust_code)
        data = report.to_dict()
        if as_json:
            typer.echo(json.dumps(data))
        else:
            console = _console()
            table = Table(title=f"verify {original} -> {converted}")
            for col in ("check", "result", "detail"):
                table.add_column(col)
            for c in report.checks:
                table.add_row(c.name, "ok" if c.ok else "FAILED", c.detail)
            console.print(table)
            for d in report.differences:
                console.print(f"difference: {d}")
        if not report.ok:
            typer.echo(f"error: verify failed: {', '.join(report.failed)}", err=True)
            return 1
        return 0

    _run(debug, body)
