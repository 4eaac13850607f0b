"""``actswap scan``: the pre-load security scan alone; never imports TensorFlow."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .base import (
    Debug, _run, app,
)


@app.command("scan")
def scan_command(
    model: Path = typer.Argument(
        ..., help="Model: .keras, legacy .h5, SavedModel directory or frozen .pb (detected from content)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of lines."),
    debug: Debug = False,
) -> None:
    """Check MODEL without loading it (no TensorFlow): code it would run, a malformed or
    hostile container, low precision. Exit 2 if convert/inspect/export would refuse it."""

    def body() -> int:
        from .. import scan as scanning

        report = scanning.scan(model)
        if as_json:
            typer.echo(json.dumps(report.to_dict()))
        else:
            for f in report.findings:
                typer.echo(f"{f.severity:<8} {f.kind:<10} {f.message}")
            if report.not_listed:
                typer.echo(f"{'':<8} {'':<10} ... and {report.not_listed} more finding(s) not listed")
            for line in report.checked:
                typer.echo(f"checked  {line}")
            errors, warnings = len(report.errors), len(report.warnings)
            verdict = "refused" if errors else "ok"
            typer.echo(f"{model}: {report.format}, {errors} error(s), {warnings} warning(s): {verdict}")
        if report.errors:
            code_only = all(f.kind == scanning.CODE for f in report.errors)
            hint = (
                "--trust-code would load it anyway: only if you trust its author"
                if code_only else "--trust-code does not override this"
            )
            typer.echo(
                f"error: '{model}' would be refused: {report.errors[0].message}"
                + (f" (and {len(report.errors) - 1 + report.not_listed} more)" if len(report.errors) > 1 else "")
                + f"; {hint}",
                err=True,
            )
            return 2
        return 0

    _run(debug, body)
